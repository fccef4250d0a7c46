"""The studio's Runs page and the status of runs and sweeps under a runs root (`dpolab.folders.catalog`): real run
folders written by real `dpolab train` jobs on a tiny model, the page driven headless by AppTest."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest

st = pytest.importorskip("streamlit")
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from dpolab.app.common import STUDIO  # noqa: E402
from dpolab.folders.catalog import RECENT_S, scan, status_of  # noqa: E402
from dpolab.folders.run import RunFolder  # noqa: E402
from dpolab.folders.sweep import SweepFolder  # noqa: E402
from dpolab.jobs import (  # noqa: E402
    find_job,
    list_jobs,
    log_tail,
    read_job,
    start_job,
    stop_job,
    wait_job,
)
from tests.test_jobs import wait_until  # noqa: E402

CURVES = {"Training loss": "loss", "Reward accuracy": "rewards/accuracies", "Reward margin": "rewards/margins",
          "Eval loss": "eval_loss"}


@pytest.fixture(scope="module")
def pairs(arithmetic_pairs) -> Path:
    return arithmetic_pairs


def train_argv(model: Path, data: Path, out: Path, lr: str = "1e-3", steps: int | None = None) -> list[str]:
    # About 4 steps an epoch, 2 epochs: 2 evaluations.
    argv = ["train", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--batch-size", "6",
            "--epochs", "2", "--lr", lr, "--seed", "5", "--precision", "fp32"]
    return argv + (["--max-steps", str(steps)] if steps else [])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_llama, pairs) -> Path:
    """A runs root with two finished runs (different learning rates), trained by jobs side by side."""
    root = tmp_path_factory.mktemp("runs")
    jobs = [start_job(root, "train", root / name, train_argv(tiny_llama, pairs, root / name, lr))
            for name, lr in (("alpha", "1e-3"), ("beta", "3e-4"))]
    for job in jobs:
        done = wait_job(job, timeout=300)
        assert done.status == "finished", log_tail(done)
    return root


def open_studio(monkeypatch, root: Path, page: str) -> AppTest:
    """The studio on `root` (as `dpolab app --runs-dir ROOT` starts it), switched to views/`page`."""
    monkeypatch.setattr(sys, "argv", [str(STUDIO), "--runs-dir", str(root)])
    at = AppTest.from_file(str(STUDIO), default_timeout=120)
    at.run()
    at.switch_page(f"views/{page}").run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def open_runs(monkeypatch):
    return lambda root: open_studio(monkeypatch, root, "runs.py")


def table(at: AppTest):
    frame = at.dataframe[0].value
    return {row["name"]: row for row in frame.to_dict("records")}


def charts(at: AppTest) -> dict[str, dict[tuple[str, float], float]]:
    """The page's line charts by y title: {(run, step): value}."""
    found = {}
    for element in at.main:
        if type(element).__name__ == "UnknownElement" and element.type == "vega_lite_chart":
            spec = json.loads(element.proto.spec)
            title = next(t for t in CURVES if t in json.dumps(spec))
            frame = convert_arrow_bytes_to_pandas_df(element.proto.datasets[0].data.data)
            value = next(c for c in frame.columns if c not in ("step", "run"))
            found[title] = {(r["run"], float(r["step"])): r[value] for r in frame.to_dict("records")}
    return found


# ------------------------------------------------------------------------------------------------ status function
def _fake_job(root: Path, kind: str, target: Path) -> None:
    """A job record that reads as starting (no supervisor yet): active for 30 s."""
    folder = root / ".jobs" / f"fake-{kind}-{target.name}"
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"kind": kind, "target": str(target.resolve()), "argv": [],
                                                 "started": time.time(), "pid": None}))


def test_status_of_finished_copied_and_starting_folders(tmp_path, finished):
    root = tmp_path / "runs"
    root.mkdir()
    for name in ("done", "cli-stopped", "cli-running", "cli-crashed"):
        shutil.copytree(finished / "alpha", root / name)
    for name in ("cli-stopped", "cli-running", "cli-crashed"):
        RunFolder(root / name).metrics_file.unlink()
    shutil.rmtree(RunFolder(root / "cli-crashed").checkpoints_dir)
    old = time.time() - 2 * RECENT_S
    for name in ("done", "cli-stopped", "cli-crashed"):
        os.utime(RunFolder(root / name).progress_file, (old, old))
    os.utime(RunFolder(root / "cli-running").progress_file)  # a `dpolab train` in a terminal, logging now
    _fake_job(root, "eval", root / "done")  # evaluating a finished run does not make it running
    _fake_job(root, "train", root / "new")  # a run whose folder its job has not written yet
    assert status_of(finished, finished / "alpha") == "finished"
    assert {name: status_of(root, root / name) for name in ("done", "cli-stopped", "cli-running", "cli-crashed", "new")} \
        == {"done": "finished", "cli-stopped": "stopped", "cli-running": "running", "cli-crashed": "failed",
            "new": "running"}
    assert status_of(root, root / "elsewhere") is None
    entries = {e.name: e for e in scan(root)}
    assert set(entries) == {"done", "cli-stopped", "cli-running", "cli-crashed", "new"}
    assert entries["new"].kind == "run" and entries["new"].model is None
    assert entries["done"].job is None  # the eval job is not the run's writer


def test_status_of_sweep_folders_without_a_job(tmp_path):
    """Sweeps run from a terminal: its table (trials.csv) written after the last trial means finished."""
    root = tmp_path / "runs"
    old = time.time() - 2 * RECENT_S
    for name, journal, table in (("done", old - 10, old), ("resumed", None, old - 10), ("cut", old, None),
                                 ("live", None, None)):
        folder = SweepFolder(root / name)
        folder.path.mkdir(parents=True)
        folder.config_file.write_text("n_trials: 2\n")
        folder.journal_file.write_text("")
        if journal is not None:
            os.utime(folder.journal_file, (journal, journal))
        if table is not None:
            folder.trials_csv.write_text("trial\n")
            os.utime(folder.trials_csv, (table, table))
    assert {e.name: (e.kind, e.status) for e in scan(root)} == {
        "done": ("sweep", "finished"), "resumed": ("sweep", "running"), "cut": ("sweep", "stopped"),
        "live": ("sweep", "running")}


def test_status_from_real_jobs_running_stopped_failed(tmp_path, tiny_llama, pairs):
    root = tmp_path / "runs"
    failing = start_job(root, "train", root / "broken", train_argv(tiny_llama, tmp_path / "missing.jsonl",
                                                                   root / "broken"))
    long = start_job(root, "train", root / "long", train_argv(tiny_llama, pairs, root / "long", steps=100000))
    run = RunFolder(root / "long")
    try:
        wait_until(lambda: (p := run.read_progress()) and p.step >= 1, what="the first step")
        assert status_of(root, root / "long") == "running"
        assert wait_job(failing, timeout=120).status == "failed"
        assert status_of(root, root / "broken") == "failed"  # its folder was never written: the job says it
        entries = {e.name: e for e in scan(root)}
        assert entries["long"].status == "running" and entries["long"].steps >= 1
        assert entries["long"].model == str(tiny_llama) and entries["long"].method == "dpo"
    finally:
        stop_job(read_job(long.folder))
    assert wait_job(long, timeout=120).status == "stopped", log_tail(long)
    assert status_of(root, root / "long") == "stopped" and run.has_checkpoints()


# ------------------------------------------------------------------------------------------------ the page
def test_empty_runs_root_points_at_the_train_page(tmp_path, open_runs):
    at = open_runs(tmp_path / "nothing-yet")
    assert not at.dataframe
    assert "No runs or sweeps under" in at.info[0].value and str(tmp_path / "nothing-yet") in at.info[0].value
    links = [e for e in at.main if type(e).__name__ == "PageLink"]
    assert [link.proto.label for link in links] == ["Go to Train", "Go to Sweep"]


def test_finished_runs_table_equals_their_metrics(finished, open_runs):
    at = open_runs(finished)
    rows = table(at)
    assert set(rows) == {"alpha", "beta"}
    for name, row in rows.items():
        metrics = RunFolder(finished / name).read_metrics()
        assert row["kind"] == "run" and row["status"] == "finished" and row["method"] == "dpo"
        assert row["best eval loss"] == pytest.approx(metrics["best"]["loss"], abs=0)
        assert row["reward accuracy"] == pytest.approx(metrics["best"]["rewards/accuracies"], abs=0)
        assert row["steps"] == metrics["global_step"] > 0
        assert row["data"].endswith("pairs.jsonl")
    assert rows["alpha"]["best eval loss"] != rows["beta"]["best eval loss"]  # two different runs
    assert not charts(at)  # nothing selected: no curves yet


def test_overlay_of_two_runs_equals_their_histories(finished, open_runs):
    at = open_runs(finished)
    at.multiselect(key="runs_overlay").set_value(["alpha", "beta"]).run()
    assert not at.exception, at.exception
    got = charts(at)
    assert set(got) == set(CURVES)
    for title, key in CURVES.items():
        expected = {(name, float(p["step"])): p[key] for name in ("alpha", "beta")
                    for p in RunFolder(finished / name).read_log_history() if key in p}
        assert got[title] == pytest.approx(expected), title
        assert len({run for run, _ in got[title]}) == 2
    assert len(got["Eval loss"]) == 4  # 2 evaluations each


def test_a_running_and_a_failed_job_on_the_page(tmp_path, tiny_llama, pairs, open_runs):
    root = tmp_path / "runs"
    failing = start_job(root, "train", root / "broken", train_argv(tiny_llama, tmp_path / "missing.jsonl",
                                                                   root / "broken"))
    long = start_job(root, "train", root / "long", train_argv(tiny_llama, pairs, root / "long", steps=100000))
    try:
        wait_until(lambda: (p := RunFolder(root / "long").read_progress()) and p.step >= 2, what="step 2")
        wait_job(failing, timeout=120)
        at = open_runs(root)
        rows = table(at)
        assert rows["long"]["status"] == "running" and rows["long"]["steps"] >= 2
        assert rows["broken"]["status"] == "failed"
        at.selectbox(key="runs_detail").set_value("long").run()
        bars = [p for p in at.main if type(p).__name__ == "Progress"]
        assert bars and "step " in bars[0].proto.text and "/100000" in bars[0].proto.text
        assert at.button(key="runs_eval_start").disabled  # a running run cannot be evaluated yet
        at.selectbox(key="runs_detail").set_value("broken").run()
        logs = "\n".join(c.value for c in at.code)
        assert "missing.jsonl" in logs  # the failed job's log, with its reason
    finally:
        stop_job(read_job(long.folder))
        wait_job(long, timeout=120)


def test_eval_job_from_the_page_and_its_report_inline(finished, open_runs):
    at = open_runs(finished)
    at.selectbox(key="runs_detail").set_value("beta").run()
    at.number_input(key="eval_n_prompts").set_value(1)
    at.number_input(key="eval_max_new_tokens").set_value(4)
    at.button(key="runs_eval_start").click().run()
    assert not at.exception, at.exception
    job = find_job(finished, finished / "beta")
    assert job is not None and job.kind == "eval"
    assert job.argv == ["eval", str((finished / "beta").resolve()), "--n-prompts", "1", "--max-new-tokens", "4"]
    bars = [p for p in at.main if type(p).__name__ == "Progress"]
    assert bars and "dpolab eval" in bars[0].proto.text  # the job panel while it runs
    done = wait_job(job, timeout=300)
    assert done.status == "finished", log_tail(done)
    assert status_of(finished, finished / "beta") == "finished"
    at.run()
    frames = [e for e in at.main if type(e).__name__ == "UnknownElement" and e.type == "iframe"]
    report = (RunFolder(finished / "beta").eval_dir / "report.html").read_text()
    assert len(frames) == 1 and frames[0].proto.srcdoc == report
    assert [j.kind for j in list_jobs(finished)].count("eval") == 1
