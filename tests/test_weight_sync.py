"""Weight publishing: versions, LATEST, pruning, round trip, and crash safety (raise / SIGKILL)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tau2jax.weights import hf_write, mapping
from tau2jax.models.configs import get_model_config
from tau2jax.inference import weight_sync
from tau2jax.inference.jax_engine import JaxEngine
from tau2jax.inference.weight_sync import latest_version, load_hf_params, publish, published_versions, sync_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = get_model_config("tiny", vocab_size=512)


def _params(seed):
    """Random numpy params (no jax compile: the killed subprocess below builds them too)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda shape: rng.standard_normal(shape, np.float32), mapping.param_shapes(CFG),
                        is_leaf=lambda x: isinstance(x, tuple))


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_publish_latest_prune_and_round_trip(tmp_path):
    root = str(tmp_path / "pub")
    assert latest_version(root) is None and published_versions(root) == []
    for v in range(1, 5):
        path = publish(_params(v), CFG, root, v, keep=2, dtype=None)
        assert path == weight_sync.version_dir(root, v) and os.path.basename(path) == f"version_{v:06d}"
        assert latest_version(root) == v
    weight_sync.wait_pruned()  # old versions go in the background, after LATEST moved
    assert published_versions(root) == [3, 4]
    assert sorted(os.listdir(root)) == ["LATEST", "version_000003", "version_000004"]  # no temps left
    params, cfg = load_hf_params(weight_sync.version_dir(root, 4))
    assert cfg == CFG
    _assert_same(params, _params(4))
    # a resumed run republishes an older version: it replaces it, becomes LATEST, survives pruning
    publish(_params(30), CFG, root, 3, keep=1, dtype=None)
    weight_sync.wait_pruned()
    assert latest_version(root) == 3 and published_versions(root) == [3, 4]
    _assert_same(load_hf_params(weight_sync.version_dir(root, 3))[0], _params(30))


def test_export_error_midway_keeps_previous_version(tmp_path, monkeypatch):
    root = str(tmp_path / "pub")
    publish(_params(1), CFG, root, 1, dtype=None)

    real, calls = hf_write._write_array, []

    def broken_write(array, places):
        if calls:  # the first parameter lands in its shard, then the failure
            raise OSError("disk full (injected)")
        calls.append(real(array, places))

    monkeypatch.setattr(hf_write, "_write_array", broken_write)
    with pytest.raises(OSError, match="injected"):
        publish(_params(2), CFG, root, 2, dtype=None)
    assert latest_version(root) == 1
    assert sorted(os.listdir(root)) == ["LATEST", "version_000001"]
    _assert_same(load_hf_params(weight_sync.version_dir(root, 1))[0], _params(1))


def test_killed_publisher_leaves_previous_version_and_no_final_dir(tmp_path):
    root = str(tmp_path / "pub")
    publish(_params(1), CFG, root, 1, dtype=None)
    # A publisher process SIGKILLed while writing its safetensors: nothing cleans up after it.
    script = textwrap.dedent(f"""
        import os, signal
        from tau2jax.weights import hf_write
        from tau2jax.models.configs import get_model_config
        from tau2jax.inference.weight_sync import publish
        from tests.test_weight_sync import _params

        real = hf_write._write_array

        def dying_write(array, places):
            real(array, places)  # one parameter written, then the process dies
            os.kill(os.getpid(), signal.SIGKILL)

        hf_write._write_array = dying_write
        cfg = get_model_config("tiny", vocab_size=512)
        publish(_params(2), cfg, {root!r}, 2, dtype=None)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(os.listdir(root))
    assert any(n.startswith("version_000002.tmp-") for n in names), names  # died mid-write
    assert "version_000002" not in names and published_versions(root) == [1]
    assert latest_version(root) == 1
    _assert_same(load_hf_params(weight_sync.version_dir(root, 1))[0], _params(1))
    # the next publish clears the dead publisher's temp dir
    publish(_params(2), CFG, root, 2, dtype=None)
    assert sorted(os.listdir(root)) == ["LATEST", "version_000001", "version_000002"]


def test_sync_engine_has_a_server_read_the_dir_and_the_builtin_engine_load_it(tmp_path):
    root = str(tmp_path / "pub")
    with pytest.raises(FileNotFoundError, match="nothing published"):
        sync_engine(object(), root)
    publish(_params(1), CFG, root, 1, dtype=None)
    publish(_params(2), CFG, root, 2, dtype=None)

    class HttpLike(weight_sync.ServedFromDisk):
        kind = "http"

        def update_weights(self, path, version):
            self.loaded = (path, version)

    http, local = HttpLike(), JaxEngine(_params(0), CFG, max_seq_len=64, max_batch=1)
    try:
        assert sync_engine(http, root) == 2
        assert http.loaded == (weight_sync.version_dir(root, 2), 2)
        assert sync_engine(local, root, 1) == 1 and local.served_version() == local.synced_version == 1
        _assert_same(local._params, _params(1))  # noqa: SLF001
        with pytest.raises(FileNotFoundError, match="version 7 is not published"):
            sync_engine(local, root, 7)
    finally:
        local.close()


def test_default_root_is_shm_for_a_local_server_else_the_workdir(tmp_path):
    work = str(tmp_path / "run")
    assert weight_sync.default_root(work, [], "/x/pub") == "/x/pub"  # configured wins
    assert weight_sync.default_root(work, ["http://10.255.1.2:30000"]) == os.path.join(work, "weights")
    local = weight_sync.default_root(work, ["http://127.0.0.1:30000", "http://localhost:30001"])
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        assert local.startswith("/dev/shm/") and local != weight_sync.default_root(str(tmp_path / "other"),
                                                                                  ["http://127.0.0.1:1"])
    # one remote server among local ones: the files must be where it can read them
    assert weight_sync.default_root(work, ["http://127.0.0.1:1", "http://10.255.1.2:2"]) == os.path.join(work, "weights")


def test_shared_memory_dirs_are_created_0700_and_refused_when_not_ours(tmp_path, monkeypatch):
    """Issue 33: /dev/shm is world-writable; a tau2jax-<uid> dir made first by someone else would
    read or swap the weights the servers load."""
    mine = weight_sync.private_dir(str(tmp_path / "tau2jax-me"))
    assert os.stat(mine).st_mode & 0o777 == 0o700 and weight_sync.private_dir(mine) == mine
    os.chmod(mine, 0o777)  # ours but opened up: closed again
    assert weight_sync.private_dir(mine) and os.stat(mine).st_mode & 0o777 == 0o700
    os.symlink(mine, str(tmp_path / "link"))
    with pytest.raises(weight_sync.SharedDirError, match="is not a directory of this user's"):
        weight_sync.private_dir(str(tmp_path / "link"))
    uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: uid + 1)  # now the dir is another user's
    with pytest.raises(weight_sync.SharedDirError) as e:
        weight_sync.private_dir(mine)
    assert str(e.value) == (f"{mine} is owned by uid {uid}, not this user (uid {uid + 1}): refusing to publish "
                            "weights there; remove it, or set rl.sync.weights_dir")
    # publish checks this user's /dev/shm dir the same way before writing anything under it
    monkeypatch.setattr(weight_sync, "shm_base", lambda: mine)
    with pytest.raises(weight_sync.SharedDirError):
        publish(_params(1), CFG, os.path.join(mine, "run", "weights"), 1)
    assert os.listdir(mine) == []
