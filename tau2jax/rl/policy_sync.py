"""`PolicySync`: keeps the rollout engine at the learner's policy version.

The GRPO loop pushes its params after a step (`push`: the engine snapshots them on the learner
thread, a background `weight_sync.Pusher` hands them over while rollouts go on), waits for the push
in flight before teardown (`wait`), and asks, when a rollout hit an infrastructure failure, whether
the engine lost our weights (`lost`, a worker thread: a restarted server serves a version below
the last completed sync). Then the learner `resync`s: one process pushes its current params again;
several processes (a push is collective, a resync is one process's) reload the version every process
published. Listeners (the rollout workers) hear each served version (`set_version`) and each failed
push (`request_resync`, so the learner's next wait raises it).

Nothing here knows which engine it is: how weights reach an engine is the engine's own business
(`inference.engine.Engine.stage_weights` / `swap_weights` / `reload`).
"""

from __future__ import annotations

import jax

from tau2jax.inference.weight_sync import Pusher


class PolicySync:
    def __init__(self, engine, version: int):
        self.engine = engine
        self.version = version  # the last version the engine was seen to serve whole
        self.resyncs = 0
        self._listeners: list = []
        self._pusher = Pusher(engine, on_swap=self._swapped, on_error=self._failed)

    def listen(self, listener) -> None:
        """`listener.set_version(v)` once the engine serves v; `listener.request_resync()` after a
        failed push (both on the background thread)."""
        self._listeners.append(listener)

    def start(self, params, version: int) -> None:
        """Before the first rollout: an engine that does not hold `version` of ours (a server that
        loaded its own start checkpoint) is pushed `params` and waited for."""
        if self.engine.synced_version != version:
            self.push(params, version)
            self.wait()

    def push(self, params, version: int) -> dict:
        """`params` as `version`, in the background -> {"wait_s"} + the previous push's figures."""
        return self._pusher.push(params, version)

    def wait(self) -> dict | None:
        """The push in flight, done -> its figures; raises if a push failed in the background."""
        return self._pusher.wait()

    def lost(self, traj) -> bool:
        """Worker thread, after an infrastructure failure: does the engine serve less than our last
        sync (restarted)? Mid-sync it serves the old or the new version, neither below."""
        v = self.engine.served_version()
        return v is not None and v < self.version

    def resync(self, params, version: int) -> None:
        """Learner thread: the engine restarted without our weights (or a push failed: raised here)."""
        self.wait()
        if jax.process_count() == 1:
            self.push(params, version)
            self.wait()
        else:
            self.engine.reload(self.version)
            self._swapped(self.version)
        self.resyncs += 1

    def engines_behind(self, version: int) -> int:
        """1 when this process's engine serves less than `version` (a metric, summed over processes)."""
        return int((self.engine.served_version() or 0) < version)

    def _swapped(self, version: int) -> None:
        self.version = version
        for listener in self._listeners:
            listener.set_version(version)

    def _failed(self) -> None:
        for listener in self._listeners:
            listener.request_resync()
