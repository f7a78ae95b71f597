"""How a run's learning rate moves and what it optimizes: linear warmup then cosine decay (over steps, or over the
seconds of a wall budget), when a run evaluates and ends, and AdamW with weight decay on weight matrices only."""

from __future__ import annotations

import math

import torch

from ablate.core.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (1-based): linear warmup, then cosine to ``lr * min_lr_ratio``."""
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return _cosine(progress, cfg)


def lr_at_share(share: float, cfg: TrainConfig) -> float:
    """Learning rate once ``share`` (0 to 1) of a wall budget is used: ``lr_at`` with time in place of steps, the
    warmup lasting the share ``warmup_steps / steps`` of the seconds."""
    warmup = cfg.warmup_steps / cfg.steps
    if share < warmup:
        return cfg.lr * share / warmup
    return _cosine(min(1.0, (share - warmup) / (1 - warmup)) if warmup < 1 else 1.0, cfg)


def _cosine(progress: float, cfg: TrainConfig) -> float:
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Schedule:
    """When a run evaluates and ends, and at which learning rate: over ``train.steps``, or over the seconds of a
    wall budget (evaluations then fall at the shares of the seconds where ``eval_every`` puts them in steps)."""

    def __init__(self, cfg: TrainConfig, seconds: float | None = None) -> None:
        self.cfg, self.seconds = cfg, seconds
        self.evals = [k * cfg.eval_every / cfg.steps for k in range(1, (cfg.steps - 1) // cfg.eval_every + 1)]

    @property
    def timed(self) -> bool:
        return self.seconds is not None

    def lr(self, step: int, elapsed: float) -> float:
        """Of step ``step``, starting after ``elapsed`` seconds of training (the first step of a timed warmup: 0)."""
        return lr_at(step, self.cfg) if self.seconds is None else lr_at_share(min(1.0, elapsed / self.seconds),
                                                                               self.cfg)  # fmt: skip

    def last(self, step: int, elapsed: float) -> bool:
        """Whether the run ends after step ``step``, done at ``elapsed`` seconds of training."""
        return step >= self.cfg.steps if self.seconds is None else elapsed >= self.seconds

    def evaluate(self, step: int, elapsed: float) -> bool:
        """Whether to evaluate after step ``step`` (not the last: the final evaluation follows the loop)."""
        if self.seconds is None:
            return step % self.cfg.eval_every == 0
        due = [share for share in self.evals if share * self.seconds <= elapsed]
        self.evals = self.evals[len(due):]  # one evaluation for shares passed within one step
        return bool(due)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying the weight matrices of linear and recurrent layers only (an LSTM's or GRU's input-to-hidden
    and hidden-to-hidden matrices, as the Transformer's projections): not biases, norms, embeddings or scales."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    decay |= {id(w) for m in model.modules() if isinstance(m, torch.nn.RNNBase) for w in m.parameters()
              if w.dim() == 2}  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")
