"""Sweep outputs: the trials table (trials.csv), sweep.png, and best/ + best.json (the best finished trial).

The table comes from the study alone (parameters, objective, state, eval metrics and host are trial attributes), so
`dpolab sweep --report` on any worker's machine rebuilds it, whichever machines ran the trials. best/ is a copy of a
run folder, so only the machine that ran the best trial (or shares its filesystem) has one.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dpolab.folders.sweep import SweepFolder
from dpolab.fsutil import atomic_write_text, file_lock


def _eval_metrics(folder: SweepFolder, trial) -> tuple[Any, Any]:
    """(eval loss, accuracy) of a finished trial: its attributes, or its run folder for a study written before."""
    if "eval_loss" in trial.user_attrs:
        return trial.user_attrs["eval_loss"], trial.user_attrs.get("eval_accuracy")
    metrics = folder.trial(trial.number).read_metrics() if trial.state.name == "COMPLETE" else None
    best = (metrics or {}).get("best") or {}
    return best.get("loss"), best.get("rewards/accuracies")


JUDGE_COLUMNS = {"judge_win_rate": "win rate", "judge_lc_win_rate": "LC win rate"}


def trial_rows(sweep, study) -> list[dict[str, Any]]:
    rows = []
    folder = SweepFolder(sweep.sweep_dir)
    for t in study.get_trials(deepcopy=False):
        loss, accuracy = _eval_metrics(folder, t)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        judged = {k: t.user_attrs[k] for k in JUDGE_COLUMNS if k in t.user_attrs}  # judge objectives only
        rows.append({"trial": t.number, "state": t.state.name, **{f"param:{k}": v for k, v in t.params.items()},
                     "value": t.value, "eval_loss": loss, "eval_accuracy": accuracy, **judged,
                     "duration_s": round(duration, 1) if duration is not None else None,
                     "host": t.user_attrs.get("host"), "retry_of": t.user_attrs.get("retry_of")})
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


def best_trial(sweep, study):
    """The finished trial with the best objective (the first of equals), or None."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE" and t.value is not None]
    if not complete:
        return None
    return (min if sweep.direction == "minimize" else max)(complete, key=lambda t: t.value)


def update_best(sweep, study, log=None) -> dict[str, Any] | None:
    """best.json := the study's best trial; best/ := a copy of its run folder where that folder is: whichever
    worker finishes the best trial materialises it (each worker calls this after each finished trial)."""
    best = best_trial(sweep, study)
    if best is None:
        return None
    info = {"trial": best.number, "params": best.params, "value": best.value, "objective": sweep.objective,
            "host": best.user_attrs.get("host")}
    folder = SweepFolder(sweep.sweep_dir)
    here = folder.trial(best.number).is_finished()
    with file_lock(folder.report_lock):  # workers sharing the folder may finish at the same moment
        folder.write_best(best.number, info, materialise=here)
    if not here and log is not None:
        host = info["host"] or "another machine"
        log(f"best trial {best.number}: its run folder is not here, so best/ is in the sweep folder of the worker "
            f"that ran it, on {host} (best.json here names it)")
    return info


def _csv(rows: list[dict[str, Any]]) -> str:
    handle = io.StringIO()
    writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for row in rows for k in row)), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return handle.getvalue()


def write_report(sweep, study, log=None) -> dict[str, Any]:
    folder = SweepFolder(sweep.sweep_dir)
    rows = trial_rows(sweep, study)
    with file_lock(folder.report_lock):
        atomic_write_text(folder.trials_csv, _csv(rows))
        _plot(sweep, study, folder.plot_file)
    return {"rows": rows, "best": update_best(sweep, study, log)}


def load_sweep(sweep_dir: Path, storage_url: str | None = None, log=None) -> tuple[Any, Any]:
    """(config, study) of a sweep folder, read only: its sweep.yaml and its study (a SweepError, one line, when the
    folder is not a sweep or has no study yet). The config's sweep_dir is the folder asked for, wherever it ran."""
    from pydantic import ValidationError

    from dpolab.errors import SweepError
    from dpolab.sweep.config import SweepConfig
    from dpolab.sweep.study import open_study

    folder = SweepFolder(sweep_dir)
    tree = folder.read_config_tree()
    try:
        cfg = SweepConfig.model_validate(tree)
    except ValidationError as exc:
        raise SweepError(f"{folder.config_file}: not a sweep config this dpolab reads ({exc.errors()[0]['msg']})") from None
    if storage_url is None and not folder.journal_file.is_file():
        raise SweepError(f"{folder.path} has no study ({folder.journal_file.name}); pass --storage URL where its "
                         "study lives")
    name = cfg.sweep_dir.name  # the study is named by the sweep_dir its workers ran with
    cfg = cfg.model_copy(update={"sweep_dir": folder.path})  # the folder asked for, wherever the sweep ran from
    return cfg, open_study(cfg, storage_url, log=log, study_name=name, create=False)


def report_sweep(sweep_dir: Path, storage_url: str | None = None, log=None) -> tuple[dict[str, Any], Any]:
    """`dpolab sweep --report DIR`: rewrite the table, plot and best/ of a sweep folder from its study alone (a
    folder holding only the sweep's sweep.yaml will do, with --storage naming the study's database)."""
    cfg, study = load_sweep(sweep_dir, storage_url, log)
    return write_report(cfg, study, log), cfg


def trials_table(summary: dict[str, Any], sweep):
    from rich.table import Table

    rows = summary["rows"]
    params = [k for k in dict.fromkeys(k for row in rows for k in row) if k.startswith("param:")]
    table = Table(title=f"sweep {sweep.sweep_dir} ({sweep.objective}, {sweep.direction})", title_justify="left")
    judged = [k for k in JUDGE_COLUMNS if any(k in row for row in rows)]
    for column in ["trial", "state", *[p.removeprefix("param:") for p in params], "eval loss", "accuracy",
                   *[JUDGE_COLUMNS[k] for k in judged], "seconds", "host"]:
        table.add_column(column)
    best = (summary.get("best") or {}).get("trial")
    for row in rows:
        cells = [str(row["trial"]) + (" *" if row["trial"] == best else ""), row["state"].lower(),
                 *[f"{row.get(p):.3g}" if isinstance(row.get(p), float) else str(row.get(p, "")) for p in params],
                 f"{row['eval_loss']:.4f}" if row["eval_loss"] is not None else "",
                 f"{row['eval_accuracy']:.3f}" if row["eval_accuracy"] is not None else "",
                 *[f"{row[k]:.3f}" if row.get(k) is not None else "" for k in judged],
                 str(row["duration_s"] or ""), row.get("host") or ""]
        table.add_row(*cells)
    return table
