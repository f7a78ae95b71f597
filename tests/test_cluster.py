"""A study on a cluster: one report, written by whoever finishes last (or the report job); a grace that fits the
schedulers' kill; the shipped deploy files (Slurm, Kubernetes, the container image) say what they must."""

from __future__ import annotations

import os
import time
from pathlib import Path

import optuna
import pytest
from support.runs import write_study

from ablate.core import devices, names
from ablate.core.config import ConfigError
from ablate.runner.study import report_skip_reason, run_study


def study_at(tmp_path: Path) -> tuple[optuna.Study, str]:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=storage, study_name="shared")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    return study, storage


def test_a_worker_leaves_the_report_to_those_still_running_trials(tmp_path):
    study, storage = study_at(tmp_path)
    elsewhere = study.ask()  # a trial another machine's worker is training
    assert report_skip_reason(study, storage) == "1 trials still run on other workers"
    study.tell(elsewhere, 2.0)
    assert report_skip_reason(study, storage) is None  # the last to finish writes it


def test_of_workers_finishing_together_one_writes_the_report_and_a_later_run_writes_it_again(tmp_path):
    study, storage = study_at(tmp_path)
    assert report_skip_reason(study, storage) is None
    assert "another worker is writing" in report_skip_reason(study, storage)
    claim = study.user_attrs[names.ATTR_REPORT_CLAIM]
    study.set_user_attr(names.ATTR_REPORT_CLAIM, {**claim, "at": time.time() - 3600})  # an hour later: rerun
    assert report_skip_reason(study, storage) is None
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=3.0))
    assert report_skip_reason(study, storage) is None  # new trials finished: a new report


@pytest.mark.parametrize("grace", [0, -5, 1e9])
def test_a_grace_out_of_range_is_one_line_before_any_store(tmp_path, monkeypatch, grace):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="--grace"):
        run_study(write_study(tmp_path / "s.yaml"), grace=grace)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("per_task", "cpu_max", "expected"), [
    ("", "max 100000", None),  # no limit: every core this process may run on
    ("1", "max 100000", 1),  # a Slurm task of one CPU, not bound to it
    ("", "150000 100000", 2),  # a Kubernetes limit of 1.5 CPUs: rounded up
    ("", "50000 100000", 1),
])  # fmt: skip
def test_auto_workers_count_the_cores_of_the_allocation_not_of_the_node(tmp_path, monkeypatch, per_task, cpu_max,
                                                                         expected):  # fmt: skip
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", per_task)
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    mine = len(os.sched_getaffinity(0))
    assert devices.usable_cores(tmp_path / "cpu.max") == min(mine, expected or mine)
    assert devices.usable_cores(tmp_path / "absent") == min(mine, int(per_task or mine))
