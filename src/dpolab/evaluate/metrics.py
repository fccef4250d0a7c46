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


def implicit_rewards(method: str, pc, pr, rc, rr, beta: float, chosen_tokens=None, rejected_tokens=None):
    """The reward each method's paper and TRL report, (B,) each: β·(log π − log π_ref) for dpo and kto (Rafailov et
    al. 2023, eq. 5); reference-free, β·avg log π for simpo and orpo (length-normalized) and β·log π for cpo."""
    if method in ("simpo", "orpo"):
        return beta * pc / chosen_tokens.clamp(min=1), beta * pr / rejected_tokens.clamp(min=1)
    if method == "cpo":
        return beta * pc, beta * pr
    return beta * (pc - rc), beta * (pr - rr)


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
    return {
        "pairs": int(len(pc)),
        "accuracy": _ranking(chosen_rewards, rejected_rewards),
        "margin_mean": float(margins.mean()), "margin_median": float(margins.quantile(0.5)),
        "chosen_reward_mean": float(chosen_rewards.mean()), "rejected_reward_mean": float(rejected_rewards.mean()),
        "policy_logps_chosen_mean": float(pc.mean()), "policy_logps_rejected_mean": float(pr.mean()),
        "reference_logps_chosen_mean": float(rc.mean()), "reference_logps_rejected_mean": float(rr.mean()),
        "reference_ranking_accuracy": _ranking(rc, rr), "policy_ranking_accuracy": _ranking(pc, pr),
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
    return {
        "examples": int(len(pc)), "desirable": int(good.sum()), "undesirable": int((~good).sum()),
        "accuracy": _ranking(signed, torch.zeros_like(signed)),
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
