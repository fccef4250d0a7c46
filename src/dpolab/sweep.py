"""`run_sweep(config) -> summary`: hyperparameter search with Optuna; each trial is a normal training run.

sweep_dir/: sweep.yaml (resolved), data/ (prepared once; its reference log-prob cache is shared by every trial),
study.journal (default storage: Optuna's journal file, safe for several local workers), trials/NNN/ (run folders),
trials.csv, sweep.png, best/ (the best trial's run folder) and best.json.

Stale trials: a worker records its host and pid on each trial. A rerun marks RUNNING trials of dead local processes
as FAIL and enqueues their parameters once more (retried once). Optuna's own heartbeat only works with RDB storages
and `study.optimize`; this works with the journal file and with ask/tell, which we use to count finished trials
across workers.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dpolab.config import ConfigError, TrainConfig

FINISHED = ("COMPLETE", "PRUNED")


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high})")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    def grid(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError("a float range has no grid: give 'choices' (categorical) for the grid sampler")


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sweep_dir: Path = Path("runs/sweep")
    base: TrainConfig = TrainConfig()
    search_space: dict[str, Param]
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    n_trials: int = Field(8, gt=0)
    objective: Literal["eval_loss", "eval_rewards/accuracies"] = "eval_loss"
    pruner: Literal["median", "none"] = "median"
    seed: int = 0

    @model_validator(mode="after")
    def _space(self) -> "SweepConfig":
        if not self.search_space:
            raise ValueError("search_space is empty")
        base = self.base.model_dump()
        for name in self.search_space:
            node = base
            for part in name.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"search_space: unknown training option {name!r}")
                node = node[part]
        if self.base.eval_every == "no":
            raise ValueError("a sweep selects by eval metrics: base.eval_every must not be 'no'")
        if self.sampler == "grid":
            size = 1
            for name, param in self.search_space.items():
                try:
                    size *= len(param.grid())
                except ValueError as exc:
                    raise ValueError(f"search_space.{name}: {exc}") from None
            if size > self.n_trials:
                raise ValueError(f"grid of {size} points is too large for n_trials={self.n_trials}: raise n_trials "
                                 f"to {size} or shrink the space")
        return self

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == "eval_loss" else "maximize"


def trial_config(sweep: SweepConfig, params: dict[str, Any], number: int, data_dir: Path) -> TrainConfig:
    """The base training config with the trial's parameters, its own folder and the sweep's shared data."""
    tree = sweep.base.model_dump(mode="json")
    for name, value in params.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    tree["output_dir"] = str(sweep.sweep_dir / "trials" / f"{number:03d}")
    tree["data"]["dataset"] = str(data_dir)
    try:
        return TrainConfig.model_validate(tree)
    except Exception as exc:  # a sampled combination the config refuses
        raise ConfigError(f"trial {number}: parameters {params} give an invalid config: {exc}") from None


def suggest(trial, name: str, param: Param) -> Any:
    if param.type == "categorical":
        return trial.suggest_categorical(name, param.choices)
    if param.type == "int":
        return trial.suggest_int(name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale_trials(study) -> list[int]:
    """Fail RUNNING trials whose local worker process is gone, and enqueue their parameters once more."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        attrs = trial.user_attrs
        pid = attrs.get("pid")
        if attrs.get("host") != host or not isinstance(pid, int) or pid <= 0 or _pid_alive(pid):
            continue
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        failed.append(trial.number)
        if "retry_of" not in attrs:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
    return failed


def storage_for(sweep: SweepConfig, url: str | None):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url:
        return url  # any Optuna storage URL: postgresql://… for workers on several machines
    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(sweep.sweep_dir / "study.journal")))


def _sampler(sweep: SweepConfig, seed: int):
    import optuna

    if sweep.sampler == "grid":
        space = {name: param.grid() for name, param in sweep.search_space.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(sweep: SweepConfig, storage_url: str | None = None, seed: int | None = None):
    import optuna

    pruner = optuna.pruners.MedianPruner(n_startup_trials=1) if sweep.pruner == "median" else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=sweep.sweep_dir.name, storage=storage_for(sweep, storage_url),
                               sampler=_sampler(sweep, sweep.seed if seed is None else seed), pruner=pruner,
                               direction=sweep.direction, load_if_exists=True)


def open_worker_study(sweep: SweepConfig, storage_url: str | None = None):
    """The study for one worker, its sampler seeded so that no two workers (or a resumed one) replay the same
    random stream: seed + 7919·(workers registered before) + trials so far. A fresh single-worker sweep keeps
    exactly `seed`, so it is reproducible."""
    from dpolab.engine.refcache import file_lock

    with file_lock(sweep.sweep_dir / ".workers.lock"):
        study = open_study(sweep, storage_url)
        workers = sum(1 for key in study.user_attrs if key.startswith("worker:"))
        study.set_user_attr(f"worker:{socket.gethostname()}:{os.getpid()}:{workers}", len(study.trials))
        study.sampler = _sampler(sweep, sweep.seed + 7919 * workers + len(study.trials))
    return study


def prepare_shared_data(sweep: SweepConfig) -> Path:
    """Data prepared once per sweep (first worker wins; others wait on the lock and reuse it)."""
    from dpolab.data.prepare import is_prepared, prepare_data
    from dpolab.engine.refcache import file_lock

    if is_prepared(sweep.base.data.dataset):
        return Path(sweep.base.data.dataset)
    target = sweep.sweep_dir / "data"
    with file_lock(sweep.sweep_dir / ".data.lock"):
        if not is_prepared(target):
            prepare_data(sweep.base.data.model_copy(update={"tokenizer": sweep.base.model}), target, overwrite=True)
    return target


class _Pruning:
    """Reports each evaluation's objective to Optuna and stops the trial when the pruner says so.

    Distributed (one trial over several ranks): rank 0 holds the trial and decides; the decision is broadcast so
    every rank stops at the same evaluation."""

    def __new__(cls, trial, objective: str, distributed: bool = False):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                import optuna

                prune = False
                if trial is not None and metrics and objective in metrics:
                    trial.report(metrics[objective], step=int(round(state.epoch or state.global_step)))
                    finished = state.max_steps and state.global_step >= state.max_steps
                    prune = not finished and trial.should_prune()  # the last evaluation completes the trial
                if distributed:
                    import torch.distributed as dist

                    decision = [prune]
                    dist.broadcast_object_list(decision, src=0)
                    prune = decision[0]
                if prune:
                    raise optuna.TrialPruned(f"pruned at epoch {state.epoch}")

        return Callback()


def _tell(study, trial, value=None, state=None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        # GridSampler announces an exhausted grid with study.stop(), which only works inside optimize(); the
        # trial's result is stored before that (optuna stores it in a `finally`), and our loop counts trials itself.
        if "Study.stop" not in str(exc):
            raise


def run_trial(sweep: SweepConfig, study, trial, data_dir: Path) -> None:
    import optuna

    from dpolab.engine.train import run_training

    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    params = {name: suggest(trial, name, param) for name, param in sweep.search_space.items()}
    cfg = trial_config(sweep, params, trial.number, data_dir)
    try:
        result = run_training(cfg, overwrite=True, callbacks=[_Pruning(trial, sweep.objective)])
    except optuna.TrialPruned:
        _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
        return
    except Exception:
        _tell(study, trial, state=optuna.trial.TrialState.FAIL)
        raise
    key = sweep.objective.removeprefix("eval_")
    _tell(study, trial, result.metrics["best"][key])


def _wanted_more(sweep: SweepConfig, study) -> bool:
    from optuna.trial import TrialState

    busy = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return len(busy) < sweep.n_trials


def _run_sweep_distributed(sweep: SweepConfig, storage_url: str | None, log) -> dict[str, Any]:
    """One sweep worker spanning several processes (accelerate launch / torchrun): every trial is one distributed
    training run. Rank 0 alone talks to the study; it broadcasts each trial's parameters and the pruning decisions."""
    import optuna
    import torch
    import torch.distributed as dist
    import yaml
    from accelerate import PartialState

    from dpolab.engine.train import run_training
    from dpolab.sweep_report import write_report

    state = PartialState(cpu=not torch.cuda.is_available())  # the same singleton TrainingArguments uses later
    main = state.is_main_process
    with state.main_process_first():
        sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
        if main:
            (sweep.sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
        data_dir = prepare_shared_data(sweep)
    study = open_worker_study(sweep, storage_url) if main else None
    if main:
        recover_stale_trials(study)
    while True:
        message: list[Any] = [None]
        trial = None
        if main and _wanted_more(sweep, study):
            trial = study.ask()
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            message = [(trial.number, {name: suggest(trial, name, p) for name, p in sweep.search_space.items()})]
            log(f"trial {trial.number}: starting on {state.num_processes} processes")
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            break
        number, params = message[0]
        cfg = trial_config(sweep, params, number, data_dir)
        try:
            result = run_training(cfg, overwrite=True, callbacks=[_Pruning(trial, sweep.objective, distributed=True)])
        except optuna.TrialPruned:
            if main:
                _tell(study, trial, state=optuna.trial.TrialState.PRUNED)
            continue
        if main:
            _tell(study, trial, result.metrics["best"][sweep.objective.removeprefix("eval_")])
            log(f"trial {number}: COMPLETE {study.trials[number].value}")
    return write_report(sweep, study) if main else {"rows": [], "best": None, "rank": state.process_index}


def run_sweep(sweep: SweepConfig, storage_url: str | None = None, log=print) -> dict[str, Any]:
    """Run trials until `n_trials` have finished (complete or pruned) across every worker on this study.
    Under accelerate launch / torchrun, each trial is trained by all the processes together."""
    import yaml

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_sweep_distributed(sweep, storage_url, log)
    from optuna.trial import TrialState

    from dpolab.sweep_report import write_report

    sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    data_dir = prepare_shared_data(sweep)
    study = open_worker_study(sweep, storage_url)
    recovered = recover_stale_trials(study)
    if recovered:
        log(f"marked stale trials {recovered} as failed; their parameters are retried once")
    while True:
        busy = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING,
                                                        TrialState.WAITING))
        waiting = [t for t in busy if t.state == TrialState.WAITING]
        if len(busy) - len(waiting) >= sweep.n_trials:
            break
        trial = study.ask()
        log(f"trial {trial.number}: starting")
        run_trial(sweep, study, trial, data_dir)
        log(f"trial {trial.number}: {study.trials[trial.number].state.name} {study.trials[trial.number].value}")
    return write_report(sweep, study)
