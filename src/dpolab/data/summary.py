"""Readable summary of a data report (rich table)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def report_table(report: dict[str, Any], title: str = "prepared data") -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    kind = report.get("kind", "paired")  # reports from before unpaired data are paired
    table.add_row("source", f"{report['source']} ({report['shape']}, {kind})")
    table.add_row("rows in / kept / dropped", f"{report['rows_in']} / {report['rows_kept']} / {report['rows_dropped']}")
    for reason, count in report["dropped"].items():
        table.add_row(f"  dropped: {reason}", str(count))
    _truncation_row(table, report.get("truncated") or {}, kind)
    table.add_row("train / test", f"{report['train']} / {report['test']} (seed {report['seed']})")
    if "paired_to_unpaired" in report:
        converted = report["paired_to_unpaired"]
        table.add_row("paired -> unpaired", f"{converted['pairs']} pairs -> {converted['rows']} rows")
    for split, counts in (report.get("labels") or {}).items():
        table.add_row(f"{split} labels", f"{counts['desirable']} desirable / {counts['undesirable']} undesirable")
    table.add_row("template / tokenizer", f"{report['template']} / {report['tokenizer']}")
    table.add_row("max_length / prompt cap", f"{report['max_length']} / {report['max_prompt_length']}")
    names = {"chosen": "completion", "rejected": "KL completion"} if kind == "unpaired" else {}
    for key, stats in report["tokens"].items():
        if stats:
            table.add_row(f"{names.get(key, key)} tokens", f"mean {stats['mean']}  p50 {stats['p50']:.0f}  "
                          f"p90 {stats['p90']:.0f}  p99 {stats['p99']:.0f}  max {stats['max']}")
    table.add_row("time", f"{report['seconds']} s")
    return table


def _truncation_row(table: Table, truncated: dict[str, int], kind: str) -> None:
    # Unpaired records reuse the pair columns: chosen is the completion, rejected the KL completion.
    if kind == "unpaired":
        table.add_row("truncated rows", f"{truncated.get('pairs', 0)} (prompt {truncated.get('prompt', 0)}, completion "
                      f"{truncated.get('chosen', 0)}); KL completions cut {truncated.get('rejected', 0)}")
    else:
        table.add_row("truncated pairs", f"{truncated.get('pairs', 0)} (prompt {truncated.get('prompt', 0)}, "
                      f"chosen {truncated.get('chosen', 0)}, rejected {truncated.get('rejected', 0)})")
