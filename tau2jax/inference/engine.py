"""The inference-engine interface, plus a text-scripted engine for tests.

Token in, token out: `generate` takes prompt token ids and returns the sampled ids with their
behaviour log-probs; nobody re-tokenizes generated text. Stop tokens are kept in `output_ids`.

- `ScriptedEngine`: replays canned responses (text or ids) in order; for tests.

It encodes its text with the real tokenizer, honours `stop_token_ids` (output ends at the first
stop token, inclusive), reports log-probs 0.0 and `policy_version` 0.
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
    # Requests with one affinity key go to one server of a pool (`inference.server_pool`), so an
    # episode's turns reuse that server's prefix cache; the episode runner sets it per episode.
    affinity: str | None = None


@dataclass
class GenerateResult:
    """One prompt's completion.

    The behaviour log-prob convention (every engine, and what the learner recomputes):
    `logprobs[i]` = log_softmax(logits / T)[token i] at the request's temperature T, *before*
    top-k / top-p filtering (SGLang's `output_token_logprobs`); for T = 0, log_softmax(logits).
    `sampled_logprobs`, where the engine knows them, are under the filtered distribution the token
    was actually drawn from (equal to `logprobs` when no filter is on).
    """

    output_ids: list[int]
    logprobs: list[float]  # behaviour log-probs, convention above
    finish_reason: FinishReason  # "abort": the engine gave up (infrastructure failure)
    policy_version: int
    stop_reason: str | int | None = None  # the stop token id / string that ended generation
    sampled_logprobs: list[float] | None = None


@runtime_checkable
class Engine(Protocol):
    """What rollouts and the learner see of an engine (as tunix's rollout contract: generate and
    update the params); nothing outside `inference/` asks which engine it is.

    `kind` names the engine in trajectories ("builtin", "sglang", "scripted", "gold");
    `policy_version` is the version its results carry; `takes_published_weights` says what
    `update_weights` takes: a published HF checkpoint directory (an engine in another process,
    SGLang: `weight_sync.publish` writes it) or the params pytree (an engine in this process).
    """

    kind: str
    policy_version: int
    takes_published_weights: bool

    def generate(
        self, input_ids: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerateResult]: ...

    def update_weights(self, weights, version: int) -> None:
        """Serve `weights` (params pytree, or a published directory) as policy `version` from now on."""

    def served_version(self) -> int | None:
        """The version served now: -1 when it is none of ours (a restarted server), None when the
        engine cannot be asked (down)."""

    def identity(self) -> dict:
        """Which policy it serves, for resume checks: {"policy_version", ...} (a server adds where
        its weights came from)."""

    def close(self) -> None: ...


class FixedEngine:
    """Base of engines that play fixed responses (scripted, gold, do-nothing): no weights to update."""

    kind = "fixed"
    policy_version = 0
    takes_published_weights = False

    def update_weights(self, weights, version: int) -> None:
        raise TypeError(f"the {self.kind} engine plays fixed responses: it has no weights to update")

    def served_version(self) -> int:
        return self.policy_version

    def identity(self) -> dict:
        return {"policy_version": self.policy_version}

    def close(self) -> None:
        pass


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


class ScriptedEngine(FixedEngine):
    """Returns canned responses in order, one per prompt. For tests.

    A response is text (encoded with the tokenizer), a list of token ids, or an Exception instance
    (raised, to exercise infrastructure-error handling). `prompts` records every prompt received.
    """

    kind = "scripted"

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
