"""`load_run_info(name)`: what a run folder, a sweep's best/, an exported folder, a bare model folder, the embedded
name or a Hub id tells about a model, read through the folder modules."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.folders.run import RunFolder, model_meta
from dpolab.folders.sweep import SweepFolder


@dataclass(frozen=True)
class RunInfo:
    """What a run folder, a sweep's best/, an exported folder or a bare model folder tells about a model."""

    model: str  # loadable path or Hub id
    run_dir: Path | None  # the run folder (or sweep best/) when there is one
    template: str
    base_model: str | None
    dataset: str | None
    beta: float | None
    loss_type: str | None
    config: dict[str, Any] | None
    metrics: dict[str, Any] | None
    eval: dict[str, Any] | None
    data_report: dict[str, Any] | None = None
    method: str = "dpo"  # dpo | simpo | cpo | orpo | kto

    @property
    def run(self) -> RunFolder | None:
        return RunFolder(self.run_dir) if self.run_dir else None


def _pick(meta: dict | None, config: dict | None, key: str):
    if meta and meta.get(key) is not None:
        return meta[key]
    return (config or {}).get(key)


def load_run_info(name: str) -> RunInfo:
    """Resolve `name` (run folder, sweep folder, model folder, embedded name or Hub id) and read what it records."""
    from dpolab.models import model_folder, resolve_model

    path = Path(name).expanduser()
    run = None
    if path.is_dir():
        if SweepFolder.is_sweep_with_best(path):
            path = SweepFolder(path).best_dir
        run = RunFolder(path) if RunFolder.is_run(path) else None
        folder = model_folder(path)
        model = str(folder) if folder else resolve_model(name)
    else:
        model = resolve_model(name)
    meta = model_meta(Path(model)) if Path(model).is_dir() else None
    config = run.read_config() if run else None
    report = run.read_data_report() if run else None
    data_cfg = (config or {}).get("data") or {}
    template = (report or {}).get("template") or (meta or {}).get("template") or data_cfg.get("template") or "qa"
    return RunInfo(
        model=model, run_dir=run.path if run else None, template=template,
        base_model=(meta or {}).get("base_model") or (config or {}).get("model"),
        dataset=(meta or {}).get("dataset") or data_cfg.get("dataset"),
        beta=_pick(meta, config, "beta"), loss_type=_pick(meta, config, "loss_type"), config=config,
        metrics=run.read_metrics() if run else None, eval=run.read_eval() if run else None, data_report=report,
        method=_pick(meta, config, "method") or "dpo",
    )
