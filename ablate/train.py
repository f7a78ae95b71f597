"""One training run of one configuration. Knows nothing of MLflow or Optuna: it reports to callbacks.

INTERFACE STUB (to be implemented): the types below are the contract that tracking.py and study.py rely on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ablate.config import RunConfig

STATUSES = ("completed", "diverged", "stopped", "failed")


@dataclass
class RunStart:
    """What callbacks learn before the first step."""

    config: RunConfig
    task: Any  # ablate.tasks.Task: its .data (datasets.DatasetDict) is logged as the run's input
    derived: dict[str, Any]  # head_dim, params, flops_per_token, device, backend, precision, torch/cuda versions


@dataclass
class RunResult:
    status: str  # one of STATUSES
    reason: str = ""  # why a run diverged, stopped or failed
    steps: int = 0  # optimizer steps done
    metrics: dict[str, float] = field(default_factory=dict)
    """Final summaries, MLflow names: val/loss, val/bpc or val/acc (full validation split), best/val/loss,
    cost/params, cost/flops_per_token, cost/flops_total, perf/tokens_per_s, perf/wall_s, perf/peak_mem_mb."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One dict per evaluation: {"step": s, "val/loss": ..., "val/bpc" or "val/acc": ..., attention stats}."""
    attention_maps: Any = None  # numpy (num_layers, num_heads, T, T) of one validation sample, final model
    config_yaml: str = ""


class Callback(Protocol):
    """Each hook may return True to ask the trainer to stop (status ``stopped``)."""

    def on_start(self, start: RunStart) -> bool | None: ...

    def on_step(self, step: int, metrics: dict[str, float]) -> bool | None: ...

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool | None: ...

    def on_end(self, result: RunResult) -> None: ...


def train(config: RunConfig, callbacks: tuple[Callback, ...] | list[Callback] = ()) -> RunResult:
    raise NotImplementedError
