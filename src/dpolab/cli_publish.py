"""`dpolab export` and `dpolab push` (registered on the app in cli.py): parse options, call dpolab.publish."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

# Own console and _fail (same style as cli.py) instead of importing cli: cli imports this module at its end.
console = Console(stderr=True)


def _fail(exc: BaseException) -> None:
    from rich.markup import escape

    # soft_wrap: the message stays one line however narrow the terminal; escape: paths may hold "[...]".
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def export(
    source: str = typer.Argument(..., metavar="RUN_OR_SWEEP", help="A run folder, a sweep folder (its best/ trial is "
                                 "exported), or a model folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write (written whole or not at all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    max_shard_size: str = typer.Option("2GB", help="Split model.safetensors into shards of at most this size."),
) -> None:
    """Export a trained model as a self-contained Hugging Face folder with a model card (README.md).

    Files: config.json, generation_config.json, tokenizer files, model.safetensors (sharded above --max-shard-size), training_args.bin/.json, dpolab.json, README.md.

    The card holds Hub metadata and metrics, the DPO hyperparameters, the exact prompt format, a usage snippet and the limitations. The folder loads with plain transformers, without dpolab.
    """
    from dpolab.publish import PublishError, export_model

    try:
        path = export_model(source, out, overwrite=overwrite, max_shard_size=max_shard_size)
    except PublishError as exc:
        _fail(exc)
    files = sorted(p for p in path.iterdir() if p.is_file())
    Console().print(f"exported {source} -> {path} ({len(files)} files, "
                    f"{_size(sum(p.stat().st_size for p in files))})", highlight=False, soft_wrap=True)


def push(
    source: str = typer.Argument(..., metavar="RUN_OR_DIR", help="An exported folder, or a run/sweep folder (exported "
                                 "to a temporary folder first)."),
    repo: str = typer.Option(..., "--repo", "-r", metavar="OWNER/NAME", help="Hub model repo; created if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (no effect on an existing repo)."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (default: main)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files and the model card; send nothing."),
) -> None:
    """Upload a model to the Hugging Face Hub: create the repo if needed, then commit every file.

    The token comes from HF_TOKEN or `hf auth login` (write access needed); it is never printed or written.

    HF_ENDPOINT selects another Hub endpoint (a mirror or a private Hub).
    """
    from dpolab.publish import PublishError, push_model

    try:
        result = push_model(source, repo, private=private, revision=revision, dry_run=dry_run)
    except PublishError as exc:
        _fail(exc)
    if dry_run:
        typer.echo(f"dry run: would upload to {repo} with the commit message {result['commit_message']!r}:")
        for name, size in result["files"]:
            typer.echo(f"  {name:<40} {_size(size):>10}")
        typer.echo("\n" + result["card"])
        return
    Console().print(f"pushed {len(result['files'])} files to {repo}: {result['url']}", highlight=False, soft_wrap=True)
