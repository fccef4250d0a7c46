"""The packed layout's attention where FlexAttention cannot train (CPU): SDPA pair by pair.

No query of one pair attends a key of another, so a packed row's attention is block-diagonal: SDPA over each pair's
own span with its own mask (prompt causal, chosen sees prompt+chosen, rejected sees prompt+rejected — the dense
mask's diagonal block, `layout.packed_mask`) gives the same outputs as one SDPA over the whole row with the dense
(R, 1, L, L) mask. It computes Σ pairᵢ² scores instead of L² per row, so the layout puts all of a step's pairs in one
unpadded row, as for flex (token efficiency 1.0), and builds no row-wide mask. Padding (none in such a row) gets a
zero output: no real query ever attends it.

How it reaches the model: transformers' attention interface under the name `dpolab_pairs` (this module registers
it, and a mask function that builds nothing); `logprobs.model_inputs` passes each pair's span and mask as the
`pair_blocks` keyword, which transformers hands to every attention call (gradient checkpointing's recomputation
included). Each block is one `scaled_dot_product_attention` call: one Python loop over the step's pairs per layer.

Measured (SmolLM2-135M, 8 HH pairs of ~170 tokens per step, fp32, 2-core AVX2 CPU): a forward+backward of the same
four batches, interleaved with the dense path, 76.9 s against 87.5 s (-12%, bench/attention_ab.py); in
bench/dpo_vs_trl.py's 4-step training runs the two were within that machine's noise (43.4 s against 43.2 s).
"""

from __future__ import annotations

import torch

from dpolab.engine.layout import CHOSEN, REJECTED

IMPLEMENTATION = "dpolab_pairs"


def pair_blocks(owner: torch.Tensor, kind: torch.Tensor) -> list[tuple[int, int, int, torch.Tensor]]:
    """(row, start, end, mask (1, 1, l, l) bool) for each pair's span [start, end) of each row, in row order."""
    blocks = []
    for row, owners in enumerate(owner.tolist()):
        start = 0
        while start < len(owners):
            end = start + 1
            while end < len(owners) and owners[end] == owners[start]:
                end += 1
            if owners[start] >= 0:  # padding (-1) is no pair
                k = kind[row, start:end]  # (l,)
                mask = torch.ones(end - start, end - start, dtype=torch.bool, device=owner.device).tril()
                mask &= ~((k[:, None] == REJECTED) & (k[None, :] == CHOSEN))  # rejected never sees chosen
                blocks.append((row, start, end, mask[None, None]))
            start = end
    return blocks


def pair_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, pair_blocks=None,
                   **kwargs):
    """transformers' attention signature: query (R, H, L, D), key/value (R, H_kv, L, D) -> ((R, L, H, D), None)."""
    if pair_blocks is None:
        raise ValueError(f"attention {IMPLEMENTATION!r} runs packed batches only (logprobs.model_inputs gives it "
                         "pair_blocks); load the model with attn_implementation='sdpa' for anything else")
    for name in ("softcap", "s_aux"):  # logit soft-capping (Gemma2), attention sinks (gpt-oss): not plain SDPA
        if kwargs.get(name) is not None:
            raise ValueError(f"attention {IMPLEMENTATION!r} has no {name}: use attention sdpa for this model")
    window = kwargs.get("sliding_window")
    longest = max((end - start for _, start, end, _ in pair_blocks), default=0)
    if window is not None and window < longest:
        raise ValueError(f"attention {IMPLEMENTATION!r} has no sliding window ({window} < a pair of {longest} tokens)")
    rows, heads, length, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves heads/H_kv query heads
        key = key.repeat_interleave(heads // key.shape[1], 1)
        value = value.repeat_interleave(heads // value.shape[1], 1)
    pieces: list[list[torch.Tensor]] = [[] for _ in range(rows)]
    filled = [0] * rows
    for row, start, end, mask in pair_blocks:
        if start > filled[row]:
            pieces[row].append(query.new_zeros(1, heads, start - filled[row], dim))
        span = slice(start, end)
        pieces[row].append(torch.nn.functional.scaled_dot_product_attention(
            query[row : row + 1, :, span], key[row : row + 1, :, span], value[row : row + 1, :, span],
            attn_mask=mask, dropout_p=dropout, scale=scaling))  # (1, H, l, D)
        filled[row] = end
    for row in range(rows):
        if filled[row] < length:
            pieces[row].append(query.new_zeros(1, heads, length - filled[row], dim))
    out = torch.cat([torch.cat(p, dim=2) for p in pieces], dim=0)  # (R, H, L, D)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    """The mask function of `dpolab_pairs`: the blocks carry their own masks; no row-wide mask is built."""
    return None


def register() -> None:
    """Make `dpolab_pairs` a name transformers' models accept (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, pair_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)
