"""The MLflow side of a study, and what a study prints: the parent run, leftover runs, progress, the results table.

Optuna state -> MLflow status follows ``mlflow.optuna.MlflowStorage``: COMPLETE -> FINISHED, PRUNED -> KILLED,
FAIL -> FAILED. Every call names its run id (``MlflowClient``), never the fluent active run.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Param
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from ablate.core import names
from ablate.core.config import to_yaml
from ablate.design.spec import StudySpec
from ablate.stores.tracking import client_for, ensure_experiment

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class ParentRun:
    """The study's MLflow run: the study file and its sha256 as artifact and tag; trials are nested under it."""

    def __init__(self, tracking_uri: str, study_name: str, run_id: str) -> None:
        self.client, self.study_name, self.run_id = client_for(tracking_uri), study_name, run_id

    @classmethod
    def find_or_create(cls, tracking_uri: str, spec: StudySpec, setup_id: str) -> ParentRun:
        """The study's run: the one that a set-up of this Optuna study (``setup_id``) created before it died,
        else a new one. Never the run of an older, deleted study of the same name."""
        client = client_for(tracking_uri)
        experiment = client.get_experiment_by_name(spec.name)
        if experiment is not None:
            where = f"tags.`{names.TAG_ROLE}` = 'study' and tags.`{names.TAG_SETUP_ID}` = '{setup_id}'"
            found = client.search_runs([experiment.experiment_id], where, order_by=["attributes.start_time ASC"],
                                       max_results=1)  # fmt: skip
            if found:
                return cls(tracking_uri, spec.name, found[0].info.run_id)
        return cls.create(tracking_uri, spec, setup_id)

    @classmethod
    def create(cls, tracking_uri: str, spec: StudySpec, setup_id: str) -> ParentRun:
        client = client_for(tracking_uri)
        tags = {
            names.TAG_SETUP_ID: setup_id,
            names.TAG_STUDY: spec.name,
            names.TAG_ROLE: "study",
            names.TAG_KIND: spec.kind,
            names.TAG_SPEC_SHA256: spec.digest,
            **({names.TAG_FAMILY: spec.family} if spec.family else {}),
        }
        run = client.create_run(ensure_experiment(client, spec.name), run_name=spec.name, tags=tags)
        run_id = run.info.run_id
        client.log_text(run_id, spec.text, names.STUDY_ARTIFACT)
        client.log_text(run_id, f"{spec.digest}  {Path(spec.source).name}\n", f"{names.STUDY_ARTIFACT}.sha256")
        client.log_text(run_id, to_yaml(spec.base), names.BASE_CONFIG_ARTIFACT)
        for key, value in (("kind", spec.kind), ("points", spec.points), ("tune_seeds", spec.tune_seeds),
                           ("min_seeds", spec.min_seeds), ("max_seeds", spec.max_seeds), ("margin", spec.margin),
                           ("alpha", spec.alpha),
                           ("variants", len(spec.variants()))):  # fmt: skip
            client.log_param(run_id, f"study.{key}", value)
        return cls(tracking_uri, spec.name, run_id)

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def resume(self) -> None:
        self.client.update_run(self.run_id, status="RUNNING")

    def finish(self, done: bool) -> None:
        """FINISHED once every planned trial has run; KILLED when this invocation stopped early (resume later)."""
        self.client.set_terminated(self.run_id, "FINISHED" if done else "KILLED")


def trial_runs(client: Any, experiment_id: str, parent_id: str, number: int | None = None) -> dict[int, list[Any]]:
    """The study's child runs by trial number (from the run's trial tag, which exists from the run's creation on,
    so a run whose worker died before recording its id on the trial is still found)."""
    where = f"tags.`{names.TAG_ROLE}` = 'trial' and tags.`mlflow.parentRunId` = '{parent_id}'"
    if number is not None:
        where += f" and tags.`{names.TAG_TRIAL}` = '{number}'"
    out: dict[int, list[Any]] = {}
    for run in client.search_runs([experiment_id], filter_string=where, max_results=50_000):
        tag = run.data.tags.get(names.TAG_TRIAL, "")
        if tag.isdigit():
            out.setdefault(int(tag), []).append(run)
    return out


def end_trial_run(parent: ParentRun, trial: FrozenTrial, status: str, reason: str) -> None:
    """Give ``trial`` (whose worker died) its one run, ended ``status``: end it if RUNNING, create it if the
    worker died before creating it."""
    runs = trial_runs(parent.client, parent.experiment_id, parent.run_id, trial.number).get(trial.number, [])
    _settle(parent, trial, runs, status, reason)


def reconcile_runs(study: optuna.Study, parent: ParentRun) -> int:
    """Every trial that has ended has exactly one ended child run: runs left RUNNING by a dead worker are ended
    with their trial's status, and a trial killed before its run was created gets one (FAILED, with the reason).
    Returns how many runs were ended or created."""
    by_trial = trial_runs(parent.client, parent.experiment_id, parent.run_id)
    fixed = 0
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue  # a live worker's trial, or one whose heartbeat has not gone stale yet
        status = names.MLFLOW_OF_STATE.get(t.state.name, "FAILED")
        if t.user_attrs.get(names.ATTR_STATUS) in names.MLFLOW_STATUS:
            status = names.MLFLOW_STATUS[t.user_attrs[names.ATTR_STATUS]]
        runs = by_trial.get(t.number, [])
        if not runs or any(r.info.status == "RUNNING" for r in runs):
            _settle(parent, t, runs, status, f"run left {'RUNNING' if runs else 'uncreated'}; "
                    f"its trial is {t.state.name}")  # fmt: skip
            fixed += 1
    return fixed


def _settle(parent: ParentRun, trial: FrozenTrial, runs: list[Any], status: str, reason: str) -> None:
    client = parent.client
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, names.TAG_STATUS, trial.user_attrs.get(names.ATTR_STATUS, names.FAILED))
            client.set_tag(run.info.run_id, names.TAG_REASON, reason)
            client.set_terminated(run.info.run_id, status)
    if runs:
        return
    a = trial.user_attrs
    phase, variant = a.get(names.ATTR_PHASE, ""), a.get(names.ATTR_VARIANT, "")
    kind = client.get_run(parent.run_id).data.tags.get(names.TAG_KIND, "")
    tags = {**names.trial_tags(parent.study_name, kind, trial.number, phase, variant, a.get(names.ATTR_FACTOR, "")),
            names.TAG_STATUS: a.get(names.ATTR_STATUS, names.FAILED), names.TAG_REASON: reason,
            "mlflow.parentRunId": parent.run_id}  # fmt: skip
    run = client.create_run(parent.experiment_id, run_name=names.trial_run_name(trial.number, phase, variant),
                            tags=tags)
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in trial.params.items()])
    client.set_terminated(run.info.run_id, status)


def describe(t: FrozenTrial, value_name: str) -> str:
    """One line per finished trial; ``value_name`` says what its value is (``val/loss``, ``val/bpb (bits per
    byte)``)."""
    a = t.user_attrs
    value = f"{value_name} {t.value:.4f}" if t.value is not None else a.get(names.ATTR_STATUS, "")
    took = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else 0
    where = f"{a.get(names.ATTR_PHASE, '')} {a.get(names.ATTR_VARIANT, '')} #{a.get(names.ATTR_POINT, '-')}"
    return f"trial {t.number:>4} {t.state.name:<8} {where:<40} {value}  ({took:.0f}s)"


class Monitor:
    """A progress bar of finished trials with the best value so far, and one line per finished trial.

    It polls the storage from a thread, so it sees the trials of every worker process alike.
    """

    def __init__(self, study: optuna.Study, total: Callable[[list[FrozenTrial]], int | None], value_name: str,
                 every_s: float = 2.0) -> None:  # fmt: skip
        self.study, self.total, self.value_name, self.every_s = study, total, value_name, every_s
        self._stop = threading.Event()
        trials = study.get_trials(deepcopy=False)
        self._seen: set[int] = {t.number for t in trials if t.state in FINISHED}
        self.bar = tqdm(total=total(trials), initial=len(self._seen), desc=study.study_name, unit="trial",
                        dynamic_ncols=True)  # fmt: skip
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()
        self.bar.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.poll()
            except Exception as err:  # a busy SQLite file must not kill the bar; the next poll retries
                tqdm.write(f"(progress: {type(err).__name__})")

    def poll(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        total = self.total(trials)
        if total:
            self.bar.total = max(total, len(trials))  # the plan grows as it brackets and adds seeds
        for t in trials:
            if t.state in FINISHED and t.number not in self._seen:
                self._seen.add(t.number)
                tqdm.write(describe(t, self.value_name))
                self.bar.update(1)
        done = [t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        if done:
            self.bar.set_postfix(best=f"{min(done):.4f}")


def print_results(spec: StudySpec, study: optuna.Study) -> None:
    """Until a report exists (and in the log): per variant, the seed-phase outcome (test/loss or test/bpb; a diverged
    run at the uniform guess's), mean ± std (n), and the best tune run's value (val/loss or val/bpb)."""
    test, val = names.outcome_label(spec.outcome), names.outcome_label(spec.outcome, "val")
    trials = study.get_trials(deepcopy=False)
    print(f"\nStudy {spec.name} ({spec.kind}): {len(trials)} trials, "
          f"{sum(t.state == TrialState.COMPLETE for t in trials)} complete")  # fmt: skip
    if spec.kind == "search":
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        for t in sorted(done, key=lambda t: t.value)[:5]:
            print(f"  {val} {t.value:.4f}  {t.params}")
        return
    header = f"seed-phase {test}"
    width = max(22, len(header))
    print(f"  {'variant':<36} {header:>{width}} {'best tune val':>13}")
    for variant in spec.variants():
        mine = [t for t in trials if t.user_attrs.get(names.ATTR_VARIANT) == variant.name]
        seeds = [t.user_attrs[names.ATTR_OUTCOME] for t in mine
                 if t.user_attrs.get(names.ATTR_PHASE) == "seed" and names.ATTR_OUTCOME in t.user_attrs]
        tune = [t.value for t in mine if _is(t, "tune")]
        mean = _mean_std(seeds)
        best = f"{min(tune):.4f}" if tune else "-"
        print(f"  {variant.name:<36} {mean:>{width}} {best:>13}")


def _is(t: FrozenTrial, phase: str) -> bool:
    return t.state == TrialState.COMPLETE and t.user_attrs.get(names.ATTR_PHASE) == phase


def _mean_std(values: list[Any]) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f} ({len(values)})"
