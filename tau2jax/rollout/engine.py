"""The inference-engine interface, plus two text-scripted engines for tests and gold demos.

Token in, token out: `generate` takes prompt token ids and returns the sampled ids with their
behaviour log-probs; nobody re-tokenizes generated text. Stop tokens are kept in `output_ids`.

- `ScriptedEngine`: replays canned responses (text or ids) in order; for tests.
- `GoldEngine`: plays one tau2 task's expected actions in a prompt style (`gold_script`).

Both encode their text with the real tokenizer, honour `stop_token_ids` (output ends at the first
stop token, inclusive), report log-probs 0.0 and `policy_version` 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]


class ContextLengthError(ValueError):
    """The prompt no longer fits the engine's context window. Not an infrastructure failure: the
    conversation has outgrown the model, so the episode ends (as tau2's agent error) instead of
    being retried."""


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 1024
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()  # for string-matching engines; token engines use stop_token_ids
    seed: int | None = None


@dataclass
class GenerateResult:
    output_ids: list[int]
    logprobs: list[float]  # of each sampled token under the distribution it was sampled from
    finish_reason: FinishReason  # "abort": the engine gave up (infrastructure failure)
    policy_version: int
    stop_reason: str | int | None = None  # the stop token id / string that ended generation


@runtime_checkable
class Engine(Protocol):
    policy_version: int

    def generate(
        self, input_ids: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerateResult]: ...


def per_prompt(params: SamplingParams | list[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} SamplingParams for {n} prompts")
    return list(params)


def _finish(ids: list[int], params: SamplingParams, policy_version: int) -> GenerateResult:
    """Cut canned ids the way a sampler would: at the first stop token, else at max_new_tokens.

    Canned ids without a stop token count as cut by the length limit ("length").
    """
    stops = set(params.stop_token_ids)
    for i, tok in enumerate(ids[: params.max_new_tokens]):
        if tok in stops:
            out = ids[: i + 1]
            return GenerateResult(out, [0.0] * len(out), "stop", policy_version, tok)
    out = ids[: params.max_new_tokens]
    return GenerateResult(out, [0.0] * len(out), "length", policy_version, None)


class ScriptedEngine:
    """Returns canned responses in order, one per prompt. For tests.

    A response is text (encoded with the tokenizer), a list of token ids, or an Exception instance
    (raised, to exercise infrastructure-error handling). `prompts` records every prompt received.
    """

    def __init__(self, tokenizer, responses: Sequence[str | list[int] | BaseException], policy_version: int = 0):
        self.tokenizer = tokenizer
        self.responses = list(responses)
        self.policy_version = policy_version
        self.prompts: list[list[int]] = []

    def generate(self, input_ids, params):
        results = []
        for prompt, p in zip(input_ids, per_prompt(params, len(input_ids))):
            self.prompts.append(list(prompt))
            if not self.responses:
                raise RuntimeError("ScriptedEngine ran out of responses")
            r = self.responses.pop(0)
            if isinstance(r, BaseException):
                raise r
            ids = self.tokenizer.encode(r) if isinstance(r, str) else list(r)
            results.append(_finish(ids, p, self.policy_version))
        return results


def user_action_request(name: str, arguments: dict) -> str:
    """How the gold agent asks the user to act on their own device (telecom dual control)."""
    args = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"Could you please run `{name}`{f' with {args}' if args else ''} on your phone and tell me the result?"


def gold_final_message(task) -> str:
    """The gold agent's last message: it states every `communicate_info` string verbatim."""
    ec = task.evaluation_criteria
    info = [s.strip() for s in (ec.communicate_info or [])] if ec is not None else []
    if ec is not None and not ec.actions:  # nothing to do: these tasks test that the agent declines
        head = "I have reviewed your request, but I'm not able to make that change under our policy."
    else:
        head = "Your request has been taken care of."
    return head + (f" For your information: {'; '.join(info)}." if info else "")


def gold_script(task) -> list:
    """The gold agent's turns for a task: each expected action in order (an agent action as a tool
    call, a user action as a request that the user run it), then `gold_final_message`."""
    from tau2jax.rollout.prompts import AgentAction

    ec = task.evaluation_criteria
    turns = []
    for a in (ec.actions or []) if ec is not None else []:
        if a.requestor == "assistant":
            turns.append(AgentAction.call(a.name, a.arguments))
        else:
            turns.append(AgentAction.say(user_action_request(a.name, a.arguments)))
    turns.append(AgentAction.say(gold_final_message(task)))
    return turns


class GoldEngine:
    """Plays a task's gold agent turns (`gold_script`) in the prompt style's exact text.

    Build one per task. It keeps no per-episode state: the turn to play is the number of assistant
    turns in the prompt minus those the episode starts with (tau2's greeting, or the task's
    message history), so retries and parallel samples of the same task need no reset. Past the
    script it plays the style's closing action (recipe: `done`).
    """

    def __init__(self, task, style, chat, policy_version: int = 0):
        from tau2.data_model.message import AssistantMessage

        from tau2jax.rollout.tau2_env import initial_messages

        tok = chat.tokenizer
        self.policy_version = policy_version

        def ids(action):
            return tok.encode(style.action_text(action)) + [tok.im_end_id]

        self._turns = [ids(a) for a in gold_script(task)]
        self._closing = ids(style.closing_action())
        # `<|im_start|>assistant` opens every assistant turn, sampled or not
        self._opener = list(chat.generation_prompt())[:2]
        self._n_fixed = sum(isinstance(m, AssistantMessage) for m in initial_messages(task))

    def _count_assistant_turns(self, ids: list[int]) -> int:
        a, b = self._opener
        return sum(1 for x, y in zip(ids, ids[1:]) if x == a and y == b)

    def generate(self, input_ids, params):
        results = []
        for prompt, p in zip(input_ids, per_prompt(params, len(input_ids))):
            # the prompt ends with the generation header, which is not a finished turn
            k = self._count_assistant_turns(prompt) - 1 - self._n_fixed
            ids = self._turns[k] if 0 <= k < len(self._turns) else self._closing
            results.append(_finish(ids, p, self.policy_version))
        return results
