"""Preference losses as pure functions of per-sequence log-probs. All tensors are (B,) unless noted.

DPO family (a frozen reference): every `loss_type` of TRL 1.16's DPOTrainer, each a small function of the log-ratios
below, combined by `loss_weights` (e.g. MPO: sigmoid + bco_pair + sft at 0.8/0.2/1.0). Reference-free: SimPO, CPO,
ORPO. Unpaired: KTO. Where TRL departs from a paper, TRL is followed (it is the oracle the tests compare with) and
the comment says so. The implicit rewards each method reports are returned beside its losses, as TRL logs them.
Reward models: `reward_loss`, the Bradley–Terry loss on explicit scores (a score head's output) instead of log-probs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPES = DPO_LOSS_TYPES  # kept for callers of the first version
SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired")  # the loss types that read label_smoothing (ε)


@dataclass(frozen=True)
class Ratios:
    """What a DPO-family loss may read, built once per batch by `dpo_loss`."""

    chosen: torch.Tensor  # (B,) log π(y_w|x) − log π_ref(y_w|x)
    rejected: torch.Tensor  # (B,) log π(y_l|x) − log π_ref(y_l|x)
    logps: tuple[torch.Tensor, torch.Tensor]  # (B,), (B,) policy log-probs of chosen, rejected
    ref: tuple[torch.Tensor, torch.Tensor]  # (B,), (B,) reference log-probs
    tokens: tuple[torch.Tensor, torch.Tensor] | None  # (B,), (B,) response lengths
    chosen_nll: torch.Tensor | None  # () mean NLL per chosen token over the batch

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen - self.rejected  # (B,) h_θ(x, y_w, y_l)

    def per_token(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokens is None:
            raise ValueError("ipo and sigmoid_norm need the response token counts")
        return self.chosen / self.tokens[0].clamp(min=1), self.rejected / self.tokens[1].clamp(min=1)


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps


def _sigmoid(r: Ratios, beta: float, eps: float, tau: float) -> torch.Tensor:
    return -F.logsigmoid(beta * r.delta)  # Rafailov et al. 2023, eq. 7: L = −log σ(β·h)


def _hinge(r, beta, eps, tau):
    return torch.relu(1 - beta * r.delta)  # SLiC-HF (Zhao et al. 2023, eq. 3) on the DPO log-ratio


def _ipo(r, beta, eps, tau):
    # Azar et al. 2023, eq. 17: (h − 1/(2τ))², τ = β, log-ratios averaged per token: the normalized form the IPO
    # authors confirmed to TRL, so β is comparable across lengths.
    chosen, rejected = r.per_token()
    return (chosen - rejected - 1 / (2 * beta)) ** 2


def _exo_pair(r, beta, eps, tau):
    # EXO-pref (Ji et al. 2024, eq. 16): KL(p_fθ ‖ p_rh) over {y_w, y_l} with p_rh = (1−ε, ε).
    z = beta * r.delta
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


def _nca_pair(r, beta, eps, tau):
    # NCA (Chen et al. 2024, eq. 12): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), r = β·log-ratio.
    chosen, rejected = beta * r.chosen, beta * r.rejected
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _robust(r, beta, eps, tau):
    # Chowdhury et al. 2024 (robust DPO), eq. 8: [−(1−ε) log σ(β·h) + ε log σ(−β·h)] / (1 − 2ε).
    return (-(1 - eps) * F.logsigmoid(beta * r.delta) + eps * F.logsigmoid(-beta * r.delta)) / (1 - 2 * eps)


def _bco_pair(r, beta, eps, tau):
    # BCO (Jung et al. 2024) on pairs, as TRL 1.16 has it: −log σ(r_w) − log σ(−r_l), without the paper's running
    # reward-mean shift δ (TRL 1.16 keeps no state for it, so neither does dpolab: resume stays exact).
    return -F.logsigmoid(beta * r.chosen) - F.logsigmoid(-beta * r.rejected)


def _sppo_hard(r, beta, eps, tau):
    # SPPO (Wu et al. 2024, eq. 4.7) with hard probabilities: P = 1 for the winner, 0 for the loser.
    return (r.chosen - 0.5 / beta) ** 2 + (r.rejected + 0.5 / beta) ** 2


def _aot(r, beta, eps, tau):
    # AOT (Melnyk et al. 2024, paired): sorted policy log-ratios (log π_w − log π_l) against the sorted reference ones.
    policy = torch.sort(r.logps[0] - r.logps[1], dim=0).values
    reference = torch.sort(r.ref[0] - r.ref[1], dim=0).values
    return _smoothed(beta * (policy - reference), eps)


def _aot_unpaired(r, beta, eps, tau):
    # AOT unpaired: the sorted chosen log-ratios against the sorted rejected ones.
    return _smoothed(beta * (torch.sort(r.chosen, dim=0).values - torch.sort(r.rejected, dim=0).values), eps)


def _apo_zero(r, beta, eps, tau):
    # APO-zero (D'Oosterlinck et al. 2024, eq. 7): raise the chosen likelihood, lower the rejected one.
    return 1 - torch.sigmoid(beta * r.chosen) + torch.sigmoid(beta * r.rejected)


def _apo_down(r, beta, eps, tau):
    # APO-down (eq. 8): lower both, the rejected more.
    return torch.sigmoid(beta * r.chosen) + 1 - torch.sigmoid(beta * (r.chosen - r.rejected))


def _discopop(r, beta, eps, tau):
    # DiscoPOP (Chris Lu et al. 2024, eq. 5): a log-ratio-modulated blend of the logistic and exponential losses.
    z = beta * r.delta
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _sft(r, beta, eps, tau):
    # NLL of the chosen responses, mean over every chosen token of the batch (TRL: one scalar, repeated per pair).
    if r.chosen_nll is None:
        raise ValueError("sft needs the chosen responses' NLL")
    return r.chosen_nll.expand(r.chosen.shape[0])


def _sigmoid_norm(r, beta, eps, tau):
    chosen, rejected = r.per_token()  # DPO on per-token (length-normalized) log-ratios
    return -F.logsigmoid(beta * (chosen - rejected))


DPO_LOSSES = {"sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
              "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
              "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
              "sft": _sft, "sigmoid_norm": _sigmoid_norm}


def dpo_loss(
    policy_chosen: torch.Tensor,  # (B,) log π(y_w|x), summed over response tokens
    policy_rejected: torch.Tensor,  # (B,) log π(y_l|x)
    ref_chosen: torch.Tensor,  # (B,) log π_ref(y_w|x)
    ref_rejected: torch.Tensor,  # (B,) log π_ref(y_l|x)
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,  # (B,) response lengths (ipo, sigmoid_norm)
    rejected_tokens: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    chosen_nll: torch.Tensor | None = None,  # () mean NLL per chosen token (sft)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) = Σ_k w_k·L_k, and the implicit rewards β·(log π − log π_ref) of chosen and rejected.

    The mean of the per-pair losses is Σ_k w_k·mean(L_k), TRL's combination of several loss types."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    unknown = [t for t in types if t not in DPO_LOSSES]
    if unknown or len(weights) != len(types):
        raise ValueError(f"unknown loss_type {unknown[0]!r}; choose among {', '.join(DPO_LOSS_TYPES)}" if unknown
                         else f"{len(weights)} loss_weights for {len(types)} loss types")
    tokens = (chosen_tokens, rejected_tokens) if chosen_tokens is not None and rejected_tokens is not None else None
    r = Ratios(policy_chosen - ref_chosen, policy_rejected - ref_rejected, (policy_chosen, policy_rejected),
               (ref_chosen, ref_rejected), tokens, chosen_nll)
    losses = sum(w * DPO_LOSSES[t](r, beta, label_smoothing, discopop_tau) for t, w in zip(types, weights))
    return losses, beta * r.chosen.detach(), beta * r.rejected.detach()


# ---------------------------------------------------------------------------------------------- reference-free
def alphapo_reward(avg_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO (Gupta et al. 2025, eq. 7): r = (1 − π̄^(−α))/α with π̄ = exp(avg log π), (B,); α → 0 gives SimPO's
    avg log π. Written as −expm1(−α·avg log π)/α: the same value as TRL's exp(·).pow(−α), without overflow."""
    return -torch.expm1(-alpha * avg_logps) / alpha


def simpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0, alpha: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6): −log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ), no reference; the rewards
    are β·avg log π. `*_avg` are log-probs averaged over the response tokens (TRL's CPOTrainer, loss_type simpo).
    alpha ≠ 0 is AlphaPO: the same loss on `alphapo_reward`s (TRL's CPOConfig `alpha`, loss_type alphapo)."""
    if alpha:
        chosen_avg, rejected_avg = alphapo_reward(chosen_avg, alpha), alphapo_reward(rejected_avg, alpha)
    z = beta * (chosen_avg - rejected_avg - gamma / beta)  # (B,)
    return _smoothed(z, label_smoothing), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def cpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO (Xu et al. 2024, eq. 3): −log σ(β·(log π(y_w) − log π(y_l))) on summed log-probs, no reference; the
    behaviour-cloning NLL term (cpo_alpha·NLL of the chosen) is added by the caller. Rewards β·log π."""
    z = beta * (chosen - rejected)
    return _smoothed(z, label_smoothing), beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, stable on both sides of −ln 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7) per pair: −β·log σ(log odds(y_w) − log odds(y_l)),
    odds(y) = P(y)/(1 − P(y)) with P the per-token average probability; the caller adds the chosen NLL
    (L = NLL − β·mean log σ(…), as TRL's ORPOTrainer). Rewards β·avg log π."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), beta * chosen_avg.detach(), beta * rejected_avg.detach()


# ---------------------------------------------------------------------------------------------- unpaired
def kto_loss(
    logps: torch.Tensor,  # (B,) log π(y|x) of each example's completion
    ref_logps: torch.Tensor,  # (B,) log π_ref(y|x)
    kl: torch.Tensor,  # () the batch's KL estimate z_ref, detached, clamped at 0
    desirable: torch.Tensor,  # (B,) bool labels
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7): λ_D·(1 − σ(β·(r − z))) for desirable completions and
    λ_U·(1 − σ(β·(z − r))) for undesirable ones, r = log π − log π_ref. Returns (losses (B,), rewards β·r (B,));
    the batch loss is their mean, as TRL's KTOTrainer takes it."""
    ratio = logps - ref_logps  # (B,)
    good = 1 - torch.sigmoid(beta * (ratio - kl))
    bad = 1 - torch.sigmoid(beta * (kl - ratio))
    losses = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return losses, beta * ratio.detach()


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """z_ref before its clamp: the mean log-ratio of mismatched (prompt, completion) pairs, detached (KTO §4.1). The
    caller averages it over processes, then clamps it at 0, as TRL does."""
    return (kl_logps - ref_kl_logps).mean().detach()


# ---------------------------------------------------------------------------------------------- reward model
def reward_loss(
    chosen: torch.Tensor,  # (B,) r(x, y_w): the score head's output at the chosen sequence's last token
    rejected: torch.Tensor,  # (B,) r(x, y_l)
    margin: torch.Tensor | None = None,  # (B,) required score gap m per pair (TRL's optional `margin` column)
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley–Terry reward-model loss per pair, (B,): −log σ(r_w − r_l − m) (Ouyang et al. 2022, eq. 1; the margin
    m as in Llama 2, Touvron et al. 2023, eq. 2), plus c·(r_w + r_l)² when centring (Eisenstein et al. 2023, eq. 2:
    pulls the rewards towards mean zero, as the pair's difference alone leaves their offset free).

    The batch loss is the mean, which is TRL 1.16's RewardTrainer loss: mean(−log σ(·)) + c·mean((r_w + r_l)²)."""
    delta = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen)
    losses = -F.logsigmoid(delta)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses
