"""Families of studies: one study file run as a size ladder and/or at several budgets, and the page that says whether
each answer holds, moves or flips across them."""

from __future__ import annotations

import math
import re

import optuna
import pandas as pd
import pytest
import yaml
from conftest import TINY_STUDY, index_rows, read_table

from ablate import names
from ablate.config import ConfigError
from ablate.families import load_specs
from ablate.report import across
from ablate.spec import load_spec

LADDER = {"w16": {"model.embed_dim": 16}, "w32": {"model.embed_dim": 32, "model.num_layers": 2}}


def _write(tmp_path, **changes) -> str:
    path = tmp_path / "fam.yaml"
    path.write_text(yaml.safe_dump({**TINY_STUDY, "name": "fam", **changes}, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# The study file


def test_a_ladder_times_budgets_is_one_plain_study_per_member(tmp_path):
    specs = load_specs(_write(tmp_path, ladder=LADDER, budget={"match": ["steps", "flops"]}), preflight=False)
    assert [s.name for s in specs] == ["fam.w16.steps", "fam.w16.flops", "fam.w32.steps", "fam.w32.flops"]
    assert [(s.base.model.embed_dim, s.base.model.num_layers) for s in specs] == [(16, 1), (16, 1), (32, 2), (32, 2)]
    assert [s.compute.match if s.compute else "steps" for s in specs] == ["steps", "flops"] * 2
    assert {s.family for s in specs} == {"fam"} and specs[3].member == "w32.flops"
    assert "ladder" not in specs[0].data and specs[0].family_data["ladder"] == LADDER
    assert all(s.scientific == specs[0].scientific for s in specs)  # the same question at every rung


def test_a_plain_study_is_a_family_of_one_without_a_family(tmp_path):
    (spec,) = load_specs(_write(tmp_path), preflight=False)
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
    path = _write(tmp_path, **changes)
    with pytest.raises(ConfigError) as err:
        load_specs(path, preflight=False)
    assert err.value.key.startswith(key) and problem in str(err.value), str(err.value)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_loading_one_spec_from_a_family_file_names_its_members(tmp_path):
    with pytest.raises(ConfigError, match="runs 2 studies \\(fam.w16, fam.w32\\)"):
        load_spec(_write(tmp_path, ladder=LADDER), preflight=False)


# ---------------------------------------------------------------------------------------------------------------
# Across members: pure functions


@pytest.mark.parametrize("verdicts, label", [
    ({"a": "better", "b": "better"}, across.HOLDS),
    ({"a": "equivalent", "b": "better", "c": "better"}, across.MOVES),
    ({"a": "better", "b": "worse"}, across.FLIPS),
    ({"a": "worse", "b": "inconclusive", "c": "worse"}, across.INCONCLUSIVE),
    ({"a": "inconclusive", "b": "undecided"}, across.INCONCLUSIVE),
    ({"a": "better", "b": "inconclusive", "c": "worse"}, across.FLIPS),
])  # fmt: skip
def test_consistency_labels(verdicts, label):
    assert across.consistency(verdicts) == label


def test_a_factor_takes_its_strongest_label_and_the_text_names_members():
    assert across.factor_consistency([across.HOLDS, across.MOVES, across.INCONCLUSIVE]) == across.MOVES
    assert across.factor_consistency([across.HOLDS, across.FLIPS]) == across.FLIPS
    text = across.describe({"w64": "equivalent", "w128": "better", "w256": "better"})
    assert text == "equivalent at w64; better at w128, w256"


def test_width_exponent_recovers_a_power_law_and_needs_two_widths():
    assert across.width_exponent([(64, 0.02), (128, 0.01), (256, 0.005)]) == pytest.approx(-1.0)
    assert across.width_exponent([(64, 0.01), (256, 0.005)]) == pytest.approx(-0.5)
    assert math.isnan(across.width_exponent([(64, 0.01), (64, 0.02)]))


def test_lr_by_width_leaves_unbracketed_tunings_out_of_the_fit():
    def table(lr_base, lr_alt, bracketed_alt):
        return pd.DataFrame({"variant": ["base", "s=inverse"], "lr": [lr_base, lr_alt],
                             "bracketed": [True, bracketed_alt]})  # fmt: skip

    out = across.lr_by_width({"a": table(0.02, 0.01, True), "b": table(0.01, 0.01, True),
                              "c": table(0.005, 0.03, False)}, {"a": 64, "b": 128, "c": 256}, step=2.0)  # fmt: skip
    base, alt = out.set_index("variant").loc["base"], out.set_index("variant").loc["s=inverse"]
    assert base["exponent"] == pytest.approx(-1.0) and base["bracketed widths"] == 3
    assert alt["exponent"] == pytest.approx(0.0) and math.isnan(alt["lr @ 256"])
    assert base["± (grid)"] == pytest.approx(0.5) and alt["± (grid)"] == pytest.approx(1.0)  # log 2 / log 4, / log 2


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
    from ablate.study import run_study

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    train = {**TINY_STUDY["train"], "steps": 4, "eval_every": 2, "log_every": 2}
    (tmp_path / "studies" / "claims").mkdir(parents=True)  # as a claims study lives, not at studies/<name>.yaml
    path = _write(tmp_path / "studies" / "claims", ladder=LADDER, budget={"match": ["steps", "flops"]}, seeds=2,
                  train=train)  # fmt: skip
    assert run_study(path, storage=storage) == 0
    out = capsys.readouterr().out
    members = ["fam.w16.steps", "fam.w16.flops", "fam.w32.steps", "fam.w32.flops"]
    for name in members:  # each member is a whole study: its trials, its report, its answer
        study = optuna.load_study(study_name=name, storage=storage)
        assert study.user_attrs[names.ATTR_FAMILY] == "fam" and len(study.trials) == 6  # 2 x (1 tune + 2 seeds)
        assert re.search(rf"^{re.escape(name)}: 1 of 1 scientific parameters decided", out, re.M)
        assert (tmp_path / "reports" / name / "index.html").is_file()
    assert re.search(r"^fam: across 4 members: model\.num_heads (holds|moves|flips|inconclusive)", out, re.M)
    page = (tmp_path / "reports" / "fam" / "index.html").read_text()
    side = read_table(page, "side-by-side-table")
    assert list(side.columns) == ["factor", "value", "w16.steps", "w16.flops", "w32.steps", "w32.flops",
                                  "across members"]  # fmt: skip
    assert len(side) == 1 and side["value"][0] == "model.num_heads=4"
    assert len(read_table(page, "members-table")) == 4
    assert read_table(page, "lr-width-table").columns[1:3].tolist() == ["lr @ 16", "lr @ 32"]
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
