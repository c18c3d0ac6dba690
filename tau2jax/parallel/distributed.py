"""Joining a multi-process JAX run (`jax.distributed`), before anything touches JAX devices.

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m tau2jax.train ...

One process (no variables set): nothing happens. The three JAX_* variables together: join that run
(every process gives the same coordinator address, which process 0 serves). Under SLURM (`srun`
with more than one task: SLURM_JOB_ID and SLURM_NTASKS > 1): the coordinator is the first node of
the step (port from the job id, or JAX_COORDINATOR_PORT), the process count and id are
SLURM_NTASKS and SLURM_PROCID; a JAX_* variable given overrides its value. One task per node sees
all of that node's devices; several tasks per node get one device each (by SLURM_LOCALID, as JAX's
own detection does). On CPU, cross-process collectives use gloo. See launch/multihost.sh and
launch/slurm.sbatch.

A SLURM task alone in its step (SLURM_JOB_ID set and SLURM_NTASKS=1: `srun --ntasks=1`, or a
one-task job) is one process: a JAX_COORDINATOR_ADDRESS it sees without JAX_NUM_PROCESSES and
JAX_PROCESS_ID (exported for a multi-task step, or inherited from the submit shell, which sbatch
passes on) is ignored: there is nobody to coordinate. In a step of several tasks a lone
JAX_COORDINATOR_ADDRESS is fine too (count and id come from srun). Anywhere else it is an
incomplete launch and fails naming the missing variables: outside SLURM, or in a SLURM job without
SLURM_NTASKS (not in a step), nothing says how many processes were meant, and a forgotten
JAX_NUM_PROCESSES must not silently train alone. With JAX_NUM_PROCESSES or JAX_PROCESS_ID also
given, the usual rules hold (all three, or none).

A bad launch fails within TAU2JAX_INIT_TIMEOUT_S seconds (default 300) with a message naming what
to fix, never hangs: a coordinator nobody serves, processes missing, or processes started with
different JAX_NUM_PROCESSES (checked through the coordinator's key-value store once all joined).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
import time

import jax

from tau2jax.parallel import host_gather

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
TIMEOUT_VAR = "TAU2JAX_INIT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 300  # JAX's own initialization timeout
# JAX aborts the process (C++ LOG(FATAL), no Python error) when its own timeout expires, blaming
# "another task"; ours fires this much earlier and says what to fix instead.
_JAX_GRACE_S = 30


class DistributedConfigError(ValueError):
    """The environment asks for a multi-process run but does not describe one that can work."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """The multi-process run this process belongs to."""
    coordinator: str  # host:port served by process 0
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None  # None: every local device (or JAX_LOCAL_DEVICE_IDS)


def _int_var(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise DistributedConfigError(f"{name}={value!r}: must be an integer") from None


def _under_slurm() -> bool:
    try:
        return bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_NTASKS", "1")) > 1
    except ValueError:
        return False


def _one_slurm_task() -> bool:
    """A SLURM job step (or job) of exactly one task: SLURM_JOB_ID set, SLURM_NTASKS=1."""
    return bool(os.environ.get("SLURM_JOB_ID")) and os.environ.get("SLURM_NTASKS", "").strip() == "1"


def init_timeout_s() -> int:
    timeout = _int_var(TIMEOUT_VAR)
    if timeout is None:
        return DEFAULT_TIMEOUT_S
    if timeout < 1:
        raise DistributedConfigError(f"{TIMEOUT_VAR}={timeout}: must be >= 1 (seconds)")
    return timeout


def resolve() -> Launch | None:
    """The multi-process run the environment describes (JAX_* variables, else SLURM), or None for a
    single process. Raises DistributedConfigError, naming the variable, when it cannot work."""
    given = {k: os.environ[k].strip() for k in ENV_VARS if os.environ.get(k, "").strip()}
    slurm = _under_slurm()
    if not given and not slurm:
        return None
    if set(given) == {"JAX_COORDINATOR_ADDRESS"} and _one_slurm_task():
        return None  # one task: one process, whoever exported the coordinator
    coordinator = given.get("JAX_COORDINATOR_ADDRESS")
    num_processes, process_id = _int_var("JAX_NUM_PROCESSES"), _int_var("JAX_PROCESS_ID")
    local_device_ids = None
    if slurm:
        from jax._src.clusters.slurm_cluster import SlurmCluster  # private jax API: only under SLURM

        if not SlurmCluster.is_env_present():
            raise DistributedConfigError(
                f"SLURM job with SLURM_NTASKS={os.environ['SLURM_NTASKS']}, but not inside a job step: launch "
                "one process per task with `srun python -m tau2jax.train ...` (or unset SLURM_JOB_ID)")
        coordinator = coordinator or SlurmCluster.get_coordinator_address(
            timeout_secs=None, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
        num_processes = SlurmCluster.get_process_count() if num_processes is None else num_processes
        process_id = SlurmCluster.get_process_id() if process_id is None else process_id
        # One task per node keeps all of the node's accelerators; several share them out by local
        # rank, as JAX's own SLURM detection does.
        if (int(os.environ.get("SLURM_STEP_NUM_NODES", "1")) < SlurmCluster.get_process_count()
                and not os.environ.get("JAX_LOCAL_DEVICE_IDS")):
            local_device_ids = (SlurmCluster.get_local_process_id(),)
    elif missing := [k for k in ENV_VARS if k not in given]:
        raise DistributedConfigError(
            f"multi-process run: {', '.join(sorted(given))} set but {', '.join(missing)} missing; set all of "
            f"{', '.join(ENV_VARS)} on every process (coordinator = host:port of process 0), or none "
            "for a single process (see launch/multihost.sh)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedConfigError(
            f"JAX_PROCESS_ID={process_id}, JAX_NUM_PROCESSES={num_processes}: need "
            f"0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES; give the processes the ids 0..{max(num_processes, 1) - 1}, "
            "each once, and all the same JAX_NUM_PROCESSES")
    if ":" not in coordinator:
        raise DistributedConfigError(f"JAX_COORDINATOR_ADDRESS={coordinator!r}: must be host:port")
    return Launch(coordinator, num_processes, process_id, local_device_ids)


def _accepts_connections(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=1).close()
        return True
    except (OSError, ValueError):
        return False


def _join_failure(launch: Launch, timeout_s: int, coordinator_seen: bool) -> str:
    """Why `launch` did not come together within `timeout_s`, and what to do about it."""
    where = f"JAX_COORDINATOR_ADDRESS={launch.coordinator}"
    later = f"(or raise {TIMEOUT_VAR}={timeout_s} if some start later)"
    if not coordinator_seen:
        return (f"process {launch.process_id}: nothing accepts connections at {where} after {timeout_s} s: "
                "start process 0 (it serves the coordinator on that port) and give every process that "
                f"host:port as reachable from its host {later}")
    return (f"process {launch.process_id}: not all JAX_NUM_PROCESSES={launch.num_processes} processes joined "
            f"the coordinator at {where} within {timeout_s} s: start JAX_PROCESS_ID=0..{launch.num_processes - 1}, "
            f"each once, all with the same JAX_NUM_PROCESSES and JAX_COORDINATOR_ADDRESS {later}")


def _watch_join(launch: Launch, timeout_s: int) -> threading.Event:
    """Ends the process (status 2, like a config error) with what to fix unless the returned event is
    set within `timeout_s`. Runs beside JAX's blocking join (C++, GIL released) and probes whether the
    coordinator ever answered, which tells a missing process 0 from missing peers (process 0 may have
    given up and gone by the time this one does)."""
    joined = threading.Event()

    def watch():
        deadline = time.monotonic() + timeout_s
        seen = launch.process_id == 0  # process 0 serves the coordinator itself
        while not joined.wait(min(1.0, max(deadline - time.monotonic(), 0))):
            seen = seen or _accepts_connections(launch.coordinator)
            if time.monotonic() >= deadline:
                print(f"error: {_join_failure(launch, timeout_s, seen)}", file=sys.stderr, flush=True)
                os._exit(2)

    threading.Thread(target=watch, name="jax-distributed-join-watchdog", daemon=True).start()
    return joined


def _check_same(name: str, value: int, timeout_s: int) -> None:
    """Every process publishes `value` in the coordinator's key-value store and compares all of them."""
    from jax._src.distributed import global_state  # the client jax.distributed.initialize made

    client = global_state.client
    client.key_value_set(f"tau2jax/{name}/{jax.process_index()}", str(value))
    seen = {i: client.blocking_key_value_get(f"tau2jax/{name}/{i}", timeout_s * 1000)
            for i in range(jax.process_count())}
    if len(set(seen.values())) > 1:
        raise DistributedConfigError(
            f"{name} differs between processes ({', '.join(f'process {i}: {v}' for i, v in seen.items())}; "
            f"the run has {jax.process_count()}): start every process with the same {name}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": repr(v)}
    return out


def check_same_config(config) -> None:
    """Every process runs the same config (a stage whose processes decide things independently,
    GRPO's groups, would silently diverge otherwise): raises DistributedConfigError naming the
    differing keys within TAU2JAX_INIT_TIMEOUT_S seconds. One process: nothing to check."""
    if jax.process_count() == 1:
        return

    flat = _flat(config.to_dict())
    seen = host_gather.allgather("config", flat, timeout=init_timeout_s())
    diff = sorted({k for other in seen for k in set(other) | set(flat) if other.get(k) != flat.get(k)})
    if diff:
        shown = "; ".join(f"config.{k}: " + ", ".join(f"process {i}: {s.get(k)}" for i, s in enumerate(seen))
                          for k in diff[:5])
        raise DistributedConfigError(
            f"the processes run different configs ({shown}; {len(diff)} key(s) differ): start every process "
            "with the same --config and --config.* flags")


def initialize() -> bool:
    """Joins the multi-process run the environment describes; returns whether this is one.
    Call once per process, before the first `jax.devices()` / array creation."""
    if jax.distributed.is_initialized():
        return True
    launch = resolve()
    if launch is None:
        if os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip():
            print(f"jax.distributed: one SLURM task (SLURM_NTASKS=1), one process; JAX_COORDINATOR_ADDRESS="
                  f"{os.environ['JAX_COORDINATOR_ADDRESS'].strip()} unused", file=sys.stderr, flush=True)
        return False
    timeout_s = init_timeout_s()
    # Older JAX has no CPU collectives by default; keep an explicit choice (e.g. mpi).
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    joined = _watch_join(launch, timeout_s)
    jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                               process_id=launch.process_id, local_device_ids=launch.local_device_ids,
                               cluster_detection_method="deactivate",
                               initialization_timeout=timeout_s + _JAX_GRACE_S)
    joined.set()
    # The coordinator's count wins silently (a process started with JAX_NUM_PROCESSES=3 joins a run
    # of 2 without a word): a launch mistake, reported on every process.
    _check_same("JAX_NUM_PROCESSES", launch.num_processes, timeout_s)
    if jax.process_index() == 0:
        print(f"jax.distributed: {jax.process_count()} processes, {jax.device_count()} global devices "
              f"({jax.local_device_count()} local, {jax.default_backend()})", file=sys.stderr, flush=True)
    return True
