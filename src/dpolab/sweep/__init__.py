"""The sweep stage (`dpolab sweep`): Optuna search over training options; every trial is an ordinary run."""

from dpolab.sweep.config import Param, SweepConfig, trial_config  # noqa: F401
from dpolab.sweep.loop import _Pruning, prepare_shared_data, run_sweep  # noqa: F401
from dpolab.sweep.study import open_study, open_worker_study, recover_stale_trials  # noqa: F401
