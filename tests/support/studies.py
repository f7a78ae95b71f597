"""Studies run as a user runs them, in processes of their own, and the invariants a finished (or healed) study must
keep, for the study, outage and multi-machine tests."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from ablate.core import names
from support.runs import TINY_STUDY

LONG_TRAIN = {**TINY_STUDY["train"], "steps": 1200, "eval_every": 400, "log_every": 200}  # a few seconds a trial


class StudyProcess:
    """``ablate study FILE --no-report`` in a process of its own session (a signal sent to its group reaches its
    workers, as Ctrl-C does), the default stores from the environment left out, its output in a file: a pipe nobody
    reads would fill and stall it."""

    def __init__(self, spec: Path, cwd: Path, *args: str, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:  # fmt: skip
        self.log = log or cwd / f"{spec.stem}-{uuid.uuid4().hex[:8]}.log"
        base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE")}
        cmd = [sys.executable, "-m", "ablate.cli", "study", str(spec), "--no-report", *args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env={**base, **(env or {})}, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 300) -> tuple[int, str]:
        """Its exit code and output; killed if still running after ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        finally:
            self.proc.kill()
        return code, self.output()


def wait_for_training(root: Path, study: StudyProcess, name: str = "tiny", timeout: float = 120) -> None:
    """Until a trial of the study in ``root/runs`` is mid-training: RUNNING, with its MLflow run recorded."""
    url = f"sqlite:///{root / 'runs' / 'optuna.db'}"
    deadline = time.time() + timeout
    while time.time() < deadline and study.proc.poll() is None:
        try:
            trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
        except Exception:  # not created yet, or the file is busy
            trials = []
        if any(t.state == TrialState.RUNNING and names.ATTR_RUN_ID in t.user_attrs for t in trials):
            return
        time.sleep(0.2)
    raise AssertionError(f"no trial started training: exit {study.proc.poll()}\n{study.output()[-3000:]}")


def stores(root: Path, name: str) -> tuple[optuna.Study, MlflowClient, list]:
    """The study, an MLflow client and the study's runs, from the stores a user's ``runs/`` holds under ``root``."""
    return stores_at(f"sqlite:///{root / 'runs' / 'optuna.db'}", f"sqlite:///{root / 'runs' / 'mlflow.db'}", name)


def stores_at(storage: str, tracking_uri: str, name: str) -> tuple[optuna.Study, MlflowClient, list]:
    study = optuna.load_study(study_name=name, storage=storage)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    return study, client, runs


def key_of(trial: optuna.trial.FrozenTrial) -> tuple:
    """A planned trial's key: (phase, variant, point)."""
    return tuple(trial.user_attrs.get(k) for k in (names.ATTR_PHASE, names.ATTR_VARIANT, names.ATTR_POINT))


def assert_consistent(root: Path, name: str, planned: int) -> list:
    """A finished study whose workers may have died and been healed: every planned trial completed once; each trial
    is one child run of the one study run, with its trial's status; nothing left RUNNING or WAITING."""
    return assert_consistent_at(f"sqlite:///{root / 'runs' / 'optuna.db'}", f"sqlite:///{root / 'runs' / 'mlflow.db'}",
                                name, planned)  # fmt: skip


def assert_consistent_at(storage: str, tracking_uri: str, name: str, planned: int) -> list:
    """``assert_consistent`` on any pair of stores (a database server, a tracking server)."""
    study, _, runs = stores_at(storage, tracking_uri, name)
    trials = study.get_trials()
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    keys = collections.Counter(key_of(t) for t in trials if t.state == TrialState.COMPLETE)
    assert len(keys) == planned and set(keys.values()) == {1}, keys
    children = [r for r in runs if r.data.tags.get(names.TAG_ROLE) == "trial"]
    parents = [r for r in runs if r.data.tags.get(names.TAG_ROLE) == "study"]
    assert len(parents) == 1 and parents[0].data.tags[names.TAG_SPEC_SHA256]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    per_trial = collections.Counter(int(r.data.tags[names.TAG_TRIAL]) for r in children)
    assert per_trial == collections.Counter(t.number for t in trials), ("not one run per trial", per_trial, [
        (t.number, t.state.name, t.user_attrs.get(names.ATTR_STATUS)) for t in trials])  # fmt: skip
    for t in trials:
        [run] = [r for r in children if r.data.tags[names.TAG_TRIAL] == str(t.number)]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        status = t.user_attrs.get(names.ATTR_STATUS)
        if t.state == TrialState.FAIL and status == names.COMPLETED:
            continue  # trained to the end, killed before Optuna recorded it: its run FINISHED, the trial re-ran
        expected = names.MLFLOW_STATUS.get(status) or names.MLFLOW_OF_STATE[t.state.name]
        assert run.info.status == expected, (t.number, t.state, status, run.info.status)
    return trials


def drained(storage: str, tracking_uri: str, name: str, planned: int) -> dict[str, int]:
    """The counts a study that met no failure must leave at zero: planned trials without a result, trials beyond one
    per key, trials not planned, trials that did not complete, runs left RUNNING, trials without exactly one
    FINISHED run, study runs other than one."""
    study, _, runs = stores_at(storage, tracking_uri, name)
    trials = study.get_trials()
    keys = collections.Counter(key_of(t) for t in trials)
    done = {key_of(t) for t in trials if t.state == TrialState.COMPLETE}
    trial_runs = [r for r in runs if r.data.tags.get(names.TAG_ROLE) == "trial"]
    return {
        "lost": planned - len(done),
        "duplicated": sum(n - 1 for n in keys.values()),
        "unplanned": sum(t.user_attrs.get(names.ATTR_PHASE) not in ("tune", "seed") for t in trials),
        "failed": sum(t.state != TrialState.COMPLETE for t in trials),
        "running": sum(r.info.status == "RUNNING" for r in runs),
        "runs_not_finished": sum(r.info.status != "FINISHED" for r in trial_runs),
        "runs_missing": len(trials) - len(trial_runs),
        "study_runs_extra": sum(r.data.tags.get(names.TAG_ROLE) == "study" for r in runs) - 1,
    }
