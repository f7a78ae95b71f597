"""Tasks: deterministic, leak-free splits, the Batch contract, recomputable labels, offline hf: loading, bad input."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from ablate.core.config import ConfigError, ModelConfig, TaskConfig
from ablate.tasks import IGNORE, SPLITS, build_task, cache_dir
from ablate.tasks.charlm import split_text
from ablate.tasks.generated import listops_value, recall_targets

RECALL = TaskConfig(name="recall", seq_len=32, num_pairs=4, vocab_size=16, num_train=300, num_val=60, num_test=60)
LISTOPS = TaskConfig(name="listops", seq_len=48, max_depth=3, max_args=3, num_train=300, num_val=60, num_test=60)
GENERATED = {"recall": RECALL, "listops": LISTOPS}


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Every build (ours and load_dataset's) caches under tmp_path, never in ~/.cache."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    torch.set_num_threads(1)


def arrays(task, split: str) -> dict[str, np.ndarray]:
    return task.data[split].with_format("numpy")[:]


def text_file(tmp_path, text: str, name: str = "corpus.txt"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def numbered_text(lines: int) -> str:
    """Text in which every window is unique, so windows can be located in it."""
    return "".join(f"line {i:05d}: the quick brown fox.\n" for i in range(lines))


# --- determinism and caching -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["recall", "listops"])
def test_generated_tasks_are_a_function_of_config_and_seed(name, tmp_path, monkeypatch):
    first = build_task(GENERATED[name], seed=0)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "other-cache"))  # regenerate, don't load the cache
    again = build_task(GENERATED[name], seed=0)
    other = build_task(GENERATED[name], seed=1)
    assert again.digest == first.digest != other.digest
    for split in SPLITS:
        a, b, c = arrays(first, split), arrays(again, split), arrays(other, split)
        for col in a:
            np.testing.assert_array_equal(a[col], b[col])
        assert not np.array_equal(a["inputs"], c["inputs"])
    assert first.data["train"].cache_files[0]["filename"].startswith(str(tmp_path))


def test_second_build_loads_the_cache_written_by_the_first():
    first = build_task(RECALL, seed=3)
    second = build_task(RECALL, seed=3)
    assert first.data["train"].cache_files == second.data["train"].cache_files
    assert str(cache_dir()) in first.data["train"].cache_files[0]["filename"]


def test_charlm_is_independent_of_seed_and_changes_with_the_text(tmp_path):
    cfg = TaskConfig(name="charlm", source=str(text_file(tmp_path, numbered_text(200))), seq_len=32)
    digest = build_task(cfg, seed=0).digest
    assert build_task(cfg, seed=5).digest == digest
    text_file(tmp_path, numbered_text(201))  # the same path, other text: not the stale cache
    assert build_task(cfg, seed=0).digest != digest


# --- splits ------------------------------------------------------------------------------------------------------


SMALL_SPACE = dataclasses.replace(LISTOPS, max_depth=1)  # 4400 expressions: random draws repeat, kept rows don't


@pytest.mark.parametrize("cfg", [RECALL, LISTOPS, SMALL_SPACE], ids=["recall", "listops", "listops-small-space"])
def test_generated_examples_are_unique_across_splits(cfg):
    task = build_task(cfg, seed=0)
    rows = {split: {row.tobytes() for row in arrays(task, split)["inputs"]} for split in SPLITS}
    sizes = {split: task.num_examples(split) for split in SPLITS}
    assert sizes == {"train": 300, "validation": 60, "test": 60}
    assert {split: len(r) for split, r in rows.items()} == sizes
    assert not rows["train"] & rows["validation"] and not rows["train"] & rows["test"]
    assert not rows["validation"] & rows["test"]


def test_charlm_splits_are_contiguous_blocks_and_unseen_characters_are_unknown(tmp_path):
    text = numbered_text(400)
    at = len(text) - int(len(text) * 0.05) + 5
    text = text[:at] + "€" + text[at + 1 :]  # "€" lies in the first window of the test block only
    cfg = TaskConfig(name="charlm", source=str(text_file(tmp_path, text)), seq_len=40)
    task = build_task(cfg, seed=0)
    assert "€" not in task.vocab and task.vocab[0] == "\ufffd"
    n_val, n_test = int(len(text) * cfg.val_fraction), int(len(text) * cfg.test_fraction)
    starts = {"train": 0, "validation": len(text) - n_val - n_test, "test": len(text) - n_test}
    for split, start in starts.items():
        a = arrays(task, split)
        for i, (inputs, targets) in enumerate(zip(a["inputs"], a["targets"], strict=True)):
            pos = start + i * cfg.seq_len  # windows tile their own block with stride seq_len
            expect = text[pos : pos + cfg.seq_len + 1].replace("€", "\ufffd")
            assert task.decode(inputs) + task.decode(targets[-1:]) == expect
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
        last_end = start + len(a["inputs"]) * cfg.seq_len + 1
        assert last_end <= start + {"train": starts["validation"], "validation": n_val, "test": n_test}[split]
    assert (arrays(task, "test")["targets"] == 0).sum() == 1  # the unknown id, once


# --- the Batch contract ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["charlm", "recall", "listops"])
def test_batches_follow_the_contract(name, tmp_path):
    cfg = GENERATED.get(name) or TaskConfig(name="charlm", source=str(text_file(tmp_path, numbered_text(300))))
    task = build_task(dataclasses.replace(cfg, seq_len=32) if name == "charlm" else cfg, seed=0)
    batch = next(task.batches("train", 8, seed=0, device="cpu"))
    assert len(task.vocab) == task.vocab_size
    assert batch.inputs.shape == (8, task.seq_len) and batch.inputs.dtype == torch.long
    assert batch.inputs.min() >= 0 and batch.inputs.max() < task.vocab_size
    if task.num_classes is None:
        scored = batch.targets[batch.targets != IGNORE]
        assert batch.targets.shape == (8, task.seq_len) and batch.pad_mask is None
        assert scored.numel() > 0 and scored.max() < task.vocab_size
    else:
        assert batch.targets.shape == (8,) and batch.targets.min() >= 0 and batch.targets.max() < task.num_classes
        assert batch.pad_mask.dtype == torch.bool and batch.pad_mask.shape == batch.inputs.shape
        assert torch.equal(batch.pad_mask, batch.inputs != 0)  # padding is id 0, at the end only
        assert torch.equal(batch.pad_mask.cumsum(1)[:, -1], batch.pad_mask.sum(1))
        assert len(set(batch.pad_mask.sum(1).tolist())) > 1  # lengths vary


def test_training_batches_are_endless_and_reproducible_from_their_seed():
    task = build_task(RECALL, seed=0)
    n = task.num_examples("train")

    def take(seed, count):
        it = task.batches("train", 128, seed=seed)
        return torch.cat([next(it).inputs for _ in range(count)])

    epochs = take(0, 5)  # 640 rows: more than two epochs of 300
    assert torch.equal(epochs, take(0, 5)) and not torch.equal(epochs, take(1, 5))
    first_epoch = {row.numpy().tobytes() for row in epochs[:n]}
    assert len(first_epoch) == n  # a permutation: each example once per epoch


def test_generated_tasks_train_on_their_rows_in_a_new_permutation_each_epoch():
    task = build_task(RECALL, seed=0)
    rows, n = torch.from_numpy(arrays(task, "train")["inputs"]).long(), task.num_examples("train")
    gen = torch.Generator().manual_seed(4)
    order = torch.cat([torch.randperm(n, generator=gen), torch.randperm(n, generator=gen)])[:400]
    it = task.batches("train", 100, seed=4)
    assert torch.equal(torch.cat([next(it).inputs for _ in range(4)]), rows[order])


def charlm_windows(task, train_text: str, seed: int, count: int) -> list[int]:
    """Where the first ``count`` training windows start in the train block; each must be a slice of it."""
    it, starts = task.batches("train", 16, seed=seed), []
    while len(starts) < count:
        batch = next(it)
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # targets are the inputs shifted by one
        for inputs, targets in zip(batch.inputs, batch.targets, strict=True):
            starts.append(train_text.find(task.decode(inputs) + task.decode(targets[-1:])))
    assert -1 not in starts  # every window is a contiguous slice of the training block
    return starts[:count]


def test_charlm_trains_on_windows_at_a_new_random_offset_each_epoch(tmp_path):
    text = numbered_text(300)  # every window unique: its position in the text is found by search
    cfg = TaskConfig(name="charlm", source=str(text_file(tmp_path, text)), seq_len=32)
    task = build_task(cfg, seed=0)
    train_text, T = split_text(text, cfg)["train"], cfg.seq_len
    tiled = task.num_examples("train") * T + 1  # the characters the fixed training rows cover
    starts = charlm_windows(task, train_text, seed=0, count=2 * tiled // T)
    epochs = []
    for _ in range(2):  # an epoch: every window of one phase, once, in a random order
        phase = starts[0] % T
        count = (tiled - 1 - phase) // T
        epoch, starts = starts[:count], starts[count:]
        assert sorted(epoch) == list(range(phase, phase + count * T, T)) and epoch != sorted(epoch)
        epochs.append(epoch)
    assert epochs[0][0] % T != epochs[1][0] % T  # the second epoch sees other contexts
    assert charlm_windows(task, train_text, seed=0, count=100) == epochs[0][:100]  # the same seed, the same batches
    assert charlm_windows(task, train_text, seed=1, count=100) != epochs[0][:100]


def test_charlm_evaluates_on_the_fixed_rows(tmp_path):
    cfg = TaskConfig(name="charlm", source=str(text_file(tmp_path, numbered_text(300))), seq_len=32)
    task = build_task(cfg, seed=0)
    next(task.batches("train", 16, seed=0))  # training draws windows; the rows it leaves alone
    for split in ("validation", "test"):
        batches = list(task.eval_batches(split, 16))
        for col in ("inputs", "targets"):  # the rows tiled at stride seq_len (see the contiguous-blocks test)
            want = torch.from_numpy(arrays(task, split)[col]).long()
            assert torch.equal(torch.cat([getattr(b, col) for b in batches]), want)


def test_batches_land_on_the_requested_device(tmp_path):
    task = build_task(LISTOPS, seed=0)
    batch = next(task.batches("train", 4, seed=0, device="meta"))  # "meta" stands in for an accelerator
    assert {t.device.type for t in (batch.inputs, batch.targets, batch.pad_mask)} == {"meta"}
    assert next(task.eval_batches("test", 4, device="meta")).inputs.device.type == "meta"
    charlm = build_task(TaskConfig(name="charlm", source=str(text_file(tmp_path, numbered_text(100))), seq_len=32))
    windows = next(charlm.batches("train", 4, seed=0, device="meta"))
    assert windows.inputs.device.type == windows.targets.device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["listops", "charlm"])
def test_cuda_batches_equal_cpu_batches(name, tmp_path):
    charlm = TaskConfig(name="charlm", source=str(text_file(tmp_path, numbered_text(200))), seq_len=32)
    task = build_task(LISTOPS if name == "listops" else charlm, seed=0)
    on_gpu, on_cpu = task.batches("train", 64, seed=2, device="cuda"), task.batches("train", 64, seed=2)
    for _ in range(8):  # past one epoch of 300 rows (listops) or about 170 windows (charlm)
        gpu, cpu = next(on_gpu), next(on_cpu)
        assert gpu.inputs.is_cuda and torch.equal(gpu.inputs.cpu(), cpu.inputs)
        assert torch.equal(gpu.targets.cpu(), cpu.targets)
        assert (gpu.pad_mask is None) == (cpu.pad_mask is None)
        if cpu.pad_mask is not None:
            assert torch.equal(gpu.pad_mask.cpu(), cpu.pad_mask)


def test_eval_batches_cover_the_split_once_in_order():
    task = build_task(RECALL, seed=0)
    batches = list(task.eval_batches("validation", 25, device="cpu"))
    assert [len(b.inputs) for b in batches] == [25, 25, 10]
    assert torch.equal(torch.cat([b.inputs for b in batches]), torch.from_numpy(arrays(task, "validation")["inputs"]))
    assert len(list(task.eval_batches("validation", 25, limit=2))) == 2


@pytest.mark.parametrize("name", ["charlm", "recall", "listops"])
def test_an_untrained_model_scores_about_ln_vocab(name):
    from ablate.model.transformer import Transformer

    cfg = GENERATED.get(name) or TaskConfig(name="charlm", seq_len=64)  # charlm: the default python-docs text
    task = build_task(cfg, seed=0)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(embed_dim=32, num_heads=2, num_layers=1), task.vocab_size, task.seq_len,
                        task.num_classes).eval()  # fmt: skip
    batch = next(task.eval_batches("validation", 16))
    with torch.no_grad():
        logits = model(batch.inputs, batch.pad_mask)
    loss = F.cross_entropy(logits.flatten(0, -2), batch.targets.flatten(), ignore_index=IGNORE).item()
    classes = task.num_classes or task.vocab_size
    assert abs(loss - math.log(classes)) < 0.25, (loss, math.log(classes))


# --- labels ------------------------------------------------------------------------------------------------------


def test_recall_labels_are_recomputable_from_the_inputs():
    task = build_task(RECALL, seed=0)
    for split in SPLITS:
        a = arrays(task, split)
        np.testing.assert_array_equal(recall_targets(a["inputs"], RECALL.num_pairs, RECALL.vocab_size), a["targets"])
        scored = a["targets"] != IGNORE
        assert (scored.sum(1) == RECALL.num_pairs).all()  # every pair is queried once, after the pairs
        assert not scored[:, : 2 * RECALL.num_pairs].any()


def test_listops_labels_are_the_values_of_the_expressions():
    task = build_task(LISTOPS, seed=0)
    a = arrays(task, "train")
    assert [listops_value(row) for row in a["inputs"].tolist()] == a["targets"].tolist()
    assert len(set(a["targets"].tolist())) == 10
    assert task.decode([11, 4, 12, 8, 2, 15, 15]) == "[MAX 3 [MIN 7 1 ] ]"
    assert listops_value([11, 4, 12, 8, 2, 15, 15]) == 3


# --- hf: through the real load_dataset, offline ------------------------------------------------------------------


def hub_repo(tmp_path):
    """A dataset repository laid out as on the hub (README configs, parquet shards), read by load_dataset offline."""
    repo = tmp_path / "user__corpus"
    (repo / "data").mkdir(parents=True)
    (repo / "tiny").mkdir()
    pd.DataFrame({"text": [numbered_text(60), ""], "id": [0, 1]}).to_parquet(repo / "data/train-00000-of-00001.parquet")
    pd.DataFrame({"text": ["VALIDATION " * 40]}).to_parquet(repo / "data/validation-00000-of-00001.parquet")
    pd.DataFrame({"text": ["tiny corpus " * 100]}).to_parquet(repo / "tiny/train-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: validation\n    path: data/validation-*.parquet\n- config_name: tiny\n"
        "  data_files: tiny/*.parquet\n---\n"
    )
    return repo


def test_hf_source_loads_every_split_and_named_configs_offline(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    repo = hub_repo(tmp_path)
    task = build_task(TaskConfig(name="charlm", source=f"hf:{repo}", seq_len=32), seed=0)
    assert task.decode(arrays(task, "train")["inputs"][0]) == numbered_text(1)[:32]
    assert "VALIDATION" in task.decode(arrays(task, "test")["inputs"][-1])  # validation split joined last
    tiny = build_task(TaskConfig(name="charlm", source=f"hf:{repo}:tiny", seq_len=32), seed=0)
    assert set(tiny.vocab[1:]) == set("tiny corpus ")
    with pytest.raises(ConfigError, match=r"^task\.text_column: 'body' is not a column .*'text'"):
        build_task(TaskConfig(name="charlm", source=f"hf:{repo}", text_column="body"), seed=0)


# --- bad input ---------------------------------------------------------------------------------------------------


def bad_inputs(tmp_path) -> list[tuple[TaskConfig, str, str]]:
    """(config, key, a fragment the message must contain)."""
    (tmp_path / "no-txt").mkdir()
    (tmp_path / "no-txt" / "notes.md").write_text("not a txt")
    empty, short = text_file(tmp_path, " \n", "empty.txt"), text_file(tmp_path, numbered_text(20), "short.txt")
    return [
        (TaskConfig(name="sudoku"), "task.name", "'sudoku'"),
        (TaskConfig(source=str(tmp_path / "missing.txt")), "task.source", "missing.txt"),
        (TaskConfig(source=str(tmp_path / "no-txt")), "task.source", "no .txt files"),
        (TaskConfig(source=str(empty)), "task.source", "has no text"),
        (TaskConfig(source=str(short), seq_len=256), "task.seq_len", "256 is longer than the validation block"),
        (TaskConfig(source=f"hf:{tmp_path / 'no-such-repo'}"), "task.source", "cannot load"),
        (TaskConfig(source="hf:"), "task.source", "expected hf:<name>"),
        (dataclasses.replace(RECALL, num_pairs=9), "task.num_pairs", "seq_len >= 4 * num_pairs = 36"),
        (dataclasses.replace(RECALL, num_pairs=6, vocab_size=10), "task.vocab_size", "10 is too small"),
        (dataclasses.replace(LISTOPS, seq_len=6), "task.seq_len", "6 is too short for listops"),
        (dataclasses.replace(RECALL, eval_lengths=(2, 4)), "task.eval_lengths", "4x holds 16 pairs"),
        (dataclasses.replace(LISTOPS, max_args=1, num_train=50, num_val=10, num_test=10, eval_lengths=(4,)),
         "task.eval_lengths", "4x: listops with max_args 1"),
        (TaskConfig(source=str(short), seq_len=8, eval_lengths=(8,)), "task.eval_lengths", "8x: the test block"),
        # last: it generates rows before it fails
        (TaskConfig(name="listops", max_depth=1, max_args=2, num_train=500), "task.num_train", "distinct examples"),
    ]


def test_every_bad_input_is_one_line_naming_key_and_value(tmp_path, monkeypatch):
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    for cfg, key, fragment in bad_inputs(tmp_path):
        with pytest.raises(ConfigError) as err:
            build_task(cfg, seed=0)
        message = str(err.value)
        assert err.value.key == key and fragment in message and "\n" not in message, (cfg, message)
        if key != "task.num_train":  # only exhausting the example space is found while generating
            assert not cache_dir().exists(), f"{key}: work started before the error"


def test_checks_before_any_build_find_what_the_builders_find(tmp_path, monkeypatch):
    """``ablate.tasks.checks`` (run before a study writes anything, torch-free) rejects the same sources and sizes
    the builders reject, with the same key, and accepts the sources that build."""
    from ablate.tasks.checks import check_task

    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    found = 0
    for cfg, key, fragment in bad_inputs(tmp_path):
        if key in ("task.source", "task.num_pairs", "task.vocab_size") or "pairs" in fragment:  # the rest: data
            with pytest.raises(ConfigError) as err:
                check_task(cfg)
            assert err.value.key == key and fragment in str(err.value), (cfg, err.value)
            found += 1
    assert found == 8
    (tmp_path / "bin.txt").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match=r"^task\.source: .*bin\.txt is binary"):
        check_task(TaskConfig(source=str(tmp_path / "bin.txt")))
    assert not cache_dir().exists()
    repo = hub_repo(tmp_path)
    for source in (f"hf:{repo}", f"hf:{repo}:tiny", str(text_file(tmp_path, numbered_text(50))), "python-docs"):
        check_task(TaskConfig(name="charlm", source=source))
    check_task(RECALL)
    check_task(LISTOPS)


# --- the test split at k x seq_len (task.eval_lengths) ---------------------------------------------------------


def longer_arrays(task, times: int) -> dict[str, np.ndarray]:
    return task.longer(times).with_format("numpy")[:]


def test_recall_at_k_times_the_length_holds_k_times_the_pairs_deterministically(tmp_path, monkeypatch):
    cfg = dataclasses.replace(RECALL, eval_lengths=(2, 4), vocab_size=32)
    task = build_task(cfg, seed=0)
    for times in (2, 4):
        rows = longer_arrays(task, times)
        assert rows["inputs"].shape == (cfg.num_test // times, times * cfg.seq_len)
        scored = rows["targets"] != IGNORE
        assert (scored.sum(1) == times * cfg.num_pairs).all()  # every one of the k x pairs is asked for
        np.testing.assert_array_equal(rows["targets"], recall_targets(rows["inputs"], times * cfg.num_pairs, 32))
        batches = list(task.eval_batches("test", 4, times=times))
        assert sum(len(b.inputs) for b in batches) == cfg.num_test // times
        assert batches[0].inputs.shape == (4, times * cfg.seq_len)
    first = longer_arrays(task, 2)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "elsewhere"))  # rebuilt from scratch: the same rows
    again = longer_arrays(build_task(cfg, seed=0), 2)
    np.testing.assert_array_equal(first["inputs"], again["inputs"])
    other = longer_arrays(build_task(cfg, seed=1), 2)
    assert not np.array_equal(first["inputs"], other["inputs"])
    assert not np.array_equal(first["inputs"][:, : cfg.seq_len], arrays(task, "test")["inputs"][: len(first)])


def test_listops_at_k_times_the_length_is_longer_than_anything_shorter():
    from ablate.tasks.generated import listops_longer_depth

    cfg = dataclasses.replace(LISTOPS, eval_lengths=(2, 4))
    task = build_task(cfg, seed=0)
    assert arrays(task, "train")["length"].max() <= cfg.seq_len
    for times in (2, 4):
        rows = longer_arrays(task, times)
        assert rows["inputs"].shape == (cfg.num_test // times, times * cfg.seq_len)
        assert (rows["length"] > times * cfg.seq_len // 2).all() and (rows["length"] <= times * cfg.seq_len).all()
        labels = [listops_value(row[:n].tolist()) for row, n in zip(rows["inputs"], rows["length"], strict=True)]
        assert labels == rows["targets"].tolist()
        assert listops_longer_depth(cfg, times)[0] > cfg.max_depth  # deeper nesting makes them
        batch = next(task.eval_batches("test", 8, times=times))
        assert torch.equal(batch.pad_mask, batch.inputs != 0)
    np.testing.assert_array_equal(longer_arrays(task, 4)["inputs"], longer_arrays(build_task(cfg, 0), 4)["inputs"])


def test_charlm_at_k_times_the_length_is_the_same_test_text_in_longer_windows(tmp_path):
    cfg = TaskConfig(name="charlm", source=str(text_file(tmp_path, numbered_text(600))), seq_len=16,
                     eval_lengths=(2, 4))  # fmt: skip
    task = build_task(cfg, seed=0)
    test = arrays(task, "test")
    text = np.concatenate([test["inputs"].reshape(-1), test["targets"][-1, -1:]])
    for times in (2, 4):
        rows = longer_arrays(task, times)
        length = times * cfg.seq_len
        assert rows["inputs"].shape == ((len(text) - 1) // length, length)
        np.testing.assert_array_equal(rows["inputs"].reshape(-1), text[: rows["inputs"].size])
        np.testing.assert_array_equal(rows["targets"].reshape(-1), text[1 : rows["inputs"].size + 1])
    with pytest.raises(ValueError, match="only the test split lengthens"):
        next(task.eval_batches("validation", 4, times=2))


def test_eval_lengths_must_be_increasing_multiples():
    assert TaskConfig(eval_lengths=[2, 4]).eval_lengths == (2, 4)  # a list from YAML, kept as a tuple
    hash(TaskConfig(eval_lengths=[2, 4]))
    for bad in ([1], [4, 2], [2, 2], [2.0], 2):
        with pytest.raises(ConfigError, match="^task.eval_lengths: must be|^eval_lengths: must be"):
            TaskConfig(eval_lengths=bad)
