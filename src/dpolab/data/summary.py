"""Readable summary of a data report (rich table)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def report_table(report: dict[str, Any], title: str = "prepared data") -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", f"{report['source']} ({report['shape']})")
    table.add_row("rows in / kept / dropped", f"{report['rows_in']} / {report['rows_kept']} / {report['rows_dropped']}")
    for reason, count in report["dropped"].items():
        table.add_row(f"  dropped: {reason}", str(count))
    truncated = report.get("truncated") or {}
    table.add_row("truncated pairs", f"{truncated.get('pairs', 0)} (prompt {truncated.get('prompt', 0)}, "
                  f"chosen {truncated.get('chosen', 0)}, rejected {truncated.get('rejected', 0)})")
    table.add_row("train / test", f"{report['train']} / {report['test']} (seed {report['seed']})")
    table.add_row("template / tokenizer", f"{report['template']} / {report['tokenizer']}")
    table.add_row("max_length / prompt cap", f"{report['max_length']} / {report['max_prompt_length']}")
    for key, stats in report["tokens"].items():
        if stats:
            table.add_row(f"{key} tokens", f"mean {stats['mean']}  p50 {stats['p50']:.0f}  p90 {stats['p90']:.0f}  "
                          f"p99 {stats['p99']:.0f}  max {stats['max']}")
    table.add_row("time", f"{report['seconds']} s")
    return table
