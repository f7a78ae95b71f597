"""Shared pytest fixtures. torch is imported lazily: report tests must run without it; helpers live in ``support``."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient
from support.servers import MlflowServer, PostgresServer, pg_database
from support.stores import StoreBuilder, build_ablation

_BUILT: dict[str, tuple] = {}  # built_ablation's stores, built once per session


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema created once: migrations take seconds, a copy milliseconds."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built tasks go to a cache shared by this test session (subprocesses too), never to the user's."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def built_ablation(tmp_path_factory) -> tuple[StoreBuilder, Path, str]:
    """The ablation stores and their report, built once per session (the report and browser tests share them)."""
    if "toy" not in _BUILT:
        from ablate.report import build_report

        builder = build_ablation(tmp_path_factory.mktemp("ablation"))
        out = builder.root / "reports"
        path = build_report("toy", storage=builder.storage, tracking_uri=builder.tracking_uri, out=out)
        _BUILT["toy"] = (builder, path, path.read_text())
    return _BUILT["toy"]


@pytest.fixture
def pg_url():
    """A fresh database on the PostgreSQL server of ``$ABLATE_TEST_POSTGRES`` (skipped when unreachable)."""
    with pg_database() as url:
        yield url


@pytest.fixture(scope="module")
def private_postgres():
    """A running ``PostgresServer`` (skipped when its binaries are missing or cannot run), shared by a module's
    tests (each in a database of its own, each leaving it running), removed after them."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def mlflow_server(tmp_path):
    """A running ``MlflowServer`` with its store in ``tmp_path / "server"``; stopped after the test."""
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh directory whose runs/ holds both stores, as on a user's clone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    return tmp_path
