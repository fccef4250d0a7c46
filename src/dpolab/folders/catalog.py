"""What is under a runs root: every run and sweep folder (and every run or sweep a job is about to create), each with
its status and headline numbers, read through the folder modules and `dpolab.jobs`. The studio's Runs page shows it;
a `dpolab runs` listing could print it.

Status is the folder's own state combined with its newest job of the kind that writes it (train for a run, sweep
for a sweep; an eval job on a finished run does not make it "running"):

    running / stopping   a train/sweep job for it is active
    finished             a run with metrics.json; a sweep whose last job finished (or, with no job, with trials.csv)
    stopped              its last job was stopped, or no job and it can be resumed (a run with checkpoints, a sweep)
    failed               its last job failed; a run with no job, no metrics and no checkpoints

A folder written by the CLI has no job: when its progress (progress.jsonl, the sweep's journal) changed within
`RECENT_S` seconds it is taken as running.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from dpolab.errors import DpolabError
from dpolab.folders.run import RunFolder
from dpolab.folders.sweep import SweepFolder
from dpolab.jobs import Job, list_jobs

WRITER = {"run": "train", "sweep": "sweep"}  # the job kind that writes each folder kind
STATUSES = ("running", "stopping", "finished", "stopped", "failed")
RECENT_S = 60.0


@dataclass(frozen=True)
class Entry:
    name: str  # the folder's name under the runs root
    path: Path  # resolved
    kind: str  # run | sweep
    status: str  # one of STATUSES
    job: Job | None  # the newest train/sweep job writing it
    model: str | None
    method: str | None
    dataset: str | None
    best_eval_loss: float | None
    reward_accuracy: float | None  # eval reward accuracy of the best checkpoint (a sweep: of its best trial)
    steps: int | None  # optimizer steps done (a sweep: its best trial's)
    trials: int | None  # a sweep's trial folders
    duration_s: float | None
    started: float | None


def folder_kind(path: Path) -> str | None:
    """"run", "sweep" or None (not a run or sweep folder)."""
    if RunFolder.is_run(path):
        return "run"
    if SweepFolder(path).config_file.is_file():
        return "sweep"
    return None


def _writer_job(jobs: list[Job], path: Path, kind: str) -> Job | None:
    return next((job for job in jobs if job.target == path and job.kind == WRITER[kind]), None)


def _mtime(file: Path) -> float:
    try:
        return file.stat().st_mtime
    except OSError:
        return 0.0


def _recent(*files: Path) -> bool:
    return any(time.time() - _mtime(file) < RECENT_S for file in files)


def _sweep_trials(sweep: SweepFolder) -> list[RunFolder]:
    if not sweep.trials_dir.is_dir():
        return []
    return [RunFolder(child) for child in sorted(sweep.trials_dir.iterdir()) if child.is_dir()]


def folder_status(path: Path, kind: str, job: Job | None) -> str:
    """The status of a run or sweep folder given its newest writing job (None: none recorded); see the module."""
    if job is not None and job.active:
        return "stopping" if job.status == "stopping" else "running"
    if kind == "run":
        run = RunFolder(path)
        if run.is_finished():
            return "finished"
        if job is not None:
            if job.status in ("stopped", "failed"):
                return job.status
            return "stopped" if run.is_stopped() else "failed"  # exited 0 without finishing
        if _recent(run.progress_file):
            return "running"
        return "stopped" if run.is_stopped() else "failed"
    sweep = SweepFolder(path)
    if job is not None:
        return job.status
    activity = [sweep.journal_file, *(trial.progress_file for trial in _sweep_trials(sweep))]
    if sweep.trials_csv.is_file() and _mtime(sweep.trials_csv) >= max(map(_mtime, activity)):
        return "finished"  # its table is written at the end, after the last trial (none since: not resumed)
    return "running" if _recent(*activity) else "stopped"  # a sweep resumes where it stopped


def status_of(runs_root: Path, path: Path) -> str | None:
    """The status of one folder under `runs_root` (None when it is neither a run nor a sweep, nor being created)."""
    path = Path(path).expanduser().resolve()
    jobs = list_jobs(runs_root)
    kind = folder_kind(path)
    if kind is None:
        job = next((j for j in jobs if j.target == path and j.kind in WRITER.values()), None)
        if job is None:
            return None
        kind = "run" if job.kind == "train" else "sweep"
    return folder_status(path, kind, _writer_job(jobs, path, kind))


def _run_numbers(run: RunFolder) -> dict[str, Any]:
    metrics = run.read_metrics()
    if metrics is not None:
        best = metrics.get("best") or {}
        return {"best_eval_loss": best.get("loss"), "reward_accuracy": best.get("rewards/accuracies"),
                "steps": metrics.get("global_step"), "duration_s": metrics.get("total_time_s")}
    progress = run.read_progress()  # while training (or stopped): what has been logged so far
    if progress is None:
        return {}
    evals = [p for p in progress.history if p.get("eval_loss") is not None]
    best = min(evals, key=lambda p: p["eval_loss"]) if evals else {}
    return {"best_eval_loss": best.get("eval_loss"), "reward_accuracy": best.get("eval_rewards/accuracies"),
            "steps": progress.step}


def _entry(path: Path, kind: str, job: Job | None) -> Entry:
    fields: dict[str, Any] = {}
    if kind == "run":
        run = RunFolder(path)
        config = run.read_config() or {}
        fields.update(_run_numbers(run))
        trials = None
        started = run.config_file.stat().st_mtime if run.config_file.is_file() else None
    else:
        sweep = SweepFolder(path)
        try:
            config = (sweep.read_config_tree() or {}).get("base") or {}
        except DpolabError:  # a sweep.yaml being rewritten, or not one this dpolab reads: list it without its settings
            config = {}
        best = sweep.read_best()
        if best is not None:
            trial = RunFolder(sweep.best_dir) if SweepFolder.is_sweep_with_best(path) else sweep.trial(best["trial"])
            fields.update(_run_numbers(trial))
            fields.pop("duration_s", None)
        trials = len(_sweep_trials(sweep))
        started = sweep.config_file.stat().st_mtime if sweep.config_file.is_file() else None
    if job is not None:
        started = job.started
        fields["duration_s"] = job.duration_s
    data = config.get("data") or {}
    return Entry(name=path.name, path=path, kind=kind, status=folder_status(path, kind, job), job=job,
                 model=config.get("model"), method=config.get("method") or ("dpo" if config else None),
                 dataset=data.get("dataset") if isinstance(data, dict) else None,
                 best_eval_loss=fields.get("best_eval_loss"), reward_accuracy=fields.get("reward_accuracy"),
                 steps=fields.get("steps"), trials=trials, duration_s=fields.get("duration_s"), started=started)


def folders_under(runs_root: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """The folders directly under `runs_root` for which `keep` holds, newest first; hidden ones (.jobs) left out."""
    root = Path(runs_root).expanduser()
    if not root.is_dir():
        return []
    found = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".") and keep(c)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def model_folders(runs_root: Path) -> list[Path]:
    """Runs and sweeps under `runs_root` that hold a model (a run's model/, a sweep's best/), newest first: what
    `--model` and the chat page take as they are."""
    from dpolab.models import model_folder

    return folders_under(runs_root, lambda c: model_folder(c) is not None)


def scan(runs_root: Path) -> list[Entry]:
    """Every run and sweep folder directly under `runs_root`, and every one a train/sweep job there is creating,
    newest first."""
    root = Path(runs_root).expanduser().resolve()
    jobs = list_jobs(root)
    kinds: dict[Path, str] = {}
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and not child.name.startswith(".") and (kind := folder_kind(child)):
                kinds[child.resolve()] = kind
    for job in jobs:  # a job that has not written its folder yet (starting, or failed before it could)
        if job.kind in WRITER.values() and job.target.parent == root and job.target not in kinds:
            kinds[job.target] = "run" if job.kind == "train" else "sweep"
    entries = [_entry(path, kind, _writer_job(jobs, path, kind)) for path, kind in kinds.items()]
    return sorted(entries, key=lambda e: (e.started or 0, e.name), reverse=True)
