"""`prepare_data(config) -> report`: raw rows -> clean, tokenized, seeded train/test split in a prepared folder.

A prepared folder holds train.parquet, test.parquet, dropped.jsonl, data_report.json and prepared.json (the
options that shaped it: template, tokenizer, max_length — training refuses data prepared for another model).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpolab.config import DataConfig
from dpolab.fsutil import atomic_folder
from dpolab.data import sources
from dpolab.data.shapes import Columns, Drop, Pair, detect_shape, parse_row
from dpolab.data.templates import render
from dpolab.data.tokenize import batch_encode, tokenizer_fingerprint, truncate, with_eos

PREPARED_FILES = ("train.parquet", "test.parquet", "prepared.json", "data_report.json", "dropped.jsonl")
FORMAT_VERSION = 1


class DataError(ValueError):
    """Data that cannot be prepared; the message names the file, line and reason."""


@dataclass
class _Kept:
    pair: Pair
    source: str
    line: int
    texts: tuple[str, str, str] = ("", "", "")


@dataclass
class _Ledger:
    """Every row read is either kept or dropped with its reason: rows_in == kept + sum(dropped)."""

    strict: bool
    rows_in: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, source: str, line: int, reason: str, detail: str = "", row: Any = None) -> None:
        if self.strict:
            raise DataError(f"{source}:{line}: {reason}{': ' + detail if detail else ''} (--strict)")
        record = {"source": source, "line": line, "reason": reason, "detail": detail}
        if row is not None:
            record["row"] = row
        self.dropped.append(record)

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(d["reason"] for d in self.dropped).items()))


def _progress(iterable, description: str, total: int | None = None, unit: str = "rows"):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, total=total, unit=unit, mininterval=0.5, leave=False)


def _parse(config: DataConfig, ledger: _Ledger) -> tuple[list[_Kept], str]:
    cols = Columns(config.prompt_column, config.chosen_column, config.rejected_column)
    shape = None if config.shape == "auto" else config.shape
    kept: list[_Kept] = []
    seen: set[tuple[str, str, str]] = set()
    for raw in _progress(sources.read_rows(config.dataset, config.split), "reading"):
        if config.limit and ledger.rows_in >= config.limit:
            break
        ledger.rows_in += 1
        if raw.error:
            ledger.drop(raw.source, raw.line, raw.error, raw.detail)
            continue
        if shape is None:
            try:
                shape = detect_shape(raw.value, cols)
            except ValueError as exc:
                raise DataError(f"{raw.source}:{raw.line}: {exc}") from None
        try:
            pair = parse_row(raw.value, shape, cols)
        except Drop as drop:
            ledger.drop(raw.source, raw.line, drop.reason, drop.detail, raw.value)
            continue
        key = (pair.prompt_text, pair.chosen, pair.rejected)
        if key in seen:
            ledger.drop(raw.source, raw.line, "duplicate", "same prompt, chosen and rejected as an earlier row", raw.value)
            continue
        seen.add(key)
        kept.append(_Kept(pair, raw.source, raw.line))
    if ledger.rows_in == 0:
        raise DataError(f"{config.dataset}: no rows")
    return kept, shape or "unknown"


def _percentiles(lengths: list[int]) -> dict[str, float]:
    if not lengths:
        return {}
    arr = np.asarray(lengths)
    return {"mean": round(float(arr.mean()), 1), "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": int(arr.max())}


def pair_id(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int]) -> str:
    """Content hash of a tokenized pair: keys the reference log-prob cache, independent of layout and order."""
    digest = hashlib.blake2b(digest_size=12)
    for ids in (prompt_ids, chosen_ids, rejected_ids):
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _tokenize(config: DataConfig, kept: list[_Kept], tokenizer, ledger: _Ledger) -> tuple[list[dict], Counter]:
    rendered: list[_Kept] = []
    for item in kept:
        try:
            item.texts = render(item.pair, config.template, tokenizer)
        except Drop as drop:
            ledger.drop(item.source, item.line, drop.reason, drop.detail)
            continue
        rendered.append(item)
    records, truncated = [], Counter()
    special = config.template != "chat"  # a chat template already renders BOS/special tokens as text
    eos = tokenizer.eos_token_id
    chunk = 512
    for start in _progress(range(0, len(rendered), chunk), "tokenizing", total=-(-len(rendered) // chunk), unit="batches"):
        batch = rendered[start : start + chunk]
        prompts = batch_encode(tokenizer, [b.texts[0] for b in batch], special)
        chosens = batch_encode(tokenizer, [b.texts[1] for b in batch], False)
        rejecteds = batch_encode(tokenizer, [b.texts[2] for b in batch], False)
        for item, p, c, r in zip(batch, prompts, chosens, rejecteds):
            tok = truncate(p, with_eos(c, eos), with_eos(r, eos), config.max_length, config.prompt_cap)
            if not tok.chosen_ids or not tok.rejected_ids:
                ledger.drop(item.source, item.line, "no_response_room", f"prompt has {len(p)} tokens, max_length {config.max_length}")
                continue
            if tok.chosen_ids == tok.rejected_ids:
                ledger.drop(item.source, item.line, "identical_after_truncation", f"max_length {config.max_length}")
                continue
            truncated.update(k for k, hit in (("prompt", tok.truncated_prompt), ("chosen", tok.truncated_chosen),
                                              ("rejected", tok.truncated_rejected)) if hit)
            if tok.truncated_prompt or tok.truncated_chosen or tok.truncated_rejected:
                truncated["pairs"] += 1
            records.append({
                "id": pair_id(tok.prompt_ids, tok.chosen_ids, tok.rejected_ids),
                "prompt": item.texts[0], "chosen": item.texts[1], "rejected": item.texts[2],
                "messages": json.dumps(item.pair.messages), "prompt_text": item.pair.prompt_text,
                "prompt_ids": tok.prompt_ids, "chosen_ids": tok.chosen_ids, "rejected_ids": tok.rejected_ids,
                "source": item.source, "line": item.line,
            })
    return records, truncated


def split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split; numpy's PCG64 permutation is the same on every machine for the same (n, seed)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_size)) if test_size > 0 else 0
    if test_size > 0 and n > 1:
        n_test = min(max(n_test, 1), n - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def build(config: DataConfig, tokenizer=None) -> tuple[list[dict], list[dict], dict[str, Any], list[dict]]:
    """The whole pipeline in memory: (train records, test records, report, dropped rows)."""
    from dpolab.models import load_tokenizer

    started = time.perf_counter()
    ledger = _Ledger(config.strict)
    kept, shape = _parse(config, ledger)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    records, truncated = _tokenize(config, kept, tokenizer, ledger)
    train_idx, test_idx = split_indices(len(records), config.test_size, config.seed)
    train, test = [records[i] for i in train_idx], [records[i] for i in test_idx]
    report = {
        "source": config.dataset, "split": config.split, "shape": shape,
        "fingerprint": sources.fingerprint(config.dataset, config.split),
        "rows_in": ledger.rows_in, "rows_kept": len(records), "rows_dropped": len(ledger.dropped),
        "dropped": ledger.counts(), "truncated": dict(truncated),
        "train": len(train), "test": len(test), "test_size": config.test_size, "seed": config.seed,
        "template": config.template, "tokenizer": config.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_length": config.max_length,
        "max_prompt_length": config.prompt_cap,
        "tokens": {k: _percentiles([len(r[f"{k}_ids"]) for r in records]) for k in ("prompt", "chosen", "rejected")},
        "seconds": round(time.perf_counter() - started, 2),
    }
    assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"], "a row was lost"
    return train, test, report, ledger.dropped


def _write_parquet(records: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = ["id", "prompt", "chosen", "rejected", "messages", "prompt_text", "prompt_ids", "chosen_ids",
               "rejected_ids", "source", "line"]
    schema = pa.schema([(c, pa.list_(pa.int32()) if c.endswith("_ids") else pa.int64() if c == "line" else pa.string())
                        for c in columns])
    table = pa.table({c: [r[c] for r in records] for c in columns}, schema=schema)
    pq.write_table(table, path)


def prepare_data(config: DataConfig, out: Path, overwrite: bool = False, tokenizer=None) -> dict[str, Any]:
    """Prepare `config.dataset` into `out` (written whole or not at all) and return the data report."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    train, test, report, dropped = build(config, tokenizer)
    with atomic_folder(out, out.name) as tmp:
        _write_parquet(train, tmp / "train.parquet")
        _write_parquet(test, tmp / "test.parquet")
        with open(tmp / "dropped.jsonl", "w") as handle:
            for record in dropped:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        meta = {"format": FORMAT_VERSION, "config": config.model_dump(mode="json")}
        (tmp / "prepared.json").write_text(json.dumps(meta, indent=2))
        (tmp / "data_report.json").write_text(json.dumps(report, indent=2))
    return report


def is_prepared(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "prepared.json").is_file()


@dataclass(frozen=True)
class Prepared:
    path: Path
    config: DataConfig
    report: dict[str, Any]

    def split(self, name: str) -> list[dict]:
        import pyarrow.parquet as pq

        file = self.path / f"{name}.parquet"
        if not file.is_file():
            raise DataError(f"{self.path} has no {name} split ({file.name} missing)")
        return pq.read_table(file).to_pylist()


def load_prepared(path: str | Path) -> Prepared:
    path = Path(path)
    missing = [f for f in PREPARED_FILES if not (path / f).is_file()]
    if missing:
        raise DataError(f"{path} is not a complete prepared folder: missing {', '.join(missing)}")
    meta = json.loads((path / "prepared.json").read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: prepared with format {meta.get('format')}, this dpolab reads {FORMAT_VERSION}; prepare again")
    return Prepared(path, DataConfig.model_validate(meta["config"]), json.loads((path / "data_report.json").read_text()))
