"""DPO-family losses as pure functions of per-sequence log-probs. All tensors are (B,) unless noted."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def dpo_loss(
    policy_chosen: torch.Tensor,  # (B,) log π(y_w|x), summed over response tokens
    policy_rejected: torch.Tensor,  # (B,) log π(y_l|x)
    ref_chosen: torch.Tensor,  # (B,) log π_ref(y_w|x)
    ref_rejected: torch.Tensor,  # (B,) log π_ref(y_l|x)
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,  # (B,) response lengths, for ipo
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards β·(log π − log π_ref) of chosen and rejected (B,), (B,)."""
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    delta = chosen_logratio - rejected_logratio  # (B,) h_θ(x, y_w, y_l)
    if loss_type == "sigmoid":
        # Rafailov et al. 2023, eq. 7: L = −log σ(β·h).
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        # SLiC-HF (Zhao et al. 2023, eq. 3) on the DPO log-ratio: L = max(0, 1 − β·h).
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        # Azar et al. 2023, eq. 17: L = (h − 1/(2τ))², τ = β; log-ratios averaged per token, the normalized form the
        # IPO authors confirmed (and TRL uses), so β is comparable across lengths.
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the response token counts")
        h = chosen_logratio / chosen_tokens.clamp(min=1) - rejected_logratio / rejected_tokens.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        # Chowdhury et al. 2024 (robust DPO), eq. 8, with label-flip rate ε:
        # L = [−(1−ε)·log σ(β·h) + ε·log σ(−β·h)] / (1 − 2ε)  (unbiased under noisy labels; ε=0 gives DPO).
        eps = label_smoothing
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()
