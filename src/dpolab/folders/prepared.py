"""The prepared-data folder: train.parquet, test.parquet, dropped.jsonl, prepared.json (the options that shaped it),
data_report.json (counts, lengths, template, tokenizer) and refcache/ (reference log-probs, see engine/refcache)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpolab.folders.layout import Layout
from dpolab.fsutil import atomic_write_text

SPLITS = ("train", "test")
REQUIRED = ("train.parquet", "test.parquet", "prepared.json", "data_report.json", "dropped.jsonl")


class PreparedFolder(Layout):
    NAMES = {"dropped_file": "dropped.jsonl", "meta_file": "prepared.json", "report_file": "data_report.json",
             "refcache_dir": "refcache"}

    def split_file(self, name: str) -> Path:
        return self.path / f"{name}.parquet"

    def exists(self) -> bool:
        return self.path.is_dir() and self.meta_file.is_file()

    def missing(self) -> list[str]:
        return [name for name in REQUIRED if not (self.path / name).is_file()]

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic_write_text(self.meta_file, json.dumps(meta, indent=2))

    def write_report(self, report: dict[str, Any]) -> None:
        atomic_write_text(self.report_file, json.dumps(report, indent=2))

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta_file.read_text())

    def read_report(self) -> dict[str, Any]:
        return json.loads(self.report_file.read_text())
