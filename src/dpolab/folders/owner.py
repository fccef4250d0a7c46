"""Which folders dpolab may replace: only its own.

Every folder dpolab creates (prepared data, run, sweep, export) carries a small marker file naming its kind. Folders
written before the marker existed are recognised by their contents. `--overwrite` replaces a folder only when it is
dpolab's and of the same kind, and never the working directory, a home or root directory, or a folder that holds the
input being read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from dpolab.errors import FolderError
from dpolab.fsutil import atomic_write_text

MARKER = ".dpolab-folder.json"

# Contents that identify folders written before the marker: any one alternative, every file in it present.
SIGNATURES: dict[str, tuple[tuple[str, ...], ...]] = {
    "prepared": (("prepared.json", "data_report.json"),),
    "run": (("config.yaml", "metrics.json"), ("config.yaml", "data_report.json"), ("config.yaml", "checkpoints")),
    "sweep": (("sweep.yaml",),),
    "export": (("config.json", "README.md", "dpolab.json"),),
}


def mark(folder: Path, kind: str) -> None:
    from dpolab import __version__

    atomic_write_text(Path(folder) / MARKER, json.dumps({"kind": kind, "dpolab": __version__}))


def kind_of(folder: Path) -> str | None:
    """The kind of dpolab folder `folder` is (marker first, then contents), or None when it is not dpolab's."""
    folder = Path(folder)
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        pass
    for kind, alternatives in SIGNATURES.items():
        if any(all((folder / name).exists() for name in names) for names in alternatives):
            return kind
    return None


def check_output(target: Path, option: str) -> None:
    """An output path must be a folder (or not exist yet)."""
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise FolderError(f"{option} {target} is a file, not a folder; choose a folder path")


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry
        return None


def _protected(target: Path) -> str | None:
    cwd, home = Path.cwd().resolve(), _home()
    if target == cwd or target in cwd.parents:
        return "it is the working directory or holds it"
    if home is not None and (target == home or target in home.parents):
        return "it is a home directory or holds one"
    return None


def check_replaceable(target: Path, kind: str, option: str, inputs: Iterable[str | Path] = ()) -> None:
    """Raise FolderError (one line, saying why) unless `--overwrite` may replace `target` with a new `kind` folder.

    A missing or empty folder is always fine; anything else must be dpolab's own folder of the same kind, and must
    not be the working directory, a home directory, or hold one of `inputs` (the data being read)."""
    check_output(target, option)
    path = Path(target).expanduser().resolve()
    if not path.exists():
        return
    reason = _protected(path)
    for item in inputs:
        source = Path(item).expanduser()
        if source.exists() and (source.resolve() == path or path in source.resolve().parents):
            reason = f"it holds the input {item}"
    if reason is None and any(path.iterdir()):
        found = kind_of(path)
        if found is None:
            reason = "dpolab did not create it (no dpolab marker); remove it yourself if you mean to"
        elif found != kind:
            reason = f"it holds a dpolab {found} folder, not a {kind} folder"
    if reason:
        raise FolderError(f"refusing to overwrite {option} {target}: {reason}; choose another folder")
