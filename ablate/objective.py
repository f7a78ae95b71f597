"""One Optuna trial as one training run: the config from the trial's params, the MLflow tracker, pruning.

A seed-phase trial takes its nuisance values from its variant's best tune trial when it starts. A diverged run
raises :class:`Diverged`, so Optuna records a FAIL (the report tells diverged from failed by the ``status`` attr).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from ablate import names
from ablate.config import with_values
from ablate.spec import StudySpec, fmt

POLL_S = 1.0


class Diverged(RuntimeError):
    """The trainer stopped a run whose loss blew up: a failed trial (the learning rate is too high), not a bug."""


class NoTunePoint(RuntimeError):
    """Every tune trial of a seed trial's variant diverged or failed: there is no point to re-run."""


class Objective:
    """Turns an Optuna trial into a config, trains it with the MLflow tracker and a pruning bridge, returns val/loss."""

    def __init__(self, spec: StudySpec, study: optuna.Study, storage: Any, parent_run_id: str, tracking_uri: str,
                 threads: int, lock: Any) -> None:  # fmt: skip
        self.spec, self.study, self.storage = spec, study, storage
        self.parent_run_id, self.tracking_uri = parent_run_id, tracking_uri
        self.threads, self.lock = threads, lock

    def __call__(self, trial: optuna.Trial) -> float:
        self.lock.release()  # the trial is ours now; other workers may take the next one
        from ablate.train import RunResult, train

        spec, attrs = self.spec, trial.user_attrs
        params = {key: trial.suggest_categorical(key, list(values)) for key, values in spec.scientific.items()}
        phase = attrs.get(names.ATTR_PHASE, "search")
        try:
            params.update(self._seed_point(trial) if phase == "seed" else self._nuisance(trial))
        except NoTunePoint as err:  # still one FAILED child run per trial, saying why
            tracker = self._tracker(trial, phase, params)
            tracker.on_end(RunResult("failed", str(err)))
            TrialBridge(trial, tracker, prune=False).on_end(RunResult("failed", str(err)))
            raise
        tracker = self._tracker(trial, phase, params)
        seed = trial.user_attrs[names.ATTR_SEED]
        values = {**params, "train.seed": seed, "train.threads": spec.base.train.threads or self.threads}
        config = with_values(spec.base, values)
        result = train(config, [tracker, TrialBridge(trial, tracker, prune=spec.pruner != "none")])
        if result.status == "stopped":
            raise optuna.TrialPruned(result.reason)
        if result.status == "diverged":
            raise Diverged(result.reason)
        return result.metrics[names.VAL_LOSS]

    def _tracker(self, trial: optuna.Trial, phase: str, params: dict[str, Any]) -> Any:
        """The trial's MLflow child run (created when training starts); records the trial's attrs first."""
        from ablate.tracking import MLflowTracker

        variant, factor = self._variant(trial.user_attrs, params)
        seed = trial.user_attrs[names.ATTR_POINT] if phase == "seed" else self.spec.base.train.seed
        for key, value in ((names.ATTR_PHASE, phase), (names.ATTR_VARIANT, variant), (names.ATTR_FACTOR, factor),
                           (names.ATTR_SEED, seed)):  # fmt: skip
            trial.set_user_attr(key, value)
        tags = {names.TAG_STUDY: self.spec.name, names.TAG_ROLE: "trial", names.TAG_TRIAL: trial.number,
                names.TAG_KIND: self.spec.kind, names.TAG_PHASE: phase, names.TAG_VARIANT: variant,
                names.TAG_FACTOR: factor}  # fmt: skip
        return MLflowTracker(self.tracking_uri, self.spec.name, parent_run_id=self.parent_run_id,
                             run_name=f"{trial.number}-{phase}-{variant}", tags=tags)  # fmt: skip

    def _nuisance(self, trial: optuna.Trial) -> dict[str, Any]:
        out = {}
        for p in self.spec.nuisance:
            if p.integer:
                out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
            else:
                out[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
        return out

    def _seed_point(self, trial: optuna.Trial) -> dict[str, Any]:
        """The best tune point of this trial's variant, suggested as one-value ranges so it is recorded as params."""
        if all(p.key in trial.params for p in self.spec.nuisance):  # a retried seed trial keeps its point
            return {p.key: trial.params[p.key] for p in self.spec.nuisance}
        best = wait_for_best_tune(trial.study, trial.user_attrs[names.ATTR_VARIANT], self._run_waiting)
        trial.set_user_attr(names.ATTR_SOURCE_TRIAL, best.number)
        out = {}
        for p in self.spec.nuisance:
            value = best.params[p.key]
            suggest = trial.suggest_int if p.integer else trial.suggest_float
            out[p.key] = suggest(p.key, value, value, log=p.log)
        return out

    def _run_waiting(self, trial_id: int) -> None:
        """Take the WAITING trial ``trial_id`` (unless another worker just did) and run it to the end here."""
        storage = self.storage
        if not storage.set_trial_state_values(trial_id, TrialState.RUNNING):  # atomic: WAITING -> RUNNING once
            return
        trial = optuna.Trial(self.study, trial_id)
        with Heartbeat(storage, trial_id, self.spec.heartbeat):
            try:
                value = self(trial)
            except optuna.TrialPruned:
                self.study.tell(trial, state=TrialState.PRUNED)
            except Exception as err:
                print(f"ablate study: trial {trial.number} failed: {type(err).__name__}: {err}", file=sys.stderr)
                self.study.tell(trial, state=TrialState.FAIL)
            else:
                self.study.tell(trial, value)

    def _variant(self, attrs: dict[str, Any], params: dict[str, Any]) -> tuple[str, str]:
        if names.ATTR_VARIANT in attrs and attrs.get(names.ATTR_PHASE) != "search":
            return attrs[names.ATTR_VARIANT], attrs.get(names.ATTR_FACTOR, "")
        changed = [k for k, values in self.spec.scientific.items() if params[k] != values[0]]
        name = ",".join(f"{k}={fmt(params[k])}" for k in changed) or "base"
        return name, ",".join(changed)


def wait_for_best_tune(study: optuna.Study, variant: str, run_waiting: Callable[[int], None]) -> FrozenTrial:
    """The best completed tune trial of ``variant``, once all its tune trials have finished.

    A tune trial re-enqueued after a crash waits behind the seed trials (it got a later number); this worker
    runs it itself (``run_waiting(trial_id)``) rather than wait for a trial that only it could take.
    """
    while True:
        tune = [
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get(names.ATTR_PHASE) == "tune" and t.user_attrs.get(names.ATTR_VARIANT) == variant
        ]
        waiting = [t for t in tune if t.state == TrialState.WAITING]
        if waiting:
            run_waiting(waiting[0]._trial_id)
        elif any(t.state == TrialState.RUNNING for t in tune):
            fail_stale_trials(study)  # a dead worker's trial must not keep us waiting forever
            time.sleep(POLL_S)
        else:
            break
    done = [t for t in tune if t.state == TrialState.COMPLETE]
    if not done:
        raise NoTunePoint(f"no tune trial of {variant} completed (all diverged or failed): nothing to re-run")
    return min(done, key=lambda t: t.value)


class Heartbeat:
    """Heartbeats for a trial run outside ``study.optimize``, so that it too is failed and retried if we die."""

    def __init__(self, storage: Any, trial_id: int, every_s: float) -> None:
        self.storage, self.trial_id, self.every_s = storage, trial_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self) -> Heartbeat:
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class TrialBridge:
    """A train callback after the tracker: records the run id on the trial and reports each evaluation for pruning."""

    def __init__(self, trial: optuna.Trial, tracker: Any, prune: bool) -> None:
        self.trial, self.tracker, self.prune = trial, tracker, prune

    def on_start(self, start: Any) -> None:
        self.trial.set_user_attr(names.ATTR_RUN_ID, self.tracker.run_id)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        return None

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        self.trial.report(metrics[names.VAL_LOSS], step)
        return self.prune and self.trial.should_prune()

    def on_end(self, result: Any) -> None:
        with contextlib.suppress(Exception):  # the tracker creates a run even when training failed early
            self.trial.set_user_attr(names.ATTR_RUN_ID, self.tracker.run_id)
        self.trial.set_user_attr(names.ATTR_STATUS, result.status)
