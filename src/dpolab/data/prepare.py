"""`prepare_data(config) -> report`: raw rows -> clean, tokenized, seeded train/test split in a prepared folder.

A prepared folder holds train.parquet, test.parquet, dropped.jsonl, data_report.json and prepared.json (the
options that shaped it: template, tokenizer, max_length — training refuses data prepared for another model).

Unpaired (KTO) data — rows of the `unpaired` shape, or pairs converted with `DataConfig.unpaired` — is written with
the same columns as pairs, so the engine (layout, reference cache, log-probs) reads it unchanged, plus a bool `label`:
`chosen`/`chosen_ids` hold the row's completion and `rejected`/`rejected_ids` its KL completion (`with_kl_completions`).
A converted pair becomes (prompt, chosen, True) and (prompt, rejected, False); the split is drawn over pairs, as for
paired data, so both halves land in the same split and no prompt is in both train and test. The report's rows_in /
rows_kept / rows_dropped count input rows (pairs, when converting); `kind` is "paired" or "unpaired"; unpaired reports
add `labels` (desirable/undesirable per split) and, when converting, `paired_to_unpaired` ({"pairs": N, "rows": 2N}).
For unpaired data, `truncated` and `tokens` keep the pair keys: chosen = completion, rejected = KL completion, and
truncated["pairs"] counts records whose prompt or completion was cut.
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
from dpolab.data import sources
from dpolab.data.shapes import Columns, Drop, Pair, Unpaired, detect_shape, parse_row
from dpolab.data.templates import render, render_unpaired
from dpolab.data.tokenize import batch_encode, tokenizer_fingerprint, truncate, with_eos
from dpolab.errors import DataError
from dpolab.folders import owner
from dpolab.folders.prepared import PreparedFolder
from dpolab.fsutil import atomic_folder

FORMAT_VERSION = 1




@dataclass
class _Kept:
    row: Pair | Unpaired
    source: str
    line: int
    texts: tuple[str, ...] = ()  # rendered (prompt, chosen, rejected) of a pair, (prompt, completion) of an unpaired row


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


def _columns(config: DataConfig) -> Columns:
    return Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.completion_column,
                   config.label_column)


def _is_csv(source: str) -> bool:
    # Every CSV cell is text (sources reads CSV with dtype=str), so only there may a label be "true"/"false".
    return Path(source).name.lower().removesuffix(".gz").endswith(".csv")


def _key(row: Pair | Unpaired) -> tuple[str, str, Any]:
    if isinstance(row, Unpaired):  # the same completion under both labels is two rows, as in TRL; kept both
        return row.prompt_text, row.completion, row.label
    return row.prompt_text, row.chosen, row.rejected


def _parse(config: DataConfig, ledger: _Ledger) -> tuple[list[_Kept], str]:
    cols = _columns(config)
    shape = None if config.shape == "auto" else config.shape
    kept: list[_Kept] = []
    seen: set[tuple[str, str, Any]] = set()
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
            row = parse_row(raw.value, shape, cols, text_labels=_is_csv(raw.source))
        except Drop as drop:
            ledger.drop(raw.source, raw.line, drop.reason, drop.detail, raw.value)
            continue
        key = _key(row)
        if key in seen:
            what = "completion and label" if isinstance(row, Unpaired) else "chosen and rejected"
            ledger.drop(raw.source, raw.line, "duplicate", f"same prompt, {what} as an earlier row", raw.value)
            continue
        seen.add(key)
        kept.append(_Kept(row, raw.source, raw.line))
    if ledger.rows_in == 0:
        raise DataError(f"{config.dataset}: no rows")
    if not kept:
        raise DataError(f"{config.dataset}: none of its {ledger.rows_in} rows is a usable pair (dropped: "
                        f"{_reasons(ledger)}); check --shape and the column options")
    return kept, shape or "unknown"


def _reasons(ledger: _Ledger) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in ledger.counts().items())


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


def _render(config: DataConfig, kept: list[_Kept], tokenizer, ledger: _Ledger) -> list[_Kept]:
    rendered = []
    for item in kept:
        try:
            if isinstance(item.row, Unpaired):
                item.texts = render_unpaired(item.row, config.template, tokenizer)
            else:
                item.texts = render(item.row, config.template, tokenizer)
        except Drop as drop:
            ledger.drop(item.source, item.line, drop.reason, drop.detail)
            continue
        rendered.append(item)
    return rendered


def _base(item: _Kept, ids: list[int]) -> dict[str, Any]:
    return {"prompt": item.texts[0], "messages": json.dumps(item.row.messages), "prompt_text": item.row.prompt_text,
            "prompt_ids": ids, "source": item.source, "line": item.line}


def _pair_records(config: DataConfig, item: _Kept, p: list[int], c: list[int], r: list[int]) -> tuple[list[dict], Counter]:
    tok = truncate(p, c, r, config.max_length, config.prompt_cap)
    if not tok.chosen_ids or not tok.rejected_ids:
        raise Drop("no_response_room", f"prompt has {len(p)} tokens, max_length {config.max_length}")
    if tok.chosen_ids == tok.rejected_ids:
        raise Drop("identical_after_truncation", f"max_length {config.max_length}")
    cut = Counter(k for k, hit in (("prompt", tok.truncated_prompt), ("chosen", tok.truncated_chosen),
                                   ("rejected", tok.truncated_rejected)) if hit)
    if cut:
        cut["pairs"] = 1
    record = {**_base(item, tok.prompt_ids), "id": pair_id(tok.prompt_ids, tok.chosen_ids, tok.rejected_ids),
              "chosen": item.texts[1], "rejected": item.texts[2], "chosen_ids": tok.chosen_ids,
              "rejected_ids": tok.rejected_ids}
    if item.row.margin is not None:
        record["margin"] = item.row.margin
    return [record], cut


def _completion_record(config: DataConfig, item: _Kept, p: list[int], text: str, ids: list[int], label: bool
                       ) -> tuple[dict, Counter]:
    """An unpaired record without its KL completion: prompt + completion fit max_length by the pair policy."""
    tok = truncate(p, ids, ids, config.max_length, config.prompt_cap)
    if not tok.chosen_ids:
        raise Drop("no_response_room", f"prompt has {len(p)} tokens, max_length {config.max_length}")
    cut = Counter(k for k, hit in (("prompt", tok.truncated_prompt), ("chosen", tok.truncated_chosen)) if hit)
    if cut:
        cut["pairs"] = 1
    return {**_base(item, tok.prompt_ids), "chosen": text, "chosen_ids": tok.chosen_ids, "label": label}, cut


def _records(config: DataConfig, item: _Kept, p: list[int], responses: list[list[int]], convert: bool
             ) -> tuple[list[dict], Counter]:
    """The records of one kept row (a unit, split together): one per pair or unpaired row, two per converted pair."""
    if isinstance(item.row, Unpaired):
        record, cut = _completion_record(config, item, p, item.texts[1], responses[0], item.row.label)
        return [record], cut
    if not convert:
        return _pair_records(config, item, p, *responses)
    good, good_cut = _completion_record(config, item, p, item.texts[1], responses[0], True)
    bad, bad_cut = _completion_record(config, item, p, item.texts[2], responses[1], False)
    if good["chosen_ids"] == bad["chosen_ids"]:  # one completion both desirable and not: no signal, as for a pair
        raise Drop("identical_after_truncation", f"max_length {config.max_length}")
    return [good, bad], good_cut + bad_cut


def _tokenize(config: DataConfig, kept: list[_Kept], tokenizer, ledger: _Ledger, convert: bool
              ) -> tuple[list[list[dict]], Counter]:
    """Kept rows -> units of records (see `_records`) and the truncation counts; a row that cannot fit is dropped."""
    rendered = _render(config, kept, tokenizer, ledger)
    units, truncated = [], Counter()
    special = config.template != "chat"  # a chat template already renders BOS/special tokens as text
    eos = tokenizer.eos_token_id
    chunk = 512
    for start in _progress(range(0, len(rendered), chunk), "tokenizing", total=-(-len(rendered) // chunk), unit="batches"):
        batch = rendered[start : start + chunk]
        # Every row of a source has one shape, so the batch's rows have the same number of texts.
        columns = [batch_encode(tokenizer, [b.texts[k] for b in batch], special and k == 0)
                   for k in range(len(batch[0].texts))]
        for item, p, *responses in zip(batch, *columns):
            try:
                records, cut = _records(config, item, p, [with_eos(r, eos) for r in responses], convert)
            except Drop as drop:
                ledger.drop(item.source, item.line, drop.reason, drop.detail)
                continue
            units.append(records)
            truncated.update(cut)
    return units, truncated


def with_kl_completions(records: list[dict], max_length: int) -> tuple[list[dict], int]:
    """One split's unpaired records with their KL completion as `rejected`/`rejected_ids`, and how many were cut.

    Record i gets the completion of record i-1, cyclically (record 0 the last one), as TRL's KTOTrainer builds its
    mismatched pairs (KL_completion_ids = [completion_ids[-1]] + completion_ids[:-1]): the KL reference term is
    estimated on completions written for other prompts. Applied per split, so train and test are each
    self-contained; a split of one record gets its own completion (there is no other). The KL completion is cut from
    the right to fit max_length after the record's (possibly truncated) prompt; `id` hashes all three id lists."""
    out, cut = [], 0
    for i, record in enumerate(records):
        previous = records[i - 1]  # i == 0 -> records[-1]
        ids = previous["chosen_ids"][: max_length - len(record["prompt_ids"])]
        cut += len(ids) < len(previous["chosen_ids"])
        out.append({**record, "id": pair_id(record["prompt_ids"], record["chosen_ids"], ids),
                    "rejected": previous["chosen"], "rejected_ids": ids})
    return out, cut


def _flatten(units: list[list[dict]]) -> list[dict]:
    # All first records, then all second ones: a converted pair's undesirable half lands far from its desirable half,
    # so the KL neighbour (record i-1) is another prompt's completion (TRL's unpair_preference_dataset does the same).
    width = max((len(u) for u in units), default=0)
    return [u[k] for k in range(width) for u in units if k < len(u)]


def split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split; numpy's PCG64 permutation is the same on every machine for the same (n, seed)."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_size)) if test_size > 0 else 0
    if test_size > 0 and n > 1:
        n_test = min(max(n_test, 1), n - 1)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _split(config: DataConfig, units: list[list[dict]], kind: str) -> tuple[list[dict], list[dict], int]:
    """Seeded split over units (a converted pair's two rows stay together); unpaired splits get KL completions."""
    train_idx, test_idx = split_indices(len(units), config.test_size, config.seed)
    train, test = (_flatten([units[i] for i in idx]) for idx in (train_idx, test_idx))
    if kind == "paired":
        return train, test, 0
    (train, train_cut), (test, test_cut) = (with_kl_completions(s, config.max_length) for s in (train, test))
    return train, test, train_cut + test_cut


def _label_counts(records: list[dict]) -> dict[str, int]:
    desirable = sum(1 for r in records if r["label"])
    return {"desirable": desirable, "undesirable": len(records) - desirable}


def _unpaired_counts(shape: str, kind: str, units: list[list[dict]], train: list[dict], test: list[dict]) -> dict:
    if kind == "paired":
        return {}
    counts: dict[str, Any] = {"labels": {"train": _label_counts(train), "test": _label_counts(test)}}
    if shape != "unpaired":
        counts["paired_to_unpaired"] = {"pairs": len(units), "rows": len(train) + len(test)}
    return counts


def build(config: DataConfig, tokenizer=None) -> tuple[list[dict], list[dict], dict[str, Any], list[dict]]:
    """The whole pipeline in memory: (train records, test records, report, dropped rows)."""
    from dpolab.models import load_tokenizer

    started = time.perf_counter()
    ledger = _Ledger(config.strict)
    kept, shape = _parse(config, ledger)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    kind = "unpaired" if shape == "unpaired" or config.unpaired else "paired"
    units, truncated = _tokenize(config, kept, tokenizer, ledger, convert=kind == "unpaired")
    if not units:
        raise DataError(f"{config.dataset}: no {'row' if kind == 'unpaired' else 'pair'} is left after formatting and "
                        f"truncation to max_length {config.max_length} (dropped: {_reasons(ledger)})")
    train, test, kl_cut = _split(config, units, kind)
    truncated += Counter(rejected=kl_cut)  # KL completions cut to fit (a Counter sum drops a zero)
    records = train + test
    report = {
        "source": config.dataset, "split": config.split, "shape": shape, "kind": kind,
        "fingerprint": sources.fingerprint(config.dataset, config.split),
        "rows_in": ledger.rows_in, "rows_kept": len(units), "rows_dropped": len(ledger.dropped),
        "dropped": ledger.counts(), "truncated": dict(truncated),
        "train": len(train), "test": len(test), **_unpaired_counts(shape, kind, units, train, test),
        "test_size": config.test_size, "seed": config.seed,
        "template": config.template, "tokenizer": config.tokenizer,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "max_length": config.max_length,
        "max_prompt_length": config.prompt_cap,
        "tokens": {k: _percentiles([len(r[f"{k}_ids"]) for r in records]) for k in ("prompt", "chosen", "rejected")},
        "seconds": round(time.perf_counter() - started, 2),
    }
    assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"], "a row was lost"
    return train, test, report, ledger.dropped


def check_labels(report: dict[str, Any], path: str | Path) -> None:
    """Refuse unpaired data whose train split lacks desirable or undesirable rows, before any training: KTO weighs
    desirable against undesirable completions, so with one side missing there is nothing to contrast. Paired passes."""
    if report.get("kind", "paired") != "unpaired":
        return
    counts = report["labels"]["train"]
    good, bad = counts["desirable"], counts["undesirable"]
    if good and bad:
        return
    only = "no" if not good and not bad else "only desirable" if good else "only undesirable"
    raise DataError(f"{path} has {only} rows in its train split ({good} desirable, {bad} undesirable): KTO needs "
                    f"both desirable (label true) and undesirable (label false) rows")


def _write_parquet(records: list[dict], path: Path, unpaired: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # `label` only for unpaired data, `margin` only when a row had one: other paired folders stay byte-identical to
    # those of earlier versions. A pair without a margin among pairs with one gets 0 (no required gap).
    margins = any("margin" in r for r in records)
    columns = ["id", "prompt", "chosen", "rejected", "messages", "prompt_text", "prompt_ids", "chosen_ids",
               "rejected_ids", "source", "line"] + (["label"] if unpaired else []) + (["margin"] if margins else [])
    types = {"line": pa.int64(), "label": pa.bool_(), "margin": pa.float64()}
    schema = pa.schema([(c, pa.list_(pa.int32()) if c.endswith("_ids") else types.get(c, pa.string())) for c in columns])
    table = pa.table({c: [r.get(c, 0.0) if c == "margin" else r[c] for r in records] for c in columns}, schema=schema)
    pq.write_table(table, path)


def prepare_data(config: DataConfig, out: Path, overwrite: bool = False, tokenizer=None) -> dict[str, Any]:
    """Prepare `config.dataset` into `out` (written whole or not at all) and return the data report.

    `overwrite` replaces only a folder dpolab prepared, never one that holds the input (checked before any work)."""
    out = Path(out)
    if overwrite:
        owner.check_replaceable(out, "prepared", "--out", inputs=[config.dataset])
    else:
        owner.check_output(out, "--out")
        if out.exists() and any(out.iterdir()):
            raise DataError(f"{out} already exists and is not empty; pass --overwrite to replace it")
    train, test, report, dropped = build(config, tokenizer)
    with atomic_folder(out, out.name) as tmp:
        folder = PreparedFolder(tmp)
        unpaired = report["kind"] == "unpaired"
        _write_parquet(train, folder.split_file("train"), unpaired)
        _write_parquet(test, folder.split_file("test"), unpaired)
        with open(folder.dropped_file, "w") as handle:
            for record in dropped:
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        folder.write_meta({"format": FORMAT_VERSION, "config": config.model_dump(mode="json")})
        folder.write_report(report)
        owner.mark(tmp, "prepared")
    return report


def is_prepared(path: str | Path) -> bool:
    return PreparedFolder(Path(path)).exists()


@dataclass(frozen=True)
class Prepared:
    path: Path
    config: DataConfig
    report: dict[str, Any]

    @property
    def kind(self) -> str:
        """The data kind: "paired", or "unpaired" (KTO: records carry `label`; `rejected_ids` is the KL completion)."""
        return self.report.get("kind", "paired")  # folders from before unpaired data are paired

    def split(self, name: str) -> list[dict]:
        import pyarrow.parquet as pq

        file = PreparedFolder(self.path).split_file(name)
        if not file.is_file():
            raise DataError(f"{self.path} has no {name} split ({file.name} missing)")
        return pq.read_table(file).to_pylist()


def load_prepared(path: str | Path) -> Prepared:
    folder = PreparedFolder(Path(path))
    missing = folder.missing()
    if missing:
        raise DataError(f"{path} is not a complete prepared folder: missing {', '.join(missing)}")
    meta = folder.read_meta()
    if meta.get("format") != FORMAT_VERSION:
        raise DataError(f"{path}: prepared with format {meta.get('format')}, this dpolab reads {FORMAT_VERSION}; prepare again")
    return Prepared(folder.path, DataConfig.model_validate(meta["config"]), folder.read_report())
