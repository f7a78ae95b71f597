"""The study storage: Optuna's RDB storage opened the way every worker needs it, the locks that keep workers on
several machines in step, and the check that both stores answer before anything is written.

- ``check_stores``: a bad or unreachable study storage or tracking server is one line (``ConfigError``) within
  seconds, before any store is written (MLflow's own retries take minutes to say so).
- ``open_storage``: heartbeats (a trial silent for 3 heartbeats is failed and handed to ``on_stale``); workers
  starting together on a fresh database take turns creating Optuna's schema; on a database server, an outage is
  waited out (``ablate.stores.outages``).
- ``create_sqlite``: a new SQLite store is built whole in a file beside its path, then moved into place, so a kill
  at any moment of a first start leaves either no store or a complete one (never a half-migrated schema).
- ``PlanLock``: makes "is there a waiting trial? plan or take it" atomic for every worker of a study, so none
  starts an unplanned (sampled) trial: a PostgreSQL advisory lock (workers on any machine), or a file lock beside
  a SQLite file. ``schema_lock`` is the same lock around creating a store's tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from ablate.core.config import ConfigError
from ablate.core.urls import is_database, redact, sqlite_path
from ablate.stores.outages import OutageTolerantStorage, error_line, retrying, wait_s

T = TypeVar("T")
SCHEMA_RETRIES = 5
RETRY_S = 1.0
CONNECT_TIMEOUT_S = 5
# A vanished peer (machine off, cable out) is noticed after ~60 s of silence, by us and, through the session
# settings, by the server, which then ends the session and so frees its advisory lock.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
SERVER_KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
SCHEMA_RACE = re.compile(r"already exists|UniqueViolation|DuplicateTable|DuplicateObject|out-of-date database schema"
                         r"|UNIQUE constraint failed: alembic_version")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Checks before anything is written


def check_stores(storage_url: str, tracking_uri: str, storage_key: str = "storage") -> None:
    """Raise ``ConfigError`` (one line, password masked) unless the study storage and the tracking store answer.

    Writes nothing: a SQLite file is not created, a database server is only connected to, a tracking server only
    asked for ``/health``. Takes at most a few seconds (``CONNECT_TIMEOUT_S`` per store).
    """
    wait_s()  # a bad $ABLATE_STORAGE_WAIT_S is one line now, not a traceback in the middle of an outage
    check_storage(storage_url, storage_key)
    check_tracking(tracking_uri)


def check_storage(storage_url: str, key: str = "storage") -> None:
    """A study storage workers can share (a SQLite file, or PostgreSQL) that answers, if on a server."""
    if sqlite_path(storage_url):
        return
    if _dialect(storage_url, key) != "postgresql":
        raise ConfigError(key, f"{redact(storage_url)}: unsupported; use sqlite:///PATH or "
                               "postgresql+psycopg://USER@HOST/DATABASE")  # fmt: skip
    _check_database(storage_url, key)


def check_tracking(tracking_uri: str, key: str = "tracking_uri") -> None:
    """An MLflow tracking server or database server that answers (``ablate train`` can use this alone)."""
    if tracking_uri.startswith(("http://", "https://")):
        _check_server(tracking_uri, key)
    elif is_database(tracking_uri) and not sqlite_path(tracking_uri):
        _check_database(tracking_uri, key)


def _dialect(url: str, key: str) -> str:
    try:
        return sqlalchemy.engine.make_url(url).get_backend_name()
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise ConfigError(key, f"{redact(url)}: not a database URL") from None


def _check_database(url: str, key: str) -> None:
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=_connect_args(url))
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
    except ImportError as err:
        raise ConfigError(key, f"{redact(url)}: its driver is not installed ({err}); for PostgreSQL write "
                               "postgresql+psycopg://...") from None  # fmt: skip
    except sqlalchemy.exc.SQLAlchemyError as err:
        raise ConfigError(key, f"{redact(url)}: cannot connect ({error_line(err)})") from None


def _check_server(uri: str, key: str) -> None:
    parts = urllib.parse.urlsplit(uri)  # urllib takes no user:password@ in a URL (MLflow reads them from the env)
    health = parts._replace(netloc=parts.netloc.rpartition("@")[2], path=f"{parts.path.rstrip('/')}/health")
    try:
        with urllib.request.urlopen(urllib.parse.urlunsplit(health), timeout=CONNECT_TIMEOUT_S):
            return
    except urllib.error.HTTPError as err:  # it answered: a proxy's 5xx means the server behind it does not
        if err.code < 500:
            return
        reason = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        reason = str(getattr(err, "reason", err))
    raise ConfigError(key, f"MLflow tracking server {redact(uri)} unreachable ({reason}); start it, or point "
                           "tracking_uri elsewhere")  # fmt: skip


def _connect_args(url: str) -> dict[str, Any]:
    """libpq options for psycopg and psycopg2: a bounded connect, keepalives both ways; nothing for others."""
    if sqlalchemy.engine.make_url(url).get_driver_name() not in ("psycopg", "psycopg2"):
        return {}
    return {"connect_timeout": CONNECT_TIMEOUT_S, **KEEPALIVES, "options": SERVER_KEEPALIVES}


# ---------------------------------------------------------------------------------------------------------------
# Outages


def open_storage(url: str, heartbeat: int, on_stale: Callable[[optuna.Study, FrozenTrial], None]) -> RDBStorage:
    """The study's storage, with heartbeats: a trial silent for 3 heartbeats is failed and handed to ``on_stale``.

    SQLite: a plain ``RDBStorage`` (a local file has no outages). A database server: ``OutageTolerantStorage``,
    its schema created under ``schema_lock`` so that workers starting together on a fresh database take turns.
    """
    kwargs: dict[str, Any] = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat,
                              "heartbeat_stale_trial_callback": on_stale}  # fmt: skip
    if path := sqlite_path(url):
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers write to one file
        create_sqlite(path, lambda aside: RDBStorage(aside, engine_kwargs=engine_kwargs).engine.dispose())
        return retry_schema_race(lambda: RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs))
    engine_kwargs = {"pool_pre_ping": True, "connect_args": _connect_args(url)}

    def create() -> RDBStorage:
        with schema_lock(url, "optuna"):
            return OutageTolerantStorage(url, engine_kwargs=engine_kwargs, **kwargs)

    return retrying(lambda: retry_schema_race(create))


def retry_schema_race(create: Callable[[], T]) -> T:
    """``create()``, again after a moment when it lost a race to create a schema (a duplicate type or table):
    a moment later the schema exists and opening it is a read. Covers racers that do not take ``schema_lock``."""
    for attempt in range(SCHEMA_RETRIES):
        try:
            return create()
        except Exception as err:
            if attempt == SCHEMA_RETRIES - 1 or not SCHEMA_RACE.search(str(err)):
                raise
            time.sleep(RETRY_S * (1 + attempt))
    raise AssertionError("unreachable")


def create_sqlite(path: Path, build: Callable[[str], object]) -> None:
    """Creates the SQLite store at ``path`` if it is missing: ``build(url)`` makes its schema in a file beside it,
    which then takes its name by a hard link (atomic, and never over a file made meanwhile). Creators take turns
    under a lock file; what a killed one left beside the path (its file, its journal) is removed by the next. MLflow
    and Optuna migrate a new schema in many steps, and a SIGKILL between two of them would leave a store that every
    later start fails to open."""
    if path.exists():
        return
    lock = _FileLock(path.with_name(f"{path.name}.create.lock"))
    lock.acquire()
    try:
        if path.exists():  # another process created it while this one waited
            return
        aside = path.with_name(f".{path.name}.creating")
        for leftover in (aside, aside.with_name(aside.name + "-journal")):
            leftover.unlink(missing_ok=True)
        build(f"sqlite:///{aside}")
        # Never over a file: a process not under this lock (a poller, optuna's CLI, a dashboard) may have made one
        # meanwhile and hold it open; then that one is the store.
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink()
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------------------------
# Locks


class PlanLock:
    """A lock held from "is a trial waiting?" until the trial is taken (or the study's set-up is done).

    PostgreSQL: an advisory lock keyed by the study name, on a connection of its own held while locked; workers on
    every machine that share the database exclude each other, and a killed worker's lock ends with its session
    (a vanished machine's within ~60 s, by keepalives). It needs sessions of its own: through a pooler such as
    PgBouncer, session pooling, not transaction pooling.
    SQLite: an ``flock`` on ``<db file>.<study>.lock`` beside the database (one per study, opened without following
    a symlink). Other storages are refused (``ConfigError``). ``release()`` may come before the ``with`` block
    ends (the objective releases once its trial is taken) and may be called again.
    """

    def __init__(self, storage_url: str, study_name: str) -> None:
        self._lock = _lock_for(storage_url, f"plan.{study_name}")

    def __enter__(self) -> PlanLock:
        self._lock.acquire()
        return self

    def release(self) -> None:
        self._lock.release()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def schema_lock(url: str, store: str) -> Iterator[None]:
    """Held while creating a store's tables (``store``: "optuna", "mlflow") on a database server; else a no-op."""
    if sqlite_path(url) or not url.startswith("postgresql"):
        yield
        return
    lock = _AdvisoryLock(url, f"schema.{store}")
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _lock_for(url: str, name: str) -> _FileLock | _AdvisoryLock:
    if path := sqlite_path(url):
        safe = name if re.fullmatch(r"[\w.\-]+", name) else hashlib.sha256(name.encode()).hexdigest()[:16]
        return _FileLock(path.with_name(f"{path.name}.{safe.removeprefix('plan.')}.lock"))
    if _dialect(url, "storage") == "postgresql":
        return _AdvisoryLock(url, name)
    raise ConfigError("storage", f"{redact(url)}: workers can share a study only through sqlite:///PATH (one "
                                 "machine) or PostgreSQL (any number)")  # fmt: skip


class _FileLock:
    def __init__(self, path: Any) -> None:
        self.path, self._fd = path, None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already held by this lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a new study's runs/ folder
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:  # ELOOP: a symlink planted where the lock file goes
            raise ConfigError("storage", f"lock file {self.path}: {err.strerror} (a symlink is refused)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@functools.cache
def _lock_engine(url: str) -> sqlalchemy.engine.Engine:
    """No pool: each lock is a session of its own, ended (and the lock with it) when released."""
    return sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool, connect_args=_connect_args(url),
                                    isolation_level="AUTOCOMMIT")  # fmt: skip


class _AdvisoryLock:
    """``pg_advisory_lock`` on a 64-bit key from ``name``, in a session held from acquire to release."""

    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.key = int.from_bytes(hashlib.sha256(f"ablate.{name}".encode()).digest()[:8], "big", signed=True)
        self._conn: sqlalchemy.engine.Connection | None = None

    def acquire(self) -> None:
        if self._conn is not None:
            raise RuntimeError(f"advisory lock {self.key}: already held by this lock")
        self._conn = retrying(self._lock)

    def _lock(self) -> sqlalchemy.engine.Connection:
        conn = _lock_engine(self.url).connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
        except BaseException:
            conn.invalidate()
            conn.close()
            raise
        return conn

    def release(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
        except sqlalchemy.exc.SQLAlchemyError:
            conn.invalidate()  # the session is gone (an outage), and its lock with it
        finally:
            conn.close()
