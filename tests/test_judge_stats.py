"""Intervals on every rate, and the length-controlled win rate on synthetic judges whose answer is known."""

import math
import random

import pytest
import torch

from dpolab.evaluate.metrics import (judge_summary, length_controlled_win_rate, preference_metrics, preferences,
                                     unpaired_metrics, wilson_interval)


def _wilson_by_hand(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    # Wilson (1927): (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n), written out independently of the module.
    p = successes / n
    root = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return (p + z**2 / (2 * n) - root) / (1 + z**2 / n), (p + z**2 / (2 * n) + root) / (1 + z**2 / n)


def test_wilson_matches_the_published_value():
    # 8 of 10: 0.4902–0.9433 (e.g. Newcombe 1998, Table I's method 3 style); and the formula written out by hand.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(2.5, 7) == pytest.approx(_wilson_by_hand(2.5, 7))


def test_every_accuracy_carries_its_interval_and_n():
    # accuracy: pair 1 chosen reward 0.5 > −0.5 (win), pair 2 a tie (half), pair 3 0 vs 0.5 (loss) → 1.5 of 3.
    m = preference_metrics([-1.0, -4.0, -2.0], [-3.0, -5.0, -1.0], [-2.0, -4.0, -2.0], [-2.0, -5.0, -2.0], beta=0.5)
    assert m["pairs"] == 3 and m["accuracy"] == pytest.approx(0.5)
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == pytest.approx(_wilson_by_hand(1.5, 3))
    # reference ranking: −2 vs −2 tie, −4 > −5, −2 vs −2 tie → 2 of 3
    assert (m["reference_ranking_accuracy_ci_low"], m["reference_ranking_accuracy_ci_high"]) == pytest.approx(
        _wilson_by_hand(2.0, 3))
    # tuned ranking: −1 > −3, −4 > −5, −2 < −1 → 2 of 3
    assert (m["policy_ranking_accuracy_ci_low"], m["policy_ranking_accuracy_ci_high"]) == pytest.approx(
        _wilson_by_hand(2.0, 3))
    u = unpaired_metrics([0.0, -1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [True, True, False, False], beta=1.0)
    # rewards 0 (tie, half), −1 desirable (wrong), 1 undesirable (wrong), −1 undesirable (right) → 1.5 of 4
    assert u["accuracy"] == pytest.approx(1.5 / 4)
    assert (u["accuracy_ci_low"], u["accuracy_ci_high"]) == pytest.approx(_wilson_by_hand(1.5, 4))


def _lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    """Base lengths 20–60 tokens; tuned mostly longer (−8..+25 tokens), some exactly equal."""
    rng = random.Random(seed)
    base = [rng.randint(20, 60) for _ in range(n)]
    return base, [b + rng.randint(-8, 25) for b in base]


def test_a_judge_that_only_prefers_longer_answers_has_a_length_controlled_win_rate_near_half():
    base, tuned = _lengths(300, 0)
    j = judge_summary([float(t) for t in tuned], [float(b) for b in base], tuned, base)  # score = length
    assert j["win_rate"] > 0.7 and j["ci_low"] > 0.6  # the raw rate says the tuned model is clearly better
    assert abs(j["lc_win_rate"] - 0.5) < 0.05 and j["lc_ci_low"] < 0.5 < j["lc_ci_high"]
    assert j["mean_length_change"] == pytest.approx(sum(tuned) / 300 - sum(base) / 300)
    assert j["lc_length_coef"] > 3  # the regression found what drives the judge


def test_a_noisy_length_judge_is_also_controlled():
    rng = random.Random(1)
    base, tuned = _lengths(300, 1)
    j = judge_summary([t + rng.gauss(0, 5) for t in tuned], [b + rng.gauss(0, 5) for b in base], tuned, base)
    assert j["ci_low"] > 0.6 and j["lc_ci_low"] < 0.5 < j["lc_ci_high"]


def test_a_judge_that_prefers_the_tuned_model_regardless_of_length_keeps_its_win_rate():
    rng = random.Random(2)
    base, tuned = _lengths(400, 2)
    prefs = [1.0 if rng.random() < 0.85 else 0.0 for _ in base]
    lc = length_controlled_win_rate(prefs, [t - b for t, b in zip(tuned, base)])
    raw = sum(prefs) / len(prefs)
    # equal up to noise: the estimate extrapolates from the mean length difference to zero, which costs precision
    assert lc["lc_win_rate"] == pytest.approx(raw, abs=0.05)
    assert lc["lc_ci_low"] < min(raw, 0.85) and max(raw, 0.85) < lc["lc_ci_high"]
    wilson = wilson_interval(sum(prefs), len(prefs))
    # the regression spends a little information on the length term: its interval is a bit wider, not wildly so
    assert 0.9 < (lc["lc_ci_high"] - lc["lc_ci_low"]) / (wilson[1] - wilson[0]) < 1.8


def test_saturated_two_group_case_by_hand():
    # Two length differences, ±10: the unpenalised fit reproduces each group's mean, a = 1/2 at −10 and b = 4/5 at
    # +10, and its intercept is the midpoint of the two logits: σ((logit a + logit b)/2) = σ(ln 2) = 2/3.
    prefs, diffs = [1, 0, 1, 1, 1, 1, 0], [-10, -10, 10, 10, 10, 10, 10]
    lc = length_controlled_win_rate(prefs, diffs, ridge=0.0)
    assert lc["lc_win_rate"] == pytest.approx(2 / 3, abs=1e-6)
    assert lc["lc_length_scale"] == pytest.approx(torch.tensor(diffs, dtype=torch.float64).std().item())


def test_penalised_fit_matches_a_brute_force_search():
    prefs, diffs = [1, 0.5, 1, 0, 1, 1, 0, 1], [12, 0, 30, -5, 3, 8, -20, -2]
    lc = length_controlled_win_rate(prefs, diffs, ridge=0.1)
    y, d = torch.tensor(prefs, dtype=torch.float64), torch.tensor(diffs, dtype=torch.float64)
    x = torch.tanh(d / d.std())
    grid = torch.linspace(-6, 6, 1201, dtype=torch.float64)  # step 0.01
    a, b = grid[:, None, None], grid[None, :, None]
    z = a + b * x  # (G, G, n)
    objective = (y * torch.nn.functional.logsigmoid(z) + (1 - y) * torch.nn.functional.logsigmoid(-z)).sum(-1)
    objective -= 0.05 * (a[..., 0] ** 2 + b[..., 0] ** 2)
    best = torch.nonzero(objective == objective.max())[0]
    assert lc["lc_win_rate"] == pytest.approx(torch.sigmoid(grid[best[0]]).item(), abs=3e-3)
    assert lc["lc_length_coef"] == pytest.approx(grid[best[1]].item(), abs=0.011)


def test_equal_lengths_fall_back_to_the_intercept_alone():
    # No length variation: the penalised intercept-only fit solves Σ(y − p) = ridge·logit(p); bisection by hand.
    prefs = [1, 1, 1, 0]
    lc = length_controlled_win_rate(prefs, [5, 5, 5, 5], ridge=0.1)
    low, high = 0.5, 0.999
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sum(prefs) - 4 * mid - 0.1 * math.log(mid / (1 - mid)) > 0 else (low, mid)
    assert not lc["length_identifiable"] and lc["lc_win_rate"] == pytest.approx(low, abs=1e-9)
    assert lc["lc_win_rate"] < 0.75  # shrunk toward 1/2 by the ridge, a little


@pytest.mark.parametrize("prefs, diffs", [
    ([1.0], [7]),  # one prompt
    ([1.0, 1.0], [3, -3]),  # two wins: nothing to regress on
    ([1, 1, 1, 0, 0, 0], [1, 2, 3, -1, -2, -3]),  # perfectly separated by length
    ([0.5, 0.5, 0.5], [0, 0, 0]),  # all ties at equal length
])
def test_degenerate_inputs_give_finite_rates_and_honest_intervals(prefs, diffs):
    lc = length_controlled_win_rate(prefs, diffs)
    assert 0 < lc["lc_ci_low"] <= lc["lc_win_rate"] <= lc["lc_ci_high"] < 1
    assert math.isfinite(lc["lc_length_coef"])
    if len(prefs) <= 2 and all(p == 1 for p in prefs):
        assert lc["lc_ci_low"] < 0.5  # one or two wins prove little: the interval must say so
    if diffs == [1, 2, 3, -1, -2, -3]:
        assert lc["lc_win_rate"] == pytest.approx(0.5, abs=1e-9)  # symmetric about equal length


def test_no_prompts_is_nan_and_preferences_count_ties_half():
    assert math.isnan(length_controlled_win_rate([], [])["lc_win_rate"])
    assert preferences([2.0, 1.0, 3.0], [1.0, 1.0, 4.0]) == [1.0, 0.5, 0.0]


def test_score_distributions_by_hand():
    j = judge_summary([1.0, 2.0, 3.0, 4.0, 5.0], [0.0, 0.0, 0.0, 0.0, 10.0], [5, 6, 7, 8, 9], [5, 5, 5, 5, 5])
    tuned = j["scores"]["tuned"]
    assert (tuned["mean"], tuned["min"], tuned["q25"], tuned["median"], tuned["q75"], tuned["max"]) == (3, 1, 2, 3, 4, 5)
    assert tuned["std"] == pytest.approx(math.sqrt(2.5))  # sample std of 1..5
    assert j["scores"]["base"]["mean"] == 2.0 and j["scores"]["base"]["median"] == 0.0
    assert j["mean_length_change"] == 2.0 and j["win_rate"] == pytest.approx(0.8) and j["prompts"] == 5
