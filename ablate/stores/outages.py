"""Outages of the study storage's database server, waited out: what counts as one (``is_outage``), the wait
(``$ABLATE_STORAGE_WAIT_S``, one line when it starts and one when it ends), and ``OutageTolerantStorage``, Optuna's
RDB storage whose every call retries through an outage."""

from __future__ import annotations

import functools
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import sqlalchemy
import sqlalchemy.exc
from optuna.storages import RDBStorage

from ablate.core.config import ConfigError

T = TypeVar("T")
WAIT_ENV = "ABLATE_STORAGE_WAIT_S"
DEFAULT_WAIT_S = 300.0  # how long an outage of the study storage is waited out before a worker gives up
MAX_BACKOFF_S = 2.0  # short: once the server is back, heartbeats resume within this
NOT_AN_OUTAGE = ("28", "3D", "40")  # SQLSTATE classes: bad credentials, no such database, deadlocks (Optuna retries)
# ... and as libpq words them when connecting, where psycopg gives no SQLSTATE
NOT_AN_OUTAGE_TEXT = re.compile(r"does not exist|authentication failed|pg_hba\.conf|password|permission denied")


def wait_s() -> float:
    """Seconds an outage of the study storage is waited out: ``$ABLATE_STORAGE_WAIT_S``, else ``DEFAULT_WAIT_S``."""
    raw = os.environ.get(WAIT_ENV) or str(DEFAULT_WAIT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"${WAIT_ENV}", f"must be a number of seconds >= 0, got {raw!r}")
    return value


def error_line(err: BaseException) -> str:
    """The first line of what the driver said (under Optuna's and SQLAlchemy's wrappers), with its type."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, sqlalchemy.exc.DBAPIError):
        cause = cause.__cause__ or cause.__context__
    orig = getattr(cause, "orig", None) or cause or err
    text = str(orig).strip().splitlines()
    return f"{type(orig).__name__}: {text[0] if text else ''}".strip()


def is_outage(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it) is a lost or refused connection to a database server: worth waiting out.

    Optuna wraps SQLAlchemy's errors in ``StorageInternalError``; the cause chain is searched. Bad credentials, a
    missing database and bad SQL are errors, not outages.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, sqlalchemy.exc.DBAPIError):
            state = str(getattr(err.orig, "sqlstate", None) or "")
            if err.connection_invalidated:
                return True
            if isinstance(err, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
                return not state.startswith(NOT_AN_OUTAGE) and not NOT_AN_OUTAGE_TEXT.search(str(err.orig))
            return False
        err = err.__cause__ or err.__context__
    return False


class _Outage:
    """What this process prints about an outage: one line when its first call fails, one when a call gets through."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self.recovered_at = -float("inf")  # time.monotonic() of the end of the last outage

    def waiting(self, err: BaseException, limit: float) -> None:
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()
                print(f"ablate: study storage unreachable ({error_line(err)}), waiting up to {limit:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip

    def give_up(self, limit: float) -> None:
        with self._lock:
            self._since = None  # the next outage (a process that goes on, a test) is announced again
            print(f"ablate: study storage still unreachable after {limit:.0f} s; giving up (${WAIT_ENV} sets how "
                  "long to wait)", file=sys.stderr, flush=True)  # fmt: skip

    def back(self) -> None:
        with self._lock:
            if self._since is not None:
                took = time.monotonic() - self._since
                self._since, self.recovered_at = None, time.monotonic()
                print(f"ablate: study storage reachable again after {took:.0f} s", file=sys.stderr, flush=True)


OUTAGE = _Outage()


_local = threading.local()


def retrying(fn: Callable[[], T], limit: float | None = None) -> T:
    """``fn()``, called again while it fails with an outage (``is_outage``), for up to ``limit`` s (``wait_s()``).

    Not nested: a storage method that calls another retries once, at the outermost call. A write whose commit
    reached the server but whose reply was lost is sent again. Optuna's writes are then harmless (an attribute
    or a value set twice), but two could in principle repeat: a trial created twice (``enqueue_trial``: a planned
    trial queued twice, so run twice) and a claim of a waiting trial (``set_trial_state_values`` to RUNNING, then
    refused as already made: the worker takes the next one, and the claimed trial is left RUNNING without a
    heartbeat, which Optuna never judges stale). Both need the connection lost between the commit and its reply.
    """
    if getattr(_local, "active", False):
        return fn()
    limit = wait_s() if limit is None else limit
    _local.active = True
    try:
        deadline, delay, waited = None, 0.25, False
        while True:
            try:
                result = fn()
            except Exception as err:
                if not is_outage(err):
                    raise
                now = time.monotonic()
                deadline = deadline or now + limit
                if now >= deadline:
                    OUTAGE.give_up(limit)
                    raise
                OUTAGE.waiting(err, limit)
                waited = True
                time.sleep(min(delay, deadline - now))
                delay = min(2 * delay, MAX_BACKOFF_S)
                continue
            if waited:
                OUTAGE.back()
            return result
    finally:
        _local.active = False


class OutageTolerantStorage(RDBStorage):
    """``RDBStorage`` whose every call waits out an outage of the database server (``retrying``).

    Heartbeats missed during an outage say nothing about the workers: for a grace period after this process saw
    the server come back, no trial is judged stale, so a live trial is never failed for the server's silence.
    """

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        stale = retrying(lambda: RDBStorage._get_stale_trial_ids(self, study_id))
        grace = (self.grace_period or 2 * (self.heartbeat_interval or 0)) + MAX_BACKOFF_S
        return [] if time.monotonic() - OUTAGE.recovered_at < grace else stale  # (this call may have waited too)


def _retried(name: str) -> Callable[..., Any]:
    method = getattr(RDBStorage, name)

    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        return retrying(lambda: method(self, *args, **kwargs))

    return call


# Every RDBStorage method that talks to the database, including the private ones ``_CachedStorage`` (the wrapper
# every Optuna study puts around its storage) calls; ``test_outages`` checks that list against Optuna's source.
RETRIED = ("create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
           "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
           "get_study_system_attrs", "get_trial_user_attrs", "get_trial_system_attrs", "get_all_studies",
           "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
           "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
           "get_trial_id_from_study_id_trial_number", "get_trial_number_from_id", "get_trial_params", "get_trial",
           "get_all_trials", "_get_trials", "get_n_trials", "get_best_trial", "_get_best_trial_id",
           "record_heartbeat")  # fmt: skip


for _name in RETRIED:
    setattr(OutageTolerantStorage, _name, _retried(_name))
