"""DPO training throughput: TRL DPOTrainer vs dpolab, side by side in one run, same model, data and settings.

Configurations (each in its own subprocess, so peak RSS is its own; bench/trainbench.py says how each is measured):
  trl-default    TRL DPOTrainer as a user runs it: its defaults (bf16=True even on CPU, gradient checkpointing on,
                 the reference model run every step)
  trl-best-ckpt-off / trl-best-ckpt-on
                 TRL with its fastest options here: fp32 (native bf16 where the hardware has it),
                 precompute_ref_log_probs=True, gradient checkpointing off and on (off is not always faster: at
                 16 GB of activations it ran slower here); `trl-best` is the faster of the two that ran unloaded
  dpolab-padded  dpolab --layout padded (TRL's layout), otherwise dpolab's defaults
  dpolab         dpolab's defaults (packed prefix-shared layout, attention auto, gradient_checkpointing auto,
                 precision auto), the reference cache cold: computed before training, outside the timed section as
                 TRL's precompute is
  dpolab-warm    the same with the reference cache warm (no reference forward at all)
  dpolab-ckpt    dpolab forcing gradient checkpointing on (what `auto` picks when the step does not fit): the
                 memory/speed trade-off
  dpolab-sdpa    dpolab forcing attention sdpa: balanced rows and one SDPA per row with the dense mask, the fallback
                 of `auto`'s choice (pairs on CPU: SDPA pair by pair in one unpadded row; flex on CUDA, bench/gpu.sh)
Same model (SmolLM2-135M, first --layers layers), the same HH pairs in the same seeded order, same max_length, beta,
AdamW + linear schedule, 8 pairs per step. The acceptance targets of the issue are checked against trl-best and
written beside the figures; a configuration run under load is flagged and not compared.
Usage: python bench/dpo_vs_trl.py [--layers 30] [--pairs 32] [--steps 4] [--default-steps 1] [--only NAME …]
       [--model DIR [--random-weights]] [--data HH.jsonl.gz]  (bench/gpu.sh: a machine without the embedded model)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainbench as tb  # noqa: E402
from common import HH_DATA, write_result  # noqa: E402

CONFIGS = ["trl-default", "trl-best-ckpt-off", "trl-best-ckpt-on", "dpolab-padded", "dpolab-sdpa", "dpolab",
           "dpolab-warm", "dpolab-ckpt"]
TRL_BEST = ("trl-best-ckpt-off", "trl-best-ckpt-on")
BATCH, BETA, LR, MAX_LENGTH, SEED = 8, 0.1, 5e-6, 512, 42
TARGETS = {"speedup_vs_trl_best": 4.5, "max_loss_diff": 1e-4, "mfu": 0.55, "rss_vs_trl_best": 0.35,
           "token_efficiency": 0.99}


def load_model(source: str | None, random_weights: bool):
    """The embedded SmolLM2-135M-Instruct, or another model folder (its config alone with random_weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dpolab.models import embedded_model_dir, load_tokenizer

    if source is None:
        return (AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32),
                load_tokenizer("smollm2-135m-instruct"))
    if random_weights:
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(source)


def setup(work: Path, args) -> None:
    """A depth-reduced model and a prepared HH subset (pairs that fit max_length untruncated)."""
    from dpolab.config import DataConfig
    from dpolab.data.prepare import load_prepared, prepare_data

    layers, pairs = args.layers, args.pairs
    model, tokenizer = load_model(args.model, args.random_weights)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    prepare_data(DataConfig(dataset=str(args.data), template="raw", tokenizer=str(work / "model"), test_size=0.0,
                            max_length=MAX_LENGTH), work / "full", tokenizer=tokenizer)
    records = [r for r in load_prepared(work / "full").split("train")
               if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= MAX_LENGTH][:pairs]
    (work / "subset.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                                           "rejected": r["rejected"]}) + "\n" for r in records))
    prepare_data(DataConfig(dataset=str(work / "subset.jsonl"), template="raw", tokenizer=str(work / "model"),
                            test_size=0.0, max_length=MAX_LENGTH), work / "data", tokenizer=tokenizer)


def spec(work: Path, name: str, args, bf16: bool) -> dict:
    base = {"name": name, "work": str(work), "model": str(work / "model"), "data": str(work / "data"), "batch": BATCH,
            "steps": args.steps, "lr": LR, "beta": BETA, "max_length": MAX_LENGTH, "seed": SEED}
    if name == "trl-default":
        return {**base, "kind": "trl", "steps": args.default_steps, "precision": "default",
                "gradient_checkpointing": True, "precompute": False}
    if name in TRL_BEST:
        return {**base, "kind": "trl", "precision": "bf16" if bf16 else "fp32", "precompute": True,
                "gradient_checkpointing": name.endswith("-on")}
    return {**base, "kind": "dpolab", "cold": name != "dpolab-warm",
            "layout": "padded" if name == "dpolab-padded" else None,
            "attention": "sdpa" if name == "dpolab-sdpa" else None,
            "gradient_checkpointing": True if name == "dpolab-ckpt" else None}


def measure(work: Path, args) -> tuple[dict, dict]:
    """Every configuration in turn, each right after its own fp32 peak probe (and bf16 where native and used)."""
    bf16 = tb.native_bf16()
    results, peaks = {}, {"fp32_gflops": [], "bf16_gflops": []}
    for name in args.only:
        if name == "dpolab-warm" and "dpolab" not in results:
            tb.run_child(Path(__file__), {**spec(work, "dpolab", args, bf16), "steps": 1}, work)  # warm the cache
        peaks["fp32_gflops"].append(round(tb.matmul_peak("float32", args.peak_tries) / 1e9, 2))
        run = spec(work, name, args, bf16)
        if bf16:
            peaks["bf16_gflops"].append(round(tb.matmul_peak("bfloat16", args.peak_tries) / 1e9, 2))
        results[name] = tb.run_child(Path(__file__), run, work)
        results[name]["spec"] = run
        print(name, json.dumps({k: v for k, v in results[name].items() if k != "spec"}), flush=True)
    return results, peaks


def runs_bf16(name: str, result: dict) -> bool:
    spec = result["spec"]
    return spec["precision"] in ("bf16", "default") if spec["kind"] == "trl" else "bf16" in result.get("precision", "")


def table(results: dict, peaks: dict, facts: dict, max_foreign: float) -> dict:
    rows = {}
    for name, r in results.items():
        if "error" in r:
            rows[name] = {"error": r["error"], "watch": r["watch"]}
            continue
        bf16 = runs_bf16(name, r)
        peak = max(peaks["bf16_gflops"] if bf16 else peaks["fp32_gflops"], default=None)
        rows[name] = {**tb.rates(r, facts, BATCH, peak * 1e9 if peak else None), "peak_rss_mb": r["peak_rss_mb"],
                      "first_loss": r["losses"][0], "final_loss": r["losses"][-1], "steps": r["steps"],
                      "train_s": r["train_s"], "setup_s": r["setup_s"], "steady_step_s": r["steady_step_s"],
                      "bf16": bf16, "under_load": tb.under_load(r, max_foreign), "watch": r["watch"]}
        if bf16 and peak is None:
            rows[name]["mfu_note"] = "bf16 is not native here: its peak is not measured, so no MFU"
    ran = [n for n in TRL_BEST if "pairs_per_s" in rows.get(n, {}) and not rows[n]["under_load"]]
    if not ran:
        return rows
    best_name = max(ran, key=lambda n: rows[n]["pairs_per_s"])
    best = rows[best_name]
    for name, row in rows.items():
        if "error" not in row and not row["under_load"]:
            row["speedup_vs_trl_best"] = row["pairs_per_s"] / best["pairs_per_s"]
            row["rss_vs_trl_best"] = row["peak_rss_mb"] / best["peak_rss_mb"]
            n = min(len(results[name]["losses"]), len(results[best_name]["losses"]))
            row["max_loss_diff_vs_trl_best"] = max(abs(a - b) for a, b in zip(results[name]["losses"][:n],
                                                                                results[best_name]["losses"][:n]))
    rows["trl-best"] = {"is": best_name}
    return rows


def acceptance(rows: dict) -> dict:
    row = rows.get("dpolab", {})
    got = {"speedup_vs_trl_best": row.get("speedup_vs_trl_best"), "max_loss_diff": row.get("max_loss_diff_vs_trl_best"),
           "mfu": row.get("mfu"), "rss_vs_trl_best": row.get("rss_vs_trl_best"),
           "token_efficiency": row.get("token_efficiency")}
    at_most = ("max_loss_diff", "rss_vs_trl_best")
    return {k: {"value": v, "target": TARGETS[k], "met": None if v is None else
                (v <= TARGETS[k] if k in at_most else v >= TARGETS[k])} for k, v in got.items()}


def model_name(args) -> str:
    name = args.model or "SmolLM2-135M-Instruct (embedded)"
    return f"{name}{' (random weights)' if args.random_weights else ''}, first {args.layers} layers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers kept of SmolLM2-135M's 30")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--default-steps", type=int, default=1, help="steps for trl-default (very slow on CPU)")
    parser.add_argument("--peak-tries", type=int, default=5, help="matmul peak probes before each configuration")
    parser.add_argument("--max-foreign", type=float, default=0.15,
                        help="CPU cores' worth of other processes' work above which a configuration is flagged")
    parser.add_argument("--only", nargs="*", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--model", help="model folder instead of the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--random-weights", action="store_true", help="--model's config with random weights")
    parser.add_argument("--data", default=str(HH_DATA), help="HH pairs (default: ../shared/data/hh-rlhf)")
    args = tb.parse_args(parser)
    work = Path(args.work or tempfile.mkdtemp(prefix="dpolab-bench-"))
    setup(work, args)
    facts = tb.data_facts(work / "model", work / "data")
    print(f"work dir {work}; {model_name(args)}; {facts['pairs']} HH pairs", flush=True)
    results, peaks = measure(work, args)
    rows = table(results, peaks, facts, args.max_foreign)
    settings = {"model": model_name(args), "pairs": facts["pairs"],
                "batch_pairs": BATCH, "steps": args.steps, "trl_default_steps": args.default_steps,
                "max_length": MAX_LENGTH, "beta": BETA, "learning_rate": LR, "optimizer": "AdamW, linear schedule",
                "data": "HH harmless-base test pairs that fit 512 tokens, raw template", **facts,
                "matmul_peaks_gflops": peaks, "max_foreign_cores": args.max_foreign, "cpu_flags": tb.cpu_flags(),
                "native_bf16": tb.native_bf16()}
    accepted = acceptance(rows)
    path = write_result("dpo_vs_trl", {"settings": settings, "results": rows, "acceptance": accepted,
                                       "raw": results})
    print(f"{'config':<18}{'pairs/s':>9}{'tok eff':>8}{'MFU':>7}{'RSS MB':>8}{'loss':>8}{'x best':>8}{'foreign':>8}")
    for name, row in rows.items():
        if "error" in row or "is" in row:
            print(f"{name:<18} {row.get('error') or 'is ' + row['is']}")
            continue
        mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        print(f"{name:<18}{row['pairs_per_s']:>9.3f}{row['token_efficiency']:>8.3f}{mfu:>7}{row['peak_rss_mb']:>8.0f}"
              f"{row['final_loss']:>8.4f}{row.get('speedup_vs_trl_best', float('nan')):>8.2f}"
              f"{row['watch']['foreign_cores']:>8.2f}{'  UNDER LOAD' if row['under_load'] else ''}")
    print("acceptance:", json.dumps(accepted))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
