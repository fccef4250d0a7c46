"""What the studio's pages share: the server's options (as Streamlit passes them, after `--`), where the runs root is,
and small display helpers. UI only: every page calls the library (`dpolab.jobs`, the folder modules, `dpolab.data`,
`dpolab.publish`, …) for anything that does work."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dpolab.serving import DEFAULT_MAX_BATCH

APP_DIR = Path(__file__).resolve().parent
STUDIO = APP_DIR / "studio.py"
CHAT_PAGE = APP_DIR / "page.py"
PAGES_DIR = APP_DIR / "views"  # not "pages/": Streamlit would auto-discover that folder on a deep link (/train) and show
# its own file-name sidebar instead of the studio's navigation
ICON = APP_DIR.parent / "resources" / "chat-icon.png"
# No page icons: the current page's icon becomes the favicon, and a `:material/…:` one is fetched from fonts.gstatic.com
# (the studio must not ask anything of another host; tests/test_studio_browser.py checks); emoji need a font that
# headless browsers and many desktops lack.
PAGES = (  # file, title
    ("data.py", "Data"),
    ("train.py", "Train"),
    ("runs.py", "Runs"),
    ("sweep.py", "Sweep"),
    ("chat.py", "Chat"),
    ("publish.py", "Publish"),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """[script, MODEL, --compare BASE, --max-batch N, --runs-dir DIR] when `script` is the studio or the chat page;
    defaults otherwise (imported elsewhere, e.g. by pytest, sys.argv belongs to someone else)."""
    parser = argparse.ArgumentParser(prog="studio", add_help=False, exit_on_error=False)
    parser.add_argument("model", nargs="?")
    parser.add_argument("--compare")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH)
    ours = bool(argv) and Path(argv[0]).resolve() in (STUDIO, CHAT_PAGE) or \
        bool(argv) and Path(argv[0]).resolve().parent == PAGES_DIR
    return parser.parse_args(argv[1:] if ours else [])


def studio_args() -> argparse.Namespace:
    return parse_args(sys.argv)


def runs_root() -> Path:
    """The runs root every page lists, starts jobs in, and never deletes outside of (resolved)."""
    return Path(studio_args().runs_dir).expanduser().resolve()


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def fmt_time(stamp: float | None) -> str:
    return "–" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))
