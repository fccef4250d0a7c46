"""Background jobs (`dpolab.jobs`): real `dpolab` commands in their own sessions, watched through files only."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpolab.folders.run import RunFolder
from dpolab.jobs import JobError, find_job, list_jobs, log_progress, log_tail, read_job, start_job, stop_job, wait_job


@pytest.fixture(scope="module")
def pairs(arithmetic_pairs) -> Path:
    return arithmetic_pairs


def train_argv(model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["train", "--model", str(model), "--dataset", str(data), "--output-dir", str(out), "--max-steps", str(steps),
            "--batch-size", "4", "--lr", "1e-3", "--seed", "5", "--precision", "fp32"]


def wait_until(condition, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def test_prepare_job_runs_detached_and_is_recorded(tmp_path, tiny_llama, pairs):
    out = tmp_path / "runs" / "data"
    job = start_job(tmp_path / "runs", "prepare", out, ["data", "prepare", "--dataset", str(pairs), "--out", str(out),
                                                         "--model", str(tiny_llama)])
    assert job.status in ("starting", "running") and job.target == out.resolve()
    assert os.getpgid(job.pid) == job.pid  # its own session: a closed tab or a stopped server does not take it down
    done = wait_job(job, timeout=120)
    assert done.status == "finished" and done.exit_code == 0, log_tail(done)
    assert (out / "prepared.json").is_file()
    assert "$ dpolab data prepare" in log_tail(done)
    assert [j.id for j in list_jobs(tmp_path / "runs")] == [job.id]
    assert find_job(tmp_path / "runs", out).id == job.id and find_job(tmp_path / "runs", out, active_only=True) is None


def test_failed_command_is_failed_with_its_message(tmp_path):
    job = start_job(tmp_path / "runs", "prepare", tmp_path / "runs" / "x",
                    ["data", "prepare", "--dataset", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")])
    done = wait_job(job, timeout=60)
    assert done.status == "failed" and done.exit_code != 0
    assert "missing.jsonl" in log_tail(done)


def test_train_job_stops_cleanly_refuses_a_duplicate_and_resumes_to_the_same_weights(tmp_path, tiny_llama, pairs):
    runs = tmp_path / "runs"
    full = start_job(runs, "train", runs / "full", train_argv(tiny_llama, pairs, runs / "full", 150))
    assert wait_job(full, timeout=300).status == "finished", log_tail(full)

    out = runs / "stopped"
    argv = train_argv(tiny_llama, pairs, out, 150)
    job = start_job(runs, "train", out, argv)
    with pytest.raises(JobError, match="already being written"):
        start_job(runs, "train", out, argv)  # a second tab's click
    run = RunFolder(out)
    wait_until(lambda: (p := run.read_progress()) and p.step >= 3, what="step 3")
    assert os.getpriority(os.PRIO_PROCESS, job.pid) >= 10  # below the server: pages stay responsive
    stop_job(read_job(job.folder))
    stopped = wait_job(job, timeout=120)
    assert stopped.status == "stopped" and stopped.exit_code == 0, log_tail(stopped)
    assert "continue with --resume" in log_tail(stopped)
    at = run.read_progress().step
    assert 3 <= at < 150 and run.has_checkpoints() and not run.is_finished()

    resumed = start_job(runs, "train", out, [*argv, "--resume"])
    assert wait_job(resumed, timeout=300).status == "finished", log_tail(resumed)
    assert read_job(job.folder).status == "stopped"  # what it was when it ended, though the run has finished since
    expected, got = load_file(runs / "full" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0, msg=name)
    progress = run.read_progress()
    assert [p["step"] for p in progress.history if "loss" in p] == list(range(1, 151))


def test_sigterm_stops_a_non_training_job(tmp_path, tiny_llama, pairs):
    """Stop on another kind of job: SIGTERM to its group; the job reads as stopped, not failed."""
    runs = tmp_path / "runs"
    out = runs / "long"
    job = start_job(runs, "sweep", out, train_argv(tiny_llama, pairs, out, 100000))  # a long command of another kind
    wait_until(lambda: (p := RunFolder(out).read_progress()) and p.step >= 1, what="the first step")
    stop_job(read_job(job.folder))
    done = wait_job(job, timeout=60)
    assert done.status == "stopped" and done.exit_code != 0


def test_a_job_whose_supervisor_died_reads_as_failed(tmp_path, tiny_llama, pairs):
    runs = tmp_path / "runs"
    out = runs / "killed"
    job = start_job(runs, "train", out, train_argv(tiny_llama, pairs, out, 100000))
    wait_until(lambda: (p := RunFolder(out).read_progress()) and p.step >= 1, what="the first step")
    os.killpg(job.pid, signal.SIGKILL)
    assert wait_until(lambda: read_job(job.folder).status == "failed", timeout=40, what="failed")
    # and the target is free again
    again = start_job(runs, "train", out, [*train_argv(tiny_llama, pairs, out, 2), "--overwrite"])
    assert wait_job(again, timeout=120).status == "finished", log_tail(again)


def test_log_progress_reads_the_last_progress_bar(tmp_path):
    folder = tmp_path / "runs" / ".jobs" / "j"
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text("start\ntokenizing:  10%|#   | 1/10 [00:01<00:09]\rtokenizing:  70%|#######   | 7/10 "
                                    "[00:03<00:01]\r")
    (folder / "job.json").write_text('{"kind": "prepare", "target": "/x", "argv": [], "started": 1.0, "pid": null}')
    job = read_job(folder)
    assert log_progress(job) == (0.7, "tokenizing: 7/10")
    assert log_tail(job) == "start\ntokenizing:  70%|#######   | 7/10 [00:03<00:01]"
