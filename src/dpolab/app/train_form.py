"""The Train page's logic, without Streamlit: which fields the form has, their defaults and help texts, how its values
become the `dpolab train` argv, the YAML config and a validated `TrainConfig`; and the curves drawn from a run's
progress.

Design: the `dpolab train` command is the one source. Every field is one of its options (`cli.train.OVERRIDES` names
the config key each sets); the help text is the option's own, the default the config field's, the choices the config's
`Literal` types. A value equal to its default is left out of the argv and the YAML, so the preview shows what the user
changed and the command the job runs is the preview, option for option. Validation is `TrainConfig`'s (pydantic), each
problem reported on one line naming the form field and the CLI option.
"""

from __future__ import annotations

import inspect
import shlex
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dpolab.cli.train import OVERRIDES, config_overrides, eval_schedule, train
from dpolab.errors import ConfigError
from dpolab.config import DataConfig, LoraConfig, TrainConfig

POLICY = ("dpo", "simpo", "cpo", "orpo", "kto")  # the methods with a β
ALL_METHODS = (*POLICY, "reward")


@dataclass(frozen=True)
class Field:
    """One form field = one `dpolab train` option."""

    option: str  # the CLI parameter name (a key of OVERRIDES, or eval_every)
    label: str
    widget: str  # select | multiselect | text | int | float | optional_float | onoff
    advanced: bool = False
    methods: tuple[str, ...] = ALL_METHODS  # shown (and passed) only for these methods

    @property
    def key(self) -> str:
        """The config key it sets (dotted for nested ones; --eval-every sets the save schedule too)."""
        return OVERRIDES.get(self.option, self.option)

    @property
    def flag(self) -> str:
        """The CLI flag: the option's first long name (e.g. --learning-rate)."""
        decls = [d for d in _cli_option(self.option).param_decls if d.startswith("--")]
        return decls[0] if decls else "--" + self.option.replace("_", "-")

    @property
    def help(self) -> str:
        return _cli_option(self.option).help or ""

    @property
    def default(self) -> Any:
        """The value the CLI uses when the option is not given (the config field's default), as the widget holds it."""
        if self.option == "lora_r":
            return 0  # no --lora-r: all weights are trained; 0 stands for that in the form
        if self.option == "loss_type":
            return ["sigmoid"]
        if self.option == "gradient_checkpointing":
            return "auto"
        value = _config_field(self.key).default
        return value

    @property
    def choices(self) -> tuple[str, ...]:
        if self.option == "gradient_checkpointing":
            return ("auto", "on", "off")
        annotation = _config_field(self.key).annotation
        for arg in (annotation, *typing.get_args(annotation)):
            if typing.get_origin(arg) is typing.Literal:
                return typing.get_args(arg)
            inner = typing.get_args(arg)
            if inner and typing.get_origin(inner[0]) is typing.Literal:  # list[Literal[...]]
                return typing.get_args(inner[0])
        return ()


def _cli_option(option: str):
    return inspect.signature(train).parameters[option].default  # typer.OptionInfo: param_decls, help


def _config_field(key: str):
    *parents, leaf = key.split(".")
    cls = {(): TrainConfig, ("data",): DataConfig, ("lora",): LoraConfig}[tuple(parents)]
    return cls.model_fields[leaf]


FIELDS: tuple[Field, ...] = (
    Field("method", "Method", "select"),
    Field("model", "Model", "text"),
    Field("dataset", "Dataset", "text"),
    Field("beta", "β", "float", methods=POLICY),
    Field("learning_rate", "Learning rate", "float"),
    Field("epochs", "Epochs", "float"),
    Field("max_steps", "Max steps", "int"),
    Field("batch_size", "Batch size", "int"),
    Field("grad_accum", "Grad accumulation", "int"),
    Field("loss_type", "Loss type(s)", "multiselect", methods=("dpo",)),
    Field("lora_r", "LoRA rank", "int"),
    Field("precision", "Precision", "select", advanced=True),
    Field("layout", "Layout", "select", advanced=True),
    Field("attention", "Attention", "select", advanced=True),
    Field("gradient_checkpointing", "Gradient checkpointing", "onoff", advanced=True),
    Field("seed", "Seed", "int", advanced=True),
    Field("template", "Template", "select", advanced=True),
    Field("max_length", "Max length (tokens)", "int", advanced=True),
    Field("eval_every", "Evaluate every", "text", advanced=True),
    Field("ref_model", "Reference model", "text", advanced=True, methods=("dpo", "kto")),
    Field("loss_weights", "Loss weights", "text", advanced=True, methods=("dpo",)),
    Field("label_smoothing", "Label smoothing ε", "float", advanced=True, methods=("dpo", "simpo", "cpo")),
    Field("ld_alpha", "LD-DPO α", "optional_float", advanced=True, methods=("dpo",)),
    Field("simpo_gamma", "SimPO γ", "float", advanced=True, methods=("simpo",)),
    Field("alphapo_alpha", "AlphaPO α", "float", advanced=True, methods=("simpo",)),
    Field("cpo_alpha", "Chosen NLL weight", "optional_float", advanced=True, methods=("cpo", "simpo")),
    Field("desirable_weight", "Desirable weight", "float", advanced=True, methods=("kto",)),
    Field("undesirable_weight", "Undesirable weight", "float", advanced=True, methods=("kto",)),
    Field("center_rewards_coefficient", "Center rewards coefficient", "optional_float", advanced=True,
          methods=("reward",)),
)
BY_OPTION = {f.option: f for f in FIELDS}
BY_KEY = {f.key: f for f in FIELDS}


def defaults() -> dict[str, Any]:
    """The form's initial values: what `dpolab train` uses without options."""
    return {f.option: f.default for f in FIELDS}


def applies(field: Field, method: str) -> bool:
    return method in field.methods


def _number(value: Any, option: str) -> float | None:
    if value is None or isinstance(value, (int, float)):
        return value
    text = str(value).strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{BY_OPTION[option].label} ({BY_OPTION[option].flag}): not a number: {text!r}") from None


def changed(values: dict[str, Any]) -> dict[str, Any]:
    """The options whose values differ from the defaults (and apply to the chosen method), in the CLI's order, as
    typed values (a loss-type list, a float, "on"). Raises ValueError (one line) for an unreadable number."""
    method = values.get("method", "dpo")
    out = {}
    for field in FIELDS:
        if field.option not in values or not applies(field, method):
            continue
        value = values[field.option]
        if field.widget == "optional_float":
            value = _number(value, field.option)
        elif field.widget == "text":
            value = (value or "").strip() or None
        if field.option == "loss_type":
            value = list(value or [])
            if not value:
                raise ValueError(f"{field.label} ({field.flag}): choose at least one loss type")
        if field.option == "lora_r" and not value:
            value = 0
        if field.option == "eval_every" and value is not None:
            value = value.lower()
            try:
                eval_schedule(value)
            except ConfigError:
                raise ValueError(f"{field.label} ({field.flag}): epoch, no, or a number of steps (got {value!r})") \
                    from None
        default = field.default
        if value is None or value == default:
            continue
        out[field.option] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, list):
        return ",".join(_fmt(v) for v in value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def build_argv(values: dict[str, Any], output_dir: Path, resume: bool = False, overwrite: bool = False) -> list[str]:
    """`dpolab train` arguments (without the leading `dpolab`): --output-dir, then every changed option."""
    argv = ["train", "--output-dir", str(output_dir)]
    for option, value in changed(values).items():
        argv += [BY_OPTION[option].flag, _fmt(value)]
    if resume:
        argv.append("--resume")
    if overwrite:
        argv.append("--overwrite")
    return argv


def command(argv: list[str]) -> str:
    return shlex.join(["dpolab", *argv])


def config_tree(values: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    """The YAML config equivalent to the argv: only the changed keys (nested as the config nests them)."""
    tree: dict[str, Any] = {"output_dir": str(output_dir)}
    for option, value in changed(values).items():
        if option == "gradient_checkpointing":  # typed as YAML has them; the CLI's strings validate the same
            value = value == "on"
        elif option == "loss_type" and len(value) == 1:
            value = value[0]
        elif option == "loss_weights":
            value = [float(v) for v in str(value).split(",") if v.strip()] if _all_numbers(value) else value
        for key, item in config_overrides({option: value}).items():  # the CLI's own mapping
            *parents, leaf = key.split(".")
            node = tree
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = item
    return tree


def _all_numbers(text: str) -> bool:
    try:
        [float(v) for v in str(text).split(",") if v.strip()]
        return True
    except ValueError:
        return False


def to_yaml(values: dict[str, Any], output_dir: Path) -> str:
    import yaml

    return yaml.safe_dump(config_tree(values, output_dir), sort_keys=False, allow_unicode=True)


def _where(loc: tuple) -> str:
    dotted = ".".join(str(part) for part in loc if not isinstance(part, int))
    for length in range(len(dotted.split(".")), 0, -1):  # loss_type.0 -> loss_type, lora.r -> lora_r's field
        field = BY_KEY.get(".".join(dotted.split(".")[:length]))
        if field is not None:
            return f"{field.label} ({field.flag})"
    return dotted or "config"


def validate(values: dict[str, Any], output_dir: Path) -> tuple[TrainConfig | None, list[str]]:
    """The `TrainConfig` the command would run, or one line per problem, each naming the field and its option."""
    try:
        tree = config_tree(values, output_dir)
    except ValueError as exc:
        return None, [str(exc)]
    try:
        return TrainConfig.model_validate(tree), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{_where(error['loc'])}: {message}")
        return None, problems


def resume_argv(argv: list[str]) -> list[str]:
    """A job's argv to continue it from its last checkpoint: --resume added; --overwrite dropped (it would delete the
    checkpoints being resumed)."""
    return [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]


# chart key -> title, [(logged key, series name)]. A reward model logs TRL RewardTrainer's names (accuracy, margin).
CURVES = {
    "loss": ("Loss", [("loss", "train"), ("eval_loss", "eval")]),
    "accuracy": ("Reward accuracy", [("rewards/accuracies", "train"), ("eval_rewards/accuracies", "eval"),
                                     ("accuracy", "train"), ("eval_accuracy", "eval")]),
    "margins": ("Reward margin", [("rewards/margins", "train"), ("eval_rewards/margins", "eval"),
                                  ("margin", "train"), ("eval_margin", "eval")]),
    "logps": ("Log-probs", [("logps/chosen", "chosen"), ("logps/rejected", "rejected"),
                            ("eval_logps/chosen", "eval chosen"), ("eval_logps/rejected", "eval rejected")]),
}


def curves(history: list[dict]) -> dict[str, list[dict]]:
    """Chart key -> points {step, series, value, eval} from the progress history (charts without data left out)."""
    out = {}
    for chart, (_, series) in CURVES.items():
        points = [{"step": entry["step"], "series": label, "value": float(entry[key]), "eval": key.startswith("eval_")}
                  for entry in history for key, label in series
                  if isinstance(entry.get(key), (int, float)) and "step" in entry]
        if points:
            out[chart] = points
    return out


def thin(points: list[dict], most: int = 1500) -> list[dict]:
    """At most about `most` train points per chart (every k-th; evaluations all kept): a long run's curves stay
    cheap to redraw every second."""
    train = [p for p in points if not p["eval"]]
    if len(train) <= most:
        return points
    every = -(-len(train) // most)
    kept = {id(p) for p in train[::every]} | {id(train[-1])}
    return [p for p in points if p["eval"] or id(p) in kept]
