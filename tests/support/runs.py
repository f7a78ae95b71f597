"""The smallest run and study that still exercise every path, and a callback that records what a run reports:
shared by the trainer, tracking and study tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from ablate.core.config import RunConfig, run_config_from, with_values

ROOT = Path(__file__).resolve().parents[2]  # the checkout: studies/ are read from here, never from the cwd


# The smallest run and study that still exercise every path: shared by the trainer, tracking and study tests.
TINY_RUN = {
    "model": {"embed_dim": 16, "num_heads": 2, "num_layers": 1},
    "task": {"name": "recall", "seq_len": 16, "num_train": 64, "num_val": 24, "num_test": 8, "num_pairs": 2,
             "vocab_size": 8},
    "train": {"steps": 20, "batch_size": 8, "log_every": 5, "eval_every": 10, "eval_batches": 2, "threads": 1,
              "device": "cpu", "warmup_steps": 2, "lr": 3e-3},
}  # fmt: skip


TINY_STUDY = {
    "name": "tiny",
    "kind": "ablation",
    "task": {"name": "charlm", "seq_len": 16},
    "model": {"embed_dim": 16, "num_heads": 2, "num_layers": 1},
    "train": {"steps": 10, "batch_size": 8, "warmup_steps": 2, "eval_every": 5, "eval_batches": 2,
              "log_every": 5, "device": "cpu", "threads": 1},
    "scientific": {"model.num_heads": [2, 4]},
    "nuisance": {"train.lr": {"low": 1e-3, "high": 1e-2, "log": True}},
    "points": 1,
    "tune_seeds": 1,
    "seeds": 1,
    "max_extra_points": 0,  # a fixed size: 2 variants x (1 tune + 1 seed) trials
}  # fmt: skip


def tiny(**values: object) -> RunConfig:
    """TINY_RUN with dotted keys changed."""
    return with_values(run_config_from(TINY_RUN), values)


class Recorder:
    """A train callback that records every event; can ask to stop at a step, or raise at a step."""

    def __init__(
        self, stop_at: int | None = None, raise_at: int | None = None, error: BaseException | None = None
    ) -> None:
        self.stop_at, self.raise_at, self.error = stop_at, raise_at, error or RuntimeError("boom")
        self.steps: list[tuple[int, dict]] = []
        self.evals: list[tuple[int, dict]] = []
        self.ends: list = []
        self.derived: dict = {}

    def on_start(self, start) -> None:
        self.derived = start.derived

    def on_step(self, step: int, metrics: dict) -> bool:
        self.steps.append((step, metrics))
        if step == self.raise_at:
            raise self.error
        return step == self.stop_at

    def on_eval(self, step: int, metrics: dict) -> None:
        self.evals.append((step, metrics))

    def on_end(self, result) -> None:
        self.ends.append(result)


def write_study(path: Path, **changes: object) -> Path:
    """``TINY_STUDY`` with top-level ``changes`` (a change to None removes the key) written to ``path``."""
    data = {**TINY_STUDY, **changes}
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}, sort_keys=False))
    return path
