"""The shipped deploy files say what a cluster needs (no cluster or image registry here, so they are read, not run;
``test_slurm`` runs the Slurm ones): a Kubernetes Indexed Job of workers whose grace fits the pod's, a report Job,
a container image built from the lock with ``ablate`` as its entry point, Slurm scripts that stop in time."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from support.runs import ROOT

from ablate.runner.study import STOP_GRACE_S

DEPLOY = ROOT / "deploy"


def documents(name: str) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text())}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_the_study_job_is_an_indexed_job_of_workers_that_hand_back_within_the_pods_grace():
    job = documents("study-job.yaml")["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["parallelism"] == spec["completions"] >= 2
    [worker] = pod["containers"]
    assert worker["args"][:1] == ["study"] and "--no-report" in worker["args"]
    assert float(flag(worker["args"], "--grace")) + 5 <= pod["terminationGracePeriodSeconds"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["envFrom"] == [{"secretRef": {"name": "ablate-stores"}}]
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy needs
    [rule] = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "Ignore" and rule["onPodConditions"] == [{"type": "DisruptionTarget"}]


def test_the_report_job_builds_the_report_of_the_same_study_onto_a_volume():
    docs = documents("report-job.yaml")
    pod = docs["Job"]["spec"]["template"]["spec"]
    [report] = pod["containers"]
    worker = documents("study-job.yaml")["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert report["args"] == ["report", worker["args"][1]]
    assert report["envFrom"] == worker["envFrom"]
    [mount] = report["volumeMounts"]
    assert mount["mountPath"] == "/work/reports"
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_the_secret_example_names_both_stores_the_runner_reads():
    secret = documents("secret.example.yaml")["Secret"]
    assert secret["metadata"]["name"] == "ablate-stores"
    assert set(secret["stringData"]) == {"ABLATE_STORAGE", "MLFLOW_TRACKING_URI"}


def test_the_image_installs_from_the_lock_in_a_cpu_and_a_cuda_variant_with_ablate_as_its_entry_point():
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["ablate"]' in text
    assert "pip install -c requirements.lock ." in text and "grep '^torch==' requirements.lock" in text
    assert re.search(r"cpu\)\s+pip install --index-url https://download.pytorch.org/whl/cpu", text)
    assert re.search(r"cuda\)\s+pip install ", text) and "ARG VARIANT=cpu" in text
    assert "USER ablate" in text  # not root in the pod
    kept = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"!ablate", "!requirements.lock", "!pyproject.toml"} <= set(kept)


def test_the_slurm_worker_stops_in_time_and_leaves_the_report_to_its_job():
    text = (DEPLOY / "slurm" / "study.sbatch").read_text()
    assert "#SBATCH --requeue" in text and re.search(r"#SBATCH --signal=B:TERM@\d+", text)
    assert re.search(r'exec "\$\{ABLATE:-ablate\}" study "\$study" --no-report --grace "\$\{ABLATE_GRACE_S:-(\d+)\}"',
                     text)  # fmt: skip
    assert STOP_GRACE_S + 5 <= 30  # Slurm's KillWait, as the Kubernetes pod's grace above
    for script in ("study.sbatch", "report.sbatch", "submit"):
        subprocess.run(["bash", "-n", str(DEPLOY / "slurm" / script)], check=True)


@pytest.mark.parametrize(("args", "says"), [
    ([], "usage:"),
    (["studies/smoke.yaml", "--tasks", "0"], "usage:"),
    (["studies/smoke.yaml", "--nodes"], "usage:"),
    (["studies/nothing.yaml"], "no such study file"),
    (["studies/smoke.yaml"], "ABLATE_STORAGE"),
])  # fmt: skip
def test_submit_refuses_bad_input_in_one_line_before_queueing_anything(args, says, tmp_path):
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}  # an sbatch that records being called, should it be
    (tmp_path / "sbatch").write_text(f"#!/bin/sh\ntouch {tmp_path}/queued\n")
    (tmp_path / "sbatch").chmod(0o755)
    done = subprocess.run([str(DEPLOY / "slurm" / "submit"), *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0 and says in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "queued").exists()
