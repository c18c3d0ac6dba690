"""The inference-engine interface, plus a text-scripted engine for tests.

Token in, token out: `generate` takes prompt token ids and returns the sampled ids with their
behaviour log-probs; nobody re-tokenizes generated text. Stop tokens are kept in `output_ids`.

- `ScriptedEngine`: replays canned responses (text or ids) in order; for tests.

It encodes its text with the real tokenizer, honours `stop_token_ids` (output ends at the first
stop token, inclusive), reports log-probs 0.0 and `policy_version` 0.
"""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Literal, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "length", "abort"]
# The policy version of a turn whose server could not name its weights (SGLang's "default" before
# the first update, i.e. a restarted server): never trained, the engine is re-synced first.
UNKNOWN_VERSION = -1


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
    `policy_version` is the version its results carry; `synced_version` the last version this
    process put into it (None: it serves weights it loaded itself, e.g. a server's start
    checkpoint); `default_tis_cap` the token-TIS cap the RL loss uses against it unless configured
    (0 = off: its log-probs are the learner's own numerics; SGLang's kernels differ).

    How weights reach it is the engine's business (`weight_sync.Pusher` drives the two halves):
    `stage_weights(params)` runs on the learner thread before the next step donates `params` and
    returns the engine's snapshot (the built-in engine: its own on-device copy; a server: the bf16
    HF tensors, cast on the devices; a multi-process run's host gather happens here);
    `swap_weights(staged, version)` runs on a background thread and returns the engine's pause in
    seconds (the built-in engine: a reference swap under its lock; a server: publish to disk, then
    the server loads it; on processes other than 0 it waits until process 0 has published).
    """

    kind: str
    location: str  # where it runs, for messages ("this process", a server URL)
    policy_version: int
    synced_version: int | None
    default_tis_cap: float

    def generate(
        self, input_ids: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[GenerateResult]: ...

    def stage_weights(self, params):
        """Snapshot of the learner's `params` for `swap_weights` (learner thread, before donation)."""

    def swap_weights(self, staged, version: int) -> float:
        """Serve `staged` as policy `version` from now on -> the engine's pause in seconds."""

    def update_weights(self, weights, version: int) -> None:
        """Serve `weights` (params pytree, or a published directory) as policy `version` from now on."""

    def load_weights(self, path: str, version: int) -> None:
        """Serve the published HF checkpoint at `path` (`weight_sync.publish`) as policy `version`."""

    def reload(self, version: int) -> None:
        """Serve again the already pushed `version` (a server that restarted without it)."""

    def served_version(self) -> int | None:
        """The version served now: UNKNOWN_VERSION when it is none of ours (a restarted server), None
        when the engine cannot be asked (down)."""

    def identity(self) -> dict:
        """Which policy it serves, for resume checks: {"policy_version", ...} (a server adds where
        its weights came from)."""

    def close(self) -> None: ...


class FixedEngine:
    """Base of engines that play fixed responses (scripted, gold, do-nothing): no weights to update."""

    kind = "fixed"
    location = "this process"
    policy_version = 0
    synced_version = 0
    default_tis_cap = 0.0

    def _no_weights(self, *_):
        raise TypeError(f"the {self.kind} engine plays fixed responses: it has no weights to update")

    stage_weights = swap_weights = update_weights = load_weights = reload = _no_weights

    def served_version(self) -> int:
        return self.policy_version

    def identity(self) -> dict:
        return {"policy_version": self.policy_version}

    def close(self) -> None:
        pass


def settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Completes a request's future from the worker that ran it, unless its caller gave up first (a
    /health probe past its wait, a client gone): that answer is dropped, where `set_result` would
    raise in the one worker thread that serves every other request."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
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
