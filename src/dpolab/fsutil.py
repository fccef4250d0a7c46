"""Filesystem primitives: folders written whole or not at all, atomic files, and a lock between local processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def remove_folder(target: Path) -> None:
    """Remove a folder the caller has already checked is dpolab's: renamed aside first, so a kill mid-delete never
    leaves a half-deleted folder under the original name."""
    target = Path(target)
    if not target.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(aside / target.name)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: Path, prefix: str = "tmp") -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` by a rename, so an interrupted
    write never leaves a folder that looks complete. Replacing an existing `target` is the caller's decision:
    check it first (`dpolab.folders.owner.check_replaceable`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=target.parent))
    try:
        yield tmp
        remove_folder(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: readers see the old or the new file, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plain write would honour the umask
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock between local processes (fcntl): one computes, the others wait and then read."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
