"""The commands ``ablate`` dispatches to besides a study and a report: train one run, the MLflow UI, Optuna's
dashboard. Links into the MLflow UI come from ``urls.runs_url`` only."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

from ablate.core import names
from ablate.core.interrupts import sigterm_as_interrupt
from ablate.core.urls import RUNS_TABLE, UI_HOST, redact, runs_url

DASHBOARD_PORT = 8080  # optuna-dashboard's own default
STOP_WAIT_S = 10.0  # after SIGTERM, the UI's server gets this long to exit before its group gets SIGKILL


def latest_experiment_id(tracking_uri: str) -> str | None:
    """The most recently created experiment in the store, MLflow's empty ``Default`` aside; None when there is none."""
    from ablate.stores.tracking import client_for

    found = client_for(tracking_uri).search_experiments(
        filter_string="name != 'Default'", order_by=["creation_time DESC"], max_results=1
    )
    return found[0].experiment_id if found else None


def train_from_file(path: str | Path, overrides: list[str] = ()) -> int:
    """``ablate train CONFIG``: one tracked run; prints one line. Exit 0 when it completed, 1 otherwise."""
    from ablate.design.preflight import load_run_config

    config = load_run_config(path, overrides)  # a bad config fails before torch and MLflow are imported
    from ablate.tasks.checks import describe_data

    if line := describe_data(config.task):
        print(f"ablate train: {line}")
    from ablate.core.urls import default_tracking_uri
    from ablate.stores.storage import check_tracking

    check_tracking(default_tracking_uri(), "MLFLOW_TRACKING_URI")  # in seconds, not after MLflow's retries

    from ablate.stores.tracking import MLflowTracker
    from ablate.training.train import train

    tracker = MLflowTracker(run_name=Path(path).stem, tags={names.TAG_ROLE: "run"})
    try:
        with sigterm_as_interrupt():
            result = train(config, callbacks=(tracker,))
    except KeyboardInterrupt as err:
        print(f"ablate train: interrupted ({err or 'Ctrl-C'}); run {tracker.run_id} ended KILLED", file=sys.stderr)
        return 130
    shown = [k for k in result.metrics if k.startswith(("val/", "best/"))] + [names.WALL_S]
    summary = " ".join(f"{k}={result.metrics[k]:.4g}" for k in shown if k in result.metrics)
    print(
        f"{result.status}{' (' + result.reason + ')' if result.reason else ''}: {summary} run={tracker.run_id} "
        f"look: `make ui`, then {runs_url(tracker.experiment_id, tracker.run_id)}"
    )
    return 0 if result.status == "completed" else 1


def open_ui(port: int = 5000) -> int:
    """``ablate ui``: the MLflow UI on 127.0.0.1 against the default store until Ctrl-C or SIGTERM; prints the runs
    table of the newest experiment."""
    from ablate.core.urls import default_tracking_uri
    from ablate.stores.tracking import artifact_root, prepare_store

    uri = default_tracking_uri()
    prepare_store(uri)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", UI_HOST]
    command += ["--port", str(port)]
    root = artifact_root(uri)
    if root:
        command += ["--default-artifact-root", root]
    experiment_id = latest_experiment_id(uri)
    workflow = urlencode({"workflowType": RUNS_TABLE["workflowType"]})
    url = runs_url(experiment_id, port=port) if experiment_id else f"http://{UI_HOST}:{port}/#/experiments?{workflow}"
    print(f"MLflow UI (store {redact(uri)}) starting; Ctrl-C stops it", file=sys.stderr)
    return serve(command, url)


def open_dashboard(port: int = DASHBOARD_PORT, storage: str | None = None) -> int:
    """``ablate dashboard``: Optuna's dashboard (the ``dashboard`` extra) on 127.0.0.1 against the study storage
    (``storage``, else the default one of ``ablate study``) until Ctrl-C or SIGTERM. Exit 2 when it is not installed."""
    executable = Path(sys.executable).with_name("optuna-dashboard")
    if not executable.exists():
        print("ablate dashboard: optuna-dashboard is not installed; `make dashboard` installs it", file=sys.stderr)
        return 2
    from optuna.storages import RDBStorage

    from ablate.core.urls import default_storage, sqlite_path

    url = storage or default_storage()
    path = sqlite_path(url)
    if path is not None:  # SQLite creates the file but not its folder
        path.parent.mkdir(parents=True, exist_ok=True)
    RDBStorage(url)  # the tables of a store no study has written yet: the dashboard opens stores as they are
    print(f"Optuna dashboard (storage {redact(url)}) starting; Ctrl-C stops it", file=sys.stderr)
    command = [str(executable), "--host", UI_HOST, "--port", str(port), "--quiet", url]
    return serve(command, f"http://{UI_HOST}:{port}/dashboard")


def serve(command: list[str], url: str) -> int:
    """Print ``url``, then run the server ``command`` until it exits, Ctrl-C or SIGTERM. The server gets its own
    process group, stopped whole on the way out: its workers (uvicorn's, gunicorn's, MLflow's job runners) would
    otherwise outlive us and keep the port."""
    print(url, flush=True)
    server = subprocess.Popen(command, start_new_session=True)
    try:
        with sigterm_as_interrupt():
            return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop_group(server)


def stop_group(leader: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """SIGTERM to the process group that ``leader`` heads; once the leader has exited (or after ``wait_s``), SIGKILL
    to whatever is left of the group. Waiting on the leader rather than polling the group: an orphan's zombie stays
    in the group until some init reaps it, which in a container may take seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        leader.wait(wait_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
