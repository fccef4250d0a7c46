"""Evaluation metrics as small pure functions over per-pair log-probs (all inputs (B,) tensors or lists)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import torch


def _ranking(better: torch.Tensor, worse: torch.Tensor) -> float:
    """Share of pairs where `better` > `worse`, ties counted as half."""
    wins = (better > worse).double() + 0.5 * (better == worse).double()
    return float(wins.mean()) if len(wins) else float("nan")


def preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, float]:
    """Implicit rewards r = β·(log π − log π_ref) (Rafailov et al. 2023, eq. 5) and what they rank.

    accuracy: r_chosen > r_rejected (ties half): the tuned model's preference, relative to the reference.
    reference_ranking_accuracy: log π_ref(chosen) > log π_ref(rejected): what the starting model already prefers.
    policy_ranking_accuracy: the same raw log-prob ranking for the tuned model (comparable to the line above).
    """
    pc, pr, rc, rr = (torch.as_tensor(x, dtype=torch.float64) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    chosen_rewards, rejected_rewards = beta * (pc - rc), beta * (pr - rr)  # (B,), (B,)
    margins = chosen_rewards - rejected_rewards  # (B,)
    return {
        "pairs": int(len(pc)),
        "accuracy": _ranking(chosen_rewards, rejected_rewards),
        "margin_mean": float(margins.mean()), "margin_median": float(margins.quantile(0.5)),
        "chosen_reward_mean": float(chosen_rewards.mean()), "rejected_reward_mean": float(rejected_rewards.mean()),
        "policy_logps_chosen_mean": float(pc.mean()), "policy_logps_rejected_mean": float(pr.mean()),
        "reference_logps_chosen_mean": float(rc.mean()), "reference_logps_rejected_mean": float(rr.mean()),
        "reference_ranking_accuracy": _ranking(rc, rr), "policy_ranking_accuracy": _ranking(pc, pr),
    }


def reward_margins(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> list[float]:
    pc, pr, rc, rr = (torch.as_tensor(x, dtype=torch.float64) for x in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return (beta * ((pc - rc) - (pr - rr))).tolist()


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
