"""charlm: character-level language modelling on real text, reported in bits per character.

The text is split into three contiguous blocks (train, then validation, then test at the end), so no window crosses
a split. Each block is cut into windows of seq_len + 1 characters with stride seq_len (every character is predicted
once per epoch): inputs = window[:-1], targets = window[1:]. Validation and test are scored on these fixed windows;
training draws windows of the train block at a new random phase and order each epoch (``Task.random_offsets``), so
an epoch does not repeat the previous one's contexts. The vocabulary is the characters of train plus id 0, the
unknown character, which stands for anything seen only in validation or test.

At k x seq_len (``task.eval_lengths``) the test block is cut again into windows of k x seq_len + 1 characters with
stride k x seq_len: the same text (its last partial window dropped), k x fewer windows of k x the context.
"""

from __future__ import annotations

import functools
import hashlib

import datasets
import numpy as np

from ablate.core.config import ConfigError, TaskConfig
from ablate.tasks.base import Task, build_splits, cache_dir, digest_of, row_features
from ablate.tasks.checks import TRAITS
from ablate.tasks.corpus import DOC_SEPARATOR, UNKNOWN, char_ids, code_table, split_text
from ablate.tasks.sources import hf_name, text_files, unreadable


def build(cfg: TaskConfig, seed: int) -> Task:
    """The seed is unused: the split of a text is fixed (the trainer's seed draws the training windows)."""
    text = load_text(cfg.source, cfg.text_column)
    blocks = split_text(text, cfg)
    vocab = (UNKNOWN, *sorted(set(blocks["train"]) - {UNKNOWN}))
    text_sha = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    spec = {"task": "charlm", "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, "text_sha256": text_sha}  # fmt: skip
    digest = digest_of(spec)
    sizes = {split: (len(block) - 1) // cfg.seq_len for split, block in blocks.items()}
    for times in cfg.eval_lengths:
        if sizes["test"] < times:
            raise ConfigError("task.eval_lengths", f"{times}x: the test block of {cfg.source!r} has "
                                                   f"{sizes['test']} windows of {cfg.seq_len}, fewer than {times}; "
                                                   "drop it or raise task.test_fraction")  # fmt: skip
    data = build_splits(
        "charlm",
        digest,
        _rows,
        {"blocks": blocks, "vocab": vocab, "seq_len": cfg.seq_len},
        sizes,
        row_features(cfg.seq_len, classification=False, padded=False),
    )
    return Task(
        name="charlm",
        data=data,
        vocab_size=len(vocab),
        seq_len=cfg.seq_len,
        num_classes=None,
        metric=TRAITS["charlm"].metric,
        digest=digest,
        vocab=vocab,
        description=f"charlm on {cfg.source}: {len(text):,} characters, vocabulary {len(vocab)}, "
        f"windows train/val/test {sizes['train']}/{sizes['validation']}/{sizes['test']}",
        random_offsets=True,
        longer=functools.partial(longer_windows, data["test"], cfg.seq_len),
    )


def longer_windows(test: datasets.Dataset, seq_len: int, times: int) -> datasets.Dataset:
    """The test rows' text cut into windows of ``times * seq_len`` (rebuilt from the cached rows, in memory)."""
    rows = test.with_format("numpy")[:]
    text = np.concatenate([rows["inputs"].reshape(-1), rows["targets"][-1, -1:]])
    length = times * seq_len
    starts = np.arange(0, len(text) - length, length)
    windows = text[starts[:, None] + np.arange(length + 1)]  # (N, length + 1)
    features = row_features(length, classification=False, padded=False)
    return datasets.Dataset.from_dict({"inputs": windows[:, :-1], "targets": windows[:, 1:]}, features=features)


def load_text(source: str, text_column: str = "text") -> str:
    """The whole corpus of ``source`` as one string, or a ConfigError naming ``task.source``."""
    if source == "python-docs":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        text = DOC_SEPARATOR.join(topics[key] for key in sorted(topics))  # sorted: the same order everywhere
    elif source.startswith("hf:"):
        text = _load_hf(source, text_column)
    else:
        text = _load_files(source)
    if not text.strip():
        raise ConfigError("task.source", f"{source!r} has no text")
    return text


def _load_files(source: str) -> str:
    files = text_files(source)
    try:
        return DOC_SEPARATOR.join(f.read_text(encoding="utf-8") for f in files)
    except (OSError, UnicodeDecodeError) as err:
        raise unreadable(source, err) from None


def _load_hf(source: str, text_column: str) -> str:
    """``hf:<name>[:<config>]`` through ``datasets.load_dataset``; every split, in the order train, validation,
    test, then any others, joined into one text (the contiguous split is then ours)."""
    name, config = hf_name(source)
    try:
        dd = datasets.load_dataset(name, config, cache_dir=str(cache_dir().parent))
    except Exception as err:  # noqa: BLE001 - hub, network and format errors all mean: this source is unusable
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("task.source", f"{source!r}: cannot load ({detail})") from None
    order = ("train", "validation", "test")
    names = [s for s in order if s in dd] + sorted(s for s in dd if s not in order)
    columns = dd[names[0]].column_names
    if text_column not in columns:
        raise ConfigError("task.text_column", f"{text_column!r} is not a column of {source!r}; it has {columns}")
    return DOC_SEPARATOR.join(DOC_SEPARATOR.join(t for t in dd[s][text_column] if t) for s in names)


def _rows(blocks: dict[str, str], vocab: tuple[str, ...], seq_len: int):
    table = code_table(vocab)
    for split in ("train", "validation", "test"):
        ids = char_ids(blocks[split], table)
        for start in range(0, len(ids) - seq_len, seq_len):
            window = ids[start : start + seq_len + 1]
            yield {"inputs": window[:-1], "targets": window[1:]}
