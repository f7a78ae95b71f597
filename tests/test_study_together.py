"""Trials of one architecture trained together in a study (``together: N``, forced on the CPU here): the same trials,
states, attrs, runs and curves as the same study run one trial at a time, to fp32 rounding."""

from __future__ import annotations

import os
import re
import signal

import pytest
from optuna.trial import TrialState
from support.runs import TINY_STUDY as TINY
from support.runs import write_study
from support.studies import LONG_TRAIN, StudyProcess, assert_consistent, stores, wait_for_training

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.core.sizes import ComputeBudget
from ablate.design import plan
from ablate.design.families import load_spec
from ablate.design.spec import spec_from_mapping
from ablate.runner.study import run_study
from ablate.runner.study_setup import plan_digest
from ablate.runner.trial_groups import AUTO_TOGETHER, together_size
from ablate.stats import verdicts

REL = 1e-4  # fp32: a stacked step sums in another order than a single run (printed to 6 digits they agree)
NUMBER = r"-?\d[\d.e+-]*|nan|inf"
OWN = (names.ATTR_WORKER, names.ATTR_RUN_ID)  # attrs that name who ran a trial, not how it went
DIVERGING = {  # one variant; its tune points at lr 0.015, 3.2 and 680: the two high ones diverge
    "train": {**TINY["train"], "diverge_factor": 1.5, "grad_clip": 0.0},
    "scientific": {"model.num_heads": [2]},
    "nuisance": {"train.lr": {"low": 1e-3, "high": 1e4, "log": True}},
}


def run(workdir, together: int, **changes) -> dict:
    """Runs the study ``t<together>`` to the end; its trials by planned key."""
    name = f"t{together}"
    assert run_study(write_study(workdir / f"{name}.yaml", name=name, together=together, **changes), report=False) == 0
    study, client, _ = stores(workdir, name)
    return {(t.user_attrs[names.ATTR_PHASE], t.user_attrs[names.ATTR_VARIANT], t.user_attrs[names.ATTR_POINT]): t
            for t in study.get_trials()}  # fmt: skip


def assert_same_trials(workdir, alone: dict, together: dict) -> None:
    """The same keys, states, params and attrs; each its own MLflow run with the same status, tags and curves."""
    _, client, _ = stores(workdir, "t1")
    assert together.keys() == alone.keys()
    for key, a in alone.items():
        b = together[key]
        assert (b.state, b.params) == (a.state, a.params), key
        assert b.value == (None if a.value is None else pytest.approx(a.value, rel=REL)), key
        assert b.intermediate_values == pytest.approx(a.intermediate_values, rel=REL), key
        assert b.user_attrs.keys() == a.user_attrs.keys(), key
        for attr, value in a.user_attrs.items():
            if attr == names.ATTR_REASON:  # "Diverged: train/loss 59.03 at step 5": a blow-up magnifies rounding
                assert re.sub(NUMBER, "#", b.user_attrs[attr]) == re.sub(NUMBER, "#", value)
            elif attr not in OWN:
                assert b.user_attrs[attr] == (pytest.approx(value, rel=REL) if isinstance(value, float) else value)
        diverged = a.user_attrs[names.ATTR_STATUS] == "diverged"
        run_a, run_b = (client.get_run(t.user_attrs[names.ATTR_RUN_ID]) for t in (a, b))
        assert run_b.data.tags[names.TAG_TRIAL] == str(b.number) and run_b.info.status == run_a.info.status
        assert run_b.data.tags.get(names.TAG_STATUS) == run_a.data.tags.get(names.TAG_STATUS)
        assert run_b.data.params["train.lr"] == run_a.data.params["train.lr"]
        assert run_b.data.params["train.seed"] == run_a.data.params["train.seed"]
        for metric in (names.TRAIN_LOSS, names.TRAIN_LR, names.VAL_LOSS):
            curve_a, curve_b = (client.get_metric_history(r.info.run_id, metric) for r in (run_a, run_b))
            assert [m.step for m in curve_b] == [m.step for m in curve_a], (key, metric)
            if not diverged:
                assert [m.value for m in curve_b] == pytest.approx([m.value for m in curve_a], rel=REL), (key, metric)


def shared(workdir, trials: dict) -> dict:
    """Trial key -> how many trials its run shared its steps with (``derived.together``; absent: alone)."""
    _, client, _ = stores(workdir, "t3")
    params = {k: client.get_run(t.user_attrs[names.ATTR_RUN_ID]).data.params for k, t in trials.items()}
    return {k: int(p.get("derived.together", 1)) for k, p in params.items()}


def test_an_ablation_trained_together_runs_the_trials_and_verdicts_of_one_at_a_time(workdir):
    changes = {"points": 3, "seeds": 2}  # 2 variants x (3 tune points + 2 seeds)
    alone, together = run(workdir, 1, **changes), run(workdir, 3, **changes)
    assert len(alone) == 10 and {t.state for t in alone.values()} == {TrialState.COMPLETE}
    assert_same_trials(workdir, alone, together)
    assert set(shared(workdir, together).items()) == {((p, v, i), 3 if p == "tune" else 2) for p, v, i in together}
    spec = load_spec(workdir / "t3.yaml")
    tables = []
    for trials in (alone, together):
        arms = plan.arm_results(spec, plan.results_of(trials.values()))
        tables.append(verdicts.judge_factor(arms["base"], [arms["model.num_heads=4"]], plan.rule(spec)))
    (a,), (b,) = tables
    assert (b.name, b.verdict, b.n) == (a.name, a.verdict, a.n)
    assert [b.mean, b.lo, b.hi] == pytest.approx([a.mean, a.lo, a.hi], rel=1e-3, abs=1e-6)


def test_a_diverging_member_is_recorded_as_a_single_diverged_run_while_its_group_mates_complete(workdir):
    changes = {**DIVERGING, "points": 3, "seeds": 2}
    alone, together = run(workdir, 1, **changes), run(workdir, 3, **changes)
    tune = {k[2]: t for k, t in together.items() if k[0] == "tune"}
    assert [tune[i].user_attrs[names.ATTR_STATUS] for i in range(3)] == ["completed", "diverged", "diverged"]
    assert [tune[i].state for i in range(3)] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert_same_trials(workdir, alone, together)  # the diverged ones' reason, outcome and FAILED run included
    assert shared(workdir, together)["tune", "base", 1] == 3  # it diverged in a group, not alone


def test_an_interrupted_group_hands_every_member_back_and_the_study_resumes(workdir):
    path = write_study(
        workdir / "tiny.yaml", train=LONG_TRAIN, points=2, together=2, scientific={"model.num_heads": [2]}
    )
    run = StudyProcess(path, workdir)
    wait_for_training(workdir, run)
    os.killpg(run.pid, signal.SIGINT)
    code, out = run.wait(120)
    assert code == 130, out[-3000:]
    assert "back in the queue" in out and "Traceback" not in out, out[-3000:]
    study, _, runs = stores(workdir, "tiny")
    stopped = [t for t in study.get_trials() if t.user_attrs.get(names.ATTR_STATUS) == "interrupted"]
    assert len(stopped) == 2 and all(t.state == TrialState.FAIL for t in stopped)  # the whole group
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert {t.user_attrs.get(names.ATTR_RETRY_OF) for t in waiting} >= {t.number for t in stopped}
    assert {r.info.status for r in runs if int(r.data.tags.get(names.TAG_TRIAL, -1)) in
            {t.number for t in stopped}} == {"KILLED"}  # fmt: skip
    assert run_study(path, report=False) == 0
    assert_consistent(workdir, "tiny", planned=3)  # 2 tune points, 1 seed


def test_together_is_auto_by_default_validated_and_out_of_the_plan_digest(tmp_path):
    assert spec_from_mapping(TINY).together == "auto"
    for bad in (0, "all", 65, 2.5):
        with pytest.raises(ConfigError, match="^together: must be "):
            spec_from_mapping({**TINY, "together": bad})
    one, three = (load_spec(write_study(tmp_path / f"{k}.yaml", together=k)) for k in ("auto", 3))
    assert plan_digest(three) == plan_digest(one) == plan_digest(load_spec(write_study(tmp_path / "n.yaml")))


def test_together_size_is_one_on_a_cpu_and_fits_the_gpu_memory_on_cuda():
    spec = spec_from_mapping(TINY)
    assert together_size(spec, [], 0, workers=1) == 1  # a CPU: it does not pay
    assert together_size(spec, [80 << 30], 1 << 20, workers=1) == AUTO_TOGETHER
    assert together_size(spec, [10 << 30], 2 << 30, workers=1) == 4  # 80% of 10 GiB holds 4 runs of 2 GiB
    assert together_size(spec, [10 << 30, 10 << 30], 2 << 30, workers=4) == 2  # 2 workers on each GPU
    assert together_size(spec, [1 << 30], 2 << 30, workers=1) == 1
    assert together_size(spec_from_mapping({**TINY, "together": 5}), [], 0, workers=1) == 5  # forced, on a CPU too
    wall = spec_from_mapping({**TINY, "together": 5, "budget": {"match": "wall", "value": 1.0}})
    assert isinstance(wall.compute, ComputeBudget)
    with pytest.raises(ConfigError, match="wall budget"):
        together_size(wall, [], 0, workers=1)
    auto_wall = spec_from_mapping({**TINY, "budget": {"match": "wall", "value": 1.0}})
    assert together_size(auto_wall, [80 << 30], 1 << 20, workers=1) == 1
