"""Every training run as an MLflow run: params, tags, metric histories, the dataset, artifacts.

The tracker is a train callback that talks to ``MlflowClient`` with explicit run ids (never the fluent active run),
so several trials can log from one process. Metrics are buffered and handed (at an evaluation, at most every
``FLUSH_EVERY_S``) to one background thread that writes them with ``log_batch``: a logged step costs a list append,
whatever the store, and a run's record is complete when ``on_end`` returns.
"""

from __future__ import annotations

import functools
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

import ablate
from ablate.core import names
from ablate.core.config import flatten, to_dict, to_yaml
from ablate.core.interrupts import deferred
from ablate.core.urls import default_tracking_uri, is_database, sqlite_path
from ablate.stores.figures import save_attention_maps

if TYPE_CHECKING:  # torch is imported when a run starts, not by `ablate ui` reading the store
    from ablate.training.train import RunResult, RunStart

MAX_BATCH_METRICS = 1000  # MLflow's cap on metrics in one log_batch
MAX_BATCH_PARAMS = 100  # and on params
TAG_ABLATE_VERSION = "ablate.version"
TAG_TORCH_VERSION = "torch.version"
TAG_CUDA_VERSION = "cuda.version"
TAG_TRACKING_ERROR = "ablate.tracking_error"  # a background write failed: the record may be incomplete
SCHEMA_SAMPLE_ROWS = 16
FLUSH_EVERY_S = 10.0  # buffered metrics reach the store at the first evaluation this long after the last write


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite store live beside it (``runs/artifacts``); other stores keep their server's default."""
    path = sqlite_path(tracking_uri)
    return str(path.parent / "artifacts") if path else None


def prepare_store(tracking_uri: str) -> None:
    """Make ``tracking_uri`` usable: a SQLite file's folder created; a database's MLflow schema created once.

    Processes starting together on a fresh database race to create MLflow's tables (a duplicate type or table,
    or an "out-of-date schema" while the winner is still migrating): on PostgreSQL they take turns under a
    database lock (any machine), and a loser that did not take it (an ``mlflow server``) is retried.
    """
    if path := sqlite_path(tracking_uri):
        from ablate.stores.storage import create_sqlite  # imports optuna: not for an http store

        create_sqlite(path, lambda aside: _migrate(aside, artifact_root(tracking_uri)))  # built aside: see there
    if is_database(tracking_uri):
        _create_schema(tracking_uri)


def _migrate(tracking_uri: str, artifacts: str | None) -> None:
    """MLflow's schema at ``tracking_uri``, its engine closed (the file is renamed next)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    SqlAlchemyStore(tracking_uri, default_artifact_root=artifacts).engine.dispose()


@functools.cache
def _create_schema(tracking_uri: str) -> None:
    """Once per process and store: MLflow caches the store (and skips this work) once a client was made."""
    from ablate.stores.storage import retry_schema_race, schema_lock  # imports optuna: not for an http store

    def create() -> None:
        with schema_lock(tracking_uri, "mlflow"):
            MlflowClient(tracking_uri)

    retry_schema_race(create)


def client_for(tracking_uri: str) -> MlflowClient:
    """A client of ``tracking_uri``, its SQLite folder or database schema created if needed."""
    prepare_store(tracking_uri)
    return MlflowClient(tracking_uri)


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if it doesn't exist yet."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
    except MlflowException:  # another worker created it between our two calls
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, str]:
    """(commit, dirty) of the tree holding this package; ("unknown", "unknown") outside git. Cached per process."""
    where = Path(ablate.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    return commit or "unknown", "true" if status.strip() else "false"


class _Writer:
    """MLflow calls run in order on one background thread: the training loop never waits on the store (a SQLite
    commit costs ~30 ms, six steps at GPU speed). ``close`` waits for the queue and returns the first error."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._work, name="ablate-mlflow-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self._queue.put((fn, args, kwargs))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            fn, args, kwargs = item
            try:
                fn(*args, **kwargs)
            except Exception as err:  # keep going: one failed write must not drop the metrics after it
                self.error = self.error or err

    def close(self) -> Exception | None:
        self._queue.put(None)
        self._thread.join()
        return self.error


class MLflowTracker:
    """A train callback recording one run; nested under ``parent_run_id`` when given (a study's trial).

    ``run_id`` is set in ``on_start``. Params, the dataset and metrics are written by a background thread (metrics
    batched, sent at evaluations at most every ``FLUSH_EVERY_S``); ``on_end`` waits for them, then logs the final
    summaries, status and artifacts. The run always ends with a final status (``names.MLFLOW_STATUS``), also when
    training raised: the trainer calls ``on_end`` with status ``failed`` before re-raising.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = names.DEFAULT_EXPERIMENT,
        *,
        parent_run_id: str | None = None,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = client_for(self.tracking_uri)
        self.experiment, self.parent_run_id, self.run_name = experiment, parent_run_id, run_name
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._writer: _Writer | None = None
        self._buffer: list[Metric] = []
        self._last_step: dict[str, int] = {}  # key -> last logged step: final summaries never duplicate a point
        self._flushed_at = time.monotonic()

    # -- callback hooks -------------------------------------------------------------------------------------------
    def on_start(self, start: RunStart) -> None:
        derived = start.derived
        self._create_run(
            {
                names.TAG_DEVICE: derived.get("device_name", derived.get("device", "unknown")),
                names.TAG_BACKEND: derived.get("backend", start.config.model.backend),
                TAG_CUDA_VERSION: derived.get("cuda", "none"),
            }
        )
        params = {**flatten(to_dict(start.config)), **{f"derived.{k}": v for k, v in derived.items()}}
        items = [Param(k, str(v)) for k, v in params.items()]
        self._writer = _Writer()
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            self._writer.submit(self.client.log_batch, self.run_id, params=items[i : i + MAX_BATCH_PARAMS])
        self._writer.submit(self._log_dataset, start.task)
        self._writer.submit(self.client.log_text, self.run_id, to_yaml(start.config), names.CONFIG_ARTIFACT)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._add(step, metrics)
        if len(self._buffer) >= MAX_BATCH_METRICS:
            self.flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._add(step, {k: v for k, v in metrics.items() if k != "step"})
        # Live curves in the UI, at most every FLUSH_EVERY_S: each write holds the GIL for ~15 ms, which a
        # launch-bound GPU loop would feel if it came at every evaluation of a short run.
        if time.monotonic() - self._flushed_at >= FLUSH_EVERY_S:
            self.flush()

    def on_end(self, result: RunResult) -> None:
        if self.run_id is None:  # failed before on_start: still leave a record of the attempt
            self._create_run({})
            if result.config_yaml:
                self.client.log_text(self.run_id, result.config_yaml, names.CONFIG_ARTIFACT)
        try:
            final = {k: v for k, v in result.metrics.items() if self._last_step.get(k) != result.steps}
            self._add(result.steps, final)
            tags = {names.TAG_STATUS: result.status}
            if result.status != "completed":
                tags[names.TAG_REASON] = (result.reason or result.status)[:5000]
            writer = self._writer or _Writer()
            writer.submit(self._write, self._buffer, tags)
            self._buffer = []
            error = None
            try:  # drawn while the writer sends the last metrics
                self._log_artifacts(result)
            except Exception as err:
                error = err
            error = writer.close() or error
            if error is not None:
                print(f"ablate: MLflow logging failed for run {self.run_id}: {error}", file=sys.stderr)
                self.client.set_tag(self.run_id, TAG_TRACKING_ERROR, f"{type(error).__name__}: {error}"[:5000])
        finally:  # whatever failed above, the run must not stay RUNNING
            self.client.set_terminated(self.run_id, names.MLFLOW_STATUS.get(result.status, "FAILED"))

    # -- helpers --------------------------------------------------------------------------------------------------
    def _create_run(self, extra_tags: dict[str, str]) -> None:
        self.experiment_id = ensure_experiment(self.client, self.experiment)
        commit, dirty = git_state()
        import torch

        tags = {
            names.TAG_GIT_COMMIT: commit,
            names.TAG_GIT_DIRTY: dirty,
            TAG_ABLATE_VERSION: ablate.__version__,
            TAG_TORCH_VERSION: torch.__version__,
            TAG_CUDA_VERSION: torch.version.cuda or "none",
            **extra_tags,
            **self.tags,
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        with deferred():  # a stop mid-request would leave a run on the server that the clean-up creates again
            self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=self.run_name).info.run_id

    def _add(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        self._last_step.update(dict.fromkeys(metrics, step))

    def flush(self) -> None:
        """Hand the buffered metrics to the writer thread (or write them now if there is none)."""
        buffer, self._buffer, self._flushed_at = self._buffer, [], time.monotonic()
        if self._writer is None:
            self._write(buffer)
        else:
            self._writer.submit(self._write, buffer)

    def _write(self, metrics: list[Metric], tags: dict[str, str] | None = None) -> None:
        run_tags = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, max(len(metrics), 1), MAX_BATCH_METRICS):  # MLflow's cap per call
            self.client.log_batch(self.run_id, metrics=metrics[i : i + MAX_BATCH_METRICS], tags=run_tags)
            run_tags = []

    def _log_dataset(self, task: Any) -> None:
        """The training split as the run's input, identified by the task's digest."""
        self.client.log_inputs(self.run_id, datasets=[dataset_input(task)])

    def _log_artifacts(self, result: RunResult) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if result.attention_maps is not None:
                path = Path(tmp) / Path(names.MAPS_ARTIFACT).name
                save_attention_maps(result.attention_maps, path)
                self.client.log_artifact(self.run_id, str(path), str(Path(names.MAPS_ARTIFACT).parent))
            if result.checkpoint is not None:
                import torch

                path = Path(tmp) / "model.pt"
                torch.save(result.checkpoint, path)
                self.client.log_artifact(self.run_id, str(path), names.CHECKPOINT_DIR)


_DATASETS: dict[str, Dataset] = {}  # task digest -> entity: a study's trials share one


def _dataset_entity(task: Any) -> Dataset:
    """The MLflow dataset of ``task``'s training split: schema read off a few rows (MLflow's inference walks every
    element of up to 10,000 rows: seconds), profile and digest of the whole split."""
    if task.digest in _DATASETS:
        return _DATASETS[task.digest]
    import mlflow.data
    from mlflow.data.code_dataset_source import CodeDatasetSource

    train = task.data["train"]
    sample = train.select(range(min(SCHEMA_SAMPLE_ROWS, train.num_rows)))
    source = CodeDatasetSource(tags={"ablate.task": task.name})  # built here, not loadable from a hub
    with warnings.catch_warnings():  # MLflow's hint about missing values in integer columns: ours have none
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column", category=UserWarning)
        fields = mlflow.data.from_huggingface(sample, name=task.name, digest=task.digest, source=source).to_dict()
    fields["profile"] = json.dumps(
        {"num_rows": train.num_rows, "dataset_size": train.dataset_size, "size_in_bytes": train.size_in_bytes}
    )
    _DATASETS[task.digest] = Dataset(**fields)
    return _DATASETS[task.digest]


def dataset_input(task: Any) -> DatasetInput:
    return DatasetInput(_dataset_entity(task), tags=[InputTag("mlflow.data.context", "train")])
