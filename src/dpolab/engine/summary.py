"""Final summary table of a training run."""

from __future__ import annotations

from rich.table import Table


def run_table(result) -> Table:
    m = result.metrics
    table = Table(title=f"run -> {result.run_dir}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    best = m.get("best") or {}
    if best:
        table.add_row("best epoch", f"{m['best_epoch']:.2f}")
        table.add_row("eval loss (best)", f"{best['loss']:.4f}")
        # A reward model logs TRL RewardTrainer's names (accuracy, margin); the policy methods TRL's DPO ones.
        table.add_row("reward accuracy", f"{best.get('rewards/accuracies', best.get('accuracy', float('nan'))):.3f}")
        table.add_row("reward margin", f"{best.get('rewards/margins', best.get('margin', float('nan'))):.4f}")
        table.add_row("rewards chosen / rejected", f"{best.get('rewards/chosen', 0):.4f} / {best.get('rewards/rejected', 0):.4f}")
    table.add_row("train loss", f"{m['train_loss']:.4f}")
    table.add_row("steps", str(m["global_step"]))
    table.add_row("time", f"{m['total_time_s']:.1f} s (training {m['train_runtime_s']:.1f} s)")
    table.add_row("pairs/s", f"{m['pairs_per_second']:.2f}")
    table.add_row("reference pairs computed", f"{m['reference_pairs_computed']} (others from the cache)")
    table.add_row("model", str(result.run_dir / "model"))
    return table
