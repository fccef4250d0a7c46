"""One training step per preference method: log-probs from one forward on a layout batch, then the method's loss
(engine/losses.py) and its TRL-named metrics. The trainer calls `preference_step` and nothing else, so a method is a
loss function plus the few lines here that feed it.

Every method runs on the same layouts (packed prefix-shared or padded) and the same batch: a pair is
(prompt, chosen, rejected); for KTO an example is (prompt, completion, KL completion) with a `labels` flag, the KL
completion being another example's (data/prepare.py), so the KL term shares the prompt's forward too.
A reward model reads scores instead of log-probs (engine/scores.py): `READS` says what each method reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from dpolab.engine import losses as L
from dpolab.engine.logprobs import batch_token_logps, per_sequence
from dpolab.engine.scores import batch_scores

METHODS = ("dpo", "simpo", "cpo", "orpo", "kto", "reward")
REFERENCE_FREE = ("simpo", "cpo", "orpo", "reward")  # no reference model, no reference pass, no cache
SCORED = ("reward",)  # a sequence-classification model (a score head), not a causal LM


@dataclass(frozen=True)
class MethodSettings:
    beta: float
    loss_type: str | tuple[str, ...] = "sigmoid"  # dpo: one TRL loss_type or several (combined by loss_weights)
    label_smoothing: float = 0.0
    method: str = "dpo"
    loss_weights: tuple[float, ...] | None = None
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    alphapo_alpha: float = 0.0  # simpo: AlphaPO's reward shape α (0: SimPO)
    cpo_alpha: float = 0.0  # weight of the chosen NLL (cpo; simpo with cpo_alpha > 0 is CPO-SimPO)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    center_rewards_coefficient: float | None = None  # reward: c of c·(r_w + r_l)²
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)


DPOSettings = MethodSettings  # the first version's name


def _accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    # Ties count as half (a freshly initialized policy has all margins 0: accuracy 0.5, not 0).
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def _pair_metrics(chosen_r, rejected_r, chosen, rejected) -> dict[str, torch.Tensor]:
    return {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
            "rewards/accuracies": _accuracy(chosen_r, rejected_r), "rewards/margins": chosen_r - rejected_r,
            "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach()}


@dataclass(frozen=True)
class _Logps:
    chosen: torch.Tensor  # (B,) summed (weighted when the batch carries LD-DPO token weights)
    rejected: torch.Tensor  # (B,)
    chosen_plain: torch.Tensor  # (B,) unweighted sums, for the NLL
    chosen_tokens: torch.Tensor  # (B,)
    rejected_tokens: torch.Tensor  # (B,)
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # () summed log-probs of the prompts' tokens, () count

    @property
    def nll(self) -> torch.Tensor:
        """Mean NLL per chosen token over the batch (TRL's sft loss and the CPO NLL term); with the prompts' tokens
        when the batch gathered them (TRL's ORPO NLL runs over prompt and response)."""
        logps, tokens = self.chosen_plain.sum(), self.chosen_tokens.sum()
        if self.prompt is not None:
            logps, tokens = logps + self.prompt[0], tokens + self.prompt[1]
        return -logps / tokens.clamp(min=1)

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def batch_sequence_logps(model, batch: dict[str, Any]) -> _Logps:
    tokens = batch_token_logps(model, batch)  # (N,)
    sums = per_sequence(tokens, batch["seq_index"], batch["n_seqs"], batch.get("token_weights"))  # (2B,)
    plain = sums if batch.get("token_weights") is None else per_sequence(tokens, batch["seq_index"], batch["n_seqs"])
    pairs = batch["chosen_tokens"].shape[0]
    chosen, rejected = sums[:pairs], sums[pairs : 2 * pairs]
    counts = batch["chosen_tokens"].to(sums), batch["rejected_tokens"].to(sums)
    prompt = None
    if batch["n_seqs"] > 2 * pairs:  # the layout gathered the prompts' own tokens (sequences 2B..3B-1)
        prompt_tokens = (batch["seq_index"] >= 2 * pairs).sum().to(sums)
        prompt = (plain[2 * pairs :].sum(), prompt_tokens)
    return _Logps(chosen, rejected, plain[:pairs], *counts, prompt)


def _dpo(lp: _Logps, batch, s: MethodSettings, gather):
    ref_chosen, ref_rejected = batch["ref_chosen"].to(lp.chosen), batch["ref_rejected"].to(lp.chosen)
    losses, chosen_r, rejected_r = L.dpo_loss(
        lp.chosen, lp.rejected, ref_chosen, ref_rejected, s.beta, s.loss_types, s.label_smoothing, lp.chosen_tokens,
        lp.rejected_tokens, loss_weights=s.loss_weights, discopop_tau=s.discopop_tau,
        chosen_nll=lp.nll if "sft" in s.loss_types else None)
    return losses.mean(), _pair_metrics(chosen_r, rejected_r, lp.chosen, lp.rejected)


def _reference_free(lp: _Logps, batch, s: MethodSettings, gather):
    if s.method == "orpo":
        losses, chosen_r, rejected_r = L.orpo_loss(*lp.averages(), s.beta)
        # ORPO: L = NLL + λ·L_OR (λ = beta). TRL's NLL runs over prompt *and* response tokens (the paper's L_SFT is
        # the response's); dpolab follows TRL, so the collator gathers the prompts' tokens too (prompt_targets).
        nll_weight = 1.0
    elif s.method == "simpo":
        losses, chosen_r, rejected_r = L.simpo_loss(*lp.averages(), s.beta, s.simpo_gamma, s.label_smoothing,
                                                    s.alphapo_alpha)
        nll_weight = s.cpo_alpha
    else:
        losses, chosen_r, rejected_r = L.cpo_loss(lp.chosen, lp.rejected, s.beta, s.label_smoothing)
        nll_weight = s.cpo_alpha
    nll = lp.nll
    metrics = _pair_metrics(chosen_r, rejected_r, lp.chosen, lp.rejected)
    metrics["nll_loss"] = nll.detach().expand(lp.chosen.shape[0])
    return losses.mean() + nll_weight * nll if nll_weight else losses.mean(), metrics


def _kto(lp: _Logps, batch, s: MethodSettings, gather):
    ref_logps, ref_kl = batch["ref_chosen"].to(lp.chosen), batch["ref_rejected"].to(lp.chosen)
    desirable = batch["labels"].to(lp.chosen.device).bool()
    kl = gather(L.kto_kl(lp.rejected, ref_kl)).mean().clamp(min=0)  # averaged over processes, as TRL
    losses, rewards = L.kto_loss(lp.chosen, ref_logps, kl, desirable, s.beta, s.desirable_weight,
                                 s.undesirable_weight)
    nan = torch.full_like(rewards, float("nan"))  # metrics are per example; a NaN is skipped when averaging
    metrics = {"rewards/chosen": torch.where(desirable, rewards, nan), "rewards/rejected": torch.where(desirable, nan, rewards),
               "kl": kl.expand(rewards.shape[0]), "logps/chosen": torch.where(desirable, lp.chosen.detach(), nan),
               "logps/rejected": torch.where(desirable, nan, lp.chosen.detach())}
    return losses.mean(), metrics


def _reward(scores: torch.Tensor, batch, s: MethodSettings, gather):
    pairs = scores.shape[0] // 2
    chosen, rejected = scores[:pairs], scores[pairs:]
    margin = batch.get("margin")
    losses = L.reward_loss(chosen, rejected, margin, s.center_rewards_coefficient)
    chosen_r, rejected_r = chosen.detach(), rejected.detach()
    # TRL's RewardTrainer names (accuracy, margin, mean_reward; eval_ prefixed at evaluation), per pair here so that
    # their logged means are TRL's batch means; ties count half, as everywhere in dpolab (TRL: strictly greater).
    return losses.mean(), {"accuracy": _accuracy(chosen_r, rejected_r), "margin": chosen_r - rejected_r,
                           "mean_reward": (chosen_r + rejected_r) / 2, "rewards/chosen": chosen_r,
                           "rewards/rejected": rejected_r}


STEPS = {"dpo": _dpo, "simpo": _reference_free, "cpo": _reference_free, "orpo": _reference_free, "kto": _kto,
         "reward": _reward}
READS = {"reward": batch_scores}  # what a step reads from the model; the others read batch_sequence_logps


def preference_step(model, batch: dict[str, Any], settings: MethodSettings, gather=lambda t: t
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and TRL-named metrics (per pair/example, (B,) each) of one batch. `gather` averages a scalar over
    processes (the trainer passes accelerate's gather; one process: identity)."""
    read = READS.get(settings.method, batch_sequence_logps)
    return STEPS[settings.method](read(model, batch), batch, settings, gather)


def dpo_step(model, batch: dict[str, Any], settings: MethodSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return preference_step(model, batch, settings)
