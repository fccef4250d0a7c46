"""The output head's two paths side by side: kept logits (K, V) vs `head_logps` (hidden states, chunked log-sum-exp,
logits recomputed in backward). One forward+backward of a preference batch on real HH pairs, each path in its own
process so its peak RSS is its own; the step time is the best of --repeats after one warm-up.

  logits  model(...).logits at the kept positions, then token_logps (the path for heads that are not a plain Linear)
  keep    the model returns the kept hidden states; head_logps keeps one fp32 (K, V) logits buffer for backward
  fused   the same, logits recomputed chunk by chunk in backward (no K·V buffer at all)
Both with and without the prompts' own tokens (ORPO's NLL needs them: K roughly doubles on HH).
Usage: python bench/head_logps.py [--layers 30] [--pairs 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_flags, write_result  # noqa: E402
from dpo_vs_trl import MAX_LENGTH, setup  # noqa: E402


def child(work: Path, path: str, prompts: bool, pairs: int, repeats: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.data.prepare import load_prepared
    from dpolab.engine import logprobs as LP
    from dpolab.engine.layout import packed_batch

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32, attn_implementation="sdpa")
    model.gradient_checkpointing_enable()
    model.train()
    if path == "logits":
        LP.fused_head = lambda model: None
    LP.KEEP_LOGITS_BYTES = 2**62 if path == "keep" else 0
    recs = load_prepared(work / "data").split("train")[:pairs]
    batch = packed_batch(recs, 0, 2 * MAX_LENGTH, prompt_targets=prompts)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logps = LP.batch_logps(model, batch)
        (logps.sum() / logps.shape[0]).backward()
        times.append(time.perf_counter() - started)
    return {"step_s": min(times[1:]), "kept_positions": int(batch["logits_to_keep"].sum()),
            "targets": int(batch["target_ids"].shape[0]), "tokens": int(batch["input_ids"].numel()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "logps": logps.detach().tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, path, prompts = Path(args.child[0]), args.child[1], args.child[2] == "1"
        result = child(work, path, prompts, args.pairs, args.repeats)
        (work / f"{path}-{int(prompts)}.json").write_text(json.dumps(result))
        return
    work = Path(tempfile.mkdtemp(prefix="dpolab-head-"))
    setup(work, args.layers, args.pairs)
    rows = {}
    for prompts in (False, True):
        for path in ("logits", "keep", "fused"):
            load_before = os.getloadavg()[0]
            subprocess.run([sys.executable, __file__, "--child", str(work), path, str(int(prompts)), "--pairs",
                            str(args.pairs), "--repeats", str(args.repeats)], check=True)
            r = json.loads((work / f"{path}-{int(prompts)}.json").read_text())
            rows[f"{path}{'+prompts' if prompts else ''}"] = {**r, "load_before": load_before,
                                                              "load_after": os.getloadavg()[0]}
    table = {}
    for prompts in ("", "+prompts"):
        a, k, b = rows[f"logits{prompts}"], rows[f"keep{prompts}"], rows[f"fused{prompts}"]
        rel = max(abs(x - y) / abs(y) for r in (k, b) for x, y in zip(r["logps"], a["logps"], strict=True))
        table[f"response{prompts}"] = {
            "kept_positions": a["kept_positions"], "logits_rss_mb": a["peak_rss_mb"], "keep_rss_mb": k["peak_rss_mb"],
            "fused_rss_mb": b["peak_rss_mb"], "logits_step_s": a["step_s"], "keep_step_s": k["step_s"],
            "fused_step_s": b["step_s"], "keep_time_ratio": k["step_s"] / a["step_s"],
            "fused_time_ratio": b["step_s"] / a["step_s"], "max_rel_logp_diff": rel}
    for row in rows.values():
        row.pop("logps")
    settings = {"model": f"SmolLM2-135M, first {args.layers} of 30 layers", "pairs": args.pairs, "precision": "fp32",
                "gradient_checkpointing": True, "layout": "packed", "repeats": args.repeats,
                "cpu_flags": cpu_flags()}
    path = write_result("head_logps", {"settings": settings, "table": table, "raw": rows})
    for name, row in table.items():
        print(name, json.dumps(row))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
