"""`dpolab sweep --storage postgresql://…`: workers as separate processes on one PostgreSQL study.

A throwaway cluster (Debian's initdb/pg_ctl under /usr/lib/postgresql/*/bin) runs as an unprivileged user on a free
port of 127.0.0.1, with password (scram) authentication for a role whose password is a canary that no output or file
may show. Every test gets its own database. Without PostgreSQL these tests skip, and fail under CI (CI=true).
The fast tests at the end need no server.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from dpolab.sweep import SweepConfig, open_study
from tests.conftest import missing
from tests.test_sweep import _sweep, pairs_file  # noqa: F401  (pairs_file: a fixture used here)

REPO = Path(__file__).resolve().parents[1]
PG_USER = "dpolab-pg"  # the server refuses to run as root
ROLE, CANARY = "sweeper", "canary-6b1f0e9d-pw"
# Short heartbeats: a dead worker's trial is retried within seconds (about two grace periods, see sweep.rdb).
HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 3, "reconnect_timeout": 120}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_user() -> dict:
    """subprocess arguments that run the server's tools as an unprivileged user (created if missing) under root."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    entry = pwd.getpwnam(PG_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Postgres:
    """A cluster in a temp dir: start, stop, restart, one database per test."""

    def __init__(self, bindir: Path):
        self.bindir, self.port, self.as_user = bindir, _free_port(), _server_user()
        self.root = Path(tempfile.mkdtemp(prefix="dpolab-pg-"))
        self.admin_password = secrets.token_hex(12)
        (self.root / "pw").write_text(self.admin_password)
        if self.as_user:
            for path in (self.root, self.root / "pw"):
                os.chown(path, self.as_user["user"], self.as_user["group"])
        self._tool("initdb", "-D", "data", "-U", "admin", "--pwfile=pw", "--auth-local=trust",
                   "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        self.databases = itertools.count()

    def _tool(self, name: str, *args: str) -> None:
        run = subprocess.run([str(self.bindir / name), *args], cwd=self.root, capture_output=True, text=True,
                             timeout=120, **self.as_user)
        if run.returncode:
            log = self.root / "server.log"
            raise RuntimeError(f"{name} failed: {run.stderr[-1500:]}{log.read_text()[-1500:] if log.is_file() else ''}")

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} -c fsync=off"
        self._tool("pg_ctl", "-D", "data", "-l", "server.log", "-o", options, "-w", "start")

    def stop(self) -> None:
        self._tool("pg_ctl", "-D", "data", "-m", "fast", "-w", "stop")

    def new_database(self) -> str:
        import psycopg
        from psycopg import sql

        name = f"sweeps{next(self.databases)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="admin", password=self.admin_password,
                             dbname="postgres", autocommit=True) as conn:
            if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone() is None:
                conn.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(ROLE),
                                                                                 sql.Literal(CANARY)))
            conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(ROLE)))
        return name

    def url(self, database: str, password: str = CANARY) -> str:
        return f"postgresql://{ROLE}:{password}@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        try:
            self.stop()
        except RuntimeError:  # not running (a test stopped it and failed before starting it again)
            pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres():
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install -e '.[test]')")
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3].split(".")[0]))
    if not found:
        missing("PostgreSQL is not installed (Debian: apt-get install postgresql)")
    server = Postgres(found[-1].parent)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres) -> str:
    return postgres.url(postgres.new_database())


# ------------------------------------------------------------------------------------------------ helpers
def _config(tmp_path: Path, tiny_llama, pairs_file, machine: str, **kw) -> Path:
    """The sweep YAML a worker on `machine` runs: its own sweep folder, the same study name (`sweep`)."""
    tree = {**_sweep(tmp_path / machine, tiny_llama, pairs_file, **kw), **HEARTBEAT}
    path = tmp_path / machine / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def launch(tmp_path):
    """`launch(config, url, step_s)`: `dpolab sweep -c CONFIG` with the storage URL in DPOLAB_SWEEP_STORAGE, in its
    own process, each training step slowed by `step_s`; stdout and stderr go to files (a pipe nobody reads would
    block the worker once full). Workers still running at the end are killed."""
    started = []

    def start(config: Path, url: str, step_s: float = 0.0) -> subprocess.Popen:
        code = ("import sys, time; from transformers import TrainerCallback\n"
                "class Slow(TrainerCallback):\n"
                f"    def on_step_end(self, *a, **k): time.sleep({step_s})\n"
                "import dpolab.engine.train as t\n"
                "real = t.run_training\n"
                "t.run_training = lambda cfg, **kw: real(cfg, **{**kw, 'callbacks': [*kw['callbacks'], Slow()]})\n"
                "from dpolab.cli import main\n"
                f"sys.argv = ['dpolab', 'sweep', '-c', {str(config)!r}]\n"
                "main()\n")
        logs = tmp_path / "logs" / f"worker{len(started)}"
        logs.parent.mkdir(exist_ok=True)
        with open(logs.with_suffix(".out"), "w") as out, open(logs.with_suffix(".err"), "w") as err:
            proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=out, stderr=err, text=True,
                                    env={**os.environ, "DPOLAB_SWEEP_STORAGE": url, "OMP_NUM_THREADS": "1"})
        proc.logs = logs
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finish(workers: list[subprocess.Popen], timeout: int = 400) -> list[str]:
    """Each worker's stdout (the table) + stderr (its log), once all have exited successfully."""
    for worker in workers:
        worker.wait(timeout=timeout)
    text = [w.logs.with_suffix(".out").read_text() + w.logs.with_suffix(".err").read_text() for w in workers]
    assert all(w.returncode == 0 for w in workers), [t[-3000:] for t in text]
    if os.environ.get("DPOLAB_TEST_SHOW"):
        print(*text, sep="\n" + "=" * 100 + "\n")
    return text


def _study(config: Path, url: str):
    return open_study(SweepConfig.model_validate(yaml.safe_load(config.read_text())), url, create=False)


def _started(outputs: list[str]) -> list[int]:
    return [int(line.split()[1].rstrip(":")) for out in outputs for line in out.splitlines()
            if line.startswith("trial ") and line.endswith(": starting")]


def _wait_for(predicate, what: str, workers=(), timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        ended = [w.logs.with_suffix(".err").read_text()[-3000:] for w in workers if w.poll() is not None]
        assert not ended, f"a worker ended while waiting for {what}: {ended}"
        time.sleep(0.2)


def _has_checkpoint(run: Path) -> bool:
    from dpolab.engine.trainer import last_complete_checkpoint

    return last_complete_checkpoint(run / "checkpoints")[0] is not None


def _csv_rows(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _no_canary(outputs: list[str], *folders: Path) -> None:
    assert not [i for i, out in enumerate(outputs) if CANARY in out]
    leaks = [p for folder in folders for p in folder.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]
    assert leaks == []


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.postgres
def test_two_machines_share_one_study_and_report_from_the_database_alone(tmp_path, tiny_llama, pairs_file, pg_url,
                                                                        launch):
    from optuna.storages import RDBStorage

    configs = [_config(tmp_path, tiny_llama, pairs_file, machine, n_trials=4) for machine in ("a", "b")]
    workers = [launch(configs[0], pg_url, 0.3), launch(configs[1], pg_url, 0.3)]
    outputs = _finish(workers)
    study = _study(configs[0], pg_url)
    assert isinstance(study._storage._backend, RDBStorage)  # the database, not a journal file
    trials = study.get_trials(deepcopy=False)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    started = _started(outputs)
    assert sorted(started) == [0, 1, 2, 3]  # every trial ran exactly once
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both workers took trials
    folders = [c.parent / "sweep" for c in configs]
    ran_on = {t.number: next(f for f in folders if (f / "trials" / f"{t.number:03d}").is_dir()) for t in trials}
    assert all(not (other / "trials" / f"{n:03d}").exists() for n, f in ran_on.items() for other in folders
               if other != f)  # each trial's run folder lives only on the machine that ran it
    losses = {t.number: json.loads((ran_on[t.number] / "trials" / f"{t.number:03d}" / "metrics.json").read_text())
              ["best"]["loss"] for t in trials}
    best = min(losses, key=losses.get)
    home = ran_on[best]
    assert json.loads((home / "best" / "best.json").read_text())["trial"] == best
    assert (home / "best" / "model" / "model.safetensors").read_bytes() == \
        (home / "trials" / f"{best:03d}" / "model" / "model.safetensors").read_bytes()
    for folder in folders:  # best.json everywhere names the best; best/ only where it ran
        assert json.loads((folder / "best.json").read_text())["trial"] == best
        assert (folder / "best").is_dir() == (folder == home)
    # --report in a folder that holds only the sweep's YAML: the table from the database alone.
    fresh = tmp_path / "elsewhere" / "report-here"
    fresh.mkdir(parents=True)
    shutil.copy(folders[0] / "sweep.yaml", fresh / "sweep.yaml")
    report = subprocess.run([sys.executable, "-m", "dpolab", "sweep", "--report", str(fresh), "--storage", pg_url],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    rebuilt = _csv_rows(fresh / "trials.csv")
    assert rebuilt == _csv_rows(folders[0] / "trials.csv") == _csv_rows(folders[1] / "trials.csv")
    assert {int(r["trial"]): float(r["eval_loss"]) for r in rebuilt} == pytest.approx(losses)
    assert {r["host"] for r in rebuilt} == {socket.gethostname()} and all(r["param:beta"] for r in rebuilt)
    assert _table(report.stdout) == _table(outputs[0]) == _table(outputs[1])  # the printed table too
    _no_canary([*outputs, report.stdout + report.stderr], tmp_path)


def _table(output: str) -> list[str]:
    """The rows of the trials table printed on stdout (not its title, which names the folder)."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    return lines[start:end + 1]


@pytest.mark.postgres
def test_sigkilled_worker_s_trial_is_retried_after_the_grace_period(tmp_path, tiny_llama, pairs_file, pg_url, launch):
    config = _config(tmp_path, tiny_llama, pairs_file, "shared", n_trials=3)
    sweep_dir = config.parent / "sweep"
    victim, survivor = launch(config, pg_url, 0.6), launch(config, pg_url, 0.6)
    study = _study_when_ready(config, pg_url)

    def victim_has_checkpoint() -> bool:
        mine = [t for t in study.get_trials(deepcopy=True) if t.state.name == "RUNNING"
                and t.user_attrs.get("pid") == victim.pid]
        return bool(mine) and _has_checkpoint(sweep_dir / "trials" / f"{mine[0].number:03d}")

    _wait_for(victim_has_checkpoint, "the victim's trial to write a checkpoint", [victim, survivor])
    killed = next(t for t in study.get_trials(deepcopy=True) if t.user_attrs.get("pid") == victim.pid
                  and t.state.name == "RUNNING")
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = time.time()
    (out,) = _finish([survivor])
    trials = study.get_trials(deepcopy=True)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and trials[killed.number].state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == killed.params
    assert retry[0].system_attrs["failed_trial"] == killed.number  # Optuna's link (RetryHeartbeatStaleTrialCallback)
    assert (retry[0].datetime_start.timestamp() - killed_at) >= HEARTBEAT["grace_period"] - 1
    assert f"trials [{killed.number}]: no heartbeat" in out
    assert f"trial {retry[0].number}: retry of trial {killed.number}, resuming its run from checkpoint-" in out
    assert len(trials) == 4 and sorted(_started([out])) == [t.number for t in trials if t.user_attrs.get("pid")
                                                            == survivor.pid]
    rows = {int(r["trial"]): r for r in _csv_rows(sweep_dir / "trials.csv")}
    assert rows[killed.number]["state"] == "FAIL" and rows[retry[0].number]["retry_of"] == str(killed.number)
    _no_canary([out], tmp_path)


def _study_when_ready(config: Path, url: str):
    def ready():
        try:
            return _study(config, url)
        except Exception:  # the first worker has not created the study yet
            return None

    _wait_for(ready, "the study")
    return ready()


@pytest.mark.postgres
def test_database_restart_mid_sweep_loses_and_repeats_nothing(tmp_path, tiny_llama, pairs_file, postgres, pg_url,
                                                              launch):
    config = _config(tmp_path, tiny_llama, pairs_file, "shared", n_trials=3)
    sweep_dir = config.parent / "sweep"
    workers = [launch(config, pg_url, 0.4), launch(config, pg_url, 0.4)]
    _wait_for(lambda: _has_checkpoint(sweep_dir / "trials" / "002"), "the last trial's first checkpoint", workers)
    postgres.stop()
    try:
        time.sleep(HEARTBEAT["grace_period"] + 2)  # longer than the grace period: every running trial looks stale
    finally:
        postgres.start()
    outputs = _finish(workers)
    trials = _study(config, pg_url).get_trials(deepcopy=False)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert sorted(_started(outputs)) == [0, 1, 2]
    assert any("heartbeat: " in out or "study database unreachable" in out for out in outputs)  # it was noticed
    _no_canary(outputs, tmp_path)


@pytest.mark.postgres
def test_wrong_password_or_url_is_one_line_without_the_password(tmp_path, tiny_llama, pairs_file, postgres, pg_url):
    from dpolab.errors import SweepError
    from dpolab.sweep.rdb import connect

    config = _config(tmp_path, tiny_llama, pairs_file, "a", n_trials=1)
    database, wrong = pg_url.rsplit("/", 1)[1], "Wr0ng-" + CANARY
    runs = {("-c", str(config), "--storage", postgres.url(database, password=wrong)): "password authentication failed",
            ("--report", str(config.parent), "--storage", postgres.url(database, password=wrong)):
                "password authentication failed",
            ("--report", str(config.parent), "--storage", pg_url.replace(str(postgres.port), str(_free_port()))):
                "Connection refused"}
    for args, message in runs.items():  # the CLI: one line, no traceback, no password
        run = subprocess.run([sys.executable, "-m", "dpolab", "sweep", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        lines = (run.stdout + run.stderr).strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot open the study "), lines
        assert message in lines[0] and CANARY not in lines[0] and "sweeper:***@127.0.0.1" in lines[0], lines
    assert not (config.parent / "sweep" / "data").exists()  # refused before preparing any data
    sweep = SweepConfig.model_validate(yaml.safe_load(config.read_text()))
    for url, message in {pg_url.rsplit("/", 1)[0] + "/no_such_db": 'database "no_such_db" does not exist',
                         pg_url.replace("postgresql://", "postgresql+nodriver://"): "Can't load plugin"}.items():
        with pytest.raises(SweepError) as caught:
            connect(sweep, url, print)
        assert message in str(caught.value) and CANARY not in str(caught.value) and "\n" not in str(caught.value)
    _no_canary([], tmp_path)


# ------------------------------------------------------------------------------------------------ no server needed
def test_heartbeat_settings_are_validated():
    tree = {"search_space": {"beta": {"type": "categorical", "choices": [0.1, 0.2]}}}
    cfg = SweepConfig.model_validate(tree)
    assert (cfg.heartbeat_interval, cfg.grace_period) == (30, 120)
    with pytest.raises(ValueError, match="at least twice heartbeat_interval"):
        SweepConfig.model_validate({**tree, "heartbeat_interval": 10, "grace_period": 15})
    with pytest.raises(ValueError, match="greater than 0"):
        SweepConfig.model_validate({**tree, "heartbeat_interval": 0})


@pytest.mark.parametrize("password", [CANARY, "p@ss:w/rd%#"])
def test_urls_and_messages_are_scrubbed(password):
    from urllib.parse import quote

    from dpolab.errors import SweepError
    from dpolab.sweep.rdb import safe_url, scrub, scrubbed

    url = f"postgresql://{ROLE}:{quote(password, safe='')}@db.example:5432/sweeps"
    assert password not in safe_url(url) and quote(password, safe="") not in safe_url(url) and "***" in safe_url(url)
    text = f"failed for {url} ({password})"
    assert password not in scrub(text, url) and quote(password, safe="") not in scrub(text, url)
    with pytest.raises(SweepError) as caught, scrubbed(url):
        raise RuntimeError(f"driver said: {url}")
    assert password not in str(caught.value) and quote(password, safe="") not in str(caught.value)
    short = "postgresql://u:p@host/db"  # a one-letter password: hidden, and the words around it left alone
    assert scrub(f"cannot open {short}: password p refused", short) == "cannot open postgresql://u:***@host/db: " \
        "password *** refused"


def test_a_retry_takes_over_the_failed_run_folder_and_its_checkpoints(tmp_path):
    from dpolab.engine.trainer import is_complete, write_marker
    from dpolab.folders.sweep import SweepFolder

    folder = SweepFolder(tmp_path / "sweep")
    old = folder.trial(1).checkpoints_dir
    for step in (3, 6):
        ckpt = old / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step,
                                                             "best_model_checkpoint": str(old / "checkpoint-3")}))
        write_marker(ckpt)
    (old / "checkpoint-9").mkdir()  # killed while saving: incomplete
    assert folder.take_over(1, 4) == folder.trial(4).checkpoints_dir / "checkpoint-6"
    assert not folder.trial(1).path.exists()
    for step in (3, 6):
        ckpt = folder.trial(4).checkpoints_dir / f"checkpoint-{step}"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["best_model_checkpoint"] == str(folder.trial(4).checkpoints_dir / "checkpoint-3")
        assert is_complete(ckpt) and state["global_step"] == step
    (folder.trial(2).checkpoints_dir / "checkpoint-3").mkdir(parents=True)  # nothing complete: nothing moves
    assert folder.take_over(2, 5) is None and folder.trial(2).path.is_dir() and not folder.trial(5).path.exists()


def test_a_retry_says_whether_it_resumes_or_restarts(tmp_path):
    from types import SimpleNamespace

    from dpolab.engine.trainer import write_marker
    from dpolab.sweep.loop import LocalCoordinator

    said = []
    sweep = SweepConfig.model_validate({"sweep_dir": str(tmp_path / "sweep"),
                                        "search_space": {"beta": {"type": "categorical", "choices": [0.1]}}})
    study = SimpleNamespace(trials={n: SimpleNamespace(user_attrs={"host": "gpu-b"}) for n in range(3)})
    worker = SimpleNamespace(sweep=sweep, log=said.append, study=study)
    ckpt = tmp_path / "sweep" / "trials" / "001" / "checkpoints" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    write_marker(ckpt)
    (tmp_path / "sweep" / "trials" / "002").mkdir()
    assert LocalCoordinator._take_over(worker, 5, 0) is False  # ran on another machine
    assert LocalCoordinator._take_over(worker, 6, 1) is True  # here, with a complete checkpoint
    assert LocalCoordinator._take_over(worker, 7, 2) is False  # here, without one
    assert said == ["trial 5: retry of trial 0, restarting: its run folder is on gpu-b, not here",
                    "trial 6: retry of trial 1, resuming its run from checkpoint-2",
                    "trial 7: retry of trial 2, restarting: its run has no complete checkpoint"]
