"""``reports/index.html``: every study of a store on one page, its one-line answer first, each linked to its report.

Reads the Optuna storage (what each study is, how far it got, when it ran) and the ``summary.md`` that each study's
report wrote (its answer), never MLflow: a store of many studies is listed in about a second.
"""

from __future__ import annotations

import datetime
import shlex
from collections.abc import Iterable
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.core.urls import default_storage, redact
from ablate.design import plan, recovery
from ablate.design.spec import StudySpec, spec_from_mapping
from ablate.design.study_file import check_name
from ablate.report import html
from ablate.report.family import families
from ablate.report.load import checked_storage, safe_study_names

FINISHED, IN_PROGRESS, STOPPED = "finished", "in progress", "stopped"


def build_index(storages: Iterable[str | None], out: str | Path = "reports") -> Path:
    """Write ``<out>/index.html``: a row per study in the given Optuna storages (None: the default one)."""
    out = Path(out)
    rows, skipped, seen = [], [], set()
    stores = list(dict.fromkeys(checked_storage(s) for s in storages))
    for storage in stores:
        listed, bad = safe_study_names(storage)
        skipped += bad
        for name in listed:
            if name not in seen:  # one folder per name under out: a name held by two stores is listed once
                seen.add(name)
                rows.append(study_row(name, storage, out))
        for family, members in families(storage).items():
            if family not in seen and safe_name(family):
                seen.add(family)
                by_name = {r["name"]: r for r in rows}
                rows.append(family_row(family, [by_name[m] for m in members if m in by_name], storage, out))
    rows.sort(key=lambda r: r["active"] or datetime.datetime.min, reverse=True)  # the latest activity first
    counts = {s: n for s in (IN_PROGRESS, STOPPED, FINISHED) if (n := sum(r["status"] == s for r in rows))}
    page = html.render({
        "rows": rows, "stores": [redact(s) for s in stores], "skipped": skipped, "counts": counts,
        "families": sum(r["kind"].startswith("family of") for r in rows),
        "generated": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }, html.INDEX_TEMPLATE)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    html.write_page(out / "index.html", page)
    return out / "index.html"


def commands(name: str, storage: str, family: str = "", source: str = "") -> dict[str, str]:
    """The commands that run the study (its file as run, ``source``; else studies/<name>.yaml, a family member's
    being its family's file, which runs every member) and write its report (``--storage`` unless the default)."""
    store = "" if storage == default_storage() else f" --storage {shlex.quote(redact(storage))}"
    return {"study": f"ablate study {shlex.quote(source or f'studies/{family or name}.yaml')}{store}",
            "report": f"ablate report {shlex.quote(name)}{store}"}


def family_row(family: str, members: list[dict], storage: str, out: Path) -> dict:
    """A family of studies (a ladder, several budgets) as one row: its members' progress summed, its page's
    answer. Its members keep their own rows."""
    statuses = {r["status"] for r in members}
    status = next((s for s in (IN_PROGRESS, STOPPED) if s in statuses), FINISHED if members else "")
    done = [r["done"] for r in members if r["done"] is not None]
    planned = [r["planned"] for r in members if r["planned"] is not None]
    starts, lasts = [r["started"] for r in members if r["started"]], [r["last"] for r in members if r["last"]]
    row = {
        "name": family, "kind": f"family of {len(members)}: " + ", ".join(r["name"] for r in members),
        "task": members[0]["task"] if members else "", "base": "see members", "status": status,
        "running": sum(r["running"] for r in members), "done": sum(done) if done else None,
        "planned": sum(planned) if planned else None, "started": min(starts, default=None),
        "last": max(lasts, default=None), "wall_s": sum(r["wall_s"] or 0 for r in members) or None, "problem": "",
        "commands": commands(family, storage),
        **report_of(family, out),
    }  # fmt: skip
    row["active"] = max([r["active"] for r in members if r["active"]], default=None)
    row["stale"] = bool(row["built"]) and (row["running"] > 0 or row["last"] is not None and row["built"] < row["last"])
    return row


def safe_name(name: str) -> bool:
    try:
        check_name(name)
    except ConfigError:
        return False
    return True


def study_row(name: str, storage: str, out: Path) -> dict:
    """One study as the index shows it: what it asks, on what, how far it got, when, and its report's answer."""
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    running = sum(t.state == TrialState.RUNNING and not recovery.worker_gone(t) for t in trials)
    row = {
        "name": name, "kind": "", "task": "", "base": "", "done": None, "planned": None,
        "status": IN_PROGRESS if running else "", "running": running, "started": min(starts, default=None),
        "last": max(ends, default=None), "active": max(starts + ends, default=None), "wall_s": wall_s(trials),
        "problem": "", **report_of(name, out),
        "commands": commands(name, storage, _family_of(study), study.user_attrs.get(names.ATTR_SOURCE, "")),
    }  # fmt: skip
    # A report written before the study's last trial ended (or while trials run) answers an earlier question.
    row["stale"] = bool(row["built"]) and (running > 0 or row["last"] is not None and row["built"] < row["last"])
    spec = study.user_attrs.get(names.ATTR_SPEC)
    if not spec:
        return {**row, "problem": "not an ablate study (no study file stored with it)"}
    try:
        spec = spec_from_mapping(spec)
    except ConfigError as err:
        return {**row, "problem": f"its stored study file does not load with this version: {err}"}
    try:
        row.update(progress(spec, trials))
    except Exception as err:  # noqa: BLE001 - one study this version cannot read must not hide the others
        return {**row, "problem": f"its trials do not read as this version plans them ({type(err).__name__}: {err})"}
    task, model = spec.base.task, spec.base.model
    row.update(
        kind=spec.kind + (f", {len(spec.variants())} variants" if spec.kind == "ablation" else ""),
        task=f"{task.name}, {task.seq_len} tokens",
        base=f"width {model.embed_dim}, {_count(model.num_layers, 'layer')}, {_count(model.num_heads, 'head')}, "
             f"{_count(spec.base.train.steps, 'step')}",  # fmt: skip
    )
    return row


def _family_of(study: optuna.Study) -> str:
    family = study.user_attrs.get(names.ATTR_FAMILY)
    return family if isinstance(family, str) and safe_name(family) else ""


def report_of(name: str, out: Path) -> dict:
    """The study's report under ``out``, if any: its relative link, its one-line answer, when it was written."""
    folder = out / name
    page, summary = folder / "index.html", folder / html.SUMMARY
    if not page.is_file() or folder.resolve().parent != out.resolve():  # a planted link would lead elsewhere
        return {"link": None, "answer": "", "built": None}
    answer = html.summary_line(folder).removeprefix(f"{name}: ")
    built = datetime.datetime.fromtimestamp((summary if summary.is_file() else page).stat().st_mtime)
    return {"link": f"{name}/index.html", "answer": answer, "built": built}


def progress(spec: StudySpec, trials: list[FrozenTrial]) -> dict:
    """Trials done of planned (each planned trial once, by its latest attempt) and the study's status: in progress
    while a worker holds a trial, stopped when the plan (or a search's budget) has trials left, else finished."""
    results = plan.results_of(trials)
    done = sum(r.finished for r in results)
    left = any(not r.finished for r in results)
    if spec.kind == "ablation":  # what is planned so far, with what the plan asks for next (a stopped study's)
        upcoming = [plan.Result(p.phase, p.variant.name, p.point, "WAITING", "")
                    for p in plan.next_trials(spec, results)]  # fmt: skip
        planned = plan.planned_size(spec, results + upcoming)
        left = left or bool(upcoming)
    else:  # a search bounded by time only has no planned size; it ends when its time is up
        planned = max(spec.trials, len(results)) if spec.trials else None
        left = left or done < (spec.trials or 0)
    running = any(t.state == TrialState.RUNNING and not recovery.worker_gone(t) for t in trials)
    status = IN_PROGRESS if running else STOPPED if left else FINISHED
    return {"done": done, "planned": done if status == FINISHED else planned, "status": status}


def wall_s(trials: list[FrozenTrial]) -> float | None:
    """Seconds during which at least one trial ran: parallel workers counted once, the gaps between a stopped
    study and its resumption not at all."""
    now = datetime.datetime.now()
    spans = sorted((t.datetime_start, t.datetime_complete or (t.datetime_start if recovery.worker_gone(t) else now))
                   for t in trials if t.datetime_start)  # fmt: skip
    if not spans:
        return None
    total, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            total += (end - start).total_seconds()
            start, end = s, e
        else:
            end = max(end, e)
    return total + (end - start).total_seconds()


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
