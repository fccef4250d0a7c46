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
