"""The ``ablate`` command: train, study, report, bench, ui, dashboard. Bad input exits 2 with one line on stderr."""

from __future__ import annotations

import argparse
import sys

from ablate.core.config import ConfigError


def parser() -> argparse.ArgumentParser:
    """The ``ablate`` command's arguments (the docs' commands are checked against it)."""
    top = argparse.ArgumentParser(prog="ablate", description="Ablations of self-attention, tracked in MLflow.")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one configuration (a run config or a study file's base)")
    p.add_argument("config", help="YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("study", help="run (or resume) an Optuna study declared in a YAML file, then its report")
    p.add_argument("spec", help="studies/NAME.yaml")
    p.add_argument("--trials", type=int, default=None, help="stop after this many trials in this invocation")
    p.add_argument("--workers", type=_workers, default=None,
                   help="worker processes, or auto: one per core, or on each GPU as many as fit (default: the study "
                        "file's)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: $ABLATE_STORAGE or runs/optuna.db)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before workers stop taking trials")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--no-report", action="store_true",
                   help="skip the report at the end (workers of a cluster job; its report job writes it)")
    p.add_argument("--check", action="store_true",
                   help="check the study file and that both stores answer, write nothing (before queueing jobs)")
    p.add_argument("--grace", type=float, default=None, metavar="S",
                   help="seconds workers get to hand their trials back after a stop signal (default 20: within the "
                        "30 s Slurm and Kubernetes wait before SIGKILL)")

    p = sub.add_parser("report", help="write reports/<study>/index.html from the MLflow and Optuna stores")
    p.add_argument("studies", nargs="*", help="study names or studies/*.yaml files")
    p.add_argument("--all", action="store_true", help="every study in the store")
    p.add_argument("--storage", default=None)
    p.add_argument("--out", default="reports")

    p = sub.add_parser("bench", help="time attention backends and scaling variants, and the Transformer against "
                                      "LSTM and GRU over sequence lengths; writes reports/bench/")
    p.add_argument("--out", default="reports/bench")
    p.add_argument("--quick", action="store_true", help="a few shapes, few repeats")
    p.add_argument("--tracking", metavar="CONFIG", help="instead: MLflow overhead on the run CONFIG describes")
    p.add_argument("--gpu", action="store_true", help="instead, on a CUDA device: matmul peak, MFU of one large bf16 "
                                                      "run, trials per hour of --study with 1 and auto workers, 8 "
                                                      "runs of its base one after another and together")
    p.add_argument("--width", type=int, choices=(512, 1024), default=1024, help="--gpu: the large run's width")
    p.add_argument("--window", type=float, default=180.0, metavar="S",
                   help="--gpu: seconds each way of running the study takes new trials")
    p.add_argument("--study", default="studies/gpu.yaml", help="--gpu: the study whose trials per hour are timed")

    p = sub.add_parser("ui", help="open the MLflow UI on 127.0.0.1 against the local store")
    p.add_argument("--port", type=int, default=5000)

    p = sub.add_parser("dashboard", help="Optuna's dashboard on 127.0.0.1 against the study storage")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: $ABLATE_STORAGE or runs/optuna.db)")
    return top


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a number, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return _dispatch(args) or 0
    except ConfigError as err:
        print(f"ablate {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before work began (set-up, loading): nothing to hand back, nothing half-written
        print(f"ablate {args.command}: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int | None:
    if args.command == "train":
        from ablate.commands import train_from_file

        return train_from_file(args.config, args.overrides)
    if args.command == "study":
        from ablate.runner.study import run_study

        return run_study(
            args.spec,
            trials=args.trials,
            workers=args.workers,
            storage=args.storage,
            timeout=args.timeout,
            overrides=args.overrides,
            report=not args.no_report,
            check_only=args.check,
            **({} if args.grace is None else {"grace": args.grace}),
        )
    if args.command == "report":
        from ablate.report import report_command

        return report_command(args.studies, all_studies=args.all, storage=args.storage, out=args.out)
    if args.command == "bench":
        from ablate.bench.speed import run_bench, tracking_overhead

        if args.gpu:
            if args.window <= 0:
                raise ConfigError("--window", f"must be > 0 seconds, got {args.window:g}")
            from ablate.bench.gpu import GpuPlan, gpu_bench  # optuna, MLflow and the study runner: --gpu only

            return gpu_bench(args.out, GpuPlan(width=args.width, window_s=args.window, study=args.study))
        if args.tracking:
            return tracking_overhead(args.tracking, args.out)
        return run_bench(args.out, quick=args.quick)
    if args.command == "ui":
        from ablate.commands import open_ui

        return open_ui(args.port)
    if args.command == "dashboard":
        from ablate.commands import open_dashboard

        return open_dashboard(args.port, args.storage)
    return None


if __name__ == "__main__":
    sys.exit(main())
