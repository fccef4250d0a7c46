"""Every method, dpolab vs the TRL trainer for the same method, side by side in one run: pairs/s and peak RSS.

  dpo    TRL DPOTrainer (sigmoid, precompute_ref_log_probs)  vs  dpolab --method dpo (packed, reference cache)
  simpo  TRL CPOTrainer (loss_type simpo, cpo_alpha 0)        vs  dpolab --method simpo (no reference at all)
  cpo    TRL CPOTrainer (sigmoid, cpo_alpha 1)                vs  dpolab --method cpo
  orpo   TRL ORPOTrainer                                      vs  dpolab --method orpo
  kto    TRL KTOTrainer (precompute_ref_log_probs)            vs  dpolab --method kto (unpaired, packed with its KL)
Same model (SmolLM2-135M, first --layers layers), same HH pairs (KTO: the same pairs as 2 unpaired rows each), fp32
for both, the same batch, max_length, β, AdamW + linear schedule, gradient checkpointing on. Each configuration runs
in its own process (so its peak RSS is its own); the reference pass (where there is one) is setup, not training time.
Usage: python bench/methods_vs_trl.py [--layers 30] [--pairs 32] [--steps 4] [--only dpo simpo ...]
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
from common import HH_DATA, cpu_flags, write_result  # noqa: E402
from dpo_vs_trl import BATCH, BETA, LR, MAX_LENGTH, SEED, setup  # noqa: E402

METHODS = ["dpo", "simpo", "cpo", "orpo", "kto"]


def _trl_args(config_cls, work: Path, name: str, steps: int, **extra):
    return config_cls(output_dir=str(work / name), per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
                      beta=BETA, max_length=MAX_LENGTH, gradient_checkpointing=True, use_cpu=True, bf16=False,
                      report_to="none", save_strategy="no", logging_steps=1, seed=SEED, dataloader_num_workers=0,
                      lr_scheduler_type="linear", **extra)


def _trl_trainer(work: Path, method: str, steps: int):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.data.prepare import load_prepared

    recs = load_prepared(work / "data").split("train")
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in recs]
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    name = f"trl-{method}"
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = _trl_args(DPOConfig, work, name, steps, precompute_ref_log_probs=True)
        return DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        rows = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"} for k in ("chosen", "rejected") for p in pairs]
        args = _trl_args(KTOConfig, work, name, steps, precompute_ref_log_probs=True)
        return KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer(model=model, args=_trl_args(ORPOConfig, work, name, steps),
                           train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    options = {"loss_type": "simpo", "cpo_alpha": 0.0} if method == "simpo" else {"loss_type": "sigmoid", "cpo_alpha": 1.0}
    return CPOTrainer(model=model, args=_trl_args(CPOConfig, work, name, steps, **options),
                      train_dataset=Dataset.from_list(pairs), processing_class=tokenizer)


def run_trl(work: Path, method: str, steps: int) -> dict:
    started = time.perf_counter()
    trainer = _trl_trainer(work, method, steps)
    setup_s = time.perf_counter() - started
    out = trainer.train()
    return {"train_s": out.metrics["train_runtime"], "setup_s": setup_s, "steps": out.global_step,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def run_dpolab(work: Path, method: str, steps: int) -> dict:
    from dpolab.config import DataConfig, TrainConfig
    from dpolab.engine.train import run_training

    data = work / ("data-unpaired" if method == "kto" else "data")
    cfg = TrainConfig(output_dir=work / f"dpolab-{method}", model=str(work / "model"), data=DataConfig(dataset=str(data)),
                      method=method, batch_size=BATCH, max_steps=steps, learning_rate=LR, beta=BETA,
                      gradient_checkpointing=True, eval_every="no", save_every="steps", save_steps=10**6, report_to=[],
                      logging_steps=1, seed=SEED, precision="fp32")
    result = run_training(cfg, overwrite=True)
    history = json.loads((work / f"dpolab-{method}" / "trainer_state.json").read_text())["log_history"]
    return {"train_s": result.metrics["train_runtime_s"], "steps": result.metrics["global_step"],
            "setup_s": result.metrics["total_time_s"] - result.metrics["train_runtime_s"],
            "losses": [h["loss"] for h in history if "loss" in h], "reference_pairs_computed": result.ref_pairs_computed}


def child(work: Path, name: str, steps: int) -> None:
    tool, method = name.split("-", 1)
    result = run_trl(work, method, steps) if tool == "trl" else run_dpolab(work, method, steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (work / f"{name}.json").write_text(json.dumps(result))


def workspace(prefix: str, layers: int, pairs: int) -> Path:
    """A new temporary folder holding SmolLM2-135M cut to `layers` layers and `pairs` prepared HH pairs."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    setup(work, argparse.Namespace(layers=layers, pairs=pairs, model=None, random_weights=False, data=HH_DATA))
    return work


def _prepare_unpaired(work: Path) -> None:
    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.models import load_tokenizer

    prepare_data(DataConfig(dataset=str(work / "subset.jsonl"), template="raw", tokenizer=str(work / "model"),
                            test_size=0.0, max_length=MAX_LENGTH, unpaired=True), work / "data-unpaired",
                 tokenizer=load_tokenizer(str(work / "model")))


def _load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30, help="decoder layers kept of SmolLM2-135M's 30")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", nargs="*", default=METHODS)
    parser.add_argument("--child", nargs=2, metavar=("WORK", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.steps)
        return
    from dpolab.data.prepare import load_prepared

    work = workspace("dpolab-methods-", args.layers, args.pairs)
    _prepare_unpaired(work)
    pairs = len(load_prepared(work / "data").split("train"))
    print(f"work dir {work}; SmolLM2-135M first {args.layers} layers; {pairs} HH pairs", flush=True)
    rows = {}
    for method in args.only:
        for tool in ("trl", "dpolab"):
            name, load_before = f"{tool}-{method}", _load()
            subprocess.run([sys.executable, __file__, "--child", str(work), name, "--steps", str(args.steps)], check=True,
                           env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            r = json.loads((work / f"{name}.json").read_text())
            examples = r["steps"] * BATCH  # pairs, or unpaired examples for KTO
            rows[name] = {**r, "per_s": examples / r["train_s"], "load_before": load_before, "load_after": _load()}
            print(name, json.dumps(rows[name]), flush=True)
    table = {}
    for method in args.only:
        ours, theirs = rows[f"dpolab-{method}"], rows[f"trl-{method}"]
        table[method] = {"dpolab_per_s": ours["per_s"], "trl_per_s": theirs["per_s"],
                         "speedup": ours["per_s"] / theirs["per_s"], "dpolab_rss_mb": ours["peak_rss_mb"],
                         "trl_rss_mb": theirs["peak_rss_mb"], "rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
                         "dpolab_first_loss": ours["losses"][0], "trl_first_loss": theirs["losses"][0]}
    settings = {"model": f"SmolLM2-135M, first {args.layers} of 30 layers", "pairs": pairs, "batch": BATCH,
                "steps": args.steps, "max_length": MAX_LENGTH, "beta": BETA, "learning_rate": LR, "precision": "fp32",
                "gradient_checkpointing": True, "unit": "pairs/s (kto: unpaired examples/s)",
                "cpu_flags": cpu_flags()}
    path = write_result("methods_vs_trl", {"settings": settings, "table": table, "raw": rows})
    print(f"{'method':<8}{'dpolab/s':>10}{'TRL/s':>8}{'x TRL':>7}{'RSS MB':>8}{'TRL MB':>8}{'RSS x':>7}")
    for method, row in table.items():
        print(f"{method:<8}{row['dpolab_per_s']:>10.3f}{row['trl_per_s']:>8.3f}{row['speedup']:>7.2f}"
              f"{row['dpolab_rss_mb']:>8.0f}{row['trl_rss_mb']:>8.0f}{row['rss_ratio']:>7.2f}")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
