"""`dpolab app`: the studio in the browser (data, train, runs, sweep, chat, publish)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpolab import EMBEDDED_MODEL
from dpolab.serving import DEFAULT_MAX_BATCH


def app_command(
    model: Optional[str] = typer.Argument(
        None, metavar="MODEL", show_default=False,
        help=f"A run folder (runs/NAME), a sweep folder (its best/ is used), an exported model folder, the embedded "
             f"'{EMBEDDED_MODEL}', or a Hub id (needs network). Without it the page offers the runs under --runs-dir "
             f"and the embedded model in its sidebar."),
    compare: Optional[str] = typer.Option(
        None, "--compare", metavar="BASE", show_default=False,
        help="Also answer every prompt with this model (any name MODEL accepts), side by side, same seed and "
             "settings. Without it, ticking 'Compare' in the sidebar uses the run's base model."),
    port: int = typer.Option(8501, "--port", "-p", help="Port to serve on."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on; 0.0.0.0 serves other machines too (no authentication!)."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir",
                                  help="The runs root: where the studio lists runs and sweeps and starts new jobs (it never "
                                       "deletes anything outside it)."),
    max_batch: int = typer.Option(
        DEFAULT_MAX_BATCH, "--max-batch", min=1,
        help="Answers one model generates at once (batched decoding steps); further users wait in line and see "
             "their place. 1 serves one answer at a time."),
) -> None:
    """dpolab studio in the browser: prepare data, train (watch, stop, resume), compare runs, sweep, chat, publish.

    Pages: Data (preview a source with its template, drop reasons, token lengths; prepare), Train (a form with the CLI's
    options and the equivalent command; runs start as background processes that outlive the browser tab, with live
    progress, curves, Stop = a clean checkpoint, Resume), Runs (every run and sweep under --runs-dir, overlaid curves,
    eval reports, start an eval), Sweep (search space, live trials, the best trial), Chat, Publish (export with the
    model card, push with a dry-run preview first). With MODEL the studio opens on the Chat page.

    Chat: answers stream token by token, optionally beside the base model's or any other run's.

    Prompts are formatted with the template the model was trained with (read from its run folder). The sidebar sets
    the generation settings (max new tokens, temperature, top-p, top-k, repetition penalty, seed, greedy) and shows
    what the run recorded (base model, dataset, beta, eval metrics). Models are loaded once per server and shared by
    every browser tab; people asking at the same time share one batched generation per model (up to --max-batch answers
    stream at once, the rest wait in line and see their place), and each answer is what its seed gives alone.

    Examples:

      dpolab app runs/demo                      # the demo run (`make demo` trains it)

      dpolab app runs/demo --compare smollm2-135m-instruct

      dpolab app --port 8600 --host 0.0.0.0     # pick a run in the sidebar; reachable from other machines
    """
    from dpolab.app.launch import run_app

    for name in (model, compare):
        if name is not None:
            check_loadable(name)
    raise typer.Exit(run_app(model, compare, port=port, host=host, runs_dir=runs_dir, max_batch=max_batch))


def check_loadable(name: str) -> None:
    """Fail before starting a server for a model the page could not load (a Hub id is left to the page)."""
    from dpolab.errors import UsageError
    from dpolab.folders.info import load_run_info
    from dpolab.models import check_model_folder

    info = load_run_info(name)
    if info.method == "reward":
        raise UsageError(f"{name} is a reward model (method reward): it scores answers and cannot generate any; chat "
                         "with a policy run")
    check_model_folder(info.model)
