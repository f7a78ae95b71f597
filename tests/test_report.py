"""The report, built from real MLflow and Optuna SQLite stores filled the way a finished study leaves them."""

from __future__ import annotations

import datetime
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import markupsafe
import numpy as np
import optuna
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState
from scipy import stats
from support.runs import ROOT
from support.stores import EVIL, SPEC, UNIFORM_LOSS, StoreBuilder, build_search, index_rows, read_table, study_site

from ablate.core import names
from ablate.design import plan
from ablate.design.spec import spec_from_mapping


@pytest.fixture
def ablation(built_ablation):
    return built_ablation[0]


@pytest.fixture
def ablation_report(built_ablation):
    return built_ablation[1:]


def test_importing_the_report_does_not_import_torch():
    code = "import sys, ablate.report, ablate.report.plots, ablate.report.html; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _paired_from_store(builder: StoreBuilder, variant: str, level: float) -> tuple[float, float, float]:
    """The paired interval recomputed straight from MLflow: test/loss of the seed runs by train.seed, a diverged run
    at the uniform-guess loss; the two-sided ``1 - 2 level`` t-interval."""
    def losses(v: str) -> dict[str, float]:
        df = builder.client.search_runs(
            [builder.exp], f"tags.`{names.TAG_VARIANT}` = '{v}' and tags.`{names.TAG_PHASE}` = 'seed'")
        return {r.data.params["train.seed"]: r.data.metrics.get(names.TEST_LOSS, UNIFORM_LOSS) for r in df}

    a, b = losses(variant), losses("base")
    seeds = sorted(set(a) & set(b))
    ci = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(1 - 2 * level)
    return float(np.mean([a[s] - b[s] for s in seeds])), float(ci.low), float(ci.high)


def test_report_has_every_section_and_files(ablation_report, ablation):
    path, page = ablation_report
    for section in ("answer", "variants", "isolation", "sensitivity", "health", "curves", "cost", "attention",
                    "provenance"):
        assert f'<section id="{section}">' in page, section
    # isolation, lr, curves, pareto, attention maps, entropy, max logit: every figure rendered, none missing
    assert page.count('<img src="data:image/png;base64,') == 7
    assert "Nothing to plot" not in page
    assert (path.parent / "results.csv").is_file() and (path.parent / "summary.md").is_file()
    logged = {f.path for f in ablation.client.list_artifacts(ablation.parent, "report")}
    assert logged == {"report/index.html", "report/results.csv", "report/summary.md", "report/verdicts.json"}
    assert 'href="toy/index.html"' in (path.parent.parent / "index.html").read_text()  # beside it: every study


def test_numbers_match_the_stores(ablation_report, ablation):
    _, page = ablation_report
    # num_heads has 2 alternatives: each is tested at alpha / 2 sides / 2 alternatives (Bonferroni)
    diff, lo, hi = _paired_from_store(ablation, "model.num_heads=4", level=0.05 / 2 / 2)
    # widened by each arm's tuning-penalty bound: the alternative's lowers the low end, the base's raises the high.
    # num_heads=4's lowest tune point failed, so its best completed point is an unextended edge: unbounded below
    arms = plan.arm_results(spec_from_mapping(SPEC), plan.results_of(ablation.study.get_trials()))
    assert arms["model.num_heads=4"].penalty == math.inf and 0 < arms["base"].penalty < 0.01
    assert f"{diff:+.4f} [-∞, {hi + arms['base'].penalty:+.4f}]" in page
    assert hi < -SPEC["margin"]  # the fixture's num_heads=4 really is better: the report must call it so
    results = pd.read_csv(ablation_report[0].parent / "results.csv")
    assert len(results) == len(ablation.study.trials)
    assert (results["state"] == "PRUNED").sum() == 1 and (results["status"] == "diverged").sum() == 1
    one = results[results["variant"] == "model.num_heads=1"]
    assert one["status"].value_counts().to_dict() == {"completed": 5, "diverged": 1}
    states = pd.Series([t.state.name for t in ablation.study.trials]).value_counts().sort_index()
    assert f"{len(states.index) and sum(states)} ({', '.join(f'{k} {v}' for k, v in states.items())})" in page


def test_answer_is_generated_from_the_data(ablation_report):
    _, page = ablation_report
    answers = re.findall(r'<div class="choice">(.*?) → <span title="(.*?)">(.*?)</span> <span class="badge ([\w-]+)">',
                         page)  # fmt: skip
    # attn_dropout=0.1's lowest tune point was pruned, so its best completed point is an unextended edge: what its
    # tuning costs it is unbounded, and an equivalence (which needs both ends) cannot be claimed. Each value in
    # words, its config key on hover.
    assert answers == [("model.num_heads", "model.num_heads=4", "4 heads", "better"),
                       ("model.attn_dropout", "model.attn_dropout=0", "no attention dropout", "undecided"),
                       ("model.resid_dropout", "model.resid_dropout=0", "no residual dropout", "keep-base")]
    variants = read_table(page, "variants-table").set_index("variant")
    assert "penalty ≤ unbounded: best point at an edge" in variants.loc["model.attn_dropout=0.1"].iloc[1]
    assert "other values undecided" in page  # num_heads=1 diverged on a seed: never silently equivalent
    assert "Diverged seed runs, counted at the uniform-guess loss: 1 head: 1 of 3 seeds." in page
    assert "Keep the base (no residual dropout): every alternative is worse." in page
    assert "It costs 1.09× the base&#39;s parameters" in page
    assert "at most 5% (Bonferroni over the factor&#39;s 2 alternatives" in page  # the error rate each controls
    assert "Over the study&#39;s 3 factors (4 alternatives against one base)" in page  # and the whole study
    assert "Seeds that would decide the undecided at the margin" in page  # num_heads=1: what more seeds would buy
    # num_heads=1 tuned best at lr 9e-3, the highest of the points it tried
    assert "model.num_heads=1: the chosen train.lr = 0.009 is the highest value tried" in page
    assert "Not shown fair for" in page and "Fair: every" not in page


def test_run_data_is_html_escaped(ablation_report):
    _, page = ablation_report
    assert EVIL not in page
    # shown as text: the failed trial's reason, the study description in the header and in the study file
    assert page.count(str(markupsafe.escape(EVIL))) >= 3


def test_study_with_only_failed_and_pruned_trials_still_reports(tmp_path):
    from ablate.report import build_report

    b = StoreBuilder(tmp_path, {**SPEC, "name": "broken"})
    b.add("base", "tune", {"train.lr": 1e-3}, 0, 9.0, "stopped")
    b.add("base", "tune", {"train.lr": 1e-2}, 0, 9.0, "diverged", reason="loss is nan", point=1)
    b.study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={names.ATTR_VARIANT: "base"}))
    page = build_report("broken", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r").read_text()
    assert re.findall(r'<span class="badge ([\w-]+)">', page) == ["undecided"] * 3
    assert "base: no tune run completed (all diverged or failed): nothing to re-run on seeds." in page
    assert "loss is nan" in page and "No completed run." in page
    health = read_table(page, "health-table")
    assert health.to_dict("records") == [{"group": "base", "trials": "3", "completed": "0", "diverged %": "33.33",
                                          "failed %": "33.33", "pruned %": "33.33"}]


def test_study_with_zero_trials_reports_instead_of_claiming_it_is_missing(tmp_path):
    from ablate.report import build_report

    b = StoreBuilder(tmp_path, {**SPEC, "name": "empty"})
    page = build_report("empty", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r").read_text()
    assert "no trials yet" in page


def test_a_bare_nuisance_key_is_resolved_like_the_runner_does(tmp_path):
    """``lr:`` in the study file is ``train.lr``: the report's tuning checks and LR plot must still see it."""
    from ablate.report import build_report

    spec = {**SPEC, "name": "bare", "nuisance": {"lr": SPEC["nuisance"]["train.lr"]}}
    b = StoreBuilder(tmp_path, spec)
    for i, lr in enumerate((1e-3, 3e-3)):
        b.add("base", "tune", {"train.lr": lr}, 0, 2.0 - i * 0.1, point=i)
    page = build_report("bare", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r").read_text()
    assert "base: the chosen train.lr = 0.003 is the highest value tried" in page
    assert 'alt="learning-rate sensitivity"' in page and "Nothing to plot yet: learning-rate" not in page


def test_search_study_shows_importances_not_conclusions(tmp_path):
    from ablate.report import build_report

    b = build_search(tmp_path)
    page = build_report("hunt", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r").read_text()
    assert '<section id="importance">' in page and 'id="importance-table"' in page
    assert "draws no ablation conclusions" in page and '<div class="answer' not in page
    imp = read_table(page, "importance-table")
    assert imp["param"].iloc[0] == "train.lr"  # the synthetic loss depends on lr far more than on heads
    assert 'alt="interaction heat map"' in page and "Nothing to plot" not in page


def test_report_command_takes_names_files_and_all(tmp_path, monkeypatch, capsys):
    from ablate.cli import main

    b = build_search(tmp_path, n=4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", b.tracking_uri)
    study_file = tmp_path / "hunt.yaml"
    study_file.write_text(yaml.safe_dump({**b.spec, "storage": b.storage}))
    assert main(["report", str(study_file), "--out", "out1"]) == 0
    assert (tmp_path / "out1" / "hunt" / "index.html").is_file()
    monkeypatch.setenv("ABLATE_STORAGE", b.storage)
    assert main(["report", "--all", "--out", "out2"]) == 0
    assert (tmp_path / "out2" / "hunt" / "index.html").is_file()
    for out in ("out1", "out2"):  # the page of every study comes with any report
        assert 'href="hunt/index.html"' in (tmp_path / out / "index.html").read_text()
    assert main(["report", "nope"]) == 2
    assert "no study named 'nope'" in capsys.readouterr().err


def test_report_before_any_study_is_one_line_and_creates_no_store(tmp_path, monkeypatch, capsys):
    from ablate.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    for argv in (["report", "--all"], ["report", "default"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"ablate report: storage: no study store at {tmp_path / 'runs' / 'optuna.db'}; " \
                      "run a study first (make study)"
    assert not (tmp_path / "runs").exists()


def test_report_of_a_real_tiny_study(tmp_path, monkeypatch, capsys):
    """The study runner's own stores, not our fixture: the report finds every trial, run and number."""
    from ablate.runner.study import run_study

    spec = yaml.safe_load((ROOT / "studies" / "smoke.yaml").read_text())
    spec.update(name="real", points=1, seeds=2)
    spec["train"].update(steps=2, eval_every=1, log_every=1)
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert run_study(tmp_path / "real.yaml", storage=storage, report=True) == 0
    assert re.search(r"^real: [01] of 1 scientific parameters decided study-wide \([01] at alpha per factor\) at a "
                     r"margin of ±0.03 test loss: "
                     r"model.num_heads → [^(]+ \(", capsys.readouterr().out, re.M)  # the answer, in the terminal too
    page = (tmp_path / "reports" / "real" / "index.html").read_text()
    study = optuna.load_study(study_name="real", storage=storage)
    assert f"{len(study.trials)} (COMPLETE {len(study.trials)})" in page
    assert "Nothing to plot" not in page and page.count("<img ") == 7
    row = index_rows((tmp_path / "reports" / "index.html").read_text())["real"]  # the study refreshed the index
    assert row[1] == '<span class="status finished">finished</span>'
    assert row[6] == f"{len(study.trials)} / {len(study.trials)}"
    results = pd.read_csv(tmp_path / "reports" / "real" / "results.csv")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for row in results.itertuples():
        run = client.get_run(row.run_id)
        assert run.data.metrics[names.VAL_LOSS] == pytest.approx(row.value)
        assert run.data.tags[names.TAG_VARIANT] == row.variant
    base = results[(results["phase"] == "seed") & (results["variant"] == "base")][names.TEST_LOSS]
    mean, half = base.mean(), stats.t.ppf(0.975, len(base) - 1) * base.std(ddof=1) / math.sqrt(len(base))
    assert f"{mean:.4f} ± {half:.4f}" in page  # the verdict's metric: the test split


# ---------------------------------------------------------------------------------------------------------------
# reports/index.html: every study of a store on one page

@pytest.fixture
def study_index(built_ablation) -> tuple[Path, str]:
    from ablate.report import build_index

    root = study_site(built_ablation)
    path = build_index([f"sqlite:///{root / 'optuna.db'}"], root / "reports")
    return path, path.read_text()


def test_index_lists_every_study_with_its_answer_and_a_working_link(study_index):
    path, page = study_index
    rows = index_rows(page)
    assert sorted(rows) == ["fresh", "hunt", "toy", "weird"]  # every study of the store but the unsafe name
    for name in ("toy", "hunt"):
        summary = (path.parent / name / "summary.md").read_text().splitlines()[0]
        assert rows[name][0] == f'<a href="{name}/index.html">{name}</a>'
        assert (path.parent / name / "index.html").is_file()  # the link is relative to the index page
        assert str(markupsafe.escape(summary.removeprefix(f"# {name}: "))) == rows[name][2]
    assert re.match(r"\d of 3 scientific parameters decided study-wide \(1 at alpha per factor\) at a margin of "
                    r"±0.03 test loss", rows["toy"][2])
    # 3 variants' optima are not bracketed yet: the plan asks for a tune point more of each
    assert rows["toy"][1] == '<span class="status stopped">stopped</span>'
    assert rows["toy"][3:7] == ["ablation, 5 variants", "recall, 128 tokens",
                                "width 32, 1 layer, 2 heads, 100 steps", "30 / 33"]
    assert rows["hunt"][1] == '<span class="status finished">finished</span>' and rows["hunt"][6] == "3 / 3"
    assert rows["fresh"][0] == "fresh" and "href" not in rows["fresh"][0]
    assert rows["fresh"][1].startswith('<span class="status in-progress">in progress</span> (1 running)')
    assert f"no report yet: <code>ablate report fresh --storage sqlite:///{path.parent.parent / 'optuna.db'}</code>" \
        in rows["fresh"][2]
    assert "its stored study file does not load" in rows["weird"][2]
    assert EVIL not in page and str(markupsafe.escape(EVIL)) in rows["weird"][2]
    assert "Not listed (not a safe folder name)" in page and "study &#39;../evil&#39;" in page
    assert not (path.parent.parent / "evil").exists() and "evil/index.html" not in page
    assert "1 in progress, 1 stopped, 1 finished;" in page
    assert list(rows)[0] == "fresh"  # the latest activity first


def test_index_commands_mask_passwords_and_wall_time_counts_overlaps_once():
    from ablate.report.html import duration
    from ablate.report.index import commands, wall_s

    url = "postgresql+psycopg://ablate:s3cret@db.example:5432/optuna"
    assert "s3cret" not in commands("default", url)["report"]
    assert commands("default", url)["report"].startswith("ablate report default --storage 'postgresql+psycopg://")
    t0 = datetime.datetime(2026, 1, 1)

    def trial(start: float, end: float) -> SimpleNamespace:
        return SimpleNamespace(datetime_start=t0 + datetime.timedelta(seconds=start), user_attrs={},
                               datetime_complete=t0 + datetime.timedelta(seconds=end))

    # two workers overlapping (0-10, 5-20), then a pause, then a resumed run (100-110): 30 s of running trials
    assert wall_s([trial(100, 110), trial(0, 10), trial(5, 20)]) == 30
    assert wall_s([]) is None
    assert [duration(s) for s in (44.6, 1767, 11100, None)] == ["45 s", "29 min 27 s", "3 h 05 min", ""]


def test_an_equal_compute_study_says_so_in_its_answer(tmp_path):
    from ablate.report import build_report

    b = StoreBuilder(tmp_path, {**SPEC, "name": "eq", "budget": {"match": "flops"}})
    for seed in (1, 2):
        b.add("base", "seed", {"train.lr": 1e-3}, seed, 2.0 + seed / 100)
    build_report("eq", storage=b.storage, tracking_uri=b.tracking_uri, out=tmp_path / "r")
    headline = (tmp_path / "r" / "eq" / "summary.md").read_text(encoding="utf-8").splitlines()[0]
    assert "test loss, every arm trained on the base's training FLOPs:" in headline


def test_a_recall_study_reports_each_arm_beyond_its_training_length(tmp_path, monkeypatch):
    """Scored at 2x and 4x (task.eval_lengths): a column per length and the solved multiple; an arm with learned
    positions cannot run longer inputs and says so instead of showing a blank."""
    from support.runs import TINY_STUDY

    from ablate.runner.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    task = {"name": "recall", "seq_len": 16, "num_pairs": 2, "vocab_size": 16, "num_train": 64, "num_val": 16,
            "num_test": 16, "eval_lengths": [2, 4]}  # fmt: skip
    spec = {**TINY_STUDY, "name": "lengths", "task": task, "seeds": 2,
            "model": {**TINY_STUDY["model"], "position": "rope"}, "scientific": {"model.position": ["rope", "learned"]}}
    (tmp_path / "lengths.yaml").write_text(yaml.safe_dump(spec))
    assert run_study(tmp_path / "lengths.yaml", storage=f"sqlite:///{tmp_path / 'optuna.db'}") == 0
    page = (tmp_path / "reports" / "lengths" / "index.html").read_text()
    table = read_table(page, "lengths-table").set_index("variant")
    assert list(table.columns) == ["acc", "acc at 2x", "acc at 4x", "solved up to (×)"]
    assert all(0 <= float(v) <= 1 for v in table.loc["base", ["acc", "acc at 2x", "acc at 4x"]])
    assert table.loc["base", "solved up to (×)"] in {"0", "1", "2", "4"}
    learned = table.loc["model.position=learned"]
    assert float(learned["acc"]) >= 0 and learned["acc at 2x"] == learned["acc at 4x"] == "n/a (learned positions)"


def test_a_study_of_model_kinds_reports_cost_against_length_and_the_crossover(tmp_path, monkeypatch):
    """Transformer against lstm: FLOPs per token at the training length and at doublings (attention's grow by
    sizes.attention_slope per token of context, the lstm's stay), and the length from which attention costs more,
    the same as sizes.crossover_length counts from the configs."""
    import dataclasses

    from support.runs import TINY_STUDY

    from ablate.core import sizes
    from ablate.design.families import load_spec
    from ablate.runner.study import run_study
    from ablate.tasks import build_task

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = {**TINY_STUDY, "name": "kinds", "model": {**TINY_STUDY["model"], "position": "rope"},
            "scientific": {"model.kind": ["transformer", "lstm"]}}  # fmt: skip
    (tmp_path / "kinds.yaml").write_text(yaml.safe_dump(spec))
    assert run_study(tmp_path / "kinds.yaml", storage=f"sqlite:///{tmp_path / 'optuna.db'}") == 0
    page = (tmp_path / "reports" / "kinds" / "index.html").read_text()
    table = read_table(page, "costs-table").set_index("kind")
    flops = table[[c for c in table.columns if c.startswith("FLOPs/token at ")]].map(
        lambda s: float(s.replace(",", "")))
    assert [c.removeprefix("FLOPs/token at ") for c in flops.columns] == ["16", "32", "64", "128", "256", "512"]
    model = load_spec(tmp_path / "kinds.yaml").base.model
    assert flops.loc["lstm"].nunique() == 1
    assert flops.loc["transformer"].diff().dropna().tolist() == [sizes.attention_slope(model) * n
                                                                 for n in (16, 32, 64, 128, 256)]
    vocab = build_task(load_spec(tmp_path / "kinds.yaml").base.task, seed=0).vocab_size
    at = sizes.crossover_length(dataclasses.replace(model, kind="lstm"), vocab, 16)
    assert f"lstm: attention costs more FLOPs per token than the lstm from {at:,} tokens of context on" in page


def test_a_rebuilt_report_replaces_links_planted_at_its_files_instead_of_writing_through_them(built_ablation, tmp_path):
    """Someone with write access to reports/ plants links where the report writes (the page, results.csv,
    summary.md): the rebuilt report replaces each link with its own file and never writes through it."""
    from ablate.report import build_report

    builder, _, page = built_ablation
    out, victim = tmp_path / "reports", tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "toy").mkdir(parents=True)
    for file in ("index.html", "results.csv", "summary.md"):
        (out / "toy" / file).symlink_to(victim)
    build_report("toy", storage=builder.storage, tracking_uri=builder.tracking_uri, out=out, log_artifacts=False,
                 index=False)
    assert victim.read_text() == "keep me"
    for file in ("index.html", "results.csv", "summary.md"):
        assert not (out / "toy" / file).is_symlink() and (out / "toy" / file).stat().st_size > 0
    rebuilt = (out / "toy" / "index.html").read_text()
    assert rebuilt.startswith(page[:200]) and abs(len(rebuilt) - len(page)) < 100  # the same page, its date aside
    assert not list((out / "toy").glob(".*"))  # no temporary file left behind


def test_each_variants_training_curve_spans_its_seed_runs_led_by_the_median_one(ablation):
    """The curves figure draws every completed seed run of a variant (the band), its median run first: with three
    completed seeds the middle one by test loss, neither the best nor the worst."""
    from ablate.report.load import load_study
    from ablate.report.study_page import curve_runs

    data = load_study("toy", ablation.storage, ablation.tracking_uri)
    chosen = curve_runs(data)
    seeds = data.trials[(data.trials["phase"] == "seed") & (data.trials["status"] == names.COMPLETED)]
    assert set(chosen) == set(seeds["variant"])
    for variant, rows in seeds.groupby("variant"):
        outcome = rows.set_index("run_id")["outcome"]
        if len(outcome) == 3:
            assert outcome.min() < outcome[chosen[variant][0]] < outcome.max(), variant
        assert sorted(chosen[variant]) == sorted(outcome.index)


def test_the_parent_run_carries_the_answer_for_whoever_browses_mlflow(built_ablation, tmp_path, monkeypatch):
    """The study's run in the MLflow UI: the answer as its description, a tag per factor, the verdict table as a
    table artifact (loadable with ``load_table``, not doubled when the report is rebuilt) and the report's files."""
    builder, page, _ = built_ablation
    client = MlflowClient(builder.tracking_uri)
    study = optuna.load_study(study_name="toy", storage=builder.storage)
    run = client.get_run(study.user_attrs[names.ATTR_PARENT_RUN_ID])
    headline = (page.parent / "summary.md").read_text().splitlines()[0].removeprefix("# toy: ")
    assert headline in run.data.tags[names.TAG_NOTE]
    answers = {k.removeprefix(names.TAG_ANSWER_PREFIX): v for k, v in run.data.tags.items()
               if k.startswith(names.TAG_ANSWER_PREFIX)}  # fmt: skip
    assert set(answers) == set(study.user_attrs[names.ATTR_SPEC]["scientific"])
    assert all(" (" in v for v in answers.values())  # "<choice> (<verdict>)"
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, names.REPORT_DIR)}
    assert {f"report/{f}" for f in ("index.html", "results.csv", "summary.md", "verdicts.json")} <= artifacts

    monkeypatch.setenv("MLFLOW_TRACKING_URI", builder.tracking_uri)  # load_table searches the default store

    def table() -> pd.DataFrame:
        return client.load_table(run.info.experiment_id, "report/verdicts.json", run_ids=[run.info.run_id])

    rows = len(table())
    assert rows == len(pd.read_json(page.parent / "verdicts.json", orient="split")) > 0
    from ablate.report import build_report

    build_report("toy", storage=builder.storage, tracking_uri=builder.tracking_uri, out=tmp_path, index=False)
    assert len(table()) == rows  # replaced, not appended
