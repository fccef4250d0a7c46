"""`run_training(config) -> RunResult`: data, reference cache, DPOTrainer, run folder.

Run folder: config.yaml, data_report.json, metrics.json, trainer_state.json, logs/ (TensorBoard),
checkpoints/checkpoint-N/ (only marked-complete ones are resumable), model/ (HF format; the best checkpoint by
eval_loss), adapter/ (LoRA only).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.config import ConfigError, TrainConfig, dump_config
from dpolab.data.prepare import Prepared, is_prepared, load_prepared, prepare_data
from dpolab.data.tokenize import tokenizer_fingerprint
from dpolab.models import context_length, load_tokenizer
from dpolab.runtime import resolve_runtime


class TrainingError(RuntimeError):
    """Training cannot go on; the message says which knob to turn."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    ref_pairs_computed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Read-only checks (every rank runs them, so all fail alike before any distributed work)."""
    if overwrite:
        return
    if (run_dir / "metrics.json").is_file() and not resume:
        raise ConfigError(f"{run_dir} already holds a finished run; pass --overwrite to replace it or choose another output_dir")
    if (run_dir / "checkpoints").is_dir() and not resume and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(f"{run_dir} holds checkpoints of an unfinished run; pass --resume to continue it or --overwrite")


def resolve_data(cfg: TrainConfig, run_dir: Path, tokenizer) -> Prepared:
    """A prepared folder as is, or a raw source prepared on the fly (into run_dir/data) with the model's tokenizer."""
    if is_prepared(cfg.data.dataset):
        prepared = load_prepared(cfg.data.dataset)
    else:
        data_cfg = cfg.data.model_copy(update={"tokenizer": cfg.model})
        target = run_dir / "data"
        if not is_prepared(target):
            prepare_data(data_cfg, target, overwrite=True, tokenizer=tokenizer)
        prepared = load_prepared(target)
    expected = tokenizer_fingerprint(tokenizer)
    found = prepared.report.get("tokenizer_fingerprint")
    if found and found != expected:
        raise ConfigError(f"{prepared.path} was prepared with the tokenizer of {prepared.config.tokenizer!r}, which differs "
                          f"from {cfg.model!r}'s; prepare it again with --model {cfg.model}")
    return prepared


def plan(cfg: TrainConfig, prepared_report: dict[str, Any], n_params: int | None) -> dict[str, Any]:
    train_pairs = prepared_report["train"]
    steps_per_epoch = math.ceil(train_pairs / (cfg.batch_size * cfg.grad_accum))
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    tok = prepared_report["tokens"]
    per_pair = (tok["prompt"]["mean"] + tok["chosen"]["mean"] + tok["rejected"]["mean"]) if tok.get("prompt") else 0
    return {"train_pairs": train_pairs, "test_pairs": prepared_report["test"], "steps_per_epoch": steps_per_epoch,
            "total_steps": steps, "model_parameters": n_params, "tokens_per_pair_packed": round(per_pair, 1),
            "estimated_tokens": int(per_pair * steps * cfg.batch_size * cfg.grad_accum),
            "estimated_train_flops": int(6 * (n_params or 0) * per_pair * steps * cfg.batch_size * cfg.grad_accum)}


def count_parameters(model_name: str) -> tuple[int, Any]:
    """Parameters from the config alone, on the meta device: no weights loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.models import load_model_config

    config = load_model_config(model_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters()), config


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """Validate and plan without loading weights. What needs the Hub offline is reported as unavailable."""
    from dpolab.data.prepare import build
    from dpolab.data.sources import SourceError
    from dpolab.models import ModelNotFound

    unavailable = {}
    n_params = None
    try:
        n_params, model_config = count_parameters(cfg.model)
        _check_context(cfg, model_config)
    except (OSError, ModelNotFound) as exc:
        unavailable["model"] = f"{cfg.model}: {str(exc).splitlines()[0][:160]}"
    report = None
    try:
        if is_prepared(cfg.data.dataset):
            report = load_prepared(cfg.data.dataset).report
        elif "model" not in unavailable:
            report = build(cfg.data.model_copy(update={"tokenizer": cfg.model}))[2]
    except SourceError as exc:
        unavailable["data"] = str(exc).splitlines()[0][:200]
    result: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    if report is not None:
        result["plan"] = plan(cfg, report, n_params)
    else:
        result["plan"] = {"total_steps": "unknown until the data can be read", "model_parameters": n_params}
    if unavailable:
        result["unavailable_offline"] = unavailable
    return result


def _check_context(cfg: TrainConfig, model_config) -> None:
    limit = context_length(model_config)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length {cfg.data.max_length} exceeds {cfg.model}'s context of {limit} tokens")


def _disable_dropout(model) -> None:
    import torch

    # DPO compares policy and reference log-probs of the same tokens: dropout would make them differ at step 0.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callbacks=()) -> RunResult:
    """Train and write the run folder. Under torchrun/accelerate every rank calls this; the main process alone
    prepares data, fills the reference cache and writes files, the others wait for it (main_process_first)."""
    from dpolab.engine.session import TrainingSession
    from dpolab.models import load_model_config

    run_dir = Path(cfg.output_dir)
    check_run_dir(run_dir, resume, overwrite)
    runtime = resolve_runtime(cfg.precision)
    model_config = load_model_config(cfg.model)
    _check_context(cfg, model_config)
    tokenizer = load_tokenizer(cfg.model)
    session = TrainingSession(cfg, runtime, tokenizer, run_dir)  # initializes the process group when distributed
    main = session.args.should_save
    with session.args.main_process_first(desc="run folder and data", local=False):
        if main:
            if overwrite and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
        prepared = resolve_data(cfg, run_dir, tokenizer)
        if main:
            dump_config(cfg, run_dir / "config.yaml")
            (run_dir / "data_report.json").write_text(json.dumps(prepared.report, indent=2))
    return session.run(prepared, resume=resume, callbacks=callbacks)
