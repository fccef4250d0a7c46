"""Terminal summary of an evaluation."""

from __future__ import annotations

from rich.table import Table

from dpolab.evaluate.report import fmt, held_out, metric_rows


def eval_table(result) -> Table:
    m = result["metrics"]["policy"]
    table = Table(title=f"evaluation of a {result.get('method', 'dpo')} run ({held_out(m)})", show_header=False,
                  title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, label in metric_rows(m)[:5]:
        table.add_row(label, fmt(m[key]))
    lengths = result["lengths"]
    table.add_row("mean length base / tuned", f"{lengths['base']['mean']:.1f} / {lengths['tuned']['mean']:.1f}")
    if "judge" in result:
        j = result["judge"]
        table.add_row("judge win rate (95% CI)", f"{j['win_rate']:.3f} ({j['ci_low']:.3f}–{j['ci_high']:.3f})")
    table.add_row("time", f"{result['seconds']} s")
    return table
