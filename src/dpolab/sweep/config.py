"""The sweep's typed config: a base training config, a search space over any training option, sampler, objective."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dpolab.config import TrainConfig
from dpolab.errors import ConfigError
from dpolab.folders.sweep import SweepFolder


class Param(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _range(self) -> "Param":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty 'choices' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"empty range: low ({self.low}) must be < high ({self.high})")
        elif self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self

    def grid(self) -> list[Any]:
        if self.type == "categorical":
            return list(self.choices)
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError("a float range has no grid: give 'choices' (categorical) for the grid sampler")


JUDGE_OBJECTIVES = ("judge_win_rate", "judge_lc_win_rate")


class JudgeObjective(BaseModel):
    """The judge a `judge_win_rate` / `judge_lc_win_rate` objective asks, after each trial's training, through
    `dpolab eval` itself (held-out prompts of the shared data, plus eval's two fixed prompts)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str  # a reward run folder, a sequence-classification model folder or Hub id (as `eval --judge`)
    prompts: int = Field(16, gt=0)
    max_new_tokens: int = Field(64, gt=0)


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sweep_dir: Path = Path("runs/sweep")
    base: TrainConfig = TrainConfig()
    search_space: dict[str, Param]
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    n_trials: int = Field(8, gt=0)
    # eval_loss (the default) and eval accuracy come from training's per-epoch evaluation, so the pruner can stop a
    # trial early on them; a judge's win rate exists only once a trial has trained, so those trials run to the end.
    objective: Literal["eval_loss", "eval_rewards/accuracies", "judge_win_rate", "judge_lc_win_rate"] = "eval_loss"
    judge: JudgeObjective | None = None
    pruner: Literal["median", "none"] = "median"
    seed: int = 0
    # Workers on an RDB storage (--storage postgresql://…) beat a heartbeat every `heartbeat_interval` seconds while
    # they run a trial; a trial silent for `grace_period` seconds, and still silent a grace period later (a database
    # outage silences live workers too), is failed and retried once. A worker that loses the database waits up to
    # `reconnect_timeout` seconds for it. The journal file ignores all three.
    heartbeat_interval: int = Field(30, gt=0)
    grace_period: int = Field(120, gt=0)
    reconnect_timeout: int = Field(600, gt=0)

    @model_validator(mode="after")
    def _space(self) -> "SweepConfig":
        if not self.search_space:
            raise ValueError("search_space is empty")
        base = self.base.model_dump()
        for name in self.search_space:
            if name.startswith("data."):
                raise ValueError(f"search_space: {name!r} shapes the data every trial shares; prepare one data set "
                                 "per value and run a sweep on each instead")
            node = base
            for part in name.split("."):
                if not isinstance(node, dict) or part not in node:
                    raise ValueError(f"search_space: unknown training option {name!r}")
                node = node[part]
        if self.base.eval_every == "no":
            raise ValueError("a sweep selects by eval metrics: base.eval_every must not be 'no'")
        if self.sampler == "grid":
            size = 1
            for name, param in self.search_space.items():
                try:
                    size *= len(param.grid())
                except ValueError as exc:
                    raise ValueError(f"search_space.{name}: {exc}") from None
            if size > self.n_trials:
                raise ValueError(f"grid of {size} points is too large for n_trials={self.n_trials}: raise n_trials "
                                 f"to {size} or shrink the space")
        return self

    @model_validator(mode="after")
    def _judge(self) -> "SweepConfig":
        if self.objective in JUDGE_OBJECTIVES and self.judge is None:
            raise ValueError(f"objective {self.objective} needs a judge: add judge: {{model: REWARD_RUN_OR_MODEL}}")
        if self.judge is not None and self.objective not in JUDGE_OBJECTIVES:
            raise ValueError(f"judge is only used by the objectives {' or '.join(JUDGE_OBJECTIVES)}, not "
                             f"{self.objective}: set objective or remove judge")
        return self

    @model_validator(mode="after")
    def _heartbeat(self) -> "SweepConfig":
        if self.grace_period < 2 * self.heartbeat_interval:
            # One late beat (a busy host, a slow database) must not make a live worker's trial stale.
            raise ValueError(f"grace_period ({self.grace_period}) must be at least twice heartbeat_interval "
                             f"({self.heartbeat_interval})")
        return self

    @property
    def direction(self) -> str:
        return "minimize" if self.objective == "eval_loss" else "maximize"


def trial_config(sweep: SweepConfig, params: dict[str, Any], number: int, data_dir: Path) -> TrainConfig:
    """The base training config with the trial's parameters, its own folder and the sweep's shared data."""
    # Only what the sweep's YAML set: defaults stay defaults, so the shared prepared data's settings apply.
    tree = sweep.base.model_dump(mode="json", exclude_unset=True)
    for name, value in params.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    tree["output_dir"] = str(SweepFolder(sweep.sweep_dir).trial(number).path)
    tree.setdefault("data", {})["dataset"] = str(data_dir)
    try:
        return TrainConfig.model_validate(tree)
    except Exception as exc:  # a sampled combination the config refuses
        raise ConfigError(f"trial {number}: parameters {params} give an invalid config: {exc}") from None
