"""The tasks the studies train on, built with Hugging Face `datasets` and cached by fingerprint.

``build_task(cfg, seed)`` gives a :class:`Task`: its ``data`` (a DatasetDict, already tokenised), what the model
needs (``vocab_size``, ``seq_len``, ``num_classes``), its ``metric`` and iterators of :class:`Batch`.

- ``charlm``: characters of real text (python-docs, local .txt, or ``hf:<name>[:<config>]``), metric bpc; trains on
  windows at random offsets, evaluates on fixed ones.
- ``recall``: multi-query associative recall, loss and accuracy only at the query positions.
- ``listops``: nested-expression classification with padding, metric accuracy.

Importing the package does not import torch: ``ablate.tasks.checks`` (what can be checked before a study writes
anything) must stay usable by the CLI and the report. The builders and batch types load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ablate.core.config import ConfigError, TaskConfig
from ablate.tasks.checks import TRAITS

if TYPE_CHECKING:
    from ablate.tasks.base import IGNORE, SPLITS, Batch, Task, cache_dir


def build_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """The task ``cfg`` names, built (or loaded from the cache) for ``seed``; bad configs raise ConfigError first.

    Generated tasks (recall, listops) draw their examples from ``seed``; charlm's split does not depend on it.
    """
    if cfg.name not in TRAITS:
        raise ConfigError("task.name", f"unknown task {cfg.name!r}; allowed: {', '.join(TRAITS)}")
    import importlib

    module, _, function = TRAITS[cfg.name].builder.partition(".")
    return getattr(importlib.import_module(f"ablate.tasks.{module}"), function)(cfg, seed)


def __getattr__(name: str) -> Any:
    if name in ("IGNORE", "SPLITS", "Batch", "Task", "cache_dir"):
        from ablate.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'ablate.tasks' has no attribute {name!r}")


__all__ = ["IGNORE", "SPLITS", "Batch", "Task", "build_task", "cache_dir"]
