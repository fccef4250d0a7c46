"""A reward model and a DPO run on the same real HH pairs, then the reward model as an independent judge of the
DPO-tuned model over the base model: the figures of the README's "Reward models and judged win rates" table.

  1. prepare the first --rows pairs of ../shared/data/hh-rlhf (raw template, seeded split, --test-size held out)
  2. dpolab train --method reward on the train split (embedded SmolLM2-135M-Instruct + a one-output score head)
  3. dpolab train (DPO, sigmoid) on the same train split
  4. dpolab eval REWARD_RUN: held-out pairwise accuracy (Wilson 95% interval, n)
  5. dpolab eval DPO_RUN --judge REWARD_RUN: held-out preference metrics — incl. the embedded model's own log-prob
     ranking accuracy on the same pairs (`reference_ranking_accuracy`) — and base-vs-tuned answers to --prompts
     held-out prompts, judged: raw win rate (Wilson), length-controlled win rate, mean length change
Every step is the library function the CLI command runs. Usage:
  python bench/reward_judge_hh.py [--rows 2000] [--epochs 1] [--dpo-epochs 0.15] [--reward-lr 2e-5] [--prompts 40]
                                 [--max-length 384]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HH_DATA, cpu_flags, write_result  # noqa: E402


def _train(work: Path, name: str, method: str, args) -> tuple[float, dict]:
    from dpolab.config import DataConfig, TrainConfig
    from dpolab.engine.train import run_training

    started = time.perf_counter()
    options = {"beta": 0.1, "learning_rate": 5e-6} if method == "dpo" else {"learning_rate": args.reward_lr}
    epochs = args.dpo_epochs if method == "dpo" and args.dpo_epochs else args.epochs
    cfg = TrainConfig(output_dir=work / name, data=DataConfig(dataset=str(work / "data")), method=method,
                      batch_size=8, epochs=epochs, eval_every="epoch", save_total_limit=1, logging_steps=5,
                      report_to=[], seed=42, **options)
    result = run_training(cfg, overwrite=True)
    return time.perf_counter() - started, result.metrics


def _rate(metrics: dict, name: str, n_key: str = "pairs") -> dict:
    return {"value": metrics[name], "ci_low": metrics[f"{name}_ci_low"], "ci_high": metrics[f"{name}_ci_high"],
            "n": metrics[n_key]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2000, help="HH rows read (the first ones of the shared file; 2000: all)")
    parser.add_argument("--test-size", type=float, default=0.2)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--dpo-epochs", type=float, default=0.15,
                        help="epochs of the DPO run (0: --epochs); a fraction trains on the first pairs of its "
                             "seeded order and computes reference log-probs only for those")
    parser.add_argument("--reward-lr", type=float, default=2e-5,
                        help="full fine-tuning rate (TRL RewardConfig's 1e-4 left the reward model at chance here)")
    parser.add_argument("--prompts", type=int, default=40, help="held-out prompts answered by base and tuned, judged")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.evaluate.run import EvalOptions, run_eval

    started, timings = time.perf_counter(), {}
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="dpolab-rm-"))
    report = prepare_data(DataConfig(dataset=str(HH_DATA), template="raw", max_length=args.max_length,
                                     test_size=args.test_size, limit=args.rows), work / "data")
    timings["reward_train_s"], reward_train = _train(work, "reward", "reward", args)
    t = time.perf_counter()
    reward_eval = run_eval(EvalOptions(target=str(work / "reward")))
    timings["reward_eval_s"] = time.perf_counter() - t
    print("reward model held-out accuracy:", _rate(reward_eval["metrics"]["policy"], "accuracy"), flush=True)
    timings["dpo_train_s"], dpo_train = _train(work, "dpo", "dpo", args)
    t = time.perf_counter()
    dpo_eval = run_eval(EvalOptions(target=str(work / "dpo"), judge=str(work / "reward"), n_prompts=args.prompts,
                                    max_new_tokens=args.max_new_tokens))
    timings["dpo_eval_judged_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - started
    held_out, judge = dpo_eval["metrics"]["policy"], dpo_eval["judge"]
    table = {
        "reward_model_accuracy": _rate(reward_eval["metrics"]["policy"], "accuracy"),
        "embedded_logprob_ranking_accuracy": _rate(held_out, "reference_ranking_accuracy"),
        "dpo_implicit_reward_accuracy": _rate(held_out, "accuracy"),
        "judge_win_rate": {"value": judge["win_rate"], "ci_low": judge["ci_low"], "ci_high": judge["ci_high"],
                           "n": judge["prompts"]},
        "judge_lc_win_rate": {"value": judge["lc_win_rate"], "ci_low": judge["lc_ci_low"],
                              "ci_high": judge["lc_ci_high"], "n": judge["prompts"]},
        "mean_length_change_tokens": judge["mean_length_change"],
    }
    settings = {**vars(args), "data": str(HH_DATA.name), "pairs": {k: report.get(k) for k in ("rows_in", "rows_kept", "train", "test")}, "template": "raw",
                "reward": "lr %g, batch 8" % args.reward_lr, "dpo": "sigmoid, beta 0.1, lr 5e-6, batch 8, %g epochs" % (args.dpo_epochs or args.epochs),
                "cpu_flags": cpu_flags(),
                "load_before": load_before, "load_after": os.getloadavg()[0]}
    path = write_result("reward_judge_hh", {"settings": settings, "table": table, "timings_s": timings,
                                            "train_metrics": {"reward": reward_train, "dpo": dpo_train}})
    for name, row in table.items():
        print(f"{name:<36}", row)
    print(f"{timings['total_s']:.0f} s in all; -> {path}")


if __name__ == "__main__":
    main()
