"""Typed configuration for every stage: YAML + CLI overrides, validated once at the edge, then passed as objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dpolab import EMBEDDED_MODEL

Template = Literal["qa", "raw", "chat"]
Shape = Literal["auto", "explicit", "hh", "conversational"]
LossType = Literal["sigmoid", "ipo", "hinge", "robust"]
Layout = Literal["packed", "padded"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field at fault."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Frozen):
    """How raw preference rows become a prepared (clean, tokenized, split) dataset."""

    dataset: str = Field("demo", description="Hub dataset id, local file/folder, a prepared folder, or 'demo'.")
    split: str = Field("train", description="Split to read from a Hub dataset.")
    shape: Shape = Field("auto", description="Row shape; 'auto' detects it from the columns.")
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    template: Template = Field("qa", description="qa: 'Q: … A: …'; raw: text as is; chat: the tokenizer's template.")
    tokenizer: str = Field(EMBEDDED_MODEL, description="Model name whose tokenizer is used.")
    max_length: int = Field(512, gt=8, description="Max tokens of prompt+response.")
    max_prompt_length: int | None = Field(None, gt=0, description="Prompt cap when a pair is too long (default max_length/2).")
    test_size: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 42
    strict: bool = Field(False, description="Fail on the first dropped row instead of recording it.")
    limit: int | None = Field(None, gt=0, description="Read at most this many rows (for quick looks).")

    @model_validator(mode="after")
    def _prompt_cap(self) -> "DataConfig":
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        return self

    @property
    def prompt_cap(self) -> int:
        return self.max_prompt_length or self.max_length // 2


class LoraConfig(_Frozen):
    r: int = Field(16, gt=0)
    alpha: int = 32
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class TrainConfig(_Frozen):
    """One DPO training run. Defaults follow the original study where it stated them."""

    output_dir: Path = Path("runs/dpo")
    model: str = EMBEDDED_MODEL
    ref_model: str | None = Field(None, description="Separate reference model; default: a frozen copy of `model`.")
    data: DataConfig = DataConfig()
    loss_type: LossType = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO/robust noise rate ε.")
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = 0.0
    batch_size: int = Field(8, gt=0, description="Pairs per device per step.")
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    epochs: float = Field(5, gt=0)
    max_steps: int = -1
    gradient_checkpointing: bool = True
    eval_every: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = None
    save_every: Literal["epoch", "steps"] = "epoch"
    save_steps: int | None = None
    save_total_limit: int | None = 2
    logging_steps: int = 1
    seed: int = 42
    layout: Layout = "packed"
    token_budget: int | None = Field(None, gt=0, description="Target tokens per packed row (default 2*max_length).")
    precision: Precision = "auto"
    lora: LoraConfig | None = None
    report_to: list[str] = ["tensorboard"]
    max_grad_norm: float = 1.0

    @model_validator(mode="after")
    def _steps(self) -> "TrainConfig":
        if self.eval_every == "steps" and not self.eval_steps:
            raise ValueError("eval_every=steps needs eval_steps")
        if self.save_every == "steps" and not self.save_steps:
            raise ValueError("save_every=steps needs save_steps")
        if self.label_smoothing and self.loss_type not in ("robust",):
            raise ValueError("label_smoothing applies to loss_type=robust only")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def load_config(cls: type[BaseModel], path: Path | None = None, overrides: dict[str, Any] | None = None):
    """YAML file (optional) + dotted overrides (CLI, win over YAML) -> validated `cls` instance."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, found {type(loaded).__name__}")
        tree = loaded or {}
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        where = f"{path}: " if path else ""
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where}invalid config: {problems}") from None


def dump_config(config: BaseModel, path: Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
