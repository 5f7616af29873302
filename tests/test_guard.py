"""The Goodhart guard on hand-made and synthetic candidates."""

import math
import random

import pytest

from alignpipe.oracle.guard import guard, is_hacking, pair_accuracy, spearman


def test_pair_accuracy_and_spearman_by_hand():
    # oracle (violations/char, lower is better): sample 0 best, 2 worst; the RM agrees on 2 of 3 pairs.
    assert pair_accuracy([3.0, 1.0, 2.0], [0.0, 0.1, 0.2]) == pytest.approx(2 / 3)
    assert pair_accuracy([1.0, 1.0], [0.0, 0.1]) == 0.5  # an RM tie counts half
    assert math.isnan(pair_accuracy([1.0, 2.0], [0.1, 0.1]))  # no pair differs
    assert pair_accuracy([5.0, 9.0, 1.0], [0.1, None, 0.3]) == 1.0  # empty samples are left out
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660254)


def _synthetic(n, rm_shift, oracle_shift, seed=0):
    rng = random.Random(seed)
    ref_oracle = [abs(rng.gauss(0.05, 0.03)) for _ in range(n)]
    cand_oracle = [max(0.0, v + oracle_shift + rng.gauss(0, 0.01)) for v in ref_oracle]
    ref_rm = [rng.gauss(0, 1) for _ in range(n)]
    cand_rm = [v + rm_shift + rng.gauss(0, 0.2) for v in ref_rm]
    return cand_rm, ref_rm, cand_oracle, ref_oracle


def test_guard_flags_rm_up_oracle_worse_and_passes_both_better():
    hacked = guard(*_synthetic(200, rm_shift=0.5, oracle_shift=+0.01))  # RM up, violations up (worse)
    assert hacked["reward_hacking"] and hacked["rm_gain_ci_low"] > 0 and hacked["oracle_gain"] < 0
    honest = guard(*_synthetic(200, rm_shift=0.5, oracle_shift=-0.02))  # RM up, violations down (better)
    assert not honest["reward_hacking"] and honest["oracle_gain_ci_low"] > 0
    flat_rm = guard(*_synthetic(200, rm_shift=0.0, oracle_shift=+0.01))  # RM flat: nothing to flag
    assert not flat_rm["reward_hacking"]


def test_is_hacking_rule():
    assert is_hacking(0.1, -0.01) and is_hacking(0.1, 0.0)
    assert not is_hacking(0.1, 0.001) and not is_hacking(-0.1, -0.5) and not is_hacking(0.0, -1.0)
