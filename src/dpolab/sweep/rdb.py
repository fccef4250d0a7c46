"""Workers on several machines: an Optuna RDB storage (PostgreSQL) with heartbeats, reconnection and scrubbed URLs.

- Heartbeats: Optuna's own (`RDBStorage(heartbeat_interval, grace_period, heartbeat_stale_trial_callback)`). Optuna
  beats only inside `study.optimize`; our loop uses ask/tell (it counts finished trials across workers), so a
  `Heartbeat` thread beats for the trial in hand, and `StaleTrials` fails trials whose worker stopped beating and
  queues their parameters once more (`retry_once`: Optuna's `RetryHeartbeatStaleTrialCallback(max_retry=1)` that also
  writes our `retry_of` link).
- A trial is failed only when found stale twice, `grace_period` seconds apart: after a database outage every trial
  looks stale at first, and its live worker gets a grace period to beat again (its first attempts may still be
  waiting on a connection). A dead worker's trial is thus retried about two grace periods after its last beat.
- `ReconnectingStorage` retries a storage call whose connection dropped (database restarted, network blip) with
  backoff, up to `reconnect_timeout` seconds, instead of losing the trial. Only mid-sweep: at start a wrong URL or
  password is a one-line `SweepError` (`connect`).
- The password of a URL is never printed: every message built here goes through `scrub`.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from urllib.parse import quote, quote_plus

from dpolab.errors import SweepError

BACKOFF_CAP_S = 30
CONNECT_TIMEOUT_S = 10  # a host that does not answer fails a connection attempt instead of hanging for minutes


# ------------------------------------------------------------------------------------------------ scrubbing
def _password(url: str) -> str | None:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).password
    except Exception:  # not even a URL: the part between "user:" and "@" is the password, if any
        head = url.split("://", 1)[-1].rsplit("@", 1)
        return head[0].split(":", 1)[1] if len(head) == 2 and ":" in head[0] else None


def scrub(text: str, url: str | None) -> str:
    """`text` without the password of `url` (as given, and URL-encoded either way), wherever it stands on its own:
    not inside a longer word, so that a short password does not mangle the message around it."""
    import re

    secret = _password(url) if url else None
    if not secret:
        return text
    for form in sorted({secret, quote(secret, safe=""), quote_plus(secret)}, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", "***", text)
    return text


def safe_url(url: str) -> str:
    """The URL to show: `postgresql://user:***@host:5432/db`."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # unparseable: where a password might be is unknown, so only the scheme is shown
        return url.split(":", 1)[0] + "://…" if ":" in url else "(not a URL)"


@contextlib.contextmanager
def scrubbed(url: str | None) -> Iterator[None]:
    """Any error raised inside comes out without the password (the CLI prints its first line)."""
    try:
        yield
    except Exception as exc:
        if url and _password(url) and scrub(str(exc), url) != str(exc):
            raise SweepError(scrub(_first_line(exc), url)) from None
        raise


def _first_line(exc: BaseException) -> str:
    """The driver's own words (`connection … failed: FATAL: password authentication failed …`), on one line: the
    innermost error under Optuna's and SQLAlchemy's wrappers."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "orig", None) or exc.__cause__
        if inner is None:
            break
        exc = inner
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text.split(" (Background on this error")[0][:300]


def connection_lost(exc: BaseException) -> bool:
    """A dropped or refused connection somewhere in the chain (Optuna wraps driver errors in its own)."""
    import sqlalchemy.exc as sa

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (sa.OperationalError, sa.InterfaceError)) or \
                (isinstance(exc, sa.DBAPIError) and exc.connection_invalidated):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ------------------------------------------------------------------------------------------------ the storage
# RDBStorage methods that talk to the database, public and those Optuna's _CachedStorage calls (the study's storage
# wraps ours in it); each is retried with backoff when its connection drops.
_RETRIED = ("create_new_study", "get_all_studies", "get_study_id_from_name", "get_study_name_from_id",
            "get_study_directions", "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr",
            "set_study_system_attr", "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
            "get_trial_param", "get_trial_id_from_study_id_trial_number", "set_trial_state_values",
            "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr", "get_trial",
            "get_trial_user_attrs", "get_trial_system_attrs", "get_all_trials", "_get_trials", "get_best_trial",
            "_get_best_trial_id", "_get_stale_trial_ids")
_calling = threading.local()  # inside a retried call: the calls it makes are not retried on their own as well


def _with_backoff(storage, method, args, kwargs):
    """`method(storage, …)`, called again after 1, 2, 4 … 30 s while the database cannot be reached, for at most
    `storage.reconnect_timeout` seconds. A state change that committed just before its connection dropped is found
    done on the next try, which Optuna refuses as an update of a finished trial: that counts as success."""
    from optuna.exceptions import UpdateFinishedTrialError

    delay, waited = 1.0, 0.0
    while True:
        try:
            result = method(storage, *args, **kwargs)
        except UpdateFinishedTrialError:
            if waited and method.__name__ == "set_trial_state_values" and _state_is(storage, *args, **kwargs):
                return True
            raise
        except Exception as exc:
            if not connection_lost(exc):
                raise
            reason = scrub(_first_line(exc), storage.url)
            if waited >= storage.reconnect_timeout:
                raise SweepError(f"lost the study database {storage.shown_url} for {waited:.0f} s "
                                 f"(reconnect_timeout): {reason}") from None
            storage.log(f"study database unreachable ({reason}); reconnecting in {delay:.0f} s")
            time.sleep(delay)
            waited, delay = waited + delay, min(2 * delay, BACKOFF_CAP_S)
            continue
        if waited:
            storage.log(f"study database reachable again after {waited:.0f} s")
        return result


def _state_is(storage, trial_id, state, values=None) -> bool:
    return storage.get_trial(trial_id).state == state


def _retrying(method):
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_calling, "active", False):
            return method(self, *args, **kwargs)
        _calling.active = True
        try:
            return _with_backoff(self, method, args, kwargs)
        finally:
            _calling.active = False

    return call


@functools.cache
def _storage_class():
    """`ReconnectingStorage`: RDBStorage whose database calls survive a dropped connection (a class built on first
    use, as every Optuna import here is: `dpolab --help` stays fast)."""
    from optuna.storages import RDBStorage

    class ReconnectingStorage(RDBStorage):
        log: Callable[[str], None] = print
        reconnect_timeout: float = 600
        shown_url = "(the study database)"

    for name in _RETRIED:
        setattr(ReconnectingStorage, name, _retrying(getattr(RDBStorage, name)))
    return ReconnectingStorage


def _with_driver(url: str) -> str:
    """A plain postgresql:// URL with the driver that is installed: SQLAlchemy's default for it changed from
    psycopg2 (2.0) to psycopg 3 (2.1), and `dpolab[postgres]` installs psycopg 3."""
    import importlib.util

    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return url  # RDBStorage says what is wrong with it
    if parsed.drivername != "postgresql":
        return url
    driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"
    return parsed.set(drivername=f"postgresql+{driver}").render_as_string(hide_password=False)


def _schema_race(exc: BaseException) -> bool:
    """Workers that open a fresh database at the same moment all create Optuna's tables; PostgreSQL lets one win
    and refuses the others' (`duplicate key … pg_type_typname_nsp_index`, `relation … already exists`)."""
    import sqlalchemy.exc as sa

    return isinstance(exc, (sa.IntegrityError, sa.ProgrammingError)) and (
        "already exists" in str(exc) or "pg_type_typname_nsp_index" in str(exc))


def _open(url: str, sweep, engine: dict):
    from optuna.exceptions import ExperimentalWarning

    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return _storage_class()(url, engine_kwargs=engine, heartbeat_interval=sweep.heartbeat_interval,
                                        grace_period=sweep.grace_period, heartbeat_stale_trial_callback=retry_once)
        except Exception as exc:
            if attempt == 4 or not _schema_race(exc):
                raise
            time.sleep(0.5 + attempt)  # the winner's tables exist by then: the next try finds them


def connect(sweep, url: str, log: Callable[[str], None]):
    """The study's storage at `url`, heartbeats on; a one-line SweepError (password hidden) when it cannot be
    opened: a wrong URL, password or database name, a server that does not answer, a missing driver."""
    engine = {"pool_pre_ping": True}  # a pooled connection that died with the server is replaced, not used
    given = url
    if url.startswith("postgresql"):
        url = _with_driver(url)
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        storage = _open(url, sweep, engine)
    except ImportError:
        raise SweepError(f"--storage {safe_url(given)}: its database driver is not installed (for postgresql://: "
                         "pip install 'dpolab[postgres]')") from None
    except Exception as exc:
        raise SweepError(f"cannot open the study database {safe_url(given)}: {scrub(_first_line(exc), given)}") \
            from None
    storage.log, storage.reconnect_timeout, storage.shown_url = log, sweep.reconnect_timeout, safe_url(given)
    return storage


# ------------------------------------------------------------------------------------------------ heartbeats
def uses_heartbeat(study) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(study._storage)


def retry_once(study, trial) -> None:
    """Optuna's `RetryHeartbeatStaleTrialCallback(max_retry=1)`: the stale trial's parameters queued as a WAITING
    trial whose system attrs link it (`failed_trial`, `retry_history`); it also carries `retry_of`, the link the
    journal path writes, so that the loop and the report read one attribute whatever the storage."""
    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    trial.user_attrs = {"retry_of": trial.user_attrs.get("retry_of", trial.number)}  # not the dead worker's host/pid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


class StaleTrials:
    """Fails the study's trials whose worker stopped beating and queues each one's retry (`retry_once`), like
    `optuna.storages.fail_stale_trials`, but only trials found stale twice a grace period apart (module docstring)."""

    def __init__(self, study, sweep):
        self.study, self.confirm_s = study, sweep.grace_period
        self.suspects: dict[int, float] = {}  # trial id -> when first found stale

    def fail(self) -> list[int]:
        import copy

        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        storage, now = self.study._storage, time.monotonic()
        stale = storage._get_stale_trial_ids(self.study._study_id)
        self.suspects = {trial_id: self.suspects.get(trial_id, now) for trial_id in stale}
        failed = []
        for trial_id in [t for t, since in self.suspects.items() if now - since >= self.confirm_s]:
            try:
                if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:  # another worker failed it first (the row is locked for the update)
                continue
            trial = copy.deepcopy(storage.get_trial(trial_id))
            retry_once(self.study, trial)
            failed.append(trial.number)
        return failed


class Heartbeat:
    """Beats for one trial every `interval` seconds on a thread until `stop`. The first beat is written before the
    trial starts (a trial that never beat is never found stale). A beat that cannot reach the database is tried at
    the next interval, never later: after an outage the trial must beat again before others find it stale."""

    def __init__(self, study, trial_id: int, interval: int, log: Callable[[str], None]):
        from optuna.storages import RDBStorage

        self.storage, self.trial_id, self.interval, self.log = study._storage, trial_id, interval, log
        backend = getattr(self.storage, "_backend", self.storage)
        _with_backoff(backend, RDBStorage.record_heartbeat, (trial_id,), {})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:
                if not failing:
                    self.log(f"heartbeat: {scrub(_first_line(exc), self.storage_url)}; trying every {self.interval} s")
                failing = True
                continue
            if failing:
                self.log("heartbeat: beating again")
            failing = False

    @property
    def storage_url(self) -> str | None:
        return getattr(getattr(self.storage, "_backend", self.storage), "url", None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
