"""The numbers behind the answer: per-variant means over seeds, intervals against the base, recommendations,
health checks and, for search studies, parameter importances. Pure pandas/scipy on the frames of ``load``.

Conclusions use the seed phase only (the re-runs of each variant's best tuned point); the tune phase is for
learning-rate sensitivity and edge checks. Lower val/loss is better.

Every variant is re-run on the same seeds, and a seed fixes the batch order, so runs of one seed share much of their
noise (a lucky data order helps every variant). Differences from the base are therefore paired by seed (a t-interval
of the per-seed differences) wherever both ran the same seeds; Welch's interval is the fallback.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import optuna
import pandas as pd
from scipy import stats

from ablate import names
from ablate.report.load import StudyData

LEVEL = 0.95
EDGE = 0.1
"""A best point within this fraction of a searched range's end (log scale where the range is) gets a warning."""
COST_KEYS = (names.PARAMS, names.FLOPS_PER_TOKEN, names.TOKENS_PER_S, names.WALL_S)


@dataclass
class Diff:
    """``mean(a) - mean(b)`` with its t-interval; ``lo``/``hi`` are NaN when either side has < 2 values."""

    diff: float
    lo: float
    hi: float
    n_a: int
    n_b: int
    method: str = "Welch"  # or "paired": over seeds both sides ran

    @property
    def known(self) -> bool:
        return not math.isnan(self.lo)

    @property
    def distinguishable(self) -> bool:
        return self.known and (self.lo > 0 or self.hi < 0)


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its t-interval (NaN half-width below 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    if len(values) < 2:
        return float(values.mean()), math.nan
    half = stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def welch(a: np.ndarray, b: np.ndarray) -> Diff:
    """Difference of means ``a - b`` with the Welch-Satterthwaite t-interval at ``LEVEL``."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) and len(b) else math.nan
    if len(a) < 2 or len(b) < 2:
        return Diff(diff, math.nan, math.nan, len(a), len(b))
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Diff(diff, diff, diff, len(a), len(b))
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + LEVEL / 2, dof) * se
    return Diff(diff, diff - half, diff + half, len(a), len(b))


def paired(a: pd.Series, b: pd.Series) -> Diff:
    """``a - b`` over the seeds (index) both ran, with the t-interval of the per-seed differences."""
    d = (a - b).dropna().to_numpy(dtype=float)
    mean, half = mean_ci(d)
    if math.isnan(half):
        return Diff(mean, math.nan, math.nan, len(d), len(d), "paired")
    return Diff(mean, mean - half, mean + half, len(d), len(d), "paired")


def compare(variant_runs: pd.DataFrame, base_runs: pd.DataFrame) -> Diff:
    """The variant's final val/loss minus the base's: paired when both ran the same >= 2 seeds, else Welch.

    A seed missing on one side (a diverged re-run) would cost the paired interval a degree of freedom and drop a
    run; Welch keeps every run.
    """
    a, b = variant_runs.groupby("seed")["value"].mean(), base_runs.groupby("seed")["value"].mean()
    if len(a) >= 2 and set(a.index) == set(b.index):
        return paired(a, b)
    return welch(a.to_numpy(), b.to_numpy())


def seed_runs(data: StudyData) -> pd.DataFrame:
    """Completed seed-phase runs with a final val/loss: the only rows conclusions are drawn from."""
    t = data.trials
    if t.empty or "phase" not in t:
        return t
    return t[(t["phase"] == "seed") & (t["status"] == "completed") & t["value"].notna()]


def variant_value(variant: str, factor: str, data: StudyData) -> object:
    """The scientific value a variant sets (from its runs' params; the name's text if no run logged it)."""
    rows = data.trials[data.trials["variant"] == variant]
    if factor and factor in rows and rows[factor].notna().any():
        return rows[factor].dropna().iloc[0]
    return variant.partition("=")[2] if "=" in variant else ""


def base_value(factor: str, data: StudyData) -> object:
    rows = data.trials[data.trials["variant"] == "base"]
    if factor in rows and rows[factor].notna().any():
        return rows[factor].dropna().iloc[0]
    from ablate.config import flatten, run_config_from, to_dict  # yaml only: no torch

    return flatten(to_dict(run_config_from(data.spec))).get(factor)


def variant_table(data: StudyData) -> pd.DataFrame:
    """One row per variant (base first): what changed, seeds, val/loss mean ± CI, diff vs base (paired), costs."""
    runs = seed_runs(data)
    variants = variant_order(data)
    base = runs[runs["variant"] == "base"]
    metric = data.task_metric
    rows = []
    for variant in variants:
        sub = runs[runs["variant"] == variant]
        factor = _factor(variant, data)
        mean, half = mean_ci(sub["value"].to_numpy())
        d = compare(sub, base)
        row = {
            "variant": variant, "factor": factor, "value": variant_value(variant, factor, data) if factor else "",
            "changed": _changed(variant, factor, data), "seeds": len(sub), "mean": mean, "ci": half,
            "diff": d.diff if variant != "base" else 0.0, "diff_lo": d.lo, "diff_hi": d.hi, "method": d.method,
            "distinguishable": d.distinguishable if variant != "base" else False,
        }
        if metric:
            row["metric_mean"], row["metric_ci"] = mean_ci(sub[metric].dropna().to_numpy())
        for key in COST_KEYS:
            row[key] = float(sub[key].mean()) if key in sub and sub[key].notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def variant_order(data: StudyData) -> list[str]:
    """Variants as the study file lists them, base first: the row order of tables and the colour order of plots."""
    return sorted((v for v in dict.fromkeys(data.trials["variant"]) if v), key=lambda v: _order(v, data))


def _order(variant: str, data: StudyData) -> tuple:
    """Base first, then factors in the study file's order, each factor's values in the order it lists them."""
    if variant == "base":
        return (-1, -1, variant)
    factors = list(data.spec.get("scientific") or {})
    factor = _factor(variant, data)
    values = [fmt(v) for v in (data.spec.get("scientific") or {}).get(factor) or []]
    value = fmt(variant_value(variant, factor, data))
    return (factors.index(factor) if factor in factors else len(factors),
            values.index(value) if value in values else len(values), variant)


def _factor(variant: str, data: StudyData) -> str:
    rows = data.trials[data.trials["variant"] == variant]
    factors = [f for f in rows["factor"].dropna() if f]
    return factors[0] if factors else (variant.partition("=")[0] if "=" in variant else "")


def _changed(variant: str, factor: str, data: StudyData) -> str:
    if variant == "base" or not factor:
        return "—"
    return f"{factor}: {fmt(base_value(factor, data))} → {fmt(variant_value(variant, factor, data))}"


def fmt(value: object) -> str:
    """Short, stable text for a config value or number."""
    if value is None or value == "None":
        return "null"  # as the study file writes it (head_dim: derived from embed_dim / num_heads)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}"
    return str(value)


def ratio_text(value: float, base: float, what: str) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return ""
    return f"{value / base:.2f}× the base's {what}"


def recommendations(data: StudyData, table: pd.DataFrame) -> list[dict]:
    """Per scientific factor: the value to choose, a verdict, and sentences built from the table."""
    out = []
    base_row = table[table["variant"] == "base"]
    for factor in [f for f in dict.fromkeys(table["factor"]) if f]:
        rows = table[table["factor"] == factor]
        out.append(_recommend(factor, rows, base_row.iloc[0] if len(base_row) else None, data))
    return out


def _recommend(factor: str, rows: pd.DataFrame, base: pd.Series | None, data: StudyData) -> dict:
    bval = fmt(base_value(factor, data))
    if base is None or base["seeds"] < 2 or (rows["seeds"] < 2).all():
        return {"factor": factor, "choice": bval, "verdict": "inconclusive",
                "text": f"Inconclusive: fewer than 2 completed seed runs of the base or of every {factor} variant; "
                "run the seed phase to completion before choosing."}
    better = rows[rows["distinguishable"] & (rows["diff"] < 0)]
    worse = rows[rows["distinguishable"] & (rows["diff"] > 0)]
    noise = rows[~rows["distinguishable"] & (rows["seeds"] >= 2)]
    parts = []
    if len(better):
        best = better.sort_values("mean").iloc[0]
        choice, verdict = fmt(best["value"]), "improves"
        parts.append(f"Choose {choice}: against the base ({bval}) it lowers val/loss by {-best['diff']:.4f} "
                     f"(95% CI {-best['diff_hi']:.4f} to {-best['diff_lo']:.4f}, {best['method']} over "
                     f"{int(best['seeds'])} vs {int(base['seeds'])} seeds), more than seed noise.")
        costs = [ratio_text(best[k], base[k], w) for k, w in
                 ((names.PARAMS, "parameters"), (names.FLOPS_PER_TOKEN, "FLOPs per token"),
                  (names.TOKENS_PER_S, "tokens/s"))]
        if any(costs):
            parts.append("It costs " + ", ".join(c for c in costs if c) + ".")
    elif len(worse) and not len(noise):
        choice, verdict = bval, "keep base"
        parts.append(f"Keep {bval}: every other tested value of {factor} is worse than the base beyond seed noise.")
    else:
        choice, verdict = bval, "inconclusive"
        parts.append(f"Inconclusive: no tested value of {factor} beats the base ({bval}) beyond seed noise; "
                     f"keep {bval} or pick the cheapest value within noise.")
    if len(noise):
        parts.append("Within seed noise of the base: " + "; ".join(
            f"{fmt(r['value'])} ({r['diff']:+.4f}, CI {r['diff_lo']:+.4f} to {r['diff_hi']:+.4f})"
            for _, r in noise.iterrows()) + ".")
    if len(worse):
        parts.append("Worse than the base: " + "; ".join(
            f"{fmt(r['value'])} ({r['diff']:+.4f}, CI {r['diff_lo']:+.4f} to {r['diff_hi']:+.4f})"
            for _, r in worse.iterrows()) + ".")
    tested = _tested_values(factor, data)
    if verdict == "improves" and len(tested) > 2 and choice in (fmt(tested[0]), fmt(tested[-1])):
        parts.append(f"{choice} is the edge of the tested values ({', '.join(fmt(v) for v in tested)}): "
                     "the optimum may lie beyond it.")
    return {"factor": factor, "choice": choice, "verdict": verdict, "text": " ".join(parts)}


def _tested_values(factor: str, data: StudyData) -> list:
    values = (data.spec.get("scientific") or {}).get(factor)
    if not isinstance(values, list):
        return []
    try:
        return sorted(values)
    except TypeError:
        return values


def nuisance_ranges(data: StudyData) -> dict[str, dict]:
    """Searched ranges with ``low``/``high`` from the study file (scientific ones too, for search studies)."""
    ranges = {}
    for section in ("nuisance", "scientific"):
        for key, spec in (data.spec.get(section) or {}).items():
            if isinstance(spec, dict) and "low" in spec and "high" in spec:
                ranges[key] = spec
    return ranges


def edge_position(value: float, spec: dict) -> float:
    """Where ``value`` sits in ``[low, high]`` as a fraction (log scale when the range is)."""
    lo, hi = float(spec["low"]), float(spec["high"])
    if spec.get("log"):
        value, lo, hi = math.log(value), math.log(lo), math.log(hi)
    return (value - lo) / (hi - lo) if hi > lo else 0.5


def edge_warnings(data: StudyData) -> list[dict]:
    """Each variant's (or, for search, the study's) best point that lies on the edge of a searched range."""
    t = data.trials
    done = t[(t["status"] == "completed") & t["value"].notna()]
    if data.kind == "ablation" and "phase" in done:
        done = done[done["phase"] == "tune"]
    groups = done.groupby("variant") if data.kind == "ablation" else [("(all)", done)]
    warnings = []
    for variant, rows in groups:
        if rows.empty:
            continue
        best = rows.loc[rows["value"].idxmin()]
        for key, spec in nuisance_ranges(data).items():
            if key in best and pd.notna(best[key]):
                pos = edge_position(float(best[key]), spec)
                if pos < EDGE or pos > 1 - EDGE:
                    end = "low" if pos < EDGE else "high"
                    warnings.append({"variant": variant, "param": key, "value": float(best[key]), "end": end,
                                     "text": f"{variant}: best {key} = {fmt(float(best[key]))} is at the {end} "
                                     f"end of the searched range [{fmt(spec['low'])}, {fmt(spec['high'])}]; "
                                     "widen the range before trusting this comparison."})
    return warnings


def health(data: StudyData) -> pd.DataFrame:
    """Per variant (or per phase for search): trial counts and the share diverged, failed and pruned."""
    t = data.trials.copy()
    key = "variant" if data.kind == "ablation" else "phase"
    t[key] = t[key].replace("", "(none)") if key in t else "(all)"
    table = t.groupby(key)["status"].value_counts().unstack(fill_value=0)
    for status in ("completed", "stopped", "diverged", "failed"):
        if status not in table:
            table[status] = 0
    table["trials"] = table.sum(axis=1)
    out = pd.DataFrame({"trials": table["trials"], "completed": table["completed"]})
    for status, label in (("diverged", "diverged"), ("failed", "failed"), ("stopped", "pruned")):
        out[f"{label} %"] = 100.0 * table[status] / table["trials"]
    return out.reset_index().rename(columns={key: "group"})


def varied_params(data: StudyData, rows: pd.DataFrame | None = None) -> list[str]:
    """Config keys that took more than one value across the given rows: the only ones worth a column."""
    rows = data.trials if rows is None else rows
    keys = [c for c in rows.columns if c.split(".")[0] in ("model", "task", "train")]
    return [k for k in keys if rows[k].astype(str).nunique(dropna=False) > 1]


def importances(data: StudyData, repeats: int = 5) -> pd.DataFrame:
    """fANOVA importance per parameter over ``repeats`` forest seeds (mean, std) plus PED-ANOVA; empty if < 3."""
    complete = [t for t in data.study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 3 or not any(len(t.distributions) for t in complete):
        return pd.DataFrame()
    runs = []
    for seed in range(repeats):
        ev = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        runs.append(optuna.importance.get_param_importances(data.study, evaluator=ev))
    fanova = pd.DataFrame(runs)
    out = pd.DataFrame({"fanova": fanova.mean(), "fanova_std": fanova.std(ddof=1)})
    try:
        ped = optuna.importance.get_param_importances(
            data.study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        out["ped_anova"] = pd.Series(ped)
    except Exception:  # noqa: BLE001 - PED-ANOVA needs enough trials in its top quantile; fANOVA still stands
        out["ped_anova"] = math.nan
    return out.sort_values("fanova", ascending=False).rename_axis("param").reset_index()


def best_trials(data: StudyData, n: int = 5) -> pd.DataFrame:
    done = data.trials[(data.trials["status"] == "completed") & data.trials["value"].notna()]
    keys = varied_params(data, done) or varied_params(data)
    cols = ["trial", "value"] + [c for c in (names.BEST_VAL_LOSS,) if c in done] + keys
    return done.sort_values("value").head(n)[cols]
