"""The one place that reaches into Optuna's private parts, so that an Optuna release that moves them breaks here,
loudly, and nowhere else (``missing()`` names what moved; a test calls it).

What the runner needs and Optuna's public API does not give:

- a trial's planned values before it has suggested them (``enqueue_trial`` keeps them in the system attr
  ``fixed_params``): a re-queued or grouped trial must be configured as planned;
- its storage id (``_trial_id``) and the study's storage (``_storage``), to end or take a trial that is not this
  process's ``study.ask``: a dead worker's trial is failed, a stopped one handed back, waiting ones taken as a group;
- the heartbeat thread ``study.optimize`` runs for its trial, for trials trained together.

Written against Optuna 5.0 (the lock's); ``missing()`` is what tells whether another release still fits.
"""

from __future__ import annotations

import contextlib
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

FIXED_PARAMS = "fixed_params"  # the system attr where enqueue_trial keeps a trial's planned values


def planned_params(trial: FrozenTrial) -> dict[str, Any]:
    """The values ``trial`` was enqueued with, and those it has suggested since (a trial that died before suggesting
    them has no params yet)."""
    return {**trial.system_attrs.get(FIXED_PARAMS, {}), **trial.params}


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    storage = study._storage
    return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def fail(study: optuna.Study, trial: FrozenTrial, attrs: dict[str, Any] | None = None) -> bool:
    """Mark a RUNNING ``trial`` FAIL (after setting ``attrs``); False when it had already finished (another worker
    got there first)."""
    try:
        for key, value in (attrs or {}).items():
            study._storage.set_trial_user_attr(trial._trial_id, key, value)
        return study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def take(study: optuna.Study, trial: FrozenTrial) -> optuna.Trial | None:
    """A WAITING ``trial`` made RUNNING and ours, as ``study.ask`` pops one; None when another worker took it."""
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        if study._storage.set_trial_state_values(trial._trial_id, state=TrialState.RUNNING):
            return optuna.Trial(study, trial._trial_id)
    return None


def heartbeat(study: optuna.Study, trial: optuna.Trial) -> contextlib.AbstractContextManager[Any]:
    """The heartbeat ``study.optimize`` keeps for its trial while it runs (a no-op without heartbeats)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def missing() -> list[str]:
    """What this module relies on and the installed Optuna lacks; empty when all is where it expects."""
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    study.enqueue_trial({"x": 1.0})
    waiting = study.get_trials(deepcopy=False)[0]
    out = []
    for owner, name in ((study, "_storage"), (study, "_study_id"), (waiting, "_trial_id")):
        if not hasattr(owner, name):
            out.append(f"{type(owner).__name__}.{name}")
    if waiting.system_attrs.get(FIXED_PARAMS) != {"x": 1.0}:
        out.append(f"the system attr {FIXED_PARAMS!r} of an enqueued trial")
    try:
        from optuna.storages._heartbeat import get_heartbeat_thread  # noqa: F401
    except ImportError:
        out.append("optuna.storages._heartbeat.get_heartbeat_thread")
    return out
