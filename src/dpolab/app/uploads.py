"""Where a file uploaded in the studio goes: RUNS/uploads/<content hash>/<file name>, and nowhere else.

The hash folder keeps two different uploads of the same name apart (a prepared folder's fingerprint then still names
the file it was made from), and re-uploading the same bytes reuses the file. The name keeps its suffixes (.jsonl.gz),
which is how `dpolab.data.sources` knows how to read it; anything that could leave the folder is stripped."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

UPLOADS = "uploads"


def upload_path(runs_root: Path, filename: str, data: bytes) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(filename.replace("\\", "/")).name).lstrip(".") or "upload"
    return Path(runs_root).resolve() / UPLOADS / hashlib.sha256(data).hexdigest()[:12] / name


def save_upload(runs_root: Path, filename: str, data: bytes) -> Path:
    """Write the uploaded bytes under the runs root (once) and return the file's resolved path."""
    path = upload_path(runs_root, filename, data)
    if not (path.is_file() and path.read_bytes() == data):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)  # a reader never sees half a file
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path
