"""Peak training memory, estimated before any weight is loaded, and the `gradient_checkpointing: auto` decision.

The estimate is the memory a run adds to its process (the process's own footprint at the time — interpreter,
libraries, tokenizer, prepared data — is already outside what the device reports as available):

    peak = max(training, reference pass)
    training  = W + G + O + A·T + M + head
    reference = W + W_ref + head_ref

    W = 4·P                 fp32 weights of the policy, P parameters (the master weights stay fp32 under autocast)
    G = 4·P_t               fp32 gradients of the P_t trainable parameters (P_t = P, or LoRA's adapter parameters)
    O = 8·P_t               AdamW's exp_avg and exp_avg_sq, fp32
                            (the step is torch's fused AdamW: it updates each parameter in place, without the
                            4·P_t temporary of the foreach kernels)
    A·T                     activations autograd keeps from forward to backward, A bytes per token × T tokens per
                            step (a half-precision copy of the weights, 2·P, on top under autocast: autocast's cache)
    M = 4·L·R·W²            the attention mask of a step of R rows W wide, which each of the L layers' sdpa turns
                            into an fp32 bias and keeps for backward (an upper bound: none for a padded batch
                            without padding, which runs causal without a mask; none with FlexAttention's BlockMask;
                            4·L·Σ pairᵢ² for attention pair by pair, each pair's own mask)
    head                    the output head (`logprobs.head_logps`): the fp32 (K, V) logits it keeps up to
                            KEEP_LOGITS_BYTES, two (min(K, chunk), V) fp32 buffers alive while a chunk's
                            log-sum-exp is taken (its logits and logsumexp's exp), and the (K, H) hidden states
                            it keeps; K kept positions, V vocabulary
    W_ref                   a separate reference model's fp32 weights (none when the policy is its own reference);
                            the reference pass runs under no_grad, so it keeps no activations, only head buffers

A per token (no checkpointing), for a decoder of L layers, hidden size H, MLP width I, attention heads n_h, with
b the activation element size (4 in fp32; 2 for matmul outputs under bf16/fp16 autocast, whose norms and residual
stream stay fp32):

    A = L·(4·6H + b·(5H + m·I) + c·2H + 4·n_h) + 4·2H

    6H fp32: per RMSNorm (two per layer) its input (the residual stream), the normalized x and the weighted output
    5H: the attention's q, k, v (k and v at full width: with a mask, sdpa's GQA path repeats the key/value heads),
        its output, and the contiguous copy o_proj keeps
    m·I: the MLP's saved intermediates, m = 4 for a gated MLP (gate, act(gate), up, their product) and 2 for a
        plain one (fc output, activation output)
    c·2H: under autocast the half-precision casts of the two norm outputs the projections keep (c = b; 0 in fp32)
    4·n_h: sdpa's log-sum-exp per head; the final norm's 2H fp32 close the sum
    plus b·m'·I once, backward's workspace: the MLP input gradients of the layer being differentiated, alive
    together (m' = 3 gated: of the product, of up and of act(gate); 2 plain)
    Attention scores are never held (the fused sdpa kernels on CPU and CUDA keep O(T) state); the packed layout's
    4D mask (R·W² bytes) is ignored.

With checkpointing on, A·T becomes L·4H·T (each layer's input) plus one layer's share recomputed during backward,
and M one layer's mask.

Token counts come from the run's own data: `step_shape` lays out the batch of the `batch_size` longest training
pairs with the run's collator and counts its positions (T, padding included), rows (R), width (W) and kept
positions (K). That batch is the largest a step can see (padded: 2B rows as wide as the longest sequence; packed:
⌈Σ/budget⌉ rows).
tests/test_memory.py checks the estimate against the measured peak RSS of training steps on CPU within 30% (the slow
test prints both); the README lists measured figures for a 20M-parameter Llama and the demo job.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("dpolab")

# Fraction of the device's available memory a run may plan to use. The estimate is tested to within 30% of the
# measured peak, so a run whose true peak is 1/0.75 = 1.33x its estimate still fits; the rest is left to what the
# estimate leaves out (allocator caches and fragmentation, a CUDA context and its workspaces, other processes that
# grow while the run lasts).
SAFETY_FRACTION = 0.75
HEAD_CHUNK = 1024  # rows per log-sum-exp chunk in logprobs.head_logps (its default `chunk`)


@dataclass(frozen=True)
class ModelShape:
    """What the memory of a decoder depends on, read from its config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    gated_mlp: bool


def model_shape(config) -> ModelShape:
    """Llama-style configs name these directly; GPT-2-style ones through their attribute map (n_embd, n_layer…),
    with n_inner (None: 4H) as the width of a plain, ungated MLP."""
    hidden = config.hidden_size
    gated = "intermediate_size" in config.to_dict()
    width = config.intermediate_size if gated else (getattr(config, "n_inner", None) or 4 * hidden)
    return ModelShape(layers=config.num_hidden_layers, hidden=hidden, intermediate=width,
                      heads=config.num_attention_heads, vocab=config.vocab_size, gated_mlp=gated)


def activation_bytes_per_token(shape: ModelShape, half: bool, checkpointing: bool = False) -> float:
    """A of the module docstring: bytes autograd keeps per token from forward to backward."""
    h, i = shape.hidden, shape.intermediate
    b, cast = (2, 2) if half else (4, 0)
    per_layer = 4 * 6 * h + b * (5 * h + (4 if shape.gated_mlp else 2) * i) + cast * 2 * h + 4 * shape.heads
    workspace = b * (3 if shape.gated_mlp else 2) * i
    if checkpointing:  # kept: each layer's input; recomputed in backward: one layer at a time
        return shape.layers * 4 * h + per_layer + 4 * 2 * h + workspace
    return shape.layers * per_layer + 4 * 2 * h + workspace


def head_bytes(kept: int, vocab: int, hidden: int, grad: bool, keep_limit: int) -> int:
    """The output head's buffers: with grad, the kept (K, V) fp32 logits (up to keep_limit) and the (K, H) hidden
    states; always two (chunk, V) buffers while a chunk's log-sum-exp is taken."""
    saved = (4 * kept * vocab if 4 * kept * vocab <= keep_limit else 0) + 4 * kept * hidden if grad else 0
    return saved + 2 * 4 * min(kept, HEAD_CHUNK) * vocab


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, by part (see the module docstring); `peak` is what the decision compares with the device."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    mask: int
    autocast_copies: int
    head: int
    reference: int
    tokens: int
    kept: int

    @property
    def training(self) -> int:
        live = self.activations + self.mask + self.autocast_copies + self.head
        return self.weights + self.grads + self.optimizer + live

    @property
    def peak(self) -> int:
        return max(self.training, self.reference)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "training": self.training, "peak": self.peak}


@dataclass(frozen=True)
class StepShape:
    """A step's batch as laid out: T = rows·width positions computed, K of them kept for the output head."""

    rows: int
    width: int
    kept: int
    pair_squares: int = 0  # Σ (tokens of a pair)²: the masks of attention pair by pair (engine/pair_attention.py)

    @property
    def tokens(self) -> int:
        return self.rows * self.width


def estimate_memory(shape: ModelShape, params: int, trainable: int, step: StepShape, *, half: bool = False,
                    checkpointing: bool = False, scored: bool = False, reference_params: int | None = None,
                    dense_mask: bool = True, pair_masks: bool = False, keep_limit: int = 256 * 2**20
                    ) -> MemoryEstimate:
    """The estimate of the module docstring. `scored`: a reward model's one-output head (no (K, V) buffers);
    `reference_params`: None without a reference pass, 0 when the policy is its own reference, else the
    separate reference model's parameters."""
    tokens, kept = step.tokens, step.kept
    head = 0 if scored else head_bytes(kept, shape.vocab, shape.hidden, True, keep_limit)
    reference = 0
    if reference_params is not None:
        reference = 4 * params + 4 * reference_params + head_bytes(kept, shape.vocab, shape.hidden, False, keep_limit)
    return MemoryEstimate(
        weights=4 * params, grads=4 * trainable, optimizer=8 * trainable,
        activations=math.ceil(activation_bytes_per_token(shape, half, checkpointing) * tokens),
        mask=4 * (1 if checkpointing else shape.layers) * mask_entries(step, dense_mask, pair_masks),
        autocast_copies=2 * params if half else 0, head=head, reference=reference, tokens=tokens, kept=kept)


def mask_entries(step: StepShape, dense_mask: bool, pair_masks: bool) -> int:
    """Entries of a step's attention mask: R·W² for the dense mask, Σ pair² for pair by pair, 0 for a BlockMask."""
    return step.rows * step.width**2 if dense_mask else step.pair_squares if pair_masks else 0


def decide_checkpointing(requested: bool | str, needed: int, available: int | None) -> bool:
    """Forced on or off as asked; `auto`: on only when the estimate without checkpointing exceeds what the device
    can give (SAFETY_FRACTION of its available memory). Unknown availability: off (no evidence it will not fit)."""
    if requested != "auto":
        return bool(requested)
    return available is not None and needed > SAFETY_FRACTION * available


# --------------------------------------------------------------------------------------------- the device
def _meminfo_available(text: str) -> int | None:
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), None when unlimited or unknown: a container
    limit is not visible in /proc/meminfo."""
    for limit_file, usage_file in (("memory.max", "memory.current"),
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        try:
            limit = (Path("/sys/fs/cgroup") / limit_file).read_text().strip()
            usage = int((Path("/sys/fs/cgroup") / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(int(limit) - usage, 0)
    return None


def available_memory(device: str) -> tuple[int | None, str]:
    """(bytes the device can still give, where that figure comes from)."""
    import torch

    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free, "torch.cuda.mem_get_info"
    try:
        available = _meminfo_available(Path("/proc/meminfo").read_text())
        source = "MemAvailable"
    except OSError:
        available, source = None, ""
    if available is None:
        import psutil

        available, source = psutil.virtual_memory().available, "psutil"
    room = _cgroup_room()
    if room is not None and room < available:
        return room, "cgroup limit"
    return available, source


def step_shape(records: list[dict[str, Any]], batch_size: int, collate) -> StepShape:
    """The largest batch of `records` as the run's collator lays it out (the module docstring)."""
    def size(record):
        return sum(len(record.get(name) or ()) for name in ("prompt_ids", "chosen_ids", "rejected_ids"))

    largest = sorted(records, key=size, reverse=True)[:batch_size]
    if not largest:
        return StepShape(0, 0, 0)
    batch = collate(largest, with_ref=False)
    rows, width = batch["input_ids"].shape  # (R, W)
    squares = 0
    if "owner" in batch:  # packed: tokens per pair
        import torch

        owner = batch["owner"]
        squares = int((torch.bincount(owner[owner >= 0]) ** 2).sum())
    return StepShape(rows, width, int(batch["logits_to_keep"].sum()), squares)


def fmt_bytes(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.2f} GiB"
