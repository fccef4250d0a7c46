"""`DPOTrainer`: a transformers.Trainer whose only additions are the preference loss of the run's method
(engine/methods.py), its metrics, complete-checkpoint markers and a seeded pair order known before training
(`SeededOrder`, so a short run computes reference log-probs only for the pairs it will see). The loop, optimizer,
schedulers, logging and accelerate integration are transformers'."""

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
from dpolab.errors import TrainingError

COMPLETE_MARKER = "dpolab-complete.json"


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, records: list[dict[str, Any]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


class SeededOrder(torch.utils.data.Sampler):
    """Epoch e visits the pairs in the order torch.randperm(n, seed + e) — accelerate's seedable sampler's order,
    owned here so that `planned` can tell before training which pairs a run of so many steps consumes. The trainer
    calls set_epoch before each epoch (also when resuming), so a resumed run sees the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    @staticmethod
    def order(n: int, seed: int, epoch: int = 0) -> list[int]:
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        yield from self.order(self.n, self.seed, self.epoch)
        self.epoch += 1  # as accelerate's sampler: the next pass is the next epoch unless set_epoch says otherwise

    def __len__(self) -> int:
        return self.n


def planned(records: list[dict], seed: int, examples: int | None) -> list[dict]:
    """The records a run consuming `examples` of them (steps × batch × accumulation × processes) trains on: the
    first ones of epoch 0's order; all of them for a full epoch or more (None)."""
    if examples is None or examples >= len(records):
        return records
    return [records[i] for i in sorted(SeededOrder.order(len(records), seed)[:examples])]


def features(records: list[dict], ref: dict[str, tuple[float, float]] | None) -> list[dict]:
    """Training features: token ids, the cached reference log-probs (0 for reference-free methods: ref None; None
    where the run planned no reference, which the collator refuses) and, for unpaired data, the label; a reward
    model's pair may carry its `margin`."""
    keep = ("id", "prompt_ids", "chosen_ids", "rejected_ids", "label", "margin")
    none = (0.0, 0.0) if ref is None else (None, None)
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
    attention: str = "sdpa"  # the packed layout's rows and mask follow the model's attention (engine/flex.py)

    def __call__(self, features: list[dict[str, Any]], with_ref: bool = True) -> dict[str, Any]:
        if self.layout == "packed":
            batch = packed_batch(features, self.pad_id, self.token_budget, self.prompt_targets, self.attention)
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
        if with_ref:  # NaN: a pair the run planned no reference for (the trainer refuses to step on it)
            nan = float("nan")
            batch["ref_chosen"] = torch.tensor([_or(f["ref_chosen"], nan) for f in features], dtype=torch.float64)
            batch["ref_rejected"] = torch.tensor([_or(f["ref_rejected"], nan) for f in features], dtype=torch.float64)
            batch["ids"] = [f.get("id") for f in features]
        return batch


def check_reference(batch: dict[str, Any]) -> None:
    """A batch to step on has every reference value: if the loop ever left the order `planned` assumed, the run
    stops here rather than train on a made-up value. (The loader may collate one batch ahead of the plan: fine.)"""
    missing = torch.isnan(batch["ref_chosen"]) if "ref_chosen" in batch else None
    if missing is not None and missing.any():
        pair = batch["ids"][int(missing.nonzero()[0])]
        raise TrainingError(f"no reference log-probs for pair {pair}: the run planned other pairs")


def _or(value, default):
    return default if value is None else value


class DPOTrainer(Trainer):
    def __init__(self, *args, method: MethodSettings, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self._metric_sums: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_train_sampler(self, train_dataset=None):
        return SeededOrder(len(train_dataset or self.train_dataset), self.args.data_seed or self.args.seed)

    def _record(self, metrics: dict[str, torch.Tensor], mode: str) -> None:
        for name, values in metrics.items():
            gathered = self.accelerator.gather_for_metrics(values.detach().float())
            self._metric_sums[mode][name].extend(gathered.cpu().tolist())

    def _mean_over_processes(self, value: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(value.reshape(1)).mean()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        check_reference(inputs)
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
