"""`dpolab export` and `dpolab push`: parse options, call dpolab.publish."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dpolab.cli._base import stdout


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def export(
    source: str = typer.Argument(..., metavar="RUN_OR_SWEEP", help="A run folder, a sweep folder (its best/ trial is "
                                 "exported), or a model folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write (written whole or not at all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    max_shard_size: str = typer.Option("2GB", help="Split model.safetensors into shards of at most this size."),
    fmt: str = typer.Option("hf", "--format", help="hf: a transformers folder. gguf: the same folder plus "
                            "MODEL-QUANT.gguf (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile."),
    quant: Optional[list[str]] = typer.Option(None, "--quant", help="GGUF weights: f32, f16 (default), bf16 or q8_0; "
                                              "repeat for several files."),
    adapter: bool = typer.Option(False, "--adapter", help="LoRA runs: export the PEFT adapter folder "
                                 "(adapter_config.json + adapter_model.safetensors) instead of the merged model."),
) -> None:
    """Export a trained model as a self-contained Hugging Face folder with a model card (README.md).

    Files: config.json, generation_config.json, tokenizer files, model.safetensors (sharded above --max-shard-size), training_args.bin/.json, dpolab.json, README.md; with --format gguf also MODEL-QUANT.gguf and Modelfile.

    The card holds Hub metadata and metrics, the DPO hyperparameters, the exact prompt format, a usage snippet and the limitations (and, for GGUF, the llama.cpp and Ollama commands). The folder loads with plain transformers, without dpolab, and holds no absolute path of this machine.
    """
    from dpolab.errors import PublishError
    from dpolab.publish import export_model

    if quant and fmt != "gguf":
        raise PublishError("--quant applies to --format gguf only")
    path = export_model(source, out_dir, overwrite=overwrite, max_shard_size=max_shard_size, fmt=fmt,
                        quants=tuple(quant or ("f16",)), adapter=adapter)
    files = sorted(p for p in path.iterdir() if p.is_file())
    stdout.print(f"exported {source} -> {path} ({len(files)} files, "
                    f"{_size(sum(p.stat().st_size for p in files))})", highlight=False, soft_wrap=True)


def push(
    source: str = typer.Argument(..., metavar="RUN_OR_DIR", help="An exported folder, or a run/sweep folder (exported "
                                 "to a temporary folder first)."),
    repo: str = typer.Option(..., "--repo", "-r", metavar="OWNER/NAME", help="Hub model repo; created if missing."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (no effect on an existing repo)."),
    revision: Optional[str] = typer.Option(None, help="Branch to commit to (default: main)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files (GGUF and Modelfile included) with their "
                                 "sizes and the model card; send nothing."),
) -> None:
    """Upload a model to the Hugging Face Hub: create the repo if needed, then commit every file.

    The token comes from HF_TOKEN or `hf auth login` (write access needed); it is never printed or written.

    Every file of the folder goes up, GGUF files and the Modelfile included (large files take the Hub's LFS path).

    HF_ENDPOINT selects another Hub endpoint (a mirror or a private Hub).
    """
    from dpolab.publish import push_model

    result = push_model(source, repo, private=private, revision=revision, dry_run=dry_run)
    if dry_run:
        typer.echo(f"dry run: would upload to {repo} with the commit message {result['commit_message']!r}:")
        for name, size in result["files"]:
            typer.echo(f"  {name:<40} {_size(size):>10}")
        typer.echo("\n" + result["card"])
        return
    stdout.print(f"pushed {len(result['files'])} files to {repo}: {result['url']}", highlight=False, soft_wrap=True)
