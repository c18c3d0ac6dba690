"""Multi-process runs: 2 processes × 2 CPU devices train exactly like 1 process × 4 devices.

The 2-process run goes through launch/multihost.sh (jax.distributed over 127.0.0.1, gloo
collectives); the reference is a plain single-process run on 4 fake CPU devices. About 50 s on
2 CPU cores (three processes each compile the tiny model).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tau2jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_VARS = (*distributed.ENV_VARS, "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID",
             "SLURM_LOCALID")
# Each child gets its own device count; none inherits the 8 fake devices or a coordinator.
BASE_ENV = {k: v for k, v in os.environ.items() if k not in (*DIST_VARS, "XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs `cmd` in its own process group; on timeout the whole group (launcher and trainers) is killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:3]} timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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


def test_two_processes_match_one_process(tmp_path, short_sft_jsonl):
    data = short_sft_jsonl
    common = ["--config", "configs/tiny_sft.py", f"--config.data.train_files={data}", "--config.data.max_len=64",
              "--config.data.batch_size=4", "--config.train.steps=6", "--config.train.checkpoint_every=3",
              "--config.train.loss_chunk=64", "--config.optim.lr=1e-3", "--config.mesh.data=-1"]
    one_dir, two_dir, logs = tmp_path / "one", tmp_path / "two", tmp_path / "logs"

    # Reference: one process, 4 devices, no jax.distributed.
    one_env = BASE_ENV | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    one = _check(_run([sys.executable, "-m", "tau2jax.train", *common, f"--config.workdir={one_dir}"], one_env),
                 "1 process × 4 devices")

    # Two processes × 2 devices through the launcher (it sets XLA_FLAGS and the JAX_* variables).
    launch_env = BASE_ENV | {"NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": "2", "PORT": str(_free_port()),
                             "LOG_DIR": str(logs), "PYTHON": sys.executable}
    launch = ["bash", "launch/multihost.sh", *common, f"--config.workdir={two_dir}"]
    proc = _run(launch, launch_env)
    two = _check(proc, "launch/multihost.sh, 2 processes × 2 devices")
    assert "jax.distributed: 2 processes, 4 global devices (2 local, cpu)" in proc.stderr
    with open(logs / "process_1.log") as f:
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
    # The data iterator is checkpointed per process.
    assert sorted(os.listdir(two_dir / "checkpoints" / "6" / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    # The final checkpoint restores under 2 processes (collective Orbax restore + each process's
    # iterator position): a rerun resumes at step 6 with nothing left to train.
    launch_env["PORT"] = str(_free_port())
    resumed = _check(_run(launch, launch_env), "2-process resume")
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


@pytest.mark.parametrize("env, expected", [
    ({"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID missing"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES missing"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "0 <= JAX_PROCESS_ID < JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two'"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}, "srun"),
])
def test_incomplete_environment_is_rejected_by_name(env, expected, monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(distributed.DistributedConfigError, match=re.escape(expected)):
        distributed.initialize()
    assert not jax.distributed.is_initialized()


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
