"""`dpolab eval` of a reward run (`--method reward`): how well its scores rank the held-out pairs. No generations:
a reward model scores text, it does not write any.

Every pair is scored by the same path as in training (engine/scores.py: both responses in one packed forward, each
score read where `AutoModelForSequenceClassification` pools), so eval and the logged eval_accuracy agree. Writes
eval.json (through the run folder's names) and a short report.md beside it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpolab.errors import EvalError
from dpolab.evaluate.metrics import wilson_interval


def reward_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> dict[str, Any]:
    """Pairwise accuracy r(chosen) > r(rejected) (ties half, as the policy metrics) with its 95% Wilson interval and
    n, the margins r(chosen) − r(rejected), the mean scores, and the Bradley–Terry loss mean(−log σ(margin))."""
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    n = len(margins)
    wins = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins)
    low, high = wilson_interval(wins, n)
    nan = float("nan")
    return {
        "pairs": n, "accuracy": wins / n if n else nan, "accuracy_ci_low": low, "accuracy_ci_high": high,
        "margin_mean": statistics.fmean(margins) if n else nan, "margin_median": statistics.median(margins) if n else nan,
        "chosen_reward_mean": statistics.fmean(chosen) if n else nan,
        "rejected_reward_mean": statistics.fmean(rejected) if n else nan,
        "loss": float(torch.nn.functional.softplus(-torch.tensor(margins, dtype=torch.float64)).mean()) if n else nan,
    }


def pair_scores(model, records: list[dict], collate, batch_size: int) -> tuple[list[float], list[float]]:
    """(chosen, rejected) scores per record, `batch_size` pairs per forward."""
    from dpolab.engine.layout import to_device
    from dpolab.engine.scores import batch_scores

    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(records), batch_size):
            part = records[start : start + batch_size]
            scores = batch_scores(model, to_device(collate(part, with_ref=False), model.device))  # (2B,)
            chosen += scores[: len(part)].tolist()
            rejected += scores[len(part) :].tolist()
    return chosen, rejected


def evaluate_reward(info, records: list[dict], prepared, tokenizer, collate, opts, started: float) -> dict[str, Any]:
    """The eval of a reward run on `records` (the held-out pairs run_eval resolved): eval.json + report.md."""
    from dpolab.folders.run import EVAL_JSON
    from dpolab.fsutil import atomic_write_text
    from dpolab.models import load_reward_model

    if "label" in records[0]:
        raise EvalError(f"{prepared.path if prepared else opts.data} holds unpaired examples; a reward model is "
                        "evaluated on pairs (chosen vs rejected)")
    model = load_reward_model(info.model, tokenizer.pad_token_id).eval()
    chosen, rejected = pair_scores(model, records, collate, opts.batch_size)
    result = {"model": info.model, "method": "reward", "template": info.template,
              "data": str(prepared.path) if prepared else opts.data,
              "metrics": {"policy": reward_metrics(chosen, rejected)},
              "margins": [c - r for c, r in zip(chosen, rejected)],
              "scores": {"chosen": chosen, "rejected": rejected}, "seconds": round(time.perf_counter() - started, 1)}
    out = Path(opts.out) if opts.out else (info.run.eval_dir if info.run else Path("eval"))
    atomic_write_text(out / EVAL_JSON, json.dumps(result, indent=2))
    atomic_write_text(out / "report.md", report_markdown(result))
    return result


def _lines(result: dict[str, Any]) -> list[tuple[str, str]]:
    m = result["metrics"]["policy"]
    return [("held-out pairs (n)", str(m["pairs"])),
            ("pairwise accuracy (95% CI)", f"{m['accuracy']:.3f} ({m['accuracy_ci_low']:.3f}–{m['accuracy_ci_high']:.3f})"),
            ("mean margin", f"{m['margin_mean']:.4f}"), ("median margin", f"{m['margin_median']:.4f}"),
            ("mean reward chosen / rejected", f"{m['chosen_reward_mean']:.4f} / {m['rejected_reward_mean']:.4f}"),
            ("Bradley–Terry loss", f"{m['loss']:.4f}"), ("time", f"{result['seconds']} s")]


def report_markdown(result: dict[str, Any]) -> str:
    rows = "\n".join(f"| {name} | {value} |" for name, value in _lines(result))
    return (f"# Reward model evaluation\n\nModel `{result['model']}` · data `{result['data']}`\n\n"
            f"| | |\n|---|---|\n{rows}\n\nAccuracy: share of held-out pairs whose chosen response scores above the "
            "rejected one (ties ½); the interval is Wilson's.\n")


def reward_table(result: dict[str, Any]):
    """The terminal summary of a reward eval."""
    from rich.table import Table

    table = Table(title="evaluation of a reward run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in _lines(result):
        table.add_row(name, value)
    return table
