"""A fake `srun` / `scontrol` for running launch/*.sbatch on one machine, as strict as srun about
task counts.

srun(1) reads its options from the environment as well as from the command line (INPUT
ENVIRONMENT VARIABLES: SLURM_NTASKS is read as -n/--ntasks, SLURM_NTASKS_PER_NODE as
--ntasks-per-node; command-line options override them). Inside a batch job those variables
describe the whole allocation, so a step started without --ntasks inherits the allocation's task
count: `srun --nodes=1 --ntasks-per-node=1 ...` in a job of SLURM_NTASKS=4 asks for 4 tasks.
With --ntasks given, --ntasks-per-node is a maximum per node. This fake does the same:

- -n/--ntasks, else SLURM_NTASKS; -N/--nodes, else the --nodelist's size, else the job's
  SLURM_JOB_NUM_NODES; --ntasks-per-node, else SLURM_NTASKS_PER_NODE. Without any task count, one
  task per node (srun's default).
- ntasks > nodes x ntasks-per-node: an error (exit 1), no task starts. Real srun warns "can't
  honor --ntasks-per-node set to 1 which doesn't match the requested tasks 4 with the number of
  requested nodes 1. Ignoring --ntasks-per-node." and starts them all (two gpu_node.sh on one
  node, say); the fake refuses, so the mistake cannot pass unnoticed. ntasks < nodes: srun's
  warning, and the step shrinks to ntasks nodes. More nodes than the job has: an error.
- Tasks are spread in blocks over the step's nodes (the job's nodes are $FAKE_NODES, as the fake
  scontrol prints them; default "node01 node02"), each task with srun's step variables
  (SLURM_STEP_ID, SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS, SLURM_NNODES,
  SLURM_STEP_NUM_NODES, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_STEP_TASKS_PER_NODE,
  SLURM_TASKS_PER_NODE, SLURMD_NODENAME).
- Each step gets $FAKE_SRUN_DIR/step_<id>/ with `step` (what it was asked and what it started) and
  task_<i>.out / task_<i>.err (--output is ignored). The exit status is the highest of its tasks';
  SIGTERM stops its tasks. Unknown long options are ignored; unknown short options are an error
  (they may take a separate value).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

FAKE_SRUN = r"""#!/usr/bin/env bash
# Fake srun: see tests/fake_slurm.py.
set -u
nodes= ntasks= per_node= list= asked=
while (($#)) && [[ $1 == -* ]]; do
  case $1 in
    --nodes=*) nodes=${1#*=} ;;
    -N) nodes=$2; shift ;;
    -N*) nodes=${1#-N} ;;
    --ntasks=*) ntasks=${1#*=} ;;
    -n) ntasks=$2; shift ;;
    -n*) ntasks=${1#-n} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
    --nodelist=*) list=${1#*=} ;;
    -w) list=$2; shift ;;
    --) shift; break ;;
    --*) ;;
    *) echo "fake srun: unsupported option '$1'" >&2; exit 1 ;;
  esac
  shift
done
die() { echo "srun: error: $*" >&2; exit 1; }
(($#)) || die "no program to run"
[[ -d ${FAKE_SRUN_DIR:-} ]] || die "FAKE_SRUN_DIR='${FAKE_SRUN_DIR:-}': not a directory"
asked="nodes=${nodes:--} ntasks=${ntasks:--} ntasks-per-node=${per_node:--}"
# srun(1), INPUT ENVIRONMENT VARIABLES: SLURM_NTASKS is -n, SLURM_NTASKS_PER_NODE --ntasks-per-node.
ntasks_from=option
[[ -z $ntasks && -n ${SLURM_NTASKS:-} ]] && ntasks=$SLURM_NTASKS ntasks_from=SLURM_NTASKS
[[ -z $per_node && -n ${SLURM_NTASKS_PER_NODE:-} ]] && per_node=$SLURM_NTASKS_PER_NODE
read -ra job_nodes <<<"${FAKE_NODES:-node01 node02}"
if [[ -n $list ]]; then
  IFS=, read -ra names <<<"$list"
  nodes=${nodes:-${#names[@]}}
  ((nodes == ${#names[@]})) || die "--nodes=$nodes but --nodelist=$list names ${#names[@]} node(s)"
else
  nodes=${nodes:-${SLURM_JOB_NUM_NODES:-1}}
fi
for v in "$nodes" "${ntasks:-1}" "${per_node:-1}"; do
  [[ $v =~ ^[1-9][0-9]*$ ]] || die "invalid count '$v'"
done
((nodes <= ${#job_nodes[@]})) || die "--nodes=$nodes: the job has ${#job_nodes[@]} node(s)"
[[ -n $list ]] || names=("${job_nodes[@]:0:nodes}")
if [[ -z $ntasks ]]; then
  ntasks=$((nodes * ${per_node:-1})) ntasks_from=default
fi
if [[ -n $per_node ]] && ((ntasks > nodes * per_node)); then
  die "--ntasks=$ntasks ($ntasks_from) > --nodes=$nodes x --ntasks-per-node=$per_node: Requested node configuration is not available"
fi
if ((ntasks < nodes)); then
  echo "srun: Warning: can't run $ntasks processes on $nodes nodes, setting nnodes to $ntasks" >&2
  nodes=$ntasks names=("${names[@]:0:nodes}")
fi
id=0
until mkdir "$FAKE_SRUN_DIR/step_$id" 2>/dev/null; do id=$((id + 1)); done
dir=$FAKE_SRUN_DIR/step_$id
counts=() node_of=() local_of=()
for ((j = 0; j < nodes; j++)); do
  c=$((ntasks / nodes + (j < ntasks % nodes ? 1 : 0)))
  counts+=("$c")
  for ((l = 0; l < c; l++)); do node_of+=("$j"); local_of+=("$l"); done
done
tpn= prev= run=0  # SLURM's compressed form: 2(x3),1
for c in "${counts[@]}" end; do
  if [[ $c == "$prev" ]]; then run=$((run + 1)); continue; fi
  if [[ -n $prev ]]; then
    tpn+=${tpn:+,}$prev; ((run > 1)) && tpn+="(x$run)"
  fi
  prev=$c run=1
done
step_list=$(IFS=,; echo "${names[*]}")
{
  echo "asked=$asked"
  echo "ntasks_from=$ntasks_from"
  echo "nodes=$nodes"
  echo "ntasks=$ntasks"
  echo "tasks_per_node=$tpn"
  echo "nodelist=$step_list"
  echo "program=$(basename "$1")"
  echo "argv=$*"
} >"$dir/step"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; exit 143' TERM
for ((i = 0; i < ntasks; i++)); do
  j=${node_of[i]}
  SLURM_STEP_ID=$id SLURM_PROCID=$i SLURM_LOCALID=${local_of[i]} SLURM_NODEID=$j \
    SLURM_NTASKS=$ntasks SLURM_NPROCS=$ntasks SLURM_NNODES=$nodes \
    SLURM_STEP_NUM_NODES=$nodes SLURM_STEP_NUM_TASKS=$ntasks SLURM_STEP_NODELIST=$step_list \
    SLURM_STEP_TASKS_PER_NODE=$tpn SLURM_TASKS_PER_NODE=$tpn SLURMD_NODENAME=${names[j]} \
    "$@" >"$dir/task_$i.out" 2>"$dir/task_$i.err" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do
  wait "$pid"; s=$?
  ((s > rc)) && rc=$s
done
echo "$rc" >"$dir/rc"
exit "$rc"
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
printf '%s\\n' ${FAKE_NODES:-node01 node02}  # `scontrol show hostnames $SLURM_JOB_NODELIST`
"""

# Stands in for a program under srun: prints the SLURM/JAX variables it sees and its arguments.
PRINT_ENV = """#!/usr/bin/env bash
env | grep -E '^(SLURM|JAX|TAU2JAX)_' | sort
echo "ARGS $*"
"""


def install(bin_dir: Path, task_dir: Path, **programs: str) -> dict[str, str]:
    """Writes srun, scontrol and `programs` (name -> script text) into bin_dir; returns the
    environment additions that put them first on PATH and the tasks' output under task_dir."""
    for d in (bin_dir, task_dir):
        d.mkdir(parents=True, exist_ok=True)
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, **programs}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SRUN_DIR": str(task_dir)}


def allocation(nodes: list[str], ntasks_per_node: int = 1, job_id: str = "4242") -> dict[str, str]:
    """The SLURM variables sbatch gives the batch script of `sbatch --nodes=len(nodes)
    --ntasks-per-node=ntasks_per_node`: SLURM_NTASKS is the whole allocation's task count."""
    n, tasks = len(nodes), len(nodes) * ntasks_per_node
    per_node = f"{ntasks_per_node}(x{n})" if n > 1 else str(ntasks_per_node)
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": f"fake[1-{n}]", "SLURM_JOB_NUM_NODES": str(n),
            "SLURM_NNODES": str(n), "SLURM_NTASKS": str(tasks), "SLURM_NPROCS": str(tasks),
            "SLURM_NTASKS_PER_NODE": str(ntasks_per_node), "SLURM_TASKS_PER_NODE": per_node,
            "FAKE_NODES": " ".join(nodes)}


@dataclasses.dataclass
class Step:
    """One srun call: what it was asked (`info`) and what each of its tasks wrote."""
    id: int
    info: dict[str, str]
    tasks: list[tuple[str, str]]  # (stdout, stderr) of task 0, 1, ...
    rc: int | None  # None: still running, or stopped by a signal

    @property
    def program(self) -> str:
        return self.info["program"]

    def env(self, task: int) -> dict[str, str]:
        """The KEY=VALUE lines task `task` printed (PRINT_ENV's output)."""
        return dict(line.split("=", 1) for line in self.tasks[task][0].splitlines()
                    if "=" in line and not line.startswith("ARGS "))


def steps(task_dir: Path) -> list[Step]:
    """Every step srun started under task_dir, in order."""
    out = []
    for d in sorted(Path(task_dir).glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
        info = dict(line.split("=", 1) for line in (d / "step").read_text().splitlines()) \
            if (d / "step").exists() else {}
        outs = sorted(d.glob("task_*.out"), key=lambda p: int(p.stem.split("_")[1]))
        rc = int((d / "rc").read_text()) if (d / "rc").exists() else None
        out.append(Step(int(d.name.split("_")[1]), info,
                        [(p.read_text(), p.with_suffix(".err").read_text()) for p in outs], rc))
    return out
