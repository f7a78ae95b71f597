"""The re-tuning check: which arms it re-runs, and how it judges a verdict again on fresh seeds."""

from __future__ import annotations

import yaml
from support.runs import TINY_STUDY

from ablate import retune
from ablate.design import plan
from ablate.design.families import load_spec


def _spec(tmp_path):
    data = {**TINY_STUDY, "scientific": {"model.num_heads": [2, 4, 1]}, "points": 3, "tune_seeds": 2,
            "seeds": 3, "margin": 0.05, "nuisance": {"train.lr": {"low": 1e-4, "high": 1e-1, "log": True}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(data))
    return load_spec(tmp_path / "t.yaml", preflight=False)


def _results(spec, variant, offset, seeds):
    out = []
    for cell, lr in enumerate((3.16e-4, 3.16e-3, 3.16e-2)):
        for r in range(2):
            loss = 2.0 + offset + (0.0 if cell == 1 else 0.2) + 0.01 * r
            out.append(plan.Result("tune", variant, cell * 2 + r, "COMPLETE", "completed", {"train.lr": lr}, loss))
    out += [plan.Result("seed", variant, s, "COMPLETE", "completed", {"train.lr": 3.16e-3}, v, v)
            for s, v in seeds.items()]
    return out


def test_decided_arms_and_the_base_are_re_run_at_their_choice_and_its_neighbours(tmp_path):
    spec = _spec(tmp_path)
    results = (_results(spec, "base", 0.0, {1: 2.00, 2: 2.01, 3: 1.99})
               + _results(spec, "model.num_heads=4", 0.5, {1: 2.50, 2: 2.52, 3: 2.49})  # far worse: decided
               + _results(spec, "model.num_heads=1", 0.0, {1: 2.10, 2: 1.90, 3: 2.05}))  # noisy: undecided
    decided, rates = retune.arms_to_check(spec, results)
    assert decided == {"model.num_heads=4": "worse"}
    assert set(rates) == {"base", "model.num_heads=4"}
    low, chosen, high = rates["base"]  # the best point is the middle one: its neighbours are the other two
    assert low < 1e-3 < chosen < 1e-2 < high


def test_a_verdict_is_contradicted_questioned_or_held_by_the_re_tuned_runs(tmp_path):
    spec = _spec(tmp_path)
    decided = {"model.num_heads=4": "worse", "model.num_heads=1": "equivalent"}
    noise = dict(zip(retune.FRESH, (0.001, -0.002, 0.0015, -0.001), strict=True))
    losses = {}
    for lr, extra in ((1e-3, 0.1), (3e-3, 0.0)):  # each arm is best at 3e-3, which the re-tune must find
        for s, e in noise.items():
            losses["base", lr, s] = 2.0 + extra + e
            losses["model.num_heads=4", lr, s] = 1.9 + extra - e  # re-tuned, it is better: the verdict flips
            losses["model.num_heads=1", lr, s] = 2.0 + extra + 0.5 * e  # the same: still equivalent
    rows = {r["variant"]: r for r in retune.judge_again(spec, decided, losses)}
    assert rows["model.num_heads=4"]["re-tuned"] == "better" and rows["model.num_heads=4"]["outcome"] == "contradicted"
    assert rows["model.num_heads=1"]["outcome"] == "holds"
