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
four batches, interleaved with the dense path, 74.7 s against 89.3 s (-16%, bench/attention_ab.py). At long rows
(bench/flex_attention.py, checkpointing on): 3,644 tokens (15 pairs) a step of 33.9 s against the dense path's 69.4 s,
a 1.1 MB mask against 13.3 MB; 16,267 tokens (79 pairs) 178 s with a 4.9 MB mask, where the dense mask is 265 MB.
"""

from __future__ import annotations

import torch

from dpolab.engine.layout import packed_mask

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
                blocks.append((row, start, end, packed_mask(owner[row : row + 1, start:end],
                                                            kind[row : row + 1, start:end])))
            start = end
    return blocks


def _spans(pair_blocks, rows: int, length: int) -> list[tuple[list[int], list[torch.Tensor | None]]]:
    """Per row, the sizes of its consecutive spans and each one's mask (None for padding between or after pairs)."""
    spans: list[tuple[list[int], list[torch.Tensor | None]]] = [([], []) for _ in range(rows)]
    filled = [0] * rows
    for row, start, end, mask in pair_blocks:
        sizes, masks = spans[row]
        if start > filled[row]:
            sizes.append(start - filled[row])
            masks.append(None)
        sizes.append(end - start)
        masks.append(mask)
        filled[row] = end
    for row in range(rows):
        if filled[row] < length:
            spans[row][0].append(length - filled[row])
            spans[row][1].append(None)
    return spans


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
    # split, not indexing: split's backward concatenates the spans' gradients, where each indexed span's backward
    # would add into a zeroed copy of the whole tensor (pairs × layers full-size fills); enable_gqa, not repeated
    # key/value heads: no copies (together about a third off this function's forward+backward on 8 HH pairs).
    out = []
    for (sizes, masks), q, k, v in zip(_spans(pair_blocks, rows, length), *(t.split(1) for t in (query, key, value))):
        out.append(torch.cat([
            torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout,
                                                             scale=scaling, enable_gqa=True)  # (1, H, l, D)
            if mask is not None else qs.new_zeros(qs.shape)
            for qs, ks, vs, mask in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2), masks)], dim=2))
    return torch.cat(out).transpose(1, 2).contiguous(), None  # (R, L, H, D)


def _no_mask(*args, **kwargs):
    """The mask function of `dpolab_pairs`: the blocks carry their own masks; no row-wide mask is built."""
    return None


def register() -> None:
    """Make `dpolab_pairs` a name transformers' models accept (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, pair_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)
