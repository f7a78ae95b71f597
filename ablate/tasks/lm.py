"""lm: language modelling on documents of real text, in characters or subword tokens, reported in bits per byte.

- **Documents**: each python-docs topic, each ``.txt`` file of a folder, each row of Parquet, JSON Lines or CSV
  files (``task.text_column``, read by ``datasets``: Arrow, memory-mapped) or of a Hub dataset. One text file is
  one document: it is cut into three contiguous blocks, as ``charlm`` does.
- **Splits by document**: a document goes to test, validation or train by a hash of its text alone (seed- and
  order-independent), so no document spans two splits and adding documents never moves the others.
- **Tokens** (``task.tokenizer``): ``char``, or ``bpe`` (byte-level) or ``unigram`` trained with Hugging Face
  ``tokenizers`` on the **train documents only** (``task.tokenizer_vocab`` tokens), cached by a digest of those
  documents and the settings; or a ``tokenizer.json`` file. Documents are tokenised through ``datasets.map``
  (as many processes as cores, a batch at a time) into one flat id file per split in the cache, joined with an
  end-of-document token (``ablate.tasks.corpus``). Training reads windows at random offsets from that file,
  memory-mapped; validation and test are its fixed windows, as ``charlm`` cuts them. No split is ever one string
  or one array in memory, so a corpus larger than memory trains.
- **Bits per byte** (the task's metric, ``val/bpb``, ``test/bpb``): the loss in bits per token times the split's
  tokens per UTF-8 byte, so runs with different tokenizers compare.
"""

from __future__ import annotations

import functools

import datasets
import numpy as np
import pyarrow as pa

from ablate.core.config import ConfigError, TaskConfig
from ablate.tasks.base import SPLITS, Task, digest_of, row_features
from ablate.tasks.charlm import longer_windows
from ablate.tasks.checks import TRAITS
from ablate.tasks.corpus import check_corpus


def build(cfg: TaskConfig, seed: int) -> Task:
    """The seed is unused: documents split by their content, and the trainer's seed draws the training windows."""
    corpus = check_corpus(cfg)  # built once per process: the study's checks already did, the trials reuse it
    tokens = {split: corpus.tokens(split) for split in SPLITS}
    spec = {"task": "lm", "seq_len": cfg.seq_len, "tokenizer": corpus.tokenizer_digest,
            "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction,
            "docs": {s: corpus.docs[s]._fingerprint for s in SPLITS}}  # fmt: skip
    digest = digest_of(spec)
    sizes = {split: (tokens[split] - 1) // cfg.seq_len for split in SPLITS}
    for split, n in sizes.items():
        if n < 1:
            raise ConfigError("task.seq_len", f"{cfg.seq_len} tokens is longer than the {split} split of "
                                              f"{cfg.source!r} ({tokens[split]} tokens); lower it or use more text")
    data = datasets.DatasetDict({s: _windows(corpus.ids(s), cfg.seq_len, f"lm-{digest}-{s}") for s in SPLITS})
    per_byte = {split: tokens[split] / max(1, corpus.text_bytes[split]) for split in SPLITS}
    return Task(
        name="lm", data=data, vocab_size=len(corpus.vocab), seq_len=cfg.seq_len, num_classes=None,
        metric=TRAITS["lm"].metric, digest=digest, vocab=corpus.vocab, random_offsets=True, tokens_per_byte=per_byte,
        token_files=dict(corpus.token_files),
        description=f"lm on {cfg.source}: {sum(len(d) for d in corpus.docs.values()):,} documents, "
                    f"{sum(corpus.text_bytes.values()):,} bytes, tokenizer {cfg.tokenizer} ({len(corpus.vocab)} "
                    f"tokens), {sum(tokens.values()):,} tokens, windows train/val/test "
                    f"{sizes['train']}/{sizes['validation']}/{sizes['test']}",
        longer=functools.partial(longer_windows, data["test"], cfg.seq_len),
    )


def _windows(ids: np.ndarray, seq_len: int, fingerprint: str) -> datasets.Dataset:
    """The split's windows of seq_len + 1 ids at stride seq_len as rows (inputs, targets): Arrow arrays over the
    memory-mapped id file itself, so no row is copied or held in memory until it is read."""
    n = (len(ids) - 1) // seq_len * seq_len
    inputs = pa.FixedSizeListArray.from_arrays(pa.array(ids[:n]), seq_len)
    targets = pa.FixedSizeListArray.from_arrays(pa.array(ids[1 : n + 1]), seq_len)
    info = datasets.DatasetInfo(features=row_features(seq_len, classification=False, padded=False))
    table = pa.table({"inputs": inputs, "targets": targets})
    return datasets.Dataset(table, info=info, fingerprint=fingerprint)  # given: datasets would hash every row
