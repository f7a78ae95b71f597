"""Your own text, tokenised as you train on it: Parquet and JSON Lines corpora written here, a BPE tokenizer fitted
to the train documents and cached, splits by document content, bits per byte checked by hand, and bad corpora
stopped before any store is written."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from support.runs import TINY_STUDY

from ablate import cli
from ablate.core import names
from ablate.core.config import ConfigError, TaskConfig, run_config_from
from ablate.tasks import build_task, corpus
from ablate.training.train import train


def paragraphs() -> list[str]:
    """Documents of real text from the standard library's own docs: its topics cut at blank lines."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    out = [p.strip() for key in sorted(topics) for p in topics[key].split("\n\n")]
    return [p for p in out if len(p) > 200][:1200]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return paragraphs()


def write_corpus(path, docs: list[str], column: str = "text") -> str:
    if path.suffix == ".parquet":
        pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path)
    else:
        path.write_text("".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def lm(source: str, **changes: object) -> TaskConfig:
    return TaskConfig(**{"name": "lm", "source": source, "seq_len": 32, "tokenizer": "bpe", "tokenizer_vocab": 400,
                         "val_fraction": 0.1, "test_fraction": 0.1, **changes})  # fmt: skip


def test_parquet_and_json_lines_give_the_same_documents_splits_and_tokens(tmp_path, docs, monkeypatch):
    parquet = build_task(lm(write_corpus(tmp_path / "c.parquet", docs)))
    jsonl = build_task(lm(write_corpus(tmp_path / "c.jsonl", docs)))
    for split in ("train", "validation", "test"):
        assert parquet.data[split]["inputs"] == jsonl.data[split]["inputs"]
    assert parquet.vocab_size == 400 and parquet.metric == "bpb"
    assert "tokenizer bpe (400 tokens)" in parquet.description

    def refit(*args, **kwargs):
        raise AssertionError("the tokenizer was fitted again instead of loaded from the cache")

    monkeypatch.setattr(corpus, "_fit", refit)
    again = build_task(lm(str(tmp_path / "c.parquet")))  # the same train documents and settings: cached
    assert again.data["train"]["inputs"] == parquet.data["train"]["inputs"]


def test_documents_split_by_their_content_never_across_splits_whatever_their_order(tmp_path, docs):
    splits = corpus.split_documents(corpus.load_documents(lm(write_corpus(tmp_path / "a.parquet", docs))),
                                    lm("x"))  # fmt: skip
    members = {split: set(part["text"]) for split, part in splits.items()}
    assert not (members["train"] & members["test"]) and not (members["train"] & members["validation"])
    assert sum(map(len, members.values())) == len(set(docs))
    assert 0.05 < len(members["test"]) / len(docs) < 0.15  # test_fraction 0.1, by hash
    shuffled = random.Random(0).sample(docs, len(docs)) + ["a new document " * 20]
    again = corpus.split_documents(corpus.load_documents(lm(write_corpus(tmp_path / "b.parquet", shuffled))),
                                   lm("x"))  # fmt: skip
    assert members["test"] <= set(again["test"]["text"])  # a new document moves no other


def test_bits_per_byte_is_the_loss_in_bits_times_tokens_per_byte_counted_by_hand(tmp_path, docs):
    source = write_corpus(tmp_path / "c.parquet", docs)
    cfg = lm(source)
    task = build_task(cfg)
    built = corpus.check_corpus(cfg)
    tokens = sum(len(e.ids) + 1 for e in built.tokenizer.encode_batch(built.docs["test"]["text"]))  # + the end token
    text_bytes = sum(len(t.encode("utf-8")) for t in built.docs["test"]["text"])
    assert task.tokens_per_byte["test"] == pytest.approx(tokens / text_bytes)
    run = run_config_from({"task": {"name": "lm", "source": source, "seq_len": 32, "tokenizer": "bpe",
                                    "tokenizer_vocab": 400, "val_fraction": 0.1, "test_fraction": 0.1},
                           "model": {"embed_dim": 16, "num_heads": 2, "num_layers": 1},
                           "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "eval_batches": 1, "log_every": 2,
                                     "device": "cpu", "threads": 1, "warmup_steps": 1}})  # fmt: skip
    result = train(run, [])
    bpb = result.metrics[names.TEST_LOSS] / math.log(2) * tokens / text_bytes
    assert result.metrics["test/bpb"] == pytest.approx(bpb)


def test_ablate_train_runs_on_a_parquet_corpus_with_a_bpe_tokenizer(tmp_path, docs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    study = {**TINY_STUDY, "task": {"name": "lm", "source": write_corpus(tmp_path / "c.parquet", docs),
                                    "seq_len": 32, "tokenizer": "bpe", "tokenizer_vocab": 400}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert cli.main(["train", "s.yaml", "--set", "train.steps=4"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"ablate train: corpus {tmp_path / 'c.parquet'}: {len(docs):,} documents"), first
    assert "bpe tokens (400 in the vocabulary" in first and f"cached in {tmp_path / 'hf'}" in first, first


def test_the_study_check_says_the_corpus_size_tokens_and_cache_before_any_store(tmp_path, docs, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    study = {**TINY_STUDY, "task": {"name": "lm", "source": write_corpus(tmp_path / "c.jsonl", docs),
                                    "seq_len": 32, "tokenizer": "char"}}  # fmt: skip
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert cli.main(["study", "s.yaml", "--check"]) == 0
    built = corpus.check_corpus(run_config_from(study).task)
    tokens = [built.tokens(split) for split in ("train", "validation", "test")]
    assert tokens[0] == len(built.ids("train")) and sum(tokens) == sum(map(len, docs)) + 2 * (len(docs) - 3)
    line = capsys.readouterr().out.splitlines()[0]
    assert f"{sum(tokens):,} char tokens" in line and "train/val/test {:,}/{:,}/{:,}".format(*tokens) in line, line
    assert f"cached in {tmp_path / 'hf'}" in line and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(("case", "key", "words"), [
    ("no_column", "task.text_column", "'text' is not a column"),
    ("empty", "task.source", "has no text"),
    ("vocab_too_large", "task.tokenizer_vocab", "support only"),
    ("tokenizer_not_json", "task.tokenizer", "not a tokenizer.json"),
])  # fmt: skip
def test_a_bad_corpus_stops_the_study_in_one_line_before_any_store(tmp_path, docs, monkeypatch, capsys, case, key,
                                                                     words):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ABLATE_STORAGE", raising=False)
    task = {"name": "lm", "source": write_corpus(tmp_path / "c.parquet", docs[:300]), "seq_len": 32,
            "tokenizer": "bpe", "tokenizer_vocab": 400}  # fmt: skip
    if case == "no_column":
        task["source"] = write_corpus(tmp_path / "d.parquet", docs[:300], column="body")
    elif case == "empty":
        task["source"] = write_corpus(tmp_path / "e.jsonl", ["", "   "])
    elif case == "vocab_too_large":
        task["tokenizer_vocab"] = 100_000
    else:
        (tmp_path / "tok.json").write_text("{ not json")
        task["tokenizer"] = str(tmp_path / "tok.json")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({**TINY_STUDY, "task": task}))
    assert cli.main(["study", "s.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err and words in err, err
    assert not (tmp_path / "runs").exists()


def write_large_corpus(path: Path, docs: list[str], megabytes: float) -> str:
    """A Parquet corpus of about ``megabytes`` of text: documents of five paragraphs drawn at random, each numbered
    (so no two are equal), in row groups of 500 documents, as a corpus written in pieces is."""
    rng, texts, size = random.Random(0), [], 0
    while size < megabytes * 1e6:
        texts.append(" ".join(rng.sample(docs, 5)) + f" ({len(texts)})")
        size += len(texts[-1])
    pq.write_table(pa.table({"text": texts}), path, row_group_size=500)
    return str(path)


def test_a_corpus_larger_than_the_memory_cap_trains_under_it(tmp_path, docs):
    """64 MB of text (256 MB of character ids) trains and is scored with the process's data memory capped at 48 MiB
    above what a first run left: documents, tokens and windows stay in memory-mapped files, read a batch at a time.
    Joining the ids in memory, as a text task does, needs 256 MB and fails."""
    warmup = write_large_corpus(tmp_path / "warmup.parquet", docs, 1)
    big = write_large_corpus(tmp_path / "big.parquet", docs, 64)
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           # pyarrow's and glibc's own pools keep freed blocks (and mimalloc reserves large ones), which the cap
           # would count as the corpus's: the system allocator with a fixed mmap threshold returns them
           "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_ARENA_MAX": "1"}  # fmt: skip
    script = Path(__file__).parent / "support" / "capped.py"
    out = subprocess.run([sys.executable, str(script), warmup, big, "48"], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "completed" and result["grew_mib"] < 48 and math.isfinite(result["test_bpb"]), result


def test_the_memory_check_lets_a_corpus_larger_than_memory_through_where_a_text_task_is_refused():
    from ablate.design.preflight import _sizes, estimate_bytes

    sizes = {name: _sizes(run_config_from({"task": {"name": name, "source": "python-docs"}}))
             for name in ("lm", "charlm")}
    for s in sizes.values():
        s["text_bytes"] = 100 * 2**30  # a 100 GiB corpus
    assert estimate_bytes(sizes["lm"]) < 2**30 < 40 * 2**30 < estimate_bytes(sizes["charlm"])


def test_a_tokenizer_setting_is_checked_in_the_config():
    with pytest.raises(ConfigError, match="tokenizer"):
        TaskConfig(name="lm", tokenizer="wordpiece")
    with pytest.raises(ConfigError, match="tokenizer_vocab"):
        TaskConfig(name="lm", tokenizer_vocab=8)
