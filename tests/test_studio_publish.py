"""The studio's Publish page, headless (AppTest): export a real tiny run as a job with its card shown, a dry run
before any push, and a canary token that must not appear in the page, the jobs' records and logs, or any file."""

from __future__ import annotations

from pathlib import Path

import pytest

st = pytest.importorskip("streamlit")
from huggingface_hub import ModelCard
from streamlit.testing.v1 import AppTest

from dpolab.config import DataConfig, TrainConfig
from dpolab.data.prepare import prepare_data
from dpolab.engine.train import run_training
from dpolab.jobs import list_jobs, log_tail, start_job, wait_job
from dpolab.publish import export_model, model_card
from tests.conftest import write_jsonl
from tests.test_publish import FakeHub
from tests.test_studio_data import open_studio

CANARY = "hf_CanaryToken_7d1e5f0a9b3c2e4d6f8a"  # a fake token: its only job is to be searched for
REPO = "alice/tiny-dpo"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama, tokenizer) -> Path:
    """A runs root holding one real (tiny) finished run, tiny-run."""
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Maybe {3 * i + 1}."}
            for i in range(16)]
    base = tmp_path_factory.mktemp("publish")
    src = write_jsonl(base / "pairs.jsonl", rows)
    prepare_data(DataConfig(dataset=str(src), tokenizer=str(tiny_llama), test_size=0.25), base / "data",
                 tokenizer=tokenizer)
    root = base / "runs"
    run_training(TrainConfig(output_dir=root / "tiny-run", model=str(tiny_llama), data=DataConfig(dataset=str(base / "data")),
                             epochs=1, batch_size=4, learning_rate=1e-3, report_to=[], seed=3, save_total_limit=1))
    return root


def open_page(monkeypatch, root: Path) -> AppTest:
    return open_studio(monkeypatch, root, "views/publish.py")


def rendered(at: AppTest) -> bytes:
    """Every element the page sent (its protobuf messages), as bytes to search."""
    out, stack = [], [at._tree]
    while stack:
        node = stack.pop()
        proto = getattr(node, "proto", None)
        if proto is not None:
            out.append(proto.SerializeToString())
        stack.extend(getattr(node, "children", {}).values())
    return b"\n".join(out)


def clean(at: AppTest) -> AppTest:
    """`at` after a run: no exception, and the canary in none of its elements."""
    assert not at.exception, at.exception
    assert CANARY.encode() not in rendered(at)
    return at


def markdown_of(at: AppTest) -> list[str]:
    return [m.value for m in at.markdown]


def test_empty_runs_root(monkeypatch, tmp_path):
    at = open_page(monkeypatch, tmp_path / "runs")
    assert any("No trained model under" in i.value for i in at.info)
    assert any("Nothing exported yet" in i.value for i in at.info)
    assert not [b for b in at.button if b.key in ("export_start", "push_dry_run", "push_start")]
    assert not (tmp_path / "runs").exists()


def test_export_job_writes_the_card_shown(monkeypatch, runs):
    at = open_page(monkeypatch, runs)
    run = str((runs / "tiny-run").resolve())
    assert at.selectbox(key="publish_model").options == ["tiny-run (run)"]
    assert at.selectbox(key="publish_model").value == run
    # Before the export: the card export will write, rendered.
    card = ModelCard(model_card(run))
    assert card.text.strip() in [m.strip() for m in markdown_of(at)]
    at.text_input(key="export_name").set_value("tiny-export").run()
    at.button(key="export_start").click().run()
    out = (runs / "exports" / "tiny-export").resolve()
    [job] = [j for j in list_jobs(runs) if j.kind == "export" and j.target == out]
    assert job.target == out and job.argv == ["export", run, "--out", str(out)]
    assert at.button(key="export_start").disabled  # running: no second export into the same folder
    assert any("export** job" in m and ("running" in m or "starting" in m) for m in markdown_of(at))
    assert wait_job(job, timeout=120).status == "finished", log_tail(job)
    at.run()
    assert not at.exception, at.exception
    readme = (out / "README.md").read_text()
    assert readme == model_card(run)
    assert ModelCard(readme).text.strip() in [m.strip() for m in markdown_of(at)]
    assert any(s.value.startswith(f"Exported to `{out}`") for s in at.success)
    # Export again into it only with "Replace".
    assert at.button(key="export_start").disabled
    # The push section offers the export.
    assert at.selectbox(key="push_source").value == str(out)


def test_a_failed_export_job_shows_its_one_line_error(monkeypatch, runs):
    out = runs / "exports" / "tiny-run-export"  # the name the page proposes for tiny-run
    job = start_job(runs, "export", out, ["export", str(runs / "no-such-run"), "--out", str(out)])
    assert wait_job(job, timeout=120).status == "failed"
    at = open_page(monkeypatch, runs)
    assert at.text_input(key="export_name").value == "tiny-run-export"
    errors = [e.value for e in at.error]
    assert any(e.startswith("export failed: ") and "no-such-run" in e and "\n" not in e for e in errors), errors
    assert any("**failed**" in m for m in markdown_of(at))
    # The form checks what it can before a job starts.
    at.radio(key="export_format").set_value("gguf").run()
    at.multiselect(key="export_quants").set_value([]).run()
    assert at.button(key="export_start").disabled
    assert any("GGUF weights: pick at least one" in c.value for c in at.caption)


def test_dry_run_first_then_push_and_the_token_appears_nowhere(monkeypatch, runs, tmp_path):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)  # the push job inherits it: our local imitation of the Hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login of this machine
    monkeypatch.delenv("HF_TOKEN", raising=False)
    folder = export_model(runs / "tiny-run", runs / "exports" / "for-push")
    try:
        at = open_page(monkeypatch, runs)
        at.selectbox(key="push_source").set_value(str(folder.resolve())).run()
        at.text_input(key="push_repo").set_value(REPO).run()
        assert at.text_input(key="push_token").proto.type == at.text_input(key="push_token").proto.PASSWORD
        assert at.button(key="push_start").disabled  # no push before a dry run
        at.text_input(key="push_token").input(CANARY)
        clean(at.button(key="push_dry_run").click().run())
        assert not at.exception, at.exception
        assert at.text_input(key="push_token").value == ""  # used (or not needed): forgotten
        [dry] = [j for j in list_jobs(runs) if j.kind == "push"]
        assert dry.argv == ["push", str(folder.resolve()), "--repo", REPO, "--dry-run"]
        assert wait_job(dry, timeout=120).status == "finished", log_tail(dry)
        clean(at.run())
        assert any(s.value.startswith("Dry run: ") and REPO in s.value for s in at.success)
        files = next(c.value for c in at.code if "README.md" in c.value and "model.safetensors" in c.value)
        assert "config.json" in files
        assert f'model_id = "{REPO}"' in "\n".join(markdown_of(at))  # the card as it will be on the Hub
        assert not at.button(key="push_start").disabled
        assert hub.requests == []  # a dry run sends nothing

        # A refused token: the one-line error, without the token.
        hub.status = 401
        at.text_input(key="push_token").input(CANARY)
        clean(at.button(key="push_start").click().run())
        [failed] = [j for j in list_jobs(runs) if j.kind == "push" and "--dry-run" not in j.argv]
        assert wait_job(failed, timeout=120).status == "failed"
        clean(at.run())
        assert any("refused the token (401)" in e.value for e in at.error), [e.value for e in at.error]
        assert any(r["headers"].get("authorization") == f"Bearer {CANARY}" for r in hub.requests)  # it did go

        # The real push.
        hub.status, hub.requests = 200, []
        at.text_input(key="push_token").input(CANARY)
        clean(at.button(key="push_start").click().run())
        pushed = next(j for j in list_jobs(runs) if j.kind == "push")
        assert pushed.id != failed.id and pushed.argv == ["push", str(folder.resolve()), "--repo", REPO]
        assert wait_job(pushed, timeout=120).status == "finished", log_tail(pushed)
        clean(at.run())
        assert any(s.value.startswith("pushed ") and REPO in s.value for s in at.success)
        assert hub.commits() and all(r["headers"].get("authorization") == f"Bearer {CANARY}" for r in hub.requests
                                     if r["method"] == "POST"), [(r["method"], r["path"]) for r in hub.requests]

        # The canary: nowhere in the page, the session's widgets, the jobs (job.json, logs) or any file written.
        page = rendered(at)
        assert f"dpolab push {folder.resolve()} --repo {REPO}".encode() in page  # the search sees the page's text
        assert CANARY.encode() not in page
        assert at.text_input(key="push_token").value == ""
        written = [p for p in runs.rglob("*") if p.is_file()]
        assert any(p.name == "job.json" for p in written) and any(p.name == "log.txt" for p in written)
        for path in written:
            assert CANARY.encode() not in path.read_bytes(), path
        for job in list_jobs(runs):
            assert CANARY not in job.command and CANARY not in log_tail(job, 10**6)
        assert not (tmp_path / "hf-home").exists() or not any(
            CANARY.encode() in p.read_bytes() for p in (tmp_path / "hf-home").rglob("*") if p.is_file())
    finally:
        hub.server.shutdown()
