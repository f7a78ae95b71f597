"""Answers compared across the members of a family of studies: the rungs of a size ladder, or one ablation run at
equal steps and at equal compute. Pure pandas/numpy/scipy on each member's verdict table (``analysis.verdict_table``)
and its arms' tunings (``plan.tuned``).

Per alternative value, its effect against the base across members:
- changes (with width, across budgets, across members): a test of change says the effect moves along the members'
  axis: the slope of the members' paired differences against log2 width (a width ladder) or the member's place
  (other families), whose interval excludes 0 (see :func:`trend`);
- flips: it changes, and the decided verdicts are better in one member and worse in another;
- holds: no change shown, and every member decided alike;
- inconclusive: no change shown, and some member did not decide or the decided verdicts differ (differing verdicts
  alone do not show a change: the same +0.02 in three members, within a margin of 0.03, is "worse" in one and
  "equivalent" in another in a quarter of simulated families, tests/test_family.py).
A factor takes the strongest label of its values (flips > changes > inconclusive > holds).

What each label risks (checked by simulation in tests/test_family.py): a factor's slope intervals are at 1 - alpha/k
each (Bonferroni over its k values), so when every value's effect is the same in every member the factor is labelled
"changes" or "flips" with probability at most alpha. "holds" rests on m members' verdicts, each member controlling its
own at alpha per factor: wrong with probability at most m x alpha (Bonferroni); "flips" also needs two of them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from ablate.design.spec import Nuisance
from ablate.stats import tuning

HOLDS, FLIPS, INCONCLUSIVE = "holds", "flips", "inconclusive"
CHANGES = "changes"
"""The first word of the label of a change; the rest names the axis: "changes with width", "changes across budgets"."""
DECIDED = ("better", "worse", "equivalent")


def changes(axis: str) -> str:
    """The label of an effect that moves along ``axis`` ("with width", "across budgets", "across members")."""
    return f"{CHANGES} {axis}"


def _strength(label: str) -> int:
    return {HOLDS: 0, INCONCLUSIVE: 1, FLIPS: 3}.get(label, 2 if label.startswith(CHANGES) else 1)


def consistency(verdicts: Mapping[str, str], change: tuple[float, float] = (math.nan, math.nan),
                axis: str = "across members") -> str:
    """One alternative's label from its verdicts against the base (member label -> verdict) and the interval of its
    effect's slope across members (:func:`trend`; NaN: no test, which shows no change)."""
    decided = [v for v in verdicts.values() if v in DECIDED]
    if change[0] > 0 or change[1] < 0:
        return FLIPS if {"better", "worse"} <= set(decided) else changes(axis)
    return HOLDS if len(decided) == len(verdicts) and len(set(decided)) == 1 else INCONCLUSIVE


def factor_consistency(labels: list[str]) -> str:
    """A factor's label from its values' labels: the strongest change wins."""
    return max(labels, key=_strength) if labels else INCONCLUSIVE


def trend(x: np.ndarray, diff: np.ndarray, se: np.ndarray, n: np.ndarray, alpha: float,
          pen_alt: np.ndarray | float = 0.0, pen_base: np.ndarray | float = 0.0) -> tuple[np.ndarray, ...]:
    """The slope of an effect against ``x`` across members (last axis) and its two-sided ``1 - alpha`` interval:
    (slope, lo, hi), each ``(...)``. ``diff``, ``se``, ``n``: each member's mean paired difference, its standard
    error and its paired seeds; ``pen_alt``, ``pen_base``: the two arms' tuning-penalty bounds per member.

    Least squares with equal weights: its variance is sum c_i^2 se_i^2 exactly, and its t quantile takes
    min(n_i) - 1 degrees of freedom, never more than Welch-Satterthwaite's, so the interval errs wide. Weights 1/se^2
    would be optimal with known variances, but each se here rests on 2 to 5 degrees of freedom: a member whose se
    came out small by chance then dominates and the variance is understated (7-11% false changes at a nominal 5% in
    simulations like those of tests/test_family.py, against at most 4.5% with equal weights). The interval is then
    widened by what mistuning can move the slope: a member's measured difference lies within ``[-pen_base, +pen_alt]``
    of the difference of the arms as tuned well (``ablate.stats.verdicts``), so the slope within the c-weighted sums of
    those."""
    x = np.asarray(x, dtype=float)
    diff, se = np.asarray(diff, dtype=float), np.asarray(se, dtype=float)
    xc = x - x.mean(axis=-1, keepdims=True)
    c = xc / (xc**2).sum(axis=-1, keepdims=True)
    slope = (c * diff).sum(axis=-1)
    df = np.asarray(n, dtype=float).min(axis=-1) - 1
    half = stats.t.isf(alpha / 2, np.where(df >= 1, df, np.nan)) * np.sqrt((c**2 * se**2).sum(axis=-1))
    p_alt, p_base = (np.where(np.isnan(p), np.inf, p) + 0 * c for p in map(np.asarray, (pen_alt, pen_base)))
    with np.errstate(invalid="ignore"):  # 0 x inf where c = 0: not taken
        down = np.where(c > 0, c * p_alt, np.where(c < 0, -c * p_base, 0.0)).sum(axis=-1)
        up = np.where(c > 0, c * p_base, np.where(c < 0, -c * p_alt, 0.0)).sum(axis=-1)
    return slope, slope - half - down, slope + half + up


def describe(verdicts: Mapping[str, str]) -> str:
    """``"equivalent at w64; better at w128, w256"``: members grouped by verdict, in member order."""
    groups: dict[str, list[str]] = {}
    for member, verdict in verdicts.items():
        groups.setdefault(verdict if verdict in DECIDED else "undecided", []).append(member)
    return "; ".join(f"{verdict} at {', '.join(members)}" for verdict, members in groups.items())


def compare(tables: Mapping[str, pd.DataFrame], positions: Mapping[str, float] | None = None, alpha: float = 0.05,
            axis: str = "across members") -> pd.DataFrame:
    """One row per alternative value (variant) across members: its verdict, difference and interval per member, the
    slope of its effect against the members' ``positions`` (default: their order) with its interval (``trend`` at
    ``alpha`` over the factor's number of values), its label and a sentence. ``tables``: member label -> verdict
    table."""
    members = list(tables)
    positions = positions or {m: float(i) for i, m in enumerate(members)}
    found = {v: {m: t for m, t in tables.items() if v in set(t["variant"])}
             for t in tables.values() for v in t["variant"] if v != "base"}  # fmt: skip
    factor_of = {v: next(iter(ts.values())).set_index("variant").at[v, "factor"] for v, ts in found.items()}
    rows = []
    for variant, where in found.items():
        k = sum(f == factor_of[variant] for f in factor_of.values())
        effects = {m: _effect(where[m], variant) for m in where}
        usable = [m for m, e in effects.items() if all(math.isfinite(e[key]) for key in ("diff", "se", "n"))]
        slope, lo, hi = (math.nan,) * 3
        if len({positions[m] for m in usable}) >= 2:
            got = [np.array([effects[m][key] for m in usable]) for key in ("diff", "se", "n", "pen_alt", "pen_base")]
            slope, lo, hi = (float(v) for v in trend(np.array([positions[m] for m in usable]), *got[:3], alpha / k,
                                                     *got[3:]))  # fmt: skip
        verdicts = {m: (effects[m]["verdict"] or "undecided") if m in effects else "not run" for m in members}
        row = {"factor": factor_of[variant], "variant": variant, "label": consistency(verdicts, (lo, hi), axis),
               "text": describe(verdicts), "trend": slope, "trend lo": lo, "trend hi": hi}
        for m in members:
            e = effects.get(m, {})
            row[f"{m}: verdict"] = verdicts[m]
            for key in ("diff", "lo", "hi"):
                row[f"{m}: {key}"] = e.get(key, math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def _effect(table: pd.DataFrame, variant: str) -> dict:
    """A member's comparison of ``variant`` with its base, from its verdict table: verdict, difference, interval,
    standard error, paired seeds and both arms' tuning penalties."""
    rows = table.set_index("variant")
    r, base = rows.loc[variant], rows.loc["base"] if "base" in rows.index else pd.Series(dtype=float)
    n = next((float(r[k]) for k in ("paired", "seeds") if k in r and pd.notna(r[k]) and r[k] > 0), math.nan)
    return {"verdict": r["verdict"], "diff": float(r["diff"]), "lo": float(r["lo"]), "hi": float(r["hi"]), "n": n,
            "se": float(r.get("se", math.nan)), "pen_alt": float(r.get("penalty", 0.0)),
            "pen_base": float(base.get("penalty", 0.0))}  # fmt: skip


def factors(compared: pd.DataFrame, answers: Mapping[str, list[dict]]) -> list[dict]:
    """Per factor: each member's answer (choice and its verdict), the factor's label and a sentence per value.
    ``answers``: member label -> ``analysis.answers`` of that member."""
    out = []
    keys = list(dict.fromkeys(a["factor"] for member in answers.values() for a in member))
    for factor in keys:
        rows = compared[compared["factor"] == factor] if not compared.empty else compared
        label = factor_consistency(list(rows["label"])) if len(rows) else INCONCLUSIVE
        choices = {m: next((f"{a['choice']} ({a['verdict']})" for a in member if a["factor"] == factor), "—")
                   for m, member in answers.items()}  # fmt: skip
        values = [f"{r.variant}: {r.text}" for r in rows.itertuples()]
        out.append({"factor": factor, "label": label, "choices": choices, "values": values})
    return out


def log_values(nuisance: Nuisance, u: np.ndarray) -> np.ndarray:
    """The natural log of the nuisance value at quantiles ``u`` (vectorised ``Nuisance.value_at``)."""
    u = np.clip(np.asarray(u, dtype=float), 0.0, 1.0)
    if nuisance.log:
        return math.log(nuisance.low) + u * (math.log(nuisance.high) - math.log(nuisance.low))
    return np.log(nuisance.low + u * (nuisance.high - nuisance.low))


def exponent_interval(tunings: list[tuning.Tuned], sds: list[float], widths: list[float], nuisance: Nuisance,
                      alpha: float, draws: int = tuning.DRAWS) -> tuple[float, float, float]:
    """b in best value ∝ width^b over the given members (each its tuning, its seed spread, its width): (b, lo, hi),
    b the least-squares slope of log value on log width through every member's chosen point, [lo, hi] the two-sided
    ``1 - alpha`` percentile interval of that slope over parametric-bootstrap draws of every member's choice
    (``tuning.bootstrap_choices``), member k's on a seed of its own: with one seed, draw j would give every member
    the same noise and the slope's spread would be wrong. NaN below two
    distinct widths; NaN ends when a member's spread is unknown (one tune seed per point)."""
    if len(set(widths)) < 2:
        return math.nan, math.nan, math.nan
    xc = np.log(np.asarray(widths, dtype=float))
    xc = xc - xc.mean()
    b = float(xc @ log_values(nuisance, [t.u for t in tunings]) / (xc @ xc))
    if not all(math.isfinite(sd) for sd in sds):
        return b, math.nan, math.nan
    chosen = np.stack([tuning.bootstrap_choices(t, sd, draws, seed=tuning.BOOTSTRAP_SEED + 1 + k)
                       for k, (t, sd) in enumerate(zip(tunings, sds, strict=True))], axis=-1)  # fmt: skip
    slopes = log_values(nuisance, chosen) @ xc / (xc @ xc)
    lo, hi = np.quantile(slopes, [alpha / 2, 1 - alpha / 2])
    return b, float(lo), float(hi)


def lr_by_width(tunings: Mapping[str, Mapping[str, tuning.Tuned | None]], spreads: Mapping[str, float],
                widths: Mapping[str, int], nuisance: Nuisance, alpha: float) -> pd.DataFrame:
    """Per variant, its chosen value of ``nuisance`` at each member's width (NaN where its tuning did not bracket
    the optimum: an edge point is only a bound), the exponent b of value ∝ width^b over the bracketed members and
    its interval (:func:`exponent_interval`). ``tunings``: member label -> variant -> its tuning (``plan.tuned``);
    ``spreads``: member label -> its seed spread at a fixed point (``plan.seed_spread``)."""
    variants = list(dict.fromkeys(v for member in tunings.values() for v in member))
    rows = []
    for variant in variants:
        fits = {m: member.get(variant) for m, member in tunings.items()}
        used = [m for m, t in fits.items() if t is not None and t.interior]
        row: dict = {"variant": variant}
        for m in tunings:
            row[f"lr @ {widths[m]}"] = nuisance.value_at(fits[m].u) if m in used else math.nan
        b, lo, hi = exponent_interval([fits[m] for m in used], [spreads[m] for m in used], [widths[m] for m in used],
                                      nuisance, alpha)  # fmt: skip
        row.update({key: round(v, 3) + 0.0 for key, v in (("exponent", b), ("exponent lo", lo), ("exponent hi", hi))})
        row["bracketed widths"] = len({widths[m] for m in used})  # (+ 0.0 above: no "-0.000" in a table)
        rows.append(row)
    return pd.DataFrame(rows)


def frontier(rows: pd.DataFrame, cost: str, quality: str = "value", tolerance: float = 0.01) -> pd.DataFrame:
    """The quality-against-cost frontier (lower is better for both), sorted by cost: rows that no other row beats
    at a cost at most ``tolerance`` (relative) above theirs. The tolerance makes arms matched to one budget, which
    overshoot it by up to one step, count as equally costly. Rows missing either value are never on it."""
    rows = rows.dropna(subset=[cost, quality]).sort_values([cost, quality])
    c, q = rows[cost].to_numpy(), rows[quality].to_numpy()
    keep = [not ((c <= c[i] * (1 + tolerance)) & (q < q[i])).any() for i in range(len(rows))]
    return rows[keep]
