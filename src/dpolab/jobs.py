"""Background jobs: a `dpolab` command (train, sweep, eval, data prepare, export, push) started from the studio as a
process of its own, so that it outlives the browser tab and the server that started it, and can be watched, stopped
and resumed. This module owns the jobs folder under a runs root:

    RUNS/.jobs/lock                  flock'ed while a job is started (two tabs cannot start the same target twice)
    RUNS/.jobs/<id>/job.json         kind, target folder, argv, started, the supervisor's pid
    RUNS/.jobs/<id>/log.txt          the command's stdout + stderr
    RUNS/.jobs/<id>/stop             a stop was asked for (the time)
    RUNS/.jobs/<id>/exit.json        exit code, ended (written by the supervisor when the command ends)

Design: `start_job` spawns `python -m dpolab.jobs <id-folder>` in a new session (its own process group, no terminal):
the supervisor runs `python -m dpolab ARGV` with the log as its output, waits, and records the exit. Status is read
from the files and the supervisor's liveness (a pid whose /proc cmdline is still this supervisor), never from the
server's memory, so every tab and a restarted server see the same jobs. Stopping a training run is a clean stop at the
next step boundary through the run folder's stop request (a complete checkpoint, then `--resume`); other jobs get
SIGTERM on their process group.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpolab.errors import DpolabError
from dpolab.fsutil import atomic_write_text

JOBS = ".jobs"
KINDS = ("train", "sweep", "eval", "prepare", "export", "push")
ACTIVE = ("starting", "running", "stopping")
NICENESS = 10
START_GRACE_S = 15


class JobError(DpolabError):
    pass


@dataclass(frozen=True)
class Job:
    id: str
    folder: Path  # RUNS/.jobs/<id>
    kind: str  # one of KINDS
    target: Path  # the folder the job writes (run, sweep, prepared data, export), resolved
    argv: list[str]  # `dpolab` arguments
    started: float  # time.time()
    pid: int | None  # the supervisor's
    status: str  # starting | running | stopping | finished | failed | stopped
    exit_code: int | None
    ended: float | None

    @property
    def log_file(self) -> Path:
        return self.folder / "log.txt"

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def command(self) -> str:
        """The equivalent shell command."""
        import shlex

        return shlex.join(["dpolab", *self.argv])

    @property
    def duration_s(self) -> float:
        return (self.ended or time.time()) - self.started


def jobs_dir(runs_root: Path) -> Path:
    return Path(runs_root) / JOBS


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int | None) -> bool:
    """Is `pid` still a running job supervisor (not a zombie, not a reused pid)?"""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:  # no /proc (macOS): signal 0
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return b"dpolab.jobs" in cmdline


def _train_stopped(target: Path) -> bool:
    from dpolab.folders.run import RunFolder

    return RunFolder.is_run(target) and RunFolder(target).is_stopped()


def _stopped(record: dict[str, Any], folder: Path, code: int | None) -> bool:
    """Did the job end because a stop was asked for? (Decided when it ends: a training run resumed later is finished
    then, and this job still stopped.) A training run that ended its last step as the request came is finished."""
    if not (folder / "stop").is_file():
        return False
    if record["kind"] == "train" and code == 0:
        return _train_stopped(Path(record["target"]))
    return True


def read_job(folder: Path) -> Job | None:
    record = _read_json(folder / "job.json")
    if record is None:
        return None
    ended = _read_json(folder / "exit.json")
    stop_asked = (folder / "stop").is_file()
    pid = record.get("pid")
    if ended is not None:
        code = ended.get("exit_code")
        stopped = ended["stopped"] if "stopped" in ended else _stopped(record, folder, code)
        status = "stopped" if stopped else "finished" if code == 0 else "failed"
    elif pid is None:
        status = "starting" if time.time() - record["started"] < 30 else "failed"
    elif _alive(pid):
        status = "stopping" if stop_asked else "running"
    elif time.time() - record["started"] < START_GRACE_S:
        # Just started: a reader must not call it failed before the supervisor is visibly alive (a page once drew a
        # new job as failed and, no longer polling a finished job, never redrew it while the run went on).
        status = "starting"
    else:  # the supervisor died without recording an exit (killed -9, machine restarted)
        status = "failed"
    return Job(id=folder.name, folder=folder, kind=record["kind"], target=Path(record["target"]), argv=record["argv"],
               started=record["started"], pid=pid, status=status, exit_code=(ended or {}).get("exit_code"),
               ended=(ended or {}).get("ended"))


def list_jobs(runs_root: Path) -> list[Job]:
    """Every job under `runs_root`, newest first."""
    root = jobs_dir(runs_root)
    if not root.is_dir():
        return []
    found = [job for child in root.iterdir() if child.is_dir() and (job := read_job(child)) is not None]
    return sorted(found, key=lambda job: job.started, reverse=True)


def find_job(runs_root: Path, target: Path, active_only: bool = False) -> Job | None:
    """The newest job writing `target` (only a running one with `active_only`)."""
    target = Path(target).expanduser().resolve()
    for job in list_jobs(runs_root):
        if job.target == target and (job.active or not active_only):
            return job
    return None


@contextmanager
def _locked(runs_root: Path):
    root = jobs_dir(runs_root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield root
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:60] or "job"


def start_job(runs_root: Path, kind: str, target: Path, argv: list[str], env: dict[str, str] | None = None) -> Job:
    """Start `dpolab ARGV` in the background, writing `target`; JobError when a job for `target` is still running
    (checked and started under one lock: two tabs clicking at once start one job)."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; one of {', '.join(KINDS)}")
    target = Path(target).expanduser().resolve()
    with _locked(runs_root) as root:
        running = find_job(runs_root, target, active_only=True)
        if running is not None:
            raise JobError(f"{target} is already being written by job {running.id} ({running.kind}, {running.status})")
        started = time.time()
        job_id = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(started))}-{kind}-{_slug(target.name)}"
        folder = root / job_id
        n = 1
        while folder.exists():
            n += 1
            folder = root / f"{job_id}-{n}"
        folder.mkdir()
        if kind == "train":
            from dpolab.folders.run import RunFolder

            if RunFolder.is_run(target):  # a stale request (an earlier job's) must not stop this one
                RunFolder(target).clear_stop()
        record = {"kind": kind, "target": str(target), "argv": [str(a) for a in argv], "started": started,
                  "pid": None, "cwd": os.getcwd()}
        atomic_write_text(folder / "job.json", json.dumps(record, indent=2))
        # The server's OMP_NUM_THREADS is sized for decoding beside other users; a job gets every core unless told.
        child_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        child_env.update({"PYTHONUNBUFFERED": "1", "TERM": "dumb", "COLUMNS": "120", "TOKENIZERS_PARALLELISM": "false",
                          **(env or {})})
        proc = subprocess.Popen([sys.executable, "-m", "dpolab.jobs", str(folder)], start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                close_fds=True, env=child_env)
        # Reap the supervisor when it ends (no zombie in a long-lived server); it does not depend on this process.
        threading.Thread(target=proc.wait, daemon=True).start()
        atomic_write_text(folder / "job.json", json.dumps({**record, "pid": proc.pid}, indent=2))
    return read_job(folder)


def stop_job(job: Job) -> None:
    """Ask `job` to stop: a training run stops cleanly at its next step (complete checkpoint, resumable); any other
    job gets SIGTERM on its process group."""
    if not job.active:
        return
    atomic_write_text(job.folder / "stop", str(time.time()))
    if job.kind == "train":
        from dpolab.folders.run import RunFolder

        RunFolder(job.target).request_stop()
        return
    if job.pid:
        try:
            os.killpg(job.pid, signal.SIGTERM)  # the supervisor leads its own session: its group is its pid
        except ProcessLookupError:
            pass


def wait_job(job: Job, timeout: float = 600, poll: float = 0.2) -> Job:
    """Block until `job` is no longer active (tests, scripts); returns its final state."""
    deadline = time.monotonic() + timeout
    while True:
        current = read_job(job.folder)
        if current is None or not current.active or time.monotonic() > deadline:
            return current
        time.sleep(poll)


def log_tail(job: Job, max_chars: int = 4000) -> str:
    """The end of the job's log, with progress-bar redraws (carriage returns) collapsed to their last state."""
    try:
        with open(job.log_file, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 4 * max_chars))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return "\n".join(line for line in lines if line.strip())[-max_chars:]


_BAR = re.compile(r"(?P<desc>[^\r\n|]*?):?\s*(?P<pct>\d{1,3})%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")


def log_progress(job: Job) -> tuple[float, str] | None:
    """(fraction, label) of the last progress bar (tqdm) the job printed, or None."""
    try:
        with open(job.log_file, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 8192))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    matches = list(_BAR.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    n, total = int(last["n"]), int(last["total"])
    return (min(n / total, 1.0) if total else 0.0), f"{last['desc'].strip() or 'progress'}: {n}/{total}"


# ----------------------------------------------------------------------------------------------------- supervisor
def supervise(folder: Path) -> int:
    """Run the job's command to its end and record the exit (the body of `python -m dpolab.jobs FOLDER`)."""
    record = json.loads((folder / "job.json").read_text())
    # Below the server's priority: on a small machine the pages stay responsive while a job uses every core (it loses
    # nothing when the machine is otherwise idle).
    try:
        os.nice(NICENESS)
    except OSError:
        pass
    with open(folder / "log.txt", "ab", buffering=0) as log:
        log.write(f"$ dpolab {' '.join(record['argv'])}\n".encode())
        child = subprocess.Popen([sys.executable, "-m", "dpolab", *record["argv"]], stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT, cwd=record.get("cwd"))

        def forward(signum, frame):  # SIGTERM to the group reaches the child too; the supervisor outlives it
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        code = child.wait()
    atomic_write_text(folder / "exit.json", json.dumps({"exit_code": code, "ended": time.time(),
                                                        "stopped": _stopped(record, folder, code)}))
    return code


if __name__ == "__main__":
    raise SystemExit(supervise(Path(sys.argv[1])))
