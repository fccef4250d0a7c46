"""What a run folder, a sweep's best/, an exported folder or a bare model folder tells about a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpolab.models import model_folder, resolve_model

RUN_META = "dpolab.json"  # written into model/ by training: template, base model, dataset, DPO settings


@dataclass(frozen=True)
class RunInfo:
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


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_run_info(name: str) -> RunInfo:
    """Resolve `name` (run folder, sweep folder, model folder, embedded name or Hub id) and read what it records."""
    path = Path(name).expanduser()
    run_dir = None
    if path.is_dir():
        if (path / "best" / "config.yaml").is_file():
            path = path / "best"
        if (path / "config.yaml").is_file():
            run_dir = path
        folder = model_folder(path)
        model = str(folder) if folder else resolve_model(name)
    else:
        model = resolve_model(name)
    meta = _json(Path(model) / RUN_META) if Path(model).is_dir() else None
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir else None
    report = _json(run_dir / "data_report.json") if run_dir else None
    template = (report or {}).get("template") or (meta or {}).get("template") or ((config or {}).get("data") or {}).get("template") or "qa"
    pick = lambda key: (meta or {}).get(key) if meta and meta.get(key) is not None else (config or {}).get(key)  # noqa: E731
    return RunInfo(
        model=model, run_dir=run_dir, template=template,
        base_model=(meta or {}).get("base_model") or (config or {}).get("model"),
        dataset=(meta or {}).get("dataset") or ((config or {}).get("data") or {}).get("dataset"),
        beta=pick("beta"), loss_type=pick("loss_type"), config=config,
        metrics=_json(run_dir / "metrics.json") if run_dir else None,
        eval=_json(run_dir / "eval" / "eval.json") if run_dir else None,
    )
