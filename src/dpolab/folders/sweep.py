"""The sweep folder, the one owner of every path in it:

    sweep.yaml            the resolved sweep config
    data/                 prepared once; its reference cache is shared by every trial
    study.journal         Optuna's journal storage (the default)
    trials/NNN/           one run folder per trial
    trials.csv, sweep.png the trials table and plot
    best/                 a copy of the best trial's run folder (+ best.json), on the machine that ran it
    best.json             which trial is best, its parameters, objective and host
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from dpolab.errors import SweepError
from dpolab.folders import owner
from dpolab.folders.layout import Layout
from dpolab.folders.run import RunFolder
from dpolab.fsutil import atomic_write_text, remove_folder

KIND = "sweep"
BEST_JSON = "best.json"
# A best/ copy leaves out what only training needs.
NOT_COPIED_TO_BEST = ("checkpoints", "checkpoints-incomplete", "data")


class SweepFolder(Layout):
    NAMES = {
        "config_file": "sweep.yaml", "data_dir": "data", "journal_file": "study.journal", "trials_dir": "trials",
        "trials_csv": "trials.csv", "plot_file": "sweep.png", "best_dir": "best", "best_file": BEST_JSON,
        "data_lock": ".data.lock", "workers_lock": ".workers.lock", "report_lock": ".report.lock",
    }

    def trial(self, number: int) -> RunFolder:
        return RunFolder(self.trials_dir / f"{number:03d}")

    @staticmethod
    def is_sweep_with_best(path: Path) -> bool:
        return RunFolder.is_run(Path(path) / "best")

    @staticmethod
    def of_best(path: Path) -> "SweepFolder | None":
        """The sweep a `best/` folder belongs to."""
        path = Path(path)
        if (path / BEST_JSON).is_file() and (path.parent / "sweep.yaml").is_file():
            return SweepFolder(path.parent)
        return None

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if owner.kind_of(self.path) not in (KIND, None) and any(self.path.iterdir()):
            raise SweepError(f"sweep_dir {self.path} holds a dpolab {owner.kind_of(self.path)} folder; choose another")
        owner.mark(self.path, KIND)

    def write_config(self, sweep) -> None:
        atomic_write_text(self.config_file, yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))

    def read_config_tree(self) -> dict[str, Any]:
        """sweep.yaml as written by `write_config`; a one-line SweepError when this is not a sweep folder."""
        if not self.config_file.is_file():
            raise SweepError(f"{self.path} is not a sweep folder (no sweep.yaml); pass the sweep_dir of a sweep")
        try:
            tree = yaml.safe_load(self.config_file.read_text())
        except yaml.YAMLError as exc:
            raise SweepError(f"{self.config_file}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise SweepError(f"{self.config_file}: expected a mapping")
        return tree

    def best_is_here(self) -> bool:
        """best/ holds the best trial's run folder on this machine (its own best.json inside)."""
        return (self.best_dir / BEST_JSON).is_file()

    def read_best(self) -> dict[str, Any] | None:
        for file in (self.best_dir / BEST_JSON, self.best_file):
            if file.is_file():
                return json.loads(file.read_text())
        return None

    def write_best(self, number: int, info: dict[str, Any], materialise: bool = True) -> None:
        """best/ := a copy of trial `number`'s run folder with best.json, swapped in by a rename (kept when it
        already is that trial). Without `materialise` (the trial ran on another machine) only best.json is written,
        and a best/ of another trial is removed: best/ never holds a trial that is not the best."""
        current = _read_json(self.best_dir / BEST_JSON)
        if not materialise:
            if current is not None and current.get("trial") != number:
                remove_folder(self.best_dir)
        elif current is not None and current.get("trial") == number:
            atomic_write_text(self.best_dir / BEST_JSON, json.dumps(info, indent=2))
        else:
            tmp = self.path / ".best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.trial(number).path, tmp, ignore=shutil.ignore_patterns(*NOT_COPIED_TO_BEST))
            atomic_write_text(tmp / BEST_JSON, json.dumps(info, indent=2))
            remove_folder(self.best_dir)
            tmp.rename(self.best_dir)
        atomic_write_text(self.best_file, json.dumps(info, indent=2))

    def take_over(self, failed: int, retry: int) -> Path | None:
        """The run folder of a failed trial becomes its retry's, when it holds a complete checkpoint: returns that
        checkpoint (under the retry's folder) to resume from, else None and nothing moves. The checkpoints' trainer
        state names its best checkpoint by path; those paths follow the move (transformers protects the best
        checkpoint from rotation by comparing paths), and each checkpoint's completeness marker is rewritten."""
        from transformers.trainer import TRAINER_STATE_NAME

        from dpolab.engine.trainer import is_complete, last_complete_checkpoint, write_marker

        source, target = self.trial(failed), self.trial(retry)
        checkpoint, _ = last_complete_checkpoint(source.checkpoints_dir)
        if checkpoint is None:
            return None
        remove_folder(target.path)
        source.path.rename(target.path)
        # The path as the run named it (relative when sweep_dir is) and resolved.
        moves = [(str(source.path), str(target.path)), (str(source.path.resolve()), str(target.path.resolve()))]
        for folder in target.checkpoints_dir.glob("checkpoint-*"):
            state = _read_json(folder / TRAINER_STATE_NAME)
            best = (state or {}).get("best_model_checkpoint") or ""
            moved = next((to + best[len(fro):] for fro, to in moves if best.startswith(fro + "/")), None)
            if moved is None:
                continue
            complete = is_complete(folder)
            atomic_write_text(folder / TRAINER_STATE_NAME, json.dumps({**state, "best_model_checkpoint": moved},
                                                                      indent=2, sort_keys=True) + "\n")
            if complete:
                write_marker(folder)
        return target.checkpoints_dir / checkpoint.name


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
