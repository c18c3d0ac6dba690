"""Multi-process runs: 2 processes × 2 CPU devices train exactly like 1 process × 4 devices, their
checkpoint resumes in 1 process (elastic), bad launches fail fast by name, SLURM launches.

The 2-process run goes through launch/multihost.sh (jax.distributed over 127.0.0.1, gloo
collectives); the reference is a plain single-process run on 4 fake CPU devices. About 50 s on
2 CPU cores (three processes each compile the tiny model), shared by the tests of this module.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import fake_slurm
from cli_runs import run_group
from tau2jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_VARS = (*distributed.ENV_VARS, distributed.TIMEOUT_VAR, "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS",
             "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
             "SLURM_STEP_NUM_NODES", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NUM_NODES", "SLURM_NNODES",
             "SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS")
# Each child gets its own device count; none inherits the 8 fake devices or a coordinator.
BASE_ENV = {k: v for k, v in os.environ.items() if k not in (*DIST_VARS, "XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_group(cmd, env, timeout)


def _check(proc, what):
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _losses(workdir) -> list[tuple[int, float]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(d["step"], d["loss"]) for d in map(json.loads, f)]


def _files_named(workdir, predicate) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, files in os.walk(workdir) for f in files if predicate(f))


def _restore_on_one_device(path):
    """An Orbax pytree (saved from any mesh / process count) restored whole onto this process's first device."""
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    is_leaf = lambda m: hasattr(m, "shape") and hasattr(m, "dtype")  # noqa: E731
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta,
                          is_leaf=is_leaf)
    return jax.device_get(ckptr.restore(path, target))


COMMON = ["--config", "configs/tiny_sft.py", "--config.data.max_len=64", "--config.data.batch_size=4",
          "--config.train.steps=6", "--config.train.checkpoint_every=3", "--config.train.loss_chunk=64",
          "--config.optim.lr=1e-3", "--config.mesh.data=-1"]


def _one_process_env(devices: int) -> dict:
    return BASE_ENV | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step run (checkpoints at 3 and 6), once by 1 process × 4 devices, once by
    launch/multihost.sh with 2 processes × 2 devices."""
    tmp = tmp_path_factory.mktemp("multihost")
    data = tmp / "short.jsonl"  # conftest's short_sft_jsonl, for a module-scoped fixture
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}) + "\n")
    common = [*COMMON, f"--config.data.train_files={data}"]
    one_dir, two_dir, logs = tmp / "one", tmp / "two", tmp / "logs"
    # Reference: one process, 4 devices, no jax.distributed.
    one = _check(_run([sys.executable, "-m", "tau2jax.train", *common, f"--config.workdir={one_dir}"],
                      _one_process_env(4)), "1 process × 4 devices")
    # Two processes × 2 devices through the launcher (it sets XLA_FLAGS and the JAX_* variables).
    launch_env = BASE_ENV | {"NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": "2", "PORT": str(_free_port()),
                             "LOG_DIR": str(logs), "PYTHON": sys.executable}
    launch = ["bash", "launch/multihost.sh", *common, f"--config.workdir={two_dir}"]
    proc = _run(launch, launch_env)
    two = _check(proc, "launch/multihost.sh, 2 processes × 2 devices")
    return dict(common=common, one_dir=one_dir, two_dir=two_dir, logs=logs, one=one, two=two, proc=proc,
                launch=launch, launch_env=launch_env)


def test_two_processes_match_one_process(runs):
    one_dir, two_dir, one, two = runs["one_dir"], runs["two_dir"], runs["one"], runs["two"]
    assert "jax.distributed: 2 processes, 4 global devices (2 local, cpu)" in runs["proc"].stderr
    with open(runs["logs"] / "process_1.log") as f:
        log1 = f.read()
    assert "jax.distributed:" not in log1  # process 0 alone reports
    assert json.loads(log1.strip().splitlines()[-1])["steps"] == 6  # process 1 ran to the end too

    # Same global batches, same mesh: the same losses, step by step.
    ref, got = _losses(one_dir), _losses(two_dir)
    assert [s for s, _ in ref] == [s for s, _ in got] == list(range(1, 7))  # one writer: 6 lines, not 12
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=0, atol=1e-5)
    assert two["first_loss"] == pytest.approx(one["first_loss"], abs=1e-5)
    # Process 0 alone writes metrics and TensorBoard events.
    assert _files_named(two_dir, lambda f: f == "metrics.jsonl") == [str(two_dir / "metrics.jsonl")]
    events = _files_named(two_dir, lambda f: f.startswith("events.out.tfevents"))
    assert len(events) == 1 and os.path.dirname(events[0]) == str(two_dir / "tensorboard")
    # Nothing in a checkpoint is per process (the data position follows the step).
    assert "data" not in os.listdir(two_dir / "checkpoints" / "6")
    assert not _files_named(two_dir / "checkpoints", lambda f: re.fullmatch(r"process_\d+-of-\d+\.json", f))

    # The final checkpoint restores under 2 processes (collective Orbax restore): a rerun resumes
    # at step 6 with nothing left to train.
    launch_env = runs["launch_env"] | {"PORT": str(_free_port())}
    resumed = _check(_run(runs["launch"], launch_env), "2-process resume")
    assert resumed["resumed_from"] == 6 and resumed["final_loss"] is None
    assert len(_losses(two_dir)) == 6

    # ... and holds the same train state as the single-process run; so does the params export.
    state1 = _restore_on_one_device(str(one_dir / "checkpoints" / "6" / "state"))
    state2 = _restore_on_one_device(str(two_dir / "checkpoints" / "6" / "state"))
    assert int(state2["step"]) == 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), state2, state1)
    params1 = _restore_on_one_device(str(one_dir / "params" / "params"))
    params2 = _restore_on_one_device(str(two_dir / "params" / "params"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), params2, params1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), params2, state2["params"])


@pytest.mark.slow
@pytest.mark.parametrize("devices", [4, 2])
def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path, devices):
    """Interrupted after step 3 (the 2-process run's step-3 checkpoint alone), resumed by ONE process
    on 4 or 2 devices: steps 4..6 match the uninterrupted run. ~25 s each on 2 cores."""
    shutil.copytree(runs["two_dir"] / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    resumed = _check(_run([sys.executable, "-m", "tau2jax.train", *runs["common"], f"--config.workdir={tmp_path}"],
                          _one_process_env(devices)), f"1 process × {devices} devices resuming")
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    ref, got = dict(_losses(runs["one_dir"])), _losses(tmp_path)
    assert [s for s, _ in got] == [4, 5, 6]
    np.testing.assert_allclose([l for _, l in got], [ref[s] for s, _ in got], rtol=0, atol=1e-5)
    state = _restore_on_one_device(str(tmp_path / "checkpoints" / "6" / "state"))
    assert int(state["step"]) == 6
    ref_state = _restore_on_one_device(str(runs["one_dir"] / "checkpoints" / "6" / "state"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), state, ref_state)


def test_two_processes_fall_back_together_from_a_damaged_latest_checkpoint(runs, tmp_path):
    """The newest step's largest file truncated: both processes agree it is bad (a damaged shard may
    fail on one process only), it is set aside once under one name, and the run resumes from step 3
    with the uninterrupted run's losses."""
    for step in ("3", "6"):
        shutil.copytree(runs["two_dir"] / "checkpoints" / step, tmp_path / "checkpoints" / step)
    state6 = tmp_path / "checkpoints" / "6" / "state"
    largest = max(_files_named(state6, lambda f: True), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    launch = ["bash", "launch/multihost.sh", *runs["common"], f"--config.workdir={tmp_path}"]
    resumed = _check(_run(launch, runs["launch_env"] | {"PORT": str(_free_port()), "LOG_DIR": str(tmp_path / "logs")}),
                     "launch/multihost.sh resuming past a damaged step")
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    assert len([n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("6.bad-")]) == 1
    ref, got = dict(_losses(runs["one_dir"])), _losses(tmp_path)
    assert [s for s, _ in got] == [4, 5, 6]
    np.testing.assert_allclose([l for _, l in got], [ref[s] for s, _ in got], rtol=0, atol=1e-5)


@pytest.mark.parametrize("env, expected", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES missing"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "5"},
     "JAX_PROCESS_ID=5, JAX_NUM_PROCESSES=2: need 0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES; give the processes "
     "the ids 0..1"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "srun"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n1", "SLURM_PROCID": "1",
      "SLURM_LOCALID": "0", "JAX_PROCESS_ID": "5"}, "JAX_PROCESS_ID=5, JAX_NUM_PROCESSES=2"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
      distributed.TIMEOUT_VAR: "0"}, f"{distributed.TIMEOUT_VAR}=0: must be >= 1"),
    # A lone coordinator is one process only in a SLURM step of one task: not in a job without
    # SLURM_NTASKS (not a step), and not when a count or id says more.
    ({"SLURM_JOB_ID": "7", "JAX_COORDINATOR_ADDRESS": "n1:1234"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "JAX_COORDINATOR_ADDRESS": "n1:1234", "JAX_NUM_PROCESSES": "2"},
     "JAX_PROCESS_ID missing"),
])
def test_incomplete_environment_is_rejected_by_name(env, expected, monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DistributedConfigError, match=re.escape(expected)):
        distributed.initialize()
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("env", [
    # launch/slurm.sbatch's one-node default as it was: the coordinator exported, srun starts one task.
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_STEP_NUM_NODES": "1",
     "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "JAX_COORDINATOR_ADDRESS": "n1:1234"},
    # A one-task job, the trainer started without srun, the coordinator inherited from the submit shell.
    {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "JAX_COORDINATOR_ADDRESS": "n1:1234"},
])
def test_one_slurm_task_with_a_lone_coordinator_is_one_process(env, monkeypatch, capsys):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.resolve() is None
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()
    assert "one SLURM task (SLURM_NTASKS=1), one process; JAX_COORDINATOR_ADDRESS=n1:1234 unused" in \
        capsys.readouterr().err


def test_single_process_needs_no_environment(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    assert distributed.initialize() is False
    assert not jax.distributed.is_initialized()


def test_cli_reports_a_partial_environment(tmp_path):
    env = BASE_ENV | {"JAX_NUM_PROCESSES": "2"}
    proc = _run([sys.executable, "-m", "tau2jax.train", "--config", "configs/tiny_sft.py",
                 f"--config.workdir={tmp_path}"], env, timeout=120)
    assert proc.returncode == 2
    assert "error: multi-process run: JAX_NUM_PROCESSES set but JAX_COORDINATOR_ADDRESS" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_STEP_NUM_NODES": "2"}
JOB_PORT = 4242 % 4096 + 61440  # JAX's port for a SLURM job id


@pytest.mark.parametrize("env, expected", [
    # One task per node: each process keeps all of its node's devices.
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"},
     distributed.Launch(f"node01:{JOB_PORT}", 2, 1, None)),
    # Two tasks per node: one device each, by local rank.
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "1"},
     distributed.Launch(f"node01:{JOB_PORT}", 4, 3, (1,))),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "JAX_COORDINATOR_PORT": "1234"},
     distributed.Launch("node01:1234", 4, 2, (0,))),
    # launch/slurm.sbatch exports the coordinator; count and id still come from srun.
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "JAX_COORDINATOR_ADDRESS": "gpu7:999"},
     distributed.Launch("gpu7:999", 2, 0, None)),
])
def test_slurm_variables_give_coordinator_count_and_id(env, expected, monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in (SLURM_STEP | env).items():
        monkeypatch.setenv(k, v)
    assert distributed.resolve() == expected


def _cli(env, *args, timeout=120) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tau2jax.train", "--config", "configs/tiny_sft.py", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(procs, timeout=120) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            out.append((p.wait(timeout=timeout), p.communicate()[1]))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError(f"a bad launch was still running after {timeout}s") from None
    return out


def _joining(num_processes, process_id, port, timeout_s=3):
    return BASE_ENV | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(num_processes),
                       "JAX_PROCESS_ID": str(process_id), distributed.TIMEOUT_VAR: str(timeout_s)}


def test_unreachable_coordinator_fails_within_the_timeout(tmp_path):
    """Process 1 of 2, nobody serving the port: JAX alone would abort after 300 s blaming "another task"."""
    port = _free_port()
    [(rc, err)] = _finish([_cli(_joining(2, 1, port), f"--config.workdir={tmp_path}")])
    assert rc == 2, err[-2000:]
    assert (f"error: process 1: nothing accepts connections at JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} after 3 s: "
            "start process 0") in err
    assert f"raise {distributed.TIMEOUT_VAR}=3" in err


@pytest.mark.parametrize("counts, expected", [
    # The coordinator (process 0) expects 2: process 1 joins although it was told 3.
    ((2, 3), "error: JAX_NUM_PROCESSES differs between processes (process 0: 2, process 1: 3; the run has 2): "
             "start every process with the same JAX_NUM_PROCESSES"),
    # The coordinator expects 3, only 2 come.
    ((3, 2), "processes joined the coordinator at JAX_COORDINATOR_ADDRESS=127.0.0.1:{port} within 3 s: "
             "start JAX_PROCESS_ID=0.."),
])
def test_processes_started_with_different_counts_all_fail_by_name(tmp_path, counts, expected):
    port = _free_port()
    results = _finish([_cli(_joining(n, i, port), f"--config.workdir={tmp_path}") for i, n in enumerate(counts)])
    for rc, err in results:
        assert rc == 2 and expected.format(port=port) in err, err[-2000:]


def test_mesh_not_dividing_the_devices_is_a_config_error(tmp_path):
    [(rc, err)] = _finish([_cli(_one_process_env(4), f"--config.workdir={tmp_path}", "--config.mesh.fsdp=3")])
    assert rc == 2 and "Traceback" not in err, err[-2000:]
    assert ("error: mesh.data=-1, mesh.fsdp=3, mesh.tensor=1: the 4 devices are not divisible by 3; pick sizes "
            "whose product divides 4") in err


def _sbatch(tmp_path, env, *args, timeout=TIMEOUT_S, nodes=("node01", "node02"), ntasks_per_node=1):
    """launch/slurm.sbatch as sbatch would run it on the first node of `sbatch --nodes=len(nodes)
    --ntasks-per-node=ntasks_per_node` (the allocation's SLURM_NTASKS, which srun would inherit),
    with the fake srun/scontrol of tests/fake_slurm.py. -> (proc, [(stdout, stderr) of each task
    of its one srun step])."""
    task_dir = tmp_path / "tasks"
    env = (BASE_ENV | fake_slurm.install(tmp_path / "bin", task_dir, python=fake_slurm.PRINT_ENV)
           | fake_slurm.allocation(list(nodes), ntasks_per_node) | {"SLURM_SUBMIT_DIR": ROOT} | env)
    proc = _run(["bash", "launch/slurm.sbatch", *args], env, timeout=timeout)
    steps = fake_slurm.steps(task_dir)
    assert len(steps) <= 1, steps
    return proc, steps[0].tasks if steps else []


def _resolve_in(env, monkeypatch):
    """distributed.resolve() in a task that saw `env`."""
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return distributed.resolve()


def test_slurm_sbatch_one_process_per_gpu_derives_each_tasks_run(tmp_path, monkeypatch):
    # A long node list: `scontrol ... | head -n 1` under pipefail would die of SIGPIPE.
    nodes = " ".join(["node01", "node02", *(f"n{i}" for i in range(12000))])
    proc, tasks = _sbatch(tmp_path, {"PER_GPU": "1", "GPUS_PER_NODE": "2", "PYTHON": str(tmp_path / "bin" / "python"),
                                     "WORKDIR": "/shared/run", "FAKE_NODES": nodes}, "--config", "configs/tiny_sft.py")
    assert proc.returncode == 0, proc.stderr
    assert f"2 node(s) x 2 process(es), coordinator node01:{JOB_PORT}" in proc.stderr
    assert len(tasks) == 4
    for i, (out, _) in enumerate(tasks):
        env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line and not line.startswith("ARGS"))
        assert out.splitlines()[-1] == "ARGS -m tau2jax.train --config configs/tiny_sft.py --config.workdir=/shared/run"
        assert env["SLURM_STEP_TASKS_PER_NODE"] == "2(x2)" and env["SLURM_NODEID"] == str(i // 2)
        assert _resolve_in(env, monkeypatch) == distributed.Launch(f"node01:{JOB_PORT}", 4, i, (i % 2,))


def _print_env_sbatch(tmp_path, nodes, ntasks_per_node, **env):
    proc, tasks = _sbatch(tmp_path, {"PYTHON": str(tmp_path / "bin" / "python"), **env},
                          "--config", "configs/tiny_sft.py", nodes=nodes, ntasks_per_node=ntasks_per_node)
    assert proc.returncode == 0, proc.stderr
    [step] = fake_slurm.steps(tmp_path / "tasks")
    return proc, step


@pytest.mark.parametrize("ntasks_per_node", [1, 8])  # sbatch's default; an allocation of 8 tasks
def test_slurm_sbatch_on_one_node_runs_one_process(tmp_path, monkeypatch, ntasks_per_node):
    """The one-node default used to export JAX_COORDINATOR_ADDRESS to its one task, which then
    refused to start (JAX_NUM_PROCESSES, JAX_PROCESS_ID missing)."""
    proc, step = _print_env_sbatch(tmp_path, ["node01"], ntasks_per_node)
    assert "1 node(s) x 1 process(es), a single process (no coordinator)" in proc.stderr
    assert (step.info["ntasks"], step.info["ntasks_from"], len(step.tasks)) == ("1", "option", 1)
    env = step.env(0)
    assert env["SLURM_NTASKS"] == "1" and "JAX_COORDINATOR_ADDRESS" not in env
    assert _resolve_in(env, monkeypatch) is None


@pytest.mark.slow  # ~35 s on 2 busy cores
def test_slurm_sbatch_trains_on_one_node(tmp_path, short_sft_jsonl):
    """sbatch's default (--nodes=1): one process trains, no jax.distributed, even with a coordinator
    address inherited from the submit shell (sbatch exports the submitter's environment)."""
    env = {"PYTHON": sys.executable, "WORKDIR": str(tmp_path / "run"), "JAX_COORDINATOR_ADDRESS": "node01:9",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc, tasks = _sbatch(tmp_path, env, "--config", "configs/tiny_sft.py", "--config.train.steps=1",
                          f"--config.data.train_files={short_sft_jsonl}", "--config.data.batch_size=2", "--config.data.max_len=64", "--config.train.loss_chunk=64",
                          nodes=("127.0.0.1",))
    assert proc.returncode == 0, proc.stderr + "".join(err[-3000:] for _, err in tasks)
    [(out, err)] = tasks
    assert "JAX_COORDINATOR_ADDRESS=node01:9 unused" in err and "jax.distributed: " not in err.replace(
        "jax.distributed: one SLURM task", "")
    assert json.loads(out.splitlines()[-1])["steps"] == 1
    assert [s for s, _ in _losses(tmp_path / "run")] == [1]


@pytest.mark.parametrize("per_gpu, ntasks", [("0", 2), ("1", 4)])
def test_slurm_sbatch_starts_its_own_task_count_whatever_the_allocation_has(tmp_path, monkeypatch, per_gpu, ntasks):
    """`sbatch --ntasks-per-node=8` gives the batch script SLURM_NTASKS=16, which an srun without
    --ntasks would inherit: one process per node must still be 2, one per GPU 2 x 2."""
    _, step = _print_env_sbatch(tmp_path, ["node01", "node02"], 8, PER_GPU=per_gpu, GPUS_PER_NODE="2")
    assert (step.info["ntasks"], step.info["ntasks_from"], len(step.tasks)) == (str(ntasks), "option", ntasks)
    for i in range(ntasks):
        launch = _resolve_in(step.env(i), monkeypatch)
        assert (launch.coordinator, launch.num_processes, launch.process_id) == (f"node01:{JOB_PORT}", ntasks, i)


def test_the_fake_srun_inherits_the_allocations_task_count_as_srun_does(tmp_path):
    """What the sbatch tests would catch: in a job of SLURM_NTASKS=4 (2 nodes x 2), an srun without
    --ntasks asks for 4 tasks: `srun --nodes=2` starts 4, `srun --nodes=1 --ntasks-per-node=1` is
    refused (real srun ignores the --ntasks-per-node and starts 4 on one node)."""
    env = (BASE_ENV | fake_slurm.install(tmp_path / "bin", tmp_path / "tasks", show=fake_slurm.PRINT_ENV)
           | fake_slurm.allocation(["node01", "node02"], 2))
    srun = lambda *a: _run(["srun", *a, "show"], env, timeout=30)  # noqa: E731
    assert srun("--nodes=2").returncode == 0
    refused = srun("--nodes=1", "--ntasks-per-node=1")
    assert refused.returncode == 1 and ("--ntasks=4 (SLURM_NTASKS) > --nodes=1 x --ntasks-per-node=1"
                                        in refused.stderr)
    assert srun("--nodes=2", "--ntasks=2", "--ntasks-per-node=1").returncode == 0
    assert srun("--nodes=2", "--ntasks=5", "--ntasks-per-node=2").returncode == 1
    first, second = fake_slurm.steps(tmp_path / "tasks")
    assert (first.info["ntasks_from"], len(first.tasks), first.info["tasks_per_node"]) == ("SLURM_NTASKS", 4, "2(x2)")
    assert [first.env(i)["SLURM_LOCALID"] for i in range(4)] == ["0", "1", "0", "1"]
    assert [first.env(i)["SLURM_NODEID"] for i in range(4)] == ["0", "0", "1", "1"]
    assert first.env(3)["SLURM_STEP_NODELIST"] == "node01,node02" and first.env(3)["SLURM_STEP_NUM_TASKS"] == "4"
    assert (second.info["ntasks_from"], len(second.tasks), second.env(1)["SLURM_STEP_TASKS_PER_NODE"]) == \
        ("option", 2, "1(x2)")
    assert first.env(0)["SLURM_STEP_ID"] == "0" and second.env(0)["SLURM_STEP_ID"] == "1"


@pytest.mark.parametrize("env, expected", [
    ({"PER_GPU": "yes"}, "PER_GPU='yes': must be 0"),
    ({"PER_GPU": "1"}, "PER_GPU=1: GPUS_PER_NODE='' must be a positive count"),
    ({"SLURM_JOB_ID": ""}, "not inside a SLURM job"),
])
def test_slurm_sbatch_rejects_a_bad_setup(tmp_path, env, expected):
    proc, tasks = _sbatch(tmp_path, env, "--config", "configs/tiny_sft.py")
    assert proc.returncode == 2 and expected in proc.stderr and not tasks


@pytest.mark.slow
def test_slurm_sbatch_trains_on_two_nodes_and_a_requeue_resumes(tmp_path):
    """Two fake nodes × 1 process × 2 CPU devices train through srun; the requeued job (same script,
    same arguments) resumes from the workdir. ~40 s on 2 cores."""
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{i}?"},
                                                     {"role": "assistant", "content": f"{i}."}]}) + "\n"
                            for i in range(8)))
    two_nodes = ("127.0.0.1", "127.0.0.1")
    env = {"PORT": str(_free_port()), "PYTHON": sys.executable, "WORKDIR": str(tmp_path / "run"),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = ["--config", "configs/tiny_sft.py", f"--config.data.train_files={data}", "--config.data.max_len=64",
            "--config.data.batch_size=4", "--config.train.steps=2", "--config.train.loss_chunk=64"]
    proc, tasks = _sbatch(tmp_path, env, *args, nodes=two_nodes)
    assert proc.returncode == 0, proc.stderr + "".join(err[-3000:] for _, err in tasks)
    assert "jax.distributed: 2 processes, 4 global devices (2 local, cpu)" in tasks[0][1]
    assert [json.loads(out.splitlines()[-1])["steps"] for out, _ in tasks] == [2, 2]
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2]

    env["PORT"] = str(_free_port())
    shutil.rmtree(tmp_path / "tasks")
    proc, tasks = _sbatch(tmp_path, env | {"SLURM_RESTART_COUNT": "1"}, *args, nodes=two_nodes)
    assert proc.returncode == 0 and "(restart 1)" in proc.stderr
    assert [json.loads(out.splitlines()[-1])["resumed_from"] for out, _ in tasks] == [2, 2]
