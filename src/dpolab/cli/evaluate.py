"""`dpolab eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpolab.cli._base import stdout


def evaluate(
    target: str = typer.Argument(..., help="Run folder, sweep folder (its best/), model folder or Hub id."),
    reference: Optional[str] = typer.Option(None, help="Reference model (default: the run's starting model)."),
    data: Optional[str] = typer.Option(None, help="Prepared folder or raw source (default: the run's test split)."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts to generate for: .txt (one per line) or .jsonl ({'prompt': …})."),
    n_prompts: int = typer.Option(4, help="Test-split prompts sampled for generations (plus the study's two)."),
    max_new_tokens: int = typer.Option(64, help="Tokens generated per answer."),
    seed: int = typer.Option(0, help="Seed for the prompt sample and every generation."),
    judge: Optional[str] = typer.Option(
        None, help="Reward model scoring tuned vs base answers: a reward run folder (dpolab train --method reward), a "
                   "sequence-classification model folder or Hub id (one output). Reports the raw and the "
                   "length-controlled win rate with 95% intervals, the mean length change and the score spread."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: RUN/eval)."),
    beta: Optional[float] = typer.Option(None, help="Beta for implicit rewards (default: the run's)."),
) -> None:
    """Evaluate a tuned model against its reference: preference accuracy, margins, generations, report.html. A reward
    run (--method reward) is scored on the held-out pairs instead: pairwise accuracy, margins.

    Every accuracy and win rate is shown with its 95% interval (Wilson; ties count half) and its n."""
    from dpolab.evaluate.run import EvalOptions, run_eval

    result = run_eval(EvalOptions(target=target, reference=reference, data=data, prompts=prompts, n_prompts=n_prompts,
                                  max_new_tokens=max_new_tokens, seed=seed, judge=judge, out=out, beta=beta))
    from dpolab.evaluate.reward import reward_table
    from dpolab.evaluate.summary import eval_table

    stdout.print(reward_table(result) if result["method"] == "reward" else eval_table(result))
