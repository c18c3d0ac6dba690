"""Pass@k metrics for tau2 evaluations, per domain and overall.

Inputs are per-episode records (dicts or objects) with `task_id`, `domain`, `sample_index`,
`reward` and `infra_error`. Success = reward >= 1.0 (tau2's full-credit reward).

Reported per group (each domain, and "overall" = all tasks pooled, not a mean of domain means):
- `pass@1` / `pass@k` — the recipe's numbers: Pass@1 = the task's first attempt succeeded,
  Pass@k = any of its k attempts succeeded, averaged over tasks.
- `pass@k_unbiased[k]` — Chen et al. (2021): 1 - C(n-c, k) / C(n, k), averaged over tasks.
- `pass^k[k]` — tau2's reliability metric: C(c, k) / C(n, k) (all k of k attempts succeed).

`per_task` gives the same outcomes task by task (valid samples, successes, first attempt).

Infrastructure failures (`infra_error` set on the final record: engine or user-simulator outage)
are not model outcomes: those samples are dropped before scoring and counted under
`infra_failures`. A task with some infra-failed samples is scored over its n < k valid samples:
its "first attempt" is its lowest valid sample_index (attempts are i.i.d., so this is still a
fair first attempt), Pass@k is "any of its n valid attempts" (a lower bound on its Pass@k), and
the estimators for a given k use only tasks with n >= k (`tasks_per_k` says how many). A task
with no valid sample is not scored at all (`tasks_without_valid_samples`).
"""

from __future__ import annotations

from collections import defaultdict
from math import comb
from typing import Any, Iterable, Mapping

SUCCESS_THRESHOLD = 1.0
# tau2 rewards are products of 0/1 components; the tolerance only absorbs float round-off.
_EPS = 1e-6


def is_success(reward: float | None) -> bool:
    return reward is not None and reward >= SUCCESS_THRESHOLD - _EPS


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one success among k of n samples, c correct)."""
    _check(n, c, k)
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_hat_k(n: int, c: int, k: int) -> float:
    """tau2's pass^k: P(all k of k samples drawn without replacement from n succeed), c correct."""
    _check(n, c, k)
    return comb(c, k) / comb(n, k)


def _check(n: int, c: int, k: int) -> None:
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")


def _get(rec: Any, key: str) -> Any:
    return rec[key] if isinstance(rec, Mapping) else getattr(rec, key)


def compute(records: Iterable[Any], k: int) -> dict:
    """Scores final episode records; returns {"overall": {...}, "<domain>": {...}, ...}.

    `k` is the number of samples asked for per task (the recipe's Pass@k); the estimators are
    reported for every k' in 1..k.
    """
    # (domain, task_id) -> {sample_index: success or None (infra failure)}
    tasks: dict[tuple[str, str], dict[int, bool | None]] = defaultdict(dict)
    for rec in records:
        key = (_get(rec, "domain"), str(_get(rec, "task_id")))
        ok = None if _get(rec, "infra_error") else is_success(_get(rec, "reward"))
        tasks[key][int(_get(rec, "sample_index"))] = ok
    by_domain: dict[str, list[dict[int, bool | None]]] = defaultdict(list)
    for (domain, _), samples in sorted(tasks.items()):
        by_domain[domain].append(samples)
    out = {"overall": _group([s for group in by_domain.values() for s in group], k)}
    for domain, group in by_domain.items():
        out[domain] = _group(group, k)
    return out


def per_task(records: Iterable[Any]) -> dict[str, dict[str, dict]]:
    """{domain: {task_id: {"valid_samples", "successes", "infra_failures", "first_attempt_success"}}}
    ("first attempt" as in `compute`: the lowest valid sample_index; None without a valid sample)."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for rec in sorted(records, key=lambda r: int(_get(r, "sample_index"))):
        row = out[_get(rec, "domain")].setdefault(
            str(_get(rec, "task_id")),
            {"valid_samples": 0, "successes": 0, "infra_failures": 0, "first_attempt_success": None},
        )
        if _get(rec, "infra_error"):
            row["infra_failures"] += 1
            continue
        ok = is_success(_get(rec, "reward"))
        if row["valid_samples"] == 0:
            row["first_attempt_success"] = ok
        row["valid_samples"] += 1
        row["successes"] += ok
    return dict(out)


def _group(tasks: list[dict[int, bool | None]], k: int) -> dict:
    first, anyk = [], []
    unbiased: dict[int, list[float]] = defaultdict(list)
    hat: dict[int, list[float]] = defaultdict(list)
    infra = incomplete = empty = 0
    for samples in tasks:
        valid = [samples[i] for i in sorted(samples) if samples[i] is not None]
        infra += len(samples) - len(valid)
        incomplete += 0 < len(valid) < k
        if not valid:
            empty += 1
            continue
        first.append(float(valid[0]))
        anyk.append(float(any(valid[:k])))
        n, c = len(valid), sum(valid)
        for kk in range(1, min(n, k) + 1):
            unbiased[kk].append(pass_at_k(n, c, kk))
            hat[kk].append(pass_hat_k(n, c, kk))
    return {
        "pass@1": _mean(first),
        f"pass@{k}": _mean(anyk),
        "pass@k_unbiased": {kk: _mean(v) for kk, v in sorted(unbiased.items())},
        "pass^k": {kk: _mean(v) for kk, v in sorted(hat.items())},
        "tasks_per_k": {kk: len(v) for kk, v in sorted(unbiased.items())},
        "num_tasks": len(first),
        "num_valid_samples": sum(sum(s is not None for s in t.values()) for t in tasks),
        "infra_failures": infra,
        "tasks_with_fewer_than_k_valid": incomplete,
        "tasks_without_valid_samples": empty,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
