"""Host values (JSON) shared by every process through the jax.distributed coordinator's key-value store.

GRPO's processes exchange what each one rolled out (trajectories: token ids, rewards, turn
versions) and a few counters every step; these are host data, not device arrays, and vary in size,
so they travel as bytes through the coordinator rather than through a device collective. Every
process calls `allgather` in the same order (the calls are numbered, so keys never collide);
values are cut into chunks under gRPC's message limit. A process deletes its own keys of the
previous call once this one completes: by then every process has read them.

A peer that never publishes (it died, or the processes run different code) fails the call after
TAU2JAX_GATHER_TIMEOUT_S seconds (default 3600: another process may be rolling out a slow step)
with the call's name, never a silent hang.
"""

from __future__ import annotations

import itertools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

TIMEOUT_VAR = "TAU2JAX_GATHER_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600
CHUNK = 1 << 20  # bytes per key: well under gRPC's default 4 MiB message

_calls = itertools.count()
_mine: list[str] = []  # this process's keys of the previous call


def timeout_s() -> int:
    value = os.environ.get(TIMEOUT_VAR, "").strip()
    return int(value) if value else DEFAULT_TIMEOUT_S


def allgather(name: str, value, timeout: int | None = None) -> list:
    """`value` (JSON-serialisable) of every process, in process order; [value] in one process.
    `timeout`: seconds to wait for the others (default `timeout_s()`)."""
    if jax.process_count() == 1:
        return [value]
    from jax._src.distributed import global_state  # the client jax.distributed.initialize made

    client, me, n = global_state.client, jax.process_index(), next(_calls)
    data = json.dumps(value, separators=(",", ":")).encode()
    chunks = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
    base = f"tau2jax/gather/{n}/{name}"
    keys = [f"{base}/{me}/{c}" for c in range(len(chunks))]
    for key, chunk in zip(keys, chunks):
        client.key_value_set_bytes(key, chunk)
    client.key_value_set(f"{base}/{me}/n", str(len(chunks)))  # last: the chunks are all there
    timeout = timeout or timeout_s()
    ms = timeout * 1000
    out = []
    for i in range(jax.process_count()):
        try:
            count = int(client.blocking_key_value_get(f"{base}/{i}/n", ms))
            out.append(json.loads(b"".join(client.blocking_key_value_get_bytes(f"{base}/{i}/{c}", ms)
                                           for c in range(count))))
        except Exception as e:  # the coordinator's deadline error (a C++ exception type)
            raise TimeoutError(f"process {me}: process {i} did not share {name!r} (call {n}) within "
                               f"{timeout} s ({e}); it died or runs other code/config (raise {TIMEOUT_VAR} "
                               "if a step legitimately takes longer)") from None
    for key in _mine:
        client.key_value_delete(key)
    _mine[:] = [*keys, f"{base}/{me}/n"]
    return out


def host_params(params):
    """A whole host copy of (possibly sharded, multi-process) params, on every process (collective)."""
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), params)
