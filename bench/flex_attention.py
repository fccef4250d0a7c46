"""The packed layout's attention backends side by side: SDPA with the dense (R, 1, L, L) mask, FlexAttention with a
BlockMask built from the segments (engine/flex.py), and SDPA pair by pair (engine/pair_attention.py, `auto` on CPU). The real embedded SmolLM2-135M (30 layers), fp32,
gradient checkpointing on (dpolab's default), on HH pairs (qa template, max_length 512, the trainer's seeded order).

For each token budget N (1k, 4k, 16k) one step's pairs are the next ones of the order while they total <= N, laid
out with token_budget N: one row of L <= N tokens for every backend (a long row is where the mask's cost shows).
  mask      bytes and build time of the mask each backend gives the model (SDPA: the dense bool mask; flex: the
            block tables plus the mask_mod's lookup tables; pairs: each pair's own bool mask)
  step      one forward+backward through dpolab's path (batch_logps, the fused head), best of --repeats after a
            warm-up; skipped where its dense attention alone would run past --max-step-s (estimated from its FLOPs
            and the matmul peak measured here); where the backend has no backward on this device, its error
  forward   the same under no_grad (what the reference pass runs); flex's first call includes torch.compile
Usage: python bench/flex_attention.py [--budgets 1024 4096 16384] [--attentions sdpa flex pairs] [--repeats 1]
       [--max-step-s 120] [--keep] [--note TEXT]
  --keep    keep the rows of bench/results/flex_attention.json this run does not measure (a run killed part-way, e.g.
            by the kernel's OOM killer, can be completed without redoing the rest); --note records what happened
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainbench as tb  # noqa: E402
from common import HH_DATA, write_result  # noqa: E402

MAX_LENGTH, SEED = 512, 42


def pair_tokens(record: dict) -> int:
    return sum(len(record[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))


def step_pairs(records: list[dict], order: list[int], budget: int) -> list[dict]:
    pairs, total = [], 0
    for index in order:
        length = pair_tokens(records[index])
        if total + length > budget:
            break
        pairs.append(records[index])
        total += length
    return pairs


def mask_cost(batch: dict, attention: str) -> dict:
    """Bytes and build time of what the model's attention receives as its mask."""
    from dpolab.engine.flex import packed_block_mask
    from dpolab.engine.layout import packed_mask
    from dpolab.engine.pair_attention import pair_blocks

    started = time.perf_counter()
    if attention == "pairs":
        nbytes = sum(mask.numel() * mask.element_size() for *_, mask in pair_blocks(batch["owner"], batch["kind"]))
    elif attention == "sdpa":
        mask = packed_mask(batch["owner"], batch["kind"])
        nbytes = mask.numel() * mask.element_size()
    else:
        mask = packed_block_mask(batch["owner"], batch["kind"])
        closure = [c.cell_contents for c in mask.mask_mod.__closure__ or ()]
        tensors = [t for t in (*mask.as_tuple()[2:], *closure) if hasattr(t, "element_size")]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"mask_bytes": nbytes, "mask_build_s": round(time.perf_counter() - started, 4)}


def timed(fn, repeats: int) -> dict:
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return {"first_s": round(times[0], 3), "best_s": round(min(times[1:]), 3), "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def measure(model, batch: dict, attention: str, repeats: int, attention_flops: float, peak: float,
            max_step_s: float) -> dict:
    import torch

    from dpolab.engine.flex import flex_unsupported, use_attention
    from dpolab.engine.logprobs import batch_logps

    use_attention(model, attention)
    row: dict = mask_cost(batch, attention)

    def step():
        model.zero_grad(set_to_none=True)
        logps = batch_logps(model, batch)
        logps.sum().backward()

    estimate = 4 * attention_flops / peak  # forward + checkpoint recompute + backward (2x) of the attention scores
    row["attention_step_estimate_s"] = round(estimate, 1)
    if attention == "flex" and flex_unsupported(model, "cpu") is not None:
        try:  # record what torch says, not only what we expect it to say
            row["step"] = timed(step, repeats)
        except (NotImplementedError, RuntimeError) as exc:
            row["step_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    elif estimate > max_step_s:
        row["step_skipped"] = f"dense attention alone ~{estimate:.0f} s per step (> --max-step-s {max_step_s:.0f})"
    else:
        row["step"] = timed(step, repeats)
    if attention == "sdpa" and estimate / 4 > max_step_s:
        row["forward_skipped"] = f"dense attention alone ~{estimate / 4:.0f} s per forward (> --max-step-s)"
    else:
        with torch.no_grad():
            row["forward"] = timed(lambda: batch_logps(model, batch), repeats)
    model.zero_grad(set_to_none=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--max-step-s", type=float, default=120.0)
    parser.add_argument("--attentions", nargs="+", default=["sdpa", "flex", "pairs"], choices=["sdpa", "flex", "pairs"])
    parser.add_argument("--keep", action="store_true", help="keep the earlier result file's other rows")
    parser.add_argument("--note", help="a note stored with the result")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.config import DataConfig
    from dpolab.data.prepare import build
    from dpolab.engine.layout import packed_batch
    from dpolab.engine.trainer import SeededOrder
    from dpolab.models import embedded_model_dir, load_tokenizer

    load_start = os.getloadavg()
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    records = build(DataConfig(dataset=str(HH_DATA), template="qa", max_length=MAX_LENGTH, test_size=0.0),
                    tokenizer)[0]
    order = SeededOrder.order(len(records), SEED)
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    config = model.config
    peak = tb.matmul_peak("float32")
    rows = earlier_rows() if args.keep else {}
    for budget in args.budgets:
        pairs = step_pairs(records, order, budget)
        for attention in args.attentions:
            batch = packed_batch(pairs, tokenizer.pad_token_id, budget, attention=attention)
            width = batch["input_ids"].shape[1]
            # QKᵀ and PV over every (query, key) of the row, all heads and layers: what a dense mask makes the kernel do
            # (pairs: over each pair's own span only)
            squares = sum(pair_tokens(p) ** 2 for p in pairs) if attention == "pairs" else width * width
            flops = 4 * squares * config.num_attention_heads * config.head_dim * config.num_hidden_layers
            row = {"pairs": len(pairs), "rows": batch["input_ids"].shape[0], "width": width,
                   "real_tokens": batch["real_tokens"], "computed_tokens": batch["computed_tokens"]}
            row.update(measure(model, batch, attention, args.repeats, flops, peak, args.max_step_s))
            rows[f"{attention}-{budget}"] = row
            print(attention, budget, row, flush=True)
            path = write_result("flex_attention", {"settings": settings(args, peak, load_start), "rows": rows})
    print(f"-> {path}")


def earlier_rows() -> dict:
    from common import RESULTS

    path = RESULTS / "flex_attention.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    return {name: {**row, "run": earlier.get("date")} for name, row in earlier.get("rows", {}).items()}


def settings(args, peak: float, load_start) -> dict:
    return {"model": "SmolLM2-135M (embedded, 30 layers)", "precision": "fp32", "gradient_checkpointing": True,
            "data": "HH harmless-base test 2000, qa, max_length 512, seeded order 42", "repeats": args.repeats,
            "max_step_s": args.max_step_s, "fp32_matmul_peak_gflops": round(peak / 1e9, 1),
            "cpu_flags": tb.cpu_flags(),
            "load_average_start": load_start, "load_average_now": os.getloadavg(), "note": args.note}


if __name__ == "__main__":
    main()
