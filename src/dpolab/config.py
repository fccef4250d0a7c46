"""Typed configuration for every stage: YAML + CLI overrides, validated once at the edge, then passed as objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpolab import EMBEDDED_MODEL
from dpolab.errors import ConfigError

Template = Literal["qa", "raw", "chat"]
Shape = Literal["auto", "explicit", "hh", "conversational", "unpaired"]
LossType = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                   "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
Method = Literal["dpo", "simpo", "cpo", "orpo", "kto", "reward"]
Layout = Literal["packed", "padded"]
Attention = Literal["auto", "sdpa", "pairs", "flex"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]




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
    completion_column: str = Field("completion", description="Unpaired (KTO) rows: the completion column.")
    label_column: str = Field("label", description="Unpaired (KTO) rows: the boolean label column.")
    template: Template = Field("qa", description="qa: 'Q: … A: …'; raw: text as is; chat: the tokenizer's template.")
    tokenizer: str = Field(EMBEDDED_MODEL, description="Model name whose tokenizer is used.")
    max_length: int = Field(512, gt=8, description="Max tokens of prompt+response.")
    max_prompt_length: int | None = Field(None, gt=0, description="Prompt cap when a pair is too long (default max_length/2).")
    test_size: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 42
    strict: bool = Field(False, description="Fail on the first dropped row instead of recording it.")
    limit: int | None = Field(None, gt=0, description="Read at most this many rows (for quick looks).")
    unpaired: bool = Field(False, description="Turn each pair into two unpaired (KTO) rows: (prompt, chosen, true) and "
                                              "(prompt, rejected, false); no effect on data that is already unpaired.")

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
    """One preference-tuning run (DPO by default). Defaults follow the original study where it stated them."""

    output_dir: Path = Path("runs/dpo")
    model: str = EMBEDDED_MODEL
    ref_model: str | None = Field(None, description="Separate reference model; default: a frozen copy of `model`.")
    data: DataConfig = DataConfig()
    method: Method = Field("dpo", description="dpo (a frozen reference) | simpo | cpo | orpo (reference-free) | kto "
                                              "(unpaired) | reward (a Bradley–Terry reward model: a score head).")
    loss_type: LossType | list[LossType] = Field("sigmoid", description="dpo: one TRL loss_type, or several combined.")
    loss_weights: list[float] | None = Field(None, description="dpo: a weight per loss_type (default 1 each).")
    beta: float = Field(0.1, gt=0, description="β: DPO/KTO/SimPO/CPO temperature; ORPO's λ.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="ε: label noise (robust, exo_pair, aot*, simpo, cpo).")
    discopop_tau: float = Field(0.05, gt=0, description="dpo discopop: τ of the log-ratio modulation.")
    ld_alpha: float | None = Field(None, ge=0, le=1, description="dpo: LD-DPO weight of tokens past the shared length.")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin γ.")
    alphapo_alpha: float = Field(0.0, description="simpo: AlphaPO's α, reward (1 − π̄^(−α))/α (0: SimPO's avg log π).")
    cpo_alpha: float | None = Field(None, ge=0, description="cpo/simpo: weight of the chosen NLL (default cpo 1, simpo 0).")
    desirable_weight: float = Field(1.0, gt=0, description="kto: λ_D, weight of desirable examples.")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: λ_U, weight of undesirable examples.")
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="reward: c of the c·(r_chosen + r_rejected)² term pulling rewards to mean zero (TRL "
                                "recommends 0.01; default off).")
    learning_rate: float = Field(1e-3, gt=0)
    lr_scheduler: str = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = 0.0
    batch_size: int = Field(8, gt=0, description="Pairs per device per step.")
    eval_batch_size: int | None = Field(None, gt=0)
    grad_accum: int = Field(1, gt=0)
    epochs: float = Field(5, gt=0)
    max_steps: int = Field(-1, description="Stop after this many optimizer steps; -1: train for `epochs`.")
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="auto: on only when the run's estimated peak memory exceeds what the device has "
                            "(engine/memory.py); true/on forces it, false/off turns it off.")
    eval_every: Literal["epoch", "steps", "no"] = "epoch"
    eval_steps: int | None = None
    save_every: Literal["epoch", "steps"] = "epoch"
    save_steps: int | None = None
    save_total_limit: int | None = 2
    logging_steps: int = 1
    seed: int = 42
    layout: Layout = "packed"
    token_budget: int | None = Field(None, gt=0, description="Target tokens per packed row (default 2*max_length).")
    attention: Attention = Field("auto", description="Packed layout's attention: sdpa (dense 4D mask, rows of about "
                                                     "token_budget) | pairs (SDPA pair by pair, one unpadded row per "
                                                     "step) | flex (FlexAttention BlockMask, one row per step; CUDA, "
                                                     "Llama/Qwen2-style models) | auto (flex where supported; else "
                                                     "pairs off CUDA; else sdpa).")
    precision: Precision = "auto"
    lora: LoraConfig | None = None
    report_to: list[str] = ["tensorboard"]
    max_grad_norm: float = 1.0

    @field_validator("loss_type", "loss_weights", mode="before")
    @classmethod
    def _comma_lists(cls, value, info):
        # The CLI passes `--loss-type sigmoid,bco_pair,sft` and `--loss-weights 0.8,0.2,1` as one string each.
        if isinstance(value, str) and ("," in value or info.field_name == "loss_weights"):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _on_off(cls, value):
        # YAML 1.1 already reads on/off/yes/no as booleans; the CLI passes the word as it was typed.
        if isinstance(value, str):
            word = value.strip().lower()
            if word in ("auto", "on", "off", "true", "false", "yes", "no", "1", "0"):
                return "auto" if word == "auto" else word in ("on", "true", "yes", "1")
            raise ValueError(f"must be auto, on or off (got {value!r})")
        return value

    @property
    def loss_types(self) -> tuple[str, ...]:
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

    @property
    def nll_weight(self) -> float:
        """cpo_alpha as resolved: CPO's NLL term on by default (TRL's CPOConfig: 1.0), SimPO's off (the paper)."""
        return self.cpo_alpha if self.cpo_alpha is not None else (1.0 if self.method == "cpo" else 0.0)

    @model_validator(mode="after")
    def _steps(self) -> "TrainConfig":
        if self.eval_every == "steps" and not self.eval_steps:
            raise ValueError("eval_every=steps needs eval_steps")
        if self.save_every == "steps" and not self.save_steps:
            raise ValueError("save_every=steps needs save_steps")
        self._check_method()
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of steps, or -1 to train for `epochs` (got {self.max_steps})")
        self._check_saves_match_evaluations()
        if self.attention in ("flex", "pairs") and self.layout != "packed":
            raise ValueError(f"attention {self.attention} is the packed layout's: use layout packed, or attention "
                             "auto/sdpa")
        return self

    def _check_method(self) -> None:
        """Combinations that cannot run, refused here (one line each) rather than half-way through training."""
        from dpolab.engine.losses import SMOOTHED

        given = self.model_fields_set
        dpo_only = [name for name in ("loss_weights", "ld_alpha") if getattr(self, name) is not None]
        if self.method != "dpo" and ("loss_type" in given and self.loss_types != ("sigmoid",) or dpo_only):
            raise ValueError(f"loss_type/loss_weights/ld_alpha choose among DPO losses; method={self.method} has its own")
        self._check_reward()
        if self.method in ("simpo", "cpo", "orpo", "reward") and self.ref_model is not None:
            raise ValueError(f"method={self.method} is reference-free: drop ref_model")
        if self.cpo_alpha is not None and self.method not in ("cpo", "simpo"):
            raise ValueError("cpo_alpha applies to method cpo or simpo")
        if self.alphapo_alpha and self.method != "simpo":
            raise ValueError("alphapo_alpha applies to method simpo (AlphaPO = SimPO with its reward shape)")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_types):
            raise ValueError(f"{len(self.loss_weights)} loss_weights for {len(self.loss_types)} loss types "
                             f"({', '.join(self.loss_types)}): give one weight per loss type")
        if len(set(self.loss_types)) != len(self.loss_types):
            raise ValueError(f"loss_type lists a loss twice: {', '.join(self.loss_types)}")
        smoothing_ok = self.method in ("simpo", "cpo") or any(t in SMOOTHED for t in self.loss_types)
        if self.label_smoothing and (self.method not in ("dpo", "simpo", "cpo") or not smoothing_ok):
            raise ValueError(f"label_smoothing applies to loss types {', '.join(SMOOTHED)} and methods simpo, cpo")
        if "exo_pair" in self.loss_types and not self.label_smoothing:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")

    def _check_reward(self) -> None:
        # A reward model has no temperature and no other method's weights: a value for them would be silently unused.
        # Compared with the defaults (not "given"), so that a run's own config.yaml, which lists them all, loads.
        if self.center_rewards_coefficient is not None and self.method != "reward":
            raise ValueError("center_rewards_coefficient applies to method reward")
        if self.method != "reward":
            return
        foreign = [name for name in ("beta", "simpo_gamma", "desirable_weight", "undesirable_weight")
                   if getattr(self, name) != type(self).model_fields[name].default]
        if foreign:
            raise ValueError(f"method reward has a score head and no β: drop {', '.join(foreign)}")
        if self.data.unpaired:
            raise ValueError("method reward trains on pairs (chosen vs rejected): drop data.unpaired")

    def _check_saves_match_evaluations(self) -> None:
        # model/ is the best checkpoint by eval_loss, so a checkpoint must exist at every evaluation.
        if self.eval_every == "no":
            return
        if self.save_every != self.eval_every:
            raise ValueError(f"save_every={self.save_every} with eval_every={self.eval_every}: the best checkpoint by "
                             "eval_loss is kept, so saves must happen at evaluations; set both to the same strategy")
        if self.save_every == "steps" and self.save_steps % self.eval_steps:
            raise ValueError(f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps})")


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
