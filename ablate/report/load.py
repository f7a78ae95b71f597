"""A study's results as tidy pandas: Optuna trials joined to their MLflow child runs, one row per trial.

The Optuna storage says which trials exist and in what state; MLflow holds everything a run logged (the full
resolved config as params, final metrics, histories, artifacts). A trial whose run never started still gets a row.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow import MlflowClient

from ablate.core import names
from ablate.core.config import ConfigError, scalar
from ablate.core.urls import default_storage, default_tracking_uri, is_redacted, redact, sqlite_path
from ablate.design import recovery
from ablate.design.spec import StudySpec, spec_from_mapping
from ablate.design.study_file import check_name


@dataclass
class StudyData:
    """Everything the report shows about one study."""

    name: str
    kind: str  # "ablation" or "search"
    spec: StudySpec  # validated from the study file's mapping stored with the study, by the runner's own code
    storage: str
    tracking_uri: str
    study: optuna.Study
    trials: pd.DataFrame
    """One row per trial: trial, state, status, value, phase, variant, factor, seed, run_id, config keys
    ("model.num_heads", "train.lr", ...) and final metrics ("val/loss", "cost/params", ...)."""
    parent: dict = field(default_factory=dict)  # run_id, experiment_id, tags, dataset digests
    client: MlflowClient | None = None
    reruns: int = 0  # earlier attempts at a planned trial (interrupted, lost, failed) that were run again

    def history(self, run_id: str, key: str) -> pd.DataFrame:
        """A metric's history for one run: columns step, value (empty when the run or metric is missing)."""
        if not run_id or self.client is None:
            return pd.DataFrame(columns=["step", "value"])
        points = self.client.get_metric_history(run_id, key)
        return pd.DataFrame({"step": [p.step for p in points], "value": [p.value for p in points]})

    def artifact(self, run_id: str, path: str, dst: Path) -> Path | None:
        """Download one artifact of a run, or None when it was never logged."""
        if not run_id or self.client is None:
            return None
        try:
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except Exception:  # noqa: BLE001 - a missing artifact is a gap in the report, not an error
            return None


def parse_value(text: Any) -> Any:
    """MLflow params are strings: read them back as a study file's values ("8" -> 8, "1e-3" -> 0.001); "None" (how
    MLflow writes Python's None) -> None; text that is not YAML stays as it is."""
    if not isinstance(text, str):
        return text
    if text == "None":
        return None
    try:
        return scalar(text)
    except ConfigError:
        return text


def load_study(name: str, storage: str | None = None, tracking_uri: str | None = None) -> StudyData:
    """Load study ``name`` from Optuna ``storage`` and its MLflow experiment of the same name."""
    storage = checked_storage(storage)
    if name not in study_names(storage):
        raise ConfigError("report", f"no study named {name!r} in {redact(storage)}")
    study = optuna.load_study(study_name=name, storage=storage)
    attrs = study.user_attrs
    try:
        spec = spec_from_mapping(attrs.get(names.ATTR_SPEC) or {})
        spec = dataclasses.replace(spec, family=attrs.get(names.ATTR_FAMILY) or "",
                                   member=attrs.get(names.ATTR_MEMBER) or "")  # fmt: skip
    except ConfigError as err:
        raise err.at(f"study {name!r} (its stored study file)") from None
    tracking_uri = tracking_uri or _stored_uri(spec.tracking_uri, name) or default_tracking_uri()
    client = MlflowClient(tracking_uri=tracking_uri)
    runs = _child_runs(client, name)
    all_trials = study.get_trials(deepcopy=False)
    shown = recovery.current_attempts(all_trials)
    trials = _join(_optuna_trials(shown), runs)
    parent = _parent(client, name, attrs.get(names.ATTR_PARENT_RUN_ID))
    return StudyData(name, spec.kind, spec, storage, tracking_uri, study, trials, parent, client,
                     reruns=len(all_trials) - len(shown))  # fmt: skip


def _stored_uri(uri: str | None, name: str) -> str | None:
    """The study file's tracking URI, as stored (its password masked): usable unless it needed the password, in
    which case ``$MLFLOW_TRACKING_URI`` must give the real one."""
    if not is_redacted(uri):
        return uri
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("tracking_uri", f"study {name!r} was tracked at {uri}, stored without its password; "
                                          "set MLFLOW_TRACKING_URI to the full URL")  # fmt: skip
    return None


def completed(trials: pd.DataFrame) -> pd.DataFrame:
    """The runs that trained to the end with a final val/loss: the only ones a loss is read from."""
    if trials.empty:
        return trials
    return trials[(trials["status"] == "completed") & trials["value"].notna()]


def _optuna_trials(trials: list[optuna.trial.FrozenTrial]) -> pd.DataFrame:
    rows = []
    for t in trials:
        row = {
            "trial": t.number,
            "state": t.state.name,
            "value": t.value if t.state.name == "COMPLETE" else None,
            "phase": t.user_attrs.get(names.ATTR_PHASE, ""),
            "variant": t.user_attrs.get(names.ATTR_VARIANT, ""),
            "factor": t.user_attrs.get(names.ATTR_FACTOR, ""),
            "seed": t.user_attrs.get(names.ATTR_SEED),
            "run_id": t.user_attrs.get(names.ATTR_RUN_ID, ""),
            "attr_status": t.user_attrs.get(names.ATTR_STATUS),
            "outcome": t.user_attrs.get(names.ATTR_OUTCOME),
            "uniform_loss": t.user_attrs.get(names.ATTR_UNIFORM),
            "duration_s": t.duration.total_seconds() if t.duration else None,
            "intermediate": dict(t.intermediate_values),
        }
        row.update({f"optuna:{k}": v for k, v in t.params.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def _child_runs(client: MlflowClient, name: str) -> pd.DataFrame:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return pd.DataFrame()
    runs = client.search_runs([experiment.experiment_id], f"tags.`{names.TAG_ROLE}` = 'trial'", max_results=50000)
    rows = []
    for run in runs:
        tags = run.data.tags
        row = {"run_id": run.info.run_id, "mlflow_status": run.info.status, "run_name": run.info.run_name}
        row.update({key: parse_value(v) for key, v in run.data.params.items()})
        row.update(run.data.metrics)
        row.update({f"tag:{k}": v for k, v in tags.items()})
        row["_trial_tag"] = int(tags[names.TAG_TRIAL]) if str(tags.get(names.TAG_TRIAL, "")).isdigit() else None
        rows.append(row)
    return pd.DataFrame(rows)


def _join(trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Trials left-joined to runs by run id, or by the trial-number tag where a trial lost its run id."""
    if trials.empty:
        return trials
    if runs.empty:
        trials["status"] = _status(trials["attr_status"], trials["state"])
        return trials.drop(columns=["attr_status"])
    by_tag = runs.dropna(subset=["_trial_tag"]).set_index("_trial_tag")["run_id"]
    missing = trials["run_id"].isin(["", None])
    trials.loc[missing, "run_id"] = trials.loc[missing, "trial"].map(by_tag).fillna("")
    merged = trials.merge(runs.drop(columns=["_trial_tag"]), on="run_id", how="left")
    # Optuna's sampled values win over MLflow's strings; ablation attrs fall back to the run's tags.
    for col in [c for c in merged.columns if c.startswith("optuna:")]:
        key = col.removeprefix("optuna:")
        merged[key] = merged[col].combine_first(merged[key]) if key in merged else merged[col]
    for col, tag in (("phase", names.TAG_PHASE), ("variant", names.TAG_VARIANT), ("factor", names.TAG_FACTOR)):
        if f"tag:{tag}" in merged:
            merged[col] = merged[col].where(merged[col].astype(bool), merged[f"tag:{tag}"].fillna(""))
    tag = merged.get(f"tag:{names.TAG_STATUS}", pd.Series(index=merged.index, dtype=object))
    merged["status"] = _status(merged["attr_status"].where(merged["attr_status"].notna(), tag), merged["state"])
    if "seed" in merged and "train.seed" in merged:
        merged["seed"] = merged["seed"].combine_first(merged["train.seed"])
    return merged.drop(columns=[c for c in merged.columns if c.startswith("optuna:")] + ["attr_status"])


def _parent(client: MlflowClient, name: str, run_id: str | None) -> dict:
    run = None
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception:  # noqa: BLE001 - fall back to the tag search below
            run = None
    if run is None:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            found = client.search_runs(
                [experiment.experiment_id], f"tags.`{names.TAG_ROLE}` = 'study'", max_results=1,
                order_by=["attributes.start_time DESC"],
            )
            run = found[0] if found else None
    if run is None:
        return {}
    return {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id, "tags": dict(run.data.tags)}


def dataset_digests(data: StudyData, run_ids: list[str]) -> list[dict]:
    """Name, digest and source of the datasets the given runs logged as inputs (deduplicated)."""
    seen: dict[tuple, dict] = {}
    for run_id in run_ids:
        try:
            inputs = data.client.get_run(run_id).inputs
        except Exception:  # noqa: BLE001 - a deleted run has no inputs to show
            continue
        for item in getattr(inputs, "dataset_inputs", None) or []:
            ds = item.dataset
            seen.setdefault((ds.name, ds.digest), {"name": ds.name, "digest": ds.digest, "source": ds.source_type})
    return list(seen.values())


def checked_storage(storage: str | None = None) -> str:
    """The Optuna storage URL; a SQLite file that does not exist is an error (Optuna would create an empty one)."""
    url = storage or default_storage()
    path = sqlite_path(url)
    if path and not path.is_file():
        raise ConfigError("storage", f"no study store at {path}; run a study first (make study)")
    return url


def study_names(storage: str | None = None) -> list[str]:
    return sorted(optuna.get_all_study_names(checked_storage(storage)))


def safe_study_names(storage: str | None = None) -> tuple[list[str], list[str]]:
    """The store's study names that are safe folder names (``check_name``), and a line for each one that is not:
    a store can be shared, and a name read from it must never become a path under reports/."""
    url, safe, skipped = checked_storage(storage), [], []
    for name in study_names(url):
        try:
            safe.append(check_name(name))
        except ConfigError as err:
            skipped.append(str(err.at(f"{redact(url)}: study {name[:40]!r}")))
    return safe, skipped


def _status(recorded: pd.Series, state: pd.Series) -> pd.Series:
    """``names.status_of`` per trial: the plan's rule, so the report counts what the plan decided on."""
    pairs = zip(recorded, state, strict=True)
    return pd.Series([names.status_of(r if isinstance(r, str) else None, s) for r, s in pairs], index=state.index,
                     dtype=object)
