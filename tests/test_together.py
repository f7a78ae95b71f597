"""Trials trained together (``training.together``) give each member the numbers of its single run (float64, CPU)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from support.runs import Recorder, tiny

from ablate.core import names
from ablate.core.config import POSITIONS, SCALINGS, RunConfig
from ablate.training.together import train_together
from ablate.training.train import RunResult, train

LISTOPS = {"task.name": "listops", "task.seq_len": 32, "task.max_depth": 2, "task.max_args": 3}
MEMBERS = ((3e-3, 0), (1e-2, 1), (1e-3, 2))  # (train.lr, train.seed) of each member
REL = 1e-9  # float64 runs differ only by the order of sums in batched matmuls (measured: below 5e-16)


@pytest.fixture
def float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def configs(members=MEMBERS, **values: object) -> list[RunConfig]:
    base = {"model.num_layers": 2, **values}
    return [tiny(**{**base, "train.lr": lr, "train.seed": seed}) for lr, seed in members]


def alone(cfgs: list[RunConfig]) -> list[tuple[Recorder, RunResult]]:
    out = []
    for cfg in cfgs:
        rec = Recorder()
        out.append((rec, train(cfg, [rec])))
    return out


def together(cfgs: list[RunConfig], recs: list[Recorder] | None = None) -> list[tuple[Recorder, RunResult]]:
    recs = recs or [Recorder() for _ in cfgs]
    return list(zip(recs, train_together(cfgs, [(r,) for r in recs]), strict=True))


def assert_same_run(single: tuple[Recorder, RunResult], member: tuple[Recorder, RunResult]) -> None:
    """Every number a callback or the result carries, to ``REL``; the same keys, steps and status."""
    (rec, want), (got_rec, got) = single, member
    assert (got.status, got.reason, got.steps) == (want.status, want.reason, want.steps)
    assert [s for s, _ in got_rec.steps] == [s for s, _ in rec.steps]
    for (_, a), (_, b) in zip(rec.steps, got_rec.steps, strict=True):
        assert set(a) == set(b)
        for key in (names.TRAIN_LOSS, names.TRAIN_LR, names.TRAIN_GRAD_NORM):
            assert b[key] == pytest.approx(a[key], rel=REL), key
    assert [s for s, _ in got_rec.evals] == [s for s, _ in rec.evals]
    for a, b in zip(want.history, got.history, strict=True):
        assert b == pytest.approx(a, rel=REL)  # val/loss, val/acc, every head's entropy, every layer's max logit
    timing = (names.TOKENS_PER_S, names.TRAIN_S, names.WALL_S, names.PEAK_MEM_MB)
    assert set(got.metrics) == set(want.metrics)
    assert {k: v for k, v in got.metrics.items() if k not in timing} == pytest.approx(
        {k: v for k, v in want.metrics.items() if k not in timing}, rel=REL)  # fmt: skip
    assert got_rec.ends == [got] and got.uniform_loss == want.uniform_loss and got.config_yaml == want.config_yaml


@pytest.mark.parametrize("values", [
    {"model.scaling": "sqrt", "model.position": "rope"},
    {"model.scaling": "qknorm", "model.position": "rope", "train.checkpoint": True},
    {"model.scaling": "learned", "model.position": "learned"},
    {"model.scaling": "logn", "model.position": "rope", **LISTOPS},  # a classifier, padded: masks fold too
    {"model.mlp_ratio": 0, "model.tie_head": False, "model.init": "torch"},  # the MQAR claim's attention-only model
], ids=["sqrt-rope", "qknorm-rope", "learned", "logn-listops", "attention-only-untied"])  # fmt: skip
def test_each_member_trains_exactly_as_its_single_run(float64, values) -> None:
    cfgs = configs(**values)
    singles, members = alone(cfgs), together(cfgs)
    for single, member in zip(singles, members, strict=True):
        assert member[1].status == "completed"
        assert_same_run(single, member)
        assert member[0].derived["together"] == 3 and "together" not in single[0].derived
    if cfgs[0].train.checkpoint:  # a member's own weights, not a view that would save the whole stack
        for (_, want), (_, got) in zip(singles, members, strict=True):
            for key, tensor in got.checkpoint.items():
                assert torch.allclose(tensor, want.checkpoint[key], rtol=REL, atol=0), key
                assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size(), key


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("scaling", SCALINGS)
def test_the_stacked_forward_matches_the_model_for_every_scaling_position_and_bias(float64, scaling, position, bias):
    """The stacked forward is a second Transformer forward: at every scaling, position and bias it must give each
    member its single run's numbers (a short run: the forward and its gradients are what differ, not the steps)."""
    cfgs = configs(MEMBERS[:2], **{"model.scaling": scaling, "model.position": position, "model.bias": bias,
                                   "train.steps": 4, "train.eval_every": 2, "train.log_every": 1})  # fmt: skip
    for single, member in zip(alone(cfgs), together(cfgs), strict=True):
        assert member[1].status == "completed"
        assert_same_run(single, member)


def test_a_diverging_member_ends_alone_and_the_others_train_on_unchanged(float64) -> None:
    cfgs = configs(((3e-3, 0), (1e4, 1), (1e-3, 2)), **{"train.warmup_steps": 0, "train.grad_clip": 0.0})
    singles, members = alone(cfgs), together(cfgs)
    assert [r.status for _, r in members] == ["completed", "diverged", "completed"]
    for k in (0, 2):
        assert_same_run(singles[k], members[k])
    # at lr 1e4 rounding is amplified to any size: the diverged loss differs, when and why it ended does not
    (rec, diverged), (_, want) = members[1], singles[1]
    assert (diverged.steps, diverged.reason.split(" at ")[1]) == (want.steps, want.reason.split(" at ")[1])
    assert diverged.steps == 5 and rec.steps == [] and rec.evals == [] and rec.ends == [diverged]
    assert names.VAL_LOSS not in diverged.metrics and diverged.metrics[names.STEPS] == 5


def test_a_callback_that_stops_one_member_stops_only_it(float64) -> None:
    cfgs = configs()
    singles = alone(cfgs)
    singles[1] = (stopper := Recorder(stop_at=10)), train(cfgs[1], [stopper])
    members = together(cfgs, [Recorder(), Recorder(stop_at=10), Recorder()])
    assert [r.status for _, r in members] == ["completed", "stopped", "completed"]
    assert members[1][1].steps == 10 and "step 10" in members[1][1].reason
    for single, member in zip(singles, members, strict=True):
        assert_same_run(single, member)


def test_an_exception_ends_every_member_still_training_then_propagates() -> None:
    recs = [Recorder(), Recorder(raise_at=10), Recorder(stop_at=5)]
    with pytest.raises(RuntimeError, match="boom"):
        train_together(configs(), [(r,) for r in recs])
    assert [[e.status for e in r.ends] for r in recs] == [["failed"], ["failed"], ["stopped"]]
    assert recs[0].ends[0].steps == 10 and "boom" in recs[0].ends[0].reason


@pytest.mark.parametrize("values,key", [
    ({"model.num_heads": 4}, "model.num_heads"),
    ({"train.batch_size": 4}, "train.batch_size"),
    ({"model.scaling": "qknorm"}, "model.scaling"),
])  # fmt: skip
def test_configs_that_differ_in_more_than_lr_and_seed_are_refused_with_the_field(values, key) -> None:
    cfgs = configs()
    cfgs[2] = tiny(**{"model.num_layers": 2, **values})
    with pytest.raises(ValueError, match=f"^configs trained together differ in {key} .*config 2") as err:
        train_together(cfgs, [(), (), ()])
    assert "\n" not in str(err.value)


def test_a_token_budget_sets_every_members_steps_and_a_wall_budget_is_refused() -> None:
    from ablate.core.sizes import ComputeBudget

    cfgs = configs(MEMBERS[:2])
    results = train_together(cfgs, [(), ()], ComputeBudget("tokens", cfgs[0], value=3000.0))
    assert [(r.status, r.steps) for r in results] == [("completed", 24)] * 2  # ceil(3000 / (8 x 16))
    with pytest.raises(ValueError, match="^a wall budget's seconds would be shared"):
        train_together(cfgs, [(), ()], ComputeBudget("wall", cfgs[0], value=1.0))


def test_only_a_transformer_trains_together_and_every_config_needs_its_callbacks() -> None:
    with pytest.raises(ValueError, match="^model.kind 'lstm': only a transformer"):
        train_together([tiny(**{"model.kind": "lstm"})], [()])
    with pytest.raises(ValueError, match="2 configs but 1 callback"):
        train_together(configs(MEMBERS[:2]), [()])
