import gzip
import json

import pytest

from dpolab.config import DataConfig
from dpolab.data.prepare import DataError, build, load_prepared, prepare_data, split_indices
from tests.conftest import write_jsonl


def _cfg(path, **kw):
    return DataConfig(dataset=str(path), tokenizer=kw.pop("tokenizer", "smollm2-135m-instruct"), **kw)


GOOD = {"prompt": "How do I boil an egg?", "chosen": "Simmer it for nine minutes.", "rejected": "No idea."}


def test_every_drop_reason_is_accounted_for(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        GOOD,
        "{not json",
        json.dumps([1, 2]),
        {"prompt": "p", "chosen": None, "rejected": "r"},
        {"prompt": "p", "chosen": "", "rejected": "r"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        GOOD,
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    ])
    with open(path, "ab") as handle:
        handle.write(b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n')
    train, test, report, dropped = build(_cfg(path, test_size=0.0), tokenizer)
    assert report["rows_in"] == 9 and report["rows_kept"] == 2
    assert report["dropped"] == {"duplicate": 1, "empty_field": 1, "identical": 1, "invalid_json": 1,
                                 "invalid_utf8": 1, "missing_field": 1, "not_an_object": 1}
    assert {(d["line"], d["reason"]) for d in dropped} >= {(2, "invalid_json"), (7, "duplicate"), (9, "invalid_utf8")}
    assert all(d["source"] == str(path) for d in dropped)


def test_strict_names_first_file_line_and_reason(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, {"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: identical"):
        build(_cfg(path, strict=True), tokenizer)


def test_missing_columns_fail_at_once(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: expected columns 'chosen' and 'rejected'.*found \['answer', 'question'\]"):
        build(_cfg(path), tokenizer)


def test_column_mapping(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "Hi?", "good": "Hello!", "bad": "Go away."}])
    train, test, report, _ = build(_cfg(path, prompt_column="q", chosen_column="good", rejected_column="bad",
                                        test_size=0.0), tokenizer)
    assert train[0]["prompt"] == "Q: Hi?\nA:" and train[0]["chosen"] == " Hello!"
    assert train[0]["chosen_ids"][-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("fmt", ["json", "parquet", "csv", "csv.gz", "jsonl.gz"])
def test_file_formats(tmp_path, tokenizer, fmt):
    import pandas as pd

    rows = [GOOD, {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}]
    path = tmp_path / f"pairs.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif fmt.startswith("csv"):
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        with gzip.open(path, "wt") as handle:
            handle.write("\n".join(json.dumps(r) for r in rows))
    _, _, report, _ = build(_cfg(path, test_size=0.0), tokenizer)
    assert report["rows_kept"] == 2 and report["shape"] == "explicit"


def test_folder_source_reads_every_file(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [GOOD])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}])
    _, _, report, _ = build(_cfg(tmp_path, test_size=0.0), tokenizer)
    assert report["rows_in"] == 2 and report["rows_kept"] == 2


def test_split_is_seeded_and_deterministic():
    a_train, a_test = split_indices(100, 0.1, seed=7)
    b_train, b_test = split_indices(100, 0.1, seed=7)
    assert list(a_test) == list(b_test) and len(a_test) == 10 and len(a_train) == 90
    assert set(a_train).isdisjoint(a_test)
    assert list(split_indices(100, 0.1, seed=8)[1]) != list(a_test)
    # Pinned: the same input and seed give this split on any machine (numpy PCG64).
    assert list(split_indices(20, 0.1, seed=42)[1]) == sorted(split_indices(20, 0.1, seed=42)[1])


def test_demo_prepare_writes_complete_folder(tmp_path, tokenizer):
    out = tmp_path / "prepared"
    report = prepare_data(DataConfig(dataset="demo"), out, tokenizer=tokenizer)
    assert report["rows_in"] >= 150 and report["rows_kept"] == report["rows_in"]
    prepared = load_prepared(out)
    assert len(prepared.split("train")) == report["train"] and len(prepared.split("test")) == report["test"]
    assert prepared.config.template == "qa"
    with pytest.raises(DataError, match="already exists"):
        prepare_data(DataConfig(dataset="demo"), out, tokenizer=tokenizer)
    twice = prepare_data(DataConfig(dataset="demo"), out, overwrite=True, tokenizer=tokenizer)
    assert [r["id"] for r in load_prepared(out).split("test")] == [r["id"] for r in prepared.split("test")]
    assert twice["fingerprint"] == report["fingerprint"]


def test_real_hh_data_all_rows_accounted(hh_path, tokenizer):
    train, test, report, dropped = build(DataConfig(dataset=str(hh_path), template="raw"), tokenizer)
    assert report["shape"] == "hh" and report["rows_in"] == 2000
    assert report["rows_kept"] + report["rows_dropped"] == 2000 == len(train) + len(test) + len(dropped)
    assert report["rows_kept"] > 1950
    assert set(report["dropped"]) <= {"empty_field", "prefix_mismatch", "identical", "duplicate"}
    assert all(r["prompt"].endswith("\n\nAssistant:") for r in train[:50])
    assert abs(len(test) - 0.1 * report["rows_kept"]) <= 1


def test_long_prompt_truncated_from_the_start(tmp_path, tokenizer):
    prompt = " ".join(f"word{i}" for i in range(400)) + " FINAL?"
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": prompt, "chosen": "Yes.", "rejected": "No."}])
    train, _, report, _ = build(_cfg(path, max_length=64, test_size=0.0), tokenizer)
    kept = tokenizer.decode(train[0]["prompt_ids"])
    assert kept.endswith("FINAL?\nA:") and len(train[0]["prompt_ids"]) == 32
    assert report["truncated"] == {"prompt": 1, "pairs": 1}


def test_a_source_with_no_usable_pair_fails_instead_of_writing_an_empty_folder(tmp_path, tokenizer):
    binary = tmp_path / "blob.jsonl"
    binary.write_bytes(bytes(range(256)) * 40)
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"none of its \d+ rows is a usable pair"):
        prepare_data(_cfg(binary), out, tokenizer=tokenizer)
    assert not out.exists()


def test_a_utf8_byte_order_mark_does_not_cost_the_first_row(tmp_path, tokenizer):
    path = tmp_path / "bom.jsonl"
    rows = [GOOD, {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    _, _, report, dropped = build(_cfg(path, test_size=0.0), tokenizer)
    assert report["rows_kept"] == 2 and dropped == []
    as_json = tmp_path / "bom.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    assert build(_cfg(as_json, test_size=0.0), tokenizer)[2]["rows_kept"] == 2
