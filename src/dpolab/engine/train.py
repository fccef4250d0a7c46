"""`run_training(config) -> RunResult`, one readable sequence: resolve the data → reference pass → trainer → save.

Under torchrun/accelerate every rank calls it; the main process alone prepares data, fills the reference cache and
writes the run folder (through `folders.run.RunFolder`), the other ranks wait for it (`main_process_first`).
The data settings of a run are those of its prepared data: a prepared folder's recorded template, max_length and
split are the run's, and a config value that contradicts them is refused rather than silently overridden.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpolab.config import DataConfig, TrainConfig
from dpolab.data.prepare import Prepared, is_prepared, load_prepared, prepare_data
from dpolab.errors import ConfigError, TrainingError
from dpolab.folders.run import RunFolder
from dpolab.runtime import Runtime, resolve_runtime

log = logging.getLogger("dpolab")

# What shaped a prepared folder; a run on that folder may not ask for other values of these.
DATA_SETTINGS = ("template", "max_length", "prompt_cap", "test_size", "seed", "shape", "split", "limit",
                 "prompt_column", "chosen_column", "rejected_column")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    ref_pairs_computed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- data settings
def _contradictions(requested: DataConfig, prepared: DataConfig) -> list[str]:
    given = requested.model_fields_set | ({"prompt_cap"} if "max_prompt_length" in requested.model_fields_set else set())
    return [f"data.{name} {getattr(requested, name)!r} (the data has {getattr(prepared, name)!r})"
            for name in DATA_SETTINGS if name in given and getattr(requested, name) != getattr(prepared, name)]


def with_data_settings(cfg: TrainConfig, prepared_dir: str | Path | None = None) -> TrainConfig:
    """`cfg` whose data settings are those recorded by the prepared folder it trains on (`cfg.data.dataset`, or the
    folder a raw source was prepared into). Settings given explicitly that contradict the folder are refused."""
    folder = prepared_dir or (cfg.data.dataset if is_prepared(cfg.data.dataset) else None)
    if folder is None or not is_prepared(folder):
        return cfg
    recorded = load_prepared(folder).config
    clashes = _contradictions(cfg.data, recorded)
    if clashes:
        raise ConfigError(f"{folder} was prepared with other settings than asked for: {'; '.join(clashes)}. Drop these "
                          "options to use the folder as prepared, or prepare the data again with them")
    return cfg.model_copy(update={"data": recorded.model_copy(update={"dataset": cfg.data.dataset})})


def check_context(cfg: TrainConfig, model_config) -> None:
    from dpolab.models import context_length

    limit = context_length(model_config)
    if limit is not None and cfg.data.max_length > limit:
        raise ConfigError(f"data.max_length {cfg.data.max_length} exceeds {cfg.model}'s context of {limit} tokens")


def resolve_data(cfg: TrainConfig, run: RunFolder, tokenizer) -> Prepared:
    """A prepared folder as is, or a raw source prepared on the fly (into RUN/data) with the model's tokenizer."""
    from dpolab.data.tokenize import tokenizer_fingerprint

    if is_prepared(cfg.data.dataset):
        prepared = load_prepared(cfg.data.dataset)
    else:
        if not is_prepared(run.data_dir):
            prepare_data(cfg.data.model_copy(update={"tokenizer": cfg.model}), run.data_dir, overwrite=True,
                         tokenizer=tokenizer)
        prepared = load_prepared(run.data_dir)
    found = prepared.report.get("tokenizer_fingerprint")
    if found and found != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"{prepared.path} was prepared with the tokenizer of {prepared.config.tokenizer!r}, which "
                          f"differs from {cfg.model!r}'s; prepare it again with --model {cfg.model}")
    return prepared


# --------------------------------------------------------------------------------------------- plan (dry run)
def plan(cfg: TrainConfig, prepared_report: dict[str, Any], n_params: int | None) -> dict[str, Any]:
    train_pairs = prepared_report["train"]
    pairs_per_step = cfg.batch_size * cfg.grad_accum
    steps_per_epoch = math.ceil(train_pairs / pairs_per_step)
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(steps_per_epoch * cfg.epochs)
    tok = prepared_report["tokens"]
    per_pair = (tok["prompt"]["mean"] + tok["chosen"]["mean"] + tok["rejected"]["mean"]) if tok.get("prompt") else 0
    return {"train_pairs": train_pairs, "test_pairs": prepared_report["test"], "steps_per_epoch": steps_per_epoch,
            "total_steps": steps, "model_parameters": n_params, "tokens_per_pair_packed": round(per_pair, 1),
            "estimated_tokens": int(per_pair * steps * pairs_per_step),
            "estimated_train_flops": int(6 * (n_params or 0) * per_pair * steps * pairs_per_step)}


def meta_model(model_name: str):
    """The model built from its config on the meta device: shapes and class, no weights loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpolab.models import load_model_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_model_config(model_name))


def count_parameters(model_name: str) -> tuple[int, Any]:
    """Parameters from the config alone, on the meta device: no weights loaded."""
    model = meta_model(model_name)
    return sum(p.numel() for p in model.parameters()), model.config


def dry_run(cfg: TrainConfig) -> dict[str, Any]:
    """Validate and plan without loading weights. What needs the Hub offline is reported as unavailable."""
    from dpolab.data.prepare import build
    from dpolab.errors import ModelNotFound, SourceError

    cfg = with_data_settings(cfg)
    unavailable, n_params, report, records = {}, None, None, None
    try:
        n_params, model_config = count_parameters(cfg.model)
        check_context(cfg, model_config)
    except (OSError, ModelNotFound) as exc:
        unavailable["model"] = f"{cfg.model}: {str(exc).splitlines()[0][:160]}"
    try:
        if is_prepared(cfg.data.dataset):
            prepared = load_prepared(cfg.data.dataset)
            report, records = prepared.report, prepared.split("train")
        elif "model" not in unavailable:
            records, _, report, _ = build(cfg.data.model_copy(update={"tokenizer": cfg.model}))
    except SourceError as exc:
        unavailable["data"] = str(exc).splitlines()[0][:200]
    result: dict[str, Any] = {"config": cfg.model_dump(mode="json")}
    if report is not None:
        result["plan"] = plan(cfg, report, n_params)
        if records and "model" not in unavailable:
            result["plan"]["memory"] = memory_plan(cfg, records)
    else:
        result["plan"] = {"total_steps": "unknown until the data can be read", "model_parameters": n_params}
    if unavailable:
        result["unavailable_offline"] = unavailable
    return result


# --------------------------------------------------------------------------------------------- the pieces
def training_arguments(cfg: TrainConfig, runtime: Runtime, run: RunFolder):
    """The `TrainingArguments` of a run: a pure function of the config, the runtime and the folder."""
    from transformers import TrainingArguments

    evaluate = cfg.eval_every != "no"
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size or cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        # Fused: one kernel per parameter, in place; the foreach kernels take ~4x as long and hold a 4·P temporary.
        optim="adamw_torch_fused",
        eval_strategy=cfg.eval_every, eval_steps=cfg.eval_steps,
        save_strategy=cfg.save_every, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=evaluate, metric_for_best_model="eval_loss" if evaluate else None,
        greater_is_better=False if evaluate else None,
        logging_steps=cfg.logging_steps, report_to=[t for t in cfg.report_to if t != "tensorboard"] or "none",
        # `auto` is decided once the data is known (resolve_checkpointing), which then sets activation_checkpointing.
        activation_checkpointing=cfg.gradient_checkpointing is True,
        activation_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.seed, data_seed=cfg.seed,
        bf16=runtime.precision == "bf16", fp16=runtime.precision == "fp16", use_cpu=runtime.device == "cpu",
        remove_unused_columns=False, dataloader_num_workers=0, label_names=[], include_num_input_tokens_seen="no",
    )


def disable_dropout(model) -> None:
    import torch

    # DPO compares policy and reference log-probs of the same tokens: dropout would make them differ at step 0.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def reference_logps(cfg: TrainConfig, runtime: Runtime, records: list[dict], policy, data_dir: Path, collator
                    ) -> tuple[dict, int]:
    """Reference log-probs for `records`, from the cache or computed with the (still untrained) policy."""
    import torch

    from dpolab.engine import refcache
    from dpolab.models import load_model, weights_fingerprint

    ref_name = cfg.ref_model or cfg.model
    key = weights_fingerprint(ref_name)

    def load_reference():
        # The starting policy *is* the reference unless another is named: no second copy in memory.
        if cfg.ref_model is None:
            return policy
        reference = load_model(cfg.ref_model).to(runtime.device)
        with_attention(cfg, reference, runtime.device)  # a flex-laid batch on an SDPA model gets the dense mask
        return reference

    variant = f"ld_alpha={cfg.ld_alpha}" if cfg.ld_alpha is not None else ""
    meta = {"reference": ref_name, "weights": key, "dtype": str(runtime.dtype), "variant": variant}
    path = refcache.cache_path(data_dir, key, runtime.dtype, variant)
    with torch.autocast(runtime.device, dtype=runtime.dtype, enabled=runtime.precision != "fp32"):
        return refcache.ensure_reference(records, path, load_reference, collator,
                                         cfg.eval_batch_size or refcache.REFERENCE_BATCH, runtime.device, meta)


def with_attention(cfg: TrainConfig, model, device) -> str:
    """The run's packed-layout attention for `model` on `device` (sdpa, pairs or flex: engine/flex.py), set on it."""
    from dpolab.engine.flex import resolve_attention, use_attention

    attention = resolve_attention(cfg.attention, cfg.layout, model, device)
    use_attention(model, attention)
    if cfg.attention == "auto" and cfg.layout == "packed":
        log.info("packed layout attention: %s", attention)
    return attention


def load_policy(cfg: TrainConfig, tokenizer):
    """The model trained: the causal LM, or for a reward model the same weights under a one-output score head."""
    from dpolab.engine.methods import SCORED
    from dpolab.models import load_model, load_reward_model

    if cfg.method in SCORED:
        return load_reward_model(cfg.model, tokenizer.pad_token_id, seed=cfg.seed)
    return load_model(cfg.model)


def pairs_to_reference(cfg: TrainConfig, args, train: list[dict]) -> list[dict]:
    """The training pairs whose reference log-probs the run needs: the ones its seeded order will reach in its steps
    (a 3-step run, or half an epoch, pays for those batches, not the data set); all of them for a run of whole
    epochs. Steps as transformers counts them for `epochs` (ceil of epochs × update steps per epoch)."""
    from dpolab.engine.trainer import planned

    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = None
    if cfg.max_steps is not None and cfg.max_steps > 0:
        steps = cfg.max_steps
    elif cfg.epochs < 1:
        batches = math.ceil(len(train) / (args.per_device_train_batch_size * args.world_size))  # per process
        steps = math.ceil(cfg.epochs * math.ceil(batches / args.gradient_accumulation_steps))
    return planned(train, args.data_seed or args.seed, None if steps is None else steps * per_step)


def with_lora(policy, lora, method: str = "dpo"):
    from peft import LoraConfig, get_peft_model

    from dpolab.engine.methods import SCORED

    # A reward model's score head is new: it trains in full and is saved with the adapter (TRL's advice for
    # RewardTrainer: modules_to_save=["score"]); LoRA adapts the decoder only.
    scored = method in SCORED
    return get_peft_model(policy, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules,
                                             task_type="SEQ_CLS" if scored else "CAUSAL_LM",
                                             modules_to_save=["score"] if scored else None))


def callbacks_for(cfg: TrainConfig, args, run: RunFolder, extra) -> list:
    callbacks = list(extra)
    if "tensorboard" in cfg.report_to and args.should_save:  # one writer, on the main process
        from torch.utils.tensorboard import SummaryWriter
        from transformers.integrations import TensorBoardCallback

        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run.logs_dir))))
    return callbacks


def resume_point(run: RunFolder, args, resume: bool) -> Path | None:
    """The newest complete checkpoint; incomplete newer ones are moved aside (never resumed or rotated into)."""
    from dpolab.engine.trainer import last_complete_checkpoint
    from dpolab.fsutil import remove_folder

    if not resume:
        return None
    with args.main_process_first(desc="checkpoint scan", local=False):
        checkpoint, incomplete = last_complete_checkpoint(run.checkpoints_dir)
        for folder in incomplete if args.should_save else ():
            aside = run.incomplete_dir / folder.name
            aside.parent.mkdir(exist_ok=True)
            remove_folder(aside)
            folder.rename(aside)
    if checkpoint is None and args.should_save:
        log.warning("--resume: no complete checkpoint in %s, so training starts from the beginning", run.checkpoints_dir)
    return checkpoint


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def model_meta(cfg: TrainConfig) -> dict[str, Any]:
    """model/dpolab.json: how to prompt the model and what trained it (cfg has the prepared data's settings)."""
    from dpolab.engine.methods import REFERENCE_FREE, SCORED

    scored = cfg.method in SCORED  # a reward model has no β and no DPO loss type
    return {"template": cfg.data.template, "base_model": cfg.model, "method": cfg.method,
            "reference_model": None if cfg.method in REFERENCE_FREE else cfg.ref_model or cfg.model,
            "dataset": cfg.data.dataset, "beta": None if scored else cfg.beta,
            "loss_type": None if scored else cfg.loss_type, "max_length": cfg.data.max_length, **method_options(cfg)}


def method_options(cfg: TrainConfig) -> dict[str, Any]:
    """The method's own options, as recorded with the model and shown by eval, the card and the app."""
    if cfg.method == "dpo":
        options = {"loss_weights": cfg.loss_weights, "label_smoothing": cfg.label_smoothing, "ld_alpha": cfg.ld_alpha}
        if "discopop" in cfg.loss_types:
            options["discopop_tau"] = cfg.discopop_tau
        return {k: v for k, v in options.items() if v}
    if cfg.method in ("simpo", "cpo"):
        gamma = {"simpo_gamma": cfg.simpo_gamma, "alphapo_alpha": cfg.alphapo_alpha} if cfg.method == "simpo" else {}
        return {**gamma, "cpo_alpha": cfg.nll_weight, "label_smoothing": cfg.label_smoothing}
    if cfg.method == "kto":
        return {"desirable_weight": cfg.desirable_weight, "undesirable_weight": cfg.undesirable_weight}
    if cfg.method == "reward":
        return {"center_rewards_coefficient": cfg.center_rewards_coefficient}
    return {}


def method_settings(cfg: TrainConfig):
    from dpolab.engine.methods import MethodSettings

    return MethodSettings(
        beta=cfg.beta, loss_type=cfg.loss_types, label_smoothing=cfg.label_smoothing, method=cfg.method,
        loss_weights=tuple(cfg.loss_weights) if cfg.loss_weights else None, discopop_tau=cfg.discopop_tau,
        simpo_gamma=cfg.simpo_gamma, alphapo_alpha=cfg.alphapo_alpha, cpo_alpha=cfg.nll_weight, desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight, center_rewards_coefficient=cfg.center_rewards_coefficient)


def check_data_for_method(cfg: TrainConfig, prepared: Prepared) -> None:
    """KTO trains on unpaired examples with both labels; the pair methods on pairs."""
    kind = prepared.report.get("kind", "paired")
    if cfg.method == "kto" and kind != "unpaired":
        raise ConfigError(f"method kto trains on unpaired (prompt, completion, label) data, and {prepared.path} holds "
                          "pairs: prepare it with `dpolab data prepare --unpaired` (data.unpaired: true)")
    if cfg.method != "kto" and kind == "unpaired":
        raise ConfigError(f"{prepared.path} holds unpaired examples: train it with --method kto")
    if cfg.method == "kto":
        from dpolab.data.prepare import check_labels

        check_labels(prepared.report, prepared.path)


def run_metrics(trainer, output, cfg: TrainConfig, elapsed: float, ref_computed: int, train_pairs: int) -> dict:
    import torch

    state = trainer.state
    evals = [h for h in state.log_history if "eval_loss" in h]
    best = min(evals, key=lambda h: h["eval_loss"]) if evals else None
    runtime_s = output.metrics.get("train_runtime", elapsed)
    pairs_seen = output.global_step * cfg.batch_size * cfg.grad_accum * max(trainer.args.world_size, 1)
    return {
        "best": {k.removeprefix("eval_"): v for k, v in best.items()} if best else None,
        "final": {k.removeprefix("eval_"): v for k, v in evals[-1].items()} if evals else None,
        "best_epoch": best["epoch"] if best else None, "best_checkpoint": state.best_model_checkpoint,
        "train_loss": output.training_loss, "global_step": output.global_step,
        "train_runtime_s": round(runtime_s, 2), "total_time_s": round(elapsed, 2),
        "pairs_per_second": round(pairs_seen / max(runtime_s, 1e-9), 3),
        "train_pairs": train_pairs, "reference_pairs_computed": ref_computed,
        "hardware": _hardware(), "torch": torch.__version__, "model": cfg.model, "method": cfg.method,
        "loss_type": cfg.loss_type, "beta": cfg.beta,
    }


def save_outputs(run: RunFolder, trainer, cfg: TrainConfig) -> None:
    """model/ (HF format, the best checkpoint when evaluating), adapter/ for LoRA, trainer_state.json."""
    if cfg.lora is not None:
        if trainer.args.should_save:
            trainer.model.save_pretrained(run.adapter_dir)
        trainer.model = trainer.model.merge_and_unload()
    if trainer.args.should_save:
        trainer.save_model(str(run.model_dir))  # config, generation_config, safetensors, tokenizer, training_args.bin
        (run.model_dir / "training_args.json").write_text(trainer.args.to_json_string())
        run.write_model_meta(model_meta(cfg))
        run.write_state(trainer.state)


def collator_for(cfg: TrainConfig, tokenizer, attention: str):
    from dpolab.engine.trainer import DPOCollator

    return DPOCollator(cfg.layout, tokenizer.pad_token_id, cfg.token_budget or 2 * cfg.data.max_length, cfg.ld_alpha,
                       prompt_targets=cfg.method == "orpo", attention=attention)


def trainable_parameters(cfg: TrainConfig, model_config, params: int) -> int:
    """All parameters, or with LoRA the adapter's (and a reward model's score head), counted on the meta device."""
    if cfg.lora is None:
        return params
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = with_lora(AutoModelForCausalLM.from_config(model_config), cfg.lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def memory_estimates(cfg: TrainConfig, runtime: Runtime, records: list[dict], tokenizer):
    """(without, with) checkpointing estimates of the run's peak memory (engine/memory.py), no weights loaded: the
    steps laid out as the run will lay them (the attention the model will get decides the packed rows and mask)."""
    from dpolab.engine import memory
    from dpolab.engine.flex import resolve_attention
    from dpolab.engine.methods import REFERENCE_FREE, SCORED

    model = meta_model(cfg.model)
    params, model_config = sum(p.numel() for p in model.parameters()), model.config
    attention = resolve_attention(cfg.attention, cfg.layout, model, runtime.device)
    reference = None
    if cfg.method not in REFERENCE_FREE:
        reference = 0 if cfg.ref_model is None else count_parameters(cfg.ref_model)[0]
    step = memory.step_shape(records, cfg.batch_size, collator_for(cfg, tokenizer, attention))
    common = dict(shape=memory.model_shape(model_config), params=params, step=step, dense_mask=attention == "sdpa",
                  pair_masks=attention == "pairs", trainable=trainable_parameters(cfg, model_config, params), half=runtime.precision != "fp32",
                  scored=cfg.method in SCORED, reference_params=reference)
    return memory.estimate_memory(**common), memory.estimate_memory(**common, checkpointing=True)


def memory_plan(cfg: TrainConfig, records: list[dict]) -> dict[str, Any]:
    """The dry run's view of `resolve_checkpointing`: the estimates and what auto would decide on this machine."""
    from dpolab.engine import memory
    from dpolab.models import load_tokenizer

    try:
        runtime = resolve_runtime(cfg.precision)
    except ConfigError as exc:  # fp16 on a CPU: the run itself will say so
        return {"unavailable": str(exc)}
    off, on = memory_estimates(cfg, runtime, records, load_tokenizer(cfg.model))
    available, source = memory.available_memory(runtime.device)
    return {"gradient_checkpointing": memory.decide_checkpointing(cfg.gradient_checkpointing, off.peak, available),
            "estimated_peak_without_checkpointing": memory.fmt_bytes(off.peak),
            "estimated_peak_with_checkpointing": memory.fmt_bytes(on.peak), "tokens_per_step": off.tokens,
            "available": f"{memory.fmt_bytes(available)} ({source})"}


def resolve_checkpointing(cfg: TrainConfig, runtime: Runtime, records: list[dict], tokenizer, args
                          ) -> tuple[TrainConfig, dict[str, Any]]:
    """`cfg` with gradient_checkpointing resolved to a bool, and what decided it (recorded in metrics.json).
    Processes sharing one CPU machine share its memory, so their estimates add up; ranks on GPUs have one each."""
    from dpolab.engine import memory

    off, on = memory_estimates(cfg, runtime, records, tokenizer)
    available, source = memory.available_memory(runtime.device)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if runtime.device == "cpu" else 1
    enabled = memory.decide_checkpointing(cfg.gradient_checkpointing, processes * off.peak, available)
    if args.world_size > 1:
        import torch

        flag = torch.tensor([int(enabled)], device=args.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # one rank short of memory: all on
        enabled = bool(flag.item())
    info = {"gradient_checkpointing": enabled, "requested": cfg.gradient_checkpointing, "available_bytes": available,
            "available_source": source, "safety_fraction": memory.SAFETY_FRACTION, "processes": processes,
            "estimate_without_checkpointing": off.as_dict(), "estimate_with_checkpointing": on.as_dict()}
    f, why = memory.fmt_bytes, "auto" if cfg.gradient_checkpointing == "auto" else "forced"
    log.info("gradient checkpointing %s (%s): estimated peak %s without it (weights %s, grads %s, AdamW %s, "
             "activations %s for %d tokens/step, output head %s), %s with it; %s available (%s), planning on %d%% of it",
             "on" if enabled else "off", why, f(off.peak), f(off.weights), f(off.grads), f(off.optimizer),
             f(off.activations + off.mask), off.tokens, f(off.head), f(on.peak), f(available), source or "unknown",
             round(100 * memory.SAFETY_FRACTION))
    if enabled and available is not None and processes * on.peak > memory.SAFETY_FRACTION * available:
        log.warning("even with gradient checkpointing the run may not fit in memory: lower batch_size or token_budget, "
                    "or use lora")
    return cfg.model_copy(update={"gradient_checkpointing": enabled}), info


# --------------------------------------------------------------------------------------------- the sequence
def _setup(cfg: TrainConfig, run: RunFolder, resume: bool, overwrite: bool):
    from dpolab.models import load_model_config, load_tokenizer

    run.check(resume, overwrite, inputs=[cfg.data.dataset])
    runtime = resolve_runtime(cfg.precision)
    check_context(cfg, load_model_config(cfg.model))
    tokenizer = load_tokenizer(cfg.model)
    args = training_arguments(cfg, runtime, run)  # initializes the process group when distributed
    with args.main_process_first(desc="run folder and data", local=False):
        if args.should_save:
            run.create(overwrite)
        prepared = resolve_data(cfg, run, tokenizer)
        cfg = with_data_settings(cfg, prepared.path)
    # Every rank decides (a collective keeps them agreeing); config.yaml records the resolved value.
    cfg, memory_info = resolve_checkpointing(cfg, runtime, prepared.split("train"), tokenizer, args)
    args.activation_checkpointing = cfg.gradient_checkpointing
    if args.should_save:
        run.write_config(cfg)
        run.write_data_report(prepared.report)
    return cfg, runtime, tokenizer, args, prepared, memory_info


def _trainer(cfg: TrainConfig, args, tokenizer, collator, policy, train, test, ref, callbacks):
    from dpolab.engine.trainer import DPOTrainer, PairDataset, features

    evaluate = cfg.eval_every != "no" and bool(test)
    if not evaluate and cfg.eval_every != "no":  # no held-out pairs: nothing to evaluate or pick the best by
        args.eval_strategy, args.load_best_model_at_end = "no", False
    return DPOTrainer(
        model=policy, args=args, data_collator=collator, processing_class=tokenizer,
        train_dataset=PairDataset(features(train, ref)), eval_dataset=PairDataset(features(test, ref)) if evaluate else None,
        method=method_settings(cfg), callbacks=callbacks)


def run_training(cfg: TrainConfig, resume: bool = False, overwrite: bool = False, callbacks=()) -> RunResult:
    """Train and write the run folder (see the module docstring for the order of things)."""
    import torch

    from dpolab.engine.callbacks import ProgressCallback, StopCallback
    from dpolab.engine.methods import REFERENCE_FREE

    started = time.perf_counter()
    run = RunFolder(Path(cfg.output_dir))
    cfg = with_data_settings(cfg)  # before the context check: the folder's max_length is the run's
    cfg, runtime, tokenizer, args, prepared, memory_info = _setup(cfg, run, resume, overwrite)
    if args.should_save and not resume:
        run.progress_file.unlink(missing_ok=True)  # a fresh start: no curves of an earlier attempt
    if args.should_save and run.stop_requested():
        log.info("a stop was asked for before training began: training stops after its first step")
    train, test = prepared.split("train"), prepared.split("test")
    if not train:
        raise TrainingError(f"{prepared.path} has no training pairs")
    check_data_for_method(cfg, prepared)
    policy = load_policy(cfg, tokenizer).to(runtime.device)
    disable_dropout(policy)
    collator = collator_for(cfg, tokenizer, with_attention(cfg, policy, runtime.device))
    ref, computed = None, 0
    if cfg.method not in REFERENCE_FREE:
        # The main process computes the cache (written atomically); the other ranks then read it warm.
        with args.main_process_first(desc="reference log-probs", local=False):
            ref, computed = reference_logps(cfg, runtime, pairs_to_reference(cfg, args, train) + test, policy,
                                            prepared.path, collator)
    if cfg.lora is not None:
        policy = with_lora(policy, cfg.lora, cfg.method)
    stop = StopCallback(run)
    trainer = _trainer(cfg, args, tokenizer, collator, policy, train, test, ref,
                       callbacks_for(cfg, args, run, [ProgressCallback(run), stop, *callbacks]))
    checkpoint = resume_point(run, args, resume)
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except torch.OutOfMemoryError:
        raise TrainingError("out of memory: lower batch_size (raise grad_accum to keep the effective batch), lower "
                            "token_budget or data.max_length, set gradient_checkpointing on, or use lora") from None
    if stop.stopped_at is not None:  # a clean stop: the checkpoint is written; no model/ or metrics until resumed
        if args.should_save:
            run.write_state(trainer.state)
            run.clear_stop()
        return RunResult(run.path, {"stopped_at_step": stop.stopped_at, "max_steps": trainer.state.max_steps},
                         computed, extra={"stopped": True})
    save_outputs(run, trainer, cfg)
    metrics = {**run_metrics(trainer, output, cfg, time.perf_counter() - started, computed, len(train)),
               "precision": runtime.precision, "memory": memory_info}
    if args.should_save:
        run.write_metrics(metrics)
    return RunResult(run.path, metrics, computed)
