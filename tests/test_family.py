"""Families of studies: one study file run as a size ladder and/or at several budgets, and the page that says whether
each answer holds, changes or flips across them, each label at the error rate the page states."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats
from support.runs import TINY_STUDY, write_study
from support.stores import index_rows, read_table

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.design.families import load_spec, load_specs
from ablate.design.spec import Nuisance
from ablate.report import across
from ablate.stats import tuning, verdicts

LADDER = {"w16": {"model.embed_dim": 16}, "w32": {"model.embed_dim": 32, "model.num_layers": 2}}


# ---------------------------------------------------------------------------------------------------------------
# The study file


def test_a_ladder_times_budgets_is_one_plain_study_per_member(tmp_path):
    path = write_study(tmp_path / "fam.yaml", name="fam", ladder=LADDER, budget={"match": ["steps", "flops"]})
    specs = load_specs(path, preflight=False)
    assert [s.name for s in specs] == ["fam.w16.steps", "fam.w16.flops", "fam.w32.steps", "fam.w32.flops"]
    assert [(s.base.model.embed_dim, s.base.model.num_layers) for s in specs] == [(16, 1), (16, 1), (32, 2), (32, 2)]
    assert [s.compute.match if s.compute else "steps" for s in specs] == ["steps", "flops"] * 2
    assert {s.family for s in specs} == {"fam"} and specs[3].member == "w32.flops"
    assert "ladder" not in specs[0].data and specs[0].family_data["ladder"] == LADDER
    assert all(s.scientific == specs[0].scientific for s in specs)  # the same question at every rung


def test_a_plain_study_is_a_family_of_one_without_a_family(tmp_path):
    (spec,) = load_specs(write_study(tmp_path / "fam.yaml", name="fam"), preflight=False)
    assert spec.name == "fam" and spec.family == "" and spec.member == ""


BAD = {
    "label": ({"ladder": {"w 16": {"model.embed_dim": 16}}}, "ladder.w 16", "label"),
    "empty_rung": ({"ladder": {"w16": {}}}, "ladder.w16", "must map config keys"),
    "not_a_config_key": ({"ladder": {"w16": {"points": 2}}}, "ladder.w16.points", "dotted key"),
    "unknown_field": ({"ladder": {"w16": {"model.width": 16}}}, "model.width", "in member w16"),
    "bad_value": ({"ladder": {"w16": {"model.embed_dim": 15}}}, "model", "in member w16"),
    "one_budget": ({"budget": {"match": ["flops"]}}, "budget.match", "at least two"),
    "unknown_budget": ({"budget": {"match": ["steps", "joules"]}}, "budget.match", "joules"),
    "value_with_list": ({"budget": {"match": ["steps", "flops"], "value": 1e9}}, "budget.value", "leave it out"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_families_are_one_line_naming_the_file_and_key(case, tmp_path):
    changes, key, problem = BAD[case]
    path = write_study(tmp_path / "fam.yaml", name="fam", **changes)
    with pytest.raises(ConfigError) as err:
        load_specs(path, preflight=False)
    assert err.value.key.startswith(key) and problem in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_loading_one_spec_from_a_family_file_names_its_members(tmp_path):
    with pytest.raises(ConfigError, match="runs 2 studies \\(fam.w16, fam.w32\\)"):
        load_spec(write_study(tmp_path / "fam.yaml", name="fam", ladder=LADDER), preflight=False)


# ---------------------------------------------------------------------------------------------------------------
# Across members: pure functions


NAN = (math.nan, math.nan)
WIDTH = across.changes("with width")


@pytest.mark.parametrize("verdicts, change, label", [
    ({"a": "better", "b": "better"}, NAN, across.HOLDS),
    ({"a": "better", "b": "better"}, (-0.2, -0.01), WIDTH),  # better everywhere, more so with width
    ({"a": "equivalent", "b": "better", "c": "better"}, (-0.1, 0.02), across.INCONCLUSIVE),  # no change shown
    ({"a": "equivalent", "b": "better", "c": "better"}, (-0.1, -0.02), WIDTH),
    ({"a": "better", "b": "worse"}, (0.02, 0.3), across.FLIPS),
    ({"a": "better", "b": "worse"}, (-0.01, 0.3), across.INCONCLUSIVE),  # opposite verdicts, no change shown
    ({"a": "worse", "b": "inconclusive", "c": "worse"}, NAN, across.INCONCLUSIVE),
    ({"a": "inconclusive", "b": "undecided"}, (0.01, 0.1), WIDTH),
    ({"a": "better", "b": "inconclusive", "c": "worse"}, (0.01, 0.1), across.FLIPS),
])  # fmt: skip
def test_consistency_labels(verdicts, change, label):
    assert across.consistency(verdicts, change, "with width") == label


def test_a_factor_takes_its_strongest_label_and_the_text_names_members():
    assert across.factor_consistency([across.HOLDS, WIDTH, across.INCONCLUSIVE]) == WIDTH
    assert across.factor_consistency([across.HOLDS, across.FLIPS, WIDTH]) == across.FLIPS
    assert across.factor_consistency([across.HOLDS, across.INCONCLUSIVE]) == across.INCONCLUSIVE
    text = across.describe({"w64": "equivalent", "w128": "better", "w256": "better"})
    assert text == "equivalent at w64; better at w128, w256"


def test_trend_is_the_least_squares_slope_with_each_members_error_and_the_tuning_penalties():
    x, diff, se, n = np.array([6.0, 7.0, 8.0]), np.array([0.0, -0.05, -0.1]), np.full(3, 0.01), np.array([3, 6, 3])
    slope, lo, hi = across.trend(x, diff, se, n, 0.05)
    half = stats.t.isf(0.025, 2) * math.sqrt(2 * 0.5**2 * 0.01**2)  # c = (-1/2, 0, 1/2); min(n) - 1 = 2 df
    assert (slope, lo, hi) == pytest.approx((-0.05, -0.05 - half, -0.05 + half))
    _, lo2, hi2 = across.trend(x, diff, se, n, 0.05, pen_alt=np.array([0.0, 0.0, 0.02]), pen_base=0.04)
    assert (lo2, hi2) == pytest.approx((lo - 0.5 * 0.02 - 0.5 * 0.04, hi + 0.5 * 0.04))
    assert math.isinf(across.trend(x, diff, se, n, 0.05, pen_alt=math.nan)[1])  # unbounded: no change shown


def _table(diff: float, se: float, verdict: str) -> pd.DataFrame:
    """A member's verdict table (3 paired seeds, no tuning penalty) with one alternative."""
    half = stats.t.isf(0.025, 2) * se
    return pd.DataFrame({"variant": ["base", "s=inverse"], "factor": ["", "model.scaling"], "verdict": ["", verdict],
                         "diff": [math.nan, diff], "lo": [math.nan, diff - half], "hi": [math.nan, diff + half],
                         "se": [math.nan, se], "paired": [0, 3], "seeds": [3, 3], "penalty": [0.0, 0.0]})  # fmt: skip


def test_compare_tests_the_change_of_each_effect_along_the_members():
    positions = {"w64": 6.0, "w128": 7.0, "w256": 8.0}
    tables = {"w64": _table(0.05, 0.005, "worse"), "w128": _table(-0.01, 0.005, "equivalent"),
              "w256": _table(-0.08, 0.005, "better")}  # fmt: skip
    row = across.compare(tables, positions, 0.05, "with width").iloc[0]
    assert row["label"] == across.FLIPS and row["trend"] == pytest.approx(-0.065) and row["trend hi"] < 0
    assert row["text"] == "worse at w64; equivalent at w128; better at w256" and row["w128: diff"] == -0.01
    verdicts_ = dict(zip(positions, ["worse", "equivalent", "worse"], strict=True))
    level = across.compare({k: _table(0.02, 0.01, v) for k, v in verdicts_.items()}, positions)
    assert level.at[0, "label"] == across.INCONCLUSIVE and level.at[0, "trend"] == pytest.approx(0.0)
    unbounded = {k: t.assign(penalty=[math.inf, 0.0]) for k, t in tables.items()}  # the base's optimum unbracketed
    assert across.compare(unbounded, positions).at[0, "label"] == across.INCONCLUSIVE


def _members(rng: np.random.Generator, effects: list[list[float]], sds: list[float], rule: verdicts.Rule) -> dict:
    """Per member, 4000 simulated studies of one factor with len(effects) alternatives: each alternative's mean
    paired difference, se, seeds and verdict (``verdicts.judge_arrays``). ``effects[j][i]``: value j in member i."""
    out = {key: [] for key in ("mean", "se", "n", "verdict")}
    for i, sd in enumerate(sds):
        base = rng.standard_normal((4000, 6)) * sd
        truth = np.array([e[i] for e in effects])[None, :, None]
        j = verdicts.judge_arrays(base, base[:, None, :] + truth + sd * rng.standard_normal((4000, len(effects), 6)),
                                  rule)  # fmt: skip
        for key in out:
            out[key].append(getattr(j, key))
    return {key: np.stack(v, axis=-1) for key, v in out.items()}  # (4000, values, members)


def _labels(sim: dict, x: np.ndarray, alpha: float) -> list[str]:
    """Each simulated study's factor label, as ``across.compare`` gives it: every value at alpha / values."""
    k = sim["mean"].shape[1]
    _, lo, hi = across.trend(x, sim["mean"], sim["se"], sim["n"], alpha / k)
    names = np.array(verdicts.VERDICTS)[sim["verdict"]]
    return [across.factor_consistency([across.consistency(dict(enumerate(names[s, j])), (lo[s, j], hi[s, j]),
                                                          "with width") for j in range(k)])
            for s in range(len(lo))]  # fmt: skip


@pytest.mark.parametrize("sds", [[0.01, 0.01, 0.01], [0.01, 0.02, 0.04], [0.005, 0.02, 0.02]])
def test_the_same_effects_in_every_member_are_called_changed_at_most_alpha_of_the_time(sds):
    """4000 simulated families of 3 widths (3 then up to 6 seeds per member, paired noise sd ``sds`` by member), a
    factor of two values whose effects, +0.02 and 0, are the same in every member. Measured: the factor is labelled
    "changes" or "flips" 2.3%, 4.4% and 4.3% of the time (at most alpha = 5%); the old rule labelled the +0.02
    value "moves" (decided verdicts that differ) 25%, 11% and 15% of the time, where its page said at most 15%."""
    rule, x = verdicts.Rule(margin=0.03, alpha=0.05, min_seeds=3, max_seeds=6), np.log2([64, 128, 256])
    sim = _members(np.random.default_rng(4), [[0.02] * 3, [0.0] * 3], sds, rule)
    labels = _labels(sim, x, rule.alpha)
    changed = sum(label == across.FLIPS or label.startswith(across.CHANGES) for label in labels) / len(labels)
    assert changed <= rule.alpha + 2 * math.sqrt(rule.alpha / len(labels)), changed
    if sds == [0.01] * 3:  # the old label, on the same data
        moves = np.mean([len(set(row[row != verdicts.UNDECIDED])) > 1 for row in sim["verdict"][:, 0, :]])
        assert moves > 3 * rule.alpha


def test_an_effect_that_grows_with_width_is_found_to_change():
    """The effect 0, +0.05, +0.10 at widths 64, 128, 256, noise sd 0.02: "changes with width" in 99.98% of 4000."""
    rule, x = verdicts.Rule(margin=0.03, alpha=0.05, min_seeds=3, max_seeds=6), np.log2([64, 128, 256])
    labels = _labels(_members(np.random.default_rng(5), [[0.0, 0.05, 0.1]], [0.02] * 3, rule), x, rule.alpha)
    assert labels.count(WIDTH) / len(labels) > 0.6


NU = Nuisance("train.lr", 3e-3, 6e-2, log=True)
GRID = (np.arange(6) + 0.5) / 6


def _ladder(rng: np.random.Generator, b: float, widths: list[int], sd: float, skew: float = 0.0) -> list[tuple]:
    """Per width, one arm's tuning (6 points x 2 tune seeds around a true optimum lr ∝ width^b, loss a bowl in the
    log lr, lopsided with ``skew``) and the seed spread pooled over it and a second arm, as a study measures them."""
    out = []
    for w in widths:
        d = GRID - (NU.quantile(1.7e-2) + b * math.log(w / 64) / math.log(NU.high / NU.low))
        y = 1.2 * d**2 + skew * np.maximum(d, 0) ** 3 + sd * rng.standard_normal((2, 2, 6))  # arms, tune seeds, points
        tuned = tuning.tune(np.tile(GRID, 2), y[0].ravel(), ceiling=10.0)
        out.append((tuned, tuning.pooled_sd(y[a, :, p] for a in range(2) for p in range(6))))
    return out


@pytest.mark.parametrize("sd, skew", [(0.02, 0.0), (0.03, 3.0)])
def test_the_exponents_interval_covers_the_true_exponent_at_least_at_its_level(sd, skew):
    """500 simulated ladders of widths 32, 64, 128 with lr* ∝ width^-0.7 and seed-noisy tuning (6 points, 2 tune
    seeds, the spread pooled over two arms): the 95% interval holds -0.7 in 95.7% (noise sd 0.02; median width 0.51)
    and 95.9% (sd 0.03, a lopsided bowl; 0.58) of the ladders whose every width bracketed the optimum."""
    rng, widths, held, tried = np.random.default_rng(6), [32, 64, 128], 0, 0
    for _ in range(500):
        ladder = _ladder(rng, -0.7, widths, sd, skew)
        if not all(t.interior for t, _ in ladder):
            continue
        _, lo, hi = across.exponent_interval([t for t, _ in ladder], [s for _, s in ladder], widths, NU, 0.05)
        held, tried = held + (lo <= -0.7 <= hi), tried + 1
    assert tried > 400 and held / tried >= 0.95 - 2 * math.sqrt(0.05 * 0.95 / tried), (held, tried)


def test_the_exponents_bootstrap_draws_are_independent_across_widths():
    """bootstrap_choices draws from one seed: two widths tuned alike would get the very same draws, and the slope
    through them would be exactly 0 in every draw. Shuffled per width, the interval has the width it should."""
    tuned, sd = _ladder(np.random.default_rng(7), 0.0, [64], 0.03)[0]
    b, lo, hi = across.exponent_interval([tuned, tuned], [sd, sd], [64, 128], NU, 0.05)
    assert b == pytest.approx(0.0, abs=1e-12) and lo < -0.1 and hi > 0.1  # equal optima: no slope, up to rounding
    b, lo, hi = across.exponent_interval([tuned, tuned], [math.nan, sd], [64, 128], NU, 0.05)
    assert b == pytest.approx(0.0, abs=1e-12) and math.isnan(lo) and math.isnan(hi)  # no seed spread: no interval


def _tuned(rng: np.random.Generator, best: float, seeds: int = 2) -> tuning.Tuned:
    """An arm's tuning: 6 points x ``seeds`` tune seeds of a bowl with its optimum at quantile ``best``, noise 0.01."""
    y = 1.5 + 2.0 * (GRID - best) ** 2 + 0.01 * rng.standard_normal((seeds, 6))
    return tuning.tune(np.tile(GRID, seeds), y.ravel(), ceiling=3.0)


def test_lr_by_width_fits_the_bracketed_widths_with_an_interval():
    rng, widths = np.random.default_rng(8), {"a": 64, "b": 128, "c": 256}
    slope = -0.7 * math.log(2) / math.log(NU.high / NU.low)  # lr ∝ width^-0.7, in quantiles per doubling
    tunings = {m: {"base": _tuned(rng, 0.5 + i * slope), "s=inverse": _tuned(rng, 1.3 if m == "c" else 0.5)}
               for i, m in zip((-1, 0, 1), widths, strict=True)}  # s=inverse at c: beyond the range  # fmt: skip
    out = across.lr_by_width(tunings, dict.fromkeys(widths, 0.01), widths, NU, 0.05).set_index("variant")
    base, alt = out.loc["base"], out.loc["s=inverse"]
    assert base["bracketed widths"] == 3 and base["exponent lo"] < -0.7 < base["exponent hi"]
    assert base["exponent"] == pytest.approx(-0.7, abs=0.1) and base["exponent hi"] - base["exponent lo"] < 0.3
    assert base["lr @ 128"] == pytest.approx(NU.value_at(0.5), rel=0.1)
    assert alt["bracketed widths"] == 2 and math.isnan(alt["lr @ 256"]) and abs(alt["exponent"]) < 0.1
    one = across.lr_by_width(tunings, {**dict.fromkeys(widths, 0.01), "b": math.nan}, widths, NU, 0.05)
    assert math.isfinite(one.at[0, "exponent"]) and math.isnan(one.at[0, "exponent lo"])  # no spread: no interval


def test_frontier_keeps_only_arms_no_cheaper_arm_beats():
    points = pd.DataFrame({"arm": list("abcde"), "cost": [1.0, 2.0, 2.0, 4.0, float("nan")],
                           "loss": [3.0, 2.5, 2.0, 2.2, 1.0]})  # fmt: skip
    assert list(across.frontier(points, "cost", "loss")["arm"]) == ["a", "c"]
    matched = pd.DataFrame({"arm": ["base", "cheap"], "cost": [4.4700e11, 4.4701e11], "loss": [1.65, 1.55]})
    assert list(across.frontier(matched, "cost", "loss")["arm"]) == ["cheap"]  # one budget, overshot by a step


# ---------------------------------------------------------------------------------------------------------------
# A family run end to end


def test_a_ladder_at_two_budgets_gives_one_answer_per_member_and_a_family_page(tmp_path, monkeypatch, capsys):
    from ablate.report import report_command
    from ablate.runner.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    train = {**TINY_STUDY["train"], "steps": 4, "eval_every": 2, "log_every": 2}
    (tmp_path / "studies" / "claims").mkdir(parents=True)  # as a claims study lives, not at studies/<name>.yaml
    path = write_study(tmp_path / "studies" / "claims" / "fam.yaml", name="fam", ladder=LADDER, seeds=2, train=train,
                       budget={"match": ["steps", "flops"]})  # fmt: skip
    assert run_study(path, storage=storage) == 0
    out = capsys.readouterr().out
    members = ["fam.w16.steps", "fam.w16.flops", "fam.w32.steps", "fam.w32.flops"]
    for name in members:  # each member is a whole study: its trials, its report, its answer
        study = optuna.load_study(study_name=name, storage=storage)
        assert study.user_attrs[names.ATTR_FAMILY] == "fam" and len(study.trials) == 6  # 2 x (1 tune + 2 seeds)
        # one tune point: its penalty is unbounded (nothing bracketed), so 'worse' and 'equivalent' cannot be claimed
        assert re.search(rf"^{re.escape(name)}: [01] of 1 scientific parameters decided study-wide", out, re.M)
        assert (tmp_path / "reports" / name / "index.html").is_file()
    assert re.search(r"^fam: across 4 members: model\.num_heads (holds|changes with width|flips|inconclusive)", out,
                     re.M)  # fmt: skip
    page = (tmp_path / "reports" / "fam" / "index.html").read_text()
    side = read_table(page, "side-by-side-table")
    assert list(side.columns) == ["factor", "value", "w16.steps", "w16.flops", "w32.steps", "w32.flops",
                                  "change per doubling of width [interval]", "across members"]  # fmt: skip
    assert len(side) == 1 and side["value"][0] == "model.num_heads=4"
    assert len(read_table(page, "members-table")) == 4
    assert read_table(page, "lr-width-table").columns.tolist() == ["variant", "lr @ 16", "lr @ 32", "exponent",
                                                                   "exponent lo", "exponent hi", "bracketed widths"]
    text = html.unescape(page)  # the page states the rates its labels keep
    assert "wrong with probability at most 0.2 (Bonferroni)" in text
    assert "'changes' or 'flips' with probability at most 0.05" in text
    index = (tmp_path / "reports" / "index.html").read_text()
    assert '<span class="badge">4 in the store; 1 family</span>' in index
    rows = index_rows(index)
    assert set(members) <= set(rows)  # every member, and the family as one row linking to its page
    assert 'href="fam/index.html"' in rows["fam"][0] and rows["fam"][2].startswith("across 4 members: ")
    assert rows["fam"][3].startswith("family of 4: fam.w16.steps") and rows["fam"][6] == "24 / 24"
    from ablate.report.index import study_row  # a member's study command is its family's file, which runs it

    assert study_row("fam.w32.flops", storage, tmp_path / "reports")["commands"]["study"].startswith(
        "ablate study studies/claims/fam.yaml")
    member_page = (tmp_path / "reports" / "fam.w32.flops" / "index.html").read_text()
    assert "ablate study studies/claims/fam.yaml" in member_page  # its "reproduce" command: the file as run

    (tmp_path / "reports" / "fam" / "index.html").unlink()  # `ablate report fam` rebuilds the family and its members
    assert report_command(["fam"], storage=storage) == 0
    assert (tmp_path / "reports" / "fam" / "index.html").read_text().count('data-factor="model.num_heads"') == 1
    (tmp_path / "reports" / "fam" / "summary.md").unlink()  # and so does `make report` (every study, every family)
    assert report_command([], all_studies=True, storage=storage) == 0
    assert (tmp_path / "reports" / "fam" / "summary.md").read_text().startswith("# fam: across 4 members: ")
    assert run_study(path, storage=storage) == 0  # a rerun of a finished family runs nothing more
    assert all(len(optuna.load_study(study_name=n, storage=storage).trials) == 6 for n in members)
