"""One training run of one configuration. Knows nothing of MLflow or Optuna: it reports to callbacks.

The step is kept lean: the only host-device sync is every ``log_every`` steps (the loss, for logging and the
divergence check), so a 5 ms GPU step is not slowed by Python bookkeeping.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ablate.core import names
from ablate.core.config import RunConfig, to_yaml
from ablate.core.sizes import ComputeBudget
from ablate.tasks.checks import TRAITS
from ablate.training.schedule import Schedule, make_optimizer


@dataclass
class RunStart:
    """What callbacks learn before the first step."""

    config: RunConfig
    task: Any  # ablate.tasks.Task: its .data (datasets.DatasetDict) is logged as the run's input
    derived: dict[str, Any]  # head_dim, params, flops_per_token, uniform_loss, device, backend, precision, versions;
    # an lstm or gru also rnn_hidden (its hidden size);
    # under a compute budget also budget_match, budget_value, budget_unit (``ComputeBudget.derived``)


@dataclass
class RunResult:
    status: str  # one of names.STATUSES
    reason: str = ""  # why a run diverged, stopped or failed
    steps: int = 0  # optimizer steps done
    metrics: dict[str, float] = field(default_factory=dict)
    """Final summaries, MLflow names: val/loss, val/bpc or val/acc (full validation split), test/loss, test/bpc or
    test/acc (full test split; these two groups for completed runs only), with ``task.eval_lengths`` k and positions
    that run longer input also test/loss_kx and test/bpc_kx or test/acc_kx (``names.at_length``) and for recall
    test/solved_x (``solved_multiple``); best/val/loss, cost/params,
    cost/flops_per_token, cost/flops_total, cost/tokens, cost/steps, perf/tokens_per_s, perf/train_s (training
    steps only), perf/wall_s (the whole run), perf/peak_mem_mb."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One dict per evaluation: {"step": s, "val/loss": ..., "val/bpc" or "val/acc": ..., attention stats}."""
    attention_maps: Any = None  # numpy (num_layers, num_heads, T, T) of one validation sample, final model; None
    # for an lstm or gru, whose evaluations log no attention statistics either
    config_yaml: str = ""
    checkpoint: Any = None  # the final model's state_dict (CPU tensors), only when train.checkpoint
    uniform_loss: float = math.nan
    """Cross-entropy of a uniform guess, ln(output classes): the score a diverged run stands for. NaN only when a
    run failed before its task was built."""
    tokens_per_byte: dict[str, float] = field(default_factory=dict)
    """The task's tokens per UTF-8 byte of each split's text (``Task.tokens_per_byte``; empty but for a bpb task): what
    turns a loss, the uniform guess's too, into bits per byte (``names.in_outcome_units``)."""


class Callback(Protocol):
    """Each hook may return True to ask the trainer to stop (status ``stopped``)."""

    def on_start(self, start: RunStart) -> bool | None: ...

    def on_step(self, step: int, metrics: dict[str, float]) -> bool | None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool | None: ...

    def on_end(self, result: RunResult) -> None: ...


DATA_SEED = 0  # every trial of a study sees the same data; train.seed drives initialisation and batch order


def train(config: RunConfig, callbacks: tuple[Callback, ...] | list[Callback] = (),
          budget: ComputeBudget | None = None) -> RunResult:  # fmt: skip
    """Train ``config`` and return how it went; diverged and stopped runs return, exceptions re-raise.

    With a ``budget`` (``ablate.core.sizes``), the run trains until it has used it: its own ``train.steps`` (warmup and
    evaluations stretched), set once the task's vocabulary is known and passed to callbacks as the run's config;
    under a wall budget, for the budget's seconds of training. Every callback's ``on_end`` is called exactly once,
    also when an exception (KeyboardInterrupt included) ends the run, so a tracker can close its run as failed
    instead of leaving it running.
    """
    callbacks = tuple(callbacks)
    trainer = Trainer(config, callbacks, budget)
    try:
        result = trainer.run()
    except BaseException as err:
        notify_end(callbacks, trainer.failed(err), quiet=True)
        raise
    notify_end(callbacks, result, quiet=False)
    return result


def notify_end(callbacks: tuple[Callback, ...], result: RunResult, quiet: bool) -> None:
    """Every callback hears the end even if an earlier one raises; the first error is raised unless ``quiet``."""
    first: BaseException | None = None
    for cb in callbacks:
        try:
            cb.on_end(result)
        except Exception as err:  # each callback must still be told
            print(f"ablate: {type(cb).__name__}.on_end failed: {err}", file=sys.stderr)
            first = first or err
    if first is not None and not quiet:
        raise first


def solved_multiple(accuracy: dict[int, float], threshold: float = names.SOLVED_ACC) -> int:
    """The largest multiple of the training length up to which every scored multiple has accuracy >= ``threshold``
    (``{1: 0.99, 2: 0.95, 4: 0.3}`` -> 2): where a configuration stops solving the task; 0 if not even at 1x."""
    solved = 0
    for times in sorted(accuracy):
        if not accuracy[times] >= threshold:  # NaN fails too
            break
        solved = times
    return solved


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch in this run. Elsewhere: the process's peak RSS (since the process started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # Unix only: imported here so that the trainer still imports elsewhere

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def token_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # at least float32 (bf16 logits are promoted), float64 kept: the float64 tests compare runs to 1e-9
    logits = logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=-100, reduction=reduction)


class Trainer:
    """The state of one run; ``step`` is readable after a crash to report how far it got."""

    def __init__(self, config: RunConfig, callbacks: tuple[Callback, ...], budget: ComputeBudget | None) -> None:
        self.config, self.callbacks, self.budget, self.step = config, callbacks, budget, 0
        self.history: list[dict[str, float]] = []
        self.maps: Any = None
        self.train_s = 0.0  # time in training steps, evaluations excluded
        self.tokens = 0
        self.initial = math.nan  # the first step's loss: the reference for divergence
        self.uniform_loss = math.nan
        self.tokens_per_byte: dict[str, float] = {}
        self.test: dict[str, float] = {}  # test/loss and test/<metric>, once a completed run is scored

    # -- setup ----------------------------------------------------------------------------------------------------
    def setup(self, task: Any = None) -> None:
        """Builds task, model, optimizer and schedule; ``task``: one already built from this config's task."""
        from ablate.core.sizes import flops_per_sequence
        from ablate.model.transformer import build_model, count_params, pick_device
        from ablate.tasks import build_task

        cfg = self.config
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = pick_device(cfg.train.device)
        self.task = task if task is not None else build_task(cfg.task, seed=DATA_SEED)
        self.uniform_loss = math.log(self.task.num_classes or self.task.vocab_size)  # the output layer's classes
        self.tokens_per_byte = dict(self.task.tokens_per_byte)
        torch.manual_seed(cfg.train.seed)
        self.model = build_model(cfg.model, self.task.vocab_size, self.task.seq_len, self.task.num_classes)
        self.model.to(self.device)
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.optimizer = make_optimizer(self.model, cfg.train, self.device)
        use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.device.type == "cuda")
        self.precision = "bf16" if use_bf16 else "fp32"
        self.num_params = count_params(self.model)
        self.flops_per_sequence = flops_per_sequence(cfg.model, self.task.vocab_size, self.task.seq_len,
                                                     self.task.num_classes)  # fmt: skip
        self.flops_per_token = self.flops_per_sequence / self.task.seq_len
        seconds = None
        if self.budget is not None:  # the arm's own steps, counted as the trainer counts
            vocab, classes = self.task.vocab_size, self.task.num_classes
            self.config = self.budget.resolve(cfg, vocab, classes)
            seconds = float(self.budget.total(vocab, classes)) if self.budget.match == "wall" else None
        self.schedule = Schedule(self.config.train, seconds)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def derived(self) -> dict[str, Any]:
        dev = self.device
        budget = {} if self.budget is None else self.budget.derived(self.task.vocab_size, self.task.num_classes)
        recurrent = {} if self.config.model.kind == "transformer" else {"rnn_hidden": self.model.hidden_size}
        return {
            "head_dim": self.config.model.resolved_head_dim,
            "params": self.num_params,
            "flops_per_token": self.flops_per_token,
            "uniform_loss": self.uniform_loss,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type,
            "backend": self.config.model.backend,
            "precision": self.precision,
            "compile": self.config.train.compile,
            "torch": torch.__version__,
            "cuda": torch.version.cuda or "none",
            **recurrent,
            **budget,
        }

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        start = time.perf_counter()
        self.setup()
        if self.start():
            return self.result("stopped", "stopped by a callback before the first step", start)
        return self.finish(*self.loop(), start)

    def start(self, **derived: Any) -> bool:
        """Tells callbacks the run starts (``derived``: facts beside ``self.derived()``); True if one asks to stop."""
        return self._ask("on_start", RunStart(self.config, self.task, {**self.derived(), **derived}))

    def finish(self, status: str, reason: str, start: float) -> RunResult:
        if status == "completed":
            self.evaluate(final=True)  # the full validation split, reported at the last step
            self.test = self.evaluate_test()
        return self.result(status, reason, start)

    def loop(self) -> tuple[str, str]:
        cfg, schedule = self.config.train, self.schedule
        self.model.train()
        batches = self.task.batches("train", cfg.batch_size, seed=cfg.seed, device=self.device)
        loss_sum = torch.zeros((), device=self.device)  # summed on device: no sync until a log step
        window_start, window_tokens = time.perf_counter(), 0
        step, last, step_s = 0, False, 0.0
        while not last:
            step += 1
            trained = self.train_s + time.perf_counter() - window_start  # seconds of training before this step
            loss, grad_norm, lr, tokens = self.train_step(next(batches), schedule.lr(step, trained))
            self.step, window_tokens = step, window_tokens + tokens
            loss_sum += loss.detach()
            if step == 1:
                self.initial = loss.item()  # the one extra sync of the run: the reference for divergence
            if schedule.timed:
                self.sync()  # a wall budget counts finished work: one sync per step
                step_s = self.train_s + time.perf_counter() - window_start - trained
            last = schedule.last(step, trained + step_s)
            if step % cfg.log_every == 0 or last:
                mean = loss_sum.item() / (cfg.log_every if step % cfg.log_every == 0 else step % cfg.log_every)
                elapsed = time.perf_counter() - window_start  # after the sync above: GPU work included
                ended = self.log(step, mean, lr, grad_norm, window_tokens, elapsed)
                if ended:
                    return ended
                loss_sum.zero_()
                window_start, window_tokens = time.perf_counter(), 0
            if not last and schedule.evaluate(step, trained + step_s):
                self.sync()  # queued training work belongs to the window, not to the evaluation
                paused = time.perf_counter()
                ended = self.check(step)
                window_start += time.perf_counter() - paused  # evaluations don't count as training time
                if ended:
                    return ended
        return "completed", ""

    def log(self, step: int, mean: float, lr: float, grad_norm: torch.Tensor, tokens: int,
            elapsed: float) -> tuple[str, str] | None:  # fmt: skip
        """A log step: counts the window's ``tokens`` and ``elapsed`` seconds, reports ``mean`` (the window's
        train/loss) to ``on_step``; the (status, reason) that ends the run, or None to go on."""
        self.train_s, self.tokens = self.train_s + elapsed, self.tokens + tokens
        metrics = {
            names.TRAIN_LOSS: mean,
            names.TRAIN_LR: lr,
            names.TRAIN_GRAD_NORM: float(grad_norm),
            names.TOKENS_PER_S: tokens / max(elapsed, 1e-9),
        }
        if not math.isfinite(mean) or mean > self.config.train.diverge_factor * self.initial:
            return "diverged", f"train/loss {mean:.4g} at step {step} (initial {self.initial:.4g})"
        if self._ask("on_step", step, metrics):
            return "stopped", f"stopped by a callback at step {step}"
        return None

    def check(self, step: int) -> tuple[str, str] | None:
        """An intermediate evaluation reported to ``on_eval``; the (status, reason) that ends the run, or None."""
        if not math.isfinite(self.evaluate(final=False)):
            return "diverged", f"val/loss not finite at step {step}"
        if self._ask("on_eval", step, self.history[-1]):
            return "stopped", f"stopped by a callback at step {step}"
        return None

    def train_step(self, batch: Any, lr: float) -> tuple[torch.Tensor, torch.Tensor, float, int]:
        with self.autocast():
            logits = self.forward(batch.inputs, batch.pad_mask)
        loss = token_loss(logits, batch.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss, self.update(lr), lr, batch.inputs.numel()

    def update(self, lr: float) -> torch.Tensor:
        """The optimizer step at ``lr`` on the gradients in place, clipped; returns their norm before clipping."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # clipping with an infinite bound still returns the norm (logged), at the cost of one fused reduction
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.grad_clip or math.inf)
        self.optimizer.step()
        return grad_norm

    # -- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, split: str, limit: int | None, times: int = 1) -> tuple[float, float, Any]:
        """Mean loss and the task's metric (bpc or accuracy) over ``split`` in eval mode, at most ``limit`` batches,
        and the first batch (None for an empty split). ``times`` k > 1: the test split at k x seq_len, in batches
        k x smaller (as many tokens per batch as training: the memory of a training-length batch, T x T scores
        aside, which grow k-fold)."""
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        first = None
        batch_size = max(1, self.config.train.batch_size // times)
        for batch in self.task.eval_batches(split, batch_size, device=self.device, limit=limit, times=times):
            if first is None:
                first = batch
            with self.autocast():
                logits = self.model(batch.inputs, batch.pad_mask)
            scored = batch.targets != -100
            loss_sum += token_loss(logits, batch.targets, reduction="sum")
            correct += ((logits.argmax(-1) == batch.targets) & scored).sum()
            count += scored.sum()
        loss = (loss_sum / count.clamp(min=1)).item()
        if self.task.metric == "bpb":  # bits per token, per byte of the split's text
            metric = names.in_outcome_units(loss, "bpb", self.task.tokens_per_byte[split])
        else:
            metric = loss / math.log(2) if self.task.metric == "bpc" else (correct / count.clamp(min=1)).item()
        return loss, metric, first

    @torch.no_grad()
    def evaluate(self, final: bool) -> float:
        """Loss and task metric on the fixed validation sample (or the full split), plus attention statistics."""
        from ablate.model.transformer import attention_stats

        loss, metric, first = self.score("validation", None if final else self.config.train.eval_batches)
        metrics = {"step": self.step, names.VAL_LOSS: loss, names.val_metric(self.task.metric): metric}
        if first is not None and self.config.model.kind == "transformer":  # an RNN has no attention to measure
            with self.autocast():
                stats, maps = attention_stats(self.model, first.inputs, first.pad_mask)
            metrics.update(stats)
            self.maps = maps.float().cpu().numpy()
        self.history.append(metrics)
        self.model.train()
        if final:
            self._ask("on_eval", self.step, metrics)  # the run is done: a stop request changes nothing
        return loss

    def evaluate_test(self) -> dict[str, float]:
        """The full test split, scored once after the final validation; callbacks' hooks never see it, so nothing
        that prunes or selects during a run can look at the held-out numbers. Then the longer test sets
        (``task.eval_lengths``), when the model runs longer input (an lstm or gru, positions rope or none; not
        learned ones: nothing logged)."""
        loss, metric, _ = self.score("test", None)
        task_metric = names.test_metric(self.task.metric)
        test = {names.TEST_LOSS: loss, task_metric: metric}
        lengths = self.config.task.eval_lengths if self.model.extrapolates and self.task.longer else ()
        for times in lengths:
            loss, metric, _ = self.score("test", None, times)
            test.update({names.at_length(names.TEST_LOSS, times): loss, names.at_length(task_metric, times): metric})
        if lengths and TRAITS[self.task.name].solves:
            accuracy = {1: test[task_metric], **{k: test[names.at_length(task_metric, k)] for k in lengths}}
            test[names.SOLVED_X] = float(solved_multiple(accuracy))
        return test

    # -- the end --------------------------------------------------------------------------------------------------
    def _ask(self, hook: str, *args: Any) -> bool:
        """Call ``hook`` on every callback (none is skipped); True if any asks to stop."""
        answers = [getattr(cb, hook)(*args) for cb in self.callbacks]
        return any(bool(a) for a in answers)

    def failed(self, err: BaseException) -> RunResult:
        """The result of a run that ``err`` ended: failed, or interrupted by a KeyboardInterrupt."""
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        return RunResult(status, reason, self.step, config_yaml=to_yaml(self.config), uniform_loss=self.uniform_loss,
                         tokens_per_byte=self.tokens_per_byte)

    def result(self, status: str, reason: str, start: float) -> RunResult:
        metrics: dict[str, float] = {
            names.PARAMS: float(self.num_params),
            names.FLOPS_PER_TOKEN: self.flops_per_token,
            names.FLOPS_TOTAL: float(self.flops_per_sequence * (self.tokens // self.config.task.seq_len)),
            names.TOKENS: float(self.tokens),
            names.STEPS: float(self.step),
            names.TOKENS_PER_S: self.tokens / self.train_s if self.train_s else 0.0,
            names.TRAIN_S: self.train_s,
            names.WALL_S: time.perf_counter() - start,
            names.PEAK_MEM_MB: peak_memory_mb(self.device),
        }
        val_losses = [h[names.VAL_LOSS] for h in self.history if math.isfinite(h[names.VAL_LOSS])]
        if val_losses:
            metrics[names.BEST_VAL_LOSS] = min(val_losses)
        if status == "completed":
            metrics.update({k: v for k, v in self.history[-1].items() if k.startswith("val/")})
            metrics.update(self.test)
        checkpoint = None
        if self.config.train.checkpoint:
            checkpoint = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return RunResult(
            status, reason, self.step, metrics, self.history, self.maps, to_yaml(self.config), checkpoint,
            uniform_loss=self.uniform_loss, tokens_per_byte=self.tokens_per_byte,
        )  # fmt: skip
