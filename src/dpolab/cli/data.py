"""`dpolab data prepare` and `dpolab data inspect`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpolab import EMBEDDED_MODEL
from dpolab.cli._base import ConfigOpt, DatasetOpt, Typer, stdout

data_app = Typer(help="Prepare and inspect preference data.", no_args_is_help=True)


@data_app.command("prepare")
def data_prepare(
    dataset: Optional[str] = DatasetOpt,
    out: Path = typer.Option(Path("runs/data"), "--out", "-o", help="Prepared-data folder to write."),
    config: Optional[Path] = ConfigOpt,
    split: Optional[str] = typer.Option(None, help="Split of a Hub dataset (default: train)."),
    shape: Optional[str] = typer.Option(None, help="auto | explicit | hh | conversational | unpaired (default: auto)."),
    template: Optional[str] = typer.Option(None, help="qa ('Q: … A: …') | raw | chat (tokenizer's template) (default: qa)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Model whose tokenizer is used (default: {EMBEDDED_MODEL})."),
    max_length: Optional[int] = typer.Option(None, help="Max tokens of prompt+response (default: 512)."),
    max_prompt_length: Optional[int] = typer.Option(None, help="Prompt cap for over-long pairs (default: max_length/2)."),
    test_size: Optional[float] = typer.Option(None, help="Fraction held out for test (default: 0.1)."),
    seed: Optional[int] = typer.Option(None, help="Split seed (default: 42)."),
    prompt_column: Optional[str] = typer.Option(None, help="Column holding the prompt (default: prompt)."),
    chosen_column: Optional[str] = typer.Option(None, help="Column holding the chosen response (default: chosen)."),
    rejected_column: Optional[str] = typer.Option(None, help="Column holding the rejected response (default: rejected)."),
    completion_column: Optional[str] = typer.Option(None, help="Unpaired (KTO) rows: the completion column (default: completion)."),
    label_column: Optional[str] = typer.Option(None, help="Unpaired (KTO) rows: the boolean label column (default: label)."),
    unpaired: bool = typer.Option(False, "--unpaired", help="Turn each pair into two unpaired (KTO) rows: (prompt, chosen, "
                                  "true) and (prompt, rejected, false)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows."),
    strict: bool = typer.Option(False, "--strict", help="Fail on the first bad row (names file:line and reason)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Clean, format, tokenize and split preference pairs or unpaired (KTO) rows into a prepared folder
    (+ data_report.json, dropped.jsonl)."""
    from dpolab.config import DataConfig, load_config
    from dpolab.data.prepare import prepare_data
    from dpolab.data.summary import report_table

    cfg = load_config(DataConfig, config, dict(
        dataset=dataset, split=split, shape=shape, template=template, tokenizer=model, max_length=max_length,
        max_prompt_length=max_prompt_length, test_size=test_size, seed=seed, prompt_column=prompt_column,
        chosen_column=chosen_column, rejected_column=rejected_column, completion_column=completion_column,
        label_column=label_column, unpaired=unpaired or None, limit=limit, strict=strict or None))
    report = prepare_data(cfg, out, overwrite=overwrite)
    stdout.print(report_table(report, f"prepared data -> {out}"))


@data_app.command("inspect")
def data_inspect(
    source: str = typer.Argument(..., help="A prepared folder, or a raw source (as --dataset of `data prepare`)."),
    template: Optional[str] = typer.Option(None, help="Template for a raw source (default: qa)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Tokenizer for a raw source."),
    max_length: Optional[int] = typer.Option(None, help="Max length for a raw source (default: 512)."),
    limit: Optional[int] = typer.Option(None, help="Read at most this many rows."),
    unpaired: bool = typer.Option(False, "--unpaired", help="For a raw source of pairs: report them as unpaired (KTO) rows."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Print the statistics of a prepared folder or a raw source, writing nothing."""
    from dpolab.config import DataConfig, load_config
    from dpolab.data.prepare import build, is_prepared, load_prepared
    from dpolab.data.summary import report_table

    if is_prepared(source):
        report = load_prepared(source).report
    else:
        cfg = load_config(DataConfig, None, dict(dataset=source, template=template, tokenizer=model,
                                                 max_length=max_length, limit=limit, unpaired=unpaired or None))
        report = build(cfg)[2]
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        stdout.print(report_table(report, f"data: {source}"))
