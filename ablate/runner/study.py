"""Run (or resume) a study: an Optuna study whose trials are MLflow child runs of one parent run.

Set-up (parent run, first trials, markers) is idempotent and runs under the plan lock (``ablate.stores.storage``), so
processes starting together, or a rerun after a set-up killed at any point, converge on one parent run and one
plan. Workers drain the queue one trial at a time and, when it is empty, enqueue what the plan asks for next
(bracketing tune points, seeds); the same lock makes "is there a waiting trial? plan or take it" atomic across
machines, so a worker never starts an unplanned (sampled) trial.
Where it pays (``together``: on CUDA), a worker takes the first waiting trial together with later waiting ones of
the same architecture (a variant's first tune points, its seeds) and trains them as one stacked model
(``ablate.training.together``); each stays its own trial, run and state, told as ``study.optimize`` would tell it. Only
trials already in the queue are grouped, so the plan is the same: a bracketing step (one per variant at a time)
and a search's sampled trials run alone.
Trials that end without a result (an interrupt, a dead worker, an exception) go back in the queue by the rules of
``ablate.design.recovery``; a diverged run is a result: an Optuna FAIL (user attr ``status: diverged``; MLflow FAILED).
A pruned one is PRUNED (KILLED).
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from ablate.core import devices, names
from ablate.core.config import ConfigError
from ablate.core.interrupts import STOP_REQUESTED, handling, sigterm_as_interrupt
from ablate.core.urls import default_storage, default_tracking_uri, redact, runs_url
from ablate.design import plan, recovery
from ablate.design.families import load_specs
from ablate.design.preflight import data_lines, run_bytes
from ablate.design.spec import StudySpec
from ablate.design.study_file import check_workers
from ablate.runner.objective import Objective
from ablate.runner.study_setup import enqueue, on_dead_worker, open_study_storage, setup_study
from ablate.runner.trial_groups import take_alike, tell_together, together_size
from ablate.stores.storage import PlanLock, check_stores
from ablate.stores.study_runs import Monitor, ParentRun, print_results, reconcile_runs

POLL_S = 1.0
# After a stop signal, how long workers get to hand their trials back before they are killed (a killed worker's
# trial is handed back by the next start, or by another worker once its heartbeat is stale). Within the 30 s that
# Slurm (KillWait) and Kubernetes (terminationGracePeriodSeconds) wait by default before their SIGKILL.
STOP_GRACE_S = 20.0
MAX_GRACE_S = 3600.0
REPORT_CLAIM_S = 300.0  # workers finishing within this of each other write one report between them

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per finished trial comes from the Monitor
# An interrupt is a stop, said in one line by the runner: not Optuna's "Trial failed" warning with a traceback.
logging.getLogger("optuna.study._optimize").addFilter(
    lambda record: not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))
)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def run_study(
    spec_path: str | Path,
    *,
    trials: int | None = None,
    workers: int | None = None,
    storage: str | None = None,
    timeout: float | None = None,
    overrides: list[str] = (),
    report: bool = True,
    grace: float = STOP_GRACE_S,
    check_only: bool = False,
) -> int:
    """Run or resume the study in ``spec_path`` (each member in turn for a ladder or a list of budgets); the exit
    code (0 when every trial this invocation ran finished). After a stop signal (Ctrl-C, SIGTERM) workers get
    ``grace`` seconds to hand their trials back. ``check_only``: check the file and both stores, write nothing."""
    specs = load_specs(spec_path, overrides)  # every ConfigError, of every member, comes before any store exists
    workers = check_workers(specs[0].workers if workers is None else workers, "--workers")
    if trials is not None and trials < 1:
        raise ConfigError("--trials", f"must be >= 1, got {trials}")
    if not 0 < grace <= MAX_GRACE_S:
        raise ConfigError("--grace", f"must be in (0, {MAX_GRACE_S:.0f}] seconds, got {grace:g}")
    storage_url = storage or specs[0].storage or default_storage()
    tracking_uri = specs[0].tracking_uri or default_tracking_uri()
    check_stores(storage_url, tracking_uri)  # an unreachable or bad store: one line, before anything is written
    for line in dict.fromkeys(line for spec in specs for line in data_lines(spec)):
        print(f"ablate study: {line}")
    if check_only:
        print(f"ablate study: {spec_path}: {', '.join(s.name for s in specs)} checked; stores {redact(storage_url)} "
              f"and {redact(tracking_uri)} answer")  # fmt: skip
        return 0
    timeout = timeout if timeout is not None else specs[0].timeout
    deadline = time.time() + timeout if timeout else None
    code, reported = 0, False
    for spec in specs:
        target = WorkerTarget(str(spec_path), list(overrides), spec.name, storage_url, tracking_uri)
        one, reported = _run_one(spec, target, trials, deadline, workers, report, grace)
        code = max(code, one)
        if code == 130:
            return code
    if reported and specs[0].family:  # this worker wrote the last member's report: the family's is its too
        code = max(code, _family_report(specs[0], storage_url, tracking_uri))
    return code


@dataclass(frozen=True)
class WorkerTarget:
    """What a worker process needs to load its study: the file, the overrides, which study of it, the stores."""

    path: str
    overrides: list[str]
    name: str
    storage_url: str
    tracking_uri: str

    def spec(self) -> StudySpec:
        return next(s for s in load_specs(self.path, self.overrides, preflight=False) if s.name == self.name)


def _run_one(spec: StudySpec, target: WorkerTarget, trials: int | None, deadline: float | None, workers: int | str,
             report: bool, grace: float) -> tuple[int, bool]:  # fmt: skip
    """The exit code of running ``spec``'s study here, and whether this worker wrote its report."""
    storage_url, tracking_uri = target.storage_url, target.tracking_uri
    gpus = [] if spec.base.train.device == "cpu" else devices.gpu_free_bytes()
    need = run_bytes(spec.base) if gpus else 0
    together = together_size(spec, gpus, need, 1 if workers == devices.AUTO else int(workers))
    slots = devices.plan_slots(workers, need * together, gpus, devices.usable_cores(), spec.base.train.threads)
    interrupted = False
    STOP_REQUESTED.clear()
    with sigterm_as_interrupt(sigint=True):  # SIGTERM (kill, a scheduler) stops a study as Ctrl-C does
        study = setup_study(spec, storage_url, tracking_uri)
        parent = ParentRun(tracking_uri, spec.name, study.user_attrs[names.ATTR_PARENT_RUN_ID])
        before = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
        with PlanLock(storage_url, spec.name):
            reconcile_runs(study, parent)
            recovery.retry_failed(study)
        parent.resume()
        try:
            with Monitor(study, lambda trials: planned_size(spec, trials), names.outcome_label(spec.outcome, "val")):
                if len(slots) == 1:  # in this process, on the default device
                    work(target, trials, deadline, slots[0].threads, 0, together)
                else:
                    _spawn(target, trials, deadline, slots, together, grace)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            reconcile_runs(study, parent)
            parent.finish(done=not _pending(study))
    if interrupted:
        print("ablate study: stopped; its unfinished trials are back in the queue. Resume: the same command",
              file=sys.stderr)  # fmt: skip
        return 130, False
    print_results(spec, study)
    print(f"All runs: make ui, then {runs_url(parent.experiment_id, order_by=names.val_metric(spec.outcome))}")
    code = _exit_code(study, before)
    if not report:
        return code, False
    if skip := report_skip_reason(study, storage_url):
        print(f"ablate study: {skip}; the last worker to finish writes the report, or: ablate report {spec.name}")
        return code, False
    return max(code, _report(spec, storage_url, tracking_uri)), True


def report_skip_reason(study: optuna.Study, storage_url: str) -> str | None:
    """Why this worker leaves the report to another, or None: it writes it. Workers on other machines still running
    trials will write a fuller one, and of workers that finish together, one writes it: the first to claim this set
    of finished trials (``ATTR_REPORT_CLAIM``, under the plan lock). A claim older than ``REPORT_CLAIM_S`` is
    stale: running the study again (nothing left to do) writes the report again."""
    with PlanLock(storage_url, study.study_name):
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if running:
            return f"{len(running)} trials still run on other workers"
        finished = sorted(t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished())
        claim = hashlib.sha256(json.dumps(finished).encode()).hexdigest()[:16]
        seen = study.user_attrs.get(names.ATTR_REPORT_CLAIM, {})
        if seen.get("trials") == claim and time.time() - seen.get("at", 0) < REPORT_CLAIM_S:
            return "another worker is writing the report of these trials"
        study.set_user_attr(names.ATTR_REPORT_CLAIM, {"trials": claim, "at": time.time()})
    return None


def _exit_code(study: optuna.Study, before: set[int]) -> int:
    """1 when a trial of this invocation raised (a bug, not a diverged run): scripts and CI should notice."""
    failed = [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.number not in before and recovery.is_error(t)
    ]
    if failed:
        print(f"ablate study: trials {failed} failed with an error; their MLflow runs hold the reason", file=sys.stderr)
    return 1 if failed else 0


def planned_size(spec: StudySpec, trials: list[FrozenTrial]) -> int | None:
    """Trials the study will hold when done, as far as known now (None: a search bounded by time only)."""
    if spec.kind == "ablation":
        return plan.planned_size(spec, plan.results_of(trials))
    return max(spec.trials, len(trials)) if spec.trials else None


def _pending(study: optuna.Study) -> bool:
    states = (TrialState.WAITING, TrialState.RUNNING)
    return bool(study.get_trials(deepcopy=False, states=states))


# ---------------------------------------------------------------------------------------------------------------
# Workers


def _spawn(target: WorkerTarget, trials: int | None, deadline: float | None, slots: list[devices.Slot],
           together: int = 1, grace: float = STOP_GRACE_S) -> None:  # fmt: skip
    ctx = multiprocessing.get_context("spawn")  # no forked torch or SQLite state
    pending = []
    for i, slot in enumerate(slots):
        share = None if trials is None else trials // len(slots) + (i < trials % len(slots))
        if share == 0:
            continue
        args = (target, share, deadline, slot.threads, i, together)
        pending.append((ctx.Process(target=_worker_process, args=args, name=f"ablate-worker-{i}"), slot))
    for p, slot in pending:
        start_on(p, slot)
    procs = [p for p, _ in pending]
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        # Ctrl-C reached the workers too (one process group); SIGTERM reached only this process: pass it on.
        # Each worker puts its trial back in the queue and exits; one that hangs is killed after ``grace`` seconds.
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace  # one grace for all of them, not one each
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        raise


def start_on(process: multiprocessing.process.BaseProcess, slot: devices.Slot) -> None:
    """Start a spawned worker that sees only its slot's GPU: the child takes this process's environment as it is at
    start, so CUDA_VISIBLE_DEVICES is set for that moment alone."""
    if slot.device == "cpu":
        process.start()
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = slot.device
    try:
        process.start()
    finally:
        if before is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def _worker_process(*args: Any) -> None:
    """A spawned worker: SIGTERM is an interrupt; an interrupt ends the process quietly (exit 130)."""
    try:
        with sigterm_as_interrupt(sigint=True):
            work(*args)
    except KeyboardInterrupt:
        sys.exit(130)


def work(target: WorkerTarget, trials: int | None, deadline: float | None, threads: int, worker: int,
         together: int = 1) -> int:  # fmt: skip
    """One worker: take trials until the queue (ablation) or the budget (search) is used up. Returns trials run.
    With ``together`` > 1, up to that many waiting trials of one architecture at a time, trained as one model.

    An interrupt (Ctrl-C, SIGTERM) puts the worker's trials back in the queue, then re-raises."""
    spec = target.spec()  # run_study checked it on this machine
    storage_url, tracking_uri = target.storage_url, target.tracking_uri
    storage = open_study_storage(storage_url, spec, tracking_uri)
    study = optuna.load_study(study_name=spec.name, storage=storage, sampler=_sampler(spec, worker),
                              pruner=_pruner(spec))  # fmt: skip
    parent_run_id = study.user_attrs[names.ATTR_PARENT_RUN_ID]
    lock = PlanLock(storage_url, spec.name)
    objective = Objective(spec, parent_run_id, tracking_uri, threads, lock)
    on_dead = on_dead_worker(spec, tracking_uri)
    done = 0
    while (trials is None or done < trials) and (deadline is None or time.time() < deadline):
        if STOP_REQUESTED.is_set():
            raise KeyboardInterrupt("stop requested")
        with lock:
            fail_stale_trials(study)
            for trial in recovery.dead_trials(study, no_worker_s=3 * spec.heartbeat + 60):
                on_dead(study, trial)
            if not _has_work(spec, study):
                if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    break
                # Another worker's last trials: if its process died, the trial goes stale and is re-enqueued here.
                lock.release()
                time.sleep(POLL_S)
                continue
            objective.numbers = []
            size = together if trials is None else min(together, trials - done)
            group = take_alike(study, objective, size) if size > 1 else []
            try:
                if group:
                    tell_together(study, objective, group)
                else:  # one trial: the first waiting one, or a search's sampled one
                    study.optimize(objective, n_trials=1, catch=(Exception,))
            except optuna.exceptions.UpdateFinishedTrialError as err:  # failed as stale while alive (a pause)
                print(f"ablate study: {err}; its retry will run again", file=sys.stderr)
            except KeyboardInterrupt as err:
                # A second Ctrl-C must not cut the hand-back short.
                with handling((signal.SIGINT, signal.SIGTERM), signal.SIG_IGN):
                    for number in objective.numbers:
                        recovery.stop_trial(study, number, "interrupted", recovery.describe_reason(err))
                raise
        done += max(1, len(group))
    return done


def _has_work(spec: StudySpec, study: optuna.Study) -> bool:
    """A waiting trial, after enqueueing what the plan asks for next; or, for a search, budget left to sample."""
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    trials = study.get_trials(deepcopy=False)
    enqueue(study, plan.next_trials(spec, plan.results_of(trials)))
    if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        return True
    return spec.kind == "search" and len(trials) < (spec.trials or sys.maxsize)


def _sampler(spec: StudySpec, worker: int) -> optuna.samplers.BaseSampler:
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=worker)
    if spec.sampler == "halton" and spec.kind == "search":
        return optuna.samplers.QMCSampler(qmc_type="halton", scramble=True, seed=0)
    return optuna.samplers.RandomSampler(seed=worker)  # ablation: every value is enqueued, nothing is sampled


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    steps, every = spec.base.train.steps, spec.base.train.eval_every
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=len(spec.variants()), n_warmup_steps=every)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=every, max_resource=steps)
    return optuna.pruners.NopPruner()


def _family_report(spec: StudySpec, storage_url: str, tracking_uri: str) -> int:
    """The family's page, comparing its members' answers; like ``_report``, a failure here says how to retry."""
    from ablate.report import build_index, html
    from ablate.report.family import build_family_report

    try:
        path = build_family_report(spec.family, storage=storage_url, tracking_uri=tracking_uri)
        build_index([storage_url])
    except Exception as err:
        print(f"ablate study: the family report failed ({type(err).__name__}: {err}); retry: ablate report "
              f"{spec.family}", file=sys.stderr)  # fmt: skip
        return 1
    answer = html.summary_line(path.parent)
    print(f"\n{answer}\nReport: {path}")
    return 0


def _report(spec: StudySpec, storage_url: str, tracking_uri: str) -> int:
    """Write the report; the study's data stays valid when this fails, so say how to retry instead of raising."""
    from ablate.report import build_report, html

    try:
        path = build_report(spec.name, storage=storage_url, tracking_uri=tracking_uri)
    except Exception as err:
        print(f"ablate study: the report failed ({type(err).__name__}: {err}); retry: ablate report {spec.name}",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"\n{html.summary_line(path.parent)}\nReport: {path}")
    return 0
