"""Where workers run: ``workers: auto`` on a CPU and on GPU machines, and each GPU worker pinned to its device."""

from __future__ import annotations

import multiprocessing
import os

import optuna
import pytest
import yaml
from support.runs import TINY_STUDY

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.core.devices import MAX_PER_GPU, Slot, plan_slots
from ablate.design.spec import spec_from_mapping

GB = 2**30


def test_auto_on_a_cpu_is_one_single_thread_worker_per_core():
    assert plan_slots("auto", 0, [], cpu_count=2) == [Slot("cpu", 1)] * 2
    assert plan_slots(1, 0, [], cpu_count=2) == [Slot("cpu", 2)]  # a number is taken as given, cores split
    assert plan_slots(3, 0, [], cpu_count=2) == [Slot("cpu", 1)] * 3
    assert plan_slots("auto", 0, [], cpu_count=4, threads=2) == [Slot("cpu", 2)] * 4  # train.threads wins


def test_auto_on_gpus_fills_every_device_by_memory_within_bounds():
    slots = plan_slots("auto", 30 * GB, [80 * GB, 40 * GB], cpu_count=16)
    assert [s.device for s in slots] == ["0", "0", "1"]  # 0.8 x 80 // 30 = 2; 0.8 x 40 // 30 = 1
    assert all(s.threads == 16 // 3 for s in slots)
    small = plan_slots("auto", GB // 10, [80 * GB, 80 * GB], cpu_count=16)
    assert [s.device for s in small] == ["0"] * MAX_PER_GPU + ["1"] * MAX_PER_GPU
    assert [s.device for s in plan_slots("auto", 200 * GB, [80 * GB], cpu_count=16)] == ["0"]  # at least one


def test_a_number_of_workers_is_dealt_round_robin_over_the_gpus():
    assert [s.device for s in plan_slots(3, GB, [80 * GB, 80 * GB], cpu_count=12)] == ["0", "1", "0"]


@pytest.mark.parametrize("value, ok", [("auto", True), (2, True), (0, False), ("many", False), (True, False)])
def test_the_study_file_takes_auto_or_a_number(value, ok):
    if ok:
        assert spec_from_mapping({**TINY_STUDY, "workers": value}).workers == value
        return
    with pytest.raises(ConfigError, match=r"must be (auto or a number in \[1, 256\]|int)") as err:
        spec_from_mapping({**TINY_STUDY, "workers": value})
    assert err.value.key == "workers"


def _visible(queue: multiprocessing.Queue) -> None:
    queue.put(os.environ.get("CUDA_VISIBLE_DEVICES"))


def test_each_gpu_worker_sees_only_its_device_and_the_runner_keeps_its_own(monkeypatch):
    from ablate.runner.study import start_on

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_visible, args=(queue,)) for _ in range(3)]
    for p, slot in zip(procs, (Slot("1", 1), Slot("0", 1), Slot("cpu", 1)), strict=True):
        start_on(p, slot)
    for p in procs:
        p.join(60)
    assert sorted(queue.get(timeout=5) for _ in procs) == ["0", "0,1", "1"]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_a_study_runs_with_workers_auto(tmp_path, monkeypatch):
    from ablate.runner.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**TINY_STUDY, "name": "auto", "workers": "auto"}))
    storage = f"sqlite:///{tmp_path / 'o.db'}"
    assert run_study(tmp_path / "s.yaml", storage=storage, report=False) == 0
    trials = optuna.load_study(study_name="auto", storage=storage).get_trials()
    assert len(trials) == 4 and {t.state.name for t in trials} == {"COMPLETE"}  # 2 values x (1 tune + 1 seed)
    workers = {t.user_attrs[names.ATTR_WORKER] for t in trials}
    assert 1 <= len(workers) <= (os.cpu_count() or 1)  # "auto": workers from this machine's cores, never more
