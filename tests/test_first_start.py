"""A first start that a kill cannot break: SIGKILL while MLflow or Optuna builds a new SQLite store (a lost node, an
OOM kill, a scheduler's kill) is followed by a start that opens the store and works, with nothing to delete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

# A child that builds a store and SIGKILLs itself once the store's file (or the one built aside) reaches a size:
# part of the way through the migrations, the moment a kill used to leave a store no later start could open.
KILLED_AT_SIZE = """
import os, signal, sys, threading, time
from pathlib import Path
runs, size, store = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def watch():
    while True:
        for f in runs.glob("*" + store + ".db*"):
            try:
                if f.stat().st_size >= size:
                    os.kill(os.getpid(), signal.SIGKILL)
            except OSError:  # a journal gone between the listing and the look
                pass
        time.sleep(0.001)
threading.Thread(target=watch, daemon=True).start()
if store == "mlflow":
    from ablate.stores.tracking import prepare_store
    prepare_store(f"sqlite:///{runs}/mlflow.db")
else:
    from ablate.stores.storage import open_storage
    open_storage(f"sqlite:///{runs}/optuna.db", 60, lambda study, trial: None)
"""


def kill_first_start(runs: Path, store: str, size: int) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_AT_SIZE, str(runs), str(size), store], timeout=120,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == -9, f"the child was not killed mid-build: {done.returncode} {done.stderr[-500:]}"


@pytest.mark.parametrize("size", [60_000, 400_000, 800_000])  # of about 950 kB: early, middle and late migrations
def test_a_kill_while_mlflow_builds_its_store_leaves_a_store_the_next_start_opens(tmp_path: Path, size: int) -> None:
    runs = tmp_path / "runs"
    kill_first_start(runs, "mlflow", size)
    from ablate.stores.tracking import client_for, ensure_experiment

    client = client_for(f"sqlite:///{runs}/mlflow.db")
    run = client.create_run(ensure_experiment(client, "after-a-kill"))
    client.set_terminated(run.info.run_id)
    assert MlflowClient(f"sqlite:///{runs}/mlflow.db").get_run(run.info.run_id).info.status == "FINISHED"
    assert sorted(p.name for p in runs.iterdir() if "creating" in p.name) == []  # the killed build's file: gone


def test_a_kill_while_optuna_builds_its_store_leaves_a_store_the_next_start_opens(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    kill_first_start(runs, "optuna", 1)
    from ablate.stores.storage import open_storage

    storage = open_storage(f"sqlite:///{runs}/optuna.db", 60, lambda study, trial: None)
    study = optuna.create_study(storage=storage, study_name="after-a-kill")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=1)
    assert len(study.trials) == 1
