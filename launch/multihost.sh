#!/usr/bin/env bash
# N `python -m tau2jax.train` processes on this machine, joined into one jax.distributed run: the
# multi-host code path (per-process data slices, global arrays from process-local rows, collective
# Orbax saves, process-0-only logs) as a CPU smoke test.
#
#   launch/multihost.sh --config configs/tiny_sft.py [--config.key=value ...]
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/multihost.sh --config configs/tiny_sft.py --config.workdir=/tmp/mh
#
# Every process gets the same arguments and
#   JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT  JAX_NUM_PROCESSES=$NUM_PROCESSES  JAX_PROCESS_ID=i
#   JAX_PLATFORMS=cpu  XLA_FLAGS+=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS
# so the mesh spans NUM_PROCESSES × DEVICES_PER_PROCESS CPU devices (mesh.data=-1 takes them all;
# data.batch_size must divide over them). tau2jax/parallel/distributed.py reads these variables.
# Process 0 writes to this terminal (its last stdout line is the run's JSON summary); process i>0
# to $LOG_DIR/process_i.log. The script waits for all of them; when one fails it stops the others
# (which would otherwise wait on it in a collective) and exits with the failed one's status.
# Other knobs: PORT (coordinator port; default: a free one), LOG_DIR (default runs/multihost_logs),
# PYTHON (default: the repo's .venv/bin/python). Paths in the arguments are relative to your cwd.
#
# Multi-node (GPU/TPU): one process per host, owning all of that host's accelerators; no
# JAX_PLATFORMS/XLA_FLAGS device count. On every host i = 0..N-1, with identical arguments:
#   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i \
#     .venv/bin/python -m tau2jax.train --config configs/X.py --config.workdir=/shared/run
# host0 is process 0's address (it serves the coordinator on that port; open it between hosts).
# config.workdir must be on a filesystem every host sees: every process writes its shards of the
# Orbax checkpoints and of the final params export into it; metrics come from process 0 alone.
# Under SLURM, use launch/slurm.sbatch (srun sets the process count and ids, the coordinator is
# the first node). A resumed run may use another process or device count (the data position
# follows the step; Orbax reshards the state). A bad launch (coordinator nobody serves, processes
# missing or started with different JAX_NUM_PROCESSES) fails within TAU2JAX_INIT_TIMEOUT_S seconds
# (default 300) with what to fix.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # tau2jax importable from any directory
PYTHON=${PYTHON:-$repo/.venv/bin/python}
NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-2}
LOG_DIR=${LOG_DIR:-runs/multihost_logs}
if [[ -z "${PORT:-}" ]]; then  # a port free now on 127.0.0.1 (the coordinator binds it moments later)
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') || exit 1
fi
if ((NUM_PROCESSES < 1 || DEVICES_PER_PROCESS < 1)); then
  echo "NUM_PROCESSES ($NUM_PROCESSES) and DEVICES_PER_PROCESS ($DEVICES_PER_PROCESS) must be >= 1" >&2
  exit 2
fi
if (($# == 0)); then
  echo "usage: launch/multihost.sh --config configs/FILE.py [--config.key=value ...]" >&2
  exit 2
fi
mkdir -p "$LOG_DIR"

declare -A rank=()  # pid -> JAX_PROCESS_ID, of the processes still running
# SIGKILL, not SIGTERM: under jax.distributed, JAX's preemption notifier catches SIGTERM (and the
# survivors of a dead peer would sit in a collective until the heartbeat timeout, minutes later).
# Checkpoints commit atomically, so the last committed step stays restorable.
stop_all() {  # only the processes this script started
  for pid in "${!rank[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  wait "${!rank[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM

xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
for ((i = 0; i < NUM_PROCESSES; i++)); do
  run=(env JAX_PLATFORMS=cpu XLA_FLAGS="$xla_flags" JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT"
       JAX_NUM_PROCESSES="$NUM_PROCESSES" JAX_PROCESS_ID="$i" "$PYTHON" -m tau2jax.train "$@")
  if ((i == 0)); then
    "${run[@]}" &
  else
    "${run[@]}" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  rank[$!]=$i
done

while ((${#rank[@]})); do
  finished=
  wait -n -p finished "${!rank[@]}"
  rc=$?
  if [[ -z "$finished" ]]; then
    echo "multihost: wait failed ($rc); stopping the processes" >&2; stop_all; exit 1
  fi
  i=${rank[$finished]}
  unset "rank[$finished]"
  if ((rc != 0)); then
    echo "multihost: process $i exited with status $rc; stopping the others (logs of processes > 0 in $LOG_DIR)" >&2
    stop_all
    exit "$rc"
  fi
done
