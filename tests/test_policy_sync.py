"""GRPO against an engine that goes away (issue 29): pushes during an outage never stop the run and
are retried after recovery; rollouts wait at a health gate (bounded, naming the engine) instead of
burning their retries; a restarted server's unnamed weights ("default") are never trained; control
calls never queue behind generation; a step is an optimizer update."""

import json
import threading

import httpx
import pytest

from tau2jax import config as config_lib
from configs import tiny_grpo_toy
from tau2jax.env import toy
from tau2jax.env.episode import derive_seed
from tau2jax.inference.engine import UNKNOWN_VERSION, FixedEngine, GenerateResult, SamplingParams
from tau2jax.inference.sglang_client import SGLangEngine
from tau2jax.rl import groups as group_lib
from tau2jax.rl import collector, staleness
from tau2jax.env.trajectory import Trajectory
from tau2jax.rl.policy_sync import EngineOutageError, PolicySync
from tau2jax.rl.rollout_workers import Job, RolloutWorkers
from tau2jax.stages import builders, grpo


class Server(FixedEngine):
    """A policy server in miniature: `down` refuses everything; a restart comes back serving
    UNKNOWN_VERSION (SGLang's "default") until the next push."""

    kind = "fake-server"
    location = "http://fake:30000"
    synced_version = None

    def __init__(self):
        self.policy_version, self.down, self.swaps = 3, False, []
        self.lock = threading.Lock()

    def generate(self, input_ids, params):
        with self.lock:
            if self.down:
                raise ConnectionError("engine unavailable")
            v = self.policy_version
        tok = toy.KEY0 + (params.seed or 0) % (toy.VOCAB_SIZE - toy.KEY0)
        return [GenerateResult([tok], [-2.0], "length", v) for _ in input_ids]

    def stage_weights(self, params):
        return params

    def swap_weights(self, staged, version):
        with self.lock:
            if self.down:
                raise ConnectionError("connection refused (injected outage)")
            self.policy_version = version
            self.swaps.append(version)
        return 0.0

    def served_version(self):
        with self.lock:
            return None if self.down else self.policy_version

    def restart_down(self):
        with self.lock:
            self.down, self.policy_version = True, UNKNOWN_VERSION

    def come_back(self):
        with self.lock:
            self.down = False


class Listener:
    def __init__(self):
        self.versions, self.resyncs = [], 0

    def set_version(self, v):
        self.versions.append(v)

    def request_resync(self):
        self.resyncs += 1


def test_a_push_during_an_outage_is_counted_and_retried_after_recovery():
    server, listener = Server(), Listener()
    sync = PolicySync(server, 3, poll_s=0.01)
    sync.listen(listener)
    server.restart_down()
    sync.push({"w": 4}, 4)  # fails in the background
    assert sync.wait() is None and sync.push_failures == 1 and "injected outage" in sync.last_error
    sync.push({"w": 5}, 5)  # the next push supersedes it: no raise on the learner
    assert sync.wait() is None and sync.push_failures == 2 and listener.resyncs >= 2
    sync.resync({"w": 5}, 5)  # still down: the prober takes over, nothing raises
    assert sync.outages == 1
    server.come_back()
    deadline = threading.Event()
    while listener.resyncs < 3 and not deadline.wait(0.01):  # the prober asks for the resync
        pass
    sync.resync({"w": 5}, 5)
    assert server.swaps == [5] and sync.version == 5 and sync.resyncs == 1 and listener.versions == [5]
    sync.await_serving()  # serving again: returns at once
    sync.close()


def test_rollouts_wait_at_the_gate_while_the_engine_is_down_and_a_long_outage_names_it():
    server = Server()
    sync = PolicySync(server, 3, outage_s=0.3, poll_s=0.01)
    server.restart_down()
    assert sync.lost(None) is False  # down: not a resync yet, the prober watches
    with pytest.raises(EngineOutageError, match=r"the engine at http://fake:30000 did not answer for 0 s"):
        sync.await_serving()
    with pytest.raises(EngineOutageError):
        sync.resync({}, 3)
    sync.close()


def test_a_restarted_server_blocks_rollouts_until_the_learner_resyncs():
    server, listener = Server(), Listener()
    sync = PolicySync(server, 3, poll_s=0.01)
    sync.listen(listener)
    server.restart_down()
    server.come_back()  # back, serving its own start weights
    assert sync.lost(None) is True  # UNKNOWN_VERSION < 3
    released = threading.Event()
    t = threading.Thread(target=lambda: (sync.await_serving(), released.set()))
    t.start()
    assert not released.wait(0.1)  # no episode samples the restarted server's weights
    sync.resync({"w": 3}, 3)
    t.join(5)
    assert released.is_set() and server.swaps == [3]
    sync.close()


def test_episodes_wait_out_an_outage_without_burning_retries():
    """Every episode's first attempt fails on the outage; its retry waits at the gate and lands on
    the restarted, re-synced engine: every group whole with max_infra_retries=1, nothing trained from
    the server's unnamed start weights."""
    env, server, listener = toy.ToyEnvironment(num_tasks=4), Server(), Listener()
    sync = PolicySync(server, 3, poll_s=0.01)
    workers = RolloutWorkers(env, engine=server, sampling=SamplingParams(temperature=1.0, max_new_tokens=1),
                             samples=2, seed=0, concurrency=4, max_infra_retries=1, max_staleness=0, version=3,
                             lost_weights=sync.lost, await_engine=sync.await_serving)
    sync.listen(workers)
    server.restart_down()
    threading.Timer(0.3, server.come_back).start()
    try:
        workers.submit([Job(3, f"s4g{j}", ref) for j, ref in enumerate(env.tasks()[:2])])
        groups = workers.take(3, lambda: sync.resync({"w": 3}, 3))
    finally:
        workers.close()
        sync.close()
    assert all(g.complete for g in groups) and sync.resyncs == 1
    assert all(t.policy_versions == [3] for g in groups for t in g.trajectories)


def test_turns_the_server_cannot_name_are_never_trained():
    client = SGLangEngine("http://127.0.0.1:9")
    meta = {"output_token_logprobs": [[-0.5, 7, None]], "finish_reason": {"type": "length"},
            "weight_version": "default"}
    r = client._result({"meta_info": meta}, SamplingParams())  # noqa: SLF001
    assert r.policy_version == UNKNOWN_VERSION
    client.close()
    turn = {"start": 1, "end": 2, "kind": "policy", "finish_reason": "length", "temperature": 1.0}
    trajs = [_traj([turn | {"policy_version": 3}], 1.0), _traj([turn | {"policy_version": UNKNOWN_VERSION}], 0.0),
             _traj([turn | {"policy_version": 3}], 0.0)]
    assert staleness.check(trajs, 3, 0, "correct")[1] == [True, False, True]  # no TIS makes it on-policy
    rl = config_lib.default_config().rl
    g = collector.Group("g", toy.ToyEnvironment(num_tasks=1).tasks()[0], trajs)
    items, ledger, counts, _ = group_lib.assemble([g], rl, None, step=4, learner_version=3)
    assert counts["samples_unknown_version"] == 1 and len(items) == 2
    assert [r["reason"] for r in ledger if r["status"] == "dropped"] == ["unknown_version"]


def _traj(turns, reward):
    return Trajectory(domain="toy", task_id="0", prompt_style="toy", token_ids=[1, 2], loss_mask=[0, 1],
                      behaviour_logprobs=[0.0, -0.5], turns=turns, reward=reward, shaped_reward=reward)


def test_control_calls_never_queue_behind_generation_and_a_push_drains_first():
    """With every /generate slot taken, a version query still goes through; a weight load holds new
    /generate calls, waits for the running ones and for the server to report nothing running
    (SGLang's flush needs an empty running batch), then loads, checks the version and flushes."""
    release, entered = threading.Event(), threading.Semaphore(0)
    state = {"version": "2", "calls": [], "busy": 2}

    def handler(request: httpx.Request):
        state["calls"].append(request.url.path)
        if request.url.path == "/generate":
            entered.release()
            release.wait(10)
            state["busy"] -= 1
            return httpx.Response(200, json={"meta_info": {"output_token_logprobs": [[-1.0, 5, None]],
                                                           "finish_reason": {"type": "length"},
                                                           "weight_version": state["version"]}})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{}]})
        if request.url.path == "/get_model_info":
            return httpx.Response(200, json={"weight_version": state["version"]})
        if request.url.path == "/v1/loads":
            return httpx.Response(404)
        if request.url.path == "/get_load":  # sglang 0.5.3's form
            return httpx.Response(200, json=[{"num_reqs": state["busy"], "num_waiting_reqs": 0}])
        if request.url.path == "/update_weights_from_disk":
            assert state["busy"] == 0, "weights loaded while requests still run"
            state["version"] = json.loads(request.content)["weight_version"]
            return httpx.Response(200, json={"success": True})
        return httpx.Response(200, text="Cache flushed.\n")  # /flush_cache

    client = SGLangEngine("http://policy:30000", concurrency=2)
    transport = httpx.MockTransport(handler)
    client._client = httpx.Client(base_url=client.url, transport=transport)  # noqa: SLF001
    client._control = httpx.Client(base_url=client.url, transport=transport)  # noqa: SLF001
    client.context_length  # noqa: B018  (read once, before the slots fill)
    sp = SamplingParams(max_new_tokens=1)
    threads = [threading.Thread(target=client.generate, args=([[1, 2]], sp)) for _ in range(2)]
    for t in threads:
        t.start()
    for _ in threads:
        assert entered.acquire(timeout=5)
    try:
        assert client.served_version() == 2  # a control call: not behind the semaphore
        push = threading.Thread(target=client.update_weights, args=("/w/version_000003", 3))
        push.start()
        push.join(0.2)
        assert push.is_alive() and "/update_weights_from_disk" not in state["calls"]  # drains first
        release.set()
        push.join(10)
        assert client.synced_version == 3 and state["calls"][-1] == "/flush_cache"
        [r] = client.generate([[1, 2]], sp)
        assert r.policy_version == 3
    finally:
        release.set()
        for t in threads:
            t.join()
        client.close()


def test_a_weight_load_the_server_cannot_confirm_holds_generation():
    """SGLang 0.5.23 answers 400 after swapping (flush refused, no version bump): the push fails and
    no /generate is sent until a later push succeeds (never a turn stamped with other weights)."""
    state = {"fail": True, "generated": 0}

    def handler(request: httpx.Request):
        path = request.url.path
        if path == "/update_weights_from_disk":
            if state["fail"]:
                return httpx.Response(400, json={"success": False, "message": "Weights were updated, but the cache "
                                                 "was not flushed because requests are still running or queued."})
            return httpx.Response(200, json={"success": True})
        if path == "/get_model_info":
            return httpx.Response(200, json={"weight_version": "4"})
        if path == "/generate":
            state["generated"] += 1
            return httpx.Response(200, json={"meta_info": {"output_token_logprobs": [[-1.0, 5, None]],
                                                           "finish_reason": {"type": "length"}, "weight_version": "4"}})
        if path == "/v1/loads":
            return httpx.Response(200, json={"loads": [{"num_running_reqs": 0, "num_waiting_reqs": 0}]})
        return httpx.Response(200, json={"data": [{}]}) if path == "/v1/models" else httpx.Response(200, text="ok")

    client = SGLangEngine("http://policy:30000", timeout_s=0.3)
    transport = httpx.MockTransport(handler)
    client._client = httpx.Client(base_url=client.url, transport=transport)  # noqa: SLF001
    client._control = httpx.Client(base_url=client.url, transport=transport)  # noqa: SLF001
    with pytest.raises(Exception, match="cache was not flushed"):
        client.update_weights("/w/version_000004", 4)
    with pytest.raises(Exception, match="held"):
        client.generate([[1, 2]], SamplingParams(max_new_tokens=1))
    assert state["generated"] == 0 and client.synced_version is None
    state["fail"] = False
    client.update_weights("/w/version_000004", 4)
    assert client.generate([[1, 2]], SamplingParams(max_new_tokens=1))[0].policy_version == 4
    client.close()


def test_server_concurrency_follows_the_stage():
    c = config_lib.default_config()
    for stage, want in (("eval", c.eval), ("rft", c.rft), ("grpo", c.rl.rollout)):
        c.stage = stage
        assert builders.request_concurrency(c) == want.concurrency
    c.engine.concurrency = 5
    assert builders.request_concurrency(c) == 5


@pytest.mark.slow
def test_a_step_whose_rollouts_all_failed_is_played_again_not_counted(tmp_path, monkeypatch):
    """Every episode of step 2's first round fails on infrastructure: the step is played again on
    fresh groups; 4 steps asked = 4 optimizer updates, the lr follows them, every episode has a
    ledger line, and the summary's rewards are real ones."""

    class FailingRound(toy.ToyEnvironment):
        def play(self, ref, *, engine, sampling, sample_index):
            traj = super().play(ref, engine=engine, sampling=sampling, sample_index=sample_index)
            if failing.get(sampling.seed):
                traj.infra_error, traj.reward, traj.shaped_reward = "user simulator timed out (injected)", None, None
            return traj

    failing = {}
    real = builders.rl_environment

    def environment(config):
        _, tok, cfg = real(config)
        return FailingRound(num_tasks=config.rl.toy.tasks, seed=config.seed,
                            shared_table=config.rl.toy.shared_table), tok, cfg

    c = tiny_grpo_toy.get_config()
    c.workdir, c.rl.steps, c.rl.tasks_per_step, c.rl.rollout.max_infra_retries = str(tmp_path), 4, 2, 0
    c.train.checkpoint_every, c.mesh.data = 100, -1
    # the groups of step 2, round 0: all their episodes fail
    meta = {"cursor": 0, "requeue": []}
    for target in range(2):
        for job in group_lib.plan_jobs(toy.ToyEnvironment(num_tasks=c.rl.toy.tasks, seed=c.seed).tasks(), meta,
                                       target=target, round_=0, n=c.rl.tasks_per_step, seed=c.seed):
            if target == 1:
                failing |= {derive_seed(c.seed, job.group_id, i): True for i in range(c.rl.samples_per_task)}
    monkeypatch.setattr(builders, "rl_environment", environment)
    out = grpo.run(c)
    assert out["optimizer_updates"] == 4 and out["final_reward"] is not None
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    by_step = {r["step"]: r for r in rows}
    assert by_step[2]["empty_rounds"] == 1 and all(by_step[s]["empty_rounds"] == 0 for s in (1, 3, 4))
    ledger = [json.loads(line) for line in open(tmp_path / "rollouts" / "ledger.jsonl")]
    step2 = [r for r in ledger if r["step"] == 2]
    assert sum(r["status"] == "trained" for r in step2) == c.rl.tasks_per_step * c.rl.samples_per_task
    assert sum(r["status"] != "trained" for r in step2) == len(failing)
