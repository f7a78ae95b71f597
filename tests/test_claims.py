"""Published claims judged from a study's own numbers: reproduced, not reproduced or inconclusive, never canned."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TINY_STUDY

from ablate.config import ConfigError
from ablate.report import claims
from ablate.spec import Claim, spec_from_mapping

CLAIM = {"source": "Vaswani et al. 2017, Table 3 (A)", "claim": "One head is worse.",
         "expect": {"model.num_heads=4": "worse"}}  # fmt: skip


@pytest.mark.parametrize("expected, measured, outcome", [
    ("worse", "worse", claims.REPRODUCED),
    ("worse", "equivalent", claims.NOT_REPRODUCED),
    ("worse", "better", claims.NOT_REPRODUCED),
    ("worse", "undecided", claims.INCONCLUSIVE),
    ("not worse", "equivalent", claims.REPRODUCED),
    ("not worse", "better", claims.REPRODUCED),
    ("not worse", "worse", claims.NOT_REPRODUCED),
    ("equivalent", "not run", claims.INCONCLUSIVE),
])  # fmt: skip
def test_an_expected_verdict_is_met_contradicted_or_undecided(expected, measured, outcome):
    assert claims.judge_verdict(expected, measured) == outcome


def test_a_claim_needs_every_part_and_falls_with_any():
    R, N, I = claims.REPRODUCED, claims.NOT_REPRODUCED, claims.INCONCLUSIVE  # noqa: E741
    assert claims.combine([R, R]) == R and claims.combine([R, I]) == I and claims.combine([R, I, N]) == N
    assert claims.combine([]) == I
    assert claims.tally([R, N, R]) == "2 of 3 reproduced, 1 not reproduced" and claims.tally([I]) == \
        "0 of 1 reproduced, 1 inconclusive"


def test_lr_sensitivity_is_the_mean_excess_over_the_best_with_divergence_at_the_ceiling():
    tune = pd.DataFrame({"train.lr": [1e-3, 3e-3, 1e-2, 3e-2], "value": [2.0, 1.5, 1.7, np.nan]})
    assert claims.lr_sensitivity(tune, "train.lr", ceiling=4.5) == pytest.approx((0.5 + 0 + 0.2 + 3.0) / 4)
    assert claims.lr_sensitivity(tune.assign(value=[9.0, 1.5, 1.7, 1.6]), "train.lr", 4.5) == \
        pytest.approx((3.0 + 0 + 0.2 + 0.1) / 4)  # a loss above the uniform guess counts as the guess
    assert math.isnan(claims.lr_sensitivity(tune.head(1), "train.lr", 4.5))
    assert claims.judge_sensitivity(0.1, 0.5, 0.03) == claims.REPRODUCED
    assert claims.judge_sensitivity(0.5, 0.1, 0.03) == claims.NOT_REPRODUCED
    assert claims.judge_sensitivity(0.1, 0.12, 0.03) == claims.INCONCLUSIVE


def test_an_exponent_range_is_met_missed_or_unknown():
    assert claims.judge_exponent([-0.25, 0.25], 0.1) == claims.REPRODUCED
    assert claims.judge_exponent([-0.25, 0.25], -0.8) == claims.NOT_REPRODUCED
    assert claims.judge_exponent([-0.25, 0.25], math.nan) == claims.INCONCLUSIVE
    assert claims.judge_exponent([-1.5, -0.3], 0.0, resolution=0.7) == claims.INCONCLUSIVE  # the grid cannot tell
    assert claims.judge_exponent([-1.5, -0.3], 0.5, resolution=0.7) == claims.NOT_REPRODUCED
    assert claims.judge_exponent([-1.5, -0.3], -0.9, resolution=0.5) == claims.REPRODUCED


BAD = {
    "no_source": ({"claim": "x", "expect": {"model.num_heads=4": "worse"}}, "claims.c", "source"),
    "no_expectation": ({"source": "s", "claim": "x"}, "claims.c", "expectation"),
    "unknown_verdict": ({**CLAIM, "expect": {"model.num_heads=4": "much worse"}}, "claims.c.expect.model.num_heads=4",
                        "allowed"),
    "unknown_variant": ({**CLAIM, "expect": {"model.num_heads=16": "worse"}}, "claims.c.expect", "not a variant"),
    "bad_range": ({**CLAIM, "lr_exponent": {"base": [0.5, -0.5]}}, "claims.c.lr_exponent.base", "low < high"),
    "unknown_than": ({**CLAIM, "less_sensitive": "base", "than": "nope"}, "claims.c.than", "not a variant"),
    "unknown_solver": ({**CLAIM, "solves": ["base", "model.num_heads=8"]}, "claims.c.solves", "not a variant"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_claim_is_one_line_naming_its_key(case):
    body, key, problem = BAD[case]
    with pytest.raises(ConfigError) as err:
        spec_from_mapping({**TINY_STUDY, "claims": {"c": body}})
    assert err.value.key == key and problem in err.value.problem, str(err.value)


def _table(verdict: str, diff: float) -> pd.DataFrame:
    return pd.DataFrame({"variant": ["base", "model.num_heads=4"], "verdict": ["", verdict], "diff": [math.nan, diff],
                         "lo": [math.nan, diff - 0.02], "hi": [math.nan, diff + 0.02], "seeds": [3, 3]})  # fmt: skip


def test_judge_reads_the_verdict_table_and_says_what_it_measured():
    spec = spec_from_mapping({**TINY_STUDY, "claims": {"c": CLAIM}})
    judged = claims.judge(spec.claims["c"], spec, _table("worse", 0.06), pd.DataFrame())
    assert judged["verdict"] == claims.REPRODUCED
    assert judged["lines"] == [{"outcome": "reproduced", "text": "model.num_heads=4: expected worse, measured worse "
                                "(+0.0600 [+0.0400, +0.0800] test loss vs the base, 3 seeds)"}]  # fmt: skip
    assert claims.judge(spec.claims["c"], spec, _table("", 0.01), pd.DataFrame())["verdict"] == claims.INCONCLUSIVE
    with_width = Claim(**{**CLAIM, "lr_exponent": {"base": [-1.5, -0.5]}})
    assert claims.judge(with_width, spec, _table("worse", 0.06), pd.DataFrame())["verdict"] == claims.REPRODUCED
    judged = claims.judge(with_width, spec, _table("worse", 0.06), pd.DataFrame(), {"base": (0.0, 0.2)})
    assert judged["verdict"] == claims.NOT_REPRODUCED and "b = +0.00 ± 0.20" in judged["lines"][1]["text"]


def test_a_real_study_shows_its_claims_with_verdicts_computed_from_its_numbers(tmp_path, monkeypatch):
    from conftest import read_table

    from ablate.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = {**TINY_STUDY, "name": "claimed", "seeds": 2, "points": 2,
            "claims": {"heads": {**CLAIM, "published": "BLEU 24.9 vs 25.8"},
                       "stable": {"source": "Wortsman et al. 2023", "claim": "Four heads are less LR-sensitive.",
                                  "less_sensitive": "model.num_heads=4"}}}  # fmt: skip
    (tmp_path / "claimed.yaml").write_text(yaml.safe_dump(spec))
    assert run_study(tmp_path / "claimed.yaml", storage=f"sqlite:///{tmp_path / 'optuna.db'}") == 0
    page = (tmp_path / "reports" / "claimed" / "index.html").read_text()
    verdict = read_table(page, "variants-table").set_index("variant").loc["model.num_heads=4", "verdict"]
    section = re.search(r'<div class="claim" data-claim="heads">(.*?)</div>', page, re.S).group(1)
    assert "One head is worse." in section and "Published: BLEU 24.9 vs 25.8" in section
    assert f"measured {verdict if verdict != '—' else 'undecided'}" in section
    expected = claims.judge_verdict("worse", verdict if verdict != "—" else "undecided")
    assert f'<span class="verdict {expected.replace(" ", "-")}">{expected}</span>' in section
    assert "tested at width 16, 1 layer, 10 steps of 8 x 16 tokens" in section
    summary = (tmp_path / "reports" / "claimed" / "summary.md").read_text().splitlines()[0]
    assert re.search(r"; claims: [0-2] of 2 reproduced", summary), summary  # the index's one-line answer counts them
    stable = re.search(r'<div class="claim" data-claim="stable">(.*?)</div>', page, re.S).group(1)
    assert re.search(r"LR sensitivity of model.num_heads=4 \d\.\d{3} against base \d\.\d{3} nats", stable)
    grid = read_table(stable, "claim-stable-grid")  # loss, divergence and the largest logit, by learning rate
    assert list(grid.columns) == ["train.lr", "model.num_heads=4: val/loss", "model.num_heads=4: max logit",
                                  "base: val/loss", "base: max logit"]  # fmt: skip
    assert len(grid) == 2 and all(float(v) > 0 for v in grid["base: max logit"])


def test_lr_grid_marks_divergence_and_leaves_untried_rates_blank():
    tune = pd.DataFrame({"variant": ["a", "a", "b"], "train.lr": [1e-3, 1e-2, 1e-3], "value": [2.0, np.nan, 2.5],
                         "status": ["completed", "diverged", "completed"], "run_id": ["r1", "r2", "r3"]})  # fmt: skip
    grid = claims.lr_grid(tune, "train.lr", ["a", "b"], {"r1": 3.0, "r2": 40.0})
    assert grid["a: val/loss"].tolist() == ["2.0000", "diverged"] and grid["b: val/loss"].tolist() == ["2.5000", ""]
    assert grid["a: max logit"].tolist() == [3.0, 40.0] and math.isnan(grid["b: max logit"][0])


def test_a_member_report_leaves_a_width_only_claim_to_its_family(monkeypatch):
    from ablate.report import _claims

    spec = spec_from_mapping({**TINY_STUDY, "claims": {"w": {"source": "Yang et al. 2022", "claim": "LR falls.",
                                                             "lr_exponent": {"base": [-1.5, -0.3]}}}})  # fmt: skip
    data = type("Data", (), {"spec": spec, "trials": pd.DataFrame({"phase": [], "status": []})})()
    assert _claims(data, _table("worse", 0.06)) == []  # no "0 of 1 reproduced" on a member's page


def test_a_claim_can_name_the_one_member_of_a_family_it_is_about():
    from ablate.families import family_specs

    ladder = {"small": {"model.embed_dim": 16}, "wide": {"model.embed_dim": 32}}
    specs = family_specs({**TINY_STUDY, "ladder": ladder, "claims": {"c": {**CLAIM, "member": "wide"}}})
    assert [s.tests(s.claims["c"]) for s in specs] == [False, True]
    with pytest.raises(ConfigError, match=r"claims\.c\.member: 'huge' is not a member of this study; its members: "
                                          r"small, wide"):  # fmt: skip
        family_specs({**TINY_STUDY, "ladder": ladder, "claims": {"c": {**CLAIM, "member": "huge"}}})
    with pytest.raises(ConfigError, match="none \\(no ladder or budgets\\)"):
        family_specs({**TINY_STUDY, "claims": {"c": {**CLAIM, "member": "wide"}}})


def test_solved_needs_the_whole_interval_at_or_above_the_threshold_and_a_diverged_seed_solved_nothing():
    assert claims.judge_solved([1.0, 0.99, 1.0])[0] == claims.REPRODUCED
    assert claims.judge_solved([1.0, 0.52, 1.0])[0] == claims.INCONCLUSIVE  # one seed stuck on the plateau
    assert claims.judge_solved([0.52, 0.50, 0.53])[0] == claims.NOT_REPRODUCED
    assert claims.judge_solved([1.0])[0] == claims.INCONCLUSIVE  # one seed: no interval
    assert claims.judge_solved([])[0] == claims.INCONCLUSIVE
    spec = spec_from_mapping({**TINY_STUDY, "claims": {"c": {**CLAIM, "expect": {}, "solves": ["base"]}}})
    seeds = pd.DataFrame({"variant": ["base"] * 3, "status": ["completed", "completed", "diverged"],
                          "test/acc": [1.0, 1.0, math.nan]})  # fmt: skip
    judged = claims.judge(spec.claims["c"], spec, _table("", 0.0), pd.DataFrame(), seeds=seeds)
    assert judged["verdict"] == claims.INCONCLUSIVE  # 0.667 ± 1.43: the diverged seed widens the interval
    assert judged["lines"][0]["text"].startswith("base: expected to solve it (accuracy >= 0.9), measured test "
                                                 "accuracy 0.667 ± ")
    assert judged["lines"][0]["text"].endswith("(2 of 3 seeds at or above 0.9)")
    text = seeds.drop(columns="test/acc").assign(**{"test/bpc": 1.9})  # a charlm study logs no accuracy
    judged = claims.judge(spec.claims["c"], spec, _table("", 0.0), pd.DataFrame(), seeds=text)
    assert judged["verdict"] == claims.INCONCLUSIVE and "log no test/acc" in judged["lines"][0]["text"]
