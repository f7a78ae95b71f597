"""Run as a script: train one tiny ``lm`` run on a warm-up corpus, then cap this process's data memory (RLIMIT_DATA,
which counts heap and private writable maps, not the page cache or read-only file maps) at CAP MiB above what it
holds, and train on CORPUS under that cap. Prints one JSON line: the status, and how much the data memory grew.

Usage: python capped.py WARMUP CORPUS CAP_MIB. The warm-up loads every lazy import and thread pool first, so the
cap measures what the corpus costs, not what a first run costs."""

import json
import resource
import sys

import ablate.tasks.checks as checks
from ablate.core.config import run_config_from
from ablate.training.train import train


def data_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmData:"))


def run(source: str):
    return train(run_config_from({
        "task": {"name": "lm", "source": source, "seq_len": 32, "tokenizer": "char", "val_fraction": 0.02,
                 "test_fraction": 0.02},
        "model": {"embed_dim": 16, "num_heads": 2, "num_layers": 1},
        "train": {"steps": 20, "batch_size": 8, "eval_every": 10, "eval_batches": 2, "log_every": 10,
                  "device": "cpu", "threads": 1, "warmup_steps": 1}}), [])  # fmt: skip


if __name__ == "__main__":
    warmup, corpus, cap = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20
    checks.IN_MEMORY_SPLIT_BYTES = 1 << 20  # evaluate a batch at a time, as a split larger than memory would be
    run(warmup)
    before = data_bytes()
    resource.setrlimit(resource.RLIMIT_DATA, (before + cap, resource.RLIM_INFINITY))
    result = run(corpus)
    print(json.dumps({"status": result.status, "reason": result.reason, "grew_mib": (data_bytes() - before) / 2**20,
                      "test_bpb": result.metrics.get("test/bpb")}))  # fmt: skip
