"""``ablate bench --gpu``: its measuring functions on the CPU at tiny sizes, the refusal without CUDA, and the tiny
path on a CUDA device (marked ``gpu``)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from support.runs import TINY_STUDY
from support.stores import EMPTY, empty_stores

from ablate.bench import gpu
from ablate.cli import main

TINY_RUN = ("model.num_layers=1", "task.seq_len=32", "task.val_fraction=0.002", "task.test_fraction=0.002",
            "train.batch_size=4", "train.steps=6", "train.log_every=2", "train.eval_every=6", "train.warmup_steps=1",
            "train.eval_batches=1")  # fmt: skip


def tiny_plan(tmp_path: Path, device: str = "cpu", compile: tuple[bool, ...] = (False,)) -> gpu.GpuPlan:
    """The whole --gpu path in seconds: 16 x 16 matmuls, a width-64 run of 6 steps, one trial of a tiny study."""
    study = tmp_path / "tiny.yaml"
    data = {**TINY_STUDY, "train": {**TINY_STUDY["train"], "device": device}}
    study.write_text(yaml.safe_dump(data, sort_keys=False))
    empty_stores()
    (tmp_path / "scratch" / "0").mkdir(parents=True)
    for db in ("optuna.db", "mlflow.db"):  # migrating fresh stores takes seconds: the bench's first way uses these
        shutil.copy(EMPTY / db, tmp_path / "scratch" / "0" / db)
    run = TINY_RUN + (("train.precision=fp32",) if device == "cpu" else ())  # bf16 on a CPU: 50x slower
    return gpu.GpuPlan(matmul_sizes=(16,), matmul_repeats=2, matmul_inner=2, width=64, large_run=run,
                         compile=compile, study=str(study), window_s=60, workers=(1,), trials=1, batched=2)  # fmt: skip


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

def test_steady_state_takes_the_median_window_and_the_first_window_s_excess_as_warm_up():
    # 10 tokens a step; windows of 2 steps at 0.1 s a step, the first took 5.2 s (5 s of compilation)
    windows = [(2, 20 / 5.2), (4, 100.0), (6, 100.0), (7, 50.0)]  # the last, a partial window of 1 step at 0.2 s
    step_s, warmup_s = gpu.steady_state(windows, 10)
    assert step_s == pytest.approx(0.1)
    assert warmup_s == pytest.approx(5.0)
    assert gpu.steady_state([(3, 30.0)], 10) == pytest.approx((1 / 3, 0.0))  # one window: no warm-up to tell


def test_matmul_peak_times_every_size_and_dtype():
    rows = gpu.matmul_peak(torch.device("cpu"), (8, 16), repeats=2, inner=2)
    assert [(r["dtype"], r["n"]) for r in rows] == [("bf16", 8), ("bf16", 16), ("fp32", 8), ("fp32", 16)]
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert gpu.peak_flops(rows, "fp32") == 1e12 * max(r["tflops"] for r in rows[2:])


def test_the_gpu_bench_on_a_cpu_writes_its_tables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = tiny_plan(tmp_path)
    assert gpu.gpu_bench(tmp_path / "out", plan, torch.device("cpu"), tmp_path / "scratch") == 0
    out = tmp_path / "out"
    tables = {stem: read_csv(out / f"{stem}.csv") for stem in ("gpu_matmul", "gpu_mfu", "gpu_trials", "gpu_batched")}
    assert list(tables["gpu_matmul"][0]) == list(gpu.MATMUL_FIELDS)
    assert list(tables["gpu_mfu"][0]) == list(gpu.MFU_FIELDS)
    assert list(tables["gpu_trials"][0]) == list(gpu.TRIALS_FIELDS)
    assert list(tables["gpu_batched"][0]) == list(gpu.BATCHED_FIELDS)
    (run,) = tables["gpu_mfu"]
    assert (run["width"], run["status"], run["steps"], run["compile"]) == ("64", "completed", "6", "False")
    peak = gpu.peak_flops([{"dtype": r["dtype"], "tflops": float(r["tflops"])} for r in tables["gpu_matmul"]],
                                "fp32")  # fmt: skip
    assert float(run["mfu"]) == pytest.approx(int(run["flops_per_token"]) * int(run["tokens_per_s"]) / peak, rel=0.01)
    (one,) = tables["gpu_trials"]
    assert (one["way"], one["workers"], one["gpus"], one["trials"], one["vs_one"]) == ("workers 1", "1", "0", "1",
                                                                                         "1.0")  # fmt: skip
    assert float(one["trials_per_h"]) > 0 and one["per_gpu_h"] == ""
    sequential, together = tables["gpu_batched"]
    assert [(r["way"], r["runs"], r["statuses"]) for r in (sequential, together)] == [
        ("one after another", "2", "completed"), ("together", "2", "completed")]
    assert float(together["trials_per_h"]) > 0
    text = (out / "gpu.md").read_text()
    for part in ("## Matmul peak", "## Model FLOP utilisation", "## Trials per hour", "| workers 1 | 1 | 0 | 1 |",
                 "## Batched trials: 2 runs", "| together | 2 | completed |", "2 runs together: ",
                 "Reproduce: `ablate bench --gpu --width 64 --window 60 --study "):  # fmt: skip
        assert part in text
    assert "MISS" not in text  # width 64: no MFU target applies, one way: no ratio to judge


def test_batched_runs_differ_in_learning_rate_and_seed_only(tmp_path):
    plan = tiny_plan(tmp_path)
    configs = gpu.batched_configs(plan.study, 4, torch.device("cpu"))
    assert [c.train.seed for c in configs] == [0, 1, 2, 3]
    lrs = [c.train.lr for c in configs]
    assert 1e-3 < lrs[0] < lrs[1] < lrs[2] < lrs[3] < 1e-2  # TINY_STUDY's range, log-evenly
    assert lrs[1] / lrs[0] == pytest.approx(lrs[3] / lrs[2])
    assert {(c.model, c.task) for c in configs} == {(configs[0].model, configs[0].task)}


def test_the_targets_are_judged_at_width_1024_and_on_the_best_ratio():
    run = dict(width=1024, layers=8, params=1, compile=True, precision="bf16", status="completed", steps=300,
               tokens_per_step=1, flops_per_token=1, step_ms=1.0, tokens_per_s=1, tflops=1.0, mfu=0.36, warmup_s=1.0,
               run_tokens_per_s=1, peak_mem_mb=1)  # fmt: skip
    way = dict.fromkeys(gpu.TRIALS_FIELDS, "")
    trials = [{**way, "way": "workers 1", "vs_one": 1.0}, {**way, "way": "workers auto", "vs_one": 4.0}]
    runs = [run, {**run, "compile": False, "mfu": 0.2}]
    text = gpu.gpu_markdown([], runs, trials, [], "# h", gpu.GpuPlan())
    assert "- ok   MFU 36.0% at width 1024, compile on (need >= 35%)" in text
    assert "- MISS MFU 20.0% at width 1024, compile off" in text
    assert "- MISS trials per GPU-hour 4.0x one worker at best (need >= 5x)" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_gpu_without_cuda_exits_with_one_line_and_writes_nothing(tmp_path, capsys):
    assert main(["bench", "--gpu", "--out", str(tmp_path / "bench")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ablate bench: --gpu: needs a CUDA device")
    assert not (tmp_path / "bench").exists()


def test_a_window_of_no_seconds_is_refused(tmp_path, capsys):
    assert main(["bench", "--gpu", "--window", "0", "--out", str(tmp_path / "bench")]) == 2
    assert "--window: must be > 0 seconds" in capsys.readouterr().err


@pytest.mark.gpu
def test_the_tiny_gpu_bench_runs_on_cuda_compiled_and_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = tiny_plan(tmp_path, device="cuda", compile=(False, True))
    assert gpu.gpu_bench(tmp_path / "out", plan, scratch=tmp_path / "scratch") == 0  # None: the CUDA device
    runs = read_csv(tmp_path / "out" / "gpu_mfu.csv")
    assert [(r["compile"], r["status"]) for r in runs] == [("False", "completed"), ("True", "completed")]
    assert all(0 < float(r["mfu"]) < 1 for r in runs)
    (one, _) = read_csv(tmp_path / "out" / "gpu_trials.csv")
    assert one["gpus"] == "1" and float(one["per_gpu_h"]) > 0
    assert f"# GPU bench: {torch.cuda.get_device_name()}, " in (tmp_path / "out" / "gpu.md").read_text()
