"""The studio's Sweep page, headless (AppTest): the form and its YAML, one-line errors, a real 2-trial sweep on a tiny
model launched from the page and watched to its end with best/ marked, Stop and Resume of a running sweep."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

st = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from dpolab.folders.catalog import status_of  # noqa: E402
from dpolab.models import model_folder  # noqa: E402
from dpolab.folders.sweep import SweepFolder  # noqa: E402
from dpolab.jobs import find_job, log_tail, read_job, stop_job, wait_job  # noqa: E402
from dpolab.sweep import SweepConfig  # noqa: E402
from dpolab.sweep.report import load_sweep, trial_rows  # noqa: E402
from tests.test_studio_runs import open_studio  # noqa: E402


@pytest.fixture(scope="module")
def pairs(arithmetic_pairs) -> Path:
    return arithmetic_pairs


@pytest.fixture
def open_sweep(monkeypatch):
    return lambda root: open_studio(monkeypatch, root, "sweep.py")


def fill(at: AppTest, model: Path, data: Path, lrs: str = "1e-4, 2e-3", trials: int = 2, steps: int = 4,
         name: str = "lr") -> AppTest:
    at.text_input(key="sweep_name").set_value(name)
    at.text_input(key="sweep_model").set_value(str(model))
    at.text_input(key="sweep_dataset").set_value(str(data))
    at.text_input(key="sweep_space_learning_rate_values").set_value(lrs)
    at.number_input(key="sweep_n_trials").set_value(trials)
    at.number_input(key="sweep_max_steps").set_value(steps).run()
    assert not at.exception, at.exception
    return at


def preview(at: AppTest) -> dict:
    codes = [c.value for c in at.code if c.language == "yaml"]
    assert len(codes) == 1
    return yaml.safe_load(codes[0])


def trials_frame(at: AppTest):
    return next(d for d in at.dataframe if "trial" in d.value.columns).value


def test_empty_root_form_preview_is_the_sweep_config(tmp_path, open_sweep, tiny_llama, pairs):
    root = tmp_path / "runs"
    at = open_sweep(root)
    assert "No sweeps under the runs root yet" in at.info[0].value
    fill(at, tiny_llama, pairs, lrs="1e-4, 2e-3")
    at.checkbox(key="sweep_space_beta").check().run()
    at.text_input(key="sweep_space_beta_values").set_value("0.05..0.5").run()
    assert "search_space.beta: a float range has no grid" in at.error[0].value  # grid needs listed values
    at.selectbox(key="sweep_sampler").set_value("tpe").run()
    tree = preview(at)
    assert tree["sweep_dir"] == str(root.resolve() / "lr")
    assert tree["search_space"] == {"learning_rate": {"type": "categorical", "choices": [1e-4, 2e-3]},
                                    "beta": {"type": "float", "low": 0.05, "high": 0.5}}
    assert tree["base"] == {"model": str(tiny_llama), "data": {"dataset": str(pairs), "template": "qa",
                                                               "max_length": 512, "limit": 120},
                            "method": "dpo", "eval_every": "epoch", "max_steps": 4}
    assert (tree["sampler"], tree["n_trials"], tree["objective"]) == ("tpe", 2, "eval_loss")
    SweepConfig.model_validate(tree)  # what Launch writes is a config `dpolab sweep` reads
    assert not at.button(key="sweep_launch").disabled


@pytest.mark.parametrize("change, message", [
    (lambda at: at.text_input(key="sweep_space_learning_rate_values").set_value("1e-4, fast"),
     "search space learning_rate: '1e-4, fast' is not a list of floats"),
    (lambda at: at.number_input(key="sweep_n_trials").set_value(1), "grid of 2 points is too large for n_trials=1"),
    (lambda at: at.text_input(key="sweep_name").set_value("../up"), "name: use letters, digits"),
    (lambda at: at.checkbox(key="sweep_space_learning_rate").uncheck(), "search_space is empty"),
])
def test_form_errors_are_one_line_and_block_launch(tmp_path, open_sweep, tiny_llama, pairs, change, message):
    at = fill(open_sweep(tmp_path / "runs"), tiny_llama, pairs)
    change(at)
    at.run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
    assert at.button(key="sweep_launch").disabled
    assert not [c for c in at.code if c.language == "yaml"]


def test_pasted_yaml_gets_the_runs_root_as_its_folder(tmp_path, open_sweep, tiny_llama, pairs):
    root = tmp_path / "runs"
    at = open_sweep(root)
    at.radio(key="sweep_source").set_value("YAML").run()
    assert "search_space" in at.text_area(key="sweep_yaml").value  # starts from the shipped example
    pasted = {"sweep_dir": "/somewhere/else", "sampler": "random", "n_trials": 3,
              "search_space": {"beta": {"type": "categorical", "choices": [0.1, 0.2]}},
              "base": {"model": str(tiny_llama), "data": {"dataset": str(pairs)}}}
    at.text_input(key="sweep_name").set_value("pasted")
    at.text_area(key="sweep_yaml").set_value(yaml.safe_dump(pasted)).run()
    assert preview(at) == {**pasted, "sweep_dir": str(root.resolve() / "pasted")}
    at.text_area(key="sweep_yaml").set_value("search_space: [oops").run()
    assert "not valid YAML" in at.error[0].value and at.button(key="sweep_launch").disabled


def test_two_trial_sweep_from_the_page_to_best(tmp_path, open_sweep, tiny_llama, pairs):
    root = tmp_path / "runs"
    at = fill(open_sweep(root), tiny_llama, pairs)
    at.button(key="sweep_launch").click().run()
    assert not at.exception, at.exception
    sweep_dir = root.resolve() / "lr"
    job = find_job(root, sweep_dir)
    assert job is not None and job.kind == "sweep"
    assert job.argv == ["sweep", "--config", str(root.resolve() / "lr.sweep.yaml")]
    assert at.selectbox(key="sweep_pick").value == "lr"
    assert yaml.safe_load((root / "lr.sweep.yaml").read_text()) == preview(at)
    done = wait_job(job, timeout=300)
    assert done.status == "finished", log_tail(done)

    at.run()
    assert not at.exception, at.exception
    frame = trials_frame(at)
    cfg, study = load_sweep(sweep_dir)
    rows = trial_rows(cfg, study)
    best = SweepFolder(sweep_dir).read_best()
    assert len(frame) == 2 == len(rows) and set(frame["state"]) <= {"complete", "pruned"}
    assert list(frame["trial"]) == [r["trial"] for r in rows]
    assert list(frame["state"]) == [r["state"].lower() for r in rows]
    assert sorted(frame["learning_rate"]) == [1e-4, 2e-3]
    with open(sweep_dir / "trials.csv") as handle:  # the table the sweep itself wrote at its end
        written = list(csv.DictReader(handle))
    assert [(int(r["trial"]), r["state"].lower(), float(r["value"])) for r in written] == \
        list(zip(frame["trial"], frame["state"], frame["objective"]))
    marked = frame[frame["best"] != ""]
    assert list(marked["trial"]) == [best["trial"]] and list(marked["best"]) == ["★ best/"]
    assert marked["objective"].iloc[0] == pytest.approx(best["value"])
    assert SweepFolder.is_sweep_with_best(sweep_dir)
    banner = at.success[0].value
    assert f"Best: trial {best['trial']}" in banner and str(sweep_dir / "best") in banner
    assert status_of(root, sweep_dir) == "finished"
    assert not [b for b in at.button if b.key in ("sweep_stop", "sweep_resume")]  # finished: nothing to stop/resume

    # One click to chat with the best trial: a link to Chat with ?model=the sweep, which Chat preselects.
    link = next(link.proto for link in at.get("page_link") if link.proto.label == "Chat with the best trial")
    assert link.page == "chat" and link.query_string == f"model={quote(str(sweep_dir), safe='')}"
    newer = root / "newer"  # the chat page lists the newest model first: without the link it would open this one
    shutil.copytree(model_folder(sweep_dir), newer / "model")
    at.query_params["model"] = str(sweep_dir)
    at.switch_page("views/chat.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="model_choice").value == str(root / "lr")  # the chat page's own spelling of it


def test_stop_and_resume_a_running_sweep(tmp_path, open_sweep, tiny_llama, pairs):
    root = tmp_path / "runs"
    at = fill(open_sweep(root), tiny_llama, pairs, steps=100000)
    at.button(key="sweep_launch").click().run()
    sweep_dir = root.resolve() / "lr"
    job = find_job(root, sweep_dir)
    try:
        deadline = time.monotonic() + 120
        while not ((p := SweepFolder(sweep_dir).trial(0).read_progress()) and p.step >= 1):
            assert time.monotonic() < deadline and read_job(job.folder).active, log_tail(read_job(job.folder))
            time.sleep(0.2)
        at.run()
        assert trials_frame(at)["state"].tolist() == ["running"]
        assert any("trial 0: step" in p.proto.text for p in at.main if type(p).__name__ == "Progress")
        at.button(key="sweep_stop").click().run()
        assert wait_job(job, timeout=60).status == "stopped"
        at.run()
        assert status_of(root, sweep_dir) == "stopped" and "**stopped**" in at.markdown[0].value
        at.button(key="sweep_resume").click().run()
        assert not at.exception, at.exception
        resumed = find_job(root, sweep_dir)
        assert resumed.id != job.id and resumed.active and resumed.argv == job.argv
    finally:
        for j in (job, find_job(root, sweep_dir)):
            if j is not None:
                stop_job(read_job(j.folder))
                wait_job(j, timeout=60)
