"""Sweep outputs: the trials table (trials.csv), sweep.png, and best/ + best.json (the best finished trial)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any


def trial_rows(sweep, study) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        metrics_file = sweep.sweep_dir / "trials" / f"{t.number:03d}" / "metrics.json"
        best = (json.loads(metrics_file.read_text()).get("best") or {}) if metrics_file.is_file() and t.state.name == "COMPLETE" else {}
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({"trial": t.number, "state": t.state.name, **{f"param:{k}": v for k, v in t.params.items()},
                     "value": t.value, "eval_loss": best.get("loss"), "eval_accuracy": best.get("rewards/accuracies"),
                     "duration_s": round(duration, 1) if duration is not None else None,
                     "retry_of": t.user_attrs.get("retry_of")})
    return rows


def _plot(sweep, study, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    done = [t for t in study.get_trials(deepcopy=False) if t.value is not None]
    axes[0].plot([t.number for t in done], [t.value for t in done], "o", color="#4c72b0")
    axes[0].set_title(f"{sweep.objective} per trial")
    axes[0].set_xlabel("trial")
    for t in study.get_trials(deepcopy=False):
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            axes[1].plot(steps, [t.intermediate_values[s] for s in steps], "o-", label=f"trial {t.number} ({t.state.name.lower()})")
    axes[1].set_title(f"{sweep.objective} per epoch")
    axes[1].set_xlabel("epoch")
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(sweep, study) -> dict[str, Any]:
    rows = trial_rows(sweep, study)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(sweep.sweep_dir / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    _plot(sweep, study, sweep.sweep_dir / "sweep.png")
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    summary: dict[str, Any] = {"rows": rows, "best": None}
    if complete:
        best = min(complete, key=lambda t: t.value) if sweep.direction == "minimize" else max(complete, key=lambda t: t.value)
        source = sweep.sweep_dir / "trials" / f"{best.number:03d}"
        target = sweep.sweep_dir / "best"
        tmp = sweep.sweep_dir / ".best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("checkpoints", "checkpoints-incomplete", "data"))
        info = {"trial": best.number, "params": best.params, "value": best.value, "objective": sweep.objective}
        (tmp / "best.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        (sweep.sweep_dir / "best.json").write_text(json.dumps(info, indent=2))
        summary["best"] = info
    return summary


def trials_table(summary: dict[str, Any], sweep):
    from rich.table import Table

    rows = summary["rows"]
    params = [k for k in dict.fromkeys(k for row in rows for k in row) if k.startswith("param:")]
    table = Table(title=f"sweep {sweep.sweep_dir} ({sweep.objective}, {sweep.direction})", title_justify="left")
    for column in ["trial", "state", *[p.removeprefix("param:") for p in params], "eval loss", "accuracy", "seconds"]:
        table.add_column(column)
    best = (summary.get("best") or {}).get("trial")
    for row in rows:
        cells = [str(row["trial"]) + (" *" if row["trial"] == best else ""), row["state"].lower(),
                 *[f"{row.get(p):.3g}" if isinstance(row.get(p), float) else str(row.get(p, "")) for p in params],
                 f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "",
                 f"{row['eval_accuracy']:.3f}" if row["eval_accuracy"] is not None else "",
                 str(row["duration_s"] or "")]
        table.add_row(*cells)
    return table
