"""Trials of one architecture trained together: K runs that differ only in learning rate and seed, as one stacked model.

Each member is an ordinary run (``train.Trainer``): its own model built under its own seed, its own batch stream,
optimizer, schedule, gradient clipping, divergence check, callbacks, evaluation and result. Only the training step is
shared: the members' parameters are stacked and run through one forward (``model.stacked``: matmuls batched over
the members, attention with the members folded into its batch; ``torch.func.vmap`` over sdpa has no batching rule
on the CPU: it loops). The loss is the sum of the members'
mean losses, so member k's gradient is exactly the one its single run would get.

Each member model's parameters are views into the stacked tensors (``param.data = stacked[k]``), and after the
backward pass each gets its slice of the stacked gradient, so the member's own AdamW (``schedule.make_optimizer``, its
own learning rate) and clipping update the stack in place: no copy per step, and evaluation runs the member's
ordinary model. A member that diverges or is stopped ends with that status (its callbacks hear ``on_end`` at once)
and leaves the stack: the stack shrinks to the members still training (one copy), so it costs no more compute.

On the CPU a step is compute-bound, so K members cost K single steps: it pays on a GPU only (``pays``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ablate.core.config import RunConfig, flatten, to_dict
from ablate.core.sizes import ComputeBudget
from ablate.model.stacked import Stack, StackedForward
from ablate.training.train import Callback, RunResult, Trainer, notify_end, token_loss

FREE = ("train.lr", "train.seed")  # the only fields in which members may differ


def pays(device: torch.device | str) -> bool:
    """Whether training trials together is faster than one after another on ``device``: on CUDA only. A CPU step of
    these models is compute-bound (a 6x larger batch costs 6x at one thread, 1.3x gain at two), so stacking saves
    nothing there; a GPU runs a small model's step far below its throughput, and K members fill it."""
    return torch.device(device).type == "cuda"


def check_alike(configs: Sequence[RunConfig]) -> None:
    """A one-line ValueError unless ``configs`` are transformers that differ in ``FREE`` fields only."""
    if not configs:
        raise ValueError("train_together needs at least one config")
    flat = [flatten(to_dict(c)) for c in configs]
    for k, other in enumerate(flat[1:], start=1):
        for key in flat[0]:
            if key not in FREE and other[key] != flat[0][key]:
                raise ValueError(f"configs trained together differ in {key} (config 0: {flat[0][key]!r}, config "
                                 f"{k}: {other[key]!r}); only {' and '.join(FREE)} may differ")  # fmt: skip
    if configs[0].model.kind != "transformer":
        raise ValueError(f"model.kind {configs[0].model.kind!r}: only a transformer trains together")


def train_together(configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]],
                   budget: ComputeBudget | None = None) -> list[RunResult]:  # fmt: skip
    """Train ``configs`` (``check_alike``) as one stacked model; member k reports to ``callbacks[k]`` exactly as
    ``train.train`` would and gets the same result: to rounding without dropout; with dropout, only in distribution
    (the masks come from one random stream, not from each member's own).

    A ``budget`` is a step, token or FLOP budget (``ablate.core.sizes``), the same for every member; a wall budget is
    refused. An exception anywhere (a step, a callback, KeyboardInterrupt) ends every member still training as failed or
    interrupted, each callback hearing ``on_end`` once, and re-raises; members that ended before keep their results.
    """
    check_alike(configs)
    if budget is not None and budget.match == "wall":
        raise ValueError("a wall budget's seconds would be shared by the members (each would train less than "
                         "alone): train its runs one by one")  # fmt: skip
    if len(callbacks) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(callbacks)} callback tuples; give one per config")
    group = _Group([Trainer(c, tuple(cbs), budget) for c, cbs in zip(configs, callbacks, strict=True)])
    try:
        group.run()
    except BaseException as err:
        for k in group.running():
            group.results[k] = failed = group.members[k].failed(err)
            notify_end(group.members[k].callbacks, failed, quiet=True)
        raise
    return [r for r in group.results if r is not None]


# ---------------------------------------------------------------------------------------------------------------
# The loop: one shared step, each member's bookkeeping through its own Trainer


class _Group:
    def __init__(self, members: list[Trainer]) -> None:
        self.members = members
        self.results: list[RunResult | None] = [None] * len(members)
        self.live: list[int] = []  # the members in the stack, in its order
        self.train_s = 0.0  # seconds of shared training steps, evaluations excluded
        self.stack: Stack  # set by ``loop``, as are the window's state:
        self.sums = torch.zeros(0)  # each live member's summed train/loss since the last log step, on device
        self.window_start, self.window_tokens = 0.0, 0  # when the window began; each member's tokens in it

    def running(self) -> list[int]:
        return [k for k, r in enumerate(self.results) if r is None]

    def end(self, k: int, status: str, reason: str, start: float) -> None:
        """Member ``k`` leaves with ``status``: final evaluation and test if completed, its result, its ``on_end``."""
        member = self.members[k]
        Stack.release(member.model)
        self.results[k] = result = member.finish(status, reason, start)
        notify_end(member.callbacks, result, quiet=False)

    def run(self) -> None:
        start = time.perf_counter()
        lead = self.members[0]
        lead.setup()
        for member in self.members[1:]:
            member.setup(task=lead.task)  # one task: the configs only differ in lr and seed
        for k, member in enumerate(self.members):
            if member.start(together=len(self.members)):  # logged: this run shared its steps
                self.end(k, "stopped", "stopped by a callback before the first step", start)
        self.live = self.running()
        if self.live:
            self.loop(start)

    def loop(self, start: float) -> None:
        lead = self.members[self.live[0]]  # its schedule and device are every member's: same config, same clock
        self.stack = Stack([self.members[k].model for k in self.live])
        forward = StackedForward(lead.config.model, lead.task.num_classes is None, lead.device)
        streams = {k: self.batches(k) for k in self.live}
        self.sums = torch.zeros(len(self.live), device=lead.device)  # each member's window of losses, on device
        self.window_start, self.window_tokens = time.perf_counter(), 0
        step, last, step_s = 0, False, 0.0
        while self.live and not last:
            step += 1
            trained = self.train_s + time.perf_counter() - self.window_start  # seconds of training before this step
            lrs = [self.members[k].schedule.lr(step, trained) for k in self.live]
            norms = self.step(step, forward, [next(streams[k]) for k in self.live], lrs)
            if lead.schedule.timed:
                lead.sync()  # a wall budget counts finished work: one sync per step
                step_s = self.train_s + time.perf_counter() - self.window_start - trained
            last = lead.schedule.last(step, trained + step_s)
            ended = self.log(step, lrs, norms) if step % lead.config.train.log_every == 0 or last else {}
            paused = time.perf_counter()
            if last:
                ended.update({k: ("completed", "") for k in self.live if k not in ended})
            else:
                ended.update(self.evaluations(step, trained + step_s, ended))
            self.leave(ended, start)
            self.window_start += time.perf_counter() - paused  # evaluations and endings are not training time

    def log(self, step: int, lrs: list[float], norms: list[torch.Tensor]) -> dict[int, tuple[str, str]]:
        """A log step of every live member (``Trainer.log``); the ones that end, with why."""
        log_every = self.members[self.live[0]].config.train.log_every
        n = log_every if step % log_every == 0 else step % log_every
        means = [s / n for s in self.sums.tolist()]  # the one sync of a log step, for every member
        elapsed = time.perf_counter() - self.window_start  # after the sync: GPU work included
        self.train_s += elapsed
        ended = {}
        for k, mean, lr, norm in zip(self.live, means, lrs, norms, strict=True):
            if why := self.members[k].log(step, mean, lr, norm, self.window_tokens, elapsed):
                ended[k] = why
        self.sums.zero_()
        self.window_start, self.window_tokens = time.perf_counter(), 0
        return ended

    def leave(self, ended: dict[int, tuple[str, str]], start: float) -> None:
        """Ends the members in ``ended``; the stack shrinks to the others (one copy): an ended member costs nothing."""
        for k, (status, reason) in ended.items():
            self.end(k, status, reason, start)
        keep = [i for i, k in enumerate(self.live) if k not in ended]
        self.live = [self.live[i] for i in keep]
        if ended and self.live:
            self.stack.stack([self.members[k].model for k in self.live])
            self.sums = self.sums[keep]

    def evaluations(self, step: int, trained: float, ended: dict[int, tuple[str, str]]) -> dict[int, tuple[str, str]]:
        """Each member still training evaluates when its schedule says so; the ones that end, with why."""
        due = [k for k in self.live if k not in ended and self.members[k].schedule.evaluate(step, trained)]
        if due:
            self.members[due[0]].sync()  # queued training work belongs to the window, not to the evaluation
        return {k: e for k in due if (e := self.members[k].check(step))}

    def batches(self, k: int) -> Iterator[Any]:
        member = self.members[k]
        member.model.train()
        return member.task.batches("train", member.config.train.batch_size, seed=member.config.train.seed,
                                   device=member.device)  # fmt: skip

    def step(self, step: int, forward: StackedForward, batches: list[Any], lrs: list[float]) -> list[torch.Tensor]:
        """Optimizer step ``step`` of every live member, its loss added to its window; their gradient norms."""
        members = [self.members[k] for k in self.live]
        tokens = torch.stack([b.inputs for b in batches])  # (K, B, T)
        targets = torch.stack([b.targets for b in batches])  # (K, B, T) or (K, B)
        mask = None if batches[0].pad_mask is None else torch.stack([b.pad_mask for b in batches])  # (K, B, T)
        with members[0].autocast():
            logits = forward(self.stack.params, tokens, mask)
        each = token_loss(logits, targets, reduction="none").view(len(members), -1)  # (K, B*T)
        losses = each.sum(1) / (targets.view(len(members), -1) != -100).sum(1)  # (K,): each member's mean loss
        losses.sum().backward()  # member k's gradient is its own loss's: the others' do not depend on its weights
        self.stack.hand_out_grads()
        norms = [m.update(lr) for m, lr in zip(members, lrs, strict=True)]
        self.sums += losses.detach()
        self.window_tokens += batches[0].inputs.numel()  # each member's own tokens
        for m in members:
            m.step = step
        if step == 1:  # the one extra sync of the run: each member's reference for divergence
            for m, loss in zip(members, losses.tolist(), strict=True):
                m.initial = loss
        return norms
