"""A study on a real Slurm cluster (one node, on this machine): ``deploy/slurm/submit`` queues a job array of
workers sharing PostgreSQL (a fresh database) and an MLflow tracking server, and a report job after them. One array
task is cancelled mid-trial (scancel: SIGTERM, then SIGKILL after KillWait) and another is requeued as a preemption
would (stopped, queued again, started again); their trials go back to the queue and some task trains them. After the
report job: every planned trial completed once, one MLflow run per trial, nothing RUNNING, one report."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support.runs import ROOT, write_study
from support.slurm import SlurmCluster, missing
from support.studies import LONG_TRAIN, assert_consistent_at

from ablate.core import names

pytestmark = pytest.mark.postgres
TASKS = 3


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if why := missing():
        pytest.skip(why)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def running_trials(storage: str, name: str) -> list[optuna.trial.FrozenTrial]:
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    except Exception:  # not created yet
        return []
    return [t for t in trials if t.state == TrialState.RUNNING and names.ATTR_RUN_ID in t.user_attrs]


def wait_until(condition, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}\n{cluster.logs()}"
        time.sleep(0.5)


def test_a_job_array_shares_a_study_survives_a_cancelled_task_and_reports_once(slurm, pg_url, mlflow_server,
                                                                                tmp_path):  # fmt: skip
    spec = write_study(tmp_path / "cluster.yaml", name="cluster", train=LONG_TRAIN, workers=1,
                       scientific={"model.num_heads": [1, 2, 4]})  # fmt: skip
    planned = 6  # 3 variants x (1 tune + 1 seed) trials
    env = {"ABLATE_STORAGE": pg_url, "MLFLOW_TRACKING_URI": mlflow_server.uri,
           "ABLATE": str(Path(sys.executable).with_name("ablate"))}  # fmt: skip
    out = slurm.run(str(ROOT / "deploy" / "slurm" / "submit"), str(spec), "--tasks", str(TASKS), "--",
                    "--cpus-per-task=1", cwd=tmp_path, env=env)  # fmt: skip
    printed = out.strip().splitlines()
    array = printed[-1]
    assert printed[-3].startswith("sbatch --parsable --array=0-2 ") and "--dependency=afterany:" + array in printed[-2]

    # a trial mid-training on every task, then task 1 cancelled as a user's scancel or a preemption would
    wait_until(lambda: len(running_trials(pg_url, "cluster")) >= 2, 240, "trials training on two tasks", slurm)
    slurm.run("scancel", f"{array}_1")
    wait_until(lambda: slurm.states(array).get(f"{array}_2") == "RUNNING" and running_trials(pg_url, "cluster"), 240,
               "task 2 training", slurm)  # fmt: skip
    slurm.run("scontrol", "requeue", f"{array}_2")  # preempted: stopped, queued again, started again
    wait_until(lambda: slurm.states(array).get(f"{array}_2") == "PENDING", 120, "task 2 requeued", slurm)
    slurm.run("scontrol", "update", f"JobId={array}_2", "StartTime=now")  # Slurm holds a requeued job 2 minutes
    wait_until(lambda: not slurm.states(array) and not slurm.run("squeue", "-h").strip(), 600,
               "the array and the report job to end", slurm)

    trials = assert_consistent_at(pg_url, mlflow_server.uri, "cluster", planned)
    handed_back = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(names.ATTR_STATUS)
                   == "interrupted"]  # fmt: skip
    assert handed_back, "the cancelled task had no trial to hand back"
    assert not [t for t in trials if t.state == TrialState.FAIL and t.user_attrs.get(names.ATTR_STATUS) is None]
    assert "restart 1" in (tmp_path / f"ablate-{array}_2.out").read_text()  # the requeued task ran again
    worker_logs = sorted(tmp_path.glob(f"ablate-{array}_*.out"))
    assert len(worker_logs) == TASKS and not [p for p in worker_logs if "index.html" in p.read_text()]
    [report_log] = tmp_path.glob("ablate-report-*.out")
    assert "ablate report: cluster: reports/cluster/index.html" in report_log.read_text(), report_log.read_text()
    assert (tmp_path / "reports" / "cluster" / "index.html").exists()
