"""``ablate bench --gpu``: how much of a GPU a run and a study use, measured where it matters for this project.

- **Matmul peak**: the median rate of back-to-back n x n bf16 and fp32 matmuls at a few sizes; the fastest size is
  the device's peak in that precision, measured here rather than read off a datasheet, so that MFU compares the
  model with what this card, driver and torch reach.
- **MFU** (model FLOP utilisation, as PaLM's appendix B defines it): the model's FLOPs per token times the tokens
  per second of one large run (``LARGE_RUN`` at width 1024) trained through ``train.train``, over the matmul peak
  in the run's precision. FLOPs per token are the trainer's own count (``sizes.flops_per_sequence``): every
  matmul, forward and backward, 2 FLOPs per multiply-add, attention over the full T x T, causal or not; no
  recomputation counted (hardware FLOP utilisation would). Tokens per second are the median of the trainer's log
  windows after the first, so compilation and warm-up stay out of the rate and are reported apart.
- **Trials per GPU-hour** of a study (``studies/gpu.yaml``): the study as ``ablate study`` runs it, afresh, with
  1 and ``auto`` workers taking trials for a window of seconds; every finished trial (complete, pruned, or an
  Optuna FAIL: a diverged run is recorded as one) over the wall time of the whole call, set-up and the last
  trials' finish included, divided by the GPUs the workers were dealt. This is the figure a study's length depends
  on, which a faster step alone does not settle (start-up, evaluation, storage and idle GPUs all count).
- **K runs one after another or together**: the trainer alone (no study runner, no MLflow) on K runs of the
  study's base, sequential (``train``) and as one stacked model (``training.together``); only their ratio is read.

Each measurement is a function that takes its device and sizes (``GpuPlan``), so the tests run the same path on a
CPU in seconds.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
import yaml

from ablate.bench.speed import time_cases, write_csv
from ablate.core import names
from ablate.core.config import ConfigError, RunConfig, run_config_from, with_values
from ablate.design.families import load_specs
from ablate.runner.study import run_study
from ablate.training.together import train_together
from ablate.training.train import RunResult, RunStart, train


@dataclasses.dataclass(frozen=True)
class GpuPlan:
    """What ``ablate bench --gpu`` measures, and at which sizes (the tests shrink every size to run the same path in
    seconds on a CPU)."""

    matmul_sizes: tuple[int, ...] = (2048, 4096, 8192)
    """n of the n x n x n matmuls timed; the fastest size's rate is the device's peak."""
    matmul_repeats: int = 10
    """Timed repeats of each size and dtype; their median is the rate."""
    matmul_inner: int = 10
    """Matmuls queued between two syncs: one sync per ``inner`` matmuls keeps launch latency out of the rate."""
    width: int = 1024
    """The large run's ``embed_dim`` (heads of 64 dimensions, ``LARGE_RUN``'s 8 layers)."""
    large_run: tuple[str, ...] = ()
    """Overrides (``key=value``) of ``LARGE_RUN`` after the width: tests shrink the run with them."""
    compile: tuple[bool, ...] = (False, True)
    """The large run once per value of ``train.compile``: compilation's gain and its warm-up cost, side by side."""
    study: str = "studies/gpu.yaml"
    window_s: float = 180.0
    """Seconds each way of running the study takes new trials (running ones finish, and count)."""
    workers: tuple[int | str, ...] = (1, "auto")
    """One way of running the study per entry; the first ``1`` is the baseline the others are compared with."""
    study_overrides: tuple[str, ...] = ()
    """Overrides (``key=value``) of the study's base, for both the trials per hour and the batched runs."""
    trials: int | None = None
    """Stop after this many trials in each window (tests); None: the window alone ends it."""
    batched: int = 8
    """Runs of the study's base trained one after another, then together (``ablate.training.together``)."""


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
BATCHED_FIELDS = ("way", "runs", "statuses", "wall_s", "trials_per_h", "vs_sequential")
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
    """Model FLOP utilisation: the model's FLOPs per token (``sizes.flops_per_sequence`` / seq_len: every matmul,
    forward and backward, attention over the full T x T as PaLM counts it) times tokens per second, over ``peak``."""
    return flops_per_token * tokens_per_s / peak


class _LogWindows:
    """A train callback that keeps what the trainer reports: its derived values and each log window's
    ``perf/tokens_per_s``."""

    def __init__(self) -> None:
        self.derived: dict = {}
        self.windows: list[tuple[int, float]] = []  # (last step of the window, tokens per second over it)

    def on_start(self, start: RunStart) -> None:
        self.derived = start.derived

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.windows.append((step, metrics[names.TOKENS_PER_S]))

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        pass  # train.Callback's hook; the trainer keeps evaluations out of its log windows

    def on_end(self, result: RunResult) -> None:
        pass  # train.Callback's hook; mfu_row reads the result train returns


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
    seen = _LogWindows()
    result = train(config, [seen])
    if not seen.windows:
        raise RuntimeError(f"the large run ended before its first log window: {result.status} {result.reason}")
    tokens_per_step = config.train.batch_size * config.task.seq_len
    step_s, warmup_s = steady_state(seen.windows, tokens_per_step)
    tokens_per_s = tokens_per_step / step_s
    flops_per_token, peak = seen.derived["flops_per_token"], peaks[seen.derived["precision"]]
    return dict(width=config.model.embed_dim, layers=config.model.num_layers, params=seen.derived["params"],
                compile=config.train.compile, precision=seen.derived["precision"], status=result.status,
                steps=result.steps, tokens_per_step=tokens_per_step, flops_per_token=int(flops_per_token),
                step_ms=round(1000 * step_s, 2), tokens_per_s=round(tokens_per_s),
                tflops=round(flops_per_token * tokens_per_s / 1e12, 2),
                mfu=round(mfu(flops_per_token, tokens_per_s, peak), 4), warmup_s=round(warmup_s, 2),
                run_tokens_per_s=round(result.metrics[names.TOKENS_PER_S]),
                peak_mem_mb=round(result.metrics[names.PEAK_MEM_MB]))  # fmt: skip


def trials_per_hour(spec_path: str | Path, workers: int | str, seconds: float, root: Path,
                    overrides: tuple[str, ...] = (), trials: int | None = None) -> dict:  # fmt: skip
    """Run the study of ``spec_path`` afresh, its stores in ``root`` (empty stores already there are used), with
    ``workers`` taking trials for ``seconds``; finished trials (complete, pruned or FAIL, which a diverged run is)
    per hour of the whole call, set-up and the last trials' finish included. Workers counted are those that ran a
    trial."""
    root.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(Path(spec_path).read_text())
    data.update(storage=f"sqlite:///{root / 'optuna.db'}", tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    spec_copy = root / Path(spec_path).name  # the study as written, its stores in root
    spec_copy.write_text(yaml.safe_dump(data, sort_keys=False))
    start = time.perf_counter()
    code = run_study(spec_copy, trials=trials, workers=workers, timeout=seconds, overrides=list(overrides),
                     report=False)  # fmt: skip
    if code == 130:
        raise KeyboardInterrupt  # the study handed its trials back: the bench stops too
    wall = time.perf_counter() - start
    study = optuna.load_study(study_name=data["name"], storage=data["storage"])
    done = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    worker_ids = {t.user_attrs.get(names.ATTR_WORKER) for t in done}
    on_cpu = load_specs(spec_copy, list(overrides))[0].base.train.device == "cpu"
    visible = 0 if on_cpu else torch.cuda.device_count()
    gpus = visible if workers == "auto" else min(int(workers), visible)  # workers are dealt round-robin over GPUs
    per_h = 3600 * len(done) / wall
    return dict(way=f"workers {workers}", workers=len(worker_ids), gpus=gpus, trials=len(done), wall_s=round(wall, 1),
                trials_per_h=round(per_h, 1), per_gpu_h=round(per_h / gpus, 1) if gpus else "", vs_one="")


def batched_configs(spec_path: str | Path, k: int, device: torch.device, overrides: tuple[str, ...] = ()) -> list:
    """``k`` runs of the study's base that differ in learning rate (spread over its ``train.lr`` range, log-evenly
    when it is log) and seed, on ``device``: what ``training.together`` may train as one model (its other nuisance
    values, weight decay in gpu.yaml, stay the base's)."""
    spec = load_specs(spec_path, list(overrides))[0]
    lr = next((n for n in spec.nuisance if n.key == "train.lr"), None)
    return [with_values(spec.base, {"train.device": device.type, "train.seed": i,
                                    "train.lr": lr.value_at((i + 0.5) / k) if lr else spec.base.train.lr})
            for i in range(k)]  # fmt: skip


def batched_rows(configs: list[RunConfig]) -> list[dict]:
    """The same runs one after another (``train``) and together as one stacked model (``together.train_together``),
    each after an untimed warm-up of 10 steps; trials per hour of each. The trainer alone: no study runner, no
    MLflow, so compare the two rows with each other, not with the study's."""
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
                         trials_per_h=round(3600 * len(results) / wall, 1), vs_sequential=""))  # fmt: skip
    for r in rows:
        r["vs_sequential"] = round(r["trials_per_h"] / rows[0]["trials_per_h"], 2)
    return rows


def gpu_markdown(matmul: list[dict], runs: list[dict], trials: list[dict], batched: list[dict], header: str,
                 plan: GpuPlan) -> str:  # fmt: skip
    """``gpu.md``: the four tables, each under what it measures, then the targets met or missed."""
    lines = [header, "", "## Matmul peak", "", "| dtype | n | ms | TFLOP/s |", "|---|---:|---:|---:|"]
    lines += [f"| {r['dtype']} | {r['n']} | {r['ms']:.4g} | {r['tflops']:.4g} |" for r in matmul]
    lines += ["", "## Model FLOP utilisation of one large run", "",
              f"`LARGE_RUN` at width {plan.width} through `train()`; FLOPs per token are the trainer's own count "
              "(`sizes.flops_per_sequence`: every matmul, forward and backward, 2 per multiply-add, attention over "
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
              "together as one stacked model (`training.together`); no study runner and no MLflow, so the ratio is the "
              "figure to read (the study runner trains trials together as its `together` key says, so the trials "
              "per hour above include it).", "",
              "| way | runs | statuses | wall s | trials/h | vs one after another |",
              "|---|---:|---|---:|---:|---:|"]  # fmt: skip
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
    together = [r["vs_sequential"] for r in batched if r["way"] == "together"]
    if together:
        lines.append(f"- (trainer alone, not the study) {plan.batched} runs together: {together[0]:.1f}x the "
                     "trials per hour of one after another")  # fmt: skip
    return "\n".join(lines) + "\n"


def gpu_bench(out_dir: str | Path = "reports/bench", plan: GpuPlan = GpuPlan(), device: torch.device | None = None,
              scratch: Path | None = None) -> int:  # fmt: skip
    """Measure ``plan`` on ``device`` (default: the CUDA device; without one a ConfigError, before anything is
    written), print the tables and write ``gpu.md`` and ``gpu_{matmul,mfu,trials,batched}.csv``. The
    study's stores go to ``scratch``/<way> (default: a temporary folder, removed after)."""
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
    if one is not None:
        for r in trials:  # per GPU-hour where both used GPUs, else per hour (a CPU run)
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
        write_csv(out / f"gpu_{stem}.csv", fields, rows)
    (out / "gpu.md").write_text(text)
    print(text + f"\nwrote {out / 'gpu.md'} and gpu_matmul, gpu_mfu, gpu_trials, gpu_batched .csv beside it")
    return 0
