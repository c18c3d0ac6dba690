"""`ServerPool`: one Engine over several policy servers (`engine.url` lists them).

SGLang's own data parallelism (`--dp-size`) routes requests round-robin, so an episode's turns land
on different replicas and each re-prefills the whole conversation. The pool keeps every request with
one `SamplingParams.affinity` (the episode runner sets one per episode) on one server, chosen by
rendezvous hashing over the servers that are up: when a server dies only its own episodes move, and
they move to the others (the failed request still raises, so the episode is retried as an
infrastructure failure, and its retry lands on a live server). Requests without affinity go to the
least busy server. A weight push updates every server (in parallel); `served_version` is the oldest
version any reachable server serves, so a restarted server is seen even while the others are fine.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tau2jax.inference.engine import GenerateResult, SamplingParams, per_prompt
from tau2jax.inference.sglang_client import EngineUnavailableError, SGLangEngine
from tau2jax.inference.weight_sync import ServedFromDisk

DEAD_FOR_S = 30.0  # a server that failed is skipped this long, then tried again


def _weight(key: str, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest(), "big")


class ServerPool(ServedFromDisk):
    kind = "sglang"

    def __init__(self, servers: list[SGLangEngine], *, dead_for_s: float = DEAD_FOR_S, publication=None):
        if len(servers) < 2:
            raise ValueError("a ServerPool needs at least two servers (use SGLangEngine for one)")
        self.servers = list(servers)
        self.publication = publication
        self.dead_for_s = dead_for_s
        self._lock = threading.Lock()
        self._dead_until = {s.url: 0.0 for s in self.servers}
        self._busy = {s.url: 0 for s in self.servers}
        self.routed = {s.url: 0 for s in self.servers}  # requests sent, per server (tests, metrics)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    @property
    def policy_version(self) -> int:
        return min(s.policy_version for s in self.servers)

    @property
    def location(self) -> str:
        return ", ".join(self.urls)

    @property
    def synced_version(self) -> int | None:
        versions = [s.synced_version for s in self.servers]
        return None if None in versions else min(versions)

    def pick(self, affinity: str | None) -> SGLangEngine:
        """The server for a request: rendezvous hashing of `affinity` over the live servers (all of
        them, if none is live), else the least busy."""
        now = time.monotonic()
        with self._lock:
            live = [s for s in self.servers if self._dead_until[s.url] <= now] or self.servers
            if affinity is None:
                return min(live, key=lambda s: self._busy[s.url])
            return max(live, key=lambda s: _weight(affinity, s.url))

    def generate(self, input_ids: list[list[int]],
                 params: SamplingParams | list[SamplingParams]) -> list[GenerateResult]:
        ps = per_prompt(params, len(input_ids))
        by_server: dict[str, tuple[SGLangEngine, list[int]]] = {}
        for i, p in enumerate(ps):
            s = self.pick(p.affinity)
            by_server.setdefault(s.url, (s, []))[1].append(i)
        out: list[GenerateResult | None] = [None] * len(input_ids)
        for server, idx in by_server.values():  # one episode's call is one prompt: one server
            for i, r in zip(idx, self._call(server, [input_ids[i] for i in idx], [ps[i] for i in idx])):
                out[i] = r
        return out

    def _call(self, server: SGLangEngine, ids, ps) -> list[GenerateResult]:
        with self._lock:
            self._busy[server.url] += 1
            self.routed[server.url] += len(ids)
        try:
            return server.generate(ids, ps)
        except EngineUnavailableError:
            with self._lock:
                self._dead_until[server.url] = time.monotonic() + self.dead_for_s
            raise
        finally:
            with self._lock:
                self._busy[server.url] -= 1

    def update_weights(self, path: str, version: int) -> None:
        """Every server loads `path` as `version` (in parallel); any failure raises after all tried."""
        with ThreadPoolExecutor(len(self.servers)) as pool:
            for f in [pool.submit(s.update_weights, path, version) for s in self.servers]:
                f.result()

    def served_version(self) -> int | None:
        versions = [v for v in (s.served_version() for s in self.servers) if v is not None]
        return min(versions) if versions else None

    def identity(self) -> dict:
        ids = [s.identity() for s in self.servers]
        return {"policy_version": min(i["policy_version"] for i in ids),
                "engine.model_path": [i["engine.model_path"] for i in ids],
                "engine.weight_version": [i["engine.weight_version"] for i in ids]}

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        for s in self.servers:
            s.wait_ready(timeout_s)

    def close(self) -> None:
        for s in self.servers:
            s.close()
