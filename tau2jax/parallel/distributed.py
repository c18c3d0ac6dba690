"""Joining a multi-process JAX run (`jax.distributed`), before anything touches JAX devices.

    JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m tau2jax.train ...

One process (no variables set): nothing happens. The three JAX_* variables together: join that run
(every process gives the same coordinator address, which process 0 serves). Under SLURM (`srun`
with more than one task: SLURM_JOB_ID and SLURM_NTASKS > 1): jax.distributed's own SLURM detection
gives the coordinator (first node of the step), process count and id; a JAX_* variable given
overrides its value. One task per node sees all of that node's devices; several tasks per node get
one device each (by SLURM_LOCALID, as JAX's own detection does). On CPU, cross-process collectives
use gloo. See launch/multihost.sh.
"""

from __future__ import annotations

import os
import sys

import jax

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


class DistributedConfigError(ValueError):
    """The environment asks for a multi-process run but does not describe one completely."""


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


def initialize() -> bool:
    """Joins the multi-process run the environment describes; returns whether this is one.
    Call once per process, before the first `jax.devices()` / array creation."""
    if jax.distributed.is_initialized():
        return True
    given = {k: os.environ[k].strip() for k in ENV_VARS if os.environ.get(k, "").strip()}
    slurm = _under_slurm()
    if not given and not slurm:
        return False
    coordinator = given.get("JAX_COORDINATOR_ADDRESS")
    num_processes, process_id = _int_var("JAX_NUM_PROCESSES"), _int_var("JAX_PROCESS_ID")
    if not slurm:
        if missing := [k for k in ENV_VARS if k not in given]:
            raise DistributedConfigError(
                f"multi-process run: {', '.join(sorted(given))} set but {', '.join(missing)} missing; set all of "
                f"{', '.join(ENV_VARS)} on every process (coordinator = host:port of process 0), or none "
                "for a single process (see launch/multihost.sh)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedConfigError(
                f"JAX_PROCESS_ID={process_id}, JAX_NUM_PROCESSES={num_processes}: need "
                "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES")
        if ":" not in coordinator:
            raise DistributedConfigError(f"JAX_COORDINATOR_ADDRESS={coordinator!r}: must be host:port")
    local_device_ids = None  # None: every local device (or JAX_LOCAL_DEVICE_IDS, read by JAX)
    if slurm:
        from jax._src.clusters.slurm_cluster import SlurmCluster

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
            local_device_ids = [SlurmCluster.get_local_process_id()]
    # Older JAX has no CPU collectives by default; keep an explicit choice (e.g. mpi).
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               cluster_detection_method="deactivate")
    if jax.process_index() == 0:
        print(f"jax.distributed: {jax.process_count()} processes, {jax.device_count()} global devices "
              f"({jax.local_device_count()} local, {jax.default_backend()})", file=sys.stderr, flush=True)
    return True
