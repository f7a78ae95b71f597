"""Compute-matched arms (``ablate.core.sizes``): the FLOP count against the model, every arm within one optimizer step
of the base's budget, schedules stretched to each arm's length, wall budgets kept by the clock, clear errors."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from support.runs import TINY_STUDY, Recorder, tiny

from ablate.core import names, sizes
from ablate.core.config import ConfigError, with_values
from ablate.core.sizes import ComputeBudget, step_cost, stretched
from ablate.design.families import load_spec
from ablate.design.spec import spec_from_mapping
from ablate.runner.study import run_study
from ablate.runner.study_setup import plan_digest
from ablate.training.schedule import Schedule, lr_at, lr_at_share
from ablate.training.train import train

DEFAULT = Path(__file__).resolve().parent.parent / "studies" / "default.yaml"


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------------------------------------------------
# Counting: the budget's count is the trainer's (and torch's: tests/test_model.py)


def test_the_trainer_reports_the_count_the_budget_uses():
    rec = Recorder()
    result = train(tiny(), [rec])
    cfg = tiny()
    per_sequence = sizes.flops_per_sequence(cfg.model, 9, 16)  # recall: 8 key/value tokens and the filler
    assert rec.derived["flops_per_token"] == per_sequence / 16 == result.metrics[names.FLOPS_PER_TOKEN]
    assert result.metrics[names.TOKENS] == 20 * 8 * 16 and result.metrics[names.STEPS] == 20
    assert result.metrics[names.FLOPS_TOTAL] == 20 * step_cost("flops", cfg, 9, None) == 20 * 8 * per_sequence
    assert 0 < result.metrics[names.TRAIN_S] < result.metrics[names.WALL_S]
    assert not [k for k in rec.derived if k.startswith("budget")]  # no budget, nothing recorded of one


# ---------------------------------------------------------------------------------------------------------------
# The equal-compute schedule


def _arms(spec):
    return [with_values(spec.base, {v.factor: v.values[v.factor]} if v.factor else {}) for v in spec.variants()]


@pytest.mark.parametrize("match", ["tokens", "flops"])
def test_every_arm_of_the_default_study_gets_the_base_budget_within_one_step(match):
    data = yaml.safe_load(DEFAULT.read_text())
    spec = spec_from_mapping({**data, "budget": {"match": match}})
    V = 104
    total = spec.compute.total(V, None)
    steps = {}
    for arm in _arms(spec):
        cost = step_cost(match, arm, V, None)
        resolved = spec.compute.resolve(arm, V, None)
        used = resolved.train.steps * cost
        assert 0 <= used - total < cost  # at least the budget, less than one optimizer step over
        ratio = Fraction(resolved.train.steps, 600)
        assert abs(resolved.train.warmup_steps - 150 * ratio) <= Fraction(1, 2)  # stretched to its own length
        assert abs(resolved.train.eval_every - 100 * ratio) <= Fraction(1, 2)
        steps[arm.model] = resolved.train.steps
    assert steps[spec.base.model] == 600 and total == 600 * step_cost(match, spec.base, V, None)
    if match == "tokens":  # no arm of the default study changes batch size or length
        assert set(steps.values()) == {600}
    else:  # the cheaper arm trains longer, the costlier shorter (728064 FLOPs per token at the base)
        assert sizes.flops_per_sequence(spec.base.model, V, 64) == 64 * 728064
        assert steps[with_values(spec.base, {"model.embed_dim": 32}).model] == 2018
        assert steps[with_values(spec.base, {"model.embed_dim": 128}).model] == 166
        assert steps[with_values(spec.base, {"model.head_dim": 8}).model] == 753


def test_an_explicit_value_is_every_arm_budget_the_base_included():
    base = tiny()
    per_step = 8 * sizes.flops_per_sequence(base.model, 9, 16)
    assert ComputeBudget("tokens", base, value=1000.0).resolve(base, 9, None).train.steps == 8  # ceil(1000 / 128)
    assert ComputeBudget("flops", base, value=1e12).steps(base, 9, None) == math.ceil(Fraction(1e12) / per_step)


def test_stretching_keeps_the_schedule_at_the_same_shares():
    base = tiny(**{"train.steps": 20, "train.warmup_steps": 2, "train.lr": 1.0, "train.min_lr_ratio": 0.1})
    arm = stretched(base, 60)
    assert (arm.train.steps, arm.train.warmup_steps, arm.train.eval_every) == (60, 6, 30)
    for step in range(1, 21):  # step s of the base and step 3s of the arm: the same learning rate
        assert lr_at(3 * step, arm.train) == pytest.approx(lr_at(step, base.train))
        assert lr_at_share(step / 20, base.train) == pytest.approx(lr_at(step, base.train))
    assert stretched(base, 5).train.warmup_steps == 1 and stretched(base, 1).train.warmup_steps == 0


class _Seen(Recorder):
    """Also keeps the config the run started with: the arm's own, resolved from its budget."""

    def on_start(self, start) -> None:
        super().on_start(start)
        self.config = start.config


def _budget_run(cfg, compute) -> tuple:
    rec = _Seen()
    return train(cfg, [rec], compute), rec, rec.config


@pytest.mark.parametrize("match,factor,value", [("flops", "model.embed_dim", 8), ("flops", "model.embed_dim", 32),
                                                 ("tokens", "train.batch_size", 3)])  # fmt: skip
def test_trained_arms_use_the_base_budget_within_one_step(match, factor, value):
    base = tiny()
    compute = ComputeBudget(match, base)
    used = sizes.USED[match]
    result, rec, config = _budget_run(base, compute)
    total = result.metrics[used]
    assert result.steps == 20 and config == base and rec.derived["budget_value"] == total
    assert rec.derived["budget_match"] == match and rec.derived["budget_unit"] == sizes.UNITS[match]
    result, rec, config = _budget_run(with_values(base, {factor: value}), compute)
    per_step = result.metrics[used] / result.steps
    assert result.status == "completed" and rec.derived["budget_value"] == total
    assert 0 <= result.metrics[used] - total < per_step  # within one optimizer step of the base's budget
    assert config.train.steps == result.steps != 20  # the resolved config is what callbacks (MLflow) see
    longer = result.steps > 20
    assert longer == (value < getattr(base.model if "model" in factor else base.train, factor.split(".")[1]))
    assert config.train.warmup_steps == round(2 * result.steps / 20)
    assert [s for s, _ in rec.evals] == [config.train.eval_every, result.steps]  # half-way and the end, stretched
    assert f"steps: {result.steps}" in result.config_yaml


def test_a_wall_budget_trains_for_its_seconds_within_one_step():
    seconds = 1.0
    cfg = tiny(**{"train.log_every": 1, "train.warmup_steps": 2, "train.lr": 1e-2, "train.min_lr_ratio": 0.1})
    result, rec, config = _budget_run(cfg, ComputeBudget("wall", cfg, value=seconds))
    tokens = cfg.train.batch_size * cfg.task.seq_len
    step_s = [tokens / m[names.TOKENS_PER_S] for _, m in rec.steps]  # log_every 1: each window is one step
    # not train.steps: the clock decides (however fast this machine is, a tiny step takes milliseconds)
    assert result.status == "completed" and result.steps == len(step_s) > cfg.train.warmup_steps + 2
    assert seconds <= result.metrics[names.TRAIN_S] <= seconds + step_s[-1] + 0.05  # the last step crosses it
    assert rec.derived["budget_value"] == seconds and config == cfg
    assert len(rec.evals) == 2  # the intermediate evaluation (at half the seconds: eval_every 10 of 20), the final
    lrs = [m[names.TRAIN_LR] for _, m in rec.steps]
    peak = lrs.index(max(lrs))
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1], strict=True))  # warmup, by the clock
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:], strict=False))  # then cosine, by the clock
    assert lrs[-1] <= 1e-3 + 0.05 * 9e-3  # near the floor (1e-3) when the seconds are used


def test_wall_schedule_evaluates_at_the_shares_of_the_step_schedule():
    schedule = Schedule(tiny(**{"train.steps": 600, "train.eval_every": 100}).train, seconds=60.0)
    due = [t for t in range(0, 61) if schedule.evaluate(1, float(t))]
    assert due == [10, 20, 30, 40, 50]
    schedule = Schedule(tiny(**{"train.steps": 600, "train.eval_every": 100}).train, seconds=60.0)
    assert schedule.evaluate(1, 35.0) and not schedule.evaluate(2, 36.0)  # shares passed in one step: one evaluation


# ---------------------------------------------------------------------------------------------------------------
# The study file


def _spec(**changes):
    return spec_from_mapping({**TINY_STUDY, **changes})


def test_without_a_budget_the_study_is_unchanged():
    plain = _spec()
    assert plain.compute is None and _spec(budget={"match": "steps"}).compute is None
    assert plan_digest(_spec(budget={"match": "steps"})) == plan_digest(plain)
    flops = _spec(budget={"match": "flops"})
    assert plan_digest(flops) != plan_digest(plain) != plan_digest(_spec(budget={"match": "tokens"}))
    assert plan_digest(dataclasses.replace(flops, compute=None)) == plan_digest(plain)  # the budget is the change
    search = {"kind": "search", "budget": {"trials": 4}}
    assert _spec(**search).pruner == "median"  # a search prunes by default, but not arms of unequal steps
    assert _spec(**{**search, "budget": {"trials": 4, "match": "flops"}}).pruner == "none"


BAD = {
    "unknown_match": ({"budget": {"match": "energy"}}, "budget.match", "unknown value 'energy'"),
    "negative_value": ({"budget": {"match": "tokens", "value": -5}}, "budget.value", "must be > 0"),
    "zero_seconds": ({"budget": {"match": "wall", "value": 0}}, "budget.value", "must be > 0"),
    "text_value": ({"budget": {"match": "flops", "value": "lots"}}, "budget.value", "must be float"),
    "infinite_value": ({"budget": {"match": "flops", "value": float("inf")}}, "budget.value", "finite"),
    "wall_without_seconds": ({"budget": {"match": "wall"}}, "budget.value", "needs its seconds"),
    "steps_with_value": ({"budget": {"match": "steps", "value": 100}}, "budget.value", "set that"),
    "huge_value": ({"budget": {"match": "tokens", "value": 1e30}}, "budget.value", "at most 1,000,000,000"),
    "steps_varied": ({"budget": {"match": "flops"}, "scientific": {"train.steps": [10, 20]}},
                     "scientific.train.steps", "cannot be varied"),
    "steps_tuned": ({"budget": {"match": "tokens"}, "nuisance": {"train.steps": {"low": 5, "high": 20}}},
                    "nuisance.train.steps", "cannot be varied"),
    "vocabulary_varied": ({"task": {"name": "recall", "seq_len": 16}, "budget": {"match": "flops"},
                           "scientific": {"task.vocab_size": [8, 16]}}, "scientific.task.vocab_size", "budget.value"),
    "search_pruner": ({"kind": "search", "pruner": "median", "budget": {"trials": 4, "match": "flops"}}, "pruner",
                      "equal steps"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_budgets_are_one_line_naming_the_file_and_key(case, tmp_path):
    changes, key, problem = BAD[case]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**TINY_STUDY, **changes}, sort_keys=False))
    with pytest.raises(ConfigError) as err:
        load_spec(path, preflight=False)
    assert err.value.key == key and problem in err.value.problem, str(err.value)
    assert str(err.value).startswith(f"{path}: {key}: ") and "\n" not in str(err.value)


def test_a_given_vocabulary_change_is_allowed_with_an_explicit_value():
    spec = _spec(task={"name": "recall", "seq_len": 16}, scientific={"task.vocab_size": [8, 16]},
                 budget={"match": "flops", "value": 1e9})  # fmt: skip
    assert spec.compute.value == 1e9


# ---------------------------------------------------------------------------------------------------------------
# A study


def test_a_flops_matched_study_records_each_arm_budget_and_use(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    data = {**TINY_STUDY, "scientific": {"model.embed_dim": [16, 8]}, "budget": {"match": "flops"}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert run_study(tmp_path / "tiny.yaml", report=False) == 0
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs' / 'optuna.db'}")
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = {t.user_attrs[names.ATTR_VARIANT]: client.get_run(t.user_attrs[names.ATTR_RUN_ID]).data
            for t in study.get_trials() if t.user_attrs[names.ATTR_PHASE] == "seed"}  # fmt: skip
    base, arm = runs["base"], runs["model.embed_dim=8"]
    total = float(base.params["derived.budget_value"])
    assert base.params["train.steps"] == "10" and int(arm.params["train.steps"]) > 10
    assert base.metrics[names.FLOPS_TOTAL] == total == float(arm.params["derived.budget_value"])
    per_step = arm.metrics[names.FLOPS_TOTAL] / arm.metrics[names.STEPS]
    assert 0 <= arm.metrics[names.FLOPS_TOTAL] - total < per_step
    assert arm.params["derived.budget_match"] == "flops" and arm.params["derived.budget_unit"] == "FLOPs"


# ---------------------------------------------------------------------------------------------------------------
# Cost against sequence length: self-attention against the recurrent baseline


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("shape", [{}, {"position": "rope"}, {"rnn_hidden": 512}, {"embed_dim": 32, "num_layers": 4},
                                   {"num_heads": 8, "head_dim": 64}])  # fmt: skip
def test_the_crossover_is_the_first_length_where_attention_costs_more_flops_per_token(kind, shape):
    from ablate.core.config import ModelConfig

    cfg = ModelConfig(kind=kind, **shape)
    transformer = dataclasses.replace(cfg, kind="transformer")
    V, built = 96, 128  # both models built at 128 tokens; counted at any length

    def per_token(c: ModelConfig, length: int) -> Fraction:
        return Fraction(sizes.flops_per_sequence(c, V, length, None, built), length)

    at = sizes.crossover_length(cfg, V, built)
    assert per_token(transformer, at) > per_token(cfg, at)
    assert at == 1 or per_token(transformer, at - 1) <= per_token(cfg, at - 1)
    assert sizes.crossover_length(cfg, V, built, 10) == at  # a classifier's head costs both kinds alike
    if cfg.rnn_hidden == 512:  # 4x the matched width: the RNN costs more until attention's T x T term catches up
        assert at > 100
    if not shape:  # learned positions: the matched RNN turns the position table (128 x C) into weights
        assert at > 1 and sizes.crossover_length(dataclasses.replace(cfg, position="rope"), V, built) < at


def test_the_crossover_is_only_for_a_recurrent_config():
    from ablate.core.config import ModelConfig

    with pytest.raises(ValueError, match="compares an lstm or gru with the Transformer, got kind 'transformer'"):
        sizes.crossover_length(ModelConfig(), 96, 128)


def test_the_kinds_bench_times_every_kind_at_equal_parameters_and_states_the_crossover(tmp_path):
    from ablate.bench import speed
    from ablate.core.config import ModelConfig

    cfg = ModelConfig(embed_dim=16, num_heads=2, num_layers=1, position="rope")
    rows = speed.kinds_rows((8, 32), 2, 1, 0, torch.device("cpu"), cfg, vocab_size=11)
    assert [(r["length"], r["kind"]) for r in rows] == [(T, k) for T in (8, 32) for k in ("transformer", "lstm", "gru")]
    params = {r["kind"]: r["params"] for r in rows}
    assert abs(params["lstm"] - params["transformer"]) / params["transformer"] < 0.05
    assert all(r["us_per_token"] > 0 and r["flops_per_token"] > 0 for r in rows)
    text = speed.kinds_markdown(rows, "# header", cfg, 11)
    assert text.count("| transformer |") == 2 and "- lstm: measured, " in text and "- gru: measured, " in text

    def timed(us: dict) -> list[dict]:
        return [{"kind": k, "length": T, "us_per_token": v} for (k, T), v in us.items()]

    us = {("transformer", 64): 1.0, ("lstm", 64): 2.0, ("transformer", 256): 3.0, ("lstm", 256): 2.0,
          ("transformer", 1024): 5.0, ("lstm", 1024): 2.0}  # fmt: skip
    assert speed.measured_crossover(timed(us), "lstm") == 256
    assert speed.measured_crossover(timed({**us, ("transformer", 1024): 1.0}), "lstm") is None  # faster at the end
    assert speed.measured_crossover(timed({**us, ("transformer", 64): 9.0}), "lstm") == 64
