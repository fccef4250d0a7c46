"""Start the Streamlit server on the studio (`studio.py`: Data, Train, Runs, Sweep, Chat, Publish), passing it its
options after `--`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PAGE = Path(__file__).resolve().with_name("page.py")  # the chat page (also runnable alone, as the tests do)
STUDIO = Path(__file__).resolve().with_name("studio.py")


def app_threads() -> int:
    """torch threads per generation in the app: half the cores, so compare mode's two generations (or two users on two
    models) each have their own. Decoding a small model gains little from more threads, and two-thread torch collapses
    when another process holds a core (SmolLM2-135M on this 2-core machine, another job busy: 2 threads 1-3 tokens/s,
    1 thread 16-17)."""
    return max(1, (os.cpu_count() or 2) // 2)


def page_args(model: str | None = None, compare: str | None = None, runs_dir: str | Path = "runs",
              max_batch: int | None = None) -> list[str]:
    """The page's own arguments (parsed by `page.parse_page_args`)."""
    args = [model] if model else []
    if compare:
        args += ["--compare", compare]
    if max_batch is not None:
        args += ["--max-batch", str(max_batch)]
    return [*args, "--runs-dir", str(runs_dir)]


def streamlit_command(model: str | None = None, compare: str | None = None, port: int = 8501,
                      host: str = "127.0.0.1", runs_dir: str | Path = "runs", max_batch: int | None = None) -> list[str]:
    return [
        sys.executable, "-m", "streamlit", "run", str(STUDIO),
        "--server.headless", "true",  # never try to open a browser on the server
        "--browser.gatherUsageStats", "false",  # no telemetry (and no network attempts offline)
        "--server.address", host, "--server.port", str(port),
        "--server.fileWatcherType", "none",  # a served app, not a dev loop: no reruns on file changes
        "--client.toolbarMode", "minimal",  # hide the developer menu from users
        # A rerun (e.g. the answer's Stop button) waits for the running page to reach its next redraw (<= 0.25 s while
        # streaming), so the interrupted run records and shows its stopped answer before the new run draws the
        # history; with fast reruns the new run starts at once, before the old one has recorded anything.
        "--runner.fastReruns", "false",
        # No full garbage collection after every page run: with models loaded it delays the next run (the page
        # after a Stop click) by a large part of a second; Python's own thresholds still collect.
        "--runner.postScriptGC", "false",
        "--", *page_args(model, compare, runs_dir, max_batch),
    ]


def run_app(model: str | None = None, compare: str | None = None, port: int = 8501, host: str = "127.0.0.1",
            runs_dir: str | Path = "runs", max_batch: int | None = None) -> int:
    """Serve the page until interrupted; the exit status of the server (on POSIX this process becomes the server)."""
    cmd = streamlit_command(model, compare, port, host, runs_dir, max_batch)
    env = {"OMP_NUM_THREADS": str(app_threads()), **os.environ,  # an explicit OMP_NUM_THREADS wins
           "TOKENIZERS_PARALLELISM": "false"}  # quiet the tokenizers fork warning in the server
    print(f"dpolab app: serving on http://{host}:{port}  (Ctrl+C to stop)", file=sys.stderr, flush=True)
    if os.name == "posix":
        # Replace this process: Ctrl+C and a supervisor's SIGTERM reach the server itself, no orphan is left behind.
        os.execve(sys.executable, cmd, env)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the console delivers Ctrl+C to the server too; let it shut down
        return proc.wait()
