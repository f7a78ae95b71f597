"""The trainer on tiny generated tasks (CPU, one thread): reproducible, stops, diverges and fails as promised."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from support.runs import Recorder, tiny

from ablate.core import names
from ablate.training.schedule import lr_at, make_optimizer
from ablate.training.train import DATA_SEED, solved_multiple, train

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
    from ablate.model.transformer import Transformer
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
    from ablate.model.transformer import Transformer

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


def test_a_run_with_eval_lengths_scores_the_test_split_again_at_each_longer_length() -> None:
    rec = Recorder()
    cfg = tiny(**{"model.position": "rope", "task.eval_lengths": [2, 4], "task.vocab_size": 16})
    result = train(cfg, [rec])
    longer = [names.at_length(m, k) for k in (2, 4) for m in (names.TEST_LOSS, names.test_metric("acc"))]
    assert held_out(result.metrics) == [names.TEST_LOSS, "test/acc", *longer, names.SOLVED_X]
    assert longer == ["test/loss_2x", "test/acc_2x", "test/loss_4x", "test/acc_4x"]
    assert all(math.isfinite(result.metrics[k]) for k in longer) and rec.ends[0].metrics == result.metrics
    accuracy = {1: result.metrics["test/acc"], 2: result.metrics["test/acc_2x"], 4: result.metrics["test/acc_4x"]}
    assert result.metrics[names.SOLVED_X] == solved_multiple(accuracy)
    assert not [k for _, m in rec.steps + rec.evals for k in held_out(m)]  # still held out from every hook


def test_learned_positions_skip_the_longer_lengths_and_log_nothing_for_them() -> None:
    result = train(tiny(**{"task.eval_lengths": [2, 4], "task.vocab_size": 16}))
    assert result.status == "completed" and held_out(result.metrics) == [names.TEST_LOSS, "test/acc"]


def test_solved_multiple_is_where_accuracy_first_drops_below_the_threshold() -> None:
    assert names.SOLVED_ACC == 0.9
    assert solved_multiple({1: 0.99, 2: 0.95, 4: 0.3}) == 2
    assert solved_multiple({1: 0.99, 2: 0.95, 4: 0.9}) == 4  # at the threshold counts as solved
    assert solved_multiple({1: 0.5, 2: 0.95, 4: 0.99}) == 0  # not even at 1x
    assert solved_multiple({4: 0.1, 1: 0.97, 2: 0.2}) == 1  # order of the mapping does not matter
    assert solved_multiple({1: 0.99, 2: math.nan, 4: 0.99}) == 1  # a NaN accuracy does not count as solved
    assert solved_multiple({1: 0.8, 2: 0.6}, threshold=0.5) == 2


def test_preflight_refuses_no_positions_for_a_classifier_and_counts_the_longest_eval_length() -> None:
    from ablate.core.config import ConfigError
    from ablate.design.preflight import _sizes, check_run, estimate_bytes

    with pytest.raises(ConfigError, match="^model.position: none needs a causal .*listops"):
        check_run(tiny(**{"model.position": "none", "task.name": "listops", "task.seq_len": 32}))
    check_run(tiny(**{"model.position": "none", "task.eval_lengths": [2], "task.vocab_size": 16}))
    big = {"task.seq_len": 512, "train.batch_size": 32, "model.position": "rope", "task.vocab_size": 64}
    plain = estimate_bytes(_sizes(tiny(**big)))
    longer = estimate_bytes(_sizes(tiny(**big, **{"task.eval_lengths": [2, 8]})))
    assert longer > plain and estimate_bytes(_sizes(tiny(**big, **{"task.eval_lengths": [2]}))) < longer


# --- the recurrent baseline (model.kind lstm, gru) ---------------------------------------------------------------

RNN_TASKS = {"recall": {}, "charlm": {"task.name": "charlm"},
             "listops": {"task.name": "listops", "task.seq_len": 32, "task.max_depth": 2, "task.max_args": 3}}


@pytest.mark.parametrize("task", list(RNN_TASKS))
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_an_rnn_trains_on_every_task_with_finite_losses_and_no_attention_statistics(kind, task) -> None:
    from ablate.core import sizes
    from ablate.tasks import build_task

    rec, cfg = Recorder(), tiny(**{"model.kind": kind, **RNN_TASKS[task]})
    result = train(cfg, [rec])
    assert result.status == "completed" and result.steps == 20
    losses = [m[names.TRAIN_LOSS] for _, m in rec.steps] + [result.metrics[names.VAL_LOSS],
                                                             result.metrics[names.TEST_LOSS]]  # fmt: skip
    assert all(math.isfinite(v) for v in losses)
    assert result.attention_maps is None and all(set(h) <= {"step", names.VAL_LOSS, "val/acc", "val/bpc"}
                                                 for h in result.history)  # fmt: skip
    data = build_task(cfg.task, seed=DATA_SEED)
    model, V, T, k = cfg.model, data.vocab_size, data.seq_len, data.num_classes
    assert rec.derived["rnn_hidden"] == sizes.rnn_hidden_size(model, T)
    assert result.metrics[names.PARAMS] == sizes.param_count(model, V, T, k)
    assert rec.derived["flops_per_token"] == sizes.flops_per_sequence(model, V, T, k) / T


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_an_rnn_has_no_position_limit_and_is_scored_at_the_longer_lengths(kind) -> None:
    result = train(tiny(**{"model.kind": kind, "task.eval_lengths": [2], "task.vocab_size": 16}))
    longer = ["test/loss_2x", "test/acc_2x"]
    assert held_out(result.metrics) == [names.TEST_LOSS, "test/acc", *longer, names.SOLVED_X]
    assert all(math.isfinite(result.metrics[k]) for k in longer)


def test_an_rnn_decays_its_recurrent_matrices_like_linear_weights() -> None:
    from ablate.model.transformer import build_model

    model = build_model(tiny(**{"model.kind": "lstm", "model.num_layers": 2}).model, 11, 16)
    decayed, plain = make_optimizer(model, tiny().train, torch.device("cpu")).param_groups
    names_of = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names_of[id(p)] for p in decayed["params"]) == [
        "out_proj.weight", "rnn.weight_hh_l0", "rnn.weight_hh_l1", "rnn.weight_ih_l0", "rnn.weight_ih_l1",
        "tok_emb.weight"]  # fmt: skip
    assert not [n for n in map(names_of.get, map(id, plain["params"])) if "weight_" in n]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_preflight_estimates_an_rnn_without_a_t_by_t_term(kind) -> None:
    from ablate.design.preflight import _sizes, check_run, estimate_bytes

    check_run(tiny(**{"model.kind": kind, "model.position": "none", "task.name": "listops", "task.seq_len": 32}))
    big = {"task.seq_len": 1024, "train.batch_size": 32, "task.vocab_size": 64, "model.embed_dim": 128}
    rnn = estimate_bytes(_sizes(tiny(**big, **{"model.kind": kind})))
    assert rnn < estimate_bytes(_sizes(tiny(**big)))  # no attention matrices
    wider = estimate_bytes(_sizes(tiny(**big, **{"model.kind": kind, "model.rnn_hidden": 512})))
    assert wider > rnn and estimate_bytes(_sizes(tiny(**big, **{"model.kind": kind, "task.eval_lengths": [8]}))) >= rnn
