"""Read raw rows with provenance (file, line/row) from a Hub id, a local file or folder, or the demo set."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dpolab.errors import SourceError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")




@dataclass(frozen=True)
class RawRow:
    source: str  # file path or hub:ID/split
    line: int  # 1-based line (JSONL), element (JSON) or row (Parquet/CSV/Hub)
    value: dict[str, Any] | None
    error: str | None = None  # a reason when the row could not even be parsed
    detail: str = ""


def demo_path() -> Path:
    return Path(str(resources.files("dpolab") / "resources" / "demo.jsonl"))


def _kind(path: Path) -> str | None:
    name = path.name.lower().removesuffix(".gz")
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def source_files(source: str) -> list[Path] | None:
    """Local files behind `source`, or None when it is not local (then it is a Hub id)."""
    if source == "demo":
        return [demo_path()]
    path = Path(source).expanduser()
    if path.is_file():
        if _kind(path) is None:
            raise SourceError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)} (optionally .gz)")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
        if not files:
            raise SourceError(f"{path}: folder holds no {'/'.join(SUFFIXES)} files")
        return files
    if source.startswith((".", "/", "~")) or source.endswith(tuple(SUFFIXES) + (".gz",)):
        raise SourceError(f"file not found: {source}")
    return None


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _jsonl(path: Path) -> Iterator[RawRow]:
    with _open(path) as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is no part of the first row
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(str(path), number, None, "invalid_utf8", str(exc))
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                yield RawRow(str(path), number, None, "invalid_json", exc.msg)
                continue
            if not isinstance(value, dict):
                yield RawRow(str(path), number, None, "not_an_object", type(value).__name__)
                continue
            yield RawRow(str(path), number, value)


def _json(path: Path) -> Iterator[RawRow]:
    with _open(path) as handle:
        try:
            data = json.loads(handle.read().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SourceError(f"{path}: not a valid UTF-8 JSON document ({exc}); use JSONL for row-level recovery") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the first list value holds the rows
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise SourceError(f"{path}: expected a JSON list of objects (or an object holding one)")
    for number, value in enumerate(data, start=1):
        if isinstance(value, dict):
            yield RawRow(str(path), number, value)
        else:
            yield RawRow(str(path), number, None, "not_an_object", type(value).__name__)


def _table(path: Path, kind: str) -> Iterator[RawRow]:
    import pandas as pd

    if kind == ".parquet":
        frame = pd.read_parquet(path)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""], compression="infer")
    for number, record in enumerate(frame.to_dict(orient="records"), start=1):
        yield RawRow(str(path), number, {k: _plain(v) for k, v in record.items()})


def _plain(value: Any) -> Any:
    """pandas/numpy scalars and arrays -> Python values; NaN -> None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _hub(dataset_id: str, split: str) -> Iterator[RawRow]:
    import datasets

    try:
        data = datasets.load_dataset(dataset_id, split=split)
    except Exception as exc:  # datasets raises many types for offline/missing/unknown
        raise SourceError(
            f"could not load Hub dataset {dataset_id!r} split {split!r} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). Offline, pass a local JSONL/JSON/Parquet/CSV "
            f"file or folder, or --dataset demo."
        ) from None
    for number, value in enumerate(data, start=1):
        yield RawRow(f"hub:{dataset_id}/{split}", number, dict(value))


def read_rows(source: str, split: str = "train") -> Iterator[RawRow]:
    files = source_files(source)
    if files is None:
        yield from _hub(source, split)
        return
    for path in files:
        kind = _kind(path)
        if kind == ".jsonl":
            yield from _jsonl(path)
        elif kind == ".json":
            yield from _json(path)
        else:
            yield from _table(path, kind)


def fingerprint(source: str, split: str = "train") -> str:
    """Content hash of the local files (or the Hub id + split): the same input gives the same fingerprint."""
    files = source_files(source)
    digest = hashlib.sha256()
    if files is None:
        digest.update(f"hub:{source}/{split}".encode())
    else:
        for path in files:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:32]
