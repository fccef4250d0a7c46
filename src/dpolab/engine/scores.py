"""Per-sequence scores of a reward model (a causal LM with a one-output score head, `AutoModelForSequenceClassification`
with num_labels=1), computed on the same layout batches as the log-probs (engine/layout.py).

The model's own forward runs once per batch, through whatever wraps it (DDP, FSDP, PEFT), so the score head's
parameters are used where the wrapper expects them. Its pooled output cannot be used: transformers pools at the last
non-pad token of each *row*, and a packed row holds several sequences. The score head's output at *every* position,
(R, L, 1), is taken instead by a forward hook on the head, and each sequence's score read at its `score_index` (the
position transformers would pool at for that sequence alone). The head is one hidden→1 projection, so scoring every
position costs R·L·H multiply-adds, nothing next to the decoder.
"""

from __future__ import annotations

import torch

from dpolab.engine.logprobs import model_inputs


def score_head(model) -> torch.nn.Module:
    """The score head of a sequence-classification model, under DDP/FSDP (`.module`) and PEFT (its base model, whose
    `score` is PEFT's modules_to_save wrapper around the trained copy)."""
    inner = getattr(model, "module", model)
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = getattr(base, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise ValueError(f"{type(base).__name__} has no `score` head: a reward model is loaded with "
                         "AutoModelForSequenceClassification (num_labels=1)")
    return head


def batch_scores(model, batch: dict) -> torch.Tensor:
    """One forward on a layout batch; the score of every sequence, (2B,): chosen 0..B-1, then rejected."""
    captured: list[torch.Tensor] = []
    hook = score_head(model).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        model(**model_inputs(model, batch), use_cache=False)
    finally:
        hook.remove()
    per_position = captured[-1].reshape(-1)  # (R·L,) the head has one output
    return per_position[batch["score_index"].to(per_position.device)].float()  # (2B,)
