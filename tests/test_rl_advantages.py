"""Group advantages (GRPO / Dr.GRPO), zero-variance groups, the curriculum tracker."""

import json
import threading

import numpy as np
import pytest

from tau2jax.rl.advantages import CurriculumTracker, group_advantages, zero_variance_groups


def test_grpo_advantages_hand_numbers_sample_std():
    # Group "a" = [1, 0, 0, 0]: mean 0.25, sample std sqrt(0.75 / 3) = 0.5 -> [1.5, -0.5, -0.5, -0.5].
    # Group "b" = [0.2, 0.8] interleaved with "a": mean 0.5, std sqrt(0.18 / 1) -> ±0.3 / 0.42426.
    rewards = [1.0, 0.2, 0.0, 0.0, 0.8, 0.0]
    groups = ["a", "b", "a", "a", "b", "a"]
    adv = group_advantages(rewards, groups, eps=0.0)
    np.testing.assert_allclose(adv, [1.5, -0.70710678, -0.5, -0.5, 0.70710678, -0.5], rtol=1e-7)
    # eps sits in the denominator next to the std (the recipe's 1e-6).
    np.testing.assert_allclose(group_advantages(rewards, groups, eps=0.5)[0], 0.75 / 1.0)


def test_dr_grpo_is_mean_baseline_only():
    adv = group_advantages([1.0, 0.0, 0.0, 0.0, 3.0, 1.0], [0, 0, 0, 0, 1, 1], std_normalize=False)
    np.testing.assert_allclose(adv, [0.75, -0.25, -0.25, -0.25, 1.0, -1.0])


def test_flat_and_singleton_groups_get_exact_zero():
    # Seven copies of 0.1: the float mean is off by ~1e-17, which eps would turn into a non-zero
    # advantage; a flat group must be exactly 0. A singleton group has no spread either.
    adv = group_advantages([0.1] * 7 + [2.0], [0] * 7 + [1])
    assert np.all(adv == 0.0)


def test_invalid_samples_are_left_out_of_the_group():
    # The unparseable sample (valid False) gets 0 and does not move its group's mean / std:
    # counted [1, 0, 0] -> mean 1/3, sample std sqrt((4/9 + 2/9) / 2) = sqrt(1/3).
    adv = group_advantages([1.0, 0.0, 0.0, 5.0], [7, 7, 7, 7], valid=[True, True, True, False], eps=0.0)
    s = np.sqrt(1 / 3)
    np.testing.assert_allclose(adv, [(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0.0])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages([1.0, 0.0], [0, 0, 1])


def test_zero_variance_groups():
    ids = zero_variance_groups([1, 1, 0, 1, 0.5, 0.5, 0.3], ["x", "x", "y", "y", "z", "z", "w"])
    assert sorted(ids.tolist()) == ["w", "x", "z"]


def test_curriculum_weights_follow_the_recipe_thresholds():
    tr = CurriculumTracker()  # min 5 attempts, > 0.75 -> 0.1, < 0.25 -> 0.5
    for _ in range(4):
        tr.record("easy", True)
        tr.record("hard", False)
        tr.record("mid", True)
    assert tr.weight("easy") == tr.weight("hard") == 1.0  # 4 attempts < min_attempts
    tr.record("easy", True)
    tr.record("hard", False)
    tr.record("mid", False)
    tr.record("mid", False)  # mid: 4 / 6
    np.testing.assert_array_equal(tr.weights(["easy", "hard", "mid", "never"]), [0.1, 0.5, 1.0, 1.0])


def test_curriculum_boundaries_are_strict():
    tr = CurriculumTracker(min_attempts=4)
    for ok in (True, True, True, False):  # exactly 0.75: not above hi
        tr.record("t", ok)
    assert tr.weight("t") == 1.0


def test_curriculum_state_round_trips_through_json():
    tr = CurriculumTracker(min_attempts=1)
    tr.record(3, True)
    tr.record("a", False)
    state = json.loads(json.dumps(tr.state_dict()))
    other = CurriculumTracker(min_attempts=1)
    other.load_state_dict(state)
    assert other.state_dict() == tr.state_dict() == {"counts": {"3": [1, 1], "a": [1, 0]}}
    assert other.weight(3) == 0.1 and other.weight("a") == 0.5
    with pytest.raises(ValueError, match="more successes"):
        other.load_state_dict({"counts": {"a": [1, 2]}})


def test_curriculum_is_thread_safe():
    tr = CurriculumTracker()

    def work(i):
        for j in range(2000):
            tr.record(f"task{j % 3}", (i + j) % 2 == 0)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = tr.state_dict()["counts"]
    assert sum(a for a, _ in counts.values()) == 16000
    assert sum(s for _, s in counts.values()) == 8000


def test_curriculum_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="lo <= hi"):
        CurriculumTracker(lo=0.8, hi=0.2)
