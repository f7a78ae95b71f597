"""The link `ablate ui` prints opens, in a real headless Chromium, MLflow's runs table with the study and its trials."""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from support.runs import TINY_STUDY
from support.servers import free_port

from ablate.core import names
from ablate.core.urls import runs_url
from ablate.runner.study import run_study
from ablate.stores.tracking import ensure_experiment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (Debian package `chromium`)"),
]
START_S = 120  # the MLflow server's start on a loaded 2-core runner
RUN_LINK = re.compile(r'href="#/experiments/(\w+)/runs/([0-9a-f]{32})"[^>]*>(?:<[^>]+>)*([^<]+)<')


def serving(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def dump_dom(tmp_path: Path, url: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000", "--dump-dom", url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def test_the_printed_link_shows_the_runs_table_with_the_study_run_and_its_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("ABLATE_STORAGE", f"sqlite:///{tmp_path / 'optuna.db'}")
    path = tmp_path / "browsed.yaml"
    path.write_text(yaml.safe_dump({**TINY_STUDY, "name": "browsed"}))
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    # The study's experiment exists before `ablate ui` starts (as the newest one, it is the one linked), so the
    # server boots while the study runs: half a minute each on a loaded 2-core runner.
    experiment_id = ensure_experiment(client, "browsed")

    port, log = free_port(), tmp_path / "ui.log"
    # One worker and no GenAI job runners: the same UI, started in a third of the time.
    env = {**os.environ, "MLFLOW_WORKERS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as err:
        ui = subprocess.Popen([sys.executable, "-m", "ablate.cli", "ui", "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=err, text=True)  # fmt: skip
    try:
        url = ui.stdout.readline().strip()
        assert url == runs_url(experiment_id, port=port)
        assert run_study(path) == 0  # with its report: the answer goes onto the study's run
        deadline = time.monotonic() + START_S
        while not serving(port) and ui.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert serving(port), f"the MLflow UI did not start: {log.read_text()[-2000:]}"
        dom = dump_dom(tmp_path, url)
        parent = optuna.load_study(study_name="browsed", storage=os.environ["ABLATE_STORAGE"]).user_attrs[
            names.ATTR_PARENT_RUN_ID]  # fmt: skip
        run_page = dump_dom(tmp_path, f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{parent}")
    finally:
        ui.send_signal(signal.SIGTERM)  # as `kill` would; Ctrl-C takes the same path
        ui.wait(timeout=60)

    runs = {r.info.run_id: r for r in client.search_runs([experiment_id])}
    (study_run,) = [r for r in runs.values() if r.data.tags[names.TAG_ROLE] == "study"]
    trials = {run_id: r.info.run_name for run_id, r in runs.items() if r.data.tags[names.TAG_ROLE] == "trial"}
    assert "0-tune-base" in trials.values()
    assert 'role="grid"' in dom and "Overview" not in dom  # the runs table, not the GenAI overview
    shown = {run_id: name for exp, run_id, name in RUN_LINK.findall(dom) if exp == experiment_id}
    assert shown.get(study_run.info.run_id) == "browsed"
    assert {shown[i] for i in trials if i in shown} == set(trials.values())  # every trial, listed flat
    headline = (tmp_path / "reports" / "browsed" / "summary.md").read_text().splitlines()[0].removeprefix("# ")
    assert "decided" in headline and html.escape(headline.split(": ", 1)[1][:60]) in run_page  # the note, shown

    assert ui.returncode == 0
    with pytest.raises(OSError):  # the server's workers stopped with it: nothing listens any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
