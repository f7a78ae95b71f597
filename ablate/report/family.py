"""The page of a family of studies (``reports/<family>/index.html``): one study file run as several Optuna studies,
one per rung of a size ladder and/or per budget (``design.families``). Each member keeps its own full report; this page
sets their answers side by side and says, per factor, whether the answer holds, changes or flips (``across``: a test
of change across members), where the arms lie against their training compute, and how each arm's best learning rate
moves with width.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from ablate.core import names
from ablate.core.config import ConfigError
from ablate.core.urls import default_storage
from ablate.design import plan
from ablate.design.families import family_specs
from ablate.design.spec import StudySpec
from ablate.design.study_file import check_name
from ablate.report import across, analysis, claims, family_plots, html, plots
from ablate.report.load import StudyData, checked_storage, load_study

TEMPLATE = "family.html.j2"


@dataclass
class Member:
    label: str
    spec: StudySpec
    data: StudyData | None  # None: the member has not started yet
    table: pd.DataFrame
    answers: list[dict]


def families(storage: str | None) -> dict[str, list[str]]:
    """Family name -> the names of its member studies present in ``storage``."""
    out: dict[str, list[str]] = {}
    for summary in optuna.get_all_study_summaries(checked_storage(storage), include_best_trial=False):
        family = summary.user_attrs.get(names.ATTR_FAMILY)
        if isinstance(family, str) and family:
            out.setdefault(family, []).append(summary.study_name)
    return out


def load_members(family: str, storage: str | None, tracking_uri: str | None) -> list[Member]:
    """Every member the family's stored study file names (the copy of its most recently set-up member), loaded
    when it has started."""
    storage = storage or default_storage()
    mine = [s for s in optuna.get_all_study_summaries(checked_storage(storage), include_best_trial=False)
            if s.user_attrs.get(names.ATTR_FAMILY) == family]  # fmt: skip
    if not mine:
        raise ConfigError("report", f"no study of family {family!r} in {storage}")
    present = {s.study_name for s in mine}
    out = []
    for spec in family_specs(mine[-1].user_attrs.get(names.ATTR_FAMILY_SPEC) or {}):
        if spec.name not in present:
            out.append(Member(spec.member, spec, None, pd.DataFrame(), []))
            continue
        data = load_study(spec.name, storage, tracking_uri)
        results = analysis.plan_results(data)
        table = analysis.verdict_table(data, results) if not data.trials.empty else pd.DataFrame()
        answers = analysis.answers(data, table, results) if len(table) else []
        out.append(Member(spec.member, spec, data, table, answers))
    return out


def build_family_report(family: str, *, storage: str | None = None, tracking_uri: str | None = None,
                        out: str | Path = "reports") -> Path:
    """Write ``<out>/<family>/index.html`` and ``summary.md``; returns the page's path. The index of every study
    (``report.index.build_index``, which lists families) is its caller's to refresh."""
    folder = Path(out) / check_name(family)
    members = load_members(family, storage, tracking_uri)
    plots.theme()
    ctx = context(family, members)
    folder.mkdir(parents=True, exist_ok=True)
    if folder.resolve().parent != Path(out).resolve():
        raise ConfigError("report", f"{folder} leads outside {out} ({folder.resolve()}); remove it")
    html.write_page(folder / "index.html", html.render(ctx, TEMPLATE))
    lines = [f"# {family}: {ctx['headline']}", ""] + [f"- **{f['factor']}** ({f['label']}): " + "; ".join(
        f"{m} → {c}" for m, c in f["choices"].items()) for f in ctx["factors"]]  # fmt: skip
    html.write_page(folder / html.SUMMARY, "\n".join(lines) + "\n")
    return folder / "index.html"


def context(family: str, members: list[Member]) -> dict:
    done = [m for m in members if len(m.table)]
    tables = {m.label: m.table for m in done}
    first = members[0].spec
    positions, axis = member_axis(done)
    compared = across.compare(tables, positions, first.alpha, axis) if tables else pd.DataFrame()
    factors = across.factors(compared, {m.label: m.answers for m in done})
    widths = {m.label: m.spec.base.model.embed_dim for m in done}
    lr = pd.DataFrame()
    if len(first.nuisance) == 1 and len(set(widths.values())) > 1:
        lr = across.lr_by_width(*plan_tunings(done), widths, first.nuisance[0], first.alpha)
    points = frontier_points(done)
    on = across.frontier(points, names.FLOPS_TOTAL, "test_mean") if len(points) else points
    found = family_claims(done, lr)
    tally = "; claims: " + claims.tally([c["verdict"] for c in found]) if found else ""
    return {
        "name": family, "description": first.description, "members": [_member_row(m) for m in members],
        "headline": headline(factors, len(done), len(members)) + tally, "factors": factors,
        "statement": error_statement(first, len(done), axis),
        "side_by_side": html.table(_side_by_side(compared, [m.label for m in done], axis)) if len(compared) else None,
        "frontier": [f"{r.member}: {r.variant} ({r.test_mean:.4f} at {r[names.FLOPS_TOTAL]:.3g} FLOPs)"
                     for _, r in on.iterrows()],  # fmt: skip
        "frontier_figure": family_plots.frontier(points, on, first.outcome) if len(points) else None,
        "test_label": names.outcome_label(first.outcome, prose=True),
        "lr": html.table(lr) if len(lr) else None, "lr_text": lr_sentences(lr, first),
        "level": claims.level(first.alpha),
        "lr_figure": family_plots.lr_by_width(lr) if len(lr) else None,
        "claims": found,
        "generated": pd.Timestamp.now().strftime("%Y-%m-%d %H:%M"),
    }


def family_claims(members: list[Member], lr: pd.DataFrame) -> list[dict]:
    """Each claim of the family's file: its verdict in every member, and the learning-rate-against-width part,
    which only the family can judge (``claims.judge`` with the exponents of ``across.lr_by_width``)."""
    if not members:
        return []
    exponents = {r["variant"]: (r["exponent"], r["exponent lo"], r["exponent hi"]) for _, r in lr.iterrows()}
    out = []
    for key, claim in members[0].spec.claims.items():
        per_member = []
        for m in (m for m in members if m.spec.tests(claim)):
            part = dataclasses.replace(claim, lr_exponent={}) if claim.in_one_study else None
            if part is not None:
                per_member.append((m.label, claims.judge(part, m.spec, m.table, analysis.tune_runs(m.data),
                                                         seeds=analysis.seed_runs(m.data))))  # fmt: skip
        width = claims.judge(dataclasses.replace(claim, expect={}, less_sensitive="", solves=()), members[0].spec,
                             pd.DataFrame(), pd.DataFrame(), exponents) if claim.lr_exponent else None  # fmt: skip
        lines = [{"outcome": j["verdict"], "text": f"{label}: " + "; ".join(x["text"] for x in j["lines"])}
                 for label, j in per_member] + (width["lines"] if width else [])  # fmt: skip
        out.append({"id": key, "claim": claim.claim, "source": claim.source, "published": claim.published,
                    "verdict": claims.combine([line["outcome"] for line in lines]), "lines": lines,
                    "caveats": "; ".join(f"{m.label}: {claims.setting(m.spec)}" for m in members if m.spec.tests(claim))
                               + (f"; {claim.caveat}" if claim.caveat else "")})  # fmt: skip
    return out


def headline(factors: list[dict], done: int, total: int) -> str:
    """``"across 3 members: model.num_heads moves (4 (keep base) at w64; 8 (better) at w128, w256)"``."""
    if not done:
        return f"no member has results yet (0 of {total})"
    parts = []
    for f in factors:
        by_choice: dict[str, list[str]] = {}
        for member, choice in f["choices"].items():
            by_choice.setdefault(choice, []).append(member)
        if len(by_choice) == 1:
            parts.append(f"{f['factor']} {f['label']}: {next(iter(by_choice))}")
        else:
            parts.append(f"{f['factor']} {f['label']} (" + "; ".join(
                f"{choice} at {', '.join(members)}" for choice, members in by_choice.items()) + ")")
    missing = f" ({total - done} of {total} members not run yet)" if done < total else ""
    return f"across {done} members{missing}: " + "; ".join(parts)


def plan_tunings(members: list[Member]) -> tuple[dict[str, dict], dict[str, float]]:
    """Each member's tuning of every variant and its seed spread, as its plan computed them (``plan.tuned``,
    ``plan.seed_spread``): the chosen learning rates the page shows are the ones the seeds ran at."""
    tunings, spreads = {}, {}
    for m in members:
        results = analysis.plan_results(m.data)
        tune = [r for r in results if r.phase == "tune"]
        tunings[m.label] = {v.name: plan.tuned(m.spec, [r for r in tune if r.variant == v.name])
                            for v in m.spec.variants()}  # fmt: skip
        spreads[m.label] = plan.seed_spread(m.spec, results)
    return tunings, spreads


def member_axis(members: list[Member]) -> tuple[dict[str, float], str]:
    """Where each member sits on the axis its effects are tested for change along, and the axis' words for the label:
    log2 of its width for a width ladder (a slope per doubling), else its place in the family."""
    widths = {m.label: m.spec.base.model.embed_dim for m in members}
    if len(set(widths.values())) > 1:
        return {label: math.log2(w) for label, w in widths.items()}, "with width"
    budgets = {m.spec.compute.match if m.spec.compute else "steps" for m in members}
    return {m.label: float(i) for i, m in enumerate(members)}, ("across budgets" if len(budgets) > 1 else
                                                                 "across members")


def error_statement(spec: StudySpec, members: int, axis: str = "across members") -> str:
    """The page's error rates, each one the labels keep (``across``'s docstring; its tests simulate them)."""
    k, a = f"{spec.alpha:g}", spec.alpha
    along = "log2 width" if axis == "with width" else "the members' order"
    return (f"Each member's verdicts control, per factor, the chance of any false better/worse/equivalent claim at "
            f"α = {k} (margin ±{spec.margin:g} {names.outcome_label(spec.outcome, prose=True)}). "
            f"'{across.changes(axis)}' and 'flips' rest on a test of "
            f"change: the slope of each value's paired difference against {along}, least squares over the members "
            f"with each member's standard error, its interval at 1 − α/v for a factor of v values and widened by the "
            f"arms' tuning penalties; when each value's effect is the same in every member, a factor is labelled "
            f"'changes' or 'flips' with probability at most {k}. 'flips' also needs better in one member and worse in "
            f"another, and 'holds' that every member decided alike: each rests on {members} members' verdicts, "
            f"wrong with probability at most {min(1.0, members * a):.2g} (Bonferroni).")


def frontier_points(members: list[Member]) -> pd.DataFrame:
    """Every arm of every member: its mean outcome (test loss, test/bpb) against its mean training FLOPs."""
    frames = []
    for m in members:
        t = m.table
        if names.FLOPS_TOTAL not in t:
            continue
        frames.append(pd.DataFrame({"member": m.label, "variant": t["variant"], "test_mean": t["test_mean"],
                                    names.FLOPS_TOTAL: t[names.FLOPS_TOTAL]}))  # fmt: skip
    return pd.concat(frames, ignore_index=True).dropna() if frames else pd.DataFrame()


def lr_sentences(lr: pd.DataFrame, spec: StudySpec) -> list[str]:
    """Per variant with two or more bracketed widths: how its best learning rate scales with width."""
    key = spec.nuisance[0].key if spec.nuisance else "lr"
    out = []
    for _, r in lr[lr["exponent"].notna()].iterrows() if len(lr) else ():
        interval = (f", {claims.level(spec.alpha)} interval [{r['exponent lo']:+.2f}, {r['exponent hi']:+.2f}]"
                    if math.isfinite(r["exponent lo"]) else ", no interval (one tune seed per point: no seed spread)")
        out.append(f"{r['variant']}: best {key} ∝ width^{r['exponent']:+.2f}{interval} (over "
                   f"{int(r['bracketed widths'])} widths where its tuning bracketed the optimum; the interval from a "
                   f"parametric bootstrap of each width's tuning)")
    return out


def _side_by_side(compared: pd.DataFrame, labels: list[str], axis: str) -> pd.DataFrame:
    def cell(r: pd.Series, m: str) -> str:
        verdict, diff = r[f"{m}: verdict"], r[f"{m}: diff"]
        if math.isnan(diff):
            return verdict
        interval = f" [{r[f'{m}: lo']:+.3f}, {r[f'{m}: hi']:+.3f}]" if math.isfinite(r[f"{m}: lo"]) else ""
        return f"{verdict} {diff:+.3f}{interval}"

    out = pd.DataFrame({"factor": compared["factor"], "value": compared["variant"]})
    for m in labels:
        out[m] = [cell(r, m) for _, r in compared.iterrows()]
    unit = "per doubling of width" if axis == "with width" else "per member"
    out[f"change {unit} [interval]"] = [_trend(r) for _, r in compared.iterrows()]
    out["across members"] = compared["label"]
    return out


def _trend(r: pd.Series) -> str:
    if math.isnan(r["trend"]):
        return "—"
    return f"{r['trend']:+.3f} [{r['trend lo']:+.3f}, {r['trend hi']:+.3f}]"


def _member_row(m: Member) -> dict:
    model, train = m.spec.base.model, m.spec.base.train
    match = m.spec.compute.match if m.spec.compute else "steps"
    setting = f"width {model.embed_dim}, {model.num_layers} layers, {train.steps} steps of the base, equal {match}"
    answer = "; ".join(f"{a['factor']} → {a['choice']} ({a['verdict']})" for a in m.answers)
    return {"label": m.label, "name": m.spec.name, "link": f"../{m.spec.name}/index.html",
            "started": m.data is not None, "setting": setting, "answer": answer}
