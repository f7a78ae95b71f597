"""``ablate bench``: forward+backward time of the attention backends and of every scaling variant, then of the
Transformer against its recurrent baselines (lstm, gru) at equal parameters over sequence lengths.

Attention: one step of ``attn(x).sum().backward()`` on a self-attention layer (projections included). Models: one
training step's forward and backward (cross-entropy of a language model) of the whole model, at a fixed batch of
sequences, so tokens per step grow with the length as in a study. Both after warm-up, as the median of repeats
taken round-robin over the cases so that load from other processes hits every case alike. torch uses as many
threads as this process may run on, except for the models on the CPU: one (``kinds_bench`` says why).

``--gpu`` lives in ``ablate.bench.gpu``, which times with ``time_cases`` and writes with ``write_csv`` from here.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ablate.core import sizes
from ablate.core.config import SCALINGS, ModelConfig
from ablate.model.transformer import MultiHeadAttention, build_model, count_params, pick_device

# (batch, heads, length, head_dim, causal); the first is the shape the requirements are stated at
SHAPES = ((32, 8, 256, 16, True), (32, 8, 256, 16, False), (8, 4, 512, 32, True), (64, 4, 64, 32, True))
MIN_SPEEDUP = 3.0  # sdpa over manual at SHAPES[0]
MAX_SLOWDOWN = 1.15  # any scaling over sqrt, on sdpa, at SHAPES[0]
FIELDS = ("batch", "heads", "length", "head_dim", "causal", "impl", "scaling", "ms", "vs_sdpa_sqrt")
# The recurrent baseline: the default study's base model (rotary positions, so that every length runs), a language
# model over a text-sized vocabulary; batch of sequences and lengths full, then --quick
KINDS_MODEL = ModelConfig(position="rope")
KINDS_VOCAB = 96
KINDS_RUNS = {False: (8, (32, 64, 128, 256, 512, 1024, 2048, 4096), 3, 1), True: (8, (64, 256, 1024), 3, 1)}
KINDS_FIELDS = ("length", "batch", "kind", "hidden", "params", "ms", "us_per_token", "flops_per_token",
                "vs_transformer")  # fmt: skip


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

    from ablate.design.preflight import load_run_config
    from ablate.stores.tracking import MLflowTracker
    from ablate.training.train import train

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
    """Time every case, print the tables, write ``bench.csv`` and ``bench.md`` (attention), ``kinds.csv`` and
    ``kinds.md`` (the Transformer against the lstm and gru) under ``out_dir``. Returns 0."""
    device = pick_device()
    torch.manual_seed(0)
    shapes, repeats, warmup = (SHAPES[:1], 7, 2) if quick else (SHAPES, 15, 3)
    with _threads() as threads:
        rows = [row for shape in shapes for row in _rows(shape, time_cases(_cases(shape, device), device,
                                                                            repeats, warmup))]
    header = (f"# Attention forward+backward, median of {repeats} ({device.type}, {threads} threads, torch "
              f"{torch.__version__}, {platform.processor() or platform.machine()})\n\n"
              f"Reproduce: `ablate bench{' --quick' if quick else ''}`")
    _write(Path(out_dir), "bench", FIELDS, rows, markdown(rows, header))
    kinds_bench(out_dir, quick)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Self-attention against the recurrent baseline


def _train_step(model: nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    """A language model's forward, loss and backward on ``tokens`` (gradients accumulate: O(parameters))."""

    def run() -> None:
        logits = model(tokens)  # (B, T, vocab)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

    return run


def kinds_rows(lengths: tuple[int, ...], batch: int, repeats: int, warmup: int, device: torch.device,
               cfg: ModelConfig = KINDS_MODEL, vocab_size: int = KINDS_VOCAB) -> list[dict]:  # fmt: skip
    """Per length: the Transformer of ``cfg`` and the lstm and gru of equal parameter count, each timed over one
    training step of ``batch`` sequences; time and training FLOPs per token (``sizes.flops_per_sequence``)."""
    rows = []
    for T in lengths:
        tokens = torch.randint(0, vocab_size, (batch, T), device=device)
        configs = {kind: dataclasses.replace(cfg, kind=kind) for kind in ("transformer", "lstm", "gru")}
        models = {kind: build_model(c, vocab_size, T).to(device) for kind, c in configs.items()}
        medians = time_cases({k: _train_step(m, tokens) for k, m in models.items()}, device, repeats, warmup)
        for kind, ms in medians.items():
            rows.append(dict(length=T, batch=batch, kind=kind, hidden=getattr(models[kind], "hidden_size", ""),
                             params=count_params(models[kind]), ms=round(ms, 2),
                             us_per_token=round(1000 * ms / (batch * T), 3),
                             flops_per_token=sizes.flops_per_sequence(configs[kind], vocab_size, T) // T,
                             vs_transformer=round(ms / medians["transformer"], 2)))  # fmt: skip
    return rows


def measured_crossover(rows: list[dict], kind: str) -> int | None:
    """The shortest measured length from which on the Transformer takes longer per token than ``kind`` (at that
    length and at every longer one measured); None when it is the faster at the longest length."""
    us = {(r["kind"], r["length"]): r["us_per_token"] for r in rows}
    found = None
    for T in sorted({r["length"] for r in rows}, reverse=True):
        if us[("transformer", T)] <= us[(kind, T)]:
            break
        found = T
    return found


def kinds_markdown(rows: list[dict], header: str, cfg: ModelConfig = KINDS_MODEL,
                   vocab_size: int = KINDS_VOCAB) -> str:  # fmt: skip
    lines = [header, "", "| length | batch | kind | hidden | params | ms | us / token | FLOPs / token | vs "
                         "transformer |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['length']} | {r['batch']} | {r['kind']} | {r['hidden']} | {r['params']:,} | "
                     f"{r['ms']:.2f} | {r['us_per_token']:.3f} | {r['flops_per_token']:,} | "
                     f"{r['vs_transformer']:.2f} |")  # fmt: skip
    lengths = sorted({r["length"] for r in rows})
    lines += ["", "Crossover (where self-attention becomes the costlier per token):"]
    for kind in ("lstm", "gru"):
        at = measured_crossover(rows, kind)
        below = [T for T in lengths if at is not None and at > T]
        if at is None:
            measured = f"the transformer is faster per token at every length measured, up to {lengths[-1]}"
        elif not below:
            measured = f"the transformer is slower per token at every length measured, from {lengths[0]}"
        else:
            measured = f"the transformer is slower per token from length {at} on (faster at {below[-1]})"
        flops = sizes.crossover_length(dataclasses.replace(cfg, kind=kind), vocab_size, lengths[-1])
        lines.append(f"- {kind}: measured, {measured}; by FLOPs (``sizes.crossover_length``), from length {flops}")
    return "\n".join(lines) + "\n"


def kinds_bench(out_dir: str | Path = "reports/bench", quick: bool = False) -> list[dict]:
    """Time the Transformer against the lstm and gru, print the table, write ``kinds.csv`` and ``kinds.md``.

    On the CPU on one thread: a recurrent step's matmuls (batch x hidden) are too small to share between threads,
    and where other processes load the cores each op then waits on a late thread (with 2 threads on 2 loaded cores
    a gru's time per token spread 10-fold between repeats; on one thread under 10%). Times are per core."""
    device = pick_device()
    batch, lengths, repeats, warmup = KINDS_RUNS[quick]
    torch.manual_seed(0)
    with _threads(1 if device.type == "cpu" else None) as threads:
        rows = kinds_rows(lengths, batch, repeats, warmup, device)
    c = KINDS_MODEL
    header = (f"# Self-attention against a recurrent network: one training step (forward and backward), median of "
              f"{repeats} ({device.type}, {threads} threads, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()})\n\n"
              f"Language models at equal parameters (``sizes.rnn_hidden_size``): the transformer has width "
              f"{c.embed_dim}, {c.num_heads} heads, {c.num_layers} layers, rotary positions; the lstm and gru as many "
              f"layers; vocabulary {KINDS_VOCAB}, {batch} sequences a step.\n\n"
              f"Reproduce: `ablate bench{' --quick' if quick else ''}`")  # fmt: skip
    text = kinds_markdown(rows, header)
    _write(Path(out_dir), "kinds", KINDS_FIELDS, rows, text)
    return rows


class _threads:
    """torch on ``count`` threads (None: as many as this process may run on), restored after."""

    def __init__(self, count: int | None = None) -> None:
        self.count = count

    def __enter__(self) -> int:
        self.previous = torch.get_num_threads()
        threads = self.count or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                 else (os.cpu_count() or 1))  # fmt: skip
        torch.set_num_threads(threads)
        return threads

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.previous)


def write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    """``rows`` as a CSV of ``fields`` at ``path``, its folder made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write(out: Path, stem: str, fields: tuple[str, ...], rows: list[dict], text: str) -> None:
    write_csv(out / f"{stem}.csv", fields, rows)
    (out / f"{stem}.md").write_text(text)
    print(text + f"\nwrote {out / f'{stem}.csv'} and {out / f'{stem}.md'}")
