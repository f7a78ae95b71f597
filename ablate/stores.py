"""Where results live unless told otherwise: one rule for the trainer, the study runner and the report.

Standard library only, so the report can use it without importing torch.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the SQLite store ``runs/mlflow.db`` under the current directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'runs' / 'mlflow.db'}"


def default_storage() -> str:
    """``$ABLATE_STORAGE``, else the Optuna SQLite store ``runs/optuna.db`` under the current directory."""
    return os.environ.get("ABLATE_STORAGE") or f"sqlite:///{Path.cwd().resolve() / 'runs' / 'optuna.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL (MLflow's or Optuna's), None for any other store."""
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
