"""Per-sequence log-probs, computed only where a label counts.

The model's own forward runs once per batch (so DDP/FSDP/DeepSpeed wrappers see it) with `logits_to_keep` = a
boolean (R, L) mask: the LM head projects only the K positions that predict a response token, never all R·L.
log p(target) = logit[target] − logsumexp(logits), with the logsumexp taken in fp32 over `chunk` rows at a time,
so no full-vocabulary fp32 log-softmax is materialized (8 HH pairs padded to 512 would need 2·8·512·49152·4 B = 1.6 GB).

Even the kept (K, V) logits dominate a small model's step: autograd holds them, their gradient, the zero-filled
gradient of the target gather and a softmax chunk — four K·V buffers (8 HH pairs: K ≈ 1,300, ~250 MB each). Where the
output head is a plain linear layer (`fused_head`), the model's forward instead returns the kept *hidden states*
(the head is swapped for a pass-through during the call) and `head_logps` computes the log-sum-exp chunk by chunk in
an autograd function with its own backward, the target logits' gradient folded into the softmax's (no (V, H)
gradient of a gather). Up to KEEP_LOGITS_BYTES it keeps one fp32 (K, V) buffer for backward
(no extra compute); beyond it, backward recomputes each chunk's logits, so nothing of size K·V outlives a chunk, at
one extra K·H·V matmul (ORPO's prompt tokens roughly double K on HH). bench/head_logps.py measures the three paths.
"""

from __future__ import annotations

import contextlib

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
PACKED_ATTENTION = ("sdpa", "flex_attention", "dpolab_pairs")  # what honours the packed mask (tested)
KEEP_LOGITS_BYTES = 256 * 2**20  # head_logps keeps the fp32 (K, V) logits for backward up to this size, else recomputes


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


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p_n = h_{k_n}·W_{y_n} + b_{y_n} − lse_{k_n}, (N,) in fp32, with lse_k = log Σ_v exp(h_k·W_v + b_v) taken
    over `chunk` rows at a time. Backward in one pass per chunk: dL/dlogits_k = Σ_{n: k_n = k} g_n (onehot(y_n) −
    softmax_k) (G), then dL/dh = G W and dL/dW = Gᵀ h — the target gather's gradient folded into G rather than a
    zero-filled (V, H) gradient of its own. With `keep` the fp32 logits are kept from forward (one K·V buffer, turned
    into G in place in backward); without, backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, pred_index, target_ids, chunk: int, keep: bool):  # (K, H), (V, H), (V,)
        w, b = _head_params(weight, bias, hidden.dtype)
        whole = keep and hidden.shape[0] <= chunk  # one chunk: its logits are the kept buffer, without a copy
        kept = torch.empty(hidden.shape[0], w.shape[0], dtype=torch.float32, device=hidden.device) \
            if keep and not whole else None
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (K,)
        for s in range(0, hidden.shape[0], chunk):
            logits = torch.nn.functional.linear(hidden[s : s + chunk], w, b).float()  # (c, V)
            lse[s : s + chunk] = logits.logsumexp(-1)
            if whole:
                kept = logits
            elif kept is not None:
                kept[s : s + chunk] = logits
        target = (hidden[pred_index] * w[target_ids]).sum(-1).float()  # (N,) the target logits
        if b is not None:
            target = target + b[target_ids].float()
        ctx.save_for_backward(hidden, weight, bias, lse, kept, pred_index, target_ids)
        ctx.chunk = chunk
        return target - lse[pred_index]

    @staticmethod
    def backward(ctx, grad_out):  # (N,)
        hidden, weight, bias, lse, kept, pred_index, target_ids = ctx.saved_tensors
        w, b = _head_params(weight, bias, hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.float()
        grad_lse = torch.zeros_like(lse).index_add_(0, pred_index, grad_out)  # (K,) Σ_{n: k_n = k} g_n
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # the first chunk's product, then accumulated in place: no (V, H) zero fill
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if b is not None and need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            logits = kept[s : s + ctx.chunk] if kept is not None else torch.nn.functional.linear(h, w, b).float()
            g = logits.sub_(lse[s : s + ctx.chunk, None]).exp_().mul_(-grad_lse[s : s + ctx.chunk, None])  # (c, V)
            here = (pred_index >= s) & (pred_index < s + g.shape[0])
            g.index_put_((pred_index[here] - s, target_ids[here]), grad_out[here], accumulate=True)
            if grad_h is not None:
                grad_h[s : s + ctx.chunk] = g.to(w.dtype) @ w
            if need_w:
                grad_w = g.t() @ h.float() if grad_w is None else grad_w.addmm_(g.t(), h.float())
            if grad_b is not None:
                grad_b += g.sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def _head_params(weight, bias, dtype):
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def head_logps(hidden, weight, bias, pred_index, target_ids, chunk: int = 1024, keep: bool = False) -> torch.Tensor:
    """log p(y_t | x, y_<t) of every response token, (N,) in fp32, from the kept hidden states (K, H) and the output
    head (W (V, H), b): the same values as `token_logps` on their logits, without ever holding (K, V)."""
    return _ChunkedTokenLogps.apply(hidden, weight, bias, pred_index, target_ids, chunk, keep)  # (N,)


class _PassThrough(torch.nn.Module):
    def forward(self, hidden):
        return hidden


def fused_head(model) -> torch.nn.Linear | None:
    """The output head when its logits are exactly `head(hidden)` (a plain Linear, no soft-capping or logit scaling
    applied after it, no adapter on it); None sends the batch down the logits path."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    config = _config(model)
    post = any(getattr(config, name, None) not in (None, 1, 1.0) for name in ("final_logit_softcapping", "logit_scale"))
    return head if type(head) is torch.nn.Linear and not post else None


@contextlib.contextmanager
def _head_swapped(model, head):
    """During the call the head returns its input, so the model's `logits` are the kept hidden states (K, H)."""
    owner, name = next((m, n) for m in model.modules() for n, c in m.named_children() if c is head)
    setattr(owner, name, _PassThrough())
    try:
        yield
    finally:
        setattr(owner, name, head)


def model_inputs(model, batch: dict) -> dict:
    """The model's inputs of a layout batch. A packed batch's mask follows the model's attention: a BlockMask built
    from the batch's segments (`owner`, `kind`) for flex attention, each pair's span and mask (`pair_blocks`) for
    SDPA pair by pair, the dense 4D mask for SDPA (built from the segments when the batch was laid out in one row);
    other attentions are refused."""
    implementation = _config(model)._attn_implementation
    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    if "owner" not in batch:  # padded layout: a 2D mask every attention honours
        return inputs
    if implementation not in PACKED_ATTENTION:
        # Measured: eager attention does not honour the custom 4D mask the same way (log-probs off by ~1 nat).
        raise ValueError(f"the packed layout needs attention in {PACKED_ATTENTION} (the model uses {implementation!r}); "
                         f"load it with attn_implementation='sdpa' or use layout padded")
    if implementation == "flex_attention":
        from dpolab.engine.flex import packed_block_mask

        inputs["attention_mask"] = packed_block_mask(batch["owner"], batch["kind"])
    elif implementation == "dpolab_pairs":
        from dpolab.engine.pair_attention import pair_blocks

        inputs.pop("attention_mask", None)
        inputs["pair_blocks"] = pair_blocks(batch["owner"], batch["kind"])
    elif "attention_mask" not in inputs:
        from dpolab.engine.layout import packed_mask

        inputs["attention_mask"] = packed_mask(batch["owner"], batch["kind"])
    return inputs


def batch_token_logps(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """One forward on a layout batch; the log-prob of every response token, (N,)."""
    inputs = model_inputs(model, batch)
    head = fused_head(model)
    with _head_swapped(model, head) if head is not None else contextlib.nullcontext():
        out = model(**inputs, logits_to_keep=batch["logits_to_keep"], use_cache=False).logits  # (K, H) or (K, V)
    out = out.reshape(-1, out.shape[-1])
    if head is not None:
        keep = torch.is_grad_enabled() and out.shape[0] * head.weight.shape[0] * 4 <= KEEP_LOGITS_BYTES
        return head_logps(out, head.weight, head.bias, batch["pred_index"], batch["target_ids"], chunk, keep)
    return token_logps(out, batch["pred_index"], batch["target_ids"], chunk)


def batch_logps(model, batch: dict, chunk: int = 1024) -> torch.Tensor:
    """One forward on a layout batch; per-sequence log-probs (2B,): chosen then rejected (weighted by the batch's
    `token_weights` when it has them: LD-DPO)."""
    return per_sequence(batch_token_logps(model, batch, chunk), batch["seq_index"], batch["n_seqs"],
                        batch.get("token_weights"))
