"""The run folder's outputs after training: model/ (HF format), adapter/, metrics.json, trainer_state.json."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from dpolab.runinfo import RUN_META


def trainer_template(run_dir: Path) -> str:
    report = json.loads((run_dir / "data_report.json").read_text())
    return report["template"]


def _hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import os

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def write_outputs(trainer, output, cfg, run_dir: Path, elapsed: float, ref_computed: int, train_pairs: int) -> dict[str, Any]:
    state = trainer.state
    model = trainer.model
    if cfg.lora is not None:
        model.save_pretrained(run_dir / "adapter")
        model = model.merge_and_unload()
        trainer.model = model
    if trainer.args.should_save:
        trainer.save_model(str(run_dir / "model"))  # config, generation_config, safetensors, tokenizer, training_args.bin
        (run_dir / "model" / "training_args.json").write_text(trainer.args.to_json_string())
        (run_dir / "model" / RUN_META).write_text(json.dumps({
            "template": trainer_template(run_dir), "base_model": cfg.model, "reference_model": cfg.ref_model or cfg.model,
            "dataset": cfg.data.dataset, "beta": cfg.beta, "loss_type": cfg.loss_type,
            "max_length": cfg.data.max_length}, indent=2))
        state.save_to_json(str(run_dir / "trainer_state.json"))
    evals = [h for h in state.log_history if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"]) if evals else None
    pairs_seen = output.global_step * cfg.batch_size * cfg.grad_accum * max(trainer.args.world_size, 1)
    metrics = {
        "best": {k.removeprefix("eval_"): v for k, v in best.items()} if best else None,
        "final": {k.removeprefix("eval_"): v for k, v in evals[-1].items()} if evals else None,
        "best_epoch": best["epoch"] if best else None,
        "best_checkpoint": state.best_model_checkpoint,
        "train_loss": output.training_loss, "global_step": output.global_step,
        "train_runtime_s": round(output.metrics.get("train_runtime", elapsed), 2), "total_time_s": round(elapsed, 2),
        "pairs_per_second": round(pairs_seen / max(output.metrics.get("train_runtime", elapsed), 1e-9), 3),
        "train_pairs": train_pairs, "reference_pairs_computed": ref_computed,
        "hardware": _hardware(), "torch": torch.__version__, "model": cfg.model, "loss_type": cfg.loss_type,
        "beta": cfg.beta,
    }
    if trainer.args.should_save:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
