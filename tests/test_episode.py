"""The episode runner with canned engine outputs (ScriptedEngine) on the mock domain: token-in /
token-out bookkeeping, forced tokens, malformed calls and repairs, limits, infrastructure errors."""

import dataclasses
import json

import pytest

from tau2jax.env import tau2_env  # noqa: F401  (first: quiets tau2's import-time logging)

from tau2jax.data.chat import ChatFormat
from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.env import prompts
from tau2jax.env.gold import GoldEngine
from tau2jax.inference.engine import GenerateResult, SamplingParams, ScriptedEngine
from tau2jax.env.episode import run_episode
from tau2jax.env.scripted_user import ScriptedUser
from tau2jax.env.trajectory import INFRA_ERROR, Trajectory

CREATE = {"user_id": "user_1", "title": "Important Meeting"}


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(load_tokenizer())


@pytest.fixture(scope="module")
def task():
    return next(t for t in tau2_env.load_tasks("mock") if t.id == "create_task_1")


def call(name, args):
    return prompts.tool_call_text(name, args)  # stops at </tool_call>: no <|im_end|>


def play(task, chat, responses, style="native", domain="mock", **kw):
    engine = ScriptedEngine(chat.tokenizer, responses)
    traj = run_episode(task, domain, engine=engine, user=ScriptedUser(task), chat=chat, style=style,
                       sampling=SamplingParams(max_new_tokens=512), **kw)
    return traj, engine


def sampled_spans(traj):
    return [(t["start"], t["end"]) for t in traj.turns]


def test_token_in_token_out(chat, task):
    traj, engine = play(task, chat, [call("create_task", CREATE), "The task was created.<|im_end|>"])
    assert traj.reward == 1.0 and traj.termination_reason == "user_stop" and traj.infra_error is None
    ids, mask = traj.token_ids, traj.loss_mask
    assert len(ids) == len(mask) == len(traj.behaviour_logprobs)
    # every prompt the engine saw is a prefix of the final stream: nothing was re-tokenized
    for prompt in engine.prompts:
        assert ids[: len(prompt)] == prompt
    # mask 1 exactly on the sampled ids
    spans = sampled_spans(traj)
    assert [k["kind"] for k in traj.turns] == ["policy", "policy"]
    assert sum(mask) == sum(e - s for s, e in spans)
    assert all(mask[i] == 1 for s, e in spans for i in range(s, e))
    # the tool-call turn stopped at </tool_call>: the runner forced <|im_end|> (mask 0) then "\n"
    s, e = spans[0]
    tok = chat.tokenizer
    assert ids[e - 1] == tok.tool_call_end_id and ids[e] == tok.im_end_id and mask[e] == 0
    assert ids[e + 1 : e + 2] == chat.turn_end()
    # the text turn's own <|im_end|> was sampled (mask 1)
    s, e = spans[1]
    assert ids[e - 1] == tok.im_end_id and mask[e - 1] == 1
    # canonical outputs: the stream is exactly the chat template's rendering of the messages
    assert chat.render(traj.messages, traj.tools)[0] == ids
    assert traj.messages[1] == {"role": "assistant", "content": "Hi! How can I help you today?", "weight": 0}
    assert traj.messages[3]["tool_calls"][0]["function"] == {"name": "create_task", "arguments": CREATE}
    assert traj.messages[4]["role"] == "tool" and traj.messages[4]["tool_call_id"] == traj.messages[3]["tool_calls"][0]["id"]
    # the scored tau2 view: greeting, user, call, result, text, user stop
    roles = [m["role"] for m in traj.tau2_messages]
    assert roles == ["assistant", "user", "assistant", "tool", "assistant", "user"]
    assert traj.tau2_messages[2]["tool_calls"][0]["id"] == traj.tau2_messages[3]["id"]


def test_malformed_unknown_and_wrong_args_are_error_turns(chat, task):
    traj, _ = play(task, chat, [
        '<tool_call>\n{"name": "create_task", "arguments": {"user_id": }\n</tool_call>',  # bad JSON
        call("delete_all_tasks", {}),  # the regenerated turn: an unknown tool
        call("create_task", {"user": "user_1"}),  # wrong arguments
        call("create_task", CREATE),
        "Created it for you.<|im_end|>",
    ])
    assert traj.reward == 1.0  # the episode went on and the errors changed nothing
    assert (traj.num_format_errors, traj.num_repairs, traj.num_tool_errors) == (1, 1, 2)
    assert [t["kind"] for t in traj.turns] == ["malformed", "repair", "policy", "policy", "policy"]
    # neither the malformed turn nor the regenerated one is a training target
    (ms, me), (rs, re_) = sampled_spans(traj)[:2]
    assert all(traj.loss_mask[i] == 0 for i in range(ms, me))
    assert all(traj.loss_mask[i] == 0 and traj.behaviour_logprobs[i] == 0.0 for i in range(rs, re_))
    flagged = [m for m in traj.messages if m.get("malformed") or m.get("repair")]
    assert [bool(m.get("malformed")) for m in flagged] == [True, False]
    assert flagged[1]["role"] == "user" and flagged[1]["content"].startswith("FORMAT ERROR (tool call 0: invalid JSON")
    # tau2's own error turns for the unknown tool and the bad arguments
    errors = [m for m in traj.tau2_messages if m["role"] == "tool" and m["error"]]
    assert errors[0]["content"] == "Error: Tool 'delete_all_tasks' not found."
    assert "unexpected keyword argument 'user'" in errors[1]["content"]
    # the SFT view drops the malformed turn and the repair prompt
    assert not any(m.get("malformed") or m.get("repair") for m in traj.sft_record()["messages"])


@pytest.mark.parametrize("advantage", [1.0, -1.0])
def test_a_malformed_turn_is_never_reinforced_when_its_repair_wins(chat, task, advantage):
    from tau2jax.rl.batch import BatchConfig, build_batch

    traj, _ = play(task, chat, ["<tool_call>{oops}</tool_call>", call("create_task", CREATE), "Created.<|im_end|>"],
                   max_repairs=1)
    assert traj.reward == 1.0 and [t["kind"] for t in traj.turns] == ["malformed", "repair", "policy"]
    spans = {t["kind"]: range(t["start"], t["end"]) for t in traj.turns}

    def trained(mode):  # {kind: (targets trained, their advantages)} of the packed row
        batch, _ = build_batch([(traj, advantage, 0)], BatchConfig(max_len=4096, malformed_turns=mode))
        return {k: ({int(batch["loss_mask"][0, i - 1]) for i in r}, {float(batch["advantages"][0, i - 1]) for i in r})
                for k, r in spans.items()}

    masked = trained("mask")
    assert masked["malformed"] == masked["repair"] == ({0}, {0.0})
    assert masked["policy"] == ({1}, {advantage})
    # "nonpositive": the malformed turn is pushed down by a losing episode, never up by a winning one
    pushed = trained("nonpositive")
    assert pushed["malformed"] == (({1}, {advantage}) if advantage < 0 else ({0}, {0.0}))
    assert pushed["repair"] == ({0}, {0.0}) and pushed["policy"] == ({1}, {advantage})


def test_recipe_style_format_rules(chat, task):
    traj, _ = play(task, chat, [
        "Sure! " + call("create_task", CREATE),  # text around the call: malformed in the recipe style
        call("create_task", CREATE),
        call("respond", {"content": ""}),  # respond needs content
        call("respond", {"content": "Done, the task is created. Anything else?"}),
        call("done", {}),  # after the user's answer
    ], style="recipe", max_repairs=1)
    assert traj.reward == 1.0 and traj.termination_reason == "agent_stop"
    assert (traj.num_format_errors, traj.num_repairs) == (2, 2)
    assert traj.tools == [] and "## Available Tools" in traj.messages[0]["content"]
    results = [m for m in traj.messages if m["role"] == "user" and m["content"].startswith("Tool result for ")]
    assert results[0]["content"].startswith("Tool result for create_task(user_id='user_1', title='Important Meeting'):\n")
    assert (traj.tau2_messages[-1]["role"], traj.tau2_messages[-1]["content"]) == ("assistant", "###STOP###")


def test_failed_repair_ends_as_agent_error(chat, task):
    traj, _ = play(task, chat, ["<tool_call>{oops}</tool_call>", "<tool_call>{still bad"], max_repairs=1)
    assert traj.termination_reason == "agent_error" and traj.reward == 0.0 and traj.infra_error is None
    assert [t["kind"] for t in traj.turns] == ["malformed", "repair"]


def test_length_cut_gets_a_forced_im_end(chat, task):
    traj, _ = play(task, chat, ["I will create the task now", call("create_task", CREATE), "Done.<|im_end|>"])
    e = traj.turns[0]["end"]
    assert traj.token_ids[e] == chat.tokenizer.im_end_id and traj.loss_mask[e] == 0
    assert traj.messages[3] == {"role": "assistant", "content": "I will create the task now"}


def test_limits(chat, task):
    traj, _ = play(task, chat, [call("get_users", {})] * 10, max_steps=6)
    assert traj.termination_reason == "max_steps" and traj.reward == 0.0 and traj.partial_reward == 0.0
    assert traj.num_steps >= 6  # as in tau2, a step bound for the environment is never the last
    traj, _ = play(task, chat, [call("nope", {})] * 10, max_errors=3)
    assert traj.termination_reason == "too_many_errors" and traj.num_tool_errors == 3


class _AbortEngine:
    policy_version = 7

    def generate(self, input_ids, params):
        return [GenerateResult([], [], "abort", 7)]


class _BrokenUser(ScriptedUser):
    def generate_next_message(self, message, state):
        raise ConnectionError("user simulator unreachable")


def test_infrastructure_errors_are_recorded_not_scored(chat, task):
    cases = [
        (ScriptedEngine(chat.tokenizer, [TimeoutError("engine timed out")]), ScriptedUser(task), "engine: TimeoutError: engine timed out"),
        (_AbortEngine(), ScriptedUser(task), "engine: generation aborted"),
        (ScriptedEngine(chat.tokenizer, []), _BrokenUser(task), "user: ConnectionError: user simulator unreachable"),
    ]
    for engine, user, error in cases:
        traj = run_episode(task, "mock", engine=engine, user=user, chat=chat, style="native", sampling=SamplingParams())
        assert traj.termination_reason == INFRA_ERROR and traj.infra_error.startswith(error)
        assert traj.reward is None and traj.reward_info is None and traj.shaped_reward is None and not traj.success


def test_trajectory_json_round_trip(chat, task):
    traj, _ = play(task, chat, [call("create_task", CREATE), "Created.<|im_end|>"])
    back = Trajectory.from_json(traj.to_json())
    assert back == traj
    assert json.loads(back.to_json()) == json.loads(traj.to_json())
    with pytest.raises(ValueError, match="unknown Trajectory fields"):
        Trajectory.from_dict({**dataclasses.asdict(traj), "bogus": 1})


def test_telecom_dual_control(chat):
    task = next(t for t in tau2_env.load_tasks("telecom", "train")
                if any(a.requestor == "user" for a in t.evaluation_criteria.actions or []))
    # the agent cannot run the user's device tools itself
    user_action = next(a for a in task.evaluation_criteria.actions if a.requestor == "user")
    traj, _ = play(task, chat, [call(user_action.name, user_action.arguments), "Bye.<|im_end|>"], domain="telecom")
    assert traj.num_tool_errors == 1
    assert traj.tau2_messages[3]["content"] == f"Error: Tool '{user_action.name}' not found."
    # asked in words, the user runs it on the user side; the agent never sees the user's tool traffic
    traj = run_episode(task, "telecom", engine=GoldEngine(task, prompts.get_style("native"), chat),
                       user=ScriptedUser(task), chat=chat, style="native", sampling=SamplingParams())
    assert traj.reward == 1.0
    user_calls = [c for m in traj.tau2_messages if m["role"] == "user" for c in m.get("tool_calls") or []]
    assert [c["name"] for c in user_calls] == [a.name for a in task.evaluation_criteria.actions if a.requestor == "user"]
    assert all(c["requestor"] == "user" for c in user_calls)
    user_results = [m for m in traj.tau2_messages if m["role"] == "tool" and m["requestor"] == "user"]
    assert len(user_results) == len(user_calls)
    seen = json.dumps(traj.messages)
    assert all(c["id"] not in seen for c in user_calls) and user_action.name in seen  # asked, not seen run


def test_data_dir_override(tmp_path, monkeypatch):
    wheel = tau2_env.init_tau2().resolve()
    copy = tmp_path / "data"
    (copy / "tau2" / "domains").mkdir(parents=True)
    for d in ("airline", "retail", "telecom"):
        (copy / "tau2" / "domains" / d).symlink_to(wheel / "tau2" / "domains" / d)
    (copy / "tau2" / "user_simulator").symlink_to(wheel / "tau2" / "user_simulator")
    mock = copy / "tau2" / "domains" / "mock"
    mock.mkdir()
    for f in (wheel / "tau2" / "domains" / "mock").iterdir():
        (mock / f.name).symlink_to(f)
    (mock / "policy.md").unlink()
    (mock / "policy.md").write_text("# Patched mock policy\n")
    try:
        monkeypatch.setenv(tau2_env.DATA_DIR_ENV, str(copy))
        assert tau2_env.init_tau2() == copy.resolve()
        assert tau2_env.domain_spec("mock").policy == "# Patched mock policy\n"
        assert tau2_env.make_environment("mock").get_policy() == "# Patched mock policy\n"
        assert tau2_env.init_tau2(str(copy / "tau2")) == copy.resolve()  # the `tau2` child works too
        with pytest.raises(FileNotFoundError, match="neither tau2/domains/ nor domains/"):
            tau2_env.resolve_data_root(tmp_path)
    finally:
        monkeypatch.delenv(tau2_env.DATA_DIR_ENV)
        assert tau2_env.init_tau2(str(wheel)).resolve() == wheel
    assert tau2_env.domain_spec("mock").policy != "# Patched mock policy\n"


def test_conversation_outgrowing_the_context_ends_the_episode_and_is_scored(chat, task):
    """A prompt the engine cannot fit is the episode's end (tau2 agent error, reward 0), not an
    infrastructure failure to retry."""
    from tau2jax.inference.engine import ContextLengthError

    class TinyContextEngine:
        policy_version = 0

        def generate(self, input_ids, params):
            raise ContextLengthError(f"prompt of {len(input_ids[0])} tokens is longer than the model's context length")

    traj = run_episode(task, "mock", engine=TinyContextEngine(), user=ScriptedUser(task), chat=chat,
                       style="native", sampling=SamplingParams(temperature=0.0))
    assert traj.infra_error is None
    assert traj.context_exhausted
    assert traj.termination_reason == "agent_error"
    assert traj.reward == 0.0


class _RecordingEngine(ScriptedEngine):
    """A ScriptedEngine that also records the SamplingParams of every call."""

    def __init__(self, tokenizer, responses):
        super().__init__(tokenizer, responses)
        self.params: list[SamplingParams] = []

    def generate(self, input_ids, params):
        self.params.append(params)
        return super().generate(input_ids, params)


def _seeded_play(task, chat, seed):
    responses = ["<tool_call>oops", call("create_task", CREATE), "The task was created.<|im_end|>"]
    engine = _RecordingEngine(chat.tokenizer, responses)
    traj = run_episode(task, "mock", engine=engine, user=ScriptedUser(task), chat=chat, style="native",
                       sampling=SamplingParams(temperature=0.7, top_k=20, max_new_tokens=512, seed=seed))
    return traj, [p.seed for p in engine.params]


def test_each_turn_and_repair_gets_its_own_reproducible_seed(chat, task):
    """One episode seed -> a different sampling seed per engine call (turn 0, its repair, turn 1),
    the same ones again for the same episode seed, others for another."""
    traj, seeds = _seeded_play(task, chat, seed=1234)
    assert [t["kind"] for t in traj.turns] == ["malformed", "repair", "policy"]
    assert len(seeds) == 3 and len(set(seeds)) == 3 and 1234 not in seeds
    assert [t["seed"] for t in traj.turns] == seeds
    assert _seeded_play(task, chat, seed=1234)[1] == seeds
    assert not set(_seeded_play(task, chat, seed=1235)[1]) & set(seeds)


def test_turns_record_sampling_engine_and_finish(chat, task):
    traj, _ = _seeded_play(task, chat, seed=7)
    for t in traj.turns:
        assert t["engine"] == "scripted" and t["temperature"] == 0.7 and t["top_k"] == 20 and t["top_p"] == 1.0
        assert t["policy_version"] == 0
    assert [t["finish_reason"] for t in traj.turns] == ["length", "stop", "stop"]
    # the record survives JSON
    assert Trajectory.from_json(traj.to_json()).turns == traj.turns


def test_endoftext_closes_a_turn_without_a_forced_im_end(chat, task):
    """`<|endoftext|>` is Qwen3's other EOS: the turn ends there, no `<|im_end|>` is forced after it."""
    tok = chat.tokenizer
    text = tok.encode("The task was created.") + [tok.pad_id]
    traj, _ = play(task, chat, [call("create_task", CREATE), text])
    s, e = sampled_spans(traj)[1]
    assert traj.token_ids[e - 1] == tok.pad_id and traj.loss_mask[e - 1] == 1
    assert traj.token_ids[e : e + len(chat.turn_end())] == chat.turn_end()
    assert traj.messages[-1]["content"] == "The task was created."
