"""``ablate bench``: forward+backward time of the attention backends and of every scaling variant, then of the
Transformer against its recurrent baselines (lstm, gru) at equal parameters over sequence lengths.

Attention: one step of ``attn(x).sum().backward()`` on a self-attention layer (projections included). Models: one
training step's forward and backward (cross-entropy of a language model) of the whole model, at a fixed batch of
sequences, so tokens per step grow with the length as in a study. Both after warm-up, as the median of repeats
taken round-robin over the cases so that load from other processes hits every case alike. torch uses as many
threads as this process may run on, except for the models on the CPU: one (``kinds_bench`` says why).

``--gpu`` (``gpu_bench``): the device's matmul peak, model FLOP utilisation of one large run, and trials per hour
of a study, each in a function that takes its device and sizes, so that the tests run the same path on a CPU.
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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ablate import budget, names
from ablate.config import SCALINGS, ConfigError, ModelConfig, RunConfig, run_config_from
from ablate.model import MultiHeadAttention, build_model, count_params, pick_device

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
    training step of ``batch`` sequences; time and training FLOPs per token (``budget.flops_per_sequence``)."""
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
                             flops_per_token=budget.flops_per_sequence(configs[kind], vocab_size, T) // T,
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
        flops = budget.crossover_length(dataclasses.replace(cfg, kind=kind), vocab_size, lengths[-1])
        lines.append(f"- {kind}: measured, {measured}; by FLOPs (``budget.crossover_length``), from length {flops}")
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
              f"Language models at equal parameters (``budget.rnn_hidden_size``): the transformer has width "
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


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _write(out: Path, stem: str, fields: tuple[str, ...], rows: list[dict], text: str) -> None:
    _write_csv(out / f"{stem}.csv", fields, rows)
    (out / f"{stem}.md").write_text(text)
    print(text + f"\nwrote {out / f'{stem}.csv'} and {out / f'{stem}.md'}")


# ---------------------------------------------------------------------------------------------------------------
# On a GPU: the matmul peak, model FLOP utilisation of one large run, trials per hour of a study


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """What ``ablate bench --gpu`` measures, and at which sizes (the tests shrink every size to run the same path in
    seconds on a CPU)."""

    matmul_sizes: tuple[int, ...] = (2048, 4096, 8192)
    """n of the n x n x n matmuls timed; the fastest size's rate is the device's peak."""
    matmul_repeats: int = 10
    matmul_inner: int = 10
    """Matmuls queued between two syncs: one sync per ``inner`` matmuls keeps launch latency out of the rate."""
    width: int = 1024
    """The large run's ``embed_dim`` (heads of 64 dimensions, ``LARGE_RUN``'s 8 layers)."""
    large_run: tuple[str, ...] = ()
    """Overrides (``key=value``) of ``LARGE_RUN`` after the width: tests shrink the run with them."""
    compile: tuple[bool, ...] = (False, True)
    study: str = "studies/gpu.yaml"
    window_s: float = 180.0
    """Seconds each way of running the study takes new trials (running ones finish, and count)."""
    workers: tuple[int | str, ...] = (1, "auto")
    study_overrides: tuple[str, ...] = ()
    trials: int | None = None
    """Stop after this many trials in each window (tests); None: the window alone ends it."""
    batched: int = 8
    """Runs of the study's base trained one after another, then together (``ablate.together``)."""


LARGE_RUN = {  # gpu.yaml's task at a longer context; the width and heads come from GpuPlan.width
    "task": {"name": "charlm", "source": "python-docs", "seq_len": 512},
    "model": {"num_layers": 8, "position": "learned"},
    "train": {"steps": 300, "batch_size": 64, "lr": 3e-4, "warmup_steps": 30, "log_every": 10, "eval_every": 300,
              "eval_batches": 2, "precision": "bf16"},
}  # fmt: skip
MFU_TARGET = 0.35  # one width-1024 bf16 run on an H100 (issue 14)
TRIALS_TARGET = 5.0  # trials per GPU-hour of the best way over one worker (issue 14)
MATMUL_FIELDS = ("dtype", "n", "ms", "tflops")
MFU_FIELDS = ("width", "layers", "params", "compile", "precision", "status", "steps", "tokens_per_step",
              "flops_per_token", "step_ms", "tokens_per_s", "tflops", "mfu", "warmup_s", "run_tokens_per_s",
              "peak_mem_mb")  # fmt: skip
TRIALS_FIELDS = ("way", "workers", "gpus", "trials", "wall_s", "trials_per_h", "per_gpu_h", "vs_one")
BATCHED_FIELDS = ("way", "runs", "statuses", "wall_s", "trials_per_h", "vs_sequential", "note")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def matmul_peak(device: torch.device, sizes: tuple[int, ...], dtypes: tuple[str, ...] = ("bf16", "fp32"),
                repeats: int = 10, inner: int = 10) -> list[dict]:  # fmt: skip
    """Median time of ``inner`` back-to-back n x n @ n x n matmuls per size and dtype (after a warm-up of as many),
    as rows with TFLOP/s (2 n^3 FLOPs each). fp32 runs at torch's matmul precision (``highest``: no TF32)."""
    rows = []
    for name in dtypes:
        for n in sizes:
            a, b = (torch.randn(n, n, device=device, dtype=DTYPES[name]) for _ in range(2))
            ms = time_cases({"mm": _matmuls(a, b, inner)}, device, repeats, 1)["mm"] / inner
            rows.append(dict(dtype=name, n=n, ms=_sig(ms), tflops=_sig(2 * n**3 / ms / 1e9)))
    return rows


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (a CPU's tiny matmul rounds to 0 at fixed decimals)."""
    return float(f"{x:.{digits}g}")


def _matmuls(a: torch.Tensor, b: torch.Tensor, inner: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(inner):
            a @ b  # (n, n) x (n, n); the result is dropped and its memory reused

    return run


def peak_flops(rows: list[dict], dtype: str) -> float:
    """FLOP/s of the fastest size timed in ``dtype``."""
    return 1e12 * max(r["tflops"] for r in rows if r["dtype"] == dtype)


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model FLOP utilisation: the model's FLOPs per token (``budget.flops_per_sequence`` / seq_len: every matmul,
    forward and backward, attention over the full T x T as PaLM counts it) times tokens per second, over ``peak``."""
    return flops_per_token * tokens_per_s / peak


class _Windows:
    """A train callback that keeps what the trainer reports: its derived values and each log window's
    ``perf/tokens_per_s``."""

    def __init__(self) -> None:
        self.derived: dict = {}
        self.windows: list[tuple[int, float]] = []  # (last step of the window, tokens per second over it)

    def on_start(self, start: Any) -> None:  # train.RunStart
        self.derived = start.derived

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.windows.append((step, metrics[names.TOKENS_PER_S]))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_end(self, result: Any) -> None:
        pass


def steady_state(windows: list[tuple[int, float]], tokens_per_step: int) -> tuple[float, float]:
    """Seconds of a steady step (the median of every log window but the first) and the first window's seconds
    beyond as many steady steps: the warm-up, which with ``train.compile`` holds the compilation."""
    ends = [s for s, _ in windows]
    steps = [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]
    seconds = [n * tokens_per_step / tps for n, (_, tps) in zip(steps, windows, strict=True)]
    later = [s / n for s, n in zip(seconds[1:], steps[1:], strict=True)] or [seconds[0] / steps[0]]
    step_s = statistics.median(later)
    return step_s, max(0.0, seconds[0] - steps[0] * step_s)


def large_run_config(width: int, compile: bool, device: torch.device, overrides: tuple[str, ...] = ()) -> RunConfig:
    """``LARGE_RUN`` at ``width`` (heads of 64, at least one), on ``device``, compiled or not, then ``overrides``."""
    heads = max(1, width // 64)
    data = {**LARGE_RUN, "model": {**LARGE_RUN["model"], "embed_dim": width, "num_heads": heads},
            "train": {**LARGE_RUN["train"], "device": device.type, "compile": compile}}  # fmt: skip
    return run_config_from(data, list(overrides), source="LARGE_RUN")


def mfu_row(config: RunConfig, peaks: dict[str, float]) -> dict:
    """Train ``config`` through ``train.train`` and measure its steady state from the trainer's own log windows;
    its MFU against ``peaks`` of its precision (bf16 or fp32: FLOP/s)."""
    from ablate.train import train

    seen = _Windows()
    result = train(config, [seen])
    if not seen.windows:
        raise RuntimeError(f"the large run ended before its first log window: {result.status} {result.reason}")
    tokens_per_step = config.train.batch_size * config.task.seq_len
    step_s, warmup_s = steady_state(seen.windows, tokens_per_step)
    tps = tokens_per_step / step_s
    fpt, peak = seen.derived["flops_per_token"], peaks[seen.derived["precision"]]
    m = result.metrics
    return dict(width=config.model.embed_dim, layers=config.model.num_layers, params=seen.derived["params"],
                compile=config.train.compile, precision=seen.derived["precision"], status=result.status,
                steps=result.steps, tokens_per_step=tokens_per_step, flops_per_token=int(fpt),
                step_ms=round(1000 * step_s, 2), tokens_per_s=round(tps), tflops=round(fpt * tps / 1e12, 2),
                mfu=round(mfu(fpt, tps, peak), 4), warmup_s=round(warmup_s, 2),
                run_tokens_per_s=round(m[names.TOKENS_PER_S]), peak_mem_mb=round(m[names.PEAK_MEM_MB]))  # fmt: skip


def trials_per_hour(spec_path: str | Path, workers: int | str, seconds: float, root: Path,
                    overrides: tuple[str, ...] = (), trials: int | None = None) -> dict:  # fmt: skip
    """Run the study of ``spec_path`` afresh, its stores in ``root`` (empty stores already there are used), with
    ``workers`` taking trials for ``seconds``; finished trials (complete, diverged or pruned) per hour of the
    whole call, set-up and the last trials' finish included. Workers counted are those that ran a trial."""
    import optuna
    import yaml

    from ablate.families import load_specs
    from ablate.study import run_study

    root.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(Path(spec_path).read_text())
    data.update(storage=f"sqlite:///{root / 'optuna.db'}", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    copy = root / Path(spec_path).name
    copy.write_text(yaml.safe_dump(data, sort_keys=False))
    start = time.perf_counter()
    if run_study(copy, trials=trials, workers=workers, timeout=seconds, overrides=list(overrides), report=False) == 130:
        raise KeyboardInterrupt  # the study handed its trials back: the bench stops too
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=data["name"], storage=data["storage"])
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    ran = {t.user_attrs.get(names.ATTR_WORKER) for t in done}
    count = torch.cuda.device_count() if load_specs(copy, list(overrides))[0].base.train.device != "cpu" else 0
    gpus = count if workers == "auto" else min(int(workers), count)  # workers are dealt round-robin over GPUs
    per_h = 3600 * len(done) / wall
    return dict(way=f"workers {workers}", workers=len(ran), gpus=gpus, trials=len(done), wall_s=round(wall, 1),
                trials_per_h=round(per_h, 1), per_gpu_h=round(per_h / gpus, 1) if gpus else "", vs_one="")


def batched_configs(spec_path: str | Path, k: int, device: torch.device, overrides: tuple[str, ...] = ()) -> list:
    """``k`` runs of the study's base that differ in learning rate (spread over its ``train.lr`` range, log-evenly
    when it is log) and seed, on ``device``: what ``ablate.together`` may train as one model (its other nuisance
    values, weight decay in gpu.yaml, stay the base's)."""
    from ablate.config import with_values
    from ablate.families import load_specs

    spec = load_specs(spec_path, list(overrides))[0]
    lr = next((n for n in spec.nuisance if n.key == "train.lr"), None)
    return [with_values(spec.base, {"train.device": device.type, "train.seed": i,
                                    "train.lr": lr.value_at((i + 0.5) / k) if lr else spec.base.train.lr})
            for i in range(k)]  # fmt: skip


def batched_rows(configs: list[RunConfig]) -> list[dict]:
    """The same runs one after another (``train``) and together as one stacked model (``together.train_together``),
    each after an untimed warm-up of 10 steps; trials per hour of each. The trainer alone: no study runner, no
    MLflow, so compare the two rows with each other, not with the study's. One row saying why when not built."""
    from ablate.config import with_values
    from ablate.train import train

    try:
        from ablate.together import train_together
    except ImportError as err:
        return [dict(way="together", runs=len(configs), statuses="", wall_s="", trials_per_h="", vs_sequential="",
                     note=f"not built ({err})")]  # fmt: skip
    short = [with_values(c, {"train.steps": 10, "train.warmup_steps": 1, "train.eval_every": 10}) for c in configs]
    ways = {"one after another": lambda cs: [train(c) for c in cs],
            "together": lambda cs: train_together(cs, [() for _ in cs])}  # fmt: skip
    rows = []
    for way, fit in ways.items():
        fit(short)
        start = time.perf_counter()
        results = fit(configs)
        wall = time.perf_counter() - start
        statuses = sorted({r.status for r in results})
        rows.append(dict(way=way, runs=len(configs), statuses=" ".join(statuses), wall_s=round(wall, 1),
                         trials_per_h=round(3600 * len(results) / wall, 1), vs_sequential="", note=""))  # fmt: skip
    for r in rows:
        r["vs_sequential"] = round(r["trials_per_h"] / rows[0]["trials_per_h"], 2)
    return rows


def gpu_markdown(matmul: list[dict], runs: list[dict], trials: list[dict], batched: list[dict], header: str,
                 plan: GpuPlan) -> str:  # fmt: skip
    lines = [header, "", "## Matmul peak", "", "| dtype | n | ms | TFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['n']} | {r['ms']:.4g} | {r['tflops']:.4g} |" for r in matmul]
    lines += ["", "## Model FLOP utilisation of one large run", "",
              f"`LARGE_RUN` at width {plan.width} through `train()`; FLOPs per token are the trainer's own count "
              "(`budget.flops_per_sequence`: every matmul, forward and backward, 2 per multiply-add, attention over "
              "the full T x T as PaLM's appendix B counts it, causal or not). Steady state: the median of the "
              "trainer's log windows after the first; warm-up: the first window's time beyond as many steady steps "
              "(compilation, with compile on). MFU is against the matmul peak measured above in the run's "
              "precision.", "",
              "| width | layers | params | compile | precision | status | steps | tokens/step | FLOPs/token | step ms "
              "| tokens/s | TFLOP/s | MFU | warm-up s | run tokens/s | peak MB |",
              "|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {r['width']} | {r['layers']} | {r['params']:,} | {'on' if r['compile'] else 'off'} | "
              f"{r['precision']} | {r['status']} | {r['steps']} | {r['tokens_per_step']:,} | {r['flops_per_token']:,} "
              f"| {r['step_ms']:.2f} | {r['tokens_per_s']:,} | {r['tflops']:.1f} | {100 * r['mfu']:.1f}% | "
              f"{r['warmup_s']:.1f} | {r['run_tokens_per_s']:,} | {r['peak_mem_mb']:,} |" for r in runs]  # fmt: skip
    extra = f", overrides {' '.join(plan.study_overrides)}" if plan.study_overrides else ""
    lines += ["", f"## Trials per hour of `{plan.study}`", "",
              f"The study as written{extra}, afresh each way, taking trials for {plan.window_s:g} s (running ones "
              "finish and count); the whole call is timed, start-up included. More workers reach further into the "
              "queue, whose later variants differ in cost.", "",
              "| way | workers | GPUs | trials | wall s | trials/h | per GPU-h | vs one worker |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += ["| " + " | ".join(str(r[f]) for f in TRIALS_FIELDS) + " |" for r in trials]
    lines += ["", f"## Batched trials: {plan.batched} runs of the study's base, the trainer alone", "",
              "Learning rates spread over the study's range, seeds 0 to K-1, one after another (`train`), then "
              "together as one stacked model (`ablate.together`); no study runner and no MLflow, so the ratio is the "
              "figure to read (the study runner does not batch trials yet).", "",
              "| way | runs | statuses | wall s | trials/h | vs one after another | note |",
              "|---|---:|---|---:|---:|---:|---|"]  # fmt: skip
    lines += ["| " + " | ".join(str(r[f]) for f in BATCHED_FIELDS) + " |" for r in batched]
    lines += ["", "Targets (issue 14, stated for an H100):"]
    for r in runs:
        if r["width"] == 1024:
            ok = r["mfu"] >= MFU_TARGET
            lines.append(f"- {'ok  ' if ok else 'MISS'} MFU {100 * r['mfu']:.1f}% at width 1024, compile "
                         f"{'on' if r['compile'] else 'off'} (need >= {100 * MFU_TARGET:.0f}%)")  # fmt: skip
    ratios = [r["vs_one"] for r in trials if isinstance(r["vs_one"], float) and r["way"] != "workers 1"]
    if ratios:
        ok = max(ratios) >= TRIALS_TARGET
        lines.append(f"- {'ok  ' if ok else 'MISS'} trials per GPU-hour {max(ratios):.1f}x one worker at best "
                     f"(need >= {TRIALS_TARGET:g}x)")  # fmt: skip
    together = [r["vs_sequential"] for r in batched if r["way"] == "together" and r["vs_sequential"] != ""]
    if together:
        lines.append(f"- (trainer alone, not the study) {plan.batched} runs together: {together[0]:.1f}x the "
                     "trials per hour of one after another")  # fmt: skip
    return "\n".join(lines) + "\n"


def gpu_bench(out_dir: str | Path = "reports/bench", plan: GpuPlan = GpuPlan(), device: torch.device | None = None,
              scratch: Path | None = None) -> int:  # fmt: skip
    """Measure ``plan`` on ``device`` (default: the CUDA device; without one a ConfigError, before anything is
    written), print the tables and write ``gpu.md`` and ``gpu_{matmul,mfu,trials,batched}.csv``. The
    study's stores go to ``scratch``/<way> (default: a temporary folder, removed after)."""
    import tempfile

    if device is None:
        if not torch.cuda.is_available():
            raise ConfigError("--gpu", f"needs a CUDA device; torch {torch.__version__} (CUDA "
                                       f"{torch.version.cuda or 'none'}) sees none here")  # fmt: skip
        device = torch.device("cuda")
    torch.manual_seed(0)
    matmul = matmul_peak(device, plan.matmul_sizes, repeats=plan.matmul_repeats, inner=plan.matmul_inner)
    peaks = {dtype: peak_flops(matmul, dtype) for dtype in DTYPES}
    runs = [mfu_row(large_run_config(plan.width, c, device, plan.large_run), peaks) for c in plan.compile]
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the study's workers: auto sizes itself by the free memory
    trials = []
    with tempfile.TemporaryDirectory(prefix="ablate-bench-") as tmp:
        for i, workers in enumerate(plan.workers):
            trials.append(trials_per_hour(plan.study, workers, plan.window_s, Path(scratch or tmp) / str(i),
                                          plan.study_overrides, plan.trials))  # fmt: skip
    one = next((r for r in trials if r["way"] == "workers 1" and r["trials"]), None)
    for r in trials:
        if one is not None:
            key = "per_gpu_h" if r["per_gpu_h"] and one["per_gpu_h"] else "trials_per_h"
            r["vs_one"] = round(r[key] / one[key], 2)
    batched = batched_rows(batched_configs(plan.study, plan.batched, device, plan.study_overrides))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"# GPU bench: {name}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, "
              f"{time.strftime('%Y-%m-%d')}\n\nReproduce: `ablate bench --gpu --width {plan.width} --window "
              f"{plan.window_s:g}{'' if plan.study == GpuPlan.study else f' --study {plan.study}'}`")  # fmt: skip
    text = gpu_markdown(matmul, runs, trials, batched, header, plan)
    out = Path(out_dir)
    tables = {"matmul": (MATMUL_FIELDS, matmul), "mfu": (MFU_FIELDS, runs), "trials": (TRIALS_FIELDS, trials),
              "batched": (BATCHED_FIELDS, batched)}  # fmt: skip
    for stem, (fields, rows) in tables.items():
        _write_csv(out / f"gpu_{stem}.csv", fields, rows)
    (out / "gpu.md").write_text(text)
    print(text + f"\nwrote {out / 'gpu.md'} and gpu_matmul, gpu_mfu, gpu_trials, gpu_batched .csv beside it")
    return 0
