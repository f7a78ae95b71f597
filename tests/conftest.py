"""Shared pytest setup. torch is imported lazily: report tests must run without it."""

from __future__ import annotations

import pytest

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
    "seeds": 1,
    "max_extra_points": 0,  # a fixed size: 2 variants x (1 tune + 1 seed) trials
}  # fmt: skip


@pytest.fixture(autouse=True)
def _data_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Built tasks go to a cache shared by this test session (subprocesses too), never to the user's."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where torch sees no CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
