"""The run folder, the one owner of every path in it:

    config.yaml            resolved config (what actually ran)
    data_report.json       the report of the prepared data it trained on
    metrics.json           final + best metrics
    trainer_state.json     the log history
    progress.jsonl         written while training: one line per step and per log (live curves, progress, ETA)
    stop-requested         a clean stop was asked for (the studio's Stop): training saves a checkpoint and ends
    logs/                  TensorBoard
    data/                  data prepared on the fly from a raw source
    checkpoints/checkpoint-N/, checkpoints-incomplete/
    model/                 Hugging Face folder (+ dpolab.json: template, base model, data, method settings)
    adapter/               LoRA adapter
    eval/                  eval.json, report.md, report.html, plots

Training writes through `RunFolder`; evaluation, publishing, the sweep report and the app read through it (or through
`folders.info.load_run_info`, which also resolves sweep folders, bare model folders, the embedded name and Hub ids).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpolab.folders import owner
from dpolab.folders.layout import Layout
from dpolab.fsutil import atomic_write_text

KIND = "run"
MODEL_META = "dpolab.json"  # inside model/: template, base model, data, method settings
EVAL_JSON = "eval.json"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class RunFolder(Layout):
    NAMES = {
        "config_file": "config.yaml", "data_report_file": "data_report.json", "metrics_file": "metrics.json",
        "state_file": "trainer_state.json", "logs_dir": "logs", "data_dir": "data", "checkpoints_dir": "checkpoints",
        "incomplete_dir": "checkpoints-incomplete", "model_dir": "model", "adapter_dir": "adapter", "eval_dir": "eval",
        "model_meta_file": f"model/{MODEL_META}", "progress_file": "progress.jsonl", "stop_file": "stop-requested",
    }

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / "config.yaml").is_file()

    def is_finished(self) -> bool:
        return self.metrics_file.is_file()

    def has_checkpoints(self) -> bool:
        return self.checkpoints_dir.is_dir() and any(self.checkpoints_dir.iterdir())

    def is_stopped(self) -> bool:
        """Unfinished with a checkpoint to go on from: `--resume` continues it (the studio's "stopped")."""
        return not self.is_finished() and self.has_checkpoints()

    # ------------------------------------------------------------------------------------------------ create
    def check(self, resume: bool, overwrite: bool, inputs=()) -> None:
        """Read-only checks before any work (every rank runs them, so all fail alike)."""
        if overwrite:
            owner.check_replaceable(self.path, KIND, "--output-dir", inputs)
            return
        owner.check_output(self.path, "--output-dir")
        from dpolab.errors import ConfigError

        if self.is_finished() and not resume:
            raise ConfigError(f"{self.path} already holds a finished run; pass --overwrite to replace it or choose "
                              "another output_dir")
        if self.has_checkpoints() and not resume:
            raise ConfigError(f"{self.path} holds checkpoints of an unfinished run; pass --resume to continue it or "
                              "--overwrite")
        if self.path.is_dir() and any(self.path.iterdir()) and owner.kind_of(self.path) not in (KIND, None):
            raise ConfigError(f"--output-dir {self.path} holds a dpolab {owner.kind_of(self.path)} folder; choose "
                              "another folder")

    def create(self, overwrite: bool) -> None:
        """The folder, marked as a dpolab run (replacing the old one when `overwrite`, after `check`)."""
        from dpolab.fsutil import remove_folder

        if overwrite:
            remove_folder(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        owner.mark(self.path, KIND)

    # ------------------------------------------------------------------------------------------------ stop
    def request_stop(self) -> None:
        """Ask the training process to stop cleanly at its next step (a complete checkpoint; `--resume` goes on)."""
        atomic_write_text(self.stop_file, "stop\n")

    def stop_requested(self) -> bool:
        return self.stop_file.is_file()

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------------ write
    def append_progress(self, entry: dict[str, Any]) -> None:
        """One line of progress.jsonl (a reader tolerates a half-written last line)."""
        with open(self.progress_file, "a") as handle:
            handle.write(json.dumps(entry) + "\n")

    def write_config(self, config) -> None:
        atomic_write_text(self.config_file, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))

    def write_data_report(self, report: dict[str, Any]) -> None:
        atomic_write_text(self.data_report_file, json.dumps(report, indent=2))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic_write_text(self.metrics_file, json.dumps(metrics, indent=2))

    def write_state(self, state) -> None:
        """A transformers TrainerState (a dataclass), as its own `save_to_json` writes it."""
        import dataclasses

        atomic_write_text(self.state_file, json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n")

    def write_model_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.model_meta_file, json.dumps(meta, indent=2))

    # ------------------------------------------------------------------------------------------------ read
    def read_config(self) -> dict[str, Any] | None:
        return yaml.safe_load(self.config_file.read_text()) if self.config_file.is_file() else None

    def read_data_report(self) -> dict[str, Any] | None:
        return _read_json(self.data_report_file)

    def read_metrics(self) -> dict[str, Any] | None:
        return _read_json(self.metrics_file)

    def read_model_meta(self) -> dict[str, Any] | None:
        return _read_json(self.model_meta_file)

    def read_eval(self) -> dict[str, Any] | None:
        return _read_json(self.eval_dir / EVAL_JSON)

    def read_log_history(self) -> list[dict[str, Any]] | None:
        state = _read_json(self.state_file)
        return state["log_history"] if state else None


    def read_progress(self) -> Progress | None:
        """What progress.jsonl says so far, or None before training has begun."""
        try:
            lines = self.progress_file.read_text().splitlines()
        except OSError:
            return None
        entries = []
        for line in lines:
            try:
                entries.append(json.loads(line))
            except ValueError:  # the line being written
                continue
        return Progress.from_entries(entries) if entries else None


@dataclass(frozen=True)
class Progress:
    """Training progress from progress.jsonl: the step reached, of how many, an ETA from this session's pace, and
    the logged points (the last value per step and key wins: a resumed run re-logs the steps after its checkpoint)."""

    step: int
    max_steps: int | None
    epoch: float | None
    eta_s: float | None
    history: list[dict[str, Any]]  # {"step": n, **logged values}, by step

    @property
    def fraction(self) -> float:
        return min(self.step / self.max_steps, 1.0) if self.max_steps else 0.0

    @staticmethod
    def from_entries(entries: list[dict[str, Any]]) -> Progress:
        step, max_steps, epoch, session = 0, None, None, []
        points: dict[tuple[int, str], dict[str, Any]] = {}
        for entry in entries:
            event = entry.get("event")
            if event == "begin":
                max_steps, session = entry.get("max_steps"), [(entry["time"], entry.get("step", 0))]
                step = entry.get("step", 0)
            elif event == "step":
                step, epoch = entry["step"], entry.get("epoch", epoch)
                session.append((entry["time"], step))
            elif event == "log":
                values = {k: v for k, v in entry.items() if k not in ("event", "time")}
                kind = "eval" if any(k.startswith("eval_") for k in values) else "train"
                points.setdefault((values.get("step", step), kind), {}).update(values)
        eta = None
        if max_steps and len(session) >= 2 and session[-1][1] > session[0][1]:
            (t0, s0), (t1, s1) = session[0], session[-1]
            eta = (t1 - t0) / (s1 - s0) * max(max_steps - s1, 0)
        history = [points[key] for key in sorted(points, key=lambda k: (k[0], k[1]))]
        return Progress(step=step, max_steps=max_steps, epoch=epoch, eta_s=eta, history=history)


def model_meta(folder: Path) -> dict[str, Any] | None:
    """dpolab.json of a model folder (a run's model/, an export), if it has one."""
    return _read_json(Path(folder) / MODEL_META)
