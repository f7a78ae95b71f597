"""Trials that did not end in a result go back in the queue: one rule for interrupts, dead workers and errors.

A planned trial is known by its key (phase, variant, point). An attempt at a key that ends without a result (an
interrupt, a worker that stopped sending heartbeats, an exception) is an Optuna FAIL that keeps its reason; a copy
with the same params and plan attrs, numbered ``attempt + 1``, is enqueued, so the plan and the verdicts see the
latest attempt only (``plan.results_of``). Interrupts are always re-queued (a stop is not a failure); a dead worker
at once, up to ``MAX_RETRY`` times; an error at the next run of the study (fix the cause, rerun), up to
``MAX_RETRY`` times. A diverged run is a result and never retried.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablate.core import names, optuna_private

MAX_RETRY = 2  # attempts after the first for a key whose trials die or raise
PLAN_ATTRS = (names.ATTR_PHASE, names.ATTR_VARIANT, names.ATTR_FACTOR, names.ATTR_POINT)
FAILPOINT_ENV = "ABLATE_FAILPOINT"


def key_of(trial: FrozenTrial) -> tuple[str, str, int] | None:
    """A planned trial's key; None for a trial the sampler chose (a search's own trials)."""
    a = trial.user_attrs
    if a.get(names.ATTR_PHASE) not in ("tune", "seed", "arm"):
        return None
    return a[names.ATTR_PHASE], a.get(names.ATTR_VARIANT, ""), int(a.get(names.ATTR_POINT, -1))


def ended_by(trial: FrozenTrial) -> str:
    """How a FAIL ended: diverged (a result), interrupted (a stop), failed (an exception, its reason kept), or lost
    (its worker died: no status, no reason)."""
    a = trial.user_attrs
    return a.get(names.ATTR_STATUS) or ("failed" if names.ATTR_REASON in a else "lost")


def is_error(trial: FrozenTrial) -> bool:
    """A trial that raised: the bug or bad input a user must look at (exit 1)."""
    return trial.state == TrialState.FAIL and ended_by(trial) == "failed"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def requeue(study: optuna.Study, trial: FrozenTrial, reason: str) -> None:
    """Enqueue the next attempt at ``trial``'s key (its params and plan attrs; not its run, status or outcome)."""
    attrs = {k: trial.user_attrs[k] for k in PLAN_ATTRS if k in trial.user_attrs}
    attrs[names.ATTR_RETRY_OF] = trial.number
    attrs[names.ATTR_ATTEMPT] = int(trial.user_attrs.get(names.ATTR_ATTEMPT, 1)) + 1
    # The planned values: what was enqueued (a trial that died before suggesting them has no params yet).
    study.enqueue_trial(optuna_private.planned_params(trial), user_attrs=attrs)
    print(f"ablate study: trial {trial.number} ({reason}) goes back in the queue", flush=True)


def latest_attempts(trials: Iterable[FrozenTrial]) -> dict[tuple[str, str, int], FrozenTrial]:
    """The latest attempt at each planned key."""
    latest: dict[tuple[str, str, int], FrozenTrial] = {}
    for t in sorted(trials, key=lambda t: t.number):
        if (key := key_of(t)) is not None:
            latest[key] = t
    return latest


def current_attempts(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count, in trial order: the latest attempt at each planned key, and every sampled trial."""
    latest = {t.number for t in latest_attempts(trials).values()}
    return [t for t in sorted(trials, key=lambda t: t.number) if key_of(t) is None or t.number in latest]


def retry_failed(study: optuna.Study) -> list[int]:
    """At the start of a run: re-enqueue keys whose latest attempt ended in an error or an interrupt (bounded for
    errors). Returns the numbers of the trials retried; says which keys have used up their retries."""
    retried = []
    for t in latest_attempts(study.get_trials(deepcopy=False)).values():
        how = ended_by(t)
        if t.state != TrialState.FAIL or how == "diverged":
            continue
        attempt = int(t.user_attrs.get(names.ATTR_ATTEMPT, 1))
        reason = t.user_attrs.get(names.ATTR_REASON, how)
        if how != "interrupted" and attempt > MAX_RETRY:
            print(f"ablate study: trial {t.number} ended {how} {attempt} times, not retried: {reason}", flush=True)
            continue
        requeue(study, t, reason)
        retried.append(t.number)
    return retried


def stop_trial(study: optuna.Study, number: int, status: str, reason: str) -> bool:
    """Mark this worker's trial ``number`` as ended by ``status`` (unless it already ended with a result) and
    re-queue it. True when it was re-queued."""
    trial = optuna_private.trial_by_number(study, number)
    if trial.state == TrialState.RUNNING:
        if not optuna_private.fail(study, trial, {names.ATTR_STATUS: status, names.ATTR_REASON: reason}):
            return False  # it ended with a result while the stop was on its way
        trial = optuna_private.trial_by_number(study, number)
    elif trial.state != TrialState.FAIL or trial.user_attrs.get(names.ATTR_STATUS) not in (status, None):
        return False  # it ended with a result (complete, pruned, diverged) before the stop reached it
    if status == "interrupted" or int(trial.user_attrs.get(names.ATTR_ATTEMPT, 1)) <= MAX_RETRY:
        requeue(study, trial, reason)
        return True
    return False


def worker_gone(trial: FrozenTrial) -> bool:
    """A running trial whose worker was a process on this machine that no longer exists (killed outright: nothing
    handed its trial back). Another machine's worker is taken to be alive until its heartbeats stop."""
    host, _, pid = trial.user_attrs.get(names.ATTR_WORKER, "").rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def dead_trials(study: optuna.Study, no_worker_s: float) -> list[FrozenTrial]:
    """RUNNING trials whose worker is known to be gone, marked FAIL: its process on this host no longer exists
    (killed before its first heartbeat, which heartbeats cannot see), or it never said who it is ``no_worker_s``
    after it started (killed between Optuna's ask and the objective). Other machines' trials are left to heartbeats."""
    now, dead = datetime.datetime.now(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        unnamed = names.ATTR_WORKER not in t.user_attrs
        late = t.datetime_start is not None and (now - t.datetime_start).total_seconds() > no_worker_s
        if (worker_gone(t) or unnamed and late) and optuna_private.fail(study, t):
            dead.append(t)
    return dead





def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def failpoint(name: str) -> None:
    """The fault-injection tests' way to fail at an exact moment (set-up, a trial's start, its MLflow run, its
    end): ``$ABLATE_FAILPOINT=NAME`` dies here as a SIGKILL would; ``NAME=raise`` raises instead."""
    point, _, action = os.environ.get(FAILPOINT_ENV, "").partition("=")
    if not point or point != name:
        return
    if action == "raise":
        raise RuntimeError(f"failpoint {name}")
    os.kill(os.getpid(), signal.SIGKILL)


def describe_reason(err: Any) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
