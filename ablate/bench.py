"""``ablate bench``: forward+backward time of the attention backends and of every scaling variant.

Measured as one step of ``attn(x).sum().backward()`` on a self-attention layer (projections included), after
warm-up, as the median of repeats taken round-robin over the cases so that load from other processes hits every
case alike. torch uses as many threads as this process may run on.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ablate.config import SCALINGS
from ablate.model import MultiHeadAttention, pick_device

# (batch, heads, length, head_dim, causal); the first is the shape the requirements are stated at
SHAPES = ((32, 8, 256, 16, True), (32, 8, 256, 16, False), (8, 4, 512, 32, True), (64, 4, 64, 32, True))
MIN_SPEEDUP = 3.0  # sdpa over manual at SHAPES[0]
MAX_SLOWDOWN = 1.15  # any scaling over sqrt, on sdpa, at SHAPES[0]
FIELDS = ("batch", "heads", "length", "head_dim", "causal", "impl", "scaling", "ms", "vs_sdpa_sqrt")


def _step(module: nn.Module, x: torch.Tensor, causal: bool, impl: str) -> Callable[[], None]:
    """One forward+backward of ``module`` on ``x``, gradients cleared outside the timed call."""
    mask = None
    if impl == "torch-mha" and causal:  # nn.MultiheadAttention wants the mask (True = blocked) even with is_causal
        T = x.size(1)
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)

    def run() -> None:
        if impl == "torch-mha":
            y = module(x, x, x, attn_mask=mask, is_causal=causal, need_weights=False)[0]
        else:
            y = module(x)[0]
        y.sum().backward()

    return run


def _cases(shape: tuple, device: torch.device) -> dict[tuple[str, str], Callable[[], None]]:
    B, H, T, D, causal = shape
    C = H * D
    x = torch.randn(B, T, C, device=device, requires_grad=True)
    modules: dict[tuple[str, str], nn.Module] = {
        ("sdpa", s): MultiHeadAttention(C, H, scaling=s, causal=causal, backend="sdpa") for s in SCALINGS
    }
    modules[("manual", "sqrt")] = MultiHeadAttention(C, H, causal=causal, backend="manual")
    modules[("torch-mha", "sqrt")] = nn.MultiheadAttention(C, H, batch_first=True)
    return {key: _step(m.to(device), x, causal, key[0]) for key, m in modules.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_cases(cases: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median milliseconds of each case; repeats interleaved across cases."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict = {key: [] for key in cases}
    for _ in range(repeats):
        for key, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(1000 * (time.perf_counter() - start))
    return {key: statistics.median(values) for key, values in times.items()}


def _rows(shape: tuple, medians: dict) -> list[dict]:
    B, H, T, D, causal = shape
    base = medians[("sdpa", "sqrt")]
    return [
        dict(batch=B, heads=H, length=T, head_dim=D, causal=causal, impl=impl, scaling=scaling,
             ms=round(ms, 2), vs_sdpa_sqrt=round(ms / base, 2))
        for (impl, scaling), ms in medians.items()
    ]


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """The stated requirements at SHAPES[0], each as (line, met)."""
    B, H, T, D, causal = SHAPES[0]
    at = {(r["impl"], r["scaling"]): r["ms"] for r in rows
          if (r["batch"], r["heads"], r["length"], r["head_dim"], r["causal"]) == SHAPES[0]}
    if not at:
        return []
    where = f"B={B} H={H} T={T} D={D} {'causal' if causal else 'bidirectional'}"
    speedup = at[("manual", "sqrt")] / at[("sdpa", "sqrt")]
    out = [(f"sdpa is {speedup:.1f}x manual at {where} (need >= {MIN_SPEEDUP:g}x)", speedup >= MIN_SPEEDUP)]
    for scaling in SCALINGS[1:]:
        ratio = at[("sdpa", scaling)] / at[("sdpa", "sqrt")]
        out.append((f"{scaling} on sdpa is {ratio:.2f}x sqrt (need <= {MAX_SLOWDOWN:g}x)", ratio <= MAX_SLOWDOWN))
    return out


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| shape (B, H, T, D) | mask | impl | scaling | ms | vs sdpa sqrt |"]
    lines.append("|---|---|---|---|---:|---:|")
    for r in rows:
        shape = f"{r['batch']}, {r['heads']}, {r['length']}, {r['head_dim']}"
        mask = "causal" if r["causal"] else "none"
        lines.append(f"| {shape} | {mask} | {r['impl']} | {r['scaling']} | {r['ms']:.2f} | {r['vs_sdpa_sqrt']:.2f} |")
    lines += ["", "Requirements (stated for a 2-core CPU; on a GPU these small shapes time kernel launches):"]
    lines += [f"- {'ok  ' if ok else 'MISS'} {text}" for text, ok in checks(rows)]
    return "\n".join(lines) + "\n"


def tracking_overhead(config_path: str | Path, out_dir: str | Path, repeats: int = 5) -> int:
    """Wall time of the same run with and without the MLflow tracker, ``repeats`` interleaved pairs after a warm-up
    of both (data caching and MLflow's table creation stay out); writes ``tracking.md``. Returns 0.

    The overhead is the median of the per-pair differences; the spread of the untracked runs is printed beside it,
    because on a shared machine it is often larger than the overhead itself."""
    import tempfile

    from ablate.config import load_run_config
    from ablate.tracking import MLflowTracker
    from ablate.train import train

    config, warm = load_run_config(config_path), load_run_config(config_path, ["train.steps=20"])
    plain, tracked = [], []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        train(warm)
        train(warm, [MLflowTracker(uri, "overhead")])
        for _ in range(repeats):  # interleaved, so machine load hits both alike
            start = time.perf_counter()
            train(config)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            train(config, [MLflowTracker(uri, "overhead")])
            tracked.append(time.perf_counter() - start)
    p = statistics.median(plain)
    extra = statistics.median(q - u for q, u in zip(tracked, plain, strict=True))
    per_step = 1000 * p / config.train.steps
    text = (f"# MLflow tracking overhead ({config_path} on {pick_device(config.train.device).type}, "
            f"{config.train.steps} steps, {per_step:.2f} ms a step with evaluations, {repeats} pairs)\n\n"
            f"Reproduce: `ablate bench --tracking {config_path}`\n\n"
            "| untracked s (median) | tracked - untracked s (median of pairs) | overhead | untracked spread |\n"
            "|---:|---:|---:|---:|\n"
            f"| {p:.3f} | {extra:+.3f} | {100 * extra / p:+.2f}% | {100 * (max(plain) - min(plain)) / p:.1f}% |\n")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking.md").write_text(text)
    print(text + f"\nwrote {out / 'tracking.md'}")
    return 0


def run_bench(out_dir: str | Path = "reports/bench", quick: bool = False) -> int:
    """Time every case, print the table, write ``bench.csv`` and ``bench.md`` under ``out_dir``. Returns 0."""
    device = pick_device()
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shapes, repeats, warmup = (SHAPES[:1], 7, 2) if quick else (SHAPES, 15, 3)
    try:
        rows = [row for shape in shapes for row in _rows(shape, time_cases(_cases(shape, device), device,
                                                                            repeats, warmup))]
    finally:
        torch.set_num_threads(previous)
    header = (f"# Attention forward+backward, median of {repeats} ({device.type}, {threads} threads, torch "
              f"{torch.__version__}, {platform.processor() or platform.machine()})\n\n"
              f"Reproduce: `ablate bench{' --quick' if quick else ''}`")
    text = markdown(rows, header)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    (out / "bench.md").write_text(text)
    print(text + f"\nwrote {out / 'bench.csv'} and {out / 'bench.md'}")
    return 0
