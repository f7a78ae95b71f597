"""The study storage: Optuna's RDB storage opened the way every worker needs it, and the lock that plans trials.

Opening copes with workers that start together on a fresh database (they race to create Optuna's schema) and
fails a trial whose worker went silent (heartbeats). ``PlanLock`` makes "is there a waiting trial? plan or take
it" atomic, so a worker never starts an unplanned (sampled) trial in an ablation.
"""

from __future__ import annotations

import fcntl
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from ablate.stores import sqlite_path

SCHEMA_RETRIES = 5
RETRY_S = 1.0


def open_storage(url: str, heartbeat: int, on_stale: Callable[[optuna.Study, FrozenTrial], None]) -> RDBStorage:
    """The study's storage, with heartbeats: a trial silent for 3 heartbeats is failed and handed to ``on_stale``."""
    engine_kwargs: dict[str, Any] = {}
    if path := sqlite_path(url):
        path.parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers write to one file
    for attempt in range(SCHEMA_RETRIES):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat,
                              grace_period=3 * heartbeat, heartbeat_stale_trial_callback=on_stale)  # fmt: skip
        except sqlalchemy.exc.DBAPIError as err:
            # Workers started together on a fresh database race to create Optuna's tables; the loser sees a
            # duplicate type or table. A moment later the schema exists and opening it is a read.
            if attempt == SCHEMA_RETRIES - 1 or "already exists" not in str(err) and "UniqueViolation" not in str(err):
                raise
            time.sleep(RETRY_S * (1 + attempt))
    raise AssertionError("unreachable")


class PlanLock:
    """A lock held from "is a trial waiting?" until the trial is taken (or the plan's setup is done).

    On SQLite, a file lock beside the database; elsewhere (for now) a file lock in the temp folder, which covers
    workers on one machine only.
    """

    def __init__(self, storage_url: str, study_name: str) -> None:
        if path := sqlite_path(storage_url):
            self.path = path.with_name(f"{path.name}.{study_name}.lock")
        else:
            key = hashlib.sha256(f"{storage_url}|{study_name}".encode()).hexdigest()[:16]
            self.path = Path(tempfile.gettempdir()) / f"ablate-{key}.lock"
        self._file: Any = None

    def __enter__(self) -> PlanLock:
        self._file = open(self.path, "a")  # noqa: SIM115 (released in release(), maybe before __exit__)
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __exit__(self, *exc: object) -> None:
        self.release()
