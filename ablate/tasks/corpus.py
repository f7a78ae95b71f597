"""A text corpus before any model: its documents, their split, the tokenizer fitted to the train documents and each
split's token ids. No torch: ``ablate study`` runs this in its checks, before any store exists, so a missing column,
an empty corpus or a vocabulary larger than the corpus supports stops there, and says how large the corpus is and
where its tokens are cached (the trials reuse them). See ``ablate.tasks.lm`` for the documents, splits and tokens.

Nothing here holds a whole corpus in memory: documents stay in ``datasets``' Arrow files (memory-mapped), they are
tokenised through ``datasets.map`` a batch at a time, and each split's ids are written to one flat int32 file in the
cache (as nanoGPT's ``train.bin``), which training reads memory-mapped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc

from ablate.core.config import ConfigError, TaskConfig
from ablate.tasks.sources import DATA_FILES, data_files, hf_cache, hf_name, text_files, unreadable

SPLITS = ("train", "validation", "test")
END = "<|endoftext|>"  # between documents; also the unknown token of a unigram model
UNKNOWN = "\ufffd"  # a character's id 0: anything seen only outside train
DOC_SEPARATOR = "\n\n"  # between documents read as characters
TOKEN_DTYPE = np.int32
TOKENIZE_BATCH = 64  # documents per datasets.map batch: memory grows with a batch, never with the corpus


def digest_of(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def split_text(text: str, cfg: TaskConfig) -> dict[str, str]:
    """Train, validation and test as contiguous blocks, each long enough for one window."""
    n = len(text)
    n_val, n_test = int(n * cfg.val_fraction), int(n * cfg.test_fraction)
    n_train = n - n_val - n_test
    blocks = {"train": text[:n_train], "validation": text[n_train : n_train + n_val], "test": text[n_train + n_val :]}
    for split, block in blocks.items():
        if len(block) < cfg.seq_len + 1:
            raise ConfigError(
                "task.seq_len",
                f"{cfg.seq_len} is longer than the {split} block of {cfg.source!r} ({len(block)} of {n} characters); "
                "lower task.seq_len, raise the split's fraction or use more text",
            )
    return blocks


@dataclass(frozen=True, eq=False)
class Corpus:
    """A corpus ready to train on: per split its documents, their UTF-8 bytes and a flat file of their token ids
    (documents joined by an end token, or a blank line for characters) in the cache."""

    source: str
    tokenizer_kind: str
    docs: dict[str, datasets.Dataset]
    tokenizer: Any  # a tokenizers.Tokenizer, or None for characters
    vocab: tuple[str, ...]  # id -> token text
    tokenizer_digest: str
    text_bytes: dict[str, int]
    token_files: dict[str, Path]

    def ids(self, split: str) -> np.ndarray:
        """The split's token ids, memory-mapped read-only: pages are read as windows need them."""
        return np.memmap(self.token_files[split], dtype=TOKEN_DTYPE, mode="r")

    def tokens(self, split: str) -> int:
        return self.token_files[split].stat().st_size // np.dtype(TOKEN_DTYPE).itemsize

    def summary(self) -> str:
        """One line: how large the corpus is, in documents, bytes and tokens, and where its tokens are cached."""
        docs, size = sum(len(d) for d in self.docs.values()), sum(self.text_bytes.values())
        tokens = {split: self.tokens(split) for split in SPLITS}
        return (f"corpus {self.source}: {docs:,} documents, {_mb(size)} of text, {sum(tokens.values()):,} "
                f"{self.tokenizer_kind} tokens ({len(self.vocab):,} in the vocabulary; train/val/test "
                f"{tokens['train']:,}/{tokens['validation']:,}/{tokens['test']:,}); "
                f"cached in {self.token_files['train'].parent}")  # fmt: skip


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


@functools.cache  # one build per corpus and setting in a process: a study's arms share their task section
def check_corpus(cfg: TaskConfig) -> Corpus:
    """``cfg``'s corpus, documents split, tokenizer fitted and ids written (all cached), or a ConfigError naming
    the key of what cannot work: the text column, an empty corpus, a split without a document, a tokenizer file
    that does not parse, a vocabulary larger than the train documents support."""
    with quiet():
        docs = split_documents(load_documents(cfg), cfg)
        tokenizer, vocab, tok_digest = train_tokenizer(docs["train"], cfg)
        files = {split: token_file(docs[split], tokenizer, vocab, tok_digest) for split in SPLITS}
        text_bytes = {split: utf8_bytes(docs[split]) for split in SPLITS}
    kind = cfg.tokenizer if cfg.tokenizer in ("char", "bpe", "unigram") else Path(cfg.tokenizer).name
    return Corpus(cfg.source, kind, docs, tokenizer, vocab, tok_digest, text_bytes, files)


@contextlib.contextmanager
def quiet():
    """No progress bar per filter and map (a study builds its task in every trial); restored after."""
    was = datasets.utils.logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was:
            datasets.enable_progress_bars()


def load_documents(cfg: TaskConfig) -> datasets.Dataset:
    """The source's documents as a Dataset with one column, ``text`` (empty documents dropped)."""
    source = cfg.source
    if source == "python-docs":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        docs = datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    elif source.startswith("hf:"):
        docs = _hf_documents(source, cfg.text_column)
    elif files := data_files(source):
        docs = _file_documents(source, files, cfg.text_column)
    else:
        try:
            texts = [f.read_text(encoding="utf-8") for f in text_files(source)]
        except (OSError, UnicodeDecodeError) as err:
            raise unreadable(source, err) from None
        docs = datasets.Dataset.from_dict({"text": texts})
    docs = docs.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(docs) == 0:
        raise ConfigError("task.source", f"{source!r} has no text")
    return docs


def _file_documents(source: str, files: list[Path], column: str) -> datasets.Dataset:
    kind = DATA_FILES[files[0].suffix.lower()]
    try:
        ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train",
                                   cache_dir=str(hf_cache()))  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a parse error of any format means: this source is unusable
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("task.source", f"{source!r}: cannot read as {kind} ({detail[:300]})") from None
    return _text_column(ds, source, column)


def _hf_documents(source: str, column: str) -> datasets.Dataset:
    name, config = hf_name(source)
    try:
        dd = datasets.load_dataset(name, config, cache_dir=str(hf_cache()))
    except Exception as err:  # noqa: BLE001 - hub, network and format errors all mean: this source is unusable
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError("task.source", f"{source!r}: cannot load ({detail})") from None
    return datasets.concatenate_datasets([_text_column(dd[s], source, column) for s in sorted(dd)])


def _text_column(ds: datasets.Dataset, source: str, column: str) -> datasets.Dataset:
    if column not in ds.column_names:
        raise ConfigError("task.text_column", f"{column!r} is not a column of {source!r}; it has {ds.column_names}")
    ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def split_documents(docs: datasets.Dataset, cfg: TaskConfig) -> dict[str, datasets.Dataset]:
    """Train, validation and test by each document's content hash; one document: three contiguous blocks."""
    if len(docs) == 1:
        blocks = split_text(docs[0]["text"], cfg)
        return {split: datasets.Dataset.from_dict({"text": [blocks[split]]}) for split in SPLITS}
    cuts = (cfg.test_fraction, cfg.test_fraction + cfg.val_fraction)
    marked = docs.map(lambda row: {"split": _split_of(row["text"], cuts)}, num_proc=processes(len(docs)))
    out = {split: marked.filter(lambda row, s=split: row["split"] == s).remove_columns("split") for split in SPLITS}
    for split, part in out.items():
        if len(part) == 0:
            key = "task.val_fraction" if split == "validation" else "task.test_fraction"
            raise ConfigError(key if split != "train" else "task.source",
                              f"no document of {cfg.source!r} ({len(docs)} documents) fell in {split}; "
                              "use more documents or a larger fraction")  # fmt: skip
    return out


def _split_of(text: str, cuts: tuple[float, float]) -> str:
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2**64
    return "test" if h < cuts[0] else "validation" if h < cuts[1] else "train"


def processes(rows: int) -> int | None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, rows // 1000) if rows >= 2000 else None  # processes pay only on many documents


def utf8_bytes(docs: datasets.Dataset) -> int:
    return sum(len(t.encode("utf-8", "surrogatepass")) for batch in docs.iter(batch_size=1000) for t in batch["text"])


# ---------------------------------------------------------------------------------------------------------------
# Tokens


def token_file(docs: datasets.Dataset, tokenizer: Any, vocab: tuple[str, ...], tok_digest: str) -> Path:
    """The documents' ids as one flat int32 file, cached by the documents and the tokenizer: written a batch of
    documents at a time, never held whole (a corpus larger than memory is fine)."""
    key = digest_of({"docs": docs._fingerprint, "tokenizer": tok_digest, "dtype": np.dtype(TOKEN_DTYPE).str})
    path = Path(hf_cache()) / "ablate" / "tokens" / f"{key}.bin"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    encode = _char_encoder(vocab) if tokenizer is None else _token_encoder(tokenizer)
    encoded = docs.map(encode, batched=True, batch_size=TOKENIZE_BATCH, writer_batch_size=TOKENIZE_BATCH,
                       remove_columns=["text"], num_proc=processes(len(docs)))  # fmt: skip
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as out:
        for table in encoded.with_format("arrow").iter(batch_size=TOKENIZE_BATCH):
            out.write(pc.list_flatten(table["ids"]).to_numpy().astype(TOKEN_DTYPE, copy=False).tobytes())
        if tokenizer is None:  # a separator between documents, none after the last
            out.truncate(out.tell() - len(DOC_SEPARATOR) * np.dtype(TOKEN_DTYPE).itemsize)
    os.replace(tmp, path)  # whole or absent: a worker killed mid-write leaves only its own .tmp
    return path


def _char_encoder(vocab: tuple[str, ...]):
    table = code_table(vocab)
    return lambda batch: {"ids": [char_ids(text + DOC_SEPARATOR, table) for text in batch["text"]]}


def code_table(vocab: tuple[str, ...]) -> np.ndarray:
    """Code point -> character id (0, the unknown character, for any code point outside the vocabulary)."""
    table = np.zeros(max(ord(c) for c in vocab) + 1, dtype=TOKEN_DTYPE)
    for i, ch in enumerate(vocab[1:], start=1):
        table[ord(ch)] = i
    return table


def char_ids(text: str, table: np.ndarray) -> np.ndarray:
    """Character ids through a lookup table over code points (vectorised)."""
    points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return np.where(points < len(table), table[np.minimum(points, len(table) - 1)], 0).astype(TOKEN_DTYPE)


def _token_encoder(tokenizer: Any):
    end = tokenizer.token_to_id(END)
    return lambda batch: {"ids": [e.ids + [end] for e in tokenizer.encode_batch(batch["text"])]}


def train_tokenizer(train: datasets.Dataset, cfg: TaskConfig):
    """The tokenizer of ``cfg`` fitted to the train documents (cached), its vocabulary (id -> text) and digest."""
    if cfg.tokenizer == "char":
        chars = sorted({c for batch in train.iter(batch_size=1000) for t in batch["text"] for c in t} - {UNKNOWN})
        vocab = (UNKNOWN, *chars)
        return None, vocab, digest_of({"char": "".join(vocab)})
    from tokenizers import Tokenizer

    if cfg.tokenizer.endswith(".json"):
        try:
            tokenizer = Tokenizer.from_file(str(Path(cfg.tokenizer).expanduser()))
        except Exception as err:  # noqa: BLE001 - whatever the file holds, it is not a tokenizer we can use
            raise ConfigError("task.tokenizer", f"{cfg.tokenizer!r}: not a tokenizer.json ({err})") from None
    else:
        key = digest_of({"kind": cfg.tokenizer, "vocab": cfg.tokenizer_vocab, "train": train._fingerprint})
        path = Path(hf_cache()) / "ablate" / "tokenizers" / f"{key}.json"
        if path.is_file():
            tokenizer = Tokenizer.from_file(str(path))
        else:
            tokenizer = _fit(train, cfg)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tokenizer.save(str(tmp))
            os.replace(tmp, path)
    vocab = tuple(tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size()))  # as text: "Ġthe" is " the"
    return tokenizer, vocab, hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def _fit(train: datasets.Dataset, cfg: TaskConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = (t for batch in train.iter(batch_size=1000) for t in batch["text"])
    if cfg.tokenizer == "bpe":
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=cfg.tokenizer_vocab, special_tokens=[END], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=cfg.tokenizer_vocab, special_tokens=[END], unk_token=END,
                                          show_progress=False)  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if tokenizer.get_vocab_size() < cfg.tokenizer_vocab:
        raise ConfigError("task.tokenizer_vocab", f"{cfg.tokenizer_vocab}: the train documents of {cfg.source!r} "
                                                  f"support only {tokenizer.get_vocab_size()} {cfg.tokenizer} tokens; "
                                                  "lower it or use more text")  # fmt: skip
    return tokenizer


