"""GRPO in several processes computes what one process does: 2 CPU processes (launch/multihost.sh,
1 device each) against 1 process with 2 devices, on the toy game and on tau2's mock domain: the
same episodes (every ledger line), the same per-step rewards, losses within 1e-4; the 2-process
checkpoint resumes in 1 process and replays the same steps; bad launches fail naming the fix.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tau2jax.parallel import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_VARS = (*distributed.ENV_VARS, distributed.TIMEOUT_VAR, "SLURM_JOB_ID", "SLURM_NTASKS")
BASE_ENV = ({k: v for k, v in os.environ.items() if k not in (*DIST_VARS, "XLA_FLAGS")}
            | {"JAX_PLATFORMS": "cpu", "PYTHON": sys.executable, "PYTHONPATH": ROOT})
TIMEOUT_S = 600
TOY = ["--config", "configs/tiny_grpo_toy.py", "--config.rl.steps=4", "--config.train.checkpoint_every=2",
       "--config.mesh.data=-1"]
# tau2 mock, shortened: 4 groups of 2 per step, short turns (the micro-batched learner path); the
# random model's turns all hit max_new_tokens, so they are kept (else nothing trains)
MOCK = ["--config", "configs/tiny_grpo.py", "--config.rl.steps=2", "--config.rl.tasks_per_step=4",
        "--config.rl.samples_per_task=2", "--config.tau2.max_steps=6", "--config.engine.max_new_tokens=24",
        "--config.rl.keep_length_cut=True", "--config.mesh.data=-1"]


def _run(cmd, env, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    """`cmd` in its own process group; on timeout the whole group is killed."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{cmd[:4]} timed out after {timeout}s:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _ok(proc, what) -> dict:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def two_processes(args, workdir, log_dir, timeout=TIMEOUT_S):
    env = BASE_ENV | {"NUM_PROCESSES": "2", "DEVICES_PER_PROCESS": "1", "LOG_DIR": str(log_dir)}
    return _run(["bash", "launch/multihost.sh", *args, f"--config.workdir={workdir}"], env, timeout)


def one_process(args, workdir, devices):
    env = BASE_ENV | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return _run([sys.executable, "-m", "tau2jax.train", *args, f"--config.workdir={workdir}"], env)


def _metrics(workdir) -> dict[int, dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {m["step"]: m for m in map(json.loads, f)}


def _ledger(workdir) -> list[dict]:
    with open(os.path.join(workdir, "rollouts", "ledger.jsonl")) as f:
        return [json.loads(line) for line in f]


def _episodes(workdir, step) -> list[tuple]:
    with open(os.path.join(workdir, "rollouts", f"step_{step}.jsonl")) as f:
        return [(t["task_id"], t["sample_index"], t["token_ids"], t["reward"]) for t in map(json.loads, f)]


def assert_same_run(a, b, steps):
    """Same episodes, rewards and ledger; losses within 1e-4."""
    ma, mb = _metrics(a), _metrics(b)
    assert set(steps) <= set(ma) and set(steps) <= set(mb)
    for s in steps:
        assert ma[s]["reward_mean"] == mb[s]["reward_mean"], s
        assert ma[s]["episodes"] == mb[s]["episodes"] and ma[s]["batch_loss_tokens"] == mb[s]["batch_loss_tokens"]
        assert abs(ma[s].get("loss", 0.0) - mb[s].get("loss", 0.0)) <= 1e-4, (s, ma[s].get("loss"), mb[s].get("loss"))
        assert _episodes(a, s) == _episodes(b, s)
    keep = lambda rows: [r for r in rows if r["step"] in steps]  # noqa: E731
    assert keep(_ledger(a)) == keep(_ledger(b))


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    w = tmp_path_factory.mktemp("grpo_mp")
    two = _ok(two_processes(TOY, w / "two", w / "logs"), "2-process toy GRPO")
    one = _ok(one_process(TOY, w / "one", devices=2), "1-process toy GRPO")
    return w, two, one


@pytest.mark.slow
def test_toy_two_processes_match_one_process(toy_runs):
    w, two, one = toy_runs
    assert two["episodes"] == one["episodes"] == 4 * 8 * 8
    assert_same_run(w / "two", w / "one", steps=[1, 2, 3, 4])
    m = _metrics(w / "two")
    assert all(m[s].get("loss_count", 0) > 0 for s in m), "a step trained nothing: the comparison is vacuous"


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process_and_replays_the_same_steps(toy_runs, tmp_path):
    """Back to the 2-process run's step-2 checkpoint, resumed by 1 process on 1 device: steps 3-4
    sample the same episodes and train to the same losses (the loop state holds no process count)."""
    w, _, _ = toy_runs
    shutil.copytree(w / "two", tmp_path / "resume")
    shutil.rmtree(tmp_path / "resume" / "checkpoints" / "4")
    res = _ok(one_process([*TOY, "--config.mesh.data=1"], tmp_path / "resume", devices=1), "1-process resume")
    assert res["resumed_from"] == 2 and res["steps"] == 4
    assert_same_run(tmp_path / "resume", w / "two", steps=[3, 4])
    ledger = _ledger(tmp_path / "resume")  # every episode once: the replayed steps' old lines were dropped
    assert len(ledger) == len({(r["step"], r["group_id"], r["sample_index"]) for r in ledger}) == 4 * 8 * 8


@pytest.mark.slow
def test_tau2_mock_two_processes_match_one_process(tmp_path):
    two = _ok(two_processes(MOCK, tmp_path / "two", tmp_path / "logs"), "2-process mock GRPO")
    one = _ok(one_process(MOCK, tmp_path / "one", devices=2), "1-process mock GRPO")
    assert two["episodes"] == one["episodes"] == 2 * 4 * 2
    assert_same_run(tmp_path / "two", tmp_path / "one", steps=[1, 2])
    assert any(m.get("loss_count", 0) > 0 for m in _metrics(tmp_path / "two").values())


# ----------------------------------------------------------------------------- bad launches

def test_groups_not_dividing_over_the_processes_fail_by_name(tmp_path):
    proc = two_processes([*TOY, "--config.rl.tasks_per_step=3"], tmp_path / "w", tmp_path / "logs", timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert ("error: config.rl.tasks_per_step=3 does not divide over 2 processes (each plays whole groups): "
            "set it to a multiple of 2, e.g. 4") in proc.stderr


def test_processes_with_different_configs_fail_naming_the_keys(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for i, seed in enumerate((0, 1)):
        env = BASE_ENV | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                          "JAX_PROCESS_ID": str(i), distributed.TIMEOUT_VAR: "60"}
        procs.append(subprocess.Popen([sys.executable, "-m", "tau2jax.train", *TOY, f"--config.seed={seed}",
                                       f"--config.workdir={tmp_path}"], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    for p in procs:
        try:
            _, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise AssertionError("a launch with mismatched configs was still running after 180 s") from None
        assert p.returncode == 2, err[-2000:]
        assert ("error: the processes run different configs (config.seed: process 0: 0, process 1: 1; "
                "1 key(s) differ): start every process with the same --config") in err
