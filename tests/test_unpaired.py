"""Unpaired (KTO) data: the `prompt, completion, label` shape, paired -> unpaired conversion, KL completions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dpolab.config import DataConfig
from dpolab.data.prepare import DataError, build, check_labels, load_prepared, prepare_data, with_kl_completions
from dpolab.data.shapes import Columns, Drop, detect_shape, parse_row
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[1]
COLS = Columns()


def _cfg(path, **kw):
    return DataConfig(dataset=str(path), tokenizer="smollm2-135m-instruct", **kw)


def _rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}: name a number.", "completion": f"It is {i}.", "label": i % 2 == 0}
            for i in range(start, start + n)]


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}: name a colour.", "chosen": f"Blue, {i}.", "rejected": f"No {i}."} for i in range(n)]


# ------------------------------------------------------------------------------------------------ shape + parsing
def test_unpaired_rows_are_detected_by_their_completion_and_label_columns():
    assert detect_shape({"prompt": "p", "completion": "c", "label": True}, COLS) == "unpaired"
    assert detect_shape({"q": "p", "answer": "c", "good": False}, Columns("q", completion="answer", label="good")) == "unpaired"
    with pytest.raises(ValueError, match=r"'completion' and 'label' for unpaired.*found \['completion', 'prompt'\]"):
        detect_shape({"prompt": "p", "completion": "c"}, COLS)


def test_unpaired_prompts_like_pairs_and_conversational_completions():
    row = parse_row({"prompt": "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye?\n\nAssistant:", "completion": " Bye!",
                     "label": False}, "unpaired", COLS)
    assert row.messages == (("user", "Hi"), ("assistant", "Hello"), ("user", "Bye?")) and row.label is False
    row = parse_row({"prompt": [{"role": "user", "content": "2+2?"}],
                     "completion": [{"role": "assistant", "content": "4"}], "label": True}, "unpaired", COLS)
    assert row.messages == (("user", "2+2?"),) and row.completion == "4" and row.label is True


@pytest.mark.parametrize("row,text_labels,reason", [
    ({"prompt": "p", "completion": "c", "label": 1}, False, "label_not_boolean"),
    ({"prompt": "p", "completion": "c", "label": 0.0}, False, "label_not_boolean"),
    ({"prompt": "p", "completion": "c", "label": "true"}, False, "label_not_boolean"),  # text only counts in CSV
    ({"prompt": "p", "completion": "c", "label": "yes"}, True, "label_not_boolean"),
    ({"prompt": "p", "completion": "c", "label": None}, False, "missing_field"),
    ({"prompt": "p", "completion": "c"}, False, "missing_field"),
    ({"completion": "c", "label": True}, False, "missing_field"),
    ({"prompt": "p", "completion": " ", "label": True}, False, "empty_field"),
    ({"prompt": "p", "completion": 7, "label": True}, False, "non_text_field"),
    ({"prompt": "p", "completion": [{"role": "user", "content": "c"}], "label": True}, False, "malformed_messages"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "completion": "c",
      "label": True}, False, "malformed_prompt"),
])
def test_unpaired_drop_reasons(row, text_labels, reason):
    with pytest.raises(Drop) as err:
        parse_row(row, "unpaired", COLS, text_labels=text_labels)
    assert err.value.reason == reason


def test_text_labels_read_true_and_false_in_any_case():
    assert parse_row({"prompt": "p", "completion": "c", "label": " TRUE"}, "unpaired", COLS, text_labels=True).label is True
    assert parse_row({"prompt": "p", "completion": "c", "label": "false"}, "unpaired", COLS, text_labels=True).label is False


# ------------------------------------------------------------------------------------------------ the pipeline
def test_every_unpaired_drop_reason_is_accounted_for(tmp_path, tokenizer):
    good = _rows(4)
    path = write_jsonl(tmp_path / "kto.jsonl", [
        *good,
        "{not json",
        {"prompt": "p", "completion": "c", "label": 1},
        {"prompt": "p", "completion": "c", "label": "true"},
        {"prompt": "p", "completion": "", "label": True},
        {"prompt": "p", "completion": 3, "label": True},
        {"prompt": None, "completion": "c", "label": True},
        good[0],
        {**good[0], "label": not good[0]["label"]},  # the same completion under the other label is another row
    ])
    train, test, report, dropped = build(_cfg(path, test_size=0.0), tokenizer)
    assert report["shape"] == "unpaired" and report["kind"] == "unpaired"
    assert report["rows_in"] == 12 == report["rows_kept"] + report["rows_dropped"] and report["rows_kept"] == 5
    assert report["dropped"] == {"duplicate": 1, "empty_field": 1, "invalid_json": 1, "label_not_boolean": 2,
                                 "missing_field": 1, "non_text_field": 1}
    assert {(d["line"], d["reason"]) for d in dropped} >= {(6, "label_not_boolean"), (7, "label_not_boolean"),
                                                           (11, "duplicate")}
    assert report["labels"] == {"train": {"desirable": 2, "undesirable": 3}, "test": {"desirable": 0, "undesirable": 0}}
    assert "paired_to_unpaired" not in report and len(train) == 5 and test == []
    assert all(isinstance(r["label"], bool) for r in train)


def test_strict_names_the_row_whose_label_is_not_boolean(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", [*_rows(2), {"prompt": "p", "completion": "c", "label": "no"}])
    with pytest.raises(DataError, match=r"kto\.jsonl:3: label_not_boolean"):
        build(_cfg(path, strict=True), tokenizer)


def test_csv_labels_may_be_true_or_false_text(tmp_path, tokenizer):
    import pandas as pd

    rows = [*_rows(4), {"prompt": "p", "completion": "c", "label": "maybe"}]
    path = tmp_path / "kto.csv"
    pd.DataFrame(rows).to_csv(path, index=False)  # pandas writes the bools as "True"/"False"
    train, _, report, _ = build(_cfg(path, test_size=0.0), tokenizer)
    assert report["dropped"] == {"label_not_boolean": 1}
    assert [r["label"] for r in train] == [True, False, True, False]


def test_paired_to_unpaired_conversion_counts_and_keeps_halves_together(tmp_path, tokenizer):
    pairs = _pairs(20)
    path = write_jsonl(tmp_path / "pairs.jsonl", [*pairs, pairs[0], {"prompt": "p", "chosen": "x", "rejected": "x"}])
    train, test, report, _ = build(_cfg(path, unpaired=True, test_size=0.2), tokenizer)
    assert report["shape"] == "explicit" and report["kind"] == "unpaired"
    assert report["rows_in"] == 22 and report["rows_kept"] == 20 and report["dropped"] == {"duplicate": 1, "identical": 1}
    assert report["paired_to_unpaired"] == {"pairs": 20, "rows": 40}
    assert (report["train"], report["test"]) == (32, 8) == (len(train), len(test))
    assert report["labels"] == {"train": {"desirable": 16, "undesirable": 16}, "test": {"desirable": 4, "undesirable": 4}}
    # The split is over pairs: a prompt is in train or in test, with both its completions.
    assert {r["prompt_text"] for r in train}.isdisjoint({r["prompt_text"] for r in test})
    # Desirable halves first, then undesirable ones: the KL neighbour is always another prompt's completion.
    assert [r["label"] for r in test] == [True] * 4 + [False] * 4
    for split in (train, test):
        for i, record in enumerate(split):
            assert split[i - 1]["line"] != record["line"]
    # The same pairs, paired, split into the same prompts.
    paired_train, _, _, _ = build(_cfg(path, test_size=0.2), tokenizer)
    assert {r["prompt_text"] for r in paired_train} == {r["prompt_text"] for r in train}


def test_unpaired_flag_on_unpaired_data_changes_nothing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", _rows(6))
    plain = build(_cfg(path), tokenizer)
    flagged = build(_cfg(path, unpaired=True), tokenizer)
    assert [r["id"] for r in plain[0]] == [r["id"] for r in flagged[0]] and "paired_to_unpaired" not in flagged[2]


def test_kl_completion_is_the_previous_records_completion_cyclically_per_split(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", _rows(30))
    train, test, report, _ = build(_cfg(path, test_size=0.2), tokenizer)
    assert (len(train), len(test)) == (24, 6)
    for split in (train, test):
        for i, record in enumerate(split):
            previous = split[i - 1]  # record 0 <- the last record of the same split
            assert record["rejected_ids"] == previous["chosen_ids"] and record["rejected"] == previous["chosen"]
    assert test[0]["rejected_ids"] == test[-1]["chosen_ids"] and train[0]["rejected_ids"] == train[-1]["chosen_ids"]
    ids = [r["id"] for r in train + test]
    assert len(set(ids)) == len(ids)
    assert report["tokens"]["rejected"]["mean"] > 0  # the engine's plan reads prompt/chosen/rejected means


def test_a_split_of_one_record_uses_its_own_completion():
    record = {"prompt": "Q", "chosen": " a", "prompt_ids": [1, 2], "chosen_ids": [3, 4], "label": True}
    (only,), cut = with_kl_completions([record], max_length=16)
    assert only["rejected_ids"] == [3, 4] and only["rejected"] == " a" and cut == 0


def test_kl_completion_is_cut_to_fit_after_the_prompt(tmp_path, tokenizer):
    long = " ".join(f"w{i}" for i in range(120))
    rows = [{"prompt": "Say a lot.", "completion": long, "label": True},
            {"prompt": " ".join(f"q{i}" for i in range(20)) + " ok?", "completion": "Ok.", "label": False}]
    train, _, report, _ = build(_cfg(write_jsonl(tmp_path / "kto.jsonl", rows), max_length=48, test_size=0.0), tokenizer)
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 48 for r in train)
    long_prompt = train[1]  # its KL completion is record 0's long completion, cut to the room its prompt leaves
    assert long_prompt["rejected_ids"] == train[0]["chosen_ids"][: 48 - len(long_prompt["prompt_ids"])]
    assert report["truncated"]["rejected"] == 1 and report["truncated"]["chosen"] == 1


# ------------------------------------------------------------------------------------------------ labels, folder, CLI
def test_check_labels_refuses_one_sided_train_data(tmp_path, tokenizer):
    import pyarrow.parquet as pq

    rows = [{**r, "label": True} for r in _rows(5)]
    out = tmp_path / "prepared"
    report = prepare_data(_cfg(write_jsonl(tmp_path / "kto.jsonl", rows), test_size=0.0), out, tokenizer=tokenizer)
    with pytest.raises(DataError) as err:
        check_labels(report, out)
    message = str(err.value)
    assert "\n" not in message and str(out) in message and "only desirable rows" in message
    assert "(5 desirable, 0 undesirable)" in message and "KTO needs both" in message
    check_labels({**report, "labels": {"train": {"desirable": 3, "undesirable": 1}}}, out)  # both: passes
    check_labels({"kind": "paired"}, out)  # paired data has no labels to check
    check_labels({}, out)  # nor have reports written before unpaired data
    assert load_prepared(out).split("test") == []  # an empty unpaired split still has its label column
    assert "label" in pq.read_schema(out / "test.parquet").names


def test_unpaired_folder_round_trip_keeps_bool_labels(tmp_path, tokenizer):
    import pyarrow.parquet as pq

    out = tmp_path / "prepared"
    report = prepare_data(_cfg(write_jsonl(tmp_path / "kto.jsonl", _rows(10))), out, tokenizer=tokenizer)
    prepared = load_prepared(out)
    assert prepared.kind == "unpaired" and prepared.report == report
    train = prepared.split("train")
    assert len(train) == report["train"] and all(type(r["label"]) is bool for r in train)
    assert sum(r["label"] for r in train) == report["labels"]["train"]["desirable"]
    assert {"id", "prompt_ids", "chosen_ids", "rejected_ids", "label"} <= set(train[0])
    assert pq.read_schema(out / "test.parquet").field("label").type == "bool"

    paired = tmp_path / "paired"
    prepare_data(_cfg(write_jsonl(tmp_path / "pairs.jsonl", _pairs(5))), paired, tokenizer=tokenizer)
    assert load_prepared(paired).kind == "paired" and "label" not in pq.read_schema(paired / "train.parquet").names


def test_report_table_shows_kind_and_labels(tmp_path, tokenizer):
    from rich.console import Console

    from dpolab.data.summary import report_table

    _, _, report, _ = build(_cfg(write_jsonl(tmp_path / "pairs.jsonl", _pairs(10)), unpaired=True), tokenizer)
    console = Console(width=200, record=True)
    console.print(report_table(report))
    text = console.export_text()
    assert "(explicit, unpaired)" in text and "10 pairs -> 20 rows" in text
    assert "train labels" in text and "9 desirable / 9 undesirable" in text and "truncated rows" in text
    assert "KL completion tokens" in text


def test_cli_prepares_real_hh_pairs_as_unpaired(hh_path, tmp_path, embedded_dir):
    out = tmp_path / "kto"
    run = subprocess.run([sys.executable, "-m", "dpolab", "data", "prepare", "--dataset", str(hh_path), "--out", str(out),
                          "--template", "raw", "--limit", "200", "--unpaired"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "data_report.json").read_text())
    assert report["kind"] == "unpaired" and report["shape"] == "hh" and report["rows_in"] == 200
    assert report["paired_to_unpaired"] == {"pairs": report["rows_kept"], "rows": 2 * report["rows_kept"]}
    assert report["train"] + report["test"] == 2 * report["rows_kept"]
    labels = report["labels"]
    assert labels["train"]["desirable"] == labels["train"]["undesirable"] == report["train"] // 2
    assert "paired -> unpaired" in run.stdout
    check_labels(report, out)
