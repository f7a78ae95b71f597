"""The page of one study (``reports/<study>/index.html``), with ``results.csv`` and ``summary.md`` beside it: the
answer first, then the evidence (verdicts, tuning, curves, costs, claims, provenance)."""

from __future__ import annotations

import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.core.sizes import ComputeBudget
from ablate.core.urls import redact, redact_text
from ablate.design.study_file import check_name
from ablate.report import analysis, attention_plots, claims, html, plots, search_plots
from ablate.report.index import build_index, commands
from ablate.report.load import StudyData, completed, dataset_digests, load_study

VERDICTS = "verdicts.json"  # the verdict table, as MLflow's log_table writes one
LOGGED_ARTIFACTS = "mlflow.loggedArtifacts"  # MLflow's list of a run's table artifacts


def build_report(name: str, *, storage: str | None = None, tracking_uri: str | None = None,
                 out: str | Path = "reports", log_artifacts: bool = True, index: bool = True) -> Path:
    """Build the report of study ``name`` (and, with ``index``, refresh ``<out>/index.html``); returns the path of
    the study's index.html."""
    folder = Path(out) / check_name(name)
    data = load_study(name, storage, tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve().parent != Path(out).resolve():  # a link planted at <out>/<name> would lead elsewhere
        raise ConfigError("report", f"{folder} leads outside {out} ({folder.resolve()}); remove it")
    plots.theme()
    ctx = _context(data)
    # Passwords in URLs are masked where they enter the page (stores, commands, the study file), and once more
    # over each file as written: run data (a failure's reason, a tag) can quote a URL too.
    html.write_page(folder / "index.html", html.render(ctx))
    html.write_page(folder / "results.csv", results_table(data).to_csv(index=False))
    notes = [w["text"] for w in ctx["edges"]]
    html.write_page(folder / html.SUMMARY, html.markdown(f"{name}: {ctx['headline']}", ctx["answers"],
                                                         ctx["variant_df"], notes))  # fmt: skip
    html.write_page(folder / VERDICTS, ctx["variant_df"].to_json(orient="split", index=False))
    if log_artifacts and data.parent.get("run_id"):
        publish(data, ctx, folder)
    if index:
        build_index([data.storage], out)
    return folder / "index.html"


def publish(data: StudyData, ctx: dict, folder: Path) -> None:
    """The answer where MLflow users look: the study's parent run gets the answer as its description (the note the
    UI shows on the run's page), one tag per factor (``answer.<factor>``), the verdict table as a table artifact and
    the report's files. The table is written whole each time, as ``log_table`` writes it (``split`` JSON, listed in
    ``mlflow.loggedArtifacts``): ``log_table`` itself would append a rebuilt report's rows to the last one's."""
    client, run_id = data.client, data.parent["run_id"]
    lines = [f"**{data.name}**: {ctx['headline']}", "", data.spec.description or "",
             *(f"- {a['factor']}: {a['choice']} ({a['verdict']})" for a in ctx["answers"])]
    client.set_tag(run_id, names.TAG_NOTE, redact_text("\n".join(lines))[:5000])
    for a in ctx["answers"]:
        client.set_tag(run_id, f"{names.TAG_ANSWER_PREFIX}{a['factor']}", f"{a['choice']} ({a['verdict']})"[:5000])
    for file in ("index.html", "results.csv", html.SUMMARY, VERDICTS):
        client.log_artifact(run_id, str(folder / file), names.REPORT_DIR)
    tables = json.loads(client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS, "[]"))
    table = {"path": f"{names.REPORT_DIR}/{VERDICTS}", "type": "table"}
    if table not in tables:
        client.set_tag(run_id, LOGGED_ARTIFACTS, json.dumps([*tables, table]))


def results_table(data: StudyData) -> pd.DataFrame:
    """results.csv: a row per trial, the params that varied, best and final metrics, and its MLflow run id."""
    t = data.trials
    lead = [c for c in ("trial", "state", "status", "phase", "variant", "seed", "value") if c in t]
    metrics = [c for c in t.columns if "/" in c and not c.startswith(("attn/", "train/"))]
    return t[lead + analysis.varied_params(data) + sorted(metrics) + [c for c in ("run_id",) if c in t]]


def _context(data: StudyData) -> dict:
    t = data.trials
    counts = t["state"].value_counts().to_dict() if not t.empty else {}
    statuses = t["status"].value_counts().to_dict() if not t.empty else {}
    ctx = {
        "name": data.name, "kind": data.kind, "description": data.spec.description,
        "edges": [], "fair": "", "study_statement": "", "margin": data.spec.margin,
        "test_label": names.outcome_label(data.spec.outcome, prose=True),
        "val_label": names.outcome_label(data.spec.outcome, "val", prose=True),
        "val_metric": names.outcome_label(data.spec.outcome, "val"),
        "health": html.table(analysis.health(data)) if not t.empty else None,
        "reruns": data.reruns, "lengths": None, "costs": None, "claims": [], "solved_acc": names.SOLVED_ACC,
        "failures": _failures(t), "answers": [], "variant_df": pd.DataFrame(), "variants": None,
        "figures": dict.fromkeys(("isolation", "lr", "importance", "interaction")), "search": None,
        "attention": _attention(data),
        "provenance": _provenance(data, counts, statuses), "generated": pd.Timestamp.now().strftime("%Y-%m-%d %H:%M"),
    }
    if data.kind == "ablation":
        _ablation(data, ctx)
    else:
        _search(data, ctx)
    ctx["figures"]["curves"] = plots.curves(data, curve_runs(data))
    ctx["figures"]["pareto"] = plots.pareto(data)
    return ctx


def _ablation(data: StudyData, ctx: dict) -> None:
    results = analysis.plan_results(data)
    table = analysis.verdict_table(data, results) if not data.trials.empty else pd.DataFrame()
    if table.empty:
        ctx["headline"] = "no trials yet"
        return
    ctx["answers"] = analysis.answers(data, table, results)
    ctx["edges"] = analysis.tuning_warnings(data, table)
    decided = sum(a["decided"] for a in ctx["answers"])
    ctx["fair"] = _fairness(data, table[table["tune_points"] > 0])
    wide = sum(a["study_decided"] for a in ctx["answers"])
    ctx["study_statement"] = analysis.study_statement(data)
    ctx["headline"] = (f"{wide} of {len(ctx['answers'])} scientific parameters decided study-wide ({decided} at "
                       f"alpha per factor) at a margin of ±{data.spec.margin:g} "
                       f"{ctx['test_label']}{_budget_phrase(data.spec.compute)}: " + "; ".join(
                           f"{a['factor']} → {a['choice']} ({a['verdict']})" for a in ctx["answers"]))
    ctx["variant_df"] = _variant_display(table, data.spec.outcome)
    ctx["lengths"] = _length_display(data, table)
    ctx["costs"] = _cost_display(data, table)
    ctx["claims"] = _claims(data, table)
    if ctx["claims"]:
        ctx["headline"] += "; claims: " + claims.tally([c["verdict"] for c in ctx["claims"]])
    ctx["variants"] = html.table(ctx["variant_df"])
    ctx["figures"]["isolation"] = plots.isolation(data, table)
    ctx["figures"]["lr"] = plots.lr_sensitivity(data, _nuisance_param(data), table)


def _fairness(data: StudyData, tuned: pd.DataFrame) -> str:
    """Whether every arm's tuning is shown to cost it less than the margin (its 95% penalty bound), not merely
    bracketed; and what the verdicts do about the rest."""
    if tuned.empty:
        return ""
    spec = data.spec
    how = (f"Each variant's learning rate is chosen from the means of {spec.tune_seeds} tune seed"
           f"{'s' * (spec.tune_seeds != 1)} per point (never verdict seeds), at the vertex of the parabola through "
           "the best mean and its neighbours. Its tuning penalty is what that choice can cost it against its best "
           f"learning rate in the range (bootstrap over the seed spread, {tuned['seed_sd'].iloc[0]:.3g} "
           f"{names.OUTCOME_UNITS[spec.outcome]} at a "
           "fixed point); every verdict's interval is widened by both arms' penalty bounds, so a decided verdict "
           "holds of the arms as tuned well. ")
    tuned = tuned.assign(penalty_95=tuned["penalty_95"].fillna(math.inf))  # unknown: not shown to be small
    worst = tuned.sort_values("penalty_95").iloc[-1]
    unfair = tuned[~tuned["fair"]]
    if unfair.empty:
        return how + (f"Fair: every variant's 95% penalty bound is below the margin ±{spec.margin:g} (largest "
                      f"{worst['penalty_95']:.3g}, {worst['variant']}).")
    names_ = ", ".join(f"{r.variant} ({_bound(r.penalty_95)})" for r in unfair.itertuples())
    return how + (f"Not shown fair for {len(unfair)} of {len(tuned)} variants, whose 95% penalty bound reaches the "
                  f"margin ±{spec.margin:g}: {names_}. Their verdicts can only be decided by a difference larger "
                  "than their penalty; more tune seeds or points narrow it.")


def _end(value: float) -> str:
    """An interval's end; infinite where a tuning penalty is unbounded."""
    return f"{value:+.4f}" if math.isfinite(value) else ("+∞" if value > 0 else "-∞")


def _bound(value: float) -> str:
    return "unbounded: best point at an edge" if not math.isfinite(value) else f"{value:.3g}"


def _nuisance_param(data: StudyData) -> str:
    keys = [p.key for p in data.spec.nuisance]
    return "train.lr" if "train.lr" in keys or not keys else keys[0]


def _search(data: StudyData, ctx: dict) -> None:
    imp = analysis.importances(data)
    best = analysis.best_trials(data)
    ctx["headline"] = (f"search study: best {ctx['val_metric']} {html.num(best['value'].iloc[0])} (trial "
                       f"{int(best['trial'].iloc[0])}); no ablation conclusions are drawn from adaptive search"
                       if len(best) else "search study: no completed trials yet")
    top = list(imp["param"][:2]) if len(imp) >= 2 else analysis.varied_params(data)[:2]
    ctx["search"] = {
        "importances": html.table(imp) if not imp.empty else None,
        "best": html.table(best) if len(best) else None,
        "pair": " × ".join(top),
    }
    ctx["figures"]["importance"] = search_plots.importance(imp)
    ctx["figures"]["interaction"] = search_plots.interaction(data, *top) if len(top) == 2 else None


def _variant_display(table: pd.DataFrame, outcome: str) -> pd.DataFrame:
    """Table 3 as strings: the tuning, the seed re-runs on the test split, the verdict's interval, the costs; the
    validation and test columns in ``outcome``'s units, named so."""
    test = names.outcome_label(outcome)

    def pm(mean: float, half: float) -> str:
        return "" if math.isnan(mean) else f"{mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}")

    def delta(r: pd.Series) -> str:
        if r["variant"] == "base" or math.isnan(r["diff"]):
            return "—"
        ci = "" if r["paired"] < 2 else f" [{_end(r['lo'])}, {_end(r['hi'])}]"
        return f"{r['diff']:+.4f}{ci}"

    def seeds(r: pd.Series) -> str:
        text = f"{int(r['seeds'])}" + (f" ({int(r['diverged'])} diverged)" if r["diverged"] else "")
        return text + (" — too few for a verdict" if r["seeds"] < 2 else "")

    def tuning(r: pd.Series) -> str:
        if r["tune_points"] == 0:
            return "—"
        where = "bracketed" if r["bracketed"] else f"edge: {r['edge'] or 'none completed'}"
        extra = f" (+{int(r['extra_points'])})" if r["extra_points"] else ""
        runs = f" x {round(r['tune_runs'] / r['tune_points'])} seeds" if r["tune_runs"] > r["tune_points"] else ""
        penalty = "" if math.isnan(r["penalty"]) else f"; penalty ≤ {_bound(r['penalty'])}"
        return (f"{analysis.display(r['lr'])} of {int(r['tune_points'] - r['extra_points'])}{extra} tried{runs}, "
                f"{where}{penalty}")

    out = pd.DataFrame({
        "variant": table["variant"], "changed": table["changed"],
        "chosen lr (points tried)": [tuning(r) for _, r in table.iterrows()],
        "lr basin (within margin)": [("" if math.isnan(lo) else f"{analysis.display(lo)}–{analysis.display(hi)}")
                                     for lo, hi in zip(table["basin_lo"], table["basin_hi"], strict=True)],
        "seeds": [seeds(r) for _, r in table.iterrows()],
        f"{names.outcome_label(outcome, 'val')} (mean)": table["val_mean"],
        f"{test} (mean ± 95% CI)": [pm(m, h) for m, h in zip(table["test_mean"], table["test_ci"], strict=True)],
        f"Δ {test} vs base [verdict's interval]": [delta(r) for _, r in table.iterrows()],
        "verdict": [v or "—" for v in table["verdict"]],
        "params": table[names.PARAMS], "FLOPs/token": table[names.FLOPS_PER_TOKEN],
        "tokens/s": table[names.TOKENS_PER_S], "wall s": table[names.WALL_S],
    })
    return out


def _claims(data: StudyData, table: pd.DataFrame, exponents: dict | None = None) -> list[dict]:
    """Each published claim of the study file, judged from this study's numbers (``claims.judge``)."""
    tune = analysis.tune_runs(data)
    out = []
    for key, claim in data.spec.claims.items():
        if not data.spec.tests(claim) or exponents is None and not claim.in_one_study:
            continue  # another member's claim, or one about width that only the family page can judge
        judged = claims.judge(claim, data.spec, table, tune, exponents, analysis.seed_runs(data))
        caveats = claims.setting(data.spec) + (f"; {claim.caveat}" if claim.caveat else "")
        if claim.lr_exponent and exponents is None:
            caveats += "; its learning-rate-against-width part is judged on the family page"
        grid = None
        if claim.less_sensitive and len(tune):  # Wortsman et al.'s evidence: loss, divergence and logits by LR
            arms = [claim.less_sensitive, claim.than]
            runs = tune[tune["variant"].isin(arms)]["run_id"]
            grid = html.table(claims.lr_grid(tune, data.spec.nuisance[0].key, arms, _max_logits(data, runs),
                                              data.spec.outcome))
        out.append({"id": key, "claim": claim.claim, "source": claim.source, "published": claim.published,
                    "caveats": caveats, "grid": grid, **judged})
    return out


def _max_logits(data: StudyData, runs: pd.Series) -> dict[str, float]:
    """Per run, the largest attention logit of any layer over its training (its attn/max_logit/l* histories)."""
    keys = [c for c in data.trials.columns if isinstance(c, str) and c.startswith("attn/max_logit/")]
    out = {}
    for run in (r for r in runs if r):
        values = [v for key in keys for v in data.history(run, key)["value"]]
        if values:
            out[run] = float(max(values))
    return out


def _length_display(data: StudyData, table: pd.DataFrame) -> dict | None:
    """Length generalisation: per variant, the task's test metric at 1x and at each longer length (means over the
    seed runs), and recall's solved multiple. An arm with learned positions cannot run longer inputs: n/a."""
    keys = analysis.length_metrics(data)
    if not keys:
        return None
    positions = data.trials.groupby("variant")["model.position"].first() if "model.position" in data.trials else {}
    out = pd.DataFrame({"variant": table["variant"]})
    for key in keys:
        label = "solved up to (×)" if key == names.SOLVED_X else key.replace("_", " at ").removeprefix("test/")
        out[label] = [("n/a (learned positions)" if key != keys[0] and positions.get(v) == "learned" else "")
                      if math.isnan(x) else html.num(x) for v, x in zip(table["variant"], table[key], strict=True)]
    return html.table(out)


def _cost_display(data: StudyData, table: pd.DataFrame) -> dict | None:
    """Attention against the recurrent kinds in cost over sequence length, with the FLOPs crossover per kind."""
    costs = analysis.kind_costs(data, table)
    if costs is None:
        return None
    return {"table": html.table(costs["table"]), "seq_len": costs["seq_len"],
            "crossover": [f"{kind}: attention costs more FLOPs per token than the {kind} from {n:,} tokens of "
                          f"context on" + (" (already at the training length)" if n <= costs["seq_len"] else "")
                          for kind, n in costs["crossover"].items()]}  # fmt: skip


def curve_runs(data: StudyData) -> dict[str, list[str]]:
    """Per variant its completed seed runs, median outcome first (its curve's band spans them); top 5 for search."""
    done = completed(data.trials)
    done = done[done["run_id"].astype(bool)] if not done.empty else done
    if done.empty:
        return {}
    if data.kind != "ablation":
        return {f"trial {int(r.trial)}": [r.run_id] for r in done.nsmallest(5, "value").itertuples()}
    seeds = done[(done["phase"] == "seed") & done["outcome"].notna()]
    out = {}
    for variant in analysis.variant_order(data):
        rows = seeds[seeds["variant"] == variant].sort_values("outcome")
        if len(rows):
            ids = list(rows["run_id"])
            median = ids.pop((len(ids) - 1) // 2)
            out[variant] = [median, *ids]
    return out


def _best_row(data: StudyData) -> pd.Series | None:
    done = completed(data.trials)
    done = done[done["run_id"].astype(bool)] if not done.empty else done
    if done.empty:
        return None
    seeds = done[done["phase"] == "seed"] if "phase" in done else done
    rows = seeds if not seeds.empty else done
    return rows.loc[rows["value"].idxmin()]


def _attention(data: StudyData) -> dict | None:
    row = _best_row(data)
    if row is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = data.artifact(row["run_id"], names.MAPS_ARTIFACT, Path(tmp))
        maps = plots.png_uri(path.read_bytes()) if path and path.is_file() else None
    label = row["variant"] or f"trial {int(row['trial'])}"
    return {"run_id": row["run_id"], "label": label, "trial": int(row["trial"]), "value": row["value"],
            "maps": maps, "entropy": attention_plots.entropy(row), "max_logit": attention_plots.max_logit(data, row)}


def _failures(t: pd.DataFrame) -> list[dict]:
    if t.empty:
        return []
    bad = t[t["status"].isin(["diverged", "failed"])]
    reason = f"tag:{names.TAG_REASON}"
    return [{"trial": int(r["trial"]), "variant": r.get("variant", ""), "status": r["status"],
             "reason": redact_text(r.get(reason, "")) if isinstance(r.get(reason, ""), str) else "",
             "run_id": r["run_id"]}
            for _, r in bad.iterrows()]


def _provenance(data: StudyData, counts: dict, statuses: dict) -> dict:
    t, tags = data.trials, data.parent.get("tags", {})
    first = t[t["run_id"].astype(bool)].iloc[0] if not t.empty and t["run_id"].astype(bool).any() else {}

    def tag(key: str) -> str:
        value = tags.get(key) or (first.get(f"tag:{key}") if len(first) else None)
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)

    versions = {k.removeprefix("tag:"): str(v) for k, v in (first.items() if len(first) else [])
                if isinstance(k, str) and k.startswith("tag:") and ("version" in k or k.startswith("tag:mlflow.source"))
                and isinstance(v, str)}
    runs = [r for r in t["run_id"] if r] if not t.empty else []
    reproduce = commands(data.name, data.storage, data.spec.family, data.study.user_attrs.get(names.ATTR_SOURCE, ""))
    return {
        "spec": yaml.safe_dump(data.spec.data, sort_keys=False) if data.spec.data else "",
        "datasets": dataset_digests(data, runs[:20]) if runs else [],
        "git_commit": tag(names.TAG_GIT_COMMIT), "git_dirty": tag(names.TAG_GIT_DIRTY),
        "device": tag(names.TAG_DEVICE), "backend": tag(names.TAG_BACKEND), "versions": versions,
        "report_python": f"{platform.python_version()} ({sys.platform})",
        "states": counts, "statuses": statuses, "trials": len(t),
        "parent_run_id": data.parent.get("run_id", ""), "experiment_id": data.parent.get("experiment_id", ""),
        "tracking_uri": redact(data.tracking_uri), "storage": redact(data.storage),
        "study_command": reproduce["study"], "report_command": reproduce["report"],
    }


def _budget_phrase(compute: ComputeBudget | None) -> str:
    """How the arms' compute was matched, when it was (without a budget every arm trains the base's steps)."""
    if compute is None or compute.match == "steps" and compute.value is None:
        return ""
    amount = f"{compute.value:g} {compute.unit}" if compute.value else f"the base's training {compute.unit}"
    return f", every arm trained on {amount}"
