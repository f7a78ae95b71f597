"""Trials of one architecture trained together: K runs that differ only in learning rate and seed, as one stacked model.

Each member is an ordinary run (``train.Trainer``): its own model built under its own seed, its own batch stream,
optimizer, schedule, gradient clipping, divergence check, callbacks, evaluation and result. Only the training step is
shared: every parameter is stacked on a leading member dim K, the matmuls are batched over it (``baddbmm``) and
attention sees the members folded into its batch, (K*B, H, T, D), so it stays on the ``scaled_dot_product_attention``
kernel (``torch.func.vmap`` over sdpa has no batching rule on the CPU: it loops). The loss is the sum of the members'
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
import torch.nn.functional as F

from ablate.core.config import ModelConfig, RunConfig, flatten, to_dict
from ablate.core.sizes import ComputeBudget
from ablate.model.transformer import Attend, l2_normalize, rotate
from ablate.training.train import Callback, RunResult, Trainer, notify_end, token_loss

FREE = ("train.lr", "train.seed")  # the only fields in which members may differ
CORE_SCALING = {"learned": "none", "qknorm": "none", "logn": "sqrt"}  # the rest of a scaling once its per-member
# factors are folded into q and k here (``_Forward.fold``): the shared core then applies a constant scale only


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
# The stacked parameters and the stacked forward pass


class _Stack:
    """Every parameter of the member models stacked on dim 0, (K, ...); each member's parameters are views of it."""

    def __init__(self, models: list[torch.nn.Module]) -> None:
        self.names = [name for name, _ in models[0].named_parameters()]  # a tied weight once (tok_emb.weight)
        self.stack(models)

    def stack(self, models: list[torch.nn.Module]) -> None:
        """Stacks ``models`` (a copy) and makes their parameters views of the stack; the optimizers keep the same
        parameter objects, so their state survives a restack."""
        self.slots = [[dict(m.named_parameters())[name] for name in self.names] for m in models]
        self.params: dict[str, torch.Tensor] = {}
        for j, name in enumerate(self.names):
            stacked = torch.stack([slot[j].detach() for slot in self.slots]).requires_grad_()  # (K, ...)
            for k, slot in enumerate(self.slots):
                slot[j].data = stacked.data[k]
            self.params[name] = stacked

    def hand_out_grads(self) -> None:
        """Gives member k's parameters their slice of the stacked gradient (views: clipping and the optimizer step
        write through), then clears the stack's; a parameter that got no gradient gets none, as in a single run."""
        for j, name in enumerate(self.names):
            grad, self.params[name].grad = self.params[name].grad, None
            for k, slot in enumerate(self.slots):
                slot[j].grad = None if grad is None else grad[k]

    @staticmethod
    def release(model: torch.nn.Module) -> None:
        """Gives a member leaving the stack its own storage (its checkpoint would otherwise save the whole stack)."""
        for p in model.parameters():
            p.data = p.data.clone()


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # x (K, ..., Cin), w (K, Cout, Cin), b (K, Cout) -> (K, ..., Cout): one batched matmul for every member
    flat = x.reshape(x.size(0), -1, x.size(-1))  # (K, N, Cin)
    y = torch.bmm(flat, w.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2))
    return y.view(*x.shape[:-1], w.size(1))


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # F.layer_norm's affine takes one (C,) weight: normalise without it, then each member's (K, C) gain and bias
    shape = (x.size(0),) + (1,) * (x.dim() - 2) + (x.size(-1),)  # (K, 1, ..., C)
    y = F.layer_norm(x, x.shape[-1:]) * w.view(shape)
    return y if b is None else y + b.view(shape)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0 else x  # training only: evaluation runs the member models


class _Forward:
    """The stacked Transformer (``model.Transformer`` in training mode, every member at once) over a ``_Stack``."""

    def __init__(self, cfg: ModelConfig, causal: bool, device: torch.device) -> None:
        self.cfg, self.causal = cfg, causal
        self.H, self.D = cfg.num_heads, cfg.resolved_head_dim
        self.core = Attend(self.H, self.D, scaling=CORE_SCALING.get(cfg.scaling, cfg.scaling), dropout=cfg.attn_dropout,
                           causal=causal, backend=cfg.backend).to(device)  # fmt: skip

    def __call__(self, p: dict[str, torch.Tensor], tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """tokens (K, B, T), mask (K, B, T) or None -> logits (K, B, T, V) or (K, B, classes)."""
        K, B, T = tokens.shape
        V = p["tok_emb.weight"].size(1)
        offsets = torch.arange(K, device=tokens.device).view(K, 1, 1) * V  # member k's rows of the flat table
        x = F.embedding(tokens + offsets, p["tok_emb.weight"].flatten(0, 1))  # (K, B, T, C)
        if self.cfg.position == "learned":
            x = x + p["pos_emb.weight"][:, :T].unsqueeze(1)  # (K, 1, T, C)
        x = _dropout(x, self.cfg.resid_dropout)
        flat_mask = None if mask is None else mask.flatten(0, 1)  # (K*B, T)
        for i in range(self.cfg.num_layers):
            x = self.block(p, f"blocks.{i}.", x, flat_mask)
        x = _layer_norm(x, p["ln_f.weight"], p.get("ln_f.bias"))
        if self.causal:
            head = p["tok_emb.weight"] if self.cfg.tie_head else p["head.weight"]  # (K, V, C)
            return torch.bmm(x.flatten(1, 2), head.transpose(1, 2)).view(K, B, T, V)
        if mask is None:
            pooled = x.mean(2)  # (K, B, C)
        else:
            keep = mask.unsqueeze(-1).to(x.dtype)  # (K, B, T, 1)
            pooled = (x * keep).sum(2) / keep.sum(2).clamp(min=1)  # (K, B, C)
        return _linear(pooled, p["head.weight"], p.get("head.bias"))

    def block(self, p: dict[str, torch.Tensor], pre: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h = _layer_norm(x, p[pre + "ln_1.weight"], p.get(pre + "ln_1.bias"))
        x = x + _dropout(self.attention(p, pre + "attn.", h, mask), self.cfg.resid_dropout)
        if not self.cfg.mlp_hidden:  # attention-only
            return x
        h = _layer_norm(x, p[pre + "ln_2.weight"], p.get(pre + "ln_2.bias"))
        h = F.gelu(_linear(h, p[pre + "mlp.0.weight"], p.get(pre + "mlp.0.bias")))
        return x + _dropout(_linear(h, p[pre + "mlp.2.weight"], p.get(pre + "mlp.2.bias")), self.cfg.resid_dropout)

    def attention(self, p: dict[str, torch.Tensor], pre: str, x: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        K, B, T, _ = x.shape
        qkv = _linear(x, p[pre + "qkv.weight"], p.get(pre + "qkv.bias")).view(K, B, T, 3, self.H, self.D)
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5)  # 3 x (K, B, H, T, D)
        if self.cfg.position == "rope":
            q, k = rotate(q), rotate(k)
        q, k = self.fold(p, pre + "attend.", q, k, mask)
        y, _ = self.core(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), mask)  # (K*B, H, T, D)
        y = y.unflatten(0, (K, B)).transpose(2, 3).reshape(K, B, T, self.H * self.D)
        return _linear(y, p[pre + "attn_out.weight"], p.get(pre + "attn_out.bias"))

    def fold(self, p: dict[str, torch.Tensor], pre: str, q: torch.Tensor, k: torch.Tensor,
             mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``Attend.fold`` with each member's per-head factors: (K, H) as (K, 1, H, 1, 1) on q (K, B, H, T, D)."""
        K, scaling = q.size(0), self.cfg.scaling

        def per_head(name: str) -> torch.Tensor:
            return p[pre + name].view(K, 1, self.H, 1, 1)

        if scaling == "learned":
            q = q * per_head("temperature").to(q.dtype)
        elif scaling == "qknorm":
            q, k = l2_normalize(q, per_head("qk_gain").to(q.dtype)), l2_normalize(k)
        elif scaling == "logn":
            allowed = self.core.allowed(mask, q.size(-2), q.device)  # as Attend.forward: a row with no key sees all
            allowed = None if allowed is None else allowed | ~allowed.any(-1, keepdim=True)
            n = self.core.attended(allowed, q.size(-2), q.device)  # (K*B|1, 1, T|1, 1)
            n = n.unflatten(0, (K, -1)) if n.size(0) > 1 else n.unsqueeze(0)  # (K|1, B|1, 1, T|1, 1)
            log_n = n.to(torch.promote_types(q.dtype, torch.float32)).log()
            q = q * (per_head("logn_scale") * log_n).to(q.dtype)
        return q, k


# ---------------------------------------------------------------------------------------------------------------
# The loop: one shared step, each member's bookkeeping through its own Trainer


class _Group:
    def __init__(self, members: list[Trainer]) -> None:
        self.members = members
        self.results: list[RunResult | None] = [None] * len(members)
        self.live: list[int] = []  # the members in the stack, in its order
        self.train_s = 0.0  # seconds of shared training steps, evaluations excluded
        self.stack: _Stack  # set by ``loop``, as are the window's state:
        self.sums = torch.zeros(0)  # each live member's summed train/loss since the last log step, on device
        self.window_start, self.window_tokens = 0.0, 0  # when the window began; each member's tokens in it

    def running(self) -> list[int]:
        return [k for k, r in enumerate(self.results) if r is None]

    def end(self, k: int, status: str, reason: str, start: float) -> None:
        """Member ``k`` leaves with ``status``: final evaluation and test if completed, its result, its ``on_end``."""
        member = self.members[k]
        _Stack.release(member.model)
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
        self.stack = _Stack([self.members[k].model for k in self.live])
        forward = _Forward(lead.config.model, lead.task.num_classes is None, lead.device)
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

    def step(self, step: int, forward: _Forward, batches: list[Any], lrs: list[float]) -> list[torch.Tensor]:
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
