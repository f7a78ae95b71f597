"""The trainer on tiny generated tasks (CPU, one thread): reproducible, stops, diverges and fails as promised."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, tiny

from ablate import names
from ablate.train import DATA_SEED, lr_at, make_optimizer, train

RECALL_UNIFORM_LOSS = math.log(9)  # TINY's recall: 8 key/value tokens and the filler


def test_a_completed_run_reports_steps_evaluations_and_summaries() -> None:
    rec = Recorder()
    result = train(tiny(), [rec])
    assert result.status == "completed" and result.steps == 20 and rec.ends == [result]
    assert [s for s, _ in rec.steps] == [5, 10, 15, 20]
    assert set(rec.steps[0][1]) == {names.TRAIN_LOSS, names.TRAIN_LR, names.TRAIN_GRAD_NORM, names.TOKENS_PER_S}
    # intermediate evaluation at 10, the final one (full split) at the last step
    assert [s for s, _ in rec.evals] == [10, 20] and [h["step"] for h in result.history] == [10, 20]
    final = rec.evals[-1][1]
    assert {names.VAL_LOSS, "val/acc", names.entropy_metric(0, 1), names.max_logit_metric(0)} <= set(final)
    assert result.metrics[names.VAL_LOSS] == final[names.VAL_LOSS]
    assert result.metrics[names.BEST_VAL_LOSS] == min(h[names.VAL_LOSS] for h in result.history)
    assert result.metrics[names.PARAMS] == rec.derived["params"] > 0
    assert result.metrics[names.FLOPS_TOTAL] == pytest.approx(rec.derived["flops_per_token"] * 20 * 8 * 16)
    assert result.metrics[names.TOKENS_PER_S] > 0 and result.metrics[names.PEAK_MEM_MB] > 0
    assert result.attention_maps.shape == (1, 2, 16, 16)
    assert result.attention_maps.sum(-1) == pytest.approx(1.0, abs=1e-4)  # rows of attention weights
    assert "num_heads: 2" in result.config_yaml and result.checkpoint is None
    assert result.uniform_loss == pytest.approx(RECALL_UNIFORM_LOSS) == rec.derived["uniform_loss"]


def held_out(metrics: dict) -> list[str]:
    return [k for k in metrics if k.startswith("test/")]


def test_a_completed_run_scores_the_full_test_split_with_its_final_model_unseen_by_callbacks() -> None:
    from ablate.model import Transformer
    from ablate.tasks import build_task

    cfg = tiny(**{"task.num_test": 20, "train.checkpoint": True})  # 20 rows: batches of 8, 8 and 4
    rec = Recorder()
    result = train(cfg, [rec])
    task = build_task(cfg.task, seed=DATA_SEED)
    model = Transformer(cfg.model, task.vocab_size, task.seq_len, task.num_classes)
    model.load_state_dict(result.checkpoint)
    (batch,) = task.eval_batches("test", 20)
    with torch.no_grad():
        logits = model.eval()(batch.inputs)
    scored = batch.targets != -100
    want_loss = F.cross_entropy(logits[scored], batch.targets[scored]).item()  # a mean over every scored token
    want_acc = (logits.argmax(-1) == batch.targets)[scored].float().mean().item()
    assert result.metrics[names.TEST_LOSS] == pytest.approx(want_loss, rel=1e-5)
    assert result.metrics[names.test_metric("acc")] == pytest.approx(want_acc)
    assert held_out(result.metrics) == [names.TEST_LOSS, "test/acc"] and rec.ends[0].metrics == result.metrics
    # held out: no hook during the run (pruning, selection) and no history entry ever carries a test number
    assert not [k for _, m in rec.steps + rec.evals for k in held_out(m)]
    assert not [k for h in result.history for k in held_out(h)]


def test_same_seed_same_curve_and_another_seed_another() -> None:
    curves = []
    for seed in (0, 0, 1):
        rec = Recorder()
        train(tiny(**{"train.seed": seed, "model.attn_dropout": 0.1}), [rec])
        curves.append([m[names.TRAIN_LOSS] for _, m in rec.steps] + [m[names.VAL_LOSS] for _, m in rec.evals])
    assert curves[0] == curves[1]  # exactly, dropout included
    assert curves[0] != curves[2]


def test_a_huge_learning_rate_diverges_without_raising() -> None:
    rec = Recorder()
    result = train(tiny(**{"train.lr": 1e4, "train.warmup_steps": 0, "train.grad_clip": 0.0}), [rec])
    assert result.status == "diverged" and "train/loss" in result.reason
    assert result.steps < 20 and rec.ends == [result]
    assert names.VAL_LOSS not in result.metrics and not held_out(result.metrics)  # no evaluation of a broken model
    assert result.uniform_loss == pytest.approx(RECALL_UNIFORM_LOSS)  # what the study scores it at


def test_a_callback_returning_true_stops_the_run() -> None:
    rec = Recorder(stop_at=10)
    result = train(tiny(), [rec, Recorder()])
    assert result.status == "stopped" and result.steps == 10 and "step 10" in result.reason
    assert [s for s, _ in rec.steps] == [5, 10] and rec.evals == []  # stopped before the evaluation at 10


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "failed"), (KeyboardInterrupt(), "interrupted")])
def test_an_exception_ends_the_run_then_propagates(error: BaseException, status: str) -> None:
    rec, other = Recorder(raise_at=10, error=error), Recorder()
    with pytest.raises(type(error)):
        train(tiny(), [rec, other])
    for r in (rec, other):  # every callback hears the end exactly once
        assert [e.status for e in r.ends] == [status] and r.ends[0].steps == 10
        assert r.ends[0].uniform_loss == pytest.approx(RECALL_UNIFORM_LOSS) and not held_out(r.ends[0].metrics)
    assert type(error).__name__ in rec.ends[0].reason


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor() -> None:
    cfg = tiny(**{"train.steps": 110, "train.warmup_steps": 10, "train.lr": 1.0, "train.min_lr_ratio": 0.1}).train
    assert lr_at(1, cfg) == pytest.approx(0.1) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half-way through the decay
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_weight_decay_applies_to_linear_matrices_only() -> None:
    from ablate.model import Transformer

    cfg = tiny(**{"model.scaling": "learned"})
    model = Transformer(cfg.model, vocab_size=8, max_len=16, num_classes=3)
    decayed, plain = make_optimizer(model, cfg.train, torch.device("cpu")).param_groups
    decayed_ids = {id(p) for p in decayed["params"]}
    for name, p in model.named_parameters():
        is_linear_weight = name.endswith(
            ("qkv.weight", "attn_out.weight", "mlp.0.weight", "mlp.2.weight", "head.weight")
        )
        assert (id(p) in decayed_ids) == is_linear_weight, name
    assert decayed["weight_decay"] == cfg.train.weight_decay and plain["weight_decay"] == 0.0


def test_classification_task_reports_accuracy_on_validation_and_test() -> None:
    cfg = tiny(**{"task.name": "listops", "task.seq_len": 32, "task.max_depth": 2, "task.max_args": 3})
    result = train(cfg)
    assert result.status == "completed"
    assert 0.0 <= result.metrics["val/acc"] <= 1.0 and math.isfinite(result.metrics[names.VAL_LOSS])
    assert 0.0 <= result.metrics["test/acc"] <= 1.0 and math.isfinite(result.metrics[names.TEST_LOSS])
    assert result.uniform_loss == pytest.approx(math.log(10))  # ten classes (the values 0-9), not the vocabulary
