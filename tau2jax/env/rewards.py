"""Scoring: tau2's own evaluator gives the task reward; a partial score shapes it for RL.

    partial = (w_action·action_frac + w_env·env_assertion_frac + w_comm·communicate_frac + w_db·db) / Σw
    shaped  = reward + alpha(domain)·partial

Presets (`reward.preset`): "cookbook" (the cookbook's text) and "recipe_code" (what its public code
runs: other weights, alpha 0.25 scaled per domain, telecom's own weights); see PRESETS.

Each fraction is the share of that component's checks met in tau2's RewardInfo; the weights are
renormalised over the components the task actually has (a component without checks is left
out), and partial is 0 when there are none (e.g. an episode that ended at max_steps, which tau2
does not evaluate). DB match is deliberately not a component (it is the task reward already), and
nothing rewards the number of turns (reward hacking).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class RewardConfig:
    alpha: float = 0.3
    w_action: float = 0.7
    w_env_assertion: float = 0.2
    w_communicate: float = 0.1
    w_db: float = 0.0
    # Per-domain overrides: alpha multipliers, and weights {component: weight} replacing the above.
    domain_alpha: tuple[tuple[str, float], ...] = ()
    domain_weights: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    @classmethod
    def from_config(cls, reward_section) -> "RewardConfig":
        """From the `reward` section of the run config: a named preset, or the explicit fields."""
        if reward_section.preset:
            if reward_section.preset not in PRESETS:
                from tau2jax.config import ConfigError

                raise ConfigError(f"config.reward.preset: {reward_section.preset!r}; known: {sorted(PRESETS)}")
            return PRESETS[reward_section.preset]
        return cls(
            alpha=reward_section.alpha,
            w_action=reward_section.w_action,
            w_env_assertion=reward_section.w_env_assertion,
            w_communicate=reward_section.w_communicate,
        )

    def weights(self, domain: str | None = None) -> dict[str, float]:
        override = dict(self.domain_weights).get(domain)
        if override is not None:
            return dict(override)
        return {"action": self.w_action, "env_assertion": self.w_env_assertion,
                "communicate": self.w_communicate, "db": self.w_db}

    def alpha_for(self, domain: str | None = None) -> float:
        return self.alpha * dict(self.domain_alpha).get(domain, 1.0)


PRESETS = {
    # The cookbook's text: 0.7 action / 0.2 env assertions / 0.1 communicate, alpha 0.3.
    "cookbook": RewardConfig(),
    # What the recipe's public code runs (recipe-facts.md): renormalised 0.5 / 0.35 / 0.15 / db 0,
    # alpha 0.25 scaled per domain (retail ×0.8, telecom ×1.6), telecom's own weights.
    "recipe_code": RewardConfig(
        alpha=0.25, w_action=0.5, w_env_assertion=0.35, w_communicate=0.15, w_db=0.0,
        domain_alpha=(("retail", 0.8), ("airline", 1.0), ("telecom", 1.6)),
        domain_weights=(("telecom", (("action", 0.35), ("communicate", 0.35), ("env_assertion", 0.30), ("db", 0.0))),),
    ),
}


def _as_reward_info(info):
    from tau2.data_model.simulation import RewardInfo

    return RewardInfo.model_validate(info) if isinstance(info, dict) else info


def partial_components(reward_info) -> dict[str, float]:
    """{component: fraction of its checks met} for the components present in a RewardInfo (or its dict)."""
    info = _as_reward_info(reward_info)
    out = {}
    if info.action_checks:
        out["action"] = sum(c.action_match for c in info.action_checks) / len(info.action_checks)
    if info.env_assertions:
        out["env_assertion"] = sum(c.met for c in info.env_assertions) / len(info.env_assertions)
    if info.communicate_checks:
        out["communicate"] = sum(c.met for c in info.communicate_checks) / len(info.communicate_checks)
    if info.db_check is not None:
        out["db"] = float(info.db_check.db_match)
    return out


def partial_reward(reward_info, cfg: RewardConfig = RewardConfig(), domain: str | None = None) -> float:
    weights = cfg.weights(domain)
    comps = partial_components(reward_info)
    total = sum(weights[k] for k in comps)
    if total <= 0:
        return 0.0
    return sum(weights[k] * v for k, v in comps.items()) / total


def shaped_reward(reward: float, partial: float, cfg: RewardConfig = RewardConfig(), domain: str | None = None) -> float:
    return reward + cfg.alpha_for(domain) * partial


def evaluate(task, domain: str, messages: list, termination_reason: str, duration: float = 0.0):
    """tau2's verdict on a conversation: build its SimulationRun from our tau2 messages and call
    `tau2.evaluator.evaluator.evaluate_simulation` (all criteria, dual control). -> RewardInfo.

    `messages` are tau2 Message objects (history first); each ToolCall must be followed by the
    ToolMessage with its id, since the evaluator replays every call in a fresh environment.
    """
    from tau2.data_model.simulation import SimulationRun, TerminationReason
    from tau2.evaluator.evaluator import EvaluationType, evaluate_simulation
    from tau2.utils.utils import get_now

    msgs = [m.model_copy() for m in messages]
    for i, m in enumerate(msgs):
        m.turn_idx = i
    now = get_now()
    sim = SimulationRun(
        id=str(uuid.uuid4()),
        task_id=task.id,
        start_time=now,
        end_time=now,
        duration=duration,
        termination_reason=TerminationReason(termination_reason),
        messages=msgs,
    )
    try:
        return evaluate_simulation(sim, task, EvaluationType.ALL, solo_mode=False, domain=domain)
    except Exception as e:
        if not _raised_in_env_assertion(e):
            raise  # anything else is an evaluator/infrastructure fault, recorded as such upstream
        # An env assertion queried state the agent never created (e.g. mock's assert_task_status on
        # a task it did not make): tau2 raises instead of failing the assertion. That is the
        # model's failure, so it scores 0 rather than counting as an infrastructure error.
        from tau2.data_model.simulation import RewardInfo

        return RewardInfo(reward=0.0, info={"env_assertion_error": f"{type(e).__name__}: {e}"})


def _raised_in_env_assertion(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "run_env_assertion":
            return True
        tb = tb.tb_next
    return False
