"""One training session: load the policy, fill the reference cache, train with DPOTrainer, write the run folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dpolab.config import TrainConfig
from dpolab.data.prepare import Prepared
from dpolab.engine import refcache
from dpolab.engine.trainer import DPOCollator, DPOSettings, DPOTrainer, last_complete_checkpoint
from dpolab.models import load_model, weights_fingerprint
from dpolab.runtime import Runtime


# Pairs per reference forward, independent of the training batch, so the cache holds the same values for a run of
# any batch size or process count (bitwise, given the same token budget).
REFERENCE_BATCH = 8


class PairDataset(Dataset):
    def __init__(self, records: list[dict[str, Any]]):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[index]


def _features(records: list[dict], ref: dict[str, tuple[float, float]]) -> list[dict]:
    keep = ("id", "prompt_ids", "chosen_ids", "rejected_ids")
    return [{**{k: r[k] for k in keep}, "ref_chosen": ref[r["id"]][0], "ref_rejected": ref[r["id"]][1]} for r in records]


class TrainingSession:
    def __init__(self, cfg: TrainConfig, runtime: Runtime, tokenizer, run_dir: Path):
        self.cfg, self.runtime, self.tokenizer, self.run_dir = cfg, runtime, tokenizer, run_dir
        budget = cfg.token_budget or 2 * cfg.data.max_length
        self.collator = DPOCollator(cfg.layout, tokenizer.pad_token_id, budget)
        self.args = self._training_args()

    def _reference(self, records: list[dict], policy, data_dir: Path) -> tuple[dict, int]:
        """Reference log-probs for `records`, from the cache or computed with the (still untrained) policy."""
        ref_name = self.cfg.ref_model or self.cfg.model
        key = weights_fingerprint(ref_name)
        path = refcache.cache_path(data_dir, key, self.runtime.dtype)

        def load_reference():
            if self.cfg.ref_model is None:
                return policy  # the starting policy *is* the reference: no second copy in memory
            model = load_model(self.cfg.ref_model).to(self.runtime.device)
            return model

        meta = {"reference": ref_name, "weights": key, "dtype": str(self.runtime.dtype)}
        with torch.autocast(self.runtime.device, dtype=self.runtime.dtype, enabled=self.runtime.precision != "fp32"):
            return refcache.ensure_reference(records, path, load_reference, self.collator,
                                             self.cfg.eval_batch_size or REFERENCE_BATCH, self.runtime.device, meta)

    def _training_args(self):
        from transformers import TrainingArguments

        cfg = self.cfg
        evaluate = cfg.eval_every != "no"
        return TrainingArguments(
            output_dir=str(self.run_dir / "checkpoints"),
            per_device_train_batch_size=cfg.batch_size,
            per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
            gradient_accumulation_steps=cfg.grad_accum,
            num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
            learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
            weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch",
            eval_strategy=cfg.eval_every, eval_steps=cfg.eval_steps,
            save_strategy=cfg.save_every, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
            load_best_model_at_end=evaluate, metric_for_best_model="eval_loss" if evaluate else None,
            greater_is_better=False if evaluate else None,
            logging_steps=cfg.logging_steps, report_to=[t for t in cfg.report_to if t != "tensorboard"] or "none",
            activation_checkpointing=cfg.gradient_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False},
            seed=cfg.seed, data_seed=cfg.seed,
            bf16=self.runtime.precision == "bf16", fp16=self.runtime.precision == "fp16",
            use_cpu=self.runtime.device == "cpu", remove_unused_columns=False, dataloader_num_workers=0,
            label_names=[], include_num_input_tokens_seen="no",
        )

    def _callbacks(self, extra) -> list:
        callbacks = list(extra)
        if "tensorboard" in self.cfg.report_to and self.args.should_save:  # one writer, on the main process
            from torch.utils.tensorboard import SummaryWriter
            from transformers.integrations import TensorBoardCallback

            callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(self.run_dir / "logs"))))
        return callbacks

    def run(self, prepared: Prepared, resume: bool = False, callbacks=()):
        from dpolab.engine.outputs import write_outputs
        from dpolab.engine.train import RunResult, TrainingError, _disable_dropout

        started = time.perf_counter()
        train_records, test_records = prepared.split("train"), prepared.split("test")
        if not train_records:
            raise TrainingError(f"{prepared.path} has no training pairs")
        policy = load_model(self.cfg.model).to(self.runtime.device)
        _disable_dropout(policy)
        args = self.args
        # The main process computes the cache (written atomically); the other ranks then read it warm.
        with args.main_process_first(desc="reference log-probs", local=False):
            ref, computed = self._reference(train_records + test_records, policy, prepared.path)
        if self.cfg.lora is not None:
            policy = self._with_lora(policy)
        checkpoint = None
        if resume:
            with args.main_process_first(desc="checkpoint scan", local=False):
                checkpoint, incomplete = last_complete_checkpoint(self.run_dir / "checkpoints")
                for folder in incomplete if args.should_save else ():  # moved aside, never resumed or rotated into
                    aside = self.run_dir / "checkpoints-incomplete" / folder.name
                    aside.parent.mkdir(exist_ok=True)
                    shutil.rmtree(aside, ignore_errors=True)
                    folder.rename(aside)
        evaluate = self.cfg.eval_every != "no" and bool(test_records)
        if not evaluate and self.cfg.eval_every != "no":
            args.eval_strategy, args.load_best_model_at_end = "no", False
        trainer = DPOTrainer(
            model=policy, args=args, data_collator=self.collator, processing_class=self.tokenizer,
            train_dataset=PairDataset(_features(train_records, ref)),
            eval_dataset=PairDataset(_features(test_records, ref)) if evaluate else None,
            dpo=DPOSettings(self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing),
            callbacks=self._callbacks(callbacks),
        )
        try:
            output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        except torch.OutOfMemoryError:
            raise TrainingError("out of memory: lower batch_size (raise grad_accum to keep the effective batch), lower "
                                "token_budget or data.max_length, keep gradient_checkpointing on, or use lora") from None
        elapsed = time.perf_counter() - started
        metrics = write_outputs(trainer, output, self.cfg, self.run_dir, elapsed, computed, len(train_records))
        return RunResult(self.run_dir, metrics, computed)

    def _with_lora(self, policy):
        from peft import LoraConfig, get_peft_model

        lora = self.cfg.lora
        return get_peft_model(policy, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
