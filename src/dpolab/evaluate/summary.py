"""Terminal summary of an evaluation."""

from __future__ import annotations

from rich.table import Table

from dpolab.evaluate.report import held_out, judge_rows, metric_rows, metric_text


def eval_table(result) -> Table:
    m = result["metrics"]["policy"]
    table = Table(title=f"evaluation of a {result.get('method', 'dpo')} run ({held_out(m)})", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, label in metric_rows(m)[:5]:
        table.add_row(label, metric_text(m, key))
    lengths = result["lengths"]
    table.add_row("mean length base / tuned", f"{lengths['base']['mean']:.1f} / {lengths['tuned']['mean']:.1f}")
    if "judge" in result:
        for label, text in judge_rows(result["judge"]):
            table.add_row(label, text)
    table.add_row("time", f"{result['seconds']} s")
    return table
