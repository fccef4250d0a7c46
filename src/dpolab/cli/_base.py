"""What every command shares: one way to fail (one line, the right exit code, no traceback unless DPOLAB_DEBUG=1),
a Typer that wraps every command in it, the consoles, and the shared options."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click
import typer
from rich.console import Console
from rich.markup import escape

from dpolab.errors import DpolabError

console = Console(stderr=True)  # messages and errors
stdout = Console()  # results (tables)


def fail(message: str, code: int = 1) -> None:
    # soft_wrap: the message stays one line however narrow the terminal; escape: paths may hold "[...]".
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def guarded(command):
    """`command` with every failure turned into one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = os.environ.get("DPOLAB_DEBUG") == "1"
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise  # typer.Exit and usage errors: click reports them itself
        except DpolabError as exc:
            if debug:
                raise
            fail(_first_line(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except Exception as exc:
            if debug:
                raise
            fail(f"unexpected {type(exc).__name__}: {_first_line(exc)} (run with DPOLAB_DEBUG=1 for the traceback)")

    return wrapper


class Typer(typer.Typer):
    """A Typer whose commands all fail the same way (see `guarded`)."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)

        def decorator(function):
            register(guarded(function))
            return function

        return decorator


def setup_logging() -> None:
    """dpolab's own notices (e.g. "--resume: nothing to resume") on stderr, one line each."""
    logger = logging.getLogger("dpolab")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("dpolab: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


# Options shared by several commands.
DatasetOpt = typer.Option(None, "--dataset", "-d", help="Hub dataset id, local JSONL/JSON/Parquet/CSV file (.gz ok), folder, or 'demo'.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config; options given here override it.")
