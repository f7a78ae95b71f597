"""A study's set-up, the same for every process that starts it: its storage (heartbeats, a dead worker's trial
failed and re-queued), the plan digest that refuses a resume with another plan, the parent run and the first
trials, each step idempotent under the plan lock."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial

from ablate.core import names
from ablate.core.config import ConfigError, RunConfig, to_dict
from ablate.core.urls import redact
from ablate.design import plan, recovery
from ablate.design.spec import StudySpec
from ablate.stores.storage import PlanLock, open_storage
from ablate.stores.study_runs import ParentRun, end_trial_run

PLAN_DIGEST = "plan_digest"  # study user attr: what the plan depends on; a resume with another plan is refused
SETUP_DONE = "setup_done"  # study user attr, set once the parent run and the first trials exist


def open_study_storage(url: str, spec: StudySpec, tracking_uri: str) -> RDBStorage:
    """The storage; a trial whose worker went silent is failed, its MLflow run ended FAILED, and it is re-enqueued."""
    return open_storage(url, spec.heartbeat, on_dead_worker(spec, tracking_uri))


def on_dead_worker(spec: StudySpec, tracking_uri: str) -> Callable[[optuna.Study, FrozenTrial], None]:
    def on_dead(study: optuna.Study, trial: FrozenTrial) -> None:
        reason = "its worker stopped (no heartbeat, or its process is gone)"
        end_trial_run(ParentRun(tracking_uri, spec.name, study.user_attrs[names.ATTR_PARENT_RUN_ID]), trial,
                      "FAILED", reason)  # fmt: skip
        if int(trial.user_attrs.get(names.ATTR_ATTEMPT, 1)) <= recovery.MAX_RETRY:
            recovery.requeue(study, trial, reason)

    return on_dead


# Config fields added after plan digests were introduced: left out of the digest while at their default, so that a
# study set up by an earlier version still resumes (its plan is the same).
LATER_FIELDS = ("model.position", "task.eval_lengths", "model.kind", "model.rnn_hidden", "model.tie_head", "model.init",
                "task.tokenizer", "task.tokenizer_vocab")  # at their defaults, out of the digest: older stores resume


def _digest_base(base: RunConfig) -> dict:
    data, default = to_dict(base), to_dict(RunConfig())
    for key in LATER_FIELDS:
        section, field = key.split(".")
        if data[section].get(field) == default[section].get(field):
            data[section].pop(field, None)
    return data


def plan_digest(spec: StudySpec) -> str:
    """What the plan depends on (not comments or key order): a study resumed with another plan is refused."""
    first = [(p.phase, p.variant.name, p.point, p.params) for p in plan.first_trials(spec)]
    rules = [spec.points, spec.tune_seeds, spec.min_seeds, spec.max_seeds, spec.margin, spec.alpha,
             spec.max_extra_points, [(p.key, p.low, p.high, p.log) for p in spec.nuisance]]  # fmt: skip
    compute = [] if spec.compute is None else [[spec.compute.match, spec.compute.value]]  # none: digest as before
    outcome = [] if spec.outcome == "loss" else [["outcome", spec.outcome]]  # loss, the default: digest as before
    blob = json.dumps([spec.kind, _digest_base(spec.base), first, rules, *compute, *outcome], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def setup_study(spec: StudySpec, storage_url: str, tracking_uri: str) -> optuna.Study:
    """Create or load the study and finish its set-up: parent run, first trials, markers.

    Every step is idempotent and runs under the plan lock, so any number of processes starting together, or a
    rerun after a set-up killed at any point, converge on one parent run and one copy of the plan.
    """
    with PlanLock(storage_url, spec.name):
        # under the lock: a fresh SQLite file's schema is made once
        storage = open_study_storage(storage_url, spec, tracking_uri)
        try:
            study = optuna.create_study(storage=storage, study_name=spec.name, direction="minimize")
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=spec.name, storage=storage)
        recovery.failpoint("setup:created")
        if study.metric_names is None:  # the dashboard's name for the objective, also on a study made before this
            study.set_metric_names([names.val_metric(spec.outcome)])
        attrs = study.user_attrs
        digest = attrs.get(PLAN_DIGEST)
        if digest is not None and digest != plan_digest(spec):
            raise ConfigError("name", f"study {spec.name!r} in {redact(storage_url)} was created from another plan "
                              f"(base, values or points differ); change name, or delete it: optuna delete-study "
                              f"--study-name {spec.name} --storage {redact(storage_url)}", spec.source)  # fmt: skip
        if attrs.get(SETUP_DONE):
            return study
        if digest is None:
            study.set_user_attr(PLAN_DIGEST, plan_digest(spec))
        setup_id = attrs.get(names.ATTR_SETUP_ID) or uuid.uuid4().hex
        study.set_user_attr(names.ATTR_SETUP_ID, setup_id)
        if names.ATTR_PARENT_RUN_ID not in attrs:
            parent = ParentRun.find_or_create(tracking_uri, spec, setup_id)
            recovery.failpoint("setup:parent")
            study.set_user_attr(names.ATTR_PARENT_RUN_ID, parent.run_id)
        study.set_user_attr(names.ATTR_KIND, spec.kind)
        study.set_user_attr(names.ATTR_SPEC, json.loads(json.dumps(spec.data, default=str)))
        if spec.source:  # the index's "study" command names the file (studies/claims/... too)
            study.set_user_attr(names.ATTR_SOURCE, _relative(spec.source))
        if spec.family:  # the family page finds its members, and the file they came from, by these
            study.set_user_attr(names.ATTR_FAMILY, spec.family)
            study.set_user_attr(names.ATTR_MEMBER, spec.member)
            study.set_user_attr(names.ATTR_FAMILY_SPEC, json.loads(json.dumps(spec.family_data, default=str)))
        planned = {recovery.key_of(t) for t in study.get_trials(deepcopy=False)}
        enqueue(study, [p for p in plan.first_trials(spec) if p.key not in planned], failpoint="setup:enqueue")
        study.set_user_attr(SETUP_DONE, True)
    return study


def enqueue(study: optuna.Study, trials: list[plan.PlannedTrial], failpoint: str = "") -> None:
    for planned in trials:
        attrs = {
            names.ATTR_PHASE: planned.phase,
            names.ATTR_VARIANT: planned.variant.name,
            names.ATTR_FACTOR: planned.variant.factor,
            names.ATTR_POINT: planned.point,
        }
        study.enqueue_trial(planned.params, user_attrs=attrs)
        recovery.failpoint(failpoint)


def _relative(path: str) -> str:
    """``path`` relative to the working directory when it lies inside it (as a user types it), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else path
