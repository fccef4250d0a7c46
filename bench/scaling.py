"""How training cost grows: pairs/s, MFU and peak RSS against model size and against max_length, dpolab (its
defaults) and TRL (fp32, reference precomputed, gradient checkpointing on: the fastest of TRL's settings in
dpo_vs_trl.py on this machine kind, and one that fits at every length), each configuration in its own subprocess and
measured the way bench/trainbench.py says (fp32 peak probed right before it, load watched, flagged when other work
ran).

  size    SmolLM2-135M (the embedded model, real weights) and randomly initialised Llama shapes built from configs:
          ~360M (SmolLM2-360M's shape) and ~1B (16 layers of width 2048, MLP 8192, GQA 32/8 heads, the SmolLM2
          vocabulary; Llama-3.2-1B's body). HH pairs that fit 512 tokens, 8 pairs per step. Random weights change
          the losses, not the cost of a step.
  length  SmolLM2-135M at max_length 256/512/1024/2048. HH pairs are short, so each pair's prompt is lengthened
          with earlier HH dialogues (whole ones) until prompt + its longer response fills 70-100% of max_length:
          the cost at a length is the cost of pairs of about that length. 4 pairs per step.
pairs/s is the steady rate: a configuration's first step (allocator and kernel warm-up, the same for both tools) is
left out, so --steps 2 times one step after it. A configuration that fails (out of memory: the process is killed)
is recorded with its error, not left out.
Writes bench/results/scaling.json and scaling.png (pairs/s and peak RSS on log-log axes, the fitted exponent of
pairs/s against max_length in the legend). Usage:
  python bench/scaling.py [--axis size length] [--steps 2] [--sizes 135M 360M 1B] [--lengths 256 512 1024 2048]
                          [--trl-sizes 135M] [--trl-lengths 512 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainbench as tb  # noqa: E402
from common import HH_DATA, RESULTS, write_result  # noqa: E402

BETA, LR, SEED = 0.1, 5e-6, 42
SHAPES = {  # Llama configs of the random models (SmolLM2's tokenizer and vocabulary)
    "360M": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
             "num_key_value_heads": 5},
    "1B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8},
}


def model_dir(work: Path, size: str) -> Path:
    """The embedded model for 135M; a random Llama of SHAPES[size] (seeded, fp32, safetensors) otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpolab.models import embedded_model_dir, load_tokenizer

    if size == "135M":
        return embedded_model_dir()
    folder = work / f"model-{size}"
    if not (folder / "config.json").exists():
        config = AutoConfig.from_pretrained(embedded_model_dir())
        for key, value in SHAPES[size].items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
        torch.manual_seed(SEED)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        load_tokenizer("smollm2-135m-instruct").save_pretrained(folder)
    return folder


def hh_pairs(work: Path) -> list[dict]:
    """The shared HH pairs as dpolab renders them (raw template), with token counts."""
    from dpolab.config import DataConfig
    from dpolab.data.prepare import load_prepared, prepare_data
    from dpolab.models import embedded_model_dir

    if not (work / "hh").exists():
        prepare_data(DataConfig(dataset=str(HH_DATA), template="raw", tokenizer=str(embedded_model_dir()),
                                test_size=0.0, max_length=4096), work / "hh")
    return load_prepared(work / "hh").split("train")


def length_data(work: Path, pairs: list[dict], max_length: int, n: int) -> Path:
    """n pairs of 70-100% of max_length: each HH pair's prompt lengthened with whole earlier HH dialogues."""
    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.models import embedded_model_dir

    folder = work / f"data-len{max_length}"
    if folder.exists():
        return folder
    rows, fillers = [], iter(pairs[::-1])
    for pair in pairs:
        response = max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
        if response > max_length // 4:
            continue
        prefix, size = [], len(pair["prompt_ids"]) + response
        for filler in fillers:
            extra = len(filler["prompt_ids"]) + len(filler["chosen_ids"]) + 2
            if size + extra > max_length - 8:
                break
            prefix.append(filler["prompt"] + filler["chosen"])
            size += extra
        if size >= 0.7 * max_length:
            rows.append({"prompt": "\n\n".join(prefix + [pair["prompt"]]), "chosen": pair["chosen"],
                         "rejected": pair["rejected"]})
        if len(rows) == n:
            break
    (work / f"len{max_length}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare_data(DataConfig(dataset=str(work / f"len{max_length}.jsonl"), template="raw", test_size=0.0,
                            tokenizer=str(embedded_model_dir()), max_length=max_length), folder)
    return folder


def fit_data(work: Path, pairs: list[dict], n: int) -> Path:
    """The first n HH pairs that fit 512 tokens untruncated (dpo_vs_trl.py's set)."""
    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.models import embedded_model_dir

    folder = work / "data-fit512"
    if not folder.exists():
        rows = [r for r in pairs if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 512][:n]
        (work / "fit512.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")})
                                                   + "\n" for r in rows))
        prepare_data(DataConfig(dataset=str(work / "fit512.jsonl"), template="raw", test_size=0.0,
                                tokenizer=str(embedded_model_dir()), max_length=512), folder)
    return folder


def plan(work: Path, args) -> list[dict]:
    """One spec per configuration: the size axis, then the length axis."""
    base = {"work": str(work), "steps": args.steps, "lr": LR, "beta": BETA, "seed": SEED}
    trl = {"kind": "trl", "precision": "bf16" if tb.native_bf16() else "fp32", "gradient_checkpointing": True,
           "precompute": True}
    dpolab = {"kind": "dpolab", "cold": True}
    specs, pairs = [], hh_pairs(work)
    if "size" in args.axis:
        data = fit_data(work, pairs, 8 * args.steps)
        for size in args.sizes:
            for tool, extra in (("dpolab", dpolab), ("trl", trl)):
                if tool == "trl" and size not in args.trl_sizes:
                    continue
                specs.append({**base, **extra, "name": f"size-{size}-{tool}", "axis": "size", "size": size,
                              "tool": tool, "model": str(model_dir(work, size)), "data": str(data), "batch": 8,
                              "max_length": 512})
    if "length" in args.axis:
        for length in args.lengths:
            data = length_data(work, pairs, length, 4 * args.steps)
            for tool, extra in (("dpolab", dpolab), ("trl", trl)):
                if tool == "trl" and length not in args.trl_lengths:
                    continue
                specs.append({**base, **extra, "name": f"length-{length}-{tool}", "axis": "length", "size": "135M",
                              "tool": tool, "model": str(model_dir(work, "135M")), "data": str(data), "batch": 4,
                              "max_length": length})
    return specs


def row(spec: dict, result: dict, peak: float, max_foreign: float) -> dict:
    out = {k: spec[k] for k in ("axis", "size", "tool", "max_length", "batch")}
    out["watch"] = result["watch"]
    if "error" in result:
        return {**out, "error": result["error"]}
    facts = tb.data_facts(Path(spec["model"]), Path(spec["data"]))
    return {**out, **tb.rates(result, facts, spec["batch"], peak * 1e9, steady=True), "peak_rss_mb": result["peak_rss_mb"],
            "params_body": facts["body_params"], "unique_tokens_per_pair": facts["unique_tokens_per_pair"],
            "useful_flops_per_pair": facts["useful_flops_per_pair"],
            "steps": result["steps"], "train_s": result["train_s"], "step_s": result["step_s"],
            "setup_s": result["setup_s"],
            "first_loss": result["losses"][0], "gradient_checkpointing": result.get("gradient_checkpointing"),
            "under_load": tb.under_load(result, max_foreign)}


def exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log y against log x."""
    if len(points) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in points], [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def growth(rows: list[dict]) -> dict:
    """pairs/s ∝ x^k per tool and axis (x: body parameters, or max_length), from the rows that ran unloaded."""
    out = {}
    for axis, key in (("size", "params_body"), ("length", "max_length")):
        for tool in ("dpolab", "trl"):
            points = [(r[key], r["pairs_per_s"]) for r in rows if r["axis"] == axis and r["tool"] == tool
                      and "error" not in r and not r["under_load"]]
            out[f"{axis}/{tool}"] = {"exponent": exponent(points), "points": len(points)}
    return out


def plot(rows: list[dict], growth_: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (axis, key, label) in enumerate((("size", "params_body", "decoder-body parameters"),
                                              ("length", "max_length", "max_length (pairs of 70-100% of it)"))):
        for tool, style in (("dpolab", "o-"), ("trl", "s--")):
            pts = sorted((r[key], r) for r in rows if r["axis"] == axis and r["tool"] == tool and "error" not in r)
            if not pts:
                continue
            k = growth_[f"{axis}/{tool}"]["exponent"]
            name = f"{tool} (pairs/s ∝ x^{k:.2f})" if k is not None else tool
            axes[0][col].plot([x for x, _ in pts], [r["pairs_per_s"] for _, r in pts], style, label=name)
            axes[1][col].plot([x for x, _ in pts], [r["peak_rss_mb"] / 1024 for _, r in pts], style, label=tool)
        for ax, ylabel in ((axes[0][col], "pairs/s"), (axes[1][col], "peak RSS (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle("DPO training cost on this CPU: dpolab defaults vs TRL best (fp32, one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--axis", nargs="+", default=["size", "length"], choices=["size", "length"])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration")
    parser.add_argument("--sizes", nargs="+", default=["135M", "360M", "1B"], choices=["135M", *SHAPES])
    parser.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--trl-sizes", nargs="*", default=["135M"])
    parser.add_argument("--trl-lengths", nargs="*", type=int, default=[512, 1024])
    parser.add_argument("--peak-tries", type=int, default=3)
    parser.add_argument("--max-foreign", type=float, default=0.15)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one configuration may run")
    args = tb.parse_args(parser)
    work = Path(args.work or tempfile.mkdtemp(prefix="dpolab-scaling-"))
    specs, rows, peaks = plan(work, args), [], []
    for spec in specs:
        peaks.append(tb.matmul_peak("float32", args.peak_tries) / 1e9)
        result = tb.run_child(Path(__file__), spec, work, timeout=args.timeout)
        rows.append(row(spec, result, max(peaks), args.max_foreign))
        print(spec["name"], json.dumps(rows[-1]), flush=True)
    for r in rows:  # MFU against the best peak of the whole run (load only ever lowers a probe)
        if "error" not in r:
            r["mfu"] = r["pairs_per_s"] * r["useful_flops_per_pair"] / (max(peaks) * 1e9)
    growth_ = growth(rows)
    plot(rows, growth_, RESULTS / "scaling.png")
    settings = {"steps": args.steps, "beta": BETA, "learning_rate": LR, "precision": "fp32 (TRL) / auto (dpolab)",
                "fp32_matmul_peaks_gflops": [round(p, 2) for p in peaks], "cpu_flags": tb.cpu_flags(),
                "max_foreign_cores": args.max_foreign, "shapes": SHAPES}
    path = write_result("scaling", {"settings": settings, "rows": rows, "growth": growth_})
    print(f"{'config':<22}{'pairs/s':>9}{'MFU':>7}{'RSS GB':>8}{'tok eff':>8}")
    for spec, r in zip(specs, rows):
        if "error" in r:
            print(f"{spec['name']:<22} {r['error']}")
            continue
        print(f"{spec['name']:<22}{r['pairs_per_s']:>9.3f}{r['mfu']:>7.1%}{r['peak_rss_mb'] / 1024:>8.1f}"
              f"{r['token_efficiency']:>8.3f}{'  UNDER LOAD' if r['under_load'] else ''}")
    print("growth:", json.dumps(growth_), f"\n-> {path}")


if __name__ == "__main__":
    main()
