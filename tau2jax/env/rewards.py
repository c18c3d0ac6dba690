"""Scoring: tau2's own evaluator gives the task reward; a partial score shapes it for RL.

    partial = (w_action·action + w_env·env_assertion_frac + w_comm·communicate_frac + w_db·db) / Σw
              - wrong_call_penalty·wrong_calls
    action  = tau2's action_frac (presets), or recall·precision (the precision rule, below)
    shaped  = reward + alpha(domain)·partial

tau2's action check passes an expected call if a matching call appears anywhere, so extra or wrong
calls never lower `action_frac`: in a group where every episode fails, the one that called the most
tools would get the largest advantage. Worse, reads are most of the expected actions (airline 91 of
148, retail 357 of 553), so an agent that looks up everything in reach collects their credit too.

The precision rule (`action_precision`, GRPO's default): `audit_calls` matches the policy's
calls one-to-one against the task's expected assistant actions (a maximum matching, so
adding a call never loses a hit) and sorts the rest by tau2's own tool types
(`tau2.environment.toolkit.ToolType`):
  hits         calls matched to an expected action (`takes_action`: tau2's comparison; a call that
               failed must also give every compared argument; a failing call the gold itself makes
               still counts, e.g. retail task 2 expects a lookup of a product that does not exist);
  wrong        other calls that failed in the environment (unknown tool, bad arguments, missing
               id), and WRITE calls taking no expected action (a repeat of one already taken included);
  extra_reads  successful READ calls taking no expected action (a repeat included);
  neutral      GENERIC / THINK calls taking no expected action: `calculate`, `transfer_to_human_agents`
               (tau2 types both generic; an unwarranted transfer ends the conversation, which costs
               the task reward and the credit of every action not yet taken, so it needs no penalty).
The action term is then recall × precision, with
  recall    = (hits + user actions tau2 found met) / expected actions, capped at 1   (one-to-one,
              so at most tau2's fraction where tau2 matches one call to one action; a failing call
              with no arguments, which tau2's check matches against every expected call of that
              name, earns nothing)
  precision = hits / (hits + wrong + extra_reads)
and `wrong_call_penalty` is subtracted per wrong call (extra reads are not penalised: a read the
gold does not list may still be how an agent finds an id; with no hits they cost nothing). So
adding any call the task does not expect (an unexpected or repeated read, a calculate, a failed
call, a wrong write) never raises partial credit, and lowers it whenever the action term has
credit; only taking an expected action raises it (tests/test_rewards.py checks this on real
airline, retail and telecom tasks through tau2's evaluator).

Presets (`reward.preset`): "cookbook" (the cookbook's text) and "recipe_code" (what its public code
runs: other weights, alpha 0.25 scaled per domain, telecom's own weights); see PRESETS. Both keep
the published, precision-blind partial credit; the config's own fields (GRPO's default) turn the
precision factor and the wrong-call penalty on.

Each fraction is the share of that component's checks met in tau2's RewardInfo; the weights are
renormalised over the components the task actually has (a component without checks is left
out), and partial is 0 when there are none (e.g. an episode that ended at max_steps, which tau2
does not evaluate). DB match is deliberately not a component (it is the task reward already), and
nothing rewards the number of turns (reward hacking).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from tau2jax.config import ConfigError

# tau2 (heavy) is imported inside the functions that use it: importing this module stays cheap


@dataclass(frozen=True)
class RewardConfig:
    alpha: float = 0.3
    w_action: float = 0.7
    w_env_assertion: float = 0.2
    w_communicate: float = 0.1
    w_db: float = 0.0
    action_precision: bool = False  # the precision rule: action term = one-to-one recall × precision
    wrong_call_penalty: float = 0.0  # subtracted from partial per wrong call
    # Per-domain overrides: alpha multipliers, and weights {component: weight} replacing the above.
    domain_alpha: tuple[tuple[str, float], ...] = ()
    domain_weights: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = ()

    @classmethod
    def from_config(cls, reward_section) -> "RewardConfig":
        """From the `reward` section of the run config: a named preset, or the explicit fields."""
        if reward_section.preset:
            if reward_section.preset not in PRESETS:
                raise ConfigError(f"config.reward.preset: {reward_section.preset!r}; known: {sorted(PRESETS)}")
            return PRESETS[reward_section.preset]
        return cls(
            alpha=reward_section.alpha,
            w_action=reward_section.w_action,
            w_env_assertion=reward_section.w_env_assertion,
            w_communicate=reward_section.w_communicate,
            action_precision=reward_section.action_precision,
            wrong_call_penalty=reward_section.wrong_call_penalty,
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


@dataclass(frozen=True)
class CallAudit:
    """The policy's tool calls against the task's expected actions (see the module docstring)."""

    calls: int = 0  # the policy's tool calls
    hits: int = 0  # calls matched one-to-one to an expected assistant action (a failed one must give every compared argument)
    wrong: int = 0  # calls that failed in the environment, or wrote without taking an expected action
    extra_reads: int = 0  # successful reads taking no expected action (repeats included)

    @property
    def precision(self) -> float:
        n = self.hits + self.wrong + self.extra_reads
        return self.hits / n if n else 1.0


def takes_action(action, call, failed: bool = False) -> bool:
    """`call` takes the expected `action`: tau2's `Action.compare_with_tool_call`; a call that
    `failed` in the environment must also give every argument that check compares (tau2 compares
    only the call's own keys when the action has no `compare_args`, so a failing call with no
    arguments would match every expected call of its name). A successful call that leaves out an
    optional argument ran with its default: tau2's comparison, and its DB check, judge it."""
    if not action.compare_with_tool_call(call):
        return False
    keys = action.arguments.keys() if action.compare_args is None else action.compare_args
    return not failed or all(k in call.arguments for k in keys)


def _max_matching(calls: list, expected: list, failed: frozenset = frozenset()) -> set[int]:
    """Indices of `calls` in a maximum one-to-one matching to `expected` (`takes_action`; `failed`:
    the ids of the calls that failed)."""
    owner: dict[int, int] = {}  # expected index -> call index
    edges = [[j for j, a in enumerate(expected) if takes_action(a, c, c.id in failed)] for c in calls]

    def augment(i, seen):
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if j not in owner or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    for i in range(len(calls)):
        augment(i, set())
    return set(owner.values())


def audit_calls(task, messages: list, tools) -> CallAudit:
    """Audit the assistant's tool calls in tau2 `messages` (in order) against `task`'s expected
    assistant actions. `tools`: the domain's agent ToolKit (`Environment.tools`), for tool types."""
    from tau2.data_model.message import AssistantMessage, ToolMessage
    from tau2.environment.toolkit import ToolType

    criteria = task.evaluation_criteria
    expected = [a for a in (criteria.actions or []) if a.requestor == "assistant"] if criteria else []
    failed = {m.id for m in messages if isinstance(m, ToolMessage) and m.error}
    calls = [c for m in messages if isinstance(m, AssistantMessage) and m.is_tool_call() for c in m.tool_calls]
    matched = _max_matching(calls, expected, frozenset(failed))
    hits = len(matched)
    wrong = extra_reads = 0
    for i, call in enumerate(calls):
        if i in matched:
            continue
        if call.id in failed or not tools.has_tool(call.name):
            wrong += 1
            continue
        kind = tools.tool_type(call.name)
        if kind == ToolType.READ:
            extra_reads += 1
        elif kind not in (ToolType.GENERIC, ToolType.THINK):
            wrong += 1
    return CallAudit(calls=len(calls), hits=hits, wrong=wrong, extra_reads=extra_reads)


def partial_reward(reward_info, cfg: RewardConfig = RewardConfig(), domain: str | None = None,
                   calls: CallAudit | None = None) -> float:
    """The partial score of one episode; `calls` (its CallAudit) is what the precision rule and
    the wrong-call penalty read (without it, tau2's fractions alone)."""
    weights = cfg.weights(domain)
    comps = partial_components(reward_info)
    if calls is not None and cfg.action_precision and "action" in comps:
        checks = _as_reward_info(reward_info).action_checks
        user_met = sum(c.action_match for c in checks if c.action.requestor != "assistant")
        comps["action"] = min(1.0, (calls.hits + user_met) / len(checks)) * calls.precision
    total = sum(weights[k] for k in comps)
    score = sum(weights[k] * v for k, v in comps.items()) / total if total > 0 else 0.0
    return score - cfg.wrong_call_penalty * calls.wrong if calls is not None else score


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
