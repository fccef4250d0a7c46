"""`run_sweep(config) -> summary`: hyperparameter search with Optuna; each trial is a normal training run.

One loop, two coordinators. `LocalCoordinator` talks to the study directly (one process per worker; several workers
share the study's storage). `BroadcastCoordinator` is one worker spanning several processes (torchrun / accelerate
launch): rank 0 alone talks to the study and broadcasts each trial's parameters and every pruning decision, and all
ranks train each trial together.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.folders.sweep import SweepFolder
from dpolab.fsutil import file_lock
from dpolab.sweep import rdb
from dpolab.sweep import study as S
from dpolab.sweep.config import JUDGE_OBJECTIVES, SweepConfig, trial_config


@dataclass
class Job:
    number: int
    params: dict[str, Any]
    trial: Any  # the Optuna trial on the process that talks to the study, else None
    resume: bool = False  # a retry that resumes the failed trial's run from its last complete checkpoint


class LocalCoordinator:
    """Talks to the study. On an RDB storage it beats the heartbeat of the trial in hand, fails trials whose
    worker stopped beating, and stays while others run trials so that it can take over any whose worker dies."""

    is_main = True
    distributed = False

    def __init__(self, sweep: SweepConfig, storage_url: str | None, log):
        self.sweep, self.log, self.beat = sweep, log, None
        self.study = S.open_worker_study(sweep, storage_url, log)
        self.stale = rdb.StaleTrials(self.study, sweep) if rdb.uses_heartbeat(self.study) else None
        if self.stale is None:
            recovered = S.recover_stale_trials(self.study)
            if recovered:
                log(f"marked stale trials {recovered} as failed; their parameters are retried once")

    def _wait_for_work(self) -> bool:
        """True when this worker should take a trial; with heartbeats, it waits while trials run elsewhere."""
        waiting = False
        while True:
            failed = self.stale.fail() if self.stale else []
            if failed:
                self.log(f"trials {failed}: no heartbeat for {self.sweep.grace_period} s, marked failed; their "
                         "parameters are retried once")
            if S.wants_more(self.sweep, self.study):
                return True
            others = S.running(self.study) if self.stale else []
            if not others:
                return False
            if not waiting:
                self.log(f"waiting for trials {[t.number for t in others]} running on other workers, to take over "
                         "any whose worker stops")
            waiting = True
            time.sleep(self.sweep.heartbeat_interval)

    def _ask(self) -> Job | None:
        if not self._wait_for_work():
            return None
        trial = S.ask(self.study)
        if self.stale:
            self.beat = rdb.Heartbeat(self.study, trial._trial_id, self.sweep.heartbeat_interval, self.log)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {name: S.suggest(trial, name, p) for name, p in self.sweep.search_space.items()}
        retry_of = trial.user_attrs.get("retry_of")
        return Job(trial.number, params, trial, retry_of is not None and self._take_over(trial.number, retry_of))

    def _take_over(self, number: int, failed: int) -> bool:
        """A retry resumes the failed trial's run when its folder is here (this machine or a shared filesystem):
        the folder becomes the retry's and training goes on from its last complete checkpoint. Else it restarts."""
        folder = SweepFolder(self.sweep.sweep_dir)
        reachable = folder.trial(failed).path.is_dir()
        checkpoint = folder.take_over(failed, number) if reachable else None
        if checkpoint is not None:
            self.log(f"trial {number}: retry of trial {failed}, resuming its run from {checkpoint.name}")
        elif reachable:
            self.log(f"trial {number}: retry of trial {failed}, restarting: its run has no complete checkpoint")
        else:
            host = self.study.trials[failed].user_attrs.get("host", "another machine")
            self.log(f"trial {number}: retry of trial {failed}, restarting: its run folder is on {host}, not here")
        return checkpoint is not None

    def next_job(self) -> Job | None:
        job = self._ask()
        if job is not None:
            self.log(f"trial {job.number}: starting")
        return job

    def share(self, value: Any) -> Any:
        return value

    def finish(self, job: Job, value: float | None = None, state: str | None = None, attrs=None) -> bool:
        """Record the trial's result (and, when it is the study's best, materialise best/ here). False when another
        worker had already failed it as stale: its result is not counted, the retry's is."""
        import optuna

        from dpolab.sweep.report import update_best

        if job.trial is None:
            return True
        try:
            ours = S.tell(self.study, job.trial, value, getattr(optuna.trial.TrialState, state) if state else None,
                          attrs)
        finally:  # beat until the result is stored: a slow tell must not look like a dead worker
            if self.beat is not None:
                self.beat.stop()
            self.beat = None
        done = self.study.trials[job.number]
        if not ours:
            self.log(f"trial {job.number}: already {done.state.name} (failed as stale by another worker); this "
                     "run's result is not counted")
            return False
        self.log(f"trial {job.number}: {done.state.name} {done.value}")
        if done.state == optuna.trial.TrialState.COMPLETE:
            update_best(self.sweep, self.study)  # silent: the final report says where best/ is
        return True


class BroadcastCoordinator(LocalCoordinator):
    distributed = True

    def __init__(self, sweep: SweepConfig, storage_url: str | None, log):
        import torch
        from accelerate import PartialState

        state = PartialState(cpu=not torch.cuda.is_available())
        self.is_main, self.rank, self.processes = state.is_main_process, state.process_index, state.num_processes
        self.sweep, self.log = sweep, log
        if self.is_main:
            super().__init__(sweep, storage_url, log)

    def share(self, value: Any) -> Any:
        import torch.distributed as dist

        message = [value]
        dist.broadcast_object_list(message, src=0)
        return message[0]

    def next_job(self) -> Job | None:
        job = self._ask() if self.is_main else None
        if job is not None:
            self.log(f"trial {job.number}: starting on {self.processes} processes")
        shared = self.share((job.number, job.params, job.resume) if job else None)
        return None if shared is None else (job or Job(shared[0], shared[1], None, shared[2]))


class _Pruning:
    """Reports each evaluation's objective to Optuna and stops the trial when the pruner says so; distributed,
    rank 0 decides and the decision is broadcast so every rank stops at the same evaluation."""

    def __new__(cls, trial, objective: str, share=None):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                import optuna

                prune = False
                if trial is not None and metrics and objective in metrics:
                    trial.report(metrics[objective], step=int(round(state.epoch or state.global_step)))
                    finished = state.max_steps and state.global_step >= state.max_steps
                    prune = not finished and trial.should_prune()  # the last evaluation completes the trial
                if share is not None:
                    prune = share(prune)
                if prune:
                    raise optuna.TrialPruned(f"pruned at epoch {state.epoch}")

        return Callback()


def prepare_shared_data(sweep: SweepConfig) -> Path:
    """Data prepared once per sweep (first worker wins; others wait on the lock and reuse it)."""
    from dpolab.data.prepare import is_prepared, prepare_data

    if is_prepared(sweep.base.data.dataset):
        return Path(sweep.base.data.dataset)
    folder = SweepFolder(sweep.sweep_dir)
    with file_lock(folder.data_lock):
        if not is_prepared(folder.data_dir):
            prepare_data(sweep.base.data.model_copy(update={"tokenizer": sweep.base.model}), folder.data_dir,
                         overwrite=True)
    return folder.data_dir


def _main_first(distributed: bool):
    """(context, is this the main process): under distribution the main process goes first, the others wait."""
    import contextlib

    if not distributed:
        return contextlib.nullcontext(), True
    import torch
    from accelerate import PartialState

    # The same singleton TrainingArguments uses later: made first here, it must make the same device choice, or
    # rank 0 stops being the process that saves (measured: trials without their run files).
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.main_process_first(), state.is_main_process


def _setup(sweep: SweepConfig, distributed: bool) -> None:
    """The sweep folder and its sweep.yaml (written by the main process)."""
    context, main = _main_first(distributed)
    with context:
        if main:
            folder = SweepFolder(sweep.sweep_dir)
            folder.create()
            folder.write_config(sweep)


def _shared_data(sweep: SweepConfig, distributed: bool) -> Path:
    context, _ = _main_first(distributed)
    with context:
        return prepare_shared_data(sweep)


def _objective(sweep: SweepConfig, cfg, result, is_main: bool) -> tuple[float | None, dict[str, Any]]:
    """The trial's objective and the attributes stored with it. A judge objective runs `dpolab eval`'s own
    `run_eval` on the trial's run folder (its report lands in the trial's eval/), on the main process only: the
    other processes of a distributed trial have no study to tell."""
    best = result.metrics["best"]
    # In the study, so that `--report` on any machine rebuilds the table without this machine's run folders.
    attrs = {"eval_loss": best.get("loss"), "eval_accuracy": best.get("rewards/accuracies")}
    if sweep.objective not in JUDGE_OBJECTIVES:
        return best[sweep.objective.removeprefix("eval_")], attrs
    if not is_main:
        return None, attrs
    from dpolab.evaluate.run import EvalOptions, run_eval

    judge = sweep.judge
    verdict = run_eval(EvalOptions(target=str(cfg.output_dir), judge=judge.model, n_prompts=judge.prompts,
                                   max_new_tokens=judge.max_new_tokens, seed=sweep.seed))["judge"]
    attrs.update({"judge_win_rate": verdict["win_rate"], "judge_lc_win_rate": verdict["lc_win_rate"],
                  "judge_prompts": verdict["prompts"]})
    return attrs[sweep.objective], attrs


def _run_job(sweep: SweepConfig, coordinator: LocalCoordinator, job: Job, data_dir: Path) -> None:
    import optuna

    from dpolab.engine.train import run_training

    cfg = trial_config(sweep, job.params, job.number, data_dir)
    pruning = _Pruning(job.trial, sweep.objective, coordinator.share if coordinator.distributed else None)
    try:
        result = run_training(cfg, resume=job.resume, overwrite=not job.resume, callbacks=[pruning])
        value, attrs = _objective(sweep, cfg, result, coordinator.is_main)
    except optuna.TrialPruned:
        coordinator.finish(job, state="PRUNED")
        return
    except Exception:
        if coordinator.finish(job, state="FAIL"):
            raise
        return  # taken over by another worker meanwhile (its storage refused this run's reports): not our failure
    coordinator.finish(job, value, attrs=attrs)


def run_sweep(sweep: SweepConfig, storage_url: str | None = None, log=print) -> dict[str, Any]:
    """Run trials until `n_trials` have finished (complete or pruned) across every worker on this study.
    Under accelerate launch / torchrun, each trial is trained by all the processes together."""
    from dpolab.sweep.report import write_report

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    _setup(sweep, distributed)
    # The study before the data: a wrong storage URL or password fails at once, not after preparing data.
    coordinator = (BroadcastCoordinator if distributed else LocalCoordinator)(sweep, storage_url, log)
    if sweep.judge is not None:  # a judge that cannot be loaded fails now, not after the first trial's training
        from dpolab.evaluate.run import load_judge

        load_judge(sweep.judge.model)
    data_dir = _shared_data(sweep, distributed)
    while (job := coordinator.next_job()) is not None:
        _run_job(sweep, coordinator, job, data_dir)
    if not coordinator.is_main:
        return {"rows": [], "best": None, "rank": coordinator.rank}
    return write_report(sweep, coordinator.study, log)
