"""What every task shares: the Batch and Task types, the fast iterators, and building splits through `datasets`.

A task's rows live in a ``datasets.DatasetDict`` (train/validation/test) with the columns ``inputs`` (seq_len ids),
``targets`` (seq_len ids with -100 where unscored, or one class id) and, for padded tasks, ``length``. The Arrow
files are cached under ``$HF_DATASETS_CACHE/ablate`` by a fingerprint of everything the data depends on, so the
trials of a study build a task once. Iterators turn each split into torch tensors once and then only index them.

Training batches are rows in a new random order each epoch, or, for a task whose training rows tile one text
(``random_offsets``), windows of that text at random offsets: each epoch draws a phase in [0, seq_len) and a
permutation of the windows starting at phase + k * seq_len, so the model sees new contexts every epoch and still
predicts about every character once. A task with ``token_files`` (``lm``) reads those windows from its memory-mapped
id file, so its training text is never in memory whole. Evaluation always reads the fixed rows: as tensors made
once, or, for a split larger than ``IN_MEMORY_SPLIT_BYTES``, a batch at a time from its memory-mapped Arrow file.

A task that can lengthen its test split (``Task.longer``) also gives it at k x seq_len (``eval_batches(...,
times=k)``): each task's builder says how, deterministically, and caches generated rows like the splits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from ablate.core.config import ConfigError
from ablate.tasks import checks
from ablate.tasks.checks import TRAITS

SPLITS = ("train", "validation", "test")
IGNORE = -100  # targets at unscored positions; F.cross_entropy(..., ignore_index=-100)
DEVICE_CACHE_BYTES = 1 << 30  # splits up to this size live on the accelerator; larger ones are copied per batch
FORMAT_VERSION = 1  # bump when the rows a config produces change, so stale caches are not reused


@dataclass(frozen=True)
class Batch:
    """One batch on its device. ``targets`` is (B, T) for LM-style tasks and (B,) for classification."""

    inputs: torch.Tensor  # (B, T) long
    targets: torch.Tensor  # (B, T) long with -100 at unscored positions, or (B,) long
    pad_mask: torch.Tensor | None = None  # (B, T) bool, True at real tokens; None when nothing is padded


@dataclass(eq=False)
class Task:
    """A built task: its data, what a model needs to know about it, and iterators of torch batches."""

    name: str
    data: datasets.DatasetDict
    vocab_size: int
    seq_len: int
    num_classes: int | None  # None: LM-style (targets per position, causal model)
    metric: str  # "bpc", "bpb" or "acc"
    digest: str  # short hash of everything the data depends on; equal digests mean identical data
    vocab: tuple[str, ...] = ()  # id -> token text, for decoding samples
    description: str = ""  # one line for logs and reports
    random_offsets: bool = False
    """The training rows tile one text (row i + 1 starts where row i's targets end): training draws windows of
    that text at random offsets instead of the rows. Validation and test still use the rows."""
    token_files: dict[str, Path] = field(default_factory=dict)
    """Per split, its text as one flat int32 id file (``ablate.tasks.corpus``): training windows are read from it
    memory-mapped instead of from a text rebuilt in memory."""
    tokens_per_byte: dict[str, float] = field(default_factory=dict)
    """Per split, tokens per UTF-8 byte of its text: a ``bpb`` metric is the loss in bits per token times this."""
    longer: Callable[[int], datasets.Dataset] | None = None
    """``longer(k)``: the test split again at k x seq_len (k >= 2), rows of the same columns k x as long, about
    ``num_test // k`` of them; None when the task cannot lengthen it."""
    _tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, init=False, repr=False)

    def decode(self, ids: Any) -> str:
        """Token ids (list or tensor) as text; ids outside the vocabulary (-100) are skipped."""
        joiner = "" if TRAITS[self.name].text else " "  # characters join as text, tokens with spaces
        return joiner.join(self.vocab[i] for i in map(int, ids) if 0 <= i < len(self.vocab))

    def batches(self, split: str, batch_size: int, *, seed: int, device: Any = "cpu") -> Iterator[Batch]:
        """Shuffled batches without end, for training: each epoch is a new permutation drawn from ``seed``
        (of the rows, or with ``random_offsets`` of the training text's windows at a new phase)."""
        if batch_size < 1:
            raise ConfigError("train.batch_size", f"must be >= 1, got {batch_size}")
        gen = torch.Generator().manual_seed(seed)
        if self.random_offsets and split == "train":
            text = self._training_text(split, device)
            epochs = _window_epochs(len(text), self.seq_len, gen)
            span = np.arange(self.seq_len + 1)  # a window's offsets from its start, made once, not per step
            offsets = span if isinstance(text, np.ndarray) else torch.from_numpy(span).to(text.device)
            return (_window_batch(text, starts, offsets, device) for starts in _index_stream(epochs, batch_size))
        tensors = self._split_tensors(split, device)
        epochs = _row_epochs(len(tensors["inputs"]), gen)
        return (_batch(tensors, idx, device) for idx in _index_stream(epochs, batch_size))

    def eval_batches(
        self, split: str, batch_size: int, *, device: Any = "cpu", limit: int | None = None, times: int = 1
    ) -> Iterator[Batch]:
        """The split in its fixed order, the last batch possibly smaller; at most ``limit`` batches. ``times`` k > 1:
        the test split at k x seq_len (``longer``), built on first use."""
        rows = self.data[split] if times == 1 and split in self.data else None
        if rows is not None and len(rows) * 8 * self.seq_len > checks.IN_MEMORY_SPLIT_BYTES:  # int32 in and out
            return (_batch(_to_tensors(rows.select(range(s, min(s + batch_size, len(rows)))), self.seq_len),
                           slice(None), device) for s in _starts(len(rows), batch_size, limit))  # fmt: skip
        tensors = self._split_tensors(split, device, times)
        starts = _starts(len(tensors["inputs"]), batch_size, limit)
        return (_batch(tensors, slice(s, s + batch_size), device) for s in starts)

    def num_examples(self, split: str) -> int:
        return self.data[split].num_rows

    def _split_tensors(self, split: str, device: Any, times: int = 1) -> dict[str, torch.Tensor]:
        """The split as tensors, kept on ``device`` when small enough so a batch is one gather, no copy per step."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        if times != 1 and (split != "test" or times < 2 or self.longer is None):
            raise ValueError(f"{self.name}: only the test split lengthens, by k >= 2, where the task can "
                             f"(got {split!r} at {times}x)")  # fmt: skip
        key = split if times == 1 else f"{split}/{times}x"
        if key not in self._tensors:
            rows = self.data[split] if times == 1 else self.longer(times)
            self._tensors[key] = _to_tensors(rows, self.seq_len * times)
        return self._on_device(key, device)

    def _training_text(self, split: str, device: Any) -> torch.Tensor | np.ndarray:
        """The ids the training windows are cut from: the split's id file memory-mapped (copied to an accelerator
        once when small enough), else the text rebuilt from the rows."""
        if split not in self.token_files:
            return self._text_tensor(split, device)
        ids = np.memmap(self.token_files[split], dtype=np.int32, mode="r")
        if torch.device(device).type == "cpu" or 2 * ids.nbytes > DEVICE_CACHE_BYTES:
            return ids
        key = f"{split}/file@{device}"
        if key not in self._tensors:
            self._tensors[key] = {"ids": torch.from_numpy(np.array(ids)).long().to(device)}
        return self._tensors[key]["ids"]

    def _text_tensor(self, split: str, device: Any) -> torch.Tensor:
        """The text the rows of ``split`` tile, as one (N * seq_len + 1,) id tensor rebuilt from the rows."""
        key = f"{split}/text"
        if key not in self._tensors:
            rows = self._split_tensors(split, "cpu")
            inputs, targets = rows["inputs"], rows["targets"]
            if not (torch.equal(inputs[:, 1:], targets[:, :-1]) and torch.equal(inputs[1:, 0], targets[:-1, -1])):
                raise ValueError(f"{self.name}: the {split} rows do not tile one text; random_offsets needs them to")
            self._tensors[key] = {"ids": torch.cat([inputs.reshape(-1), targets[-1, -1:]])}
        return self._on_device(key, device)["ids"]

    def _on_device(self, key: str, device: Any) -> dict[str, torch.Tensor]:
        """The host tensors under ``key``, copied to ``device`` once when small enough (else left on the host)."""
        device = torch.device(device)
        on_device = f"{key}@{device}"
        if device.type != "cpu" and on_device not in self._tensors:
            host = self._tensors[key]
            if sum(t.nbytes for t in host.values()) <= DEVICE_CACHE_BYTES:
                self._tensors[on_device] = {name: t.to(device) for name, t in host.items()}
        return self._tensors.get(on_device, self._tensors[key])


def _starts(n: int, batch_size: int, limit: int | None) -> range:
    starts = range(0, n, batch_size)
    return starts if limit is None else starts[:limit]


def _to_tensors(ds: datasets.Dataset, seq_len: int) -> dict[str, torch.Tensor]:
    """The whole split as long tensors (and a bool pad mask from ``length``), converted once."""
    arrays = ds.with_format("numpy")[:]
    out = {key: torch.from_numpy(arrays[key]).long() for key in ("inputs", "targets")}
    if "length" in arrays:
        out["pad_mask"] = torch.arange(seq_len)[None, :] < torch.from_numpy(arrays["length"])[:, None]
    return out


def _index_stream(epochs: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of indices from consecutive epochs (each a 1-D tensor); a batch may span two epochs."""
    perm, pos = next(epochs), 0
    while True:
        parts, need = [], batch_size
        while need:
            if pos == len(perm):
                perm, pos = next(epochs), 0
            take = min(need, len(perm) - pos)
            parts.append(perm[pos : pos + take])
            pos, need = pos + take, need - take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def _row_epochs(n: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Per epoch, a permutation of the row indices."""
    while True:
        yield torch.randperm(n, generator=gen)


def _window_epochs(text_len: int, seq_len: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Per epoch, the start offsets of the windows (seq_len + 1 ids) at a random phase, in a random order."""
    while True:
        phase = int(torch.randint(seq_len, (), generator=gen))
        count = (text_len - 1 - phase) // seq_len  # windows that fit: start + seq_len + 1 <= text_len
        yield phase + seq_len * torch.randperm(count, generator=gen)


def _window_batch(text: torch.Tensor | np.ndarray, starts: torch.Tensor, offsets: torch.Tensor | np.ndarray,
                  device: Any) -> Batch:  # fmt: skip
    """The windows at ``starts`` as one gather where the text lives (a tensor, or a memory-mapped file read for
    just these windows; ``offsets`` of the same kind): inputs window[:-1], targets window[1:]."""
    if isinstance(text, np.ndarray):
        windows = torch.from_numpy(text[starts.numpy()[:, None] + offsets]).long()
    else:
        windows = text[starts.to(text.device)[:, None] + offsets]
    windows = windows.to(device, non_blocking=True)  # (B, T + 1)
    return Batch(windows[:, :-1], windows[:, 1:])


def _batch(tensors: dict[str, torch.Tensor], idx: torch.Tensor | slice, device: Any) -> Batch:
    def move(t: torch.Tensor) -> torch.Tensor:
        return t[idx].to(device, non_blocking=True)

    mask = tensors.get("pad_mask")
    return Batch(move(tensors["inputs"]), move(tensors["targets"]), None if mask is None else move(mask))


# ---------------------------------------------------------------------------------------------------------------
# Building


def cache_dir() -> Path:
    """Where built tasks are cached; read at call time so ``HF_DATASETS_CACHE`` set after import still counts."""
    root = os.environ.get("HF_DATASETS_CACHE") or datasets.config.HF_DATASETS_CACHE
    return Path(root) / "ablate"


def digest_of(spec: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able spec (config fields, seed, text hash, format version)."""
    text = json.dumps({**spec, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_features(seq_len: int, classification: bool, padded: bool) -> datasets.Features:
    ids = datasets.List(datasets.Value("int32"), length=seq_len)
    cols = {"inputs": ids, "targets": datasets.Value("int32") if classification else ids}
    if padded:
        cols["length"] = datasets.Value("int32")
    return datasets.Features(cols)


def build_rows(name: str, digest: str, rows: Callable[..., Iterator[dict]], gen_kwargs: dict[str, Any],
               features: datasets.Features) -> datasets.Dataset:  # fmt: skip
    """Every row of ``rows(**gen_kwargs)`` as one Dataset, cached under the fingerprint ``digest``.

    The fingerprint replaces datasets' hash of ``gen_kwargs`` (large texts need no hashing) and names the cache.
    """
    try:
        return datasets.Dataset.from_generator(
            rows,
            features=features,
            gen_kwargs=gen_kwargs,
            cache_dir=str(cache_dir()),
            fingerprint=f"ablate-{name}-{digest}",
        )
    except datasets.exceptions.DatasetGenerationError as err:
        if isinstance(err.__cause__, ConfigError):  # a generator found the config impossible
            raise err.__cause__ from None
        raise


def build_splits(
    name: str,
    digest: str,
    rows: Callable[..., Iterator[dict]],
    gen_kwargs: dict[str, Any],
    sizes: dict[str, int],
    features: datasets.Features,
) -> datasets.DatasetDict:
    """Rows of train, then validation, then test from one generator, cached under the fingerprint ``digest``."""
    ds = build_rows(name, digest, rows, gen_kwargs, features)
    splits, start = {}, 0
    for split in SPLITS:
        splits[split] = ds.select(range(start, start + sizes[split]))  # contiguous: a slice, no index mapping
        start += sizes[split]
    return datasets.DatasetDict(splits)
