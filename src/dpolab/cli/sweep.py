"""`dpolab sweep`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpolab.cli._base import console, stdout


def sweep(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Sweep YAML: base training config + search_space (+ objective, judge)."),
    storage: Optional[str] = typer.Option(
        None, envvar="DPOLAB_SWEEP_STORAGE", show_envvar=False,
        help="Study database URL, e.g. postgresql://user@host/db, for workers on several machines (heartbeats, "
             "retries); also read from DPOLAB_SWEEP_STORAGE. Default: a journal file in the sweep folder."),
    n_trials: Optional[int] = typer.Option(None, help="Finished trials wanted (overrides the YAML)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Only (re)write the table, trials.csv, sweep.png and best/ of this sweep folder."),
) -> None:
    """Hyperparameter search (Optuna); every trial is a training run; best/ holds the best by the objective.

    The objective is eval loss by default; `objective: judge_win_rate` (or `judge_lc_win_rate`, length-controlled)
    with `judge: {model: REWARD_RUN, prompts: N}` runs `dpolab eval --judge` on each trial and maximizes its win rate.

    Re-running the same command resumes the study; several processes on one storage share the work."""
    from dpolab.config import load_config
    from dpolab.errors import UsageError
    from dpolab.sweep import SweepConfig, run_sweep
    from dpolab.sweep.rdb import scrub, scrubbed
    from dpolab.sweep.report import report_sweep, trials_table

    def log(message: str) -> None:
        console.print(scrub(message, storage), highlight=False, markup=False, soft_wrap=True)  # one line each

    with scrubbed(storage):  # whatever fails, its message never shows the database password
        if report is not None:
            summary, cfg = report_sweep(report, storage, log=log)
        else:
            if config is None:
                raise UsageError("pass --config sweep.yaml (or --report SWEEP_DIR)")
            cfg = load_config(SweepConfig, config, {"n_trials": n_trials})
            summary = run_sweep(cfg, storage, log=log)

    if summary.get("rank", 0) == 0:  # under torchrun only the main process prints the table
        stdout.print(trials_table(summary, cfg))
