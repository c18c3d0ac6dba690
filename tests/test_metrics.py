"""Pass@k estimators against direct enumeration; recipe Pass@1/Pass@k and infra-failure handling."""

import itertools

import pytest

from tau2jax.eval import metrics


def _enumerate(n, c, k, all_must_pass):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(outcomes, k))
    hits = sum((all(s) if all_must_pass else any(s)) for s in subsets)
    return hits / len(subsets)


@pytest.mark.parametrize("n", range(1, 7))
def test_estimators_match_enumeration_over_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert metrics.pass_at_k(n, c, k) == pytest.approx(_enumerate(n, c, k, False), abs=1e-12)
            assert metrics.pass_hat_k(n, c, k) == pytest.approx(_enumerate(n, c, k, True), abs=1e-12)


def test_estimators_reject_impossible_counts():
    for n, c, k in [(3, 4, 1), (3, 1, 0), (3, 1, 4), (2, -1, 1)]:
        with pytest.raises(ValueError):
            metrics.pass_at_k(n, c, k)


def _rec(domain, task, sample, reward, infra=None):
    return {"domain": domain, "task_id": task, "sample_index": sample, "reward": reward, "infra_error": infra}


def test_recipe_pass1_passk_per_domain_and_pooled_overall():
    recs = []
    # airline: t1 first attempt wins; t2 only the third; t3 never.
    for s, r in enumerate([1.0, 0.0, 0.0, 0.0]):
        recs.append(_rec("airline", "t1", s, r))
    for s, r in enumerate([0.0, 0.0, 1.0, 0.0]):
        recs.append(_rec("airline", "t2", s, r))
    for s in range(4):
        recs.append(_rec("airline", "t3", s, 0.5))  # partial credit is not success
    # retail: one task, all succeed.
    for s in range(4):
        recs.append(_rec("retail", "r1", s, 1.0))
    m = metrics.compute(recs, k=4)
    assert m["airline"]["pass@1"] == pytest.approx(1 / 3)
    assert m["airline"]["pass@4"] == pytest.approx(2 / 3)
    assert m["retail"]["pass@1"] == m["retail"]["pass@4"] == 1.0
    # overall pools the 4 tasks (not the mean of the two domain means)
    assert m["overall"]["pass@1"] == pytest.approx(2 / 4)
    assert m["overall"]["pass@4"] == pytest.approx(3 / 4)
    # unbiased pass@1 = mean success rate per task; pass^4 = all four succeed
    assert m["airline"]["pass@k_unbiased"][1] == pytest.approx((1 / 4 + 1 / 4 + 0) / 3)
    assert m["airline"]["pass@k_unbiased"][4] == pytest.approx(2 / 3)
    assert m["overall"]["pass^k"][4] == pytest.approx(1 / 4)
    assert m["overall"]["infra_failures"] == 0 and m["overall"]["num_tasks"] == 4


def test_infra_failures_are_excluded_and_counted():
    recs = [
        _rec("mock", "a", 0, 0.0, infra="user simulator: HTTP 500"),  # first attempt lost
        _rec("mock", "a", 1, 1.0),
        _rec("mock", "a", 2, 0.0),
        _rec("mock", "b", 0, 1.0, infra="engine timeout"),  # reward of an infra failure is ignored
        _rec("mock", "b", 1, 0.0, infra="engine timeout"),
        _rec("mock", "b", 2, 1.0, infra="engine timeout"),
        _rec("mock", "c", 0, 0.0),
        _rec("mock", "c", 1, 0.0),
        _rec("mock", "c", 2, 1.0),
    ]
    m = metrics.compute(recs, k=3)["mock"]
    assert m["infra_failures"] == 4
    assert m["tasks_without_valid_samples"] == 1  # b
    assert m["tasks_with_fewer_than_k_valid"] == 1  # a
    assert m["num_tasks"] == 2 and m["num_valid_samples"] == 5
    # a's first valid attempt (sample 1) succeeded; c's first failed
    assert m["pass@1"] == pytest.approx(0.5)
    assert m["pass@3"] == pytest.approx(1.0)
    # k=3 needs 3 valid samples: only c qualifies
    assert m["tasks_per_k"] == {1: 2, 2: 2, 3: 1}
    assert m["pass@k_unbiased"][3] == pytest.approx(1.0)
    assert m["pass@k_unbiased"][2] == pytest.approx((metrics.pass_at_k(2, 1, 2) + metrics.pass_at_k(3, 1, 2)) / 2)


def test_empty_group_reports_none():
    m = metrics.compute([_rec("mock", "a", 0, 0.0, infra="down")], k=1)["overall"]
    assert m["pass@1"] is None and m["num_tasks"] == 0 and m["infra_failures"] == 1


def test_per_task_counts_first_valid_attempt_and_infra_failures():
    recs = [
        _rec("mock", "a", 1, 1.0),  # out of order: the first valid attempt is sample 1, not this line's order
        _rec("mock", "a", 0, 0.0, infra="down"),
        _rec("mock", "a", 2, 0.0),
        _rec("air", "b", 0, 0.0),
        _rec("air", "b", 1, 1.0),
        _rec("air", "c", 0, 1.0, infra="down"),
    ]
    t = metrics.per_task(recs)
    assert t["mock"]["a"] == {"valid_samples": 2, "successes": 1, "infra_failures": 1, "first_attempt_success": True}
    assert t["air"]["b"] == {"valid_samples": 2, "successes": 1, "infra_failures": 0, "first_attempt_success": False}
    assert t["air"]["c"] == {"valid_samples": 0, "successes": 0, "infra_failures": 1, "first_attempt_success": None}
    m = metrics.compute(recs, k=3)  # the same first attempts as the pooled metrics
    assert m["overall"]["pass@1"] == 0.5 and m["overall"]["num_tasks"] == 2
