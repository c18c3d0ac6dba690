"""Bounded staleness: how far behind the learner a trajectory's policy is, and what to do about it.

The rollout workers bound staleness by construction (a group for learner step s starts only once
the engine serves version >= s - max_staleness, `rollout_workers`); this check, run when a batch is
formed, is the explicit guarantee. A trajectory's staleness is the learner version minus the OLDEST
policy version among its sampled turns: an episode in flight across a weight update continues on
the new weights and carries per-turn versions, and its oldest turn is what bounds the mismatch.
"""

from __future__ import annotations

from collections import Counter

from tau2jax.env.trajectory import Trajectory
from tau2jax.inference.engine import UNKNOWN_VERSION

POLICIES = ("drop", "correct")
# "correct" without an explicit rl.loss.tis_cap: truncated IS capped at 2.0 (the common public default).
DEFAULT_TIS_CAP = 2.0


def staleness(traj: Trajectory, learner_version: int) -> int:
    """learner_version - the oldest policy version that sampled a token of `traj` (0 if none did)."""
    versions = [t["policy_version"] for t in traj.turns]
    return learner_version - min(versions) if versions else 0


def unknown(traj: Trajectory) -> bool:
    """A turn sampled on weights the engine could not name (a restarted server's "default")."""
    return any(t["policy_version"] <= UNKNOWN_VERSION for t in traj.turns)


def check(trajs: list[Trajectory], learner_version: int, max_staleness: int,
          policy: str) -> tuple[list[int], list[bool]]:
    """-> (staleness per trajectory, keep per trajectory). Over the bound: dropped with "drop",
    kept with "correct" (the learner then weights tokens by capped importance ratios). A trajectory
    with a turn of unknown version is always dropped: no bound holds for it."""
    if policy not in POLICIES:
        raise ValueError(f"stale policy must be one of {POLICIES}, got {policy!r}")
    if max_staleness < 0:
        raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
    values = [staleness(t, learner_version) for t in trajs]
    return values, [(policy == "correct" or s <= max_staleness) and not unknown(t) for s, t in zip(values, trajs)]


def tis_cap(policy: str, cap: float) -> float:
    """The token TIS cap the loss uses: "correct" turns TIS on (at `cap`, or DEFAULT_TIS_CAP if 0)."""
    return (cap or DEFAULT_TIS_CAP) if policy == "correct" else cap


def histogram(values: list[int]) -> dict[str, int]:
    """{"staleness/<s>": count} for the metric log."""
    return {f"staleness/{s}": n for s, n in sorted(Counter(values).items())}
