"""`DPOTrainer`: a transformers.Trainer whose only additions are the DPO loss, its metrics, and complete-checkpoint
markers. The loop, optimizer, schedulers, logging and accelerate integration are transformers'."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from dpolab.engine.layout import packed_batch, padded_batch
from dpolab.engine.logprobs import batch_logps
from dpolab.engine.losses import dpo_loss

COMPLETE_MARKER = "dpolab-complete.json"


@dataclass(frozen=True)
class DPOCollator:
    """Features (token ids + cached reference log-probs) -> a layout batch."""

    layout: str
    pad_id: int
    token_budget: int

    def __call__(self, features: list[dict[str, Any]], with_ref: bool = True) -> dict[str, Any]:
        if self.layout == "packed":
            batch = packed_batch(features, self.pad_id, self.token_budget)
        else:
            batch = padded_batch(features, self.pad_id)
        batch["chosen_tokens"] = torch.tensor([len(f["chosen_ids"]) for f in features], dtype=torch.float32)
        batch["rejected_tokens"] = torch.tensor([len(f["rejected_ids"]) for f in features], dtype=torch.float32)
        if with_ref:
            batch["ref_chosen"] = torch.tensor([f["ref_chosen"] for f in features], dtype=torch.float64)
            batch["ref_rejected"] = torch.tensor([f["ref_rejected"] for f in features], dtype=torch.float64)
        return batch


@dataclass(frozen=True)
class DPOSettings:
    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0


def dpo_step(model, batch: dict[str, Any], settings: DPOSettings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and TRL-named metrics of one batch (log-probs from the policy, reference from the batch)."""
    logps = batch_logps(model, batch)  # (2B,)
    chosen, rejected = logps.chunk(2)  # (B,), (B,)
    ref_chosen = batch["ref_chosen"].to(logps)
    ref_rejected = batch["ref_rejected"].to(logps)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, settings.beta, settings.loss_type, settings.label_smoothing,
        batch["chosen_tokens"].to(logps), batch["rejected_tokens"].to(logps))
    metrics = {
        "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
        # Ties count as half (a freshly initialized policy has all margins 0: accuracy 0.5, not 0).
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
    }
    return losses.mean(), metrics


class DPOTrainer(Trainer):
    def __init__(self, *args, dpo: DPOSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.dpo = dpo
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _record(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        for name, values in metrics.items():
            gathered = self.accelerator.gather_for_metrics(values.detach().float())
            self._metric_sums[mode][name].extend(gathered.cpu().tolist())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = dpo_step(model, inputs, self.dpo)
        self._record(metrics, "train" if model.training else "eval")
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss, _ = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metric_sums[mode].items():
            if values:
                logs[prefix + name] = sum(values) / len(values)
        self._metric_sums[mode].clear()
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # transformers writes checkpoints in place: a kill mid-save leaves a folder that looks like the latest.
        # The marker is written last, atomically, with the size of every file: only marked folders are resumable.
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        if self.args.should_save and folder.is_dir():
            write_marker(folder)


def write_marker(folder: Path) -> None:
    sizes = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != COMPLETE_MARKER}
    tmp = folder / (COMPLETE_MARKER + ".tmp")
    tmp.write_text(json.dumps(sizes))
    tmp.replace(folder / COMPLETE_MARKER)


def is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        sizes = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return all((folder / name).is_file() and (folder / name).stat().st_size == size for name, size in sizes.items())


def last_complete_checkpoint(checkpoints: Path) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint, incomplete ones newer than it)."""
    found = sorted((p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    incomplete = []
    for folder in found:
        if is_complete(folder):
            return folder, incomplete
        incomplete.append(folder)
    return None, incomplete
