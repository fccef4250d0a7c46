"""The CLI as a user runs it: help texts, `data prepare` + `data inspect`, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _dpolab(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "dpolab", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("command", [[], ["data"], ["data", "prepare"], ["data", "inspect"], ["train"], ["eval"],
                                     ["sweep"], ["export"], ["push"], ["app"], ["model", "fetch"]])
def test_every_command_explains_itself(command):
    run = _dpolab(*command, "--help")
    assert run.returncode == 0, run.stderr
    assert "Usage:" in run.stdout and len(run.stdout) > 200


def test_prepare_then_inspect_the_demo_set(tmp_path, embedded_dir):
    out = tmp_path / "prepared"
    run = _dpolab("data", "prepare", "--dataset", "demo", "--out", str(out), "--test-size", "0.2", "--seed", "7")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "rows in / kept / dropped" in run.stdout
    saved = json.loads((out / "data_report.json").read_text())
    inspected = _dpolab("data", "inspect", str(out), "--json")
    assert inspected.returncode == 0 and json.loads(inspected.stdout) == saved
    assert saved["test"] == round(0.2 * saved["rows_kept"]) and saved["seed"] == 7
    again = _dpolab("data", "prepare", "--dataset", "demo", "--out", str(out))
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_bad_input_is_one_line_without_traceback(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n')
    run = _dpolab("data", "prepare", "--dataset", str(bad), "--out", str(tmp_path / "out"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "pairs.jsonl:1: expected columns 'chosen' and 'rejected'" in " ".join(run.stderr.split())


def _one_line_error(run, *needles, code=1):
    assert run.returncode == code, (run.returncode, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, run.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_fp16_on_a_cpu_is_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("fp16 runs on a GPU")
    run = _dpolab("train", "--precision", "fp16", "-o", str(tmp_path / "run"), "--max-steps", "1")
    _one_line_error(run, "--precision fp16", "GPU")


def test_output_paths_that_are_files_are_one_line(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("mine")
    _one_line_error(_dpolab("data", "prepare", "--out", str(file)), "--out", "is a file")
    _one_line_error(_dpolab("train", "-o", str(file), "--max-steps", "1"), "--output-dir", "is a file")
    assert file.read_text() == "mine"


def test_save_every_steps_with_eval_every_epoch_is_refused_at_validation(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("save_every: steps\nsave_steps: 5\n")
    _one_line_error(_dpolab("train", "-c", str(config), "--dry-run"), "save_every=steps with eval_every=epoch")


def test_negative_max_steps_is_refused():
    _one_line_error(_dpolab("train", "--max-steps", "-3", "--dry-run"), "max_steps")


def test_sweep_report_on_a_folder_that_is_not_a_sweep_is_one_line(tmp_path):
    _one_line_error(_dpolab("sweep", "--report", str(tmp_path)), "not a sweep folder")


def test_eval_of_a_missing_folder_names_it(tmp_path):
    _one_line_error(_dpolab("eval", str(tmp_path / "runs" / "nothing")), "no such run or model folder")


def test_app_refuses_a_model_it_cannot_load_before_starting_a_server(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    run = _dpolab("app", str(tmp_path / "broken"), "--port", "8599", timeout=60)
    _one_line_error(run, "missing model.safetensors")
    assert "serving on" not in run.stderr
    _one_line_error(_dpolab("app", str(tmp_path / "runs" / "missing"), timeout=60), "no such run or model folder")


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    import typer

    from dpolab.cli._base import guarded
    from dpolab.errors import UsageError

    def broken():
        raise KeyError("boom")

    with pytest.raises(typer.Exit) as exit_info:
        guarded(broken)()
    assert exit_info.value.exit_code == 1
    assert "unexpected KeyError" in capsys.readouterr().err
    with pytest.raises(typer.Exit) as exit_info:
        guarded(lambda: (_ for _ in ()).throw(UsageError("bad usage")))()
    assert exit_info.value.exit_code == 2
    monkeypatch.setenv("DPOLAB_DEBUG", "1")
    with pytest.raises(KeyError):
        guarded(broken)()


def test_gradient_checkpointing_option():
    run = _dpolab("train", "-c", "configs/demo.yaml", "--gradient-checkpointing", "on", "--dry-run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "gradient_checkpointing: true" in run.stdout and "estimated_peak_without_checkpointing" in run.stdout
    _one_line_error(_dpolab("train", "--gradient-checkpointing", "sometimes", "--dry-run"), "gradient_checkpointing",
                    "auto, on or off")
