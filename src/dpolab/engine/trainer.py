"""`DPOTrainer`: a transformers.Trainer whose only additions are the preference loss of the run's method
(engine/methods.py), its metrics, and complete-checkpoint markers. The loop, optimizer, schedulers, logging and
accelerate integration are transformers'."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from dpolab.engine.layout import packed_batch, padded_batch
from dpolab.engine.logprobs import ld_weights
from dpolab.engine.methods import DPOSettings, MethodSettings, dpo_step, preference_step  # noqa: F401

COMPLETE_MARKER = "dpolab-complete.json"


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict[str, Any]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def features(records: list[dict], ref: dict[str, tuple[float, float]] | None) -> list[dict]:
    """Training features: token ids, the cached reference log-probs (0 for reference-free methods) and, for
    unpaired data, the label; a reward model's pair may carry its `margin`."""
    keep = ("id", "prompt_ids", "chosen_ids", "rejected_ids", "label", "margin")
    none = (0.0, 0.0)
    return [{**{k: r[k] for k in keep if k in r}, "ref_chosen": (ref or {}).get(r["id"], none)[0],
             "ref_rejected": (ref or {}).get(r["id"], none)[1]} for r in records]


@dataclass(frozen=True)
class DPOCollator:
    """Features (token ids + cached reference log-probs) -> a layout batch."""

    layout: str
    pad_id: int
    token_budget: int
    ld_alpha: float | None = None  # LD-DPO: token weights on the responses' tails
    prompt_targets: bool = False  # ORPO's NLL counts the prompt's tokens too (as TRL's)

    def __call__(self, features: list[dict[str, Any]], with_ref: bool = True) -> dict[str, Any]:
        if self.layout == "packed":
            batch = packed_batch(features, self.pad_id, self.token_budget, self.prompt_targets)
        else:
            batch = padded_batch(features, self.pad_id, self.prompt_targets)
        batch["chosen_tokens"] = torch.tensor([len(f["chosen_ids"]) for f in features], dtype=torch.float32)
        batch["rejected_tokens"] = torch.tensor([len(f["rejected_ids"]) for f in features], dtype=torch.float32)
        if self.ld_alpha is not None:
            batch["token_weights"] = ld_weights(batch["seq_index"], batch["chosen_tokens"], batch["rejected_tokens"],
                                                self.ld_alpha)
        if "label" in features[0]:
            batch["labels"] = torch.tensor([bool(f["label"]) for f in features])
        if "margin" in features[0]:  # a reward model's required score gap per pair (TRL's `margin` column)
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float32)
        if with_ref:
            batch["ref_chosen"] = torch.tensor([f["ref_chosen"] for f in features], dtype=torch.float64)
            batch["ref_rejected"] = torch.tensor([f["ref_rejected"] for f in features], dtype=torch.float64)
        return batch


class DPOTrainer(Trainer):
    def __init__(self, *args, method: MethodSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _record(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        for name, values in metrics.items():
            gathered = self.accelerator.gather_for_metrics(values.detach().float())
            self._metric_sums[mode][name].extend(gathered.cpu().tolist())

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(value.reshape(1)).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = preference_step(model, inputs, self.method, self._mean_over_processes)
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
            values = [v for v in values if v == v]  # NaN marks "not this kind of example" (KTO's two labels)
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
