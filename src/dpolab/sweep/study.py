"""The Optuna study behind a sweep: storage, samplers, pruner, per-worker seeding and stale-trial recovery.

Stale trials, two ways. The journal file (the default; workers on one machine or a shared filesystem): a worker
records its host and pid on each trial, and a rerun marks RUNNING trials of dead local processes as FAIL and enqueues
their parameters once more (retried once). An RDB storage (`--storage postgresql://…`; workers on several machines,
where a pid says nothing): Optuna's heartbeats, see `dpolab.sweep.rdb`.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
import zlib

from dpolab.folders.sweep import SweepFolder
from dpolab.fsutil import file_lock
from dpolab.sweep.config import SweepConfig


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


def storage_for(sweep: SweepConfig, url: str | None, log=None):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url:  # an RDB URL (postgresql://… for workers on several machines): heartbeats, reconnection
        from dpolab.sweep.rdb import connect

        return connect(sweep, url, log or logging.getLogger("dpolab").warning)
    folder = SweepFolder(sweep.sweep_dir)
    folder.path.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(folder.journal_file)))


def _sampler(sweep: SweepConfig, seed: int):
    import optuna

    if sweep.sampler == "grid":
        space = {name: param.grid() for name, param in sweep.search_space.items()}
        return optuna.samplers.GridSampler(space, seed=seed)
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def open_study(sweep: SweepConfig, storage_url: str | None = None, seed: int | None = None, log=None,
               study_name: str | None = None, create: bool = True):
    """The sweep's study, named after its folder (`study_name` for a folder the sweep's YAML did not name); with
    `create=False` a study that does not exist is a SweepError rather than a new empty one."""
    import optuna

    from dpolab.errors import SweepError

    pruner = optuna.pruners.MedianPruner(n_startup_trials=1) if sweep.pruner == "median" else optuna.pruners.NopPruner()
    name, storage = study_name or sweep.sweep_dir.name, storage_for(sweep, storage_url, log)
    sampler = _sampler(sweep, sweep.seed if seed is None else seed)
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise SweepError(f"no study named {name!r} in the storage given; pass the --storage URL the workers "
                             "used") from None
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                               direction=sweep.direction, load_if_exists=True)


def open_worker_study(sweep: SweepConfig, storage_url: str | None = None, log=None):
    """The study for one worker, its sampler seeded so that no two workers (or a resumed one) replay the same
    random stream: seed + 7919·(workers registered before) + trials so far. A fresh single-worker sweep keeps
    exactly `seed`, so it is reproducible. The lock orders workers sharing this folder; workers on other machines
    that registered with the same count at the same moment add a hash of their own name instead."""
    with file_lock(SweepFolder(sweep.sweep_dir).workers_lock):
        study = open_study(sweep, storage_url, log=log)
        workers = sum(1 for key in study.user_attrs if key.startswith("worker:"))
        me = f"worker:{socket.gethostname()}:{os.getpid()}:{workers}"
        study.set_user_attr(me, len(study.trials))
        clash = any(key != me and key.rsplit(":", 1)[-1] == str(workers) for key in study.user_attrs
                    if key.startswith("worker:"))
        offset = zlib.crc32(me.encode()) if clash else 0
        study.sampler = _sampler(sweep, sweep.seed + 7919 * workers + len(study.trials) + offset)
    return study


def suggest(trial, name: str, param) -> object:
    if param.type == "categorical":
        return trial.suggest_categorical(name, param.choices)
    if param.type == "int":
        return trial.suggest_int(name, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)


def ask(study):
    """`study.ask()`; Optuna warns that heartbeats are meant for `optimize`: we beat ourselves (`rdb.Heartbeat`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        return study.ask()


def running(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def wants_more(sweep: SweepConfig, study) -> bool:
    """Fewer than `n_trials` trials finished or running across every worker (queued retries do not count)."""
    from optuna.trial import TrialState

    busy = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    return len(busy) < sweep.n_trials


def tell(study, trial, value=None, state=None, attrs=None) -> bool:
    """Store the trial's result and `attrs`; False when it was already finished by another worker (failed as stale
    while this one ran it: its result is then not counted, the retry's is)."""
    from optuna.exceptions import UpdateFinishedTrialError

    if study._storage.get_trial(trial._trial_id).state.is_finished():
        return False
    try:
        for key, attr in (attrs or {}).items():
            trial.set_user_attr(key, attr)
        study.tell(trial, value, state=state, skip_if_finished=True)  # skip: failed by another worker meanwhile
    except UpdateFinishedTrialError:
        return False
    except RuntimeError as exc:
        # GridSampler announces an exhausted grid with study.stop(), which only works inside optimize(); the
        # trial's result is stored before that (optuna stores it in a `finally`), and our loop counts trials itself.
        if "Study.stop" not in str(exc):
            raise
    return True
