"""Trainer -> inference engine weight sync through a publish directory of HF checkpoints.

    root/
      version_000003/    a complete HF checkpoint (config.json, *.safetensors, index)
      version_000004/
      LATEST             "4\\n": the newest complete version

The learner calls `push(engine, params, cfg, root, version)` after a step: an in-process engine
takes the params directly, an engine in another process (SGLang, our server) loads what `publish`
wrote. `sync_engine(engine, root, version)` points an engine at an already published version.

Crash safety: a version is written into a temp dir inside `root` (`version_N.tmp-*`), every file
and the dir are fsynced, and only then renamed to `version_N`, so a final name always holds a
complete checkpoint. `LATEST` is replaced (write temp, fsync, os.replace) only after that rename:
a crash at any point leaves the previous version intact and `LATEST` naming it. Temp dirs left by
a killed publisher are removed by the next `publish`.

Multi-host: call `publish` on every process (the export gathers sharded arrays); only process 0
writes. Call `sync_engine` from one process.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import jax

from tau2jax.weights import hf_read
from tau2jax.weights.hf_write import export_hf, fsync

LATEST = "LATEST"
_VERSION_DIR = re.compile(r"version_(\d{6,})")
# export_hf's "<name>.tmp-*" (being written) and "<name>.old-*" (replaced copy being deleted)
_TEMP = re.compile(r"(version_\d{6,}\.(tmp|old)|LATEST\.tmp)-")


def version_dir(root: str, version: int) -> str:
    return os.path.join(os.path.abspath(root), f"version_{version:06d}")


def latest_version(root: str) -> int | None:
    """The version `LATEST` names, or None before the first publish."""
    try:
        with open(os.path.join(root, LATEST)) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise ValueError(f"{os.path.join(root, LATEST)} holds {text!r}, not a version number")
    return int(text)


def published_versions(root: str) -> list[int]:
    """Complete versions under `root`, oldest first (temp dirs never match)."""
    if not os.path.isdir(root):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(root) if (m := _VERSION_DIR.fullmatch(n)))


def publish(params, cfg, root: str, version: int, *, keep: int = 3, dtype: str | None = "bfloat16",
            extra_dir: str | None = None) -> str:
    """Writes `params` as `root/version_{version:06d}` and points `LATEST` at it; returns the path.

    `dtype`: safetensors dtype (bfloat16 = what SGLang serves; None keeps the params' dtype).
    `extra_dir`: tokenizer/config files to include (e.g. the Orbax dir's hf_extra/), so SGLang can
    load the directory on its own. Keeps the newest `keep` versions (and always the one LATEST
    names). Republishing an existing version (a resumed run) replaces it.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = os.path.abspath(root)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(root, exist_ok=True)
        _remove_stale_temps(root)
    path = export_hf(params, cfg, version_dir(root, version), dtype, extra_dir=extra_dir, overwrite=True)
    if writer:
        _write_latest(root, version)
        _prune(root, keep, version)
    return path


# The reading side of `publish` (what SGLang's update_weights_from_disk does for its own model).
load_hf_params = hf_read.load_hf_params


def sync_engine(engine, root: str, version: int | None = None) -> int:
    """Loads published `version` (default: LATEST) into `engine` and returns it.

    An HTTP engine (`SGLangEngine`) is asked to load the directory itself
    (`update_weights_from_disk`); an in-process engine gets the params via `update_weights`.
    Either way the engine's `policy_version` becomes `version`.
    """
    if version is None:
        version = latest_version(root)
        if version is None:
            raise FileNotFoundError(f"nothing published under {root} yet (no {LATEST} file)")
    path = version_dir(root, version)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"version {version} is not published under {root} (have {published_versions(root)})")
    engine.update_weights(path if engine.takes_published_weights else load_hf_params(path)[0], version)
    return version


def push(engine, params, cfg, root: str, version: int) -> dict:
    """The learner's `params` into `engine` as policy `version` -> {"pause_s", "transfer_s"}: seconds
    the engine could not serve, and seconds spent moving the weights.

    In-process engine: `update_weights` copies the arrays onto the engine's shardings (transfer),
    then swaps a reference under its lock; running batches finish on the old weights (pause 0).
    Published weights (SGLang): `publish` writes safetensors under `root` (transfer, the server
    keeps serving), then the server loads them (pause: SGLang drains and loads). Nothing is aborted:
    requests served before the swap come back stamped with the old version, and the learner judges
    each sample's staleness from those per-turn versions."""
    t = time.perf_counter()
    if not engine.takes_published_weights:
        engine.update_weights(params, version)
        return {"pause_s": 0.0, "transfer_s": time.perf_counter() - t}
    path = publish(params, cfg, root, version)
    if jax.process_count() > 1:  # every process's servers load what process 0 wrote
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"weight_sync.publish {version}")
    t1 = time.perf_counter()
    engine.update_weights(path, version)
    return {"pause_s": time.perf_counter() - t1, "transfer_s": t1 - t}


def _write_latest(root: str, version: int) -> None:
    tmp = os.path.join(root, f"{LATEST}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(f"{version}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST))
    fsync(root)


def _remove_stale_temps(root: str) -> None:
    for name in os.listdir(root):
        if _TEMP.match(name):
            p = os.path.join(root, name)
            shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.remove(p)


def _prune(root: str, keep: int, latest: int) -> None:
    for v in published_versions(root)[:-keep]:
        if v != latest:
            shutil.rmtree(version_dir(root, v), ignore_errors=True)
