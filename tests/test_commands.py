"""The commands behind `ablate train` and `ablate ui`: what they print, the links into the MLflow UI, and stopping."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from mlflow import MlflowClient
from support.runs import TINY_RUN, Recorder, tiny
from support.servers import free_port

from ablate.commands import latest_experiment_id, stop_group, train_from_file
from ablate.core import names
from ablate.core.interrupts import sigterm_as_interrupt
from ablate.core.urls import runs_url


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty_store: Path) -> MlflowClient:
    """The default store (``$MLFLOW_TRACKING_URI``) is a fresh copy in tmp_path, the working directory."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    return MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")


def only_run(client: MlflowClient):
    (run,) = client.search_runs([client.get_experiment_by_name(names.DEFAULT_EXPERIMENT).experiment_id])
    return run


def test_ablate_train_runs_a_study_files_base_and_prints_one_line_with_the_runs_link(
    client: MlflowClient, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    study = {"name": "heads", "kind": "ablation", **TINY_RUN}  # keys other than model/task/train are not the run's
    path = tmp_path / "heads.yaml"
    path.write_text(yaml.safe_dump(study))
    assert train_from_file(path, ["model.num_heads=4"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    run = only_run(client)
    assert line.startswith("completed") and "make ui" in line and "val/loss=" in line
    link = f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert line.endswith(f"then {link}?workflowType=machine_learning")
    assert run.data.params["model.num_heads"] == "4" and run.data.tags[names.TAG_ROLE] == "run"


def test_runs_url_opens_the_machine_learning_runs_table_trials_listed_best_first() -> None:
    url = urlsplit(runs_url("7", port=5123))
    assert (url.scheme, url.netloc, url.path) == ("http", "127.0.0.1:5123", "/")
    route, query = url.fragment.split("?")
    assert route == "/experiments/7/runs"
    assert parse_qs(query) == {"workflowType": ["machine_learning"], "orderByKey": ["metrics.`val/loss`"],
                               "orderByAsc": ["true"]}  # fmt: skip
    assert runs_url("7", "abc") == "http://127.0.0.1:5000/#/experiments/7/runs/abc?workflowType=machine_learning"


def test_the_ui_opens_on_the_newest_experiment_not_mlflows_default(client: MlflowClient) -> None:
    assert latest_experiment_id(client.tracking_uri) is None  # only "Default": `ablate ui` shows the list
    first = client.create_experiment("first")
    assert latest_experiment_id(client.tracking_uri) == first
    second = client.create_experiment("second")
    assert latest_experiment_id(client.tracking_uri) == second


def test_sigterm_ends_the_run_failed_instead_of_running(client: MlflowClient) -> None:
    from ablate.stores.tracking import MLflowTracker
    from ablate.training.train import train

    class Terminate(Recorder):
        def on_step(self, step: int, metrics: dict) -> bool:
            if step == 10:
                os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or `timeout` would
            return False

    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        train(tiny(), [MLflowTracker(), Terminate()])
    run = only_run(client)
    assert run.info.status == "KILLED" and "SIGTERM" in run.data.tags[names.TAG_REASON]  # a stop, not a failure
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored


def test_a_stop_swallowed_in_a_weakref_callback_sets_the_flag_and_prints_no_traceback(monkeypatch):
    """SIGTERM landing in a weakref callback (SQLAlchemy's registry during garbage collection) cannot raise: Python
    prints it as "Exception ignored". The flag carries the stop, so that print is dropped; other errors still print."""
    import weakref

    from ablate.core.interrupts import STOP_REQUESTED

    class Thing:
        pass

    def collect(callback) -> None:
        thing = Thing()
        ref = weakref.ref(thing, callback)  # noqa: F841 - alive until the thing is collected
        del thing

    def fail(ref) -> None:
        raise ValueError("not a stop")

    printed = []  # what Python's hook would print as "Exception ignored in ..."
    record = lambda hook: printed.append(type(hook.exc_value).__name__)  # noqa: E731
    monkeypatch.setattr(sys, "unraisablehook", record)
    try:
        with sigterm_as_interrupt():
            collect(lambda ref: signal.raise_signal(signal.SIGTERM))
            assert STOP_REQUESTED.is_set()
            collect(fail)
    finally:
        STOP_REQUESTED.clear()
    assert printed == ["ValueError"] and sys.unraisablehook is record  # restored


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie may wait for a reaper that never comes in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("trap", ["", "trap '' TERM;"], ids=["polite", "ignores-sigterm"])
def test_stopping_the_ui_stops_every_process_of_its_group(trap: str) -> None:
    # A leader whose child outlives it unless the whole group is signalled, as uvicorn's workers would.
    script = f"{trap} sleep 300 & echo $!; wait"
    leader = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = int(leader.stdout.readline())
    try:
        assert _running(child)
        stop_group(leader, wait_s=0.5)  # the one that ignores SIGTERM gets SIGKILL after 0.5 s
        assert leader.returncode is not None
        deadline = time.monotonic() + 5  # a signalled process takes a moment to be scheduled and die
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _running(child)
    finally:  # never leave a sleeper behind when the assertion fails
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leader.pid, signal.SIGKILL)


def test_ablate_dashboard_without_optuna_dashboard_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from ablate import commands

    monkeypatch.setattr(commands.sys, "executable", str(tmp_path / "bin" / "python"))  # a venv without it
    assert commands.open_dashboard(port=free_port()) == 2
    assert "make dashboard" in capsys.readouterr().err


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.load(response)
    except OSError:
        return None


def test_ablate_dashboard_serves_the_study_storage_from_its_first_study_on(tmp_path: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason="the `dashboard` extra (`make dashboard` installs it)")
    import optuna

    storage = f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}"  # a fresh clone: not even the folder yet
    port = free_port()
    env = {**os.environ, "ABLATE_STORAGE": storage}
    cmd = [sys.executable, "-m", "ablate.cli", "dashboard", "--port", str(port)]
    dashboard = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert dashboard.stdout.readline().strip() == f"http://127.0.0.1:{port}/dashboard"
        api = f"http://127.0.0.1:{port}/api/studies"
        deadline = time.monotonic() + 60
        while (found := get_json(api)) is None and dashboard.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert found == {"study_summaries": []}
        optuna.create_study(study_name="later", storage=storage)  # what `ablate study` writes, seen live
        assert [s["study_name"] for s in get_json(api)["study_summaries"]] == ["later"]
    finally:
        dashboard.send_signal(signal.SIGTERM)
        dashboard.wait(timeout=30)
    assert dashboard.returncode == 0 and get_json(api) is None  # stopped with its server
