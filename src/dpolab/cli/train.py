"""`dpolab train`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from dpolab import EMBEDDED_MODEL
from dpolab.cli._base import ConfigOpt, console, stdout


def train(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Policy model (default: {EMBEDDED_MODEL})."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Prepared folder, or a raw source (prepared on the fly)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default: runs/dpo)."),
    ref_model: Optional[str] = typer.Option(None, help="Separate reference model (default: frozen copy of --model)."),
    method: Optional[str] = typer.Option(None, help="dpo | simpo | cpo | orpo (reference-free) | kto (unpaired data) | "
                                         "reward (a Bradley–Terry reward model) (default: dpo)."),
    loss_type: Optional[str] = typer.Option(None, help="dpo: sigmoid | hinge | ipo | exo_pair | nca_pair | robust | bco_pair | "
                                            "sppo_hard | aot | aot_unpaired | apo_zero | apo_down | discopop | sft | "
                                            "sigmoid_norm, or several comma-separated (default: sigmoid)."),
    loss_weights: Optional[str] = typer.Option(None, help="dpo: comma-separated weights, one per loss type (MPO: 0.8,0.2,1)."),
    beta: Optional[float] = typer.Option(None, help="β (ORPO: λ) (default: 0.1)."),
    label_smoothing: Optional[float] = typer.Option(None, help="ε, label noise: robust, exo_pair, aot*, simpo, cpo (default: 0)."),
    ld_alpha: Optional[float] = typer.Option(None, help="dpo: LD-DPO weight of response tokens past the shared length."),
    simpo_gamma: Optional[float] = typer.Option(None, help="simpo: target reward margin γ (default: 0.5)."),
    alphapo_alpha: Optional[float] = typer.Option(None, help="simpo: AlphaPO's reward shape α (default 0: SimPO)."),
    cpo_alpha: Optional[float] = typer.Option(None, help="cpo/simpo: weight of the chosen NLL (default: cpo 1, simpo 0)."),
    desirable_weight: Optional[float] = typer.Option(None, help="kto: weight of desirable examples (default: 1)."),
    undesirable_weight: Optional[float] = typer.Option(None, help="kto: weight of undesirable examples (default: 1)."),
    center_rewards_coefficient: Optional[float] = typer.Option(
        None, help="reward: c of c·(r_chosen + r_rejected)², pulling rewards to mean zero (TRL suggests 0.01; default off)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="AdamW learning rate (default: 1e-3)."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per device per step (default: 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps (default: 1)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default: 5)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides epochs)."),
    layout: Optional[str] = typer.Option(None, help="packed (prefix-shared, padding-free) | padded (default: packed)."),
    attention: Optional[str] = typer.Option(None, help="Packed layout: auto (flex on CUDA, else pairs) | pairs | sdpa | flex."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (default: auto = bf16 autocast if native)."),
    gradient_checkpointing: Optional[str] = typer.Option(None, help="auto | on | off (default: auto = on if memory is short)."),
    template: Optional[str] = typer.Option(None, help="Template when preparing a raw source (default: qa)."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens of prompt+response when preparing (default: 512)."),
    seed: Optional[int] = typer.Option(None, help="Training seed (default: 42)."),
    lora_r: Optional[int] = typer.Option(None, help="Train a LoRA adapter of this rank instead of all weights."),
    eval_every: Optional[str] = typer.Option(None, help="epoch | no | N: evaluate on the held-out pairs (and save a "
                                             "checkpoint, keeping the best by eval loss) every epoch, never, or every "
                                             "N steps (default: epoch)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in the output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved config and plan; load no weights."),
    num_processes: int = typer.Option(1, "--num-processes", help="Launch this many processes with torchrun (DDP; gloo on CPU)."),
) -> None:
    """Train a policy with DPO (or SimPO, CPO, ORPO, KTO: --method), or a reward model (--method reward); writes a run
    folder with model/ in Hugging Face format.

    Runs unchanged under `accelerate launch` or `torchrun`; --num-processes N launches torchrun for you."""
    if num_processes > 1 and "LOCAL_RANK" not in os.environ and not dry_run:
        raise typer.Exit(_relaunch_with_torchrun(num_processes))
    from dpolab.config import TrainConfig, load_config
    from dpolab.engine.train import dry_run as plan_run, run_training

    cfg = load_config(TrainConfig, config, config_overrides(locals()))
    if dry_run:
        import yaml

        stdout.print(yaml.safe_dump(plan_run(cfg), sort_keys=False))
        return
    _report(run_training(cfg, resume=resume, overwrite=overwrite))


def _report(result) -> None:
    if result.extra.get("stopped"):
        console.print(f"stopped at step {result.metrics['stopped_at_step']} of {result.metrics['max_steps']} (a stop "
                      f"was asked for); a complete checkpoint is in {result.run_dir}; continue with --resume",
                      highlight=False)
        return
    from dpolab.engine.summary import run_table

    stdout.print(run_table(result))


# CLI option -> config key (dotted for nested ones).
OVERRIDES = {name: name for name in (
    "model", "output_dir", "ref_model", "method", "loss_type", "loss_weights", "beta", "label_smoothing", "ld_alpha",
    "simpo_gamma", "alphapo_alpha", "cpo_alpha", "desirable_weight", "undesirable_weight", "center_rewards_coefficient",
    "learning_rate", "batch_size", "grad_accum", "epochs", "max_steps", "layout", "attention", "precision",
    "seed", "gradient_checkpointing")} | {"dataset": "data.dataset", "template": "data.template",
                                                             "max_length": "data.max_length", "lora_r": "lora.r"}


def eval_schedule(value: str | None) -> dict[str, Any]:
    """--eval-every as config keys. Saves follow the evaluations: model/ is the best checkpoint by eval loss, so a
    checkpoint must exist at every evaluation (TrainConfig refuses other schedules)."""
    if value is None:
        return {}
    word = str(value).strip().lower()
    if word == "no":
        return {"eval_every": "no"}
    if word == "epoch":
        return {"eval_every": "epoch", "save_every": "epoch"}
    if word.isdigit() and int(word) > 0:
        return {"eval_every": "steps", "eval_steps": int(word), "save_every": "steps", "save_steps": int(word)}
    from dpolab.errors import ConfigError

    raise ConfigError(f"--eval-every must be epoch, no, or a number of steps (got {value!r})")


def config_overrides(options: dict[str, Any]) -> dict[str, Any]:
    """`dpolab train`'s options (by parameter name; None = not given) as dotted config overrides. The studio's Train
    page builds its config through this too, so the form and the command cannot disagree."""
    overrides = {OVERRIDES[k]: str(v) if isinstance(v, Path) else v for k, v in options.items() if k in OVERRIDES}
    return {**overrides, **eval_schedule(options.get("eval_every"))}


def _relaunch_with_torchrun(num_processes: int) -> int:
    """Re-run this very command under torchrun with N processes (the flag itself removed)."""
    import subprocess

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--num-processes":
            skip = True
        elif not arg.startswith("--num-processes="):
            argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
               "-m", "dpolab", *argv]
    console.print(f"launching: {' '.join(command)}", highlight=False)
    return subprocess.run(command).returncode
