"""`PolicySync`: keeps the rollout engine at the learner's policy version, through outages.

The GRPO loop pushes its params after a step (`push`: the engine snapshots them on the learner
thread, a background `weight_sync.Pusher` hands them over while rollouts go on) and waits for the
push in flight before teardown (`wait`). Nothing here knows which engine it is: how weights reach
an engine is the engine's business (`inference.engine.Engine.stage_weights` / `swap_weights` /
`reload`).

Faults. A rollout worker that hit an infrastructure failure asks `lost(traj)`:
- the engine cannot be asked (down): the sync turns *down*, and one prober thread polls it every
  `poll_s`; every episode attempt waits at `await_serving` instead of burning its retries;
- it serves less than our last completed sync, or a version that is none of ours (a restarted
  SGLang says "default": `UNKNOWN_VERSION`): the sync turns *unsynced* and the learner re-syncs.
When the prober sees the engine answer again it turns unsynced (or back to serving if the engine
kept our version). The learner thread `resync`s when a listener (the rollout workers) wakes it: one
process pushes its current params again; several processes (a push is collective, a resync is one
process's) reload the version every process published. A push that fails (in the background, or in
a resync) is counted and retried once the engine answers again; it never stops the run. Only an
outage longer than `outage_s` does, naming the engine: every waiting episode and the learner's next
resync raise `EngineOutageError`.

Listeners hear each served version (`set_version`) and each time the learner must act
(`request_resync`).
"""

from __future__ import annotations

import logging
import threading
import time

import jax

from tau2jax.inference.weight_sync import Pusher

log = logging.getLogger(__name__)

OUTAGE_S = 1800.0  # a policy server restarted by launch/gpu_node.sh reloads a 4B model in minutes
POLL_S = 1.0
SERVING, DOWN, UNSYNCED = "serving", "down", "unsynced"


class EngineOutageError(RuntimeError):
    """The engine stayed unreachable past the outage deadline."""


class PolicySync:
    def __init__(self, engine, version: int, *, outage_s: float = OUTAGE_S, poll_s: float = POLL_S):
        self.engine = engine
        self.version = version  # the last version the engine was seen to serve whole
        self.resyncs = 0
        self.push_failures = 0
        self.outages = 0
        self.outage_s, self.poll_s = outage_s, poll_s
        self._listeners: list = []
        self._pusher = Pusher(engine, on_swap=self._swapped, on_error=self._push_failed)
        self._cv = threading.Condition()
        self._state = SERVING
        self._error: str | None = None  # the outage deadline passed
        self.last_error: str | None = None  # the last failed push
        self._prober: threading.Thread | None = None
        self._closed = False

    def listen(self, listener) -> None:
        """`listener.set_version(v)` once the engine serves v; `listener.request_resync()` when the
        learner must re-sync (any thread)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ the learner's side

    def start(self, params, version: int) -> None:
        """Before the first rollout: an engine that does not hold `version` of ours (a server that
        loaded its own start checkpoint) is pushed `params` and waited for."""
        if self.engine.synced_version != version:
            self.push(params, version)
            if self.wait() is None:
                raise EngineOutageError(f"the first weight push to the engine at "
                                        f"{self.engine.location} failed: {self.last_error}")

    def push(self, params, version: int) -> dict:
        """`params` as `version`, in the background -> {"wait_s"} + the previous push's figures (a
        previous push that failed is counted and superseded by this one)."""
        t = time.perf_counter()
        last = self.wait()
        self._pusher.push(params, version)
        return {"wait_s": time.perf_counter() - t, **(last or {})}

    def wait(self) -> dict | None:
        """The push in flight, done -> its figures; None if it failed (counted in `push_failures`,
        `last_error`; the engine is then re-synced once it answers)."""
        try:
            return self._pusher.wait()
        except RuntimeError as e:
            self.last_error = str(e)
            log.warning("%s; it is pushed again once the engine answers", e)
            return None

    def resync(self, params, version: int) -> None:
        """Learner thread: the engine lost our weights, or a push failed; raises EngineOutageError
        past the outage deadline. Does nothing while the engine is down (the prober calls again)."""
        self._raise_if_expired()
        self.wait()  # the push in flight: a failure is counted (and turned the sync unsynced)
        if self._state == SERVING:
            return  # the prober found our version served: nothing to do
        if self.engine.served_version() is None:
            self._went_down()
            return
        try:
            if jax.process_count() == 1:
                self._pusher.push(params, version)
                self._pusher.wait()
            else:
                self.engine.reload(self.version)
                self._swapped(self.version)
        except Exception as e:  # noqa: BLE001  (an engine fault: retried once it answers)
            self.push_failures += 1
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("re-sync of the engine at %s failed (%s); retried once it answers",
                        self.engine.location, self.last_error)
            self._went_down() if self.engine.served_version() is None else self._request_resync()
            return
        self.resyncs += 1

    def engines_behind(self, version: int) -> int:
        """1 when this process's engine serves less than `version` (a metric, summed over processes)."""
        return int((self.engine.served_version() or 0) < version)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    # ------------------------------------------------------------------ the workers' side

    def lost(self, traj) -> bool:
        """Worker thread, after an infrastructure failure: True when the learner must re-sync (the
        engine serves less than our last sync: restarted; mid-sync it serves the old or the new
        version, neither below). A down engine starts the prober."""
        v = self.engine.served_version()
        if v is None:
            self._went_down()
            return False
        if v < self.version:
            with self._cv:
                self._state = UNSYNCED
            return True
        return False

    def await_serving(self) -> None:
        """Worker thread, before an episode attempt: blocks while the engine is down or not at our
        version; raises EngineOutageError past the outage deadline."""
        with self._cv:
            while self._state != SERVING and self._error is None and not self._closed:
                self._cv.wait(self.poll_s)
        self._raise_if_expired()

    # ------------------------------------------------------------------ internals

    def _raise_if_expired(self) -> None:
        if self._error is not None:
            raise EngineOutageError(self._error)

    def _went_down(self) -> None:
        with self._cv:
            if self._state == DOWN and self._prober is not None:
                return
            self._state = DOWN
            self.outages += 1
            log.warning("the engine at %s is down: rollouts wait for it (up to %.0f s)",
                        self.engine.location, self.outage_s)
            self._prober = threading.Thread(target=self._probe, name="policy-sync-probe", daemon=True)
            self._prober.start()

    def _probe(self) -> None:
        deadline = time.monotonic() + self.outage_s
        while True:
            v = self.engine.served_version()
            with self._cv:
                if self._closed:
                    return
                if v is not None:
                    self._state = SERVING if v >= self.version else UNSYNCED
                    self._prober = None
                    self._cv.notify_all()
                    break
                if time.monotonic() > deadline:
                    self._error = (f"the engine at {self.engine.location} did not answer for "
                                   f"{self.outage_s:.0f} s: restart it (launch/gpu_node.sh restarts a dead server) "
                                   "and resume from the last checkpoint")
                    self._cv.notify_all()
                    break
                self._cv.wait(self.poll_s)
        log.warning("the engine at %s answers again (version %s)", self.engine.location, v)
        self._request_resync()

    def _request_resync(self) -> None:
        for listener in self._listeners:
            listener.request_resync()

    def _swapped(self, version: int) -> None:
        with self._cv:
            self.version = version
            self._state = SERVING
            self._cv.notify_all()
        for listener in self._listeners:
            listener.set_version(version)

    def _push_failed(self) -> None:
        self.push_failures += 1
        with self._cv:
            if self._state == SERVING:
                self._state = UNSYNCED
        self._request_resync()
