"""Studies: validation of study files, the ablation plan, and real studies on SQLite stores in tmp_path."""

from __future__ import annotations

import collections
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support.runs import TINY_STUDY as TINY
from support.runs import write_study
from support.studies import LONG_TRAIN, StudyProcess, assert_consistent, stores, wait_for_training

from ablate import cli
from ablate.core import names
from ablate.core.config import ConfigError, with_values
from ablate.design import plan, recovery
from ablate.design.families import load_spec, load_specs
from ablate.runner.study import run_study

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("**/*.yaml"))  # claims/ too
# ---------------------------------------------------------------------------------------------------------------
# Study files


@pytest.mark.parametrize("path", STUDIES, ids=[p.parent.name + "/" + p.stem for p in STUDIES])
def test_every_preset_validates_and_plans_valid_configs(path):
    for spec in load_specs(path):
        # `ablate report studies/NAME.yaml` finds the study, or its family, by its name
        assert (spec.family or spec.name) == path.stem and spec.name.startswith(path.stem)
        for planned in plan.first_trials(spec):
            with_values(spec.base, planned.params)  # raises ConfigError on an invalid combination


BAD = {
    "unknown_key": ({"epochs": 3}, "epochs"),
    "unknown_model_key": ({"model": {"embed_dim": 16, "heads": 2}}, "model.heads"),
    "wrong_type": ({"points": "four"}, "points"),
    "empty_values": ({"scientific": {"model.num_heads": []}}, "scientific.model.num_heads"),
    "impossible_heads": ({"scientific": {"model.num_heads": [2, 3]}}, "scientific.model.num_heads"),
    "unknown_sampler": ({"sampler": "grid"}, "sampler"),
    "unknown_param": ({"scientific": {"model.heads": [1, 2]}}, "scientific.model.heads"),
    "bad_range": ({"nuisance": {"train.lr": {"low": 1e-2, "high": 1e-3}}}, "nuisance.train.lr"),
    "pruned_ablation": ({"pruner": "median"}, "pruner"),
    "name_outside_reports": ({"name": ".."}, "name"),  # reports/<name>/ must stay inside reports/
    "bad_seeds": ({"seeds": {"min": 4, "max": 3}}, "seeds.max"),
    "unknown_seeds_key": ({"seeds": {"least": 2}}, "seeds.least"),
    "zero_margin": ({"margin": 0}, "margin"),
    "no_tune_seed": ({"tune_seeds": 0}, "tune_seeds"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_malformed_study_exits_2_with_one_line_before_any_store(case, workdir, capsys):
    changes, key = BAD[case]
    path = write_study(workdir / "bad.yaml", **changes)
    assert cli.main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and f": {key}:" in err, err
    assert not (workdir / "runs").exists() and not list(workdir.rglob("*.db"))


def test_search_rejects_any_invalid_combination(tmp_path):
    path = write_study(tmp_path / "s.yaml", kind="search", sampler="tpe", budget={"trials": 4},
                      scientific={"model.num_heads": [2, 4], "model.embed_dim": [16, 18]})  # fmt: skip
    with pytest.raises(ConfigError, match="scientific.model.num_heads.*combination"):
        load_spec(path)


def test_ablation_starts_with_the_same_tune_points_for_every_variant(tmp_path):
    path = write_study(tmp_path / "a.yaml", points=3, seeds=2,
                      scientific={"num_heads": [2, 4, 8], "model.attn_dropout": [0.0, 0.1]})  # fmt: skip
    spec = load_spec(path)
    first = plan.first_trials(spec)
    variants = [v.name for v in spec.variants()]
    assert variants == ["base", "model.num_heads=4", "model.num_heads=8", "model.attn_dropout=0.1"]
    assert {p.phase for p in first} == {"tune"}  # seeds follow once each variant's tuning is final
    assert collections.Counter((p.variant.name, p.point) for p in first) == {(v, i): 1 for v in variants
                                                                             for i in range(3)}  # fmt: skip
    for i in range(3):  # the same nuisance point for every variant, and points differ from one another
        assert len({p.params["train.lr"] for p in first if p.point == i}) == 1
    lrs = sorted({p.params["train.lr"] for p in first})
    assert lrs == pytest.approx([1e-3 * 10 ** (q / 6) for q in (1, 3, 5)])  # cell centres of the log range
    assert first == plan.first_trials(load_spec(path))  # deterministic: a resumed study plans the same trials


def test_every_tune_point_runs_on_the_tune_seeds_and_an_extension_on_all_of_them(tmp_path):
    spec = load_spec(write_study(tmp_path / "a.yaml", points=2, tune_seeds=2, seeds=2, max_extra_points=1,
                                nuisance={"train.lr": {"low": 1e-4, "high": 0.1, "log": True}}))  # fmt: skip
    first = [p for p in plan.first_trials(spec) if p.variant.name == "base"]
    assert [(p.point, plan.seed_of(spec, "tune", p.point)) for p in first] == [
        (0, 10_000), (1, 10_001), (2, 10_000), (3, 10_001)]  # never a verdict seed (1, 2, ...)
    assert first[0].params == first[1].params != first[2].params == first[3].params
    # the best seed mean is the higher point: one cell further, on both tune seeds
    lrs = [p.params["train.lr"] for p in first]
    losses = [2.0, 2.1, 1.95, 1.9]
    results = [plan.Result("tune", "base", p.point, "COMPLETE", "completed", p.params, v)
               for p, v in zip(first, losses, strict=True)]  # fmt: skip
    nxt = [p for p in plan.next_trials(spec, results) if p.variant.name == "base"]
    assert [p.point for p in nxt] == [4, 5] and nxt[0].params == nxt[1].params
    assert nxt[0].params["train.lr"] > lrs[-1]


def _results(spec, variant: str, points: dict[float, float | str], seeds: dict[int, float] = {}) -> list:  # noqa: B006
    """Finished trials of one variant: tune lr -> val loss (or "diverged"), seed -> test loss."""
    out = []
    for i, (lr, loss) in enumerate(points.items()):
        status = loss if isinstance(loss, str) else "completed"
        out.append(plan.Result("tune", variant, i, "COMPLETE" if status == "completed" else "FAIL", status,
                               {"train.lr": lr}, None if status != "completed" else loss))
    for s, loss in seeds.items():
        out.append(plan.Result("seed", variant, s, "COMPLETE", "completed", {"train.lr": 1e-2}, loss, loss))
    return out


BRACKETING = {  # tune results (lr -> val loss) in [1e-4, 0.1] -> the next lr tried (None: tuning is final)
    "best_is_highest_tried": ({3.16e-4: 2.0, 1e-3: 1.9, 3.16e-3: 1.8}, 0.0316),  # one cell (a decade) further
    "best_is_lowest_tried": ({1e-3: 1.7, 3.16e-3: 1.9, 1e-2: 2.0}, 1e-4),  # clipped to the hard limit
    "bracketed": ({3.16e-4: 2.0, 3.16e-3: 1.7, 0.0316: 1.8}, None),
    "diverged_above_brackets": ({3.16e-4: 2.0, 3.16e-3: 1.9, 0.0316: "diverged"}, None),
    "at_the_hard_limit": ({1e-3: 2.0, 1e-2: 1.9, 0.1: 1.8}, None),
    "everything_diverged": ({3.16e-3: "diverged", 0.0316: "diverged"}, 3.16e-4),
}


@pytest.mark.parametrize("case", BRACKETING, ids=list(BRACKETING))
def test_tuning_extends_until_the_best_point_is_bracketed_or_at_a_hard_limit(case, tmp_path):
    points, expected = BRACKETING[case]
    path = write_study(tmp_path / "a.yaml", points=3, max_extra_points=3, seeds=2,
                      nuisance={"train.lr": {"low": 1e-4, "high": 0.1, "log": True}})  # fmt: skip
    spec = load_spec(path)
    nxt = plan.next_trials(spec, _results(spec, "base", points))
    base = [p for p in nxt if p.variant.name == "base"]
    if expected is None:  # final: the variant's seeds come next, near the best completed point
        best = min((lr for lr, v in points.items() if not isinstance(v, str)), key=points.get)
        assert [(p.phase, p.point) for p in base] == [("seed", 1), ("seed", 2)]
        (lr,) = {p.params["train.lr"] for p in base}
        tried = sorted(points)
        if best in (tried[0], tried[-1]):  # at an edge: the best point itself
            assert lr == best
        else:  # inside: the parabola's vertex, within half a cell of the best, towards its lower neighbour
            cell = (0.1 / 1e-4) ** (1 / 3)
            assert best / cell**0.5 <= lr <= best * cell**0.5
            i = tried.index(best)
            lower = tried[i - 1] if _loss(points[tried[i - 1]]) < _loss(points[tried[i + 1]]) else tried[i + 1]
            assert (lr - best) * (lower - best) >= 0
    else:
        assert [(p.phase, p.point) for p in base] == [("tune", len(points))]
        assert base[0].params["train.lr"] == pytest.approx(expected, rel=1e-2)


def _loss(value: float | str) -> float:
    return math.inf if isinstance(value, str) else value


def test_tuning_stops_after_max_extra_points(tmp_path):
    spec = load_spec(write_study(tmp_path / "a.yaml", points=3, max_extra_points=1, seeds=2,
                                nuisance={"train.lr": {"low": 1e-4, "high": 0.1, "log": True}}))  # fmt: skip
    points = {3.16e-4: 2.0, 3.16e-3: 1.9, 0.0316: 1.8, 0.05: 1.7}  # point 3 was the one extra point
    nxt = [p for p in plan.next_trials(spec, _results(spec, "base", points)) if p.variant.name == "base"]
    assert [p.phase for p in nxt] == ["seed", "seed"] and nxt[0].params["train.lr"] == 0.05
    assert plan.edge_of_tried(spec, _results(spec, "base", points)) == [("train.lr", "high")]


def test_more_seeds_go_only_to_undecided_arms_and_the_base(tmp_path):
    spec = load_spec(write_study(tmp_path / "a.yaml", points=1, seeds={"min": 3, "max": 5}, margin=0.05, nuisance=None,
                                scientific={"model.num_heads": [2, 4, 1]}))  # fmt: skip
    lr = {}  # no nuisance: nothing tuned, so no tuning penalty widens the verdicts
    results = (_results(spec, "base", lr, {1: 2.00, 2: 2.01, 3: 1.99})
               + _results(spec, "model.num_heads=4", lr, {1: 2.50, 2: 2.51, 3: 2.49})  # far worse: decided
               + _results(spec, "model.num_heads=1", lr, {1: 2.05, 2: 1.95, 3: 2.10}))  # noisy: undecided
    nxt = plan.next_trials(spec, results)
    assert sorted((p.variant.name, p.point) for p in nxt) == [
        ("base", 4), ("base", 5), ("model.num_heads=1", 4), ("model.num_heads=1", 5)]
    waiting = plan.next_trials(spec, results[:-1])  # look 1 waits for every arm's first seeds
    assert [(p.variant.name, p.point) for p in waiting] == [("model.num_heads=1", 3)]
    # an arm whose every tune run diverged has no seeds: look 1 goes ahead without it
    tuned = load_spec(write_study(tmp_path / "b.yaml", points=1, seeds={"min": 3, "max": 5}, margin=0.05,
                                 scientific={"model.num_heads": [2, 4, 1]}))  # fmt: skip
    lr = {0.00316: 2.0}
    base = _results(tuned, "base", lr, {1: 2.00, 2: 2.01, 3: 1.99})
    noisy = _results(tuned, "model.num_heads=4", lr, {1: 2.05, 2: 1.95, 3: 2.10})
    dead = _results(tuned, "model.num_heads=1", {0.00316: "diverged"})
    nxt = plan.next_trials(tuned, base + noisy + dead)
    assert sorted((p.variant.name, p.point) for p in nxt) == [
        ("base", 4), ("base", 5), ("model.num_heads=4", 4), ("model.num_heads=4", 5)]


# ---------------------------------------------------------------------------------------------------------------
# Real studies (tiny models, 10 steps)


def test_smoke_study_end_to_end_then_resume_runs_nothing(workdir, capsys):
    path = write_study(workdir / "tiny.yaml")
    assert run_study(path, report=False) == 0
    trials = assert_consistent(workdir, "tiny", planned=4)
    study, client, _ = stores(workdir, "tiny")
    assert study.user_attrs[names.ATTR_KIND] == "ablation"
    for t in trials:  # the trained config is the trial's (MLflow params are what the trainer saw)
        params = client.get_run(t.user_attrs[names.ATTR_RUN_ID]).data.params
        assert params["model.num_heads"] == str(t.params["model.num_heads"])
        assert float(params["train.lr"]) == t.params["train.lr"]
        assert params["train.seed"] == str(t.user_attrs[names.ATTR_SEED])
        if t.user_attrs[names.ATTR_PHASE] == "seed":  # re-runs its variant's best tune point on train.seed 1
            tune = [u for u in trials if u.user_attrs[names.ATTR_PHASE] == "tune"
                    and u.user_attrs[names.ATTR_VARIANT] == t.user_attrs[names.ATTR_VARIANT]]  # fmt: skip
            assert t.params["train.lr"] == min(tune, key=lambda u: u.value).params["train.lr"]
            assert t.user_attrs[names.ATTR_SEED] == 1 and t.number > max(u.number for u in tune)
            assert isinstance(t.user_attrs[names.ATTR_OUTCOME], float)  # the test loss: the verdicts' metric
            history = client.get_metric_history(t.user_attrs[names.ATTR_RUN_ID], names.VAL_LOSS)
            assert [m.step for m in history] == [5, 10]  # intermediate values as step metrics
    out = capsys.readouterr().out
    assert "model.num_heads=4" in out
    assert "All runs: make ui, then http://127.0.0.1:5000/#/experiments/" in out  # also without a report
    assert study.metric_names == [names.VAL_LOSS]  # the dashboard's name for the objective
    assert run_study(path, report=False) == 0  # the same command again: nothing re-run
    assert len(stores(workdir, "tiny")[0].get_trials()) == 4


def test_changed_plan_is_refused_on_resume(workdir):
    path = write_study(workdir / "tiny.yaml", seeds=None, points=1, scientific={"model.num_heads": [2]})
    run_study(path, report=False, trials=1)
    write_study(path, points=2)
    with pytest.raises(ConfigError, match="another plan"):
        run_study(path, report=False)


def test_killed_study_resumes_without_duplicates_or_running_leftovers(workdir):
    # trials of a few seconds: a 10-step trial seen RUNNING could complete before the kill lands
    path = write_study(workdir / "tiny.yaml", heartbeat=2, train=LONG_TRAIN)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "ABLATE_STORAGE")}
    cmd = [sys.executable, "-m", "ablate.cli", "study", str(path), "--no-report"]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = workdir / "runs" / "optuna.db"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if db.exists() and _running_after_complete(f"sqlite:///{db}"):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the study finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}").get_trials()
    assert any(t.state == TrialState.RUNNING for t in killed)
    assert run_study(path, report=False) == 0
    trials = assert_consistent(workdir, "tiny", planned=4)
    retried = [t for t in trials if t.state == TrialState.FAIL]
    assert retried and all(t.number < len(killed) for t in retried)


def _running_after_complete(url: str) -> bool:
    try:
        trials = optuna.load_study(study_name="tiny", storage=url).get_trials(deepcopy=False)
    except Exception:  # not created yet, or the file is busy
        return False
    states = [t.state for t in trials]
    running = [t for t in trials if t.state == TrialState.RUNNING and names.ATTR_RUN_ID in t.user_attrs]
    return TrialState.COMPLETE in states and bool(running)


def test_two_workers_drain_one_sqlite_study(workdir):
    path = write_study(workdir / "tiny.yaml")
    assert run_study(path, workers=2, report=False) == 0
    trials = assert_consistent(workdir, "tiny", planned=4)
    assert len(trials) == 4  # no sampled extra trial, no duplicate


def test_search_enqueues_every_arm_first_and_prunes_into_killed_runs(workdir):
    path = write_study(workdir / "search.yaml", name="search", kind="search", sampler="tpe", pruner="median",
                      budget={"trials": 5}, points=None, seeds=None)  # fmt: skip
    assert run_study(path, report=False) == 0
    study, _, runs = stores(workdir, "search")
    trials = study.get_trials()
    assert len(trials) == 5 and study.user_attrs[names.ATTR_KIND] == "search"
    assert [t.params["model.num_heads"] for t in trials[:2]] == [2, 4]  # no arm starved by the sampler
    children = {r.info.run_id: r.info.status for r in runs if r.data.tags.get(names.TAG_ROLE) == "trial"}
    assert sorted(children.values()) == sorted(names.MLFLOW_OF_STATE[t.state.name] for t in trials)
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # every evaluation reported to the pruner


def test_diverged_tune_trials_step_down_and_no_seed_runs_without_a_tuned_point(workdir, capsys):
    train = {**TINY["train"], "diverge_factor": 1.5, "grad_clip": 0.0}
    path = write_study(workdir / "tiny.yaml", train=train, scientific={"model.num_heads": [2]}, max_extra_points=1,
                      nuisance={"train.lr": {"low": 3.0, "high": 30.0, "log": True}})  # fmt: skip
    assert run_study(path, report=False) == 0  # diverging is a result, not an error
    study, client, runs = stores(workdir, "tiny")
    trials = study.get_trials()
    assert [t.user_attrs[names.ATTR_PHASE] for t in trials] == ["tune", "tune"]  # nothing to re-run on seeds
    assert [t.params["train.lr"] for t in trials] == pytest.approx([30 ** 0.5 * 3 ** 0.5, 3.0])  # one step down
    for t in trials:
        assert (t.state, t.user_attrs[names.ATTR_STATUS]) == (TrialState.FAIL, "diverged")
        run = client.get_run(t.user_attrs[names.ATTR_RUN_ID])
        assert run.info.status == "FAILED" and run.data.tags[names.TAG_STATUS] == "diverged"


def test_without_nuisance_parameters_variants_go_straight_to_seeds(tmp_path):
    spec = load_spec(write_study(tmp_path / "a.yaml", nuisance=None, seeds=2))
    first = plan.first_trials(spec)
    assert {(p.phase, p.point) for p in first} == {("seed", 1), ("seed", 2)}  # no identical "tune" trials
    assert len(first) == 2 * len(spec.variants())


# ---------------------------------------------------------------------------------------------------------------
# Faults: interrupts, kills at exact moments (ABLATE_FAILPOINT), errors; the rerun heals them with no manual step


@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, "1"), (signal.SIGTERM, "2")], ids=["ctrl-c", "sigterm-2"])
def test_an_interrupted_study_hands_its_trials_back_and_resumes(workdir, sig, workers):
    path = write_study(workdir / "tiny.yaml", train=LONG_TRAIN)
    run = StudyProcess(path, workdir, "--workers", workers)
    wait_for_training(workdir, run)
    os.killpg(run.pid, sig) if sig == signal.SIGINT else run.proc.send_signal(sig)  # Ctrl-C reaches the group
    code, out = run.wait(120)
    assert code == 130, out[-3000:]
    assert "back in the queue" in out and "Traceback" not in out, out[-3000:]
    study, _, runs = stores(workdir, "tiny")
    stopped = [t for t in study.get_trials() if t.user_attrs.get(names.ATTR_STATUS) == "interrupted"]
    assert stopped and all(t.state == TrialState.FAIL for t in stopped)
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert {t.user_attrs.get(names.ATTR_RETRY_OF) for t in waiting} >= {t.number for t in stopped}
    assert not [r for r in runs if r.info.status == "RUNNING"]  # ended KILLED by the stop, not by a rerun
    assert {r.info.status for r in runs if int(r.data.tags.get(names.TAG_TRIAL, -1)) in
            {t.number for t in stopped}} == {"KILLED"}  # fmt: skip
    for _ in range(50):  # no worker left (multiprocessing's resource tracker takes a moment to see its end)
        if subprocess.run(["pgrep", "-g", str(run.pid)], capture_output=True).stdout == b"":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(subprocess.run(["ps", "-f", "-g", str(run.pid)], capture_output=True, text=True).stdout)
    assert run_study(path, report=False) == 0
    assert_consistent(workdir, "tiny", planned=4)


@pytest.mark.parametrize("point", ["setup:created", "setup:parent", "setup:enqueue", "trial:start", "trial:run",
                                   "trial:end"])  # fmt: skip
def test_a_kill_at_any_moment_is_healed_by_the_rerun(workdir, point):
    path = write_study(workdir / "tiny.yaml", heartbeat=1)
    code, out = StudyProcess(path, workdir, env={"ABLATE_FAILPOINT": point}).wait(120)
    assert code == -signal.SIGKILL, out[-3000:]
    assert run_study(path, report=False) == 0  # no "delete it", no manual step
    trials = assert_consistent(workdir, "tiny", planned=4)
    if point.startswith("trial:"):
        dead = [t for t in trials if t.state == TrialState.FAIL]
        assert len(dead) == 1 and [t.user_attrs.get(names.ATTR_RETRY_OF) for t in trials].count(dead[0].number) == 1


def test_processes_starting_one_study_together_share_one_parent_run_and_one_plan(workdir):
    path = write_study(workdir / "tiny.yaml")
    runs = [StudyProcess(path, workdir) for _ in range(3)]
    codes, outs = zip(*(r.wait(180) for r in runs), strict=True)
    assert list(codes) == [0, 0, 0], "\n".join(o[-1500:] for o in outs)
    trials = assert_consistent(workdir, "tiny", planned=4)
    assert len(trials) == 4


def test_a_rerun_retries_trials_that_failed_with_an_error_a_bounded_number_of_times(workdir, monkeypatch, capsys):
    path = write_study(workdir / "tiny.yaml", scientific={"model.num_heads": [2]})  # 1 tune trial, then a seed
    monkeypatch.setenv("ABLATE_FAILPOINT", "trial:start=raise")
    for attempt in range(1, recovery.MAX_RETRY + 2):
        assert run_study(path, report=False) == 1  # an error is an exit 1, and its reason stays on the trial
        last = stores(workdir, "tiny")[0].get_trials()[-1]
        assert last.user_attrs[names.ATTR_ATTEMPT if attempt > 1 else names.ATTR_PHASE] == (
            attempt if attempt > 1 else "tune")
        assert last.user_attrs[names.ATTR_REASON] == "RuntimeError: failpoint trial:start"
    assert run_study(path, report=False) == 0  # retries used up: said, not run again
    assert "ended failed 3 times, not retried: RuntimeError: failpoint trial:start" in capsys.readouterr().out
    assert len(stores(workdir, "tiny")[0].get_trials()) == recovery.MAX_RETRY + 1

    monkeypatch.delenv("ABLATE_FAILPOINT")  # the cause fixed, a new study name: a rerun retries once and completes
    path = write_study(workdir / "tiny.yaml", name="fixed", scientific={"model.num_heads": [2]})
    monkeypatch.setenv("ABLATE_FAILPOINT", "trial:start=raise")
    assert run_study(path, report=False) == 1
    monkeypatch.delenv("ABLATE_FAILPOINT")
    assert run_study(path, report=False) == 0
    first, retry, seed = stores(workdir, "fixed")[0].get_trials()  # the tune point failed, then its retry and seed
    assert [t.state for t in (first, retry, seed)] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert retry.user_attrs[names.ATTR_RETRY_OF] == first.number  # the planned values, not sampled ones:
    assert retry.params == first.system_attrs["fixed_params"]  # the first attempt died before suggesting them
    from ablate.report import build_report

    page = build_report("fixed", out=str(workdir / "reports")).read_text(encoding="utf-8")
    assert "1 earlier attempt\n  (interrupted, lost with its worker, or failed with an error and retried) is" in page


def test_diverged_trials_are_results_and_never_retried(workdir):
    train = {**TINY["train"], "diverge_factor": 1.5, "grad_clip": 0.0}
    path = write_study(workdir / "tiny.yaml", train=train, scientific={"model.num_heads": [2]}, seeds=None,
                      nuisance={"train.lr": {"low": 50.0, "high": 100.0, "log": True}})  # fmt: skip
    run_study(path, report=False)
    before = stores(workdir, "tiny")[0].get_trials()
    assert before and all(t.user_attrs[names.ATTR_STATUS] == "diverged" for t in before)
    assert run_study(path, report=False) == 0
    assert len(stores(workdir, "tiny")[0].get_trials()) == len(before)


def test_plan_digests_are_pinned_and_a_study_tuned_on_one_seed_is_refused():
    """Fields added later stay out of the digest at their defaults, so a study keeps resuming across releases (the
    digest below was computed by the code that added tune seeds). A study set up before tune seeds (one run per
    tune point, on seed 0: the digest of commit aa123ba) is another plan, and is refused rather than mixed."""
    from ablate.runner.study_setup import plan_digest

    studies = Path(__file__).parent.parent / "studies"
    smoke = plan_digest(load_spec(studies / "smoke.yaml", preflight=False))
    assert smoke == "4cc0b2d1d29175893940df44f14a9929bc7de25e1f220c16486d9bda522ce20b"
    assert smoke != "df19b27239125988f16e51d96657598b81e98aba6fd77c56f33328f9725ac77d"
    rope = load_spec(studies / "smoke.yaml", ["model.position=rope"], preflight=False)
    assert plan_digest(rope) != plan_digest(load_spec(studies / "smoke.yaml", preflight=False))
