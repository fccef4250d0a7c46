"""The run folder, the one owner of every path in it:

    config.yaml            resolved config (what actually ran)
    data_report.json       the report of the prepared data it trained on
    metrics.json           final + best metrics
    trainer_state.json     the log history
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
        "model_meta_file": f"model/{MODEL_META}",
    }

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / "config.yaml").is_file()

    def is_finished(self) -> bool:
        return self.metrics_file.is_file()

    def has_checkpoints(self) -> bool:
        return self.checkpoints_dir.is_dir() and any(self.checkpoints_dir.iterdir())

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

    # ------------------------------------------------------------------------------------------------ write
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


def model_meta(folder: Path) -> dict[str, Any] | None:
    """dpolab.json of a model folder (a run's model/, an export), if it has one."""
    return _read_json(Path(folder) / MODEL_META)
