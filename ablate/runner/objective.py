"""One Optuna trial as one training run: the config from the trial's params, the MLflow tracker, pruning.

Every trial is enqueued with its nuisance values (``ablate.design.plan``); the objective only suggests them back so that
Optuna records them as params. A diverged run raises :class:`Diverged`, so Optuna records a FAIL (the report tells
diverged from failed by the ``status`` attr); its outcome for the verdicts is the uniform-guess loss. Every value is
in the study's outcome units (``spec.outcome``): val/loss and test/loss, or val/bpb and test/bpb.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import optuna

from ablate.core import names
from ablate.core.config import RunConfig, fmt, with_values
from ablate.core.interrupts import STOP_REQUESTED
from ablate.core.urls import redact_text
from ablate.design import plan, recovery
from ablate.design.spec import StudySpec


class Diverged(RuntimeError):
    """The trainer stopped a run whose loss blew up: a failed trial (the learning rate is too high), not a bug."""


class Objective:
    """Turns an Optuna trial into a config, trains it with the MLflow tracker and a pruning bridge, returns its
    validation outcome (val/loss, or val/bpb with ``outcome: bpb``).

    One trial at a time (``__call__``, for ``study.optimize``), or several of one architecture trained as one stacked
    model (``group``, ``training.together``): both prepare and conclude each trial alike, so its attrs, run and state
    are the same either way.
    """

    def __init__(self, spec: StudySpec, parent_run_id: str, tracking_uri: str, threads: int, lock: Any) -> None:
        self.spec, self.parent_run_id, self.tracking_uri = spec, parent_run_id, tracking_uri
        self.threads, self.lock = threads, lock
        self.numbers: list[int] = []  # the trials this worker is running: an interrupt hands them back

    def __call__(self, trial: optuna.Trial) -> float:
        from ablate.training.train import train

        self._take([trial])
        with self._reason(trial):
            config, callbacks = self.prepare(trial)
            return self.conclude(train(config, callbacks, self.spec.compute))

    def group(self, trials: list[optuna.Trial]) -> tuple[list[Callable[[], float]], BaseException | None]:
        """Trains ``trials`` together; for each, what ``__call__`` would have done: a call that returns its value or
        raises (``TrialPruned``, ``Diverged``, the error that ended it). Also the exception that ended the group, if
        any: the caller tells every trial first, then re-raises an interrupt."""
        from ablate.training.together import train_together

        self._take(trials)
        members, outcomes = [], {}
        for trial in trials:
            try:
                with self._reason(trial):
                    members.append((trial, *self.prepare(trial)))
            except Exception as err:
                outcomes[trial.number] = _raise(err)
        error = None
        try:
            if members:
                train_together([c for _, c, _ in members], [cbs for *_, cbs in members], self.spec.compute)
        except BaseException as err:  # members that ended before keep their results
            error = err
        for trial, _, (_, bridge) in members:
            ended = bridge.result is not None and bridge.result.status not in ("failed", "interrupted")
            outcomes[trial.number] = partial(self.conclude, bridge.result) if ended else _raise(error)
        return [partial(self._concluded, trial, outcomes[trial.number]) for trial in trials], error

    def config(self, params: dict[str, Any], attrs: dict[str, Any]) -> RunConfig:
        """The run config of a trial with ``params`` (scientific and nuisance values) and plan ``attrs``: also of a
        waiting trial, from its enqueued values, to see which trials can train together."""
        keys = [*self.spec.scientific, *(p.key for p in self.spec.nuisance)]
        values = {key: params[key] for key in keys if key in params}
        threads = self.spec.base.train.threads or self.threads
        return with_values(self.spec.base, {**values, "train.seed": self._seed(attrs), "train.threads": threads})

    def prepare(self, trial: optuna.Trial) -> tuple[RunConfig, list[Any]]:
        """The trial's config and its callbacks: the MLflow tracker, then the pruning bridge."""
        recovery.failpoint("trial:start")
        spec = self.spec
        params = {key: trial.suggest_categorical(key, list(values)) for key, values in spec.scientific.items()}
        params.update(self._nuisance(trial))
        tracker = self._tracker(trial, trial.user_attrs.get(names.ATTR_PHASE, "search"), params)
        config = self.config(params, trial.user_attrs)
        return config, [tracker, TrialBridge(trial, tracker, prune=spec.pruner != "none", outcome=spec.outcome)]

    def conclude(self, result: Any) -> float:
        """The trial's value, or why it has none: pruned (stopped), or ``Diverged``."""
        recovery.failpoint("trial:end")
        if result.status == "stopped":
            raise optuna.TrialPruned(result.reason)
        if result.status == "diverged":
            raise Diverged(result.reason)
        return result.metrics[names.val_metric(self.spec.outcome)]

    def _take(self, trials: list[optuna.Trial]) -> None:
        self.numbers = [t.number for t in trials]
        for trial in trials:
            trial.set_user_attr(names.ATTR_WORKER, recovery.worker_id())
        self.lock.release()  # the trials are ours now; other workers may take the next ones

    def _concluded(self, trial: optuna.Trial, outcome: Callable[[], float]) -> float:
        with self._reason(trial):
            return outcome()

    @contextlib.contextmanager
    def _reason(self, trial: optuna.Trial) -> Iterator[None]:
        """An error keeps its reason on the trial; a rerun retries it (``ablate.design.recovery``)."""
        try:
            yield
        except Exception as err:
            trial.set_user_attr(names.ATTR_REASON, redact_text(recovery.describe_reason(err))[:2000])
            raise

    def _seed(self, attrs: dict[str, Any]) -> int:
        return plan.seed_of(self.spec, attrs.get(names.ATTR_PHASE, ""), int(attrs.get(names.ATTR_POINT, -1)))

    def _tracker(self, trial: optuna.Trial, phase: str, params: dict[str, Any]) -> Any:
        """The trial's MLflow child run (created when training starts); records the trial's attrs first."""
        from ablate.stores.tracking import MLflowTracker

        variant, factor = self._variant(trial.user_attrs, params)
        for key, value in ((names.ATTR_PHASE, phase), (names.ATTR_VARIANT, variant), (names.ATTR_FACTOR, factor),
                           (names.ATTR_SEED, self._seed(trial.user_attrs))):  # fmt: skip
            trial.set_user_attr(key, value)
        tags = names.trial_tags(self.spec.name, self.spec.kind, trial.number, phase, variant, factor)
        return MLflowTracker(self.tracking_uri, self.spec.name, parent_run_id=self.parent_run_id,
                             run_name=names.trial_run_name(trial.number, phase, variant), tags=tags)  # fmt: skip

    def _nuisance(self, trial: optuna.Trial) -> dict[str, Any]:
        out = {}
        for p in self.spec.nuisance:
            if p.integer:
                out[p.key] = trial.suggest_int(p.key, int(p.low), int(p.high), log=p.log)
            else:
                out[p.key] = trial.suggest_float(p.key, p.low, p.high, log=p.log)
        return out

    def _variant(self, attrs: dict[str, Any], params: dict[str, Any]) -> tuple[str, str]:
        if names.ATTR_VARIANT in attrs and attrs.get(names.ATTR_PHASE) != "search":
            return attrs[names.ATTR_VARIANT], attrs.get(names.ATTR_FACTOR, "")
        changed = [k for k, values in self.spec.scientific.items() if params[k] != values[0]]
        name = ",".join(f"{k}={fmt(params[k])}" for k in changed) or "base"
        return name, ",".join(changed)


def outcome_of(result: Any, outcome: str) -> float | None:
    """A run's verdict score in ``outcome``'s units: what a completed run logged on test (``test/bpb``), a diverged
    run's uniform-guess loss on test, None for any other run. The study's trials and ``ablate.retune`` score alike."""
    if result.status == "completed":
        return result.metrics.get(names.test_metric(outcome))
    return uniform_of(result, outcome, "test") if result.status == "diverged" else None


def uniform_of(result: Any, outcome: str, split: str) -> float:
    """A uniform guess's score on ``split`` in ``outcome``'s units (NaN when the run never built its task)."""
    return names.in_outcome_units(result.uniform_loss, outcome, result.tokens_per_byte.get(split, math.nan))


def _raise(err: BaseException | None) -> Callable[[], float]:
    def again() -> float:
        raise err or RuntimeError("ended without a result")

    return again


class TrialBridge:
    """A train callback after the tracker: records the run id on the trial and reports each evaluation for pruning."""

    def __init__(self, trial: optuna.Trial, tracker: Any, prune: bool, outcome: str) -> None:
        self.trial, self.tracker, self.prune, self.outcome = trial, tracker, prune, outcome
        self.result: Any = None  # how the run ended (``on_end``)

    def on_start(self, start: Any) -> None:
        recovery.failpoint("trial:run")  # the MLflow run exists, the trial does not name it yet
        self.trial.set_user_attr(names.ATTR_RUN_ID, self.tracker.run_id)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if STOP_REQUESTED.is_set():  # a stop signal whose KeyboardInterrupt something swallowed
            raise KeyboardInterrupt("stop requested")

    def on_eval(self, step: int, metrics: dict[str, float]) -> bool:
        self.trial.report(metrics[names.val_metric(self.outcome)], step)  # what the trial's value will be
        return self.prune and self.trial.should_prune()

    def on_end(self, result: Any) -> None:
        self.result = result
        with contextlib.suppress(Exception):  # the tracker creates a run even when training failed early
            self.trial.set_user_attr(names.ATTR_RUN_ID, self.tracker.run_id)
        self.trial.set_user_attr(names.ATTR_STATUS, result.status)
        if result.status != "completed" and result.reason:
            self.trial.set_user_attr(names.ATTR_REASON, redact_text(result.reason)[:2000])
        uniform = uniform_of(result, self.outcome, "validation")  # a diverged tune run's ceiling, on val values
        if uniform == uniform:  # the ceiling of a learning-rate sensitivity (ablate.claims)
            self.trial.set_user_attr(names.ATTR_UNIFORM, float(uniform))
        outcome = outcome_of(result, self.outcome)  # a diverged run is the worst outcome, never a dropped one
        if outcome is not None and outcome == outcome:
            self.trial.set_user_attr(names.ATTR_OUTCOME, float(outcome))
