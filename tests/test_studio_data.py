"""The studio's Data page, headless (AppTest): source picking, the preview (shape, rows rendered as training sees
them, drop reasons, token lengths) against the library's own results, and Prepare as a real background job."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest

from dpolab.app.common import STUDIO
from dpolab.app.uploads import save_upload
from dpolab.config import DataConfig
from dpolab.data import sources
from dpolab.data.prepare import load_prepared, prepare_data
from dpolab.data.shapes import Columns, detect_shape, parse_row
from dpolab.data.templates import render
from dpolab.jobs import list_jobs, start_job, wait_job
from tests.conftest import write_jsonl

ROWS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {3 * i + 1}."}
        for i in range(12)]
BAD = [
    {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # identical
    {"prompt": "Missing?", "chosen": "Only chosen."},  # missing_field
    "{not json",  # invalid_json
    ROWS[0],  # duplicate
    {"prompt": "Empty?", "chosen": "  ", "rejected": "No."},  # empty_field
    {"prompt": "Also same?", "chosen": "Same.", "rejected": "Same."},  # identical
]


@pytest.fixture
def pairs(tmp_path) -> Path:
    (tmp_path / "src").mkdir()
    return write_jsonl(tmp_path / "src" / "pairs.jsonl", ROWS[:6] + BAD + ROWS[6:])


def open_studio(monkeypatch, root: Path, page: str) -> AppTest:
    """The studio's `page` (e.g. "views/data.py") with runs root `root`, as `dpolab app --runs-dir ROOT` serves it."""
    monkeypatch.setattr(sys, "argv", [str(STUDIO), "--runs-dir", str(root)])
    at = AppTest.from_file(str(STUDIO), default_timeout=120)
    at.switch_page(page)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def open_data(monkeypatch, tmp_path):
    """The Data page of a studio whose runs root is tmp_path/runs."""
    return lambda: open_studio(monkeypatch, tmp_path / "runs", "views/data.py")


def use(at: AppTest, tokenizer_dir: Path, path: Path | None = None, template: str = "qa") -> AppTest:
    """Point the page at a local path (or keep the demo set) with the tiny model's tokenizer and `template`."""
    if path is not None:
        at.radio(key="data_source").set_value("path").run()
        at.text_input(key="data_path").set_value(str(path)).run()
    at.text_input(key="data_model").set_value(str(tokenizer_dir))
    at.selectbox(key="data_template").set_value(template).run()
    assert not at.exception, at.exception
    return at


def row_codes(at: AppTest, n: int) -> list[tuple[str, str, str]]:
    codes = [c.value for c in at.code]
    return [tuple(codes[3 * i : 3 * i + 3]) for i in range(n)]


def frames(at: AppTest, column: str) -> list:
    """The tables shown that have `column` (drop counts: "reason"; token-length statistics: "p50"), in page order."""
    return [d.value for d in at.dataframe if column in d.value.columns]


def metrics(at: AppTest) -> dict[str, int]:
    return {m.label: int(m.value) for m in at.metric}


def test_empty_runs_root_shows_the_demo_set_and_writes_nothing(open_data, tmp_path):
    at = open_data()
    root = tmp_path / "runs"
    assert at.radio(key="data_source").value == "demo"
    assert any(str(root) in c.value for c in at.caption)  # the runs root, resolved
    assert at.button(key="prepare_start").label == "Prepare" and not at.button(key="prepare_start").disabled
    assert at.text_input(key="prepare_name").value == "data-demo"
    assert not at.error
    assert not root.exists()  # a look writes nothing


def test_demo_preview_renders_rows_as_the_library_does(open_data, tiny_llama, tokenizer):
    at = use(open_data(), tiny_llama, template="chat")
    first = [row.value for row, _ in zip(sources.read_rows("demo"), range(3))]
    shape = detect_shape(first[0], Columns())
    assert f"**Shape:** `{shape}`" in at.markdown[0].value and shape == "explicit"
    expected = [render(parse_row(row, shape, Columns()), "chat", tokenizer) for row in first]
    assert row_codes(at, 3) == expected
    assert expected[0][0].startswith("<|im_start|>")  # really the chat template, not qa
    assert metrics(at) == {"rows read": 200, "kept": 200, "dropped": 0, "train": 180, "test": 20}
    assert any(s.value == "No row dropped." for s in at.success)
    stats = frames(at, "p50")[0]
    assert list(stats.index) == ["prompt", "chosen", "rejected"]


def test_drop_reasons_and_counts_equal_prepares_report(open_data, tiny_llama, tokenizer, pairs, tmp_path):
    at = use(open_data(), tiny_llama, pairs)
    expected = prepare_data(DataConfig(dataset=str(pairs), tokenizer=str(tiny_llama)), tmp_path / "ref",
                            tokenizer=tokenizer)
    assert expected["dropped"] == {"duplicate": 1, "empty_field": 1, "identical": 2, "invalid_json": 1,
                                   "missing_field": 1}
    counts = frames(at, "reason")[0]
    assert dict(zip(counts["reason"], counts["rows"])) == expected["dropped"]
    assert metrics(at) == {"rows read": expected["rows_in"], "kept": expected["rows_kept"],
                           "dropped": expected["rows_dropped"], "train": expected["train"], "test": expected["test"]}
    labels = [e.label for e in at.expander]
    assert "identical: 2 rows" in labels and "invalid_json: 1 rows" in labels
    # The rows shown are the file's first rows, rendered with qa as training sees them.
    assert row_codes(at, 1)[0] == ("Q: What is 0 plus 0?\nA:", " It is 0.", " Maybe 1.")
    stats = frames(at, "p50")[0]
    assert stats.loc["chosen", "max"] == expected["tokens"]["chosen"]["max"]
    # The equivalent command names the resolved file.
    assert any(c.value.startswith(f"dpolab data prepare --dataset {pairs.resolve()} ") for c in at.code)


def test_a_source_that_cannot_be_read_is_one_line_naming_the_path(open_data, tiny_llama, tmp_path):
    missing = tmp_path / "nowhere" / "missing.jsonl"
    at = use(open_data(), tiny_llama, missing)
    assert len(at.error) == 1
    message = at.error[0].value
    assert str(missing) in message and "\n" not in message
    assert at.button(key="prepare_start").disabled
    assert any(f"Resolved: `{missing}`" == c.value for c in at.caption)
    # A relative path is resolved against the studio's folder, and shown so.
    at.text_input(key="data_path").set_value("no-such-dir/rows.jsonl").run()
    assert str(Path("no-such-dir/rows.jsonl").resolve()) in at.error[0].value


def test_prepare_runs_as_a_job_and_shows_the_report(open_data, tiny_llama, pairs, tmp_path):
    root = tmp_path / "runs"
    at = use(open_data(), tiny_llama, pairs)
    at.text_input(key="prepare_name").set_value("my-data").run()
    at.button(key="prepare_start").click().run()
    assert not at.exception, at.exception
    [job] = list_jobs(root)
    assert job.kind == "prepare" and job.target == (root / "my-data").resolve() and job.active
    assert any("prepare** job" in m.value and ("running" in m.value or "starting" in m.value) for m in at.markdown)
    assert at.button(key="prepare_start").disabled  # no second job for the same folder
    done = wait_job(job, timeout=120)
    assert done.status == "finished", done
    at.run()
    prepared = load_prepared(root / "my-data")
    report = prepared.report
    assert any(s.value.startswith(f"Prepared `{root / 'my-data'}`: {report['rows_kept']} of {report['rows_in']} rows")
               for s in at.success)
    counts = frames(at, "reason")[-1]
    assert dict(zip(counts["reason"], counts["rows"])) == report["dropped"] and report["rows_dropped"] == 6
    # The job prepared exactly what the form said.
    assert prepared.config == DataConfig(dataset=str(pairs.resolve()), tokenizer=str(tiny_llama))
    links = at.get("page_link")
    assert links and "Train on this data" in str(links[0].proto)
    listed = frames(at, "tokenizer")[-1]
    assert listed.to_dict("records") == [{"name": "my-data", "status": "prepared", "source": str(pairs.resolve()),
                                          "kept": report["rows_kept"], "of": report["rows_in"], "template": "qa",
                                          "tokenizer": str(tiny_llama)}]
    # Prepare again needs "Replace".
    assert at.button(key="prepare_start").disabled
    at.checkbox(key="prepare_overwrite").check().run()
    assert not at.button(key="prepare_start").disabled
    assert any(c.value.endswith("--overwrite") for c in at.code)
    # A prepared folder as the source: its report, nothing to prepare.
    at.text_input(key="data_path").set_value(str(root / "my-data")).run()
    assert any("is a prepared folder already" in i.value for i in at.info)
    assert at.button(key="prepare_start").disabled


def test_a_failed_prepare_job_shows_its_error(open_data, tiny_llama, tmp_path):
    root = tmp_path / "runs"
    out = root / "data-demo"
    job = start_job(root, "prepare", out, ["data", "prepare", "--dataset", str(tmp_path / "gone.jsonl"), "--out",
                                           str(out)])
    assert wait_job(job, timeout=60).status == "failed"
    at = open_data()
    errors = [e.value for e in at.error]
    assert any(e.startswith("prepare failed: ") and "gone.jsonl" in e for e in errors), errors
    assert any("**failed**" in m.value for m in at.markdown)


def test_uploads_stay_under_the_runs_root(tmp_path):
    root = tmp_path / "runs"
    data = json.dumps(ROWS[0]).encode() + b"\n"
    path = save_upload(root, "../../etc/pairs.jsonl.gz", data)
    assert path.is_relative_to(root.resolve() / "uploads") and path.name == "pairs.jsonl.gz"
    assert path.read_bytes() == data
    assert save_upload(root, "pairs.jsonl.gz", data) == path  # the same bytes: the same file
    other = save_upload(root, "pairs.jsonl.gz", data + data)
    assert other != path and path.read_bytes() == data  # another upload of that name keeps the first
    assert sorted(p.name for p in (root / "uploads").rglob("*") if p.is_file()) == ["pairs.jsonl.gz"] * 2
