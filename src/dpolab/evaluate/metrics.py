"""Evaluation metrics as small pure functions over per-pair log-probs (all inputs (B,) tensors or lists).

Every accuracy and win rate travels with its 95% interval and its n: a rate `x` comes with `x_ci_low`/`x_ci_high`
(Wilson, ties counted as half a success) next to the count it is a share of (`pairs`, `examples`, `prompts`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch


def _ranking(better: torch.Tensor, worse: torch.Tensor) -> float:
    """Share of pairs where `better` > `worse`, ties counted as half."""
    wins = (better > worse).double() + 0.5 * (better == worse).double()
    return float(wins.mean()) if len(wins) else float("nan")


def implicit_rewards(method: str, pc, pr, rc, rr, beta: float, chosen_tokens=None, rejected_tokens=None):
    """The reward each method's paper and TRL report, (B,) each: β·(log π − log π_ref) for dpo and kto (Rafailov et
    al. 2023, eq. 5); reference-free, β·avg log π for simpo and orpo (length-normalized) and β·log π for cpo."""
    if method in ("simpo", "orpo"):
        return beta * pc / chosen_tokens.clamp(min=1), beta * pr / rejected_tokens.clamp(min=1)
    if method == "cpo":
        return beta * pc, beta * pr
    return beta * (pc - rc), beta * (pr - rr)


def interval_fields(name: str, rate: float, n: int) -> dict[str, float]:
    """{name_ci_low, name_ci_high}: the Wilson 95% interval of a share `rate` of `n` (ties already counted half)."""
    low, high = wilson_interval(rate * n, n) if n and not math.isnan(rate) else (float("nan"), float("nan"))
    return {f"{name}_ci_low": low, f"{name}_ci_high": high}


def _tensors(*values):
    return tuple(torch.as_tensor(x, dtype=torch.float64) for x in values)


def preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, method: str = "dpo",
                       chosen_tokens=None, rejected_tokens=None) -> dict[str, float]:
    """The method's implicit rewards (`implicit_rewards`) and what they rank.

    accuracy: r_chosen > r_rejected (ties half): the tuned model's preference (relative to the reference for dpo).
    reference_ranking_accuracy: log π_ref(chosen) > log π_ref(rejected): what the starting model already prefers.
    policy_ranking_accuracy: the same raw log-prob ranking for the tuned model (comparable to the line above).
    """
    pc, pr, rc, rr = _tensors(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    counts = _tensors(chosen_tokens, rejected_tokens) if chosen_tokens is not None else (None, None)
    chosen_rewards, rejected_rewards = implicit_rewards(method, pc, pr, rc, rr, beta, *counts)  # (B,), (B,)
    margins = chosen_rewards - rejected_rewards  # (B,)
    n = int(len(pc))
    rates = {"accuracy": _ranking(chosen_rewards, rejected_rewards), "reference_ranking_accuracy": _ranking(rc, rr),
             "policy_ranking_accuracy": _ranking(pc, pr)}
    return {
        "pairs": n,
        "accuracy": rates["accuracy"],
        "margin_mean": float(margins.mean()), "margin_median": float(margins.quantile(0.5)),
        "chosen_reward_mean": float(chosen_rewards.mean()), "rejected_reward_mean": float(rejected_rewards.mean()),
        "policy_logps_chosen_mean": float(pc.mean()), "policy_logps_rejected_mean": float(pr.mean()),
        "reference_logps_chosen_mean": float(rc.mean()), "reference_logps_rejected_mean": float(rr.mean()),
        "reference_ranking_accuracy": rates["reference_ranking_accuracy"],
        "policy_ranking_accuracy": rates["policy_ranking_accuracy"],
        **{k: v for name, rate in rates.items() for k, v in interval_fields(name, rate, n).items()},
    }


def reward_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, method: str = "dpo",
                   chosen_tokens=None, rejected_tokens=None) -> list[float]:
    pc, pr, rc, rr = _tensors(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    counts = _tensors(chosen_tokens, rejected_tokens) if chosen_tokens is not None else (None, None)
    chosen_rewards, rejected_rewards = implicit_rewards(method, pc, pr, rc, rr, beta, *counts)
    return (chosen_rewards - rejected_rewards).tolist()


def unpaired_metrics(policy, ref, desirable, beta: float) -> dict[str, float]:
    """KTO's held-out view of unpaired examples: rewards r = β·(log π − log π_ref) of desirable and undesirable
    completions; accuracy = share whose reward has its label's sign (r > 0 desirable, r < 0 undesirable; 0 half)."""
    pc, rc = _tensors(policy, ref)
    good = torch.as_tensor(desirable, dtype=torch.bool)
    rewards = beta * (pc - rc)  # (B,)
    signed = torch.where(good, rewards, -rewards)
    accuracy = _ranking(signed, torch.zeros_like(signed))
    return {
        "examples": int(len(pc)), "desirable": int(good.sum()), "undesirable": int((~good).sum()),
        "accuracy": accuracy, **interval_fields("accuracy", accuracy, int(len(pc))),
        "chosen_reward_mean": float(rewards[good].mean()) if good.any() else float("nan"),
        "rejected_reward_mean": float(rewards[~good].mean()) if (~good).any() else float("nan"),
        "margin_mean": float(rewards[good].mean() - rewards[~good].mean()) if good.any() and (~good).any() else float("nan"),
        "policy_logps_chosen_mean": float(pc.mean()), "reference_logps_chosen_mean": float(rc.mean()),
    }


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (ties count as half a success)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(tuned_scores: Sequence[float], base_scores: Sequence[float]) -> dict[str, float]:
    """Tuned vs base by a judge's scores per prompt: wins + ties/2 over prompts, with a Wilson 95% interval."""
    wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned_scores, base_scores, strict=True))
    n = len(tuned_scores)
    low, high = wilson_interval(wins, n)
    return {"win_rate": wins / n if n else float("nan"), "ci_low": low, "ci_high": high, "prompts": n}


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    return {"mean": float(statistics.fmean(lengths)) if lengths else 0.0,
            "median": float(statistics.median(lengths)) if lengths else 0.0}


# ------------------------------------------------------------------------------------------------ length control
# Length-controlled win rate after AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval: A Simple Way to
# Debias Automatic Evaluators", arXiv:2404.04475; tatsu-lab/alpaca_eval, src/alpaca_eval/metrics/glm_winrate.py):
# fit a logistic GLM of the judge's preference on tanh(Δlen / std(Δlen)) — Δlen not centred, so 0 still means "equal
# length", and tanh bounds the pull of a few very long answers — then predict the preference at Δlen = 0. Their GLM
# also has a per-instruction difficulty term estimated across many leaderboard models; with one model pair and no
# such table we keep the intercept and the length term, so the prediction at Δlen = 0 is σ(intercept) for every
# prompt. Their soft labels (ties 0.5) are kept; their L1 penalty chosen by cross-validation (sklearn, not a
# dependency here) becomes a small fixed ridge, which keeps perfectly separated data finite.
LC_RIDGE = 0.1  # a N(0, 10) prior on each coefficient (logit scale): negligible once there are tens of prompts
LC_BOOTSTRAP = 1000  # percentile ends from 25 resamples each: stable to ~0.01 at n ≈ 100 prompts
LC_NEWTON_STEPS = 40


def _curvature(p: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, ridge: float) -> torch.Tensor:
    """(B, 3): the entries (h00, h01, h11) of the penalized negative Hessian of the log-likelihood, given the fitted
    probabilities p (B, n)."""
    c = weights * p * (1 - p)  # (B, n)
    return c @ torch.stack([torch.ones_like(x), x, x * x], dim=1) + torch.tensor([ridge, 0.0, ridge], dtype=x.dtype)


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge logistic regression of soft labels y (n,) on [1, x] (n,), once per row of `weights` (B, n) (counts of
    each prompt in a bootstrap resample), by batched Newton steps; returns (B, 2) = (intercept, slope).

    The 2×2 systems are solved in closed form (thousands of resamples cost little). The step is clipped: from θ = 0
    an undamped Newton step on nearly separated data can overshoot far past the optimum; with the ridge the
    objective is strictly concave, so damped steps still converge (and stop once every fit has)."""
    theta = torch.zeros(weights.shape[0], 2, dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)  # (n, 2)
    for _ in range(LC_NEWTON_STEPS):
        p = torch.sigmoid(theta @ design.T)  # (B, n)
        grad = (weights * (y - p)) @ design - ridge * theta  # (B, 2)
        h00, h01, h11 = _curvature(p, x, weights, ridge).unbind(1)
        det = h00 * h11 - h01 * h01
        step = torch.stack([h11 * grad[:, 0] - h01 * grad[:, 1], h00 * grad[:, 1] - h01 * grad[:, 0]], 1) / det[:, None]
        theta = theta + step.clamp(-3.0, 3.0)
        if float(step.abs().max()) < 1e-10:
            break
    return theta


def _delta_interval(theta: torch.Tensor, x: torch.Tensor, n: int, ridge: float) -> tuple[float, float]:
    """σ(intercept ± 1.96·se), se from the inverse penalized Hessian (the delta method on the logit scale)."""
    p = torch.sigmoid(theta[0] + theta[1] * x)[None]
    h00, h01, h11 = _curvature(p, x, torch.ones(1, n, dtype=torch.float64), ridge)[0].tolist()
    se = math.sqrt(h11 / (h00 * h11 - h01 * h01))
    centre = float(theta[0])
    return _logistic(centre - 1.96 * se), _logistic(centre + 1.96 * se)


def _logistic(z: float) -> float:
    return 0.5 * (1 + math.tanh(z / 2))  # = 1 / (1 + e^-z), without overflow for large |z|


def length_controlled_win_rate(preferences: Sequence[float], length_diffs: Sequence[float], ridge: float = LC_RIDGE,
                               resamples: int = LC_BOOTSTRAP, seed: int = 0) -> dict[str, Any]:
    """The win rate at equal length: `preferences` per prompt (1 tuned wins, 0 base wins, 0.5 tie) regressed on the
    length difference (tuned − base, tokens) as AlpacaEval's GLM does (see above), predicted at difference 0.

    The 95% interval is a percentile bootstrap over prompts (`resamples` resamples, fixed `seed`, the length scale
    held at the full sample's), widened where the delta-method interval (logit scale, inverse penalized Hessian) is
    wider: a bootstrap cannot show uncertainty the sample does not (5 wins out of 5 resample to 5 wins every time).
    When every difference is the same (std 0), length cannot be told from the intercept: the fit has the intercept
    alone (`length_identifiable` false) and the result is the raw win rate shrunk slightly by the ridge."""
    y = torch.as_tensor(preferences, dtype=torch.float64)
    diffs = torch.as_tensor(length_diffs, dtype=torch.float64)
    n, ridge = len(y), max(ridge, 1e-8)  # the floor keeps the 2×2 systems solvable when the feature is constant
    if n == 0:
        return {"lc_win_rate": float("nan"), "lc_ci_low": float("nan"), "lc_ci_high": float("nan"),
                "lc_length_coef": float("nan"), "lc_length_scale": float("nan"), "length_identifiable": False}
    scale = float(diffs.std()) if n > 1 else 0.0
    x = torch.tanh(diffs / scale) if scale > 0 else torch.zeros_like(diffs)
    point = _fit_logistic(x, y, torch.ones(1, n, dtype=torch.float64), ridge)[0]
    picks = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, picks, torch.ones(resamples, n, dtype=torch.float64))
    rates = torch.sigmoid(_fit_logistic(x, y, counts, ridge)[:, 0])
    low, high = torch.quantile(rates, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    delta_low, delta_high = _delta_interval(point, x, n, ridge)
    return {"lc_win_rate": float(torch.sigmoid(point[0])), "lc_ci_low": min(low, delta_low),
            "lc_ci_high": max(high, delta_high), "lc_length_coef": float(point[1]), "lc_length_scale": scale,
            "length_identifiable": scale > 0,
            "lc_interval": f"percentile bootstrap over prompts ({resamples} resamples, seed {seed}) ∪ delta method"}


def score_distribution(scores: Sequence[float]) -> dict[str, float]:
    """Mean, std (n−1) and quantiles of one model's judge scores."""
    values = torch.as_tensor(scores, dtype=torch.float64)
    if not len(values):
        return {k: float("nan") for k in ("mean", "std", "min", "q25", "median", "q75", "max")}
    q = torch.quantile(values, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return {"mean": float(values.mean()), "std": float(values.std()) if len(values) > 1 else 0.0,
            "min": q[0], "q25": q[1], "median": q[2], "q75": q[3], "max": q[4]}


def preferences(tuned_scores: Sequence[float], base_scores: Sequence[float]) -> list[float]:
    """Per prompt: 1 when the tuned answer scores higher, 0 when lower, 0.5 on a tie."""
    return [1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned_scores, base_scores, strict=True)]


def judge_summary(tuned_scores: Sequence[float], base_scores: Sequence[float], tuned_lengths: Sequence[int],
                  base_lengths: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """Everything eval.json says about a judge's verdict: the raw win rate with its Wilson interval and n
    (`win_rate`, `ci_low`, `ci_high`, `prompts`), the length-controlled one with its bootstrap interval, the mean
    length change (tuned − base, tokens) and each model's score distribution."""
    diffs = [t - b for t, b in zip(tuned_lengths, base_lengths, strict=True)]
    return {**win_rate(tuned_scores, base_scores),
            **length_controlled_win_rate(preferences(tuned_scores, base_scores), diffs, seed=seed),
            "mean_length_change": float(statistics.fmean(diffs)) if diffs else float("nan"),
            "scores": {"base": score_distribution(base_scores), "tuned": score_distribution(tuned_scores)}}
