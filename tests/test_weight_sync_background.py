"""Background weight pushes (`weight_sync.Pusher`): while version v+1 is published and swapped in,
the engine serves v or v+1 whole, every result's version matches the weights that produced it,
what a reader finds under LATEST is a whole version, and a failed push surfaces on the learner."""

import threading

import jax
import numpy as np
import pytest

from tau2jax.inference import weight_sync
from tau2jax.inference.engine import SamplingParams
from tau2jax.inference.jax_engine import JaxEngine
from tau2jax.models import qwen3
from tau2jax.models.configs import get_model_config
from tau2jax.weights import mapping

CFG = get_model_config("tiny", vocab_size=512)
PROMPTS = [[1, 7, 42, 9], [3, 100, 5]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)
BF16 = mapping.np_dtype("bfloat16")


def _params(seed):
    return qwen3.init_params(CFG, jax.random.key(seed))


def _as_published(params):  # what a bf16 publish holds, read back as fp32
    return jax.tree.map(lambda x: np.asarray(x).astype(BF16).astype(np.float32), params)


def _reference(params) -> list:
    engine = JaxEngine(params, CFG, max_seq_len=64, max_batch=4)
    try:
        return [(r.output_ids, r.logprobs) for r in engine.generate(PROMPTS, GREEDY)]
    finally:
        engine.close()


class DiskEngine(weight_sync.ServedFromDisk):
    """A server in miniature: loads what was published (as SGLang's update_weights_from_disk) into
    a built-in engine."""

    kind = "disk"

    def __init__(self, params, root: str):
        self.inner = JaxEngine(params, CFG, max_seq_len=64, max_batch=4)
        self.publication = weight_sync.Publication(CFG, root, keep=5)
        self.loads = []

    def update_weights(self, path, version):
        self.inner.update_weights(weight_sync.load_hf_params(path)[0], version)
        self.loads.append(version)


def _await_served(seen: list, errors: list, more: int) -> None:
    """Waits until the serving thread has answered `more` further results (or failed)."""
    n = len(seen)
    while len(seen) < n + more and not errors:
        threading.Event().wait(0.01)


def _serve_while(engine, refs, done: threading.Event, seen: list) -> None:
    """Generates until `done`; every result must equal its reported version's reference, whole."""
    while not done.is_set():
        for i, r in enumerate(engine.generate(PROMPTS, GREEDY)):
            ids, lps = refs[r.policy_version][i]
            assert r.output_ids == ids, (r.policy_version, r.output_ids, ids)
            np.testing.assert_allclose(r.logprobs, lps, rtol=1e-5, atol=1e-5)
            seen.append(r.policy_version)


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_disk_push_in_background_is_never_half_read(tmp_path):
    root = str(tmp_path / "weights")
    versions = {v: _params(v) for v in range(3)}
    published = {v: _as_published(p) for v, p in versions.items()}
    refs = {v: _reference(p) for v, p in published.items()}
    engine = DiskEngine(published[0], root)
    swapped = []
    pusher = weight_sync.Pusher(engine, on_swap=swapped.append)
    done, seen, read, errors = threading.Event(), [], [], []

    def reader():  # LATEST always names a whole version: its bytes are that version's weights
        try:
            while not done.is_set():
                v = weight_sync.latest_version(root)
                if v is not None:
                    _assert_same(weight_sync.load_hf_params(weight_sync.version_dir(root, v))[0], published[v])
                    read.append(v)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def serve():
        try:
            _serve_while(engine.inner, refs, done, seen)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader), threading.Thread(target=serve)]
    for t in threads:
        t.start()
    try:
        for v in (1, 2):
            out = pusher.push(versions[v], v)  # returns at once: publish and swap run in the background
            assert out["wait_s"] >= 0 and out.get("version") == (v - 1 if v > 1 else None)  # the previous push's
        last = pusher.wait()
        _await_served(seen, errors, 2)  # the engine keeps serving across the last swap
    finally:
        done.set()
        for t in threads:
            t.join()
        engine.inner.close()
    assert not errors, errors[0]
    assert last["version"] == 2 and last["publish_s"] > 0 and last["pause_s"] > 0
    assert engine.loads == swapped == [1, 2] and engine.inner.policy_version == 2
    assert set(read) <= {1, 2} and read and seen[-1] == 2
    weight_sync.wait_pruned()
    assert weight_sync.published_versions(root) == [1, 2]


def test_in_process_push_swaps_whole_versions_while_serving():
    versions = {v: _params(10 + v) for v in range(3)}
    refs = {v: _reference(p) for v, p in versions.items()}
    engine = JaxEngine(versions[0], CFG, max_seq_len=64, max_batch=4)
    pusher = weight_sync.Pusher(engine)
    done, seen, errors = threading.Event(), [], []

    def serve():
        try:
            _serve_while(engine, refs, done, seen)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        for v in (1, 2):
            params = jax.tree.map(lambda x: x + 0, versions[v])
            pusher.push(params, v)
            jax.tree.map(lambda x: x.delete(), params)  # the learner's next step donates its params
        last = pusher.wait()
        _await_served(seen, errors, 2)
    finally:
        done.set()
        t.join()
        engine.close()
    assert not errors, errors[0]
    assert last["version"] == 2 and engine.policy_version == 2 and seen[-1] == 2
    assert seen == sorted(seen)  # versions only move forward


def test_a_failed_background_push_surfaces_on_the_learner(tmp_path):
    class Broken(DiskEngine):
        def update_weights(self, path, version):
            raise OSError("server gone (injected)")

    engine = Broken(_params(0), str(tmp_path / "w"))
    woke = []
    pusher = weight_sync.Pusher(engine, on_error=lambda: woke.append(True))
    try:
        pusher.push(_params(1), 1)
        pusher._thread.join()  # noqa: SLF001  (let the background push fail)
        assert woke == [True] and pusher.failed()
        with pytest.raises(RuntimeError, match=r"policy version 1 to the disk engine failed in the background: "
                                               r"OSError: server gone \(injected\)"):
            pusher.push(_params(2), 2)
    finally:
        engine.inner.close()
