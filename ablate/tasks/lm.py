"""lm: language modelling on documents of real text, in characters or subword tokens, reported in bits per byte.

- **Documents**: each python-docs topic, each ``.txt`` file of a folder, each row of Parquet, JSON Lines or CSV
  files (``task.text_column``, read by ``datasets``: Arrow, memory-mapped) or of a Hub dataset. One text file is
  one document: it is cut into three contiguous blocks, as ``charlm`` does.
- **Splits by document**: a document goes to test, validation or train by a hash of its text alone (seed- and
  order-independent), so no document spans two splits and adding documents never moves the others.
- **Tokens** (``task.tokenizer``): ``char``, or ``bpe`` (byte-level) or ``unigram`` trained with Hugging Face
  ``tokenizers`` on the **train documents only** (``task.tokenizer_vocab`` tokens), cached by a digest of those
  documents and the settings; or a ``tokenizer.json`` file. Documents are tokenised through ``datasets.map``
  (as many processes as cores), joined with an end-of-document token and cut into windows as ``charlm`` does.
- **Bits per byte** (the task's metric, ``val/bpb``, ``test/bpb``): the loss in bits per token times the split's
  tokens per UTF-8 byte, so runs with different tokenizers compare.
"""

from __future__ import annotations

import functools

import datasets
import numpy as np

from ablate.core.config import ConfigError, TaskConfig
from ablate.tasks.base import SPLITS, Task, build_splits, digest_of, row_features
from ablate.tasks.charlm import DOC_SEPARATOR, encode, longer_windows
from ablate.tasks.corpus import END, prepare, processes, quiet, utf8_bytes


def build(cfg: TaskConfig, seed: int) -> Task:
    """The seed is unused: documents split by their content, and the trainer's seed draws the training windows."""
    docs, tokenizer, vocab, tok_digest = prepare(cfg)
    with quiet():
        ids = {split: _token_ids(docs[split], tokenizer, vocab) for split in SPLITS}
    text_bytes = {split: utf8_bytes(docs[split]) for split in SPLITS}
    spec = {"task": "lm", "seq_len": cfg.seq_len, "tokenizer": tok_digest, "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction, "docs": {s: docs[s]._fingerprint for s in SPLITS}}  # fmt: skip
    digest = digest_of(spec)
    sizes = {split: (len(ids[split]) - 1) // cfg.seq_len for split in SPLITS}
    for split, n in sizes.items():
        if n < 1:
            raise ConfigError("task.seq_len", f"{cfg.seq_len} tokens is longer than the {split} split of "
                                              f"{cfg.source!r} ({len(ids[split])} tokens); lower it or use more text")
    data = build_splits("lm", digest, _rows, {"ids": ids, "seq_len": cfg.seq_len}, sizes,
                        row_features(cfg.seq_len, classification=False, padded=False))  # fmt: skip
    per_byte = {split: len(ids[split]) / max(1, text_bytes[split]) for split in SPLITS}
    return Task(
        name="lm", data=data, vocab_size=len(vocab), seq_len=cfg.seq_len, num_classes=None, metric="bpb",
        digest=digest, vocab=vocab, random_offsets=True, tokens_per_byte=per_byte,
        description=f"lm on {cfg.source}: {sum(len(d) for d in docs.values()):,} documents, "
                    f"{sum(text_bytes.values()):,} bytes, tokenizer {cfg.tokenizer} ({len(vocab)} tokens), "
                    f"{sum(len(i) for i in ids.values()):,} tokens, windows train/val/test "
                    f"{sizes['train']}/{sizes['validation']}/{sizes['test']}",
        longer=functools.partial(longer_windows, data["test"], cfg.seq_len),
    )


# ---------------------------------------------------------------------------------------------------------------
# Token ids


def _token_ids(docs: datasets.Dataset, tokenizer: object, vocab: tuple[str, ...]) -> np.ndarray:
    """The split's documents as one id array, an end-of-document token (a blank line for characters) between."""
    if tokenizer is None:
        return encode(DOC_SEPARATOR.join(docs["text"]), vocab)
    end = tokenizer.token_to_id(END)
    encoded = docs.map(lambda batch: {"ids": [e.ids + [end] for e in tokenizer.encode_batch(batch["text"])]},
                       batched=True, remove_columns=["text"], num_proc=processes(len(docs)))  # fmt: skip
    return np.concatenate([np.asarray(row, dtype=np.int32) for row in encoded.with_format("numpy")["ids"]])


def _rows(ids: dict[str, np.ndarray], seq_len: int):
    for split in SPLITS:
        for start in range(0, len(ids[split]) - seq_len, seq_len):
            window = ids[split][start : start + seq_len + 1]
            yield {"inputs": window[:-1], "targets": window[1:]}
