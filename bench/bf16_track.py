"""Does bf16 autocast (over fp32 master weights) track fp32 training? The embedded SmolLM2-135M-Instruct trained with
DPO on the same real HH pairs, same seed and pair order, once per precision; reported: the largest gap between the
two training-loss curves (step by step), and each run's held-out eval loss and reward accuracy after training.

  1. prepare the first --rows pairs of ../shared/data/hh-rlhf (raw template, seeded split, --test-size held out)
  2. dpolab train, precision fp32, --steps optimizer steps, evaluated on the held-out pairs at the end
  3. the same with precision bf16 (its reference log-probs are computed under bf16 too: another cache file)
Meant for hardware with native bf16 (a GPU of compute capability 8.0+, a CPU with AVX512-BF16 or AMX): on a CPU
without it bf16 is emulated and each step several times slower than fp32. `--steps 2 --rows 48` is a smoke test of
the script (its figures are printed, not written to bench/results). Usage:
  python bench/bf16_track.py [--steps 50] [--rows 600] [--batch-size 8] [--max-length 384]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HH_DATA, write_result  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def train(work: Path, precision: str, args) -> dict:
    import json

    from dpolab.config import DataConfig, TrainConfig
    from dpolab.engine.train import run_training

    started = time.perf_counter()
    cfg = TrainConfig(output_dir=work / precision, data=DataConfig(dataset=str(work / "data")), precision=precision,
                      max_steps=args.steps, batch_size=args.batch_size, learning_rate=5e-6, beta=0.1, seed=42,
                      eval_every="steps", eval_steps=args.steps, save_every="steps", save_steps=args.steps,
                      save_total_limit=1, logging_steps=1, report_to=[])
    metrics = run_training(cfg, overwrite=True).metrics
    history = json.loads((work / precision / "trainer_state.json").read_text())["log_history"]
    return {"losses": [h["loss"] for h in history if "loss" in h], "eval_loss": metrics["final"]["loss"],
            "reward_accuracy": metrics["final"]["rewards/accuracies"], "train_runtime_s": metrics["train_runtime_s"],
            "total_s": round(time.perf_counter() - started, 1),
            "gradient_checkpointing": metrics["memory"]["gradient_checkpointing"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rows", type=int, default=600, help="HH rows read (the first ones of the shared file)")
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=384)
    args = parser.parse_args()

    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.runtime import auto_precision, machine_facts, resolve_runtime

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="dpolab-bf16-"))
    report = prepare_data(DataConfig(dataset=str(HH_DATA), template="raw", max_length=args.max_length,
                                     test_size=args.test_size, limit=args.rows), work / "data")
    runs = {precision: train(work, precision, args) for precision in PRECISIONS}
    fp32, bf16 = runs["fp32"]["losses"], runs["bf16"]["losses"]
    gaps = [abs(a - b) for a, b in zip(fp32, bf16)]
    device = resolve_runtime("fp32").device
    table = {"max_loss_gap": max(gaps), "max_loss_gap_step": gaps.index(max(gaps)) + 1,
             "final_loss_gap": gaps[-1],
             **{f"{p}_{k}": runs[p][k] for p in PRECISIONS for k in ("eval_loss", "reward_accuracy", "train_runtime_s")}}
    settings = {**vars(args), "data": HH_DATA.name, "template": "raw", "dpo": "sigmoid, beta 0.1, lr 5e-6",
                "pairs": {k: report.get(k) for k in ("train", "test")}, "device": device,
                "auto_precision": auto_precision(device, **machine_facts(device)),
                "load_before": load_before, "load_after": os.getloadavg()}
    for name, value in table.items():
        print(f"{name:<28}", value)
    if args.steps < 50:
        print(f"smoke run ({args.steps} steps): not written to bench/results")
        return
    print("->", write_result("bf16_track", {"settings": settings, "table": table, "runs": runs}))


if __name__ == "__main__":
    main()
