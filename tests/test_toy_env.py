"""The toy lookup game (tau2jax/env/toy.py): scoring, the trajectory record, seeds, failures, and a
random toy Qwen3 playing it through the JaxEngine."""

from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest

from tau2jax.env import toy
from tau2jax.env.episode import turn_seed
from tau2jax.env.trajectory import INFRA_ERROR
from tau2jax.inference.engine import ContextLengthError, GenerateResult, SamplingParams, ScriptedEngine
from tau2jax.models import configs, qwen3


def gold_action_ids(task: toy.ToyTask) -> list[list[int]]:
    """What a perfect agent samples, turn by turn: look up the task's key, answer its value."""
    return [[toy.KEY0 + task.key], [toy.VALUE0 + task.value]]


def play(env, ref, responses, seed=7):
    engine = ScriptedEngine(None, responses)
    return env.play(ref, engine=engine, sampling=SamplingParams(seed=seed), sample_index=3), engine


def check_record(traj):
    """Aligned arrays; mask 1 exactly on the spans of the turns that parsed; log-probs 0 off the
    sampled spans (a malformed turn keeps its own, for a learner that pushes it down)."""
    n = len(traj.token_ids)
    assert len(traj.loss_mask) == len(traj.behaviour_logprobs) == n
    sampled, parsed = np.zeros(n, int), np.zeros(n, int)
    for t in traj.turns:
        sampled[t["start"]:t["end"]] = 1
        parsed[t["start"]:t["end"]] = t["kind"] != "malformed"
    assert traj.loss_mask == parsed.tolist()
    assert all(lp == 0.0 for lp, m in zip(traj.behaviour_logprobs, sampled) if not m)
    assert all(0 <= i < toy.VOCAB_SIZE for i, m in zip(traj.token_ids, traj.loss_mask) if not m)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("shared_table", [True, False])
def test_gold_agent_scores_one_on_every_task(split, shared_table):
    env = toy.ToyEnvironment(num_tasks=24, seed=1, split=split, shared_table=shared_table)
    for ref in env.tasks():
        traj, engine = play(env, ref, gold_action_ids(ref.task))
        assert (traj.reward, traj.partial_reward, traj.shaped_reward) == (1.0, 1.0, 1.3)
        assert traj.termination_reason == toy.AGENT_STOP and traj.infra_error is None
        check_record(traj)
        assert [t["kind"] for t in traj.turns] == ["policy", "policy"]
        # Each engine call saw exactly the record so far plus the AGENT header.
        for prompt, turn in zip(engine.prompts, traj.turns):
            assert prompt == traj.token_ids[:turn["start"]] and prompt[-1] == toy.AGENT


def test_trajectory_layout_and_turn_records():
    env = toy.ToyEnvironment(num_tasks=1, seed=0)
    ref = env.tasks()[0]
    k, v = ref.task.key, ref.task.value
    traj, _ = play(env, ref, gold_action_ids(ref.task), seed=11)
    K, V = toy.KEY0 + k, toy.VALUE0 + v
    assert traj.token_ids == [toy.TASK, K, toy.END, toy.AGENT, K, toy.END, toy.RESULT, V, toy.END,
                              toy.AGENT, V, toy.END]
    assert traj.loss_mask == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert [(t["start"], t["end"], t["seed"]) for t in traj.turns] == [(4, 5, turn_seed(11, 0, 0)),
                                                                      (10, 11, turn_seed(11, 1, 0))]
    t0 = traj.turns[0]
    assert (t0["engine"], t0["finish_reason"], t0["policy_version"], t0["temperature"]) == ("scripted", "length", 0, 1.0)
    assert traj.sample_index == 3 and traj.num_steps == 3
    assert traj.to_dict() == type(traj).from_json(traj.to_json()).to_dict()


def test_wrong_answer_and_blind_guess():
    env = toy.ToyEnvironment(num_tasks=4, seed=0)
    ref = env.tasks()[0]
    wrong = toy.VALUE0 + (ref.task.value + 1) % toy.NUM_VALUES
    traj, _ = play(env, ref, [[toy.KEY0 + ref.task.key], [wrong]])
    assert (traj.reward, traj.partial_reward, traj.termination_reason) == (0.0, 1.0, toy.AGENT_STOP)
    assert traj.shaped_reward == pytest.approx(0.3)
    # A right answer without the lookup: reward, but no partial credit.
    traj, _ = play(env, ref, [[toy.VALUE0 + ref.task.value]])
    assert (traj.reward, traj.partial_reward, traj.shaped_reward) == (1.0, 0.0, 1.0)
    # Looking up another key returns that key's (different) value.
    other = (ref.task.key + 1) % toy.NUM_KEYS
    traj, _ = play(env, ref, [[toy.KEY0 + other], [toy.VALUE0 + ref.task.table[other]]])
    assert traj.token_ids[7] == toy.VALUE0 + ref.task.table[other] and traj.reward == 0.0


@pytest.mark.parametrize("bad", [[toy.END], [toy.AGENT], [toy.PAD], []])
def test_malformed_action_ends_with_format_error(bad):
    env = toy.ToyEnvironment(num_tasks=2, seed=0)
    traj, _ = play(env, env.tasks()[0], [bad])
    assert (traj.reward, traj.partial_reward, traj.num_format_errors) == (0.0, 0.0, 1)
    assert traj.termination_reason == toy.AGENT_ERROR and traj.turns[0]["kind"] == "malformed"
    assert traj.messages[-1]["malformed"] is True
    check_record(traj)


def test_turn_cap_ends_unanswered():
    env = toy.ToyEnvironment(num_tasks=2, seed=0, max_turns=2)
    ref = env.tasks()[0]
    traj, engine = play(env, ref, [[toy.KEY0 + ref.task.key]] * 2)
    assert (traj.reward, traj.termination_reason, len(traj.turns)) == (0.0, toy.MAX_STEPS, 2)
    assert engine.responses == []  # both turns were played


def test_engine_failures_are_infra_errors():
    env = toy.ToyEnvironment(num_tasks=2, seed=0)
    ref = env.tasks()[0]
    traj, _ = play(env, ref, [[toy.KEY0 + ref.task.key], ConnectionError("server down")])
    assert traj.termination_reason == INFRA_ERROR and traj.reward is None
    assert "ConnectionError: server down" in traj.infra_error and len(traj.turns) == 1

    class Aborting:
        kind, policy_version = "aborting", 5

        def generate(self, input_ids, params):
            return [GenerateResult([], [], "abort", 5, "overloaded")]

    traj = env.play(ref, engine=Aborting(), sampling=SamplingParams(), sample_index=0)
    assert traj.termination_reason == INFRA_ERROR and "aborted" in traj.infra_error
    assert traj.policy_version == 5


def test_splits_are_reproducible_and_disjoint():
    def tasks(**kw):
        return [r.task for r in toy.ToyEnvironment(num_tasks=40, shared_table=False, **kw).tasks()]

    train = tasks(seed=3)
    assert train == tasks(seed=3) and train != tasks(seed=4)
    test = tasks(seed=3, split="test")
    assert not {t.table for t in train} & {t.table for t in test}  # held-out tables, not only tasks
    for t in train + test:
        assert len(set(t.table)) == toy.NUM_KEYS  # distinct values: a wrong lookup misleads
    assert len({t.table for t in train}) > 30  # a table per task
    shared = toy.ToyEnvironment(num_tasks=10, seed=3).tasks()
    assert len({r.task.table for r in shared}) == 1
    with pytest.raises(ValueError, match="unlike the train tables"):  # nothing left to draw
        toy._draw_tasks(np.random.default_rng(0), 1, (0, 1, 2), exclude_tables=frozenset({(0, 1, 2)}))
    with pytest.raises(ValueError, match="split"):
        toy.ToyEnvironment(split="dev")


def test_gold_record_is_the_gold_episode_as_played():
    """toy.gold_record lays a task's gold episode out exactly as play_episode records it (ids and
    mask), so gold SFT trains the very tokens GRPO later samples."""
    env = toy.ToyEnvironment(num_tasks=6, seed=1, shared_table=False)
    for ref in env.tasks():
        traj, _ = play(env, ref, gold_action_ids(ref.task))
        rec = toy.gold_record(ref)
        assert traj.reward == 1.0
        assert (rec["token_ids"], rec["loss_mask"]) == (traj.token_ids, traj.loss_mask) and rec["task"] == ref.key


def test_toy_model_size_matches_the_vocabulary():
    cfg = configs.get_model_config("toy")
    assert cfg.vocab_size == toy.VOCAB_SIZE == len(toy.TOKEN_NAMES)


class Recording:
    """Wraps an engine and keeps every result it returned (thread-safe enough: list.append)."""

    def __init__(self, engine):
        self.engine, self.kind, self.results = engine, engine.kind, []

    @property
    def policy_version(self):
        return self.engine.policy_version

    def generate(self, input_ids, params):
        out = self.engine.generate(input_ids, params)
        self.results.append(((tuple(input_ids[0]), params.seed), out[0]))
        return out


@pytest.fixture(scope="module")
def random_engine():
    from tau2jax.inference.jax_engine import JaxEngine

    cfg = configs.get_model_config("toy")
    engine = JaxEngine(qwen3.init_params(cfg, jax.random.key(0)), cfg, max_seq_len=64, max_batch=8, decode_chunk=1)
    yield engine
    engine.close()


def test_random_model_plays_well_formed_reproducible_episodes(random_engine):
    env = toy.ToyEnvironment(num_tasks=8, seed=0)
    engine = Recording(random_engine)
    trajs = [env.play(ref, engine=engine, sampling=SamplingParams(seed=100 + i), sample_index=i)
             for i, ref in enumerate(env.tasks())]
    by_call = dict(engine.results)  # (prompt, seed) -> result
    for traj in trajs:
        assert traj.infra_error is None and traj.reward in (0.0, 1.0)
        check_record(traj)
        for turn in traj.turns:
            result = by_call[tuple(traj.token_ids[:turn["start"]]), turn["seed"]]
            span = slice(turn["start"], turn["end"])
            assert traj.token_ids[span] == result.output_ids
            assert traj.behaviour_logprobs[span] == result.logprobs
            assert all(np.isfinite(result.logprobs)) and all(lp < 0 for lp in result.logprobs)
            assert turn["engine"] == "builtin"
    again = [env.play(ref, engine=random_engine, sampling=SamplingParams(seed=100 + i), sample_index=i)
             for i, ref in enumerate(env.tasks())]
    assert [t.token_ids for t in again] == [t.token_ids for t in trajs]
    assert [t.behaviour_logprobs for t in again] == [t.behaviour_logprobs for t in trajs]


def test_random_policy_succeeds_sometimes(random_engine):
    """The design requirement: an untrained model already wins some episodes (GRPO's first
    gradient), but far from all. 200 episodes."""
    env = toy.ToyEnvironment(num_tasks=25, seed=0)
    jobs = [(ref, 8 * j + i) for j, ref in enumerate(env.tasks()) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        trajs = list(pool.map(lambda job: env.play(job[0], engine=random_engine, sample_index=job[1] % 8,
                                                   sampling=SamplingParams(seed=job[1])), jobs))
    rewards = np.array([t.reward for t in trajs])
    assert 0.01 <= rewards.mean() <= 0.2, rewards.mean()


def test_context_exhaustion_ends_as_agent_error_not_infra():
    env = toy.ToyEnvironment(num_tasks=2, seed=0)
    traj, _ = play(env, env.tasks()[0], [ContextLengthError("prompt of 70 tokens > context 64")])
    assert (traj.reward, traj.termination_reason, traj.context_exhausted) == (0.0, toy.AGENT_ERROR, True)
    assert traj.infra_error is None and traj.turns == []


def test_token_outside_the_toy_vocabulary_is_a_format_error():
    """An engine whose model has a bigger vocabulary (a wrong model for this game) loses, it does not crash."""
    env = toy.ToyEnvironment(num_tasks=2, seed=0)
    traj, _ = play(env, env.tasks()[0], [[151643]])
    assert (traj.reward, traj.termination_reason, traj.num_format_errors) == (0.0, toy.AGENT_ERROR, 1)
    assert traj.infra_error is None and traj.messages[-1]["content"] == "151643"
