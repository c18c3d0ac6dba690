"""The asynchronous rollout loop: the staleness bound (by construction in the workers, checked when a
batch is formed), fault handling (engine raising / restarting, user-simulator failures, learner
SIGKILL) with every episode in the ledger, and weight sync bookkeeping. Fast tests use the toy
environment with a pure-Python engine (no JAX); the SIGKILL test runs the CLI."""

import json
import random
import signal
import threading
import time

import pytest

from tau2jax import config as config_lib
from tau2jax.env import toy
from tau2jax.env.environments import TaskRef
from tau2jax.env.trajectory import INFRA_ERROR, Trajectory
from tau2jax.inference.engine import FixedEngine, GenerateResult, SamplingParams
from tau2jax.inference.jax_engine import JaxEngine
from tau2jax.inference.sglang_client import SGLangEngine
from tau2jax.rl import advantages, collector, staleness
from tau2jax.rl import groups as loop
from tau2jax.stages import grpo
from tau2jax.rl.rollout_workers import Job, RolloutWorkers
from cli_runs import start_train, train

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=1)


class FakeEngine(FixedEngine):
    """Answers each toy turn with a seeded random action token at its current policy_version;
    `down` calls raise (an outage); `restart()` loses the weights (version 0) after an outage."""

    kind = "fake"

    def __init__(self, version=0):
        self.policy_version, self.down, self.calls = version, 0, 0
        self._lock = threading.Lock()

    def generate(self, input_ids, params):
        with self._lock:
            self.calls += 1
            if self.down > 0:
                self.down -= 1
                raise ConnectionError("engine unavailable")
            version = self.policy_version
        tok = random.Random(params.seed).randrange(toy.KEY0, toy.VOCAB_SIZE)
        return [GenerateResult([tok], [-2.0], "length", version) for _ in input_ids]

    def restart(self, outage_calls=2):
        with self._lock:
            self.policy_version, self.down = 0, outage_calls


class RecordingToy(toy.ToyEnvironment):
    """Records (task_id, engine version) at each episode start."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.started = []

    def play(self, ref, *, engine, **kw):
        self.started.append((ref.task_id, engine.policy_version))
        return super().play(ref, engine=engine, **kw)


class FlakyUserToy(toy.ToyEnvironment):
    """A user simulator that times out (HTTP 504) on the first `failures` episodes of each task: the
    episode comes back unscored with infra_error, as episode.py reports a user failure."""

    def __init__(self, failures, **kw):
        super().__init__(**kw)
        self.left = {}
        self._lock = threading.Lock()
        self.failures = failures

    def play(self, ref, *, engine, sampling, sample_index):
        with self._lock:
            n = self.left.setdefault(ref.key, self.failures)
            self.left[ref.key] = n - 1
        if n > 0:
            return Trajectory(ref.task_id, ref.domain, "toy", sample_index=sample_index, termination_reason=INFRA_ERROR,
                              infra_error="user: litellm.Timeout: HTTP 504 from the user simulator")
        return super().play(ref, engine=engine, sampling=sampling, sample_index=sample_index)


def _workers(env, engine, **kw):
    args = dict(engine=engine, sampling=SAMPLING, samples=2, seed=0, concurrency=4, max_infra_retries=2,
                max_staleness=0, version=engine.policy_version)
    return RolloutWorkers(env, **(args | kw))


def _jobs(env, target, n=2):
    refs = env.tasks()
    return [Job(target, f"s{target + 1}g{j}", refs[(target * n + j) % len(refs)]) for j in range(n)]


def _traj(versions, reward=1.0):
    turns = [{"start": 1 + i, "end": 2 + i, "kind": "policy", "policy_version": v, "finish_reason": "length",
              "temperature": 1.0} for i, v in enumerate(versions)]
    n = 1 + len(versions)
    return Trajectory("t", "toy", "toy", token_ids=list(range(1, n + 1)), loss_mask=[0] + [1] * len(versions),
                      behaviour_logprobs=[0.0] + [-1.0] * len(versions), turns=turns, reward=reward,
                      shaped_reward=reward)


# ----------------------------------------------------------------------------- staleness check

def test_staleness_is_learner_version_minus_the_oldest_turn():
    assert staleness.staleness(_traj([3, 4, 5]), 5) == 2  # an episode that crossed two weight updates
    assert staleness.staleness(_traj([]), 5) == 0
    trajs = [_traj([5]), _traj([4, 5]), _traj([2, 5])]
    assert staleness.check(trajs, 5, 1, "drop") == ([0, 1, 3], [True, True, False])
    assert staleness.check(trajs, 5, 1, "correct") == ([0, 1, 3], [True, True, True])
    with pytest.raises(ValueError, match="stale policy"):
        staleness.check(trajs, 5, 1, "keep")
    assert staleness.histogram([0, 1, 1, 3]) == {"staleness/0": 1, "staleness/1": 2, "staleness/3": 1}


def test_correct_turns_on_token_tis():
    assert staleness.tis_cap("correct", 0.0) == staleness.DEFAULT_TIS_CAP
    assert staleness.tis_cap("correct", 3.0) == 3.0 and staleness.tis_cap("drop", 0.0) == 0.0
    c = config_lib.default_config()
    c.rl.stale_policy = "correct"
    assert grpo.loss_config(c, JaxEngine).tis_cap == staleness.DEFAULT_TIS_CAP


@pytest.mark.parametrize("engine, cap, want", [(SGLangEngine, -1.0, 2.0), (JaxEngine, -1.0, 0.0),
                                               (SGLangEngine, 0.0, 0.0), (JaxEngine, 3.0, 3.0)])
def test_tis_by_engine(engine, cap, want):
    """Against SGLang the PPO ratio is anchored on the learner's own log-probs and TIS (cap 2) corrects
    the behaviour gap, by default (the engine's `default_tis_cap`); the built-in engine shares the
    learner's numerics (off)."""
    c = config_lib.default_config()
    c.rl.loss.tis_cap = cap
    config_lib.validate(c)
    assert grpo.loss_config(c, engine).tis_cap == want


def test_assemble_drops_stale_samples_out_of_their_group():
    """A sample over the bound is dropped ("stale", counted) and leaves its group's statistics: the
    others get the advantages of the group without it. With "correct" it is trained, and still
    counted as over the bound."""
    rl = config_lib.default_config().rl
    rl.max_staleness = 1
    g = collector.Group("a", TaskRef("toy", "a"), [_traj([4], 1.0), _traj([2, 4], 1.0), _traj([3], 0.0)])
    items, ledger, counts, ages = loop.assemble([g], rl, None, step=5, learner_version=4)
    assert ages == [0, 2, 1] and counts["samples_stale"] == 1
    want = advantages.group_advantages([1.0, 0.0], [0, 0])
    assert [a for _, a, _ in items] == pytest.approx(list(want))
    assert sorted((r["status"], r["reason"], r["staleness"]) for r in ledger) == [
        ("dropped", "stale", 2), ("trained", "", 0), ("trained", "", 1)]
    rl.stale_policy = "correct"
    items, _, counts, _ = loop.assemble([g], rl, None, step=5, learner_version=4)
    assert len(items) == 3 and counts["samples_stale"] == 1  # over the bound, kept and corrected
    rl.max_staleness = 2
    assert loop.assemble([g], rl, None, step=5, learner_version=4)[2]["samples_stale"] == 0


def test_config_rejects_a_staleness_bound_below_the_sync_interval():
    c = config_lib.default_config()
    c.rl.sync.every = 3
    with pytest.raises(config_lib.ConfigError, match="rl.max_staleness"):
        config_lib.validate(c)
    c.rl.max_staleness = 2
    config_lib.validate(c)


# ----------------------------------------------------------------------------- workers

@pytest.mark.parametrize("k", [0, 1])
def test_workers_start_a_step_only_within_the_staleness_bound(k):
    """Groups for step t start only once the engine serves version >= t - k: with k = 0 the next
    step waits for the weight push (synchronous), with k = 1 it runs ahead one step, never two."""
    env, engine = RecordingToy(num_tasks=8), FakeEngine()
    w = _workers(env, engine, max_staleness=k)
    try:
        for t in range(3):
            w.submit(_jobs(env, t))
        ahead = {t: {ref.task_id for ref in (j.ref for j in _jobs(env, t))} for t in range(3)}
        for t in range(k + 1):
            groups = w.take(t)
            assert [g.group_id for g in groups] == [f"s{t + 1}g0", f"s{t + 1}g1"]
            assert all(g.complete and len(g.trajectories) == 2 for g in groups)
        started = {task for task, _ in env.started}
        assert not started & ahead[k + 1], "a group started beyond the staleness bound"
        assert w.ready_groups() == 0 and len(w.in_flight_keys()) == 2 * (2 - k)
        for v in range(1, 3):
            engine.policy_version = v
            w.set_version(v)
            if v + k <= 2:
                w.take(v + k)
        # every episode started on a version within the bound of the step it is for
        for t in range(3):
            versions = [v for task, v in env.started if task in ahead[t]]
            assert versions and all(t - k <= v <= t for v in versions), (t, versions)
    finally:
        w.close()


def test_engine_outage_is_retried_and_a_restart_resyncs_the_weights():
    """Engine calls that raise end episodes as infrastructure failures, replayed with the same seed;
    after a restart (the engine lost our version) the learner re-syncs in `take`. Episodes sampled on
    the restarted engine's old weights are caught by the staleness check; every attempt is in the
    ledger once."""
    env, engine = toy.ToyEnvironment(num_tasks=4), FakeEngine(version=3)
    synced = {"v": 3, "resyncs": 0}

    def resync():
        engine.policy_version = synced["v"]
        synced["resyncs"] += 1

    w = _workers(env, engine, version=3, max_infra_retries=3,
                 lost_weights=lambda traj: engine.policy_version != synced["v"])
    try:
        engine.restart(outage_calls=2)
        w.submit(_jobs(env, 3))
        groups = w.take(3, resync)
    finally:
        w.close()
    assert synced["resyncs"] >= 1 and engine.policy_version == 3
    failed = [t for g in groups for t in g.failed_attempts]
    assert len(failed) == 2 and all("engine unavailable" in t.infra_error and t.reward is None for t in failed)
    assert all(g.complete for g in groups)
    rl = config_lib.default_config().rl
    items, ledger, counts, _ = loop.assemble(groups, rl, None, step=4, learner_version=3)
    assert all(v == 3 for t, _, _ in items for v in t.policy_versions)  # never trained on lost weights
    n_episodes = sum(len(g.trajectories) + len(g.failed_attempts) for g in groups)
    assert len(ledger) == n_episodes == 4 + 2
    assert counts["samples_stale"] == sum(r["reason"] == "stale" for r in ledger)


def test_user_simulator_failures_are_requeued_never_scored():
    """A user-simulator timeout is infrastructure: retried; a group still missing a sample is
    re-queued whole, its finished samples not trained, its failures not scored as the model's."""
    env = FlakyUserToy(failures=3, num_tasks=4)
    w = _workers(env, FakeEngine(), max_infra_retries=1)
    try:
        w.submit(_jobs(env, 0))
        groups = w.take(0)
    finally:
        w.close()
    assert not any(g.complete for g in groups)  # 3 failures > 2 samples x 1 retry for one sample
    items, ledger, counts, _ = loop.assemble(groups, config_lib.default_config().rl, None, step=1, learner_version=0)
    assert items == [] and counts["groups_requeued"] == 2
    statuses = sorted((r["status"], r["reason"]) for r in ledger)
    assert statuses.count(("dropped", "infra_error_retried")) == 6
    assert all(r["reward"] is None for r in ledger if r["status"] == "dropped")
    assert len(ledger) == sum(len(g.trajectories) + len(g.failed_attempts) for g in groups)


def test_gather_refills_zero_variance_groups_for_the_same_step():
    """Dynamic sampling: a step whose groups carry no signal gets refill groups (named by round) for
    the same step, up to max_refill_rounds, ahead of any later step's."""
    env, engine = toy.ToyEnvironment(num_tasks=8), FakeEngine()
    rl = config_lib.default_config().rl
    rl.dynamic_sampling, rl.tasks_per_step, rl.samples_per_task, rl.max_refill_rounds = True, 2, 2, 3
    meta = {"cursor": 0, "requeue": []}
    w = _workers(env, engine, max_staleness=1)
    try:
        for t in (0, 1):
            w.submit(loop.plan_jobs(env.tasks(), meta, target=t, round_=0, n=2, seed=0))
        groups, rounds = loop.gather(w, env.tasks(), meta, rl, step=0, seed=0, resync=None)
        assert [g.group_id.split(":")[0] for g in w.take(1)] == ["s2r0g0", "s2r0g1"]
    finally:
        w.close()
    useful = sum(loop.useful(g, rl) for g in groups)
    assert 1 <= rounds <= 3 and (useful >= 2 or rounds == 3)
    ids = [g.group_id.split(":")[0] for g in groups]
    assert ids[:2] == ["s1r0g0", "s1r0g1"] and all(i.startswith("s1r") for i in ids)
    assert {i[:4] for i in ids} == {f"s1r{r}" for r in range(rounds + 1)}


def test_a_raising_environment_fails_take_instead_of_hanging():
    class Broken(toy.ToyEnvironment):
        def play(self, ref, **kw):
            raise KeyError("bug")

    env = Broken(num_tasks=2)
    w = _workers(env, FakeEngine())
    try:
        w.submit(_jobs(env, 0))
        with pytest.raises(RuntimeError, match="raised"):
            w.take(0)
        with pytest.raises(ValueError, match="no group was submitted for step 5"):
            w.take(5)
    finally:
        w.close()


# ----------------------------------------------------------------------------- resume and weight sync

def test_checkpoint_requeues_groups_in_flight_and_resume_replays_them():
    """At a checkpoint after step 0 with step 1's groups in flight, the saved loop state re-queues
    them first: the resumed run plans step 1 with the same tasks and group ids (hence seeds)."""
    tasks = [TaskRef("toy", str(i)) for i in range(5)]
    meta = {"cursor": 0, "requeue": ["toy/4"]}
    step0 = loop.plan_jobs(tasks, meta, target=0, round_=0, n=2, seed=0)
    step1 = loop.plan_jobs(tasks, meta, target=1, round_=0, n=2, seed=0)
    meta["requeue"].append("toy/0")  # a group of step 0 came back incomplete
    saved = loop.checkpoint_meta(meta, [j.ref.key for j in step1])
    assert saved["requeue"] == [j.ref.key for j in step1] + ["toy/0"] and meta["requeue"] == ["toy/0"]
    assert step0[0].ref.key == "toy/4"
    replay = loop.plan_jobs(tasks, json.loads(json.dumps(saved)), target=1, round_=0, n=2, seed=0)
    assert replay == step1


def test_sglang_sync_publishes_then_loads_the_version(tmp_path):
    """SGLang path: weights written to disk (transfer), the server told to load that version (pause,
    timed apart)."""
    import jax

    from tau2jax.inference import weight_sync
    from tau2jax.inference.sglang_client import SGLangEngine
    from tau2jax.models import configs, qwen3

    class Server(SGLangEngine):
        def __init__(self):
            super().__init__("http://127.0.0.1:9")
            self.loaded = []

        def update_weights(self, path, version):
            self.loaded.append((path, version))

        def model_info(self):
            return {"weight_version": str(self.loaded[-1][1]) if self.loaded else "default"}

    cfg = configs.get_model_config("toy")
    engine = Server()
    assert engine.served_version() == -1  # a fresh / restarted server: not one of our versions
    engine.publication = weight_sync.Publication(cfg, str(tmp_path / "weights"))
    assert engine.synced_version is None  # the server's start weights are not ours
    t = weight_sync.push(engine, qwen3.init_params(cfg, jax.random.key(0)), 7)
    assert engine.loaded == [(weight_sync.version_dir(str(tmp_path / "weights"), 7), 7)]
    assert engine.served_version() == 7
    assert t["publish_s"] > 0 and t["pause_s"] >= 0 and set(t) == {"version", "pause_s", "publish_s"}
    assert t["version"] == 7
    assert weight_sync.latest_version(str(tmp_path / "weights")) == 7


# ----------------------------------------------------------------------------- the stage (CLI)

@pytest.mark.slow
def test_async_sigkill_resume_trains_no_group_twice(tmp_path):
    """max_staleness=1: killed after a checkpoint while the next step's groups are in flight, the
    rerun replays them; each step's groups are trained once, staleness stays within the bound, the
    curriculum state is restored, and the metrics carry the async counters."""
    common = ["--config", "configs/tiny_grpo_toy.py", f"--config.workdir={tmp_path}", "--config.rl.steps=8",
              "--config.rl.max_staleness=1", "--config.rl.toy.turn_latency_s=0.005", "--config.rl.curriculum=True",
              "--config.train.checkpoint_every=2", "--config.train.async_checkpoint=False"]
    proc = start_train(*common)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if (tmp_path / "checkpoints" / "4").exists() and logged >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    summary = train(*common)
    assert summary["resumed_from"] >= 4 and summary["max_staleness_seen"] <= 1
    ledger = [json.loads(line) for line in open(tmp_path / "rollouts" / "ledger.jsonl")]
    trained = [(r["group_id"], r["sample_index"]) for r in ledger if r["status"] == "trained"]
    assert len(trained) == len(set(trained)) == 8 * 8 * 8
    assert sorted({r["step"] for r in ledger}) == list(range(1, 9))
    assert all(r["staleness"] <= 1 for r in ledger if r["status"] == "trained")
    rows = [json.loads(line) for line in open(metrics)]
    last = {r["step"]: r for r in rows}[8]
    for key in ("rollout_tokens_per_s", "rollout_episodes_per_s", "learner_busy_frac", "queue_depth",
                "weight_sync_pause_s", "weight_sync_publish_s", "weight_sync_wait_s"):
        assert key in last, key
    assert sum(v for k, v in last.items() if k.startswith("staleness/")) == 64
    # the curriculum tracker resumed from the checkpoint: each scored episode recorded exactly once
    from tau2jax.learn.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), save_every=2, keep=3, async_save=False)
    counts = ckpt.restore_meta(8)["tracker"]["counts"].values()
    ckpt.close()
    assert sum(a for a, _ in counts) == 8 * 8 * 8
    assert sum(s for _, s in counts) == sum(r["reward"] >= 1 for r in ledger if r["status"] == "trained")
