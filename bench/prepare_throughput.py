"""Rows/s of `dpolab data prepare` on a 100k-row input built by repeating the 2,000 real HH rows.

Each repeat gets a distinct tag in its first human turn (in both chosen and rejected), so no row is dropped as a
duplicate and every row is parsed, rendered and tokenized. Usage: python bench/prepare_throughput.py [--rows N]
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HH_DATA, write_result  # noqa: E402


def build_input(rows: int, path: Path) -> None:
    base = [json.loads(line) for line in gzip.open(HH_DATA, "rt")]
    with gzip.open(path, "wt") as out:
        for i in range(rows):
            row = dict(base[i % len(base)])
            tag = f"\n\nHuman: [{i // len(base)}]"
            row = {k: v.replace("\n\nHuman:", tag, 1) for k, v in row.items()}
            out.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--template", default="raw")
    args = parser.parse_args()
    from dpolab.config import DataConfig
    from dpolab.data.prepare import prepare_data
    from dpolab.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "hh-100k.jsonl.gz"
        build_input(args.rows, src)
        started = time.perf_counter()
        report = prepare_data(DataConfig(dataset=str(src), template=args.template), Path(tmp) / "out", tokenizer=tokenizer)
        seconds = time.perf_counter() - started
    result = {"settings": {"rows": args.rows, "template": args.template, "tokenizer": "smollm2-135m-instruct",
                           "max_length": 512, "input": "shared HH harmless-base test rows, repeated with a tag"},
              "seconds": round(seconds, 2), "rows_per_second": round(args.rows / seconds, 1),
              "rows_kept": report["rows_kept"], "dropped": report["dropped"]}
    path = write_result("prepare_throughput", result)
    print(json.dumps(result, indent=2))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
