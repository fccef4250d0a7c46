"""Per-sequence log-probs from hidden states, computed only where a label counts, in chunks.

Never materializes full-vocabulary fp32 log-softmax for all positions: for 8 HH pairs at max_length 512 in the
padded layout that would be 2·8·512·49152·4 B = 1.6 GB (SmolLM2 vocab); here it is `chunk`·V floats at a time,
recomputed in backward (activation checkpointing per chunk).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
PACKED_ATTENTION = ("sdpa",)  # attention paths tested to honour the packed 4D mask (tests/test_layout.py)


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The transformer body (hidden states out) and the LM head of an HF causal LM, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 softcap: float | None) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # (n, V)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)  # (n,)


def sequence_logps(
    hidden: torch.Tensor,  # (R, L, H) last hidden states
    head: torch.nn.Module,  # LM head: H -> V
    pred_index: torch.Tensor,  # (N,) flat index into R·L of the state predicting each target
    target_ids: torch.Tensor,  # (N,) target token ids
    seq_index: torch.Tensor,  # (N,) which sequence each target belongs to
    n_seqs: int,
    chunk: int = 1024,
    softcap: float | None = None,
) -> torch.Tensor:
    """Σ_t log p(y_t | x, y_<t) per sequence, (n_seqs,): Rafailov et al. 2023 eq. 5's log π(y|x), response tokens only."""
    states = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pred_index)  # (N, H)
    pieces = []
    for start in range(0, states.shape[0], chunk):
        args = (states[start : start + chunk], head.weight, head.bias, target_ids[start : start + chunk], softcap)
        if torch.is_grad_enabled() and states.requires_grad:
            pieces.append(checkpoint(_token_logps, *args, use_reentrant=False))
        else:
            pieces.append(_token_logps(*args))
    token_logps = torch.cat(pieces) if pieces else states.new_zeros(0)  # (N,)
    return token_logps.new_zeros(n_seqs).index_add(0, seq_index, token_logps)  # (n_seqs,)


def batch_logps(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """Forward the body once on a layout batch and return per-sequence log-probs (2B,): chosen then rejected."""
    body, head = decoder_and_head(model)
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 4 and model.config._attn_implementation not in PACKED_ATTENTION:
        # Measured: eager attention does not honour the custom 4D mask the same way (log-probs off by ~1 nat).
        raise ValueError(f"the packed layout needs attention in {PACKED_ATTENTION} (the model uses "
                         f"{model.config._attn_implementation!r}); load it with attn_implementation='sdpa' or use layout padded")
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    hidden = body(**inputs, use_cache=False).last_hidden_state  # (R, L, H)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return sequence_logps(hidden, head, batch["pred_index"], batch["target_ids"], batch["seq_index"], batch["n_seqs"],
                          chunk=chunk, softcap=softcap)
