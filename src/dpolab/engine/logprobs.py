"""Per-sequence log-probs, computed only where a label counts.

The model's own forward runs once per batch (so DDP/FSDP/DeepSpeed wrappers see it) with `logits_to_keep` = a
boolean (R, L) mask: the LM head projects only the K positions that predict a response token, never all R·L.
log p(target) = logit[target] − logsumexp(logits), with the logsumexp taken in fp32 over `chunk` rows at a time,
so no full-vocabulary fp32 log-softmax is materialized (8 HH pairs padded to 512 would need 2·8·512·49152·4 B = 1.6 GB).
"""

from __future__ import annotations

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
PACKED_ATTENTION = ("sdpa",)  # attention paths tested to honour the packed 4D mask (tests/test_layout.py)


def token_logps(
    logits: torch.Tensor,  # (K, V) logits at the kept positions
    pred_index: torch.Tensor,  # (N,) which kept position predicts each target
    target_ids: torch.Tensor,  # (N,) target token ids
    chunk: int = 1024,
) -> torch.Tensor:
    """log p(y_t | x, y_<t) of every response token, (N,), in fp32."""
    lse = torch.cat([logits[s : s + chunk].float().logsumexp(-1) for s in range(0, logits.shape[0], chunk)])  # (K,)
    return logits[pred_index, target_ids].float() - lse[pred_index]  # (N,)


def per_sequence(token_logps: torch.Tensor, seq_index: torch.Tensor, n_seqs: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_t w_t·log p(y_t|…) per sequence, (n_seqs,); w = 1 gives Rafailov et al. 2023 eq. 5's log π(y|x)."""
    values = token_logps if weights is None else token_logps * weights.to(token_logps)
    return values.new_zeros(n_seqs).index_add(0, seq_index, values)  # (n_seqs,)


def sequence_logps(logits, pred_index, target_ids, seq_index, n_seqs: int, chunk: int = 1024) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) per sequence, (n_seqs,), response tokens only."""
    return per_sequence(token_logps(logits, pred_index, target_ids, chunk), seq_index, n_seqs)


def ld_weights(seq_index: torch.Tensor, chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor, alpha: float
               ) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, eq. 9) token weights, (N,): 1 on a response's first min(|y_w|, |y_l|) tokens, α on
    the longer one's tail, so the verbosity beyond the shared length counts α times. Targets are ordered by
    sequence (chosen 0..B-1, then rejected 0..B-1), each sequence's tokens in order, as the layouts emit them."""
    lengths = torch.cat([chosen_tokens, rejected_tokens]).long()  # (2B,)
    starts = torch.cumsum(lengths, 0) - lengths  # (2B,) first target of each sequence
    position = torch.arange(seq_index.shape[0], device=seq_index.device) - starts[seq_index]  # (N,)
    shared = torch.minimum(chosen_tokens, rejected_tokens).long().repeat(2)  # (2B,)
    return torch.where(position < shared[seq_index], 1.0, float(alpha))


def _config(model):
    inner = getattr(model, "module", model)  # DDP/FSDP wrappers keep the model in .module
    return inner.config


def model_inputs(model, batch: dict) -> dict:
    """The model's inputs of a layout batch, after checking that its attention honours the packed 4D mask."""
    mask = batch.get("attention_mask")
    implementation = _config(model)._attn_implementation
    if mask is not None and mask.dim() == 4 and implementation not in PACKED_ATTENTION:
        # Measured: eager attention does not honour the custom 4D mask the same way (log-probs off by ~1 nat).
        raise ValueError(f"the packed layout needs attention in {PACKED_ATTENTION} (the model uses {implementation!r}); "
                         f"load it with attn_implementation='sdpa' or use layout padded")
    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def batch_token_logps(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """One forward on a layout batch; the log-prob of every response token, (N,)."""
    logits = model(**model_inputs(model, batch), logits_to_keep=batch["logits_to_keep"], use_cache=False).logits  # (K, V)
    logits = logits.reshape(-1, logits.shape[-1])
    return token_logps(logits, batch["pred_index"], batch["target_ids"], chunk)


def batch_logps(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """One forward on a layout batch; per-sequence log-probs (2B,): chosen then rejected (weighted by the batch's
    `token_weights` when it has them: LD-DPO)."""
    return per_sequence(batch_token_logps(model, batch, chunk), batch["seq_index"], batch["n_seqs"],
                        batch.get("token_weights"))
