"""The packed layout's attention mask for torch's FlexAttention: a `BlockMask` built from the per-position segment
structure (pair `owner`, `kind` prompt/chosen/rejected/pad), never a dense (R, L, L) tensor.

Query i may attend key j iff same pair, j <= i, and not (i rejected, j chosen); padding sees itself — the mask
`layout.packed_mask` builds densely for SDPA. Each query's keys are at most two intervals of its row: prompt or
chosen i: [pair start, i]; rejected i: [pair start, prompt end) ∪ [rejected start, i]; padding: [i, i]. The block
tables (which 128×128 tiles hold any allowed entry, which hold only allowed ones) come from those intervals as
an (R, L, L/128) overlap count, so building the mask costs O(L²/128) and the kernel skips the masked-out tiles:
a row's length costs nothing where pairs do not see each other. `mask_mod` decides the entries inside partial tiles.

Supported (`flex_unsupported` says why not): torch with `torch.nn.attention.flex_attention`; a model class that
transformers runs through flex attention (`_supports_flex_attn`: Llama/SmolLM2 and Qwen2 do, GPT-2 does not); and a
CUDA device — torch 2.13's FlexAttention has no backward on CPU (`NotImplementedError: FlexAttention does not
support backward on CPU`), and its compiled CPU forward is slower than dense SDPA at the demo's budgets
(bench/flex_attention.py). `attention: auto` therefore trains with flex on CUDA (SDPA with the dense mask for a model without flex) and
elsewhere with SDPA pair by pair (engine/pair_attention.py: the same block-diagonal saving, one SDPA call per pair),
or with SDPA and the dense mask for a model that pair by pair cannot run.
"""

from __future__ import annotations

import torch

from dpolab.engine.layout import CHOSEN, PAD, PROMPT, REJECTED

BLOCK = 128  # torch's default sparse block size: the tile of the block tables
FLEX_IMPLEMENTATION = "flex_attention"  # transformers' name of the backend


def _starts(flag: torch.Tensor) -> torch.Tensor:
    """(R, L) -> (R, L): the index of the latest position <= i where `flag` holds (0 if none)."""
    index = torch.arange(flag.shape[-1], device=flag.device).expand_as(flag)
    return torch.where(flag, index, 0).cummax(-1).values


def key_intervals(owner: torch.Tensor, kind: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each query's allowed keys as two half-open intervals [a1, b1) ∪ [a2, b2), four (R, L) tensors."""
    index = torch.arange(owner.shape[-1], device=owner.device).expand_as(owner)  # (R, L)
    previous_owner = torch.nn.functional.pad(owner, (1, 0), value=-2)[:, :-1]
    previous_kind = torch.nn.functional.pad(kind, (1, 0), value=-1)[:, :-1]
    new_pair = owner != previous_owner
    pair_start = _starts(new_pair)  # (R, L)
    response_start = _starts((kind != PROMPT) & ((previous_kind == PROMPT) | new_pair))  # prompt end, once per pair
    rejected_start = _starts((kind == REJECTED) & ((previous_kind != REJECTED) | new_pair))
    rejected, pad = kind == REJECTED, kind == PAD
    a1 = torch.where(pad, index, pair_start)
    b1 = torch.where(rejected, response_start, index + 1)
    a2 = torch.where(rejected, rejected_start, 0)
    b2 = torch.where(rejected, index + 1, 0)
    return a1, b1, a2, b2


def block_tables(owner: torch.Tensor, kind: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full), two (R, nQ, nK) booleans over block×block tiles: the tile holds an allowed entry / only allowed
    ones. Tiles past the row's end count as masked (a tile that reaches past L is never full), as torch pads them."""
    rows, length = owner.shape
    n = -(-length // block)
    a1, b1, a2, b2 = key_intervals(owner, kind)
    k0 = torch.arange(n, device=owner.device) * block  # (nK,)
    k1 = (k0 + block).clamp(max=length)

    def overlap(a, b):  # (R, L, nK): how many keys of each tile lie in [a, b)
        return (torch.minimum(b[..., None], k1) - torch.maximum(a[..., None], k0)).clamp(min=0)

    count = overlap(a1, b1) + overlap(a2, b2)  # (R, L, nK)
    count = torch.nn.functional.pad(count, (0, 0, 0, n * block - length)).view(rows, n, block, n)  # (R, nQ, bq, nK)
    return (count > 0).any(2), (count == block).all(2)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, nQ, nK) bool -> (R, 1, nQ) counts and (R, 1, nQ, nK) kv block indices, the listed ones first (int32)."""
    counts = tiles.sum(-1, dtype=torch.int32)
    indices = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[:, None], indices[:, None]


def mask_mod(owner: torch.Tensor, kind: torch.Tensor):
    """FlexAttention's mask_mod for the packed layout; `owner`, `kind` (R, L') padded past L with padding."""

    def allowed(b, h, q, kv):
        same = (owner[b, q] == owner[b, kv]) & (owner[b, q] >= 0)
        hidden = (kind[b, q] == REJECTED) & (kind[b, kv] == CHOSEN)
        return (same & (kv <= q) & ~hidden) | (q == kv)

    return allowed


def packed_block_mask(owner: torch.Tensor, kind: torch.Tensor, block: int = BLOCK):
    """The packed layout's mask as a `BlockMask` for (R, L) rows, on the segment tensors' device."""
    from torch.nn.attention.flex_attention import BlockMask

    length = owner.shape[-1]
    any_tile, full = block_tables(owner, kind, block)
    partial = any_tile & ~full
    width = any_tile.shape[-1] * block
    # mask_mod may be asked about positions up to the last tile's end: look them up as padding.
    owner_p = torch.nn.functional.pad(owner, (0, width - length), value=-1)  # (R, L')
    kind_p = torch.nn.functional.pad(kind, (0, width - length), value=PAD)  # (R, L')
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block,
                                    mask_mod=mask_mod(owner_p, kind_p), seq_lengths=(length, length))


def flex_unsupported(model, device) -> str | None:
    """Why the packed layout cannot train `model` with FlexAttention on `device` (None: it can)."""
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    inner = getattr(model, "module", model)
    if not getattr(inner, "_supports_flex_attn", False):
        return f"transformers runs {type(inner).__name__} without flex attention"
    if torch.device(device).type != "cuda":
        return f"torch {torch.__version__}'s FlexAttention has no backward on {torch.device(device).type}"
    return None


def pairs_unsupported(model) -> str | None:
    """Why `model` cannot run the packed layout pair by pair (engine/pair_attention.py; None: it can)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "get_base_model", lambda: inner)()
    if not getattr(inner, "_supports_attention_backend", False):
        return f"transformers runs {type(inner).__name__} without its attention interface"
    config = inner.config
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return f"{type(inner).__name__} soft-caps its attention logits"
    if any(name.endswith("sinks") for name, _ in inner.named_parameters()):
        return f"{type(inner).__name__} has attention sinks"
    return None


def resolve_attention(requested: str, layout: str, model, device) -> str:
    """'sdpa', 'pairs' or 'flex' for a run: `auto` takes flex where it is supported (packed layout only); else, off
    CUDA (where pair by pair is measured: README, Performance), SDPA pair by pair for a model on transformers'
    attention interface; else SDPA with the dense mask. An explicit `flex` or `pairs` that cannot run is refused."""
    from dpolab.errors import ConfigError

    if requested == "sdpa" or layout != "packed":
        return "sdpa"
    reason = flex_unsupported(model, device)
    if requested == "flex" and reason is not None:
        raise ConfigError(f"attention flex: {reason}; use attention auto, pairs or sdpa")
    if requested == "flex" or (requested == "auto" and reason is None):
        return "flex"
    reason = pairs_unsupported(model)
    if requested == "pairs" and reason is not None:
        raise ConfigError(f"attention pairs: {reason}; use attention auto or sdpa")
    if requested == "auto" and torch.device(device).type == "cuda":
        return "sdpa"
    return "pairs" if reason is None else "sdpa"


def use_attention(model, attention: str) -> None:
    """Switch a loaded model's attention to the run's backend (transformers' name for it)."""
    from dpolab.engine import pair_attention

    inner = getattr(model, "module", model)
    wanted = {"flex": FLEX_IMPLEMENTATION, "pairs": pair_attention.IMPLEMENTATION}.get(attention, "sdpa")
    if wanted == pair_attention.IMPLEMENTATION:
        pair_attention.register()
    if inner.config._attn_implementation != wanted:
        inner.set_attn_implementation(wanted)
