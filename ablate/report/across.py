"""Answers compared across the members of a family of studies: the rungs of a size ladder, or one ablation run at
equal steps and at equal compute. Pure pandas/numpy on each member's verdict table (``analysis.verdict_table``).

Per alternative value, its verdicts against the base across members:
- holds: every member decided, and all alike;
- moves: decided verdicts differ, but never better in one member and worse in another ("better from w128 up");
- flips: better in one member, worse in another;
- inconclusive: the decided members agree, some did not decide.
A factor takes the strongest label of its values (flips > moves > inconclusive > holds).

Each member controls its own error rate (``alpha`` per factor, ``ablate.verdicts``); a statement that combines m
members' verdicts is wrong with probability at most m x alpha (Bonferroni), which the page states.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

HOLDS, MOVES, FLIPS, INCONCLUSIVE = "holds", "moves", "flips", "inconclusive"
DECIDED = ("better", "worse", "equivalent")
_STRENGTH = {HOLDS: 0, INCONCLUSIVE: 1, MOVES: 2, FLIPS: 3}


def consistency(verdicts: Mapping[str, str]) -> str:
    """One alternative's verdicts against the base, member label -> verdict, summed up in one label."""
    decided = {v for v in verdicts.values() if v in DECIDED}
    if {"better", "worse"} <= decided:
        return FLIPS
    if len(decided) > 1:
        return MOVES
    if len([v for v in verdicts.values() if v in DECIDED]) < len(verdicts):
        return INCONCLUSIVE
    return HOLDS


def factor_consistency(labels: list[str]) -> str:
    """A factor's label from its values' labels: the strongest change wins."""
    return max(labels, key=_STRENGTH.__getitem__) if labels else INCONCLUSIVE


def describe(verdicts: Mapping[str, str]) -> str:
    """``"equivalent at w64; better at w128, w256"``: members grouped by verdict, in member order."""
    groups: dict[str, list[str]] = {}
    for member, verdict in verdicts.items():
        groups.setdefault(verdict if verdict in DECIDED else "undecided", []).append(member)
    return "; ".join(f"{verdict} at {', '.join(members)}" for verdict, members in groups.items())


def compare(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per alternative value (variant) across members: its verdict, difference and interval per member,
    its label (holds/moves/flips/inconclusive) and a sentence. ``tables``: member label -> verdict table."""
    members = list(tables)
    variants = list(dict.fromkeys(v for t in tables.values() for v in t["variant"] if v != "base"))
    rows = []
    for variant in variants:
        found = {m: t.set_index("variant").loc[variant] for m, t in tables.items() if variant in set(t["variant"])}
        if not found:
            continue
        factor = next(iter(found.values()))["factor"]
        verdicts = {m: (found[m]["verdict"] or "undecided") if m in found else "not run" for m in members}
        row = {"factor": factor, "variant": variant, "label": consistency(verdicts), "text": describe(verdicts)}
        for m in members:
            r = found.get(m)
            row[f"{m}: verdict"] = verdicts[m]
            row[f"{m}: diff"] = float(r["diff"]) if r is not None else math.nan
            row[f"{m}: lo"] = float(r["lo"]) if r is not None else math.nan
            row[f"{m}: hi"] = float(r["hi"]) if r is not None else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


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


def lr_by_width(tables: Mapping[str, pd.DataFrame], widths: Mapping[str, int], step: float = 1.0) -> pd.DataFrame:
    """Per variant, its chosen learning rate at each member's width (NaN where its tuning did not bracket it, since
    an edge point is only a bound), the exponent b of a least-squares fit lr ~ width^b over the bracketed ones (NaN
    below two distinct widths) and its resolution: the tune grid's ``step`` (ratio of neighbouring learning rates)
    lets a chosen point sit anywhere within half a step of the true optimum at either end of the width range."""
    members = list(tables)
    variants = list(dict.fromkeys(v for t in tables.values() for v in t["variant"]))
    rows = []
    for variant in variants:
        row: dict = {"variant": variant}
        points = []
        for m in members:
            t = tables[m].set_index("variant")
            lr = float(t.loc[variant, "lr"]) if variant in t.index else math.nan
            fair = variant in t.index and bool(t.loc[variant, "bracketed"])
            row[f"lr @ {widths[m]}"] = lr if fair else math.nan
            if fair and math.isfinite(lr) and lr > 0:
                points.append((widths[m], lr))
        row["exponent"] = round(width_exponent(points), 3) + 0.0  # no "-0.000" in a table
        row["± (grid)"] = exponent_resolution(step, [w for w, _ in points])
        row["bracketed widths"] = len(points)
        rows.append(row)
    return pd.DataFrame(rows)


def width_exponent(points: list[tuple[float, float]]) -> float:
    """b in lr = a * width^b, least squares on the logs; NaN below two distinct widths."""
    if len({w for w, _ in points}) < 2:
        return math.nan
    x, y = np.log([w for w, _ in points]), np.log([lr for _, lr in points])
    return float(np.polyfit(x, y, 1)[0])


def exponent_resolution(step: float, widths: list[float]) -> float:
    """How far b can be off because each chosen learning rate is only known to within half a grid step at each end
    of the width range: log(step) / log(widest / narrowest). NaN below two distinct widths."""
    if len(set(widths)) < 2 or step <= 1:
        return math.nan
    return round(math.log(step) / math.log(max(widths) / min(widths)), 3)


def frontier(rows: pd.DataFrame, cost: str, quality: str = "value", tolerance: float = 0.01) -> pd.DataFrame:
    """The quality-against-cost frontier (lower is better for both), sorted by cost: rows that no other row beats
    at a cost at most ``tolerance`` (relative) above theirs. The tolerance makes arms matched to one budget, which
    overshoot it by up to one step, count as equally costly. Rows missing either value are never on it."""
    rows = rows.dropna(subset=[cost, quality]).sort_values([cost, quality])
    c, q = rows[cost].to_numpy(), rows[quality].to_numpy()
    keep = [not ((c <= c[i] * (1 + tolerance)) & (q < q[i])).any() for i in range(len(rows))]
    return rows[keep]
