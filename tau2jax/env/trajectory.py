"""One episode's record: what the policy saw and sampled, and how tau2 scored it.

Token arrays (`token_ids`, `loss_mask`, `behaviour_logprobs`) are aligned and cover the whole
conversation as the policy saw it (system prompt first). `loss_mask` is 1 exactly on tokens the
policy sampled in a normal turn that parsed (kind "policy" in `turns`); 0 on prompts, user/tool
turns, forced tokens (the `<|im_end|>` appended after a `</tool_call>` stop, the `\\n` after each
turn), on turns that failed to parse (kind "malformed": never a target to imitate or reinforce)
and on turns regenerated after a format-repair prompt (kind "repair": conditioned on a prompt the
policy never saw in ordinary play, so never trained as if sampled). `behaviour_logprobs` is 0.0
wherever the mask is 0, except on malformed turns, which keep theirs so that a learner may train
them with a non-positive advantage (`rl.batch.malformed_turns`).

`turns` lists every generated span as {"start", "end", "kind", "policy_version", "engine",
"finish_reason", "temperature", "top_p", "top_k", "seed"} (token offsets, end exclusive, covering
the sampled ids only; the sampling settings and seed of that engine call), so a learner can re-mask
any kind it chooses (e.g. length-cut turns) and recompute the behaviour log-probs at the turn's own
temperature (convention: `inference.engine.GenerateResult`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

INFRA_ERROR = "infra_error"  # termination_reason of an episode cut by an engine/user/evaluator failure


def turn_record(start: int, end: int, kind: str, result, sampling, engine_kind: str) -> dict:
    """One entry of `Trajectory.turns`: the sampled span and how it was sampled (an engine's
    GenerateResult, the SamplingParams of that call)."""
    return {"start": start, "end": end, "kind": kind, "policy_version": result.policy_version,
            "engine": engine_kind, "finish_reason": result.finish_reason, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "top_k": sampling.top_k, "seed": sampling.seed}


@dataclass
class Trajectory:
    task_id: str
    domain: str
    prompt_style: str  # "native" | "recipe"
    sample_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    turns: list[dict] = field(default_factory=list)
    # OpenAI-format messages as the policy saw them, system first. Assistant messages the policy
    # did not sample (tau2's greeting, a task's message history) carry "weight": 0 (the OpenAI
    # fine-tuning convention); malformed turns "malformed": true; repair prompts "repair": true.
    # `tools`: what the chat template gets (native style; [] for recipe, whose tools are in the
    # system prompt).
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] = field(default_factory=list)
    # The tau2 view (tau2 Message dicts) that was scored: both sides, user tool calls included.
    tau2_messages: list[dict] = field(default_factory=list)
    termination_reason: str = ""  # tau2 TerminationReason value, or INFRA_ERROR
    reward: float | None = None  # tau2 reward; None when not scored (infra error)
    reward_info: dict | None = None  # tau2 RewardInfo as a dict
    partial_reward: float | None = None
    shaped_reward: float | None = None
    call_audit: dict | None = None  # rewards.CallAudit as a dict: the policy's calls, hits, wrong calls
    policy_version: int = 0  # of the first sampled turn
    num_steps: int = 0  # tau2 steps (messages exchanged), as counted against max_steps
    num_repairs: int = 0  # format-repair prompts issued
    num_format_errors: int = 0  # unparseable agent outputs
    num_tool_errors: int = 0  # tool calls answered with an error (unknown tool, bad args, ...)
    infra_error: str | None = None  # engine / user simulator / evaluator failure; retry, don't score
    context_exhausted: bool = False  # ended because the conversation outgrew the engine's context
    timings: dict = field(default_factory=dict)  # seconds: engine, user, env, evaluate, total

    @property
    def success(self) -> bool:
        return self.reward is not None and self.reward >= 1.0

    @property
    def policy_versions(self) -> list[int]:
        return sorted({t["policy_version"] for t in self.turns})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Trajectory fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Trajectory":
        return cls.from_dict(json.loads(s))

    def sft_record(self) -> dict:
        """The conversation as one SFT JSONL record: {"messages": [...], "tools": [...]}.

        Malformed turns and repair prompts are dropped (the regenerated turn follows its context).
        """
        msgs = [m for m in self.messages if not (m.get("malformed") or m.get("repair"))]
        return {"messages": msgs, "tools": self.tools}
