"""DPO training throughput: TRL DPOTrainer vs dpolab, side by side in one run, same model/data/settings.

Configurations (each in its own subprocess, so peak RSS is its own):
  1 trl-default    TRL DPOTrainer with its defaults as a user runs it (bf16=True even on CPU, reference each step)
  2 trl-best       TRL with dpolab's precision (fp32 here) and precompute_ref_log_probs=True
  3 dpolab-padded  dpolab --layout padded (reference cache cold: computed before training)
  4 dpolab-cold    dpolab packed + prefix-shared, reference cache cold
  5 dpolab-warm    dpolab packed + prefix-shared, reference cache warm (no reference forward at all)
Same model (SmolLM2-135M, first --layers layers), same HH pairs in the same order (transformers' seeded sampler),
same max_length, beta, AdamW + linear schedule, gradient checkpointing on, 8 pairs per step.

Useful model FLOPs per pair = 6·N_body·(P+C+R) + 6·d·V·(C+R): the policy's forward+backward over the unique tokens
(attention score FLOPs left out), with the LM head only where a label counts. MFU = useful FLOPs/s ÷ the fp32 matmul
peak measured here in the same run. Token efficiency = unique tokens (P+C+R) / tokens computed (padding included).
Usage: python bench/dpo_vs_trl.py [--layers 30] [--pairs 32] [--steps 4] [--default-steps 1]
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
from common import HH_DATA, write_result  # noqa: E402

CONFIGS = ["trl-default", "trl-best", "dpolab-padded", "dpolab-cold", "dpolab-warm"]
BATCH, BETA, LR, MAX_LENGTH, SEED = 8, 0.1, 5e-6, 512, 42


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 8) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def setup(work: Path, layers: int, pairs: int) -> dict:
    """A depth-reduced SmolLM2 and a prepared HH subset (pairs that fit max_length untruncated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.config import DataConfig
    from dpolab.data.prepare import load_prepared, prepare_data
    from dpolab.models import embedded_model_dir, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.float32)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    prepare_data(DataConfig(dataset=str(HH_DATA), template="raw", tokenizer=str(work / "model"), test_size=0.0,
                            max_length=MAX_LENGTH), work / "full", tokenizer=tokenizer)
    records = [r for r in load_prepared(work / "full").split("train")
               if len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= MAX_LENGTH][:pairs]
    (work / "subset.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"],
                                                           "rejected": r["rejected"]}) + "\n" for r in records))
    prepare_data(DataConfig(dataset=str(work / "subset.jsonl"), template="raw", tokenizer=str(work / "model"),
                            test_size=0.0, max_length=MAX_LENGTH), work / "data", tokenizer=tokenizer)
    n_body = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    recs = load_prepared(work / "data").split("train")
    return {"n_body": n_body, "hidden": model.config.hidden_size, "vocab": model.config.vocab_size,
            "unique_tokens": sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in recs),
            "response_tokens": sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in recs), "pairs": len(recs)}


class Recorder:
    """Wraps a collator to count tokens computed per batch."""

    def __init__(self, collate, count):
        self.collate, self.count, self.computed = collate, count, 0

    def __call__(self, features, *args, **kwargs):
        batch = self.collate(features, *args, **kwargs)
        self.computed += self.count(batch)
        return batch


def run_trl(work: Path, name: str, steps: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from dpolab.data.prepare import load_prepared

    recs = load_prepared(work / "data").split("train")
    # TRL appends EOS itself: hand it the texts without it, rendered exactly as dpolab renders them (raw template).
    dataset = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in recs])
    kwargs = {} if name == "trl-default" else {"bf16": False, "precompute_ref_log_probs": True}
    args = DPOConfig(output_dir=str(work / name), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                     beta=BETA, max_length=MAX_LENGTH, gradient_checkpointing=True, use_cpu=True, report_to="none",
                     save_strategy="no", logging_steps=1, seed=SEED, dataloader_num_workers=0, lr_scheduler_type="linear",
                     **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    recorder = Recorder(trainer.data_collator, lambda b: b["input_ids"].numel())
    trainer.data_collator = recorder
    setup_s = time.perf_counter() - started
    out = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_s": out.metrics["train_runtime"], "setup_s": setup_s, "steps": out.global_step, "losses": losses,
            "computed_tokens": recorder.computed}


def run_dpolab(work: Path, name: str, steps: int) -> dict:
    from dpolab.config import DataConfig, TrainConfig
    from dpolab.engine import trainer as trainer_module
    from dpolab.engine.train import run_training

    computed = []
    original = trainer_module.DPOCollator.__call__

    def counting(self, features, with_ref=True):
        batch = original(self, features, with_ref)
        if with_ref:
            computed.append(batch["computed_tokens"])
        return batch

    trainer_module.DPOCollator.__call__ = counting
    cfg = TrainConfig(output_dir=work / name, model=str(work / "model"), data=DataConfig(dataset=str(work / "data")),
                      layout="padded" if name == "dpolab-padded" else "packed", batch_size=BATCH, max_steps=steps,
                      learning_rate=LR, beta=BETA, gradient_checkpointing=True, eval_every="no", save_every="steps",
                      save_steps=10**6, report_to=[], logging_steps=1, seed=SEED, precision="fp32")
    result = run_training(cfg, overwrite=True)
    history = json.loads((work / name / "trainer_state.json").read_text())["log_history"]
    return {"train_s": result.metrics["train_runtime_s"], "setup_s": result.metrics["total_time_s"] - result.metrics["train_runtime_s"],
            "steps": result.metrics["global_step"], "losses": [h["loss"] for h in history if "loss" in h],
            "computed_tokens": sum(computed), "reference_pairs_computed": result.ref_pairs_computed}


def child(work: Path, name: str, steps: int) -> None:
    import shutil

    if name == "dpolab-cold" or name == "dpolab-padded":
        shutil.rmtree(work / "data" / "refcache", ignore_errors=True)
    result = run_trl(work, name, steps) if name.startswith("trl") else run_dpolab(work, name, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (work / f"{name}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers kept of SmolLM2-135M's 30")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--default-steps", type=int, default=1, help="steps for trl-default (very slow on CPU)")
    parser.add_argument("--only", nargs="*", default=CONFIGS)
    parser.add_argument("--child", nargs=2, metavar=("WORK", "NAME"), help=argparse.SUPPRESS)
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.default_steps if args.child[1] == "trl-default" else args.steps)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="dpolab-bench-"))
    facts = setup(work, args.layers, args.pairs)
    peaks = {"fp32_gflops": matmul_peak("float32") / 1e9, "bf16_gflops": matmul_peak("bfloat16") / 1e9}
    print(f"work dir {work}; model: SmolLM2-135M first {args.layers} layers; {facts['pairs']} HH pairs; peaks {peaks}",
          flush=True)
    results = {}
    for name in args.only:
        if name == "dpolab-warm" and "dpolab-cold" not in args.only:
            child(work, "dpolab-cold", 1)  # warm the cache
        started = time.perf_counter()
        cmd = [sys.executable, __file__, "--child", str(work), name, "--steps", str(args.steps),
               "--default-steps", str(args.default_steps)]
        subprocess.run(cmd, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        results[name] = json.loads((work / f"{name}.json").read_text())
        results[name]["wall_s"] = time.perf_counter() - started
        print(name, json.dumps(results[name]), flush=True)
    per_pair_unique = facts["unique_tokens"] / facts["pairs"]
    useful_flops_per_pair = (6 * facts["n_body"] * facts["unique_tokens"]
                             + 6 * facts["hidden"] * facts["vocab"] * facts["response_tokens"]) / facts["pairs"]
    rows = {}
    for name, r in results.items():
        pairs = r["steps"] * BATCH
        pps = pairs / r["train_s"]
        peak = peaks["bf16_gflops"] if name == "trl-default" else peaks["fp32_gflops"]
        rows[name] = {"pairs_per_s": pps, "useful_tokens_per_s": pps * per_pair_unique,
                      "computed_tokens_per_s": r["computed_tokens"] / r["train_s"],
                      "token_efficiency": per_pair_unique * pairs / r["computed_tokens"],
                      "mfu": pps * useful_flops_per_pair / (peak * 1e9), "peak_rss_mb": r["peak_rss_mb"],
                      "final_loss": r["losses"][-1], "first_loss": r["losses"][0], "steps": r["steps"],
                      "setup_s": r["setup_s"], "train_s": r["train_s"]}
    for name, row in rows.items():
        for base in ("trl-default", "trl-best"):
            if base in rows:
                row[f"speedup_vs_{base}"] = row["pairs_per_s"] / rows[base]["pairs_per_s"]
        if "trl-best" in rows:
            row["rss_vs_trl-best"] = row["peak_rss_mb"] / rows["trl-best"]["peak_rss_mb"]
    settings = {"model": f"SmolLM2-135M, first {args.layers} of 30 layers", "pairs": facts["pairs"], "batch_pairs": BATCH,
                "steps": args.steps, "trl_default_steps": args.default_steps, "max_length": MAX_LENGTH, "beta": BETA,
                "learning_rate": LR, "optimizer": "AdamW, linear schedule", "gradient_checkpointing": True,
                "data": "HH harmless-base test pairs that fit 512 tokens, raw template", "useful_flops_per_pair": useful_flops_per_pair,
                "unique_tokens_per_pair": per_pair_unique, "matmul_peaks_gflops": peaks}
    path = write_result("dpo_vs_trl", {"settings": settings, "results": rows, "raw": results})
    header = f"{'config':<15}{'pairs/s':>9}{'tok/s use':>10}{'tok/s comp':>11}{'tok eff':>8}{'MFU':>7}{'RSS MB':>8}{'loss':>8}{'x TRL1':>8}{'x TRL2':>8}"
    print(header)
    for name, row in rows.items():
        print(f"{name:<15}{row['pairs_per_s']:>9.3f}{row['useful_tokens_per_s']:>10.0f}{row['computed_tokens_per_s']:>11.0f}"
              f"{row['token_efficiency']:>8.2f}{row['mfu']:>7.1%}{row['peak_rss_mb']:>8.0f}{row['final_loss']:>8.4f}"
              f"{row.get('speedup_vs_trl-default', float('nan')):>8.2f}{row.get('speedup_vs_trl-best', float('nan')):>8.2f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
