"""Trainer -> inference engine weight sync through a publish directory of HF checkpoints.

    root/
      version_000003/    a complete HF checkpoint (config.json, *.safetensors, index)
      version_000004/
      LATEST             "4\\n": the newest complete version

The learner pushes after a step through a `Pusher` (`push(...)`: the same, waiting until served):
the engine snapshots the params on the devices (`Engine.stage_weights`), then, on a background
thread while it keeps serving, takes them over (`Engine.swap_weights`): an engine in another process
(SGLang, our server: `ServedFromDisk`) gets what its `Publication` wrote (bf16 cast and HF
transposes on the devices, streamed into the safetensors shards: `hf_write.write_hf`) and loads it;
the built-in engine swaps a reference to its own on-device copy. Only the load / swap pauses the
engine. `sync_engine(engine, root, version)` points an engine at an already published version.
`default_root`: /dev/shm for a server on this host, else the workdir.

Crash safety: a version is written into a temp dir inside `root` (`version_N.tmp-*`), every file
and the dir are fsynced, and only then renamed to `version_N`, so a final name always holds a
complete checkpoint. `LATEST` is replaced (write temp, fsync, os.replace) only after that rename:
a crash at any point leaves the previous version intact and `LATEST` naming it. Temp dirs left by
a killed publisher are removed by the next `publish`.

Multi-host: call `publish` (or `Pusher.push`) on every process (each parameter is gathered on the
devices); only process 0 writes; every process then tells its own servers once LATEST names the
version. Call `sync_engine` from one process.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import stat
import threading
import time
import urllib.parse

import jax

from tau2jax.config import ConfigError
from tau2jax.weights import hf_read, hf_write
from tau2jax.weights.hf_write import fsync

LATEST = "LATEST"
KEEP = 3  # versions kept (preflight budgets this many)
SHM = "/dev/shm"
PUBLISH_WAIT_S = 600.0  # how long a process waits for process 0 to publish a version
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


def publish(params, cfg, root: str, version: int, *, keep: int = KEEP, dtype: str | None = "bfloat16",
            extra_dir: str | None = None) -> str:
    """Writes `params` as `root/version_{version:06d}` and points `LATEST` at it; returns the path.

    `dtype`: safetensors dtype (bfloat16 = what SGLang serves; None keeps the params' dtype), cast
    on the devices. `extra_dir`: tokenizer/config files to include (e.g. the Orbax dir's
    hf_extra/), so SGLang can load the directory on its own. Keeps the newest `keep` versions (and
    always the one LATEST names; older ones are deleted in the background: `wait_pruned`). Republishing an existing version (a resumed run) replaces it.
    Multi-process: every process calls it (each parameter is gathered on the devices); process 0
    writes."""
    return publish_tensors(hf_write.device_tensors(params, cfg, dtype), cfg, root, version, keep=keep,
                           extra_dir=extra_dir)


def publish_tensors(tensors, cfg, root: str, version: int, *, keep: int = KEEP, extra_dir: str | None = None,
                    barrier: bool = True) -> str:
    """`publish` from `hf_write.device_tensors` output (e.g. a snapshot taken on the learner thread
    and written on another). `barrier=False`: no cross-process sync at the end (a background thread
    must not run collectives)."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = os.path.abspath(root)
    writer = jax.process_index() == 0
    if writer:
        if root.startswith(shm_base() + os.sep):
            private_dir(shm_base())  # made by default_root, checked again: owned by this uid, 0700
        os.makedirs(root, exist_ok=True)
        os.chmod(root, 0o755)
        _remove_stale_temps(root)
    path = hf_write.write_hf(tensors, cfg, version_dir(root, version), extra_dir=extra_dir, overwrite=True,
                             barrier=barrier)
    if writer:
        _write_latest(root, version)
        _prune_in_background(root, keep, version)
    return path


_pruner: threading.Thread | None = None


def _prune_in_background(root: str, keep: int, latest: int) -> None:
    """Old versions go after LATEST names the new one, off the publish's path (deleting a version
    is ~15% of writing one on tmpfs); one pruner at a time."""
    global _pruner
    wait_pruned()
    _pruner = threading.Thread(target=_prune, args=(root, keep, latest), name="weight_sync-prune", daemon=True)
    _pruner.start()


def wait_pruned() -> None:
    """Blocks until the last publish's old versions are gone."""
    if _pruner is not None:
        _pruner.join()


def default_root(workdir: str, server_urls=(), configured: str = "") -> str:
    """Where versions are published: `configured` if set; else, when every server URL is on this
    host, a per-run dir under /dev/shm (RAM: no disk in the way, the server reads it at memory
    speed); else `workdir/weights` (a shared filesystem the remote servers must also see). Several
    learner processes always get `workdir/weights`: process 0 writes what every host's servers read."""
    if configured:
        return os.path.abspath(configured)
    if jax.process_count() > 1:
        return os.path.join(os.path.abspath(workdir), "weights")
    hosts = {urllib.parse.urlparse(u).hostname for u in server_urls}
    if hosts and hosts <= _local_hosts() and os.path.isdir(SHM) and os.access(SHM, os.W_OK):
        run = hashlib.sha1(os.path.abspath(workdir).encode()).hexdigest()[:12]
        return os.path.join(private_dir(shm_base()), run, "weights")
    return os.path.join(os.path.abspath(workdir), "weights")


def shm_base() -> str:
    """This user's dir under /dev/shm (every run's publish dir there; our server's default
    --weights-root)."""
    return os.path.join(SHM, f"tau2jax-{os.getuid()}")


class SharedDirError(ConfigError):
    """A /dev/shm dir this user would publish into is not its own."""


def private_dir(path: str) -> str:
    """`path`, created 0700 if missing; refused (SharedDirError, one line) when it is a symlink,
    not a dir, or owned by another uid: /dev/shm is world-writable, so anyone could have made it
    first and would then read or replace the weights the servers load."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SharedDirError(f"{path} is not a directory of this user's (a symlink or a file): remove it, "
                             "or set rl.sync.weights_dir")
    if st.st_uid != os.getuid():
        raise SharedDirError(f"{path} is owned by uid {st.st_uid}, not this user (uid {os.getuid()}): "
                             "refusing to publish weights there; remove it, or set rl.sync.weights_dir")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _local_hosts() -> set[str]:
    names = {"localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()}
    try:
        names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        pass
    return names


# The reading side of `publish` (what SGLang's update_weights_from_disk does for its own model).
load_hf_params = hf_read.load_hf_params


class Publication:
    """Where a server engine's pushes go: `stage` casts the learner's params to bf16 HF tensors on
    the devices (the learner thread's part); `write` streams them into `root/version_N` and moves
    LATEST (the background part). Process 0 writes; every other process waits until LATEST names
    the version (its servers read the same shared root)."""

    def __init__(self, cfg, root: str, *, keep: int = KEEP, extra_dir: str | None = None):
        self.cfg, self.root, self.keep, self.extra_dir = cfg, os.path.abspath(root), keep, extra_dir

    def stage(self, params) -> list:
        return list(hf_write.device_tensors(params, self.cfg, "bfloat16"))

    def write(self, staged, version: int) -> str:
        path = publish_tensors(staged, self.cfg, self.root, version, keep=self.keep, extra_dir=self.extra_dir,
                               barrier=False)  # a background thread runs no collectives
        if jax.process_index() != 0:
            _wait_published(self.root, version)
        return path


class ServedFromDisk:
    """The weight half of the Engine protocol for engines in another process (SGLang, our server),
    on their `update_weights(path, version)`: pushes go through `publication` (set by the factory)."""

    publication: Publication | None = None
    default_tis_cap = 2.0  # its kernels are not the learner's: token TIS corrects the gap (verl, slime)

    def _target(self) -> Publication:
        if self.publication is None:
            raise RuntimeError(f"the {self.kind} engine has no publish directory for weight pushes "
                               "(set engine.publication = weight_sync.Publication(...))")
        return self.publication

    def stage_weights(self, params) -> list:
        return self._target().stage(params)

    def swap_weights(self, staged, version: int) -> float:
        path = self._target().write(staged, version)
        del staged  # the device copy is no longer needed
        t = time.perf_counter()
        self.update_weights(path, version)  # the server drains and loads: its pause
        return time.perf_counter() - t

    def load_weights(self, path: str, version: int) -> None:
        self.update_weights(path, version)

    def reload(self, version: int) -> None:
        self.load_weights(version_dir(self._target().root, version), version)


def sync_engine(engine, root: str, version: int | None = None) -> int:
    """Loads published `version` (default: LATEST) into `engine` and returns it
    (`engine.load_weights`: a server reads the directory itself, an in-process engine is handed the
    params). Either way the engine's `policy_version` becomes `version`."""
    if version is None:
        version = latest_version(root)
        if version is None:
            raise FileNotFoundError(f"nothing published under {root} yet (no {LATEST} file)")
    path = version_dir(root, version)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"version {version} is not published under {root} (have {published_versions(root)})")
    engine.load_weights(path, version)
    return version


def push(engine, params, version: int) -> dict:
    """The learner's `params` into `engine` as policy `version`, waiting until it serves them ->
    {"version", "publish_s", "pause_s"} (see `Pusher`)."""
    pusher = Pusher(engine)
    pusher.push(params, version)
    return pusher.wait()


class Pusher:
    """Weight pushes off the learner's critical path: `push(params, v)` has the engine snapshot the
    params (`engine.stage_weights`: dispatch only, on the learner thread, before the next step
    donates them) and returns; a background thread then hands the snapshot over
    (`engine.swap_weights`: a server's publish to disk and load, the built-in engine's reference
    swap) while the engine keeps serving v - 1 and rollouts go on. The learner waits only when it
    pushes again before the previous push is done.

    `push` -> {"wait_s": seconds this call blocked the learner} plus the last finished push's
    {"version", "publish_s", "pause_s"} (the engine's pause; publish = seconds the engine kept
    serving while the next version was handed over). `on_swap(v)` runs on the background thread
    once the engine serves v; `on_error()` there when a push failed: the learner's next
    `push`/`wait` raises it. Multi-process: every process calls `push` (the snapshot gathers on
    the devices). Device memory: one model copy while a push runs.
    """

    def __init__(self, engine, *, on_swap=None, on_error=None):
        self.engine = engine
        self._on_swap, self._on_error = on_swap, on_error
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self._last: dict | None = None

    def push(self, params, version: int) -> dict:
        t = time.perf_counter()
        last = self.wait()
        staged = self.engine.stage_weights(params)
        self._thread = threading.Thread(target=self._run, args=(staged, version), name=f"push-{version}",
                                        daemon=True)
        self._thread.start()
        return {"wait_s": time.perf_counter() - t, **(last or {})}

    def wait(self) -> dict | None:
        """Blocks until the push in flight is done -> its figures (None before any push); raises
        if a push failed in the background."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            (version, e), self._error = self._error, None
            raise RuntimeError(f"weight sync of policy version {version} to the {self.engine.kind} engine failed "
                               f"in the background: {type(e).__name__}: {e}") from e
        return self._last

    def failed(self) -> bool:
        return self._error is not None

    def _run(self, staged, version: int) -> None:
        try:
            t0 = time.perf_counter()
            pause = self.engine.swap_weights(staged, version)
            del staged
            self._last = {"version": version, "publish_s": time.perf_counter() - t0 - pause, "pause_s": pause}
            if self._on_swap is not None:
                self._on_swap(version)
        except BaseException as e:  # noqa: BLE001  (re-raised on the learner thread by wait())
            self._error = (version, e)
            if self._on_error is not None:
                self._on_error()


def _wait_published(root: str, version: int, timeout_s: float = PUBLISH_WAIT_S) -> None:
    """Blocks until LATEST names `version` or a newer one (process 0 publishing on the shared root)."""
    deadline = time.monotonic() + timeout_s
    while (latest_version(root) or -1) < version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"policy version {version} did not appear under {root} within {timeout_s:.0f} s: "
                               "is the publish root on a filesystem every learner host shares (rl.sync.weights_dir)?")
        time.sleep(0.05)


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
