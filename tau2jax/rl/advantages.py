"""Group-relative advantages, zero-variance groups and curriculum weights (numpy, host side).

A group is the K trajectories sampled for one task at one policy version; rewards are scalars per
trajectory and advantages are broadcast to its trained tokens by the batch builder.
"""

from __future__ import annotations

import threading

import numpy as np


def _groups(group_ids) -> tuple[np.ndarray, np.ndarray]:
    """(unique group ids, index of each sample's group)."""
    return np.unique(np.asarray(group_ids), return_inverse=True)


def group_advantages(rewards, group_ids, *, std_normalize: bool = True, eps: float = 1e-6,
                     valid=None) -> np.ndarray:
    """Per-sample advantage within its group: (r − mean_g) / (std_g + eps) (GRPO) or r − mean_g
    (Dr.GRPO, std_normalize=False).

    std_g is the sample standard deviation (ddof=1): the recipe's slime normalises with torch's
    `rewards.std(dim=-1)`, which is Bessel-corrected, and we keep its advantage scale (for K=4 it
    is sqrt(3/4) of the population std's). A group with fewer than two counted samples has std 0.
    `valid` [N] bool (default all): samples with False (e.g. unparseable even after repair) get
    advantage 0 and are left out of their group's mean and std, as in the recipe.
    Groups whose counted rewards are all equal get exactly 0 (not rounding noise / eps).
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or np.shape(group_ids) != r.shape:
        raise ValueError(f"rewards {r.shape} and group_ids {np.shape(group_ids)} must be equal 1-D shapes")
    ok = np.ones(r.shape, bool) if valid is None else np.asarray(valid, bool)
    _, inv = _groups(group_ids)
    n = np.bincount(inv, weights=ok)
    mean = np.bincount(inv, weights=r * ok) / np.maximum(n, 1)
    centred = np.where(ok, r - mean[inv], 0.0)
    ss = np.bincount(inv, weights=centred ** 2)
    std = np.sqrt(ss / np.maximum(n - 1, 1))
    adv = centred / (std[inv] + eps) if std_normalize else centred
    flat = _flat_groups(r, inv, ok)
    return np.where(flat[inv] | ~ok, 0.0, adv)


def _flat_groups(r: np.ndarray, inv: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Per group: all counted rewards equal (compared exactly, not through a float std)."""
    lo = np.full(inv.max(initial=-1) + 1, np.inf)
    hi = np.full_like(lo, -np.inf)
    np.minimum.at(lo, inv[ok], r[ok])
    np.maximum.at(hi, inv[ok], r[ok])
    return ~(hi > lo)


def zero_variance_groups(rewards, group_ids) -> np.ndarray:
    """Ids of the groups whose rewards are all equal: they carry no gradient under group-relative
    advantages, so dynamic sampling drops them and samples more tasks to refill the batch."""
    r = np.asarray(rewards, np.float64)
    uniq, inv = _groups(group_ids)
    return uniq[_flat_groups(r, inv, np.ones(r.shape, bool))]


class CurriculumTracker:
    """Per-task success counts → advantage weights (the recipe's curriculum, on by default there).

    After at least `min_attempts` recorded attempts on a task, a success rate above `hi`
    weights its advantages by `w_hi` (mostly solved: little left to learn), below `lo` by `w_lo`
    (mostly failed: noisy signal); otherwise, and before `min_attempts`, by 1. Thread-safe, so every
    rollout worker of a process can record into one tracker; `state_dict()` is JSON-able so it goes
    into checkpoints and can be merged across hosts by the caller.
    """

    def __init__(self, *, min_attempts: int = 5, hi: float = 0.75, lo: float = 0.25, w_hi: float = 0.1,
                 w_lo: float = 0.5):
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"curriculum thresholds need 0 <= lo <= hi <= 1, got lo={lo} hi={hi}")
        self.min_attempts, self.hi, self.lo, self.w_hi, self.w_lo = min_attempts, hi, lo, w_hi, w_lo
        self._counts: dict[str, list[int]] = {}  # task id -> [attempts, successes]
        self._lock = threading.Lock()

    def record(self, task_id: str, success: bool) -> None:
        with self._lock:
            c = self._counts.setdefault(str(task_id), [0, 0])
            c[0] += 1
            c[1] += int(bool(success))

    def weight(self, task_id: str) -> float:
        with self._lock:
            attempts, successes = self._counts.get(str(task_id), (0, 0))
        if attempts < self.min_attempts:
            return 1.0
        rate = successes / attempts
        return self.w_hi if rate > self.hi else self.w_lo if rate < self.lo else 1.0

    def weights(self, task_ids) -> np.ndarray:
        return np.array([self.weight(t) for t in task_ids], np.float64)

    def state_dict(self) -> dict:
        with self._lock:
            return {"counts": {k: list(v) for k, v in self._counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        counts = {str(k): [int(v[0]), int(v[1])] for k, v in state["counts"].items()}
        if any(s > a or s < 0 for a, s in counts.values()):
            raise ValueError("curriculum state has a task with more successes than attempts (or < 0)")
        with self._lock:
            self._counts = counts
