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

import fake_slurm
from cli_runs import run_group
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
        "--config.rl.batch.keep_length_cut=True", "--config.mesh.data=-1"]


def _run(cmd, env, timeout=TIMEOUT_S) -> subprocess.CompletedProcess:
    return run_group(cmd, env, timeout)


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


@pytest.mark.heavy  # minutes on 2 cores: `make test-heavy`
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


# ----------------------------------------------------------------------------- SLURM: learner + rollout nodes

# Stands in for gpu_node.sh: says how it was started and answers every GET on both ports.
FAKE_SERVERS = """#!/usr/bin/env bash
echo "BIND_HOST=$BIND_HOST POLICY_GPUS=$POLICY_GPUS USER_GPUS=$USER_GPUS"
exec {python} -c '
import http.server, os, threading
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
    def log_message(self, *a):
        pass
for port in ("POLICY_PORT", "USER_PORT"):
    s = http.server.ThreadingHTTPServer((os.environ["BIND_HOST"], int(os.environ[port])), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
threading.Event().wait(60)
'
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbatch_rl(tmp_path, env, *args, servers=FAKE_SERVERS, nodes=("127.0.0.1", "localhost"), ntasks_per_node=1):
    """launch/slurm_rl.sbatch in a job of `nodes` (default: 127.0.0.1 the learner, localhost the
    rollouts) x ntasks_per_node tasks, with tests/fake_slurm.py's srun; the learner prints its
    environment. -> (proc, env, [srun steps])."""
    task_dir = tmp_path / "tasks"
    env = (BASE_ENV | fake_slurm.install(tmp_path / "bin", task_dir, servers=servers.replace("{python}", sys.executable),
                                         learner=fake_slurm.PRINT_ENV)
           | fake_slurm.allocation(list(nodes), ntasks_per_node)
           | {"SLURM_SUBMIT_DIR": ROOT, "SERVER_SCRIPT": str(tmp_path / "bin" / "servers"),
              "PYTHON": str(tmp_path / "bin" / "learner"), "SERVER_LOG_DIR": str(tmp_path / "server_logs"),
              "POLICY_PORT": str(_free_port()), "USER_PORT": str(_free_port())} | env)
    proc = _run(["bash", "launch/slurm_rl.sbatch", *args], env, timeout=120)
    return proc, env, fake_slurm.steps(task_dir)


SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID",
              "SLURM_STEP_NUM_NODES", "JAX_COORDINATOR_PORT", "JAX_LOCAL_DEVICE_IDS", *distributed.ENV_VARS)


def _resolve_in(env, monkeypatch):
    for k in SLURM_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return distributed.resolve()


# sbatch's default (1 task per node), and an allocation of 4 tasks per node whose SLURM_NTASKS an
# srun without --ntasks would inherit (two gpu_node.sh on the rollout node, learners of a GPU each).
@pytest.mark.parametrize("ntasks_per_node", [1, 4])
def test_slurm_rl_hands_the_rollout_nodes_servers_to_the_learner(tmp_path, monkeypatch, ntasks_per_node):
    proc, env, steps = _sbatch_rl(tmp_path, {"WORKDIR": "/shared/rl"}, "--config", "configs/tiny_grpo.py",
                                  ntasks_per_node=ntasks_per_node)
    assert proc.returncode == 0, proc.stderr
    assert "learner on 127.0.0.1, policy + user servers on localhost" in proc.stderr
    assert "learner 1 process(es), a single process (no coordinator)" in proc.stderr
    servers, learner = steps
    assert (servers.program, servers.info["ntasks"], servers.info["nodelist"], len(servers.tasks)) == \
        ("bash", "1", "localhost", 1)
    assert servers.tasks[0][0].splitlines()[0] == "BIND_HOST=localhost POLICY_GPUS=0,1,2,3,4,5,6 USER_GPUS=7"
    assert (learner.program, learner.info["ntasks"], learner.info["nodelist"], len(learner.tasks)) == \
        ("learner", "1", "127.0.0.1", 1)
    seen = learner.env(0)
    key = seen["TAU2JAX_API_KEY"]  # one per job (issue 33): the servers' --api-key, the learner's and its users'
    assert len(key) == 32
    assert learner.tasks[0][0].splitlines()[-1] == (
        f"ARGS -m tau2jax.train --config configs/tiny_grpo.py --config.workdir=/shared/rl "
        f"--config.engine.kind=sglang --config.engine.url=http://localhost:{env['POLICY_PORT']} "
        f"--config.user.kind=llm --config.user.base_url=http://localhost:{env['USER_PORT']}/v1 "
        f"--config.user.model=openai/qwen3-4b --config.user.api_key={key}")
    assert seen["SLURM_NTASKS"] == "1" and seen["SLURM_STEP_NODELIST"] == "127.0.0.1"
    assert "JAX_COORDINATOR_ADDRESS" not in seen
    assert _resolve_in(seen, monkeypatch) is None  # one process: it starts, no jax.distributed


def test_slurm_rl_learner_nodes_join_one_run_beside_one_server_per_rollout_node(tmp_path, monkeypatch):
    """3 nodes, 2 tasks each in the allocation (SLURM_NTASKS=6): 2 learner processes on the first two
    nodes joined by the coordinator on the first, 1 gpu_node.sh on the last."""
    proc, env, steps = _sbatch_rl(tmp_path, {"PORT": "1234"}, "--config", "configs/tiny_grpo.py",
                                  nodes=("127.0.0.1", "127.0.0.2", "localhost"), ntasks_per_node=2)
    assert proc.returncode == 0, proc.stderr
    assert "learner 2 process(es), coordinator 127.0.0.1:1234" in proc.stderr
    servers, learner = steps
    assert (servers.info["ntasks"], servers.info["nodelist"], len(servers.tasks)) == ("1", "localhost", 1)
    assert (learner.info["ntasks"], learner.info["nodelist"], len(learner.tasks)) == ("2", "127.0.0.1,127.0.0.2", 2)
    for i in range(2):
        assert learner.env(i)["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
        assert _resolve_in(learner.env(i), monkeypatch) == distributed.Launch("127.0.0.1:1234", 2, i, None)


def test_slurm_rl_hands_every_rollout_nodes_user_simulator_to_the_learner(tmp_path):
    """Two rollout nodes (localhost, 127.0.0.2): engine.url and user.base_url list both, in node order."""
    proc, env, steps = _sbatch_rl(tmp_path, {"FAKE_NODES": "127.0.0.1 localhost 127.0.0.2", "ROLLOUT_NODES": "2",
                                             "SLURM_JOB_NODELIST": "fake[1-3]"}, "--config", "configs/tiny_grpo.py")
    assert proc.returncode == 0, proc.stderr
    p, u = env["POLICY_PORT"], env["USER_PORT"]
    _, learner = steps
    args, key = learner.tasks[0][0].splitlines()[-1].rsplit(" --config.user.api_key=", 1)
    assert args == (
        f"ARGS -m tau2jax.train --config configs/tiny_grpo.py "
        f"--config.engine.kind=sglang --config.engine.url=http://localhost:{p},http://127.0.0.2:{p} "
        f"--config.user.kind=llm --config.user.base_url=http://localhost:{u}/v1,http://127.0.0.2:{u}/v1 "
        "--config.user.model=openai/qwen3-4b")
    assert len(key) == 32


@pytest.mark.parametrize("env, servers, rc, expected", [
    ({"ROLLOUT_NODES": "2"}, FAKE_SERVERS, 2, "ROLLOUT_NODES='2': must be between 1 and the job's node count - 1 (1)"),
    ({"READY_TIMEOUT_S": "1"}, "#!/usr/bin/env bash\nexec sleep 30\n", 1,
     "error: policy server http://localhost:{POLICY_PORT} not healthy from"),
])
def test_slurm_rl_bad_launches_fail_by_name(tmp_path, env, servers, rc, expected):
    proc, env, steps = _sbatch_rl(tmp_path, env, "--config", "configs/tiny_grpo.py", servers=servers)
    assert proc.returncode == rc and expected.format(**env) in proc.stderr, proc.stderr
    assert not [s for s in steps if s.program == "learner"]  # the learner never started


# ----------------------------------------------------------------------------- the pipeline

@pytest.mark.heavy  # minutes on 2 cores: `make test-heavy`
def test_pipeline_on_mock_runs_in_two_processes_to_its_report(tmp_path):
    """demos -> eval -> SFT -> eval -> RFT -> SFT -> eval -> GRPO -> eval under 2 processes, every step
    cut to seconds: SFT and GRPO on both processes, the rest on process 0, the report at the end."""
    from tau2jax.data.tokenizer import load_tokenizer
    from tau2jax.models.tiny_hf import make_tiny_hf_dir
    from tau2jax.weights.convert import convert

    make_tiny_hf_dir(str(tmp_path / "hf"), vocab_size=load_tokenizer().vocab_size, seed=0)
    convert(str(tmp_path / "hf"), str(tmp_path / "orbax"))
    args = ["--config", "configs/tiny_pipeline.py", f"--config.model.init_from={tmp_path / 'orbax'}",
            "--config.mesh.data=-1", "--config.tau2.max_steps=4", "--config.engine.max_new_tokens=16",
            "--config.eval.max_tasks_per_domain=2", "--config.pipeline.sft.train.steps=2",
            "--config.pipeline.sft_rft.train.steps=2", "--config.pipeline.rft.rft.samples=1",
            "--config.pipeline.grpo.rl.steps=1", "--config.pipeline.grpo.rl.tasks_per_step=2",
            "--config.pipeline.grpo.rl.samples_per_task=2"]
    res = _ok(two_processes(args, tmp_path / "run", tmp_path / "logs", timeout=900), "2-process pipeline")
    assert set(res["stages"]) == {"base", "sft", "rft", "grpo"}
    assert all(os.path.exists(f) for f in res["report"].values())
    for step in ("demos", "eval_base", "sft", "eval_sft", "rft", "sft_rft", "eval_rft", "grpo", "eval_grpo"):
        assert (tmp_path / "run" / step / "pipeline_step.json").exists(), step
    with open(tmp_path / "run" / "grpo" / "pipeline_step.json") as f:
        assert json.load(f)["result"]["episodes"] == 2 * 2


def test_a_policy_server_unreachable_from_a_learner_process_fails_by_name(tmp_path):
    proc = two_processes([*TOY, "--config.engine.kind=sglang", "--config.engine.url=http://127.0.0.1:9"],
                         tmp_path / "w", tmp_path / "logs", timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"error: config.engine.url: policy server http://127.0.0.1:9 unreachable from process 0 on "
            f"{socket.gethostname()}") in proc.stderr
