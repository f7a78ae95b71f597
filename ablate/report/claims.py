"""Published claims put to the test: each claim of a study file (``study_file.Claim``) judged from its numbers.

A claim is **reproduced** when every one of its expectations is met, **not reproduced** when any is contradicted, and
**inconclusive** otherwise. Every expectation is judged by an interval, and an outcome is wrong only when its interval
misses the truth; the intervals other than the verdicts' are two-sided at 1 - alpha (the study's alpha), alpha/2 per
end, as the verdicts read theirs (``ablate.stats.verdicts.SIDES``). What decides each:

- ``expect: {variant: verdict}``: the variant's verdict against the base (``ablate.stats.verdicts``) and the verdict's
  interval ``[lo, hi]`` of the difference d of the arms as tuned well (test loss, variant minus base). Each expected
  verdict is a set of d: better d < -margin, worse d > 0, equivalent -margin <= d <= +margin, not worse d <= +margin
  (better or equivalent), not better d >= -margin (worse or equivalent). Met when the verdict is one the expectation
  allows; contradicted only when the interval lies wholly outside the set: better when lo >= -margin, worse when
  hi <= 0, equivalent when lo > +margin or hi < -margin, not worse when lo > +margin, not better when hi < -margin;
  else inconclusive. Another decided verdict is not enough: "worse" only says d > 0, and at d = +0.02 within a
  margin of 0.03 it comes out about half the time. When the expectation holds, a contradiction needs the interval to
  miss d, which happens with probability at most the verdict's level (at most alpha per factor).
- ``less_sensitive: A, than: B``: learning-rate sensitivity (Wortsman et al. 2023: over the learning rates both
  tried, the mean of min(val loss, L0) minus the best, L0 the uniform-guess loss, a diverged run at L0), computed
  per tune seed from that seed's runs, paired by tune seed; the mean paired difference A - B with its t-interval.
  Reproduced when the interval lies below -margin, not reproduced when above +margin, else inconclusive (also with
  fewer than 2 tune seeds: no interval). Each is wrong with probability at most alpha/2.
- ``solves: [variant, ...]`` (a generated task scored by accuracy): the seeds that solve it (test accuracy >=
  ``names.SOLVED_ACC``; a diverged seed solves nothing) and the Clopper-Pearson interval of the share that do.
  Reproduced when its low end is at least ``SOLVE_SHARE``, not reproduced when its high end is below, else
  inconclusive; each wrong with probability at most alpha/2, exactly (tests/test_claims.py sums the binomial).
- ``lr_exponent: {variant: [low, high]}`` (a family with a width ladder): b in best lr ∝ width^b, with the bootstrap
  interval of ``across.exponent_interval``; reproduced when the interval lies inside the range, not reproduced when
  wholly outside, inconclusive otherwise (or without two widths whose tuning bracketed the optimum, or without a
  seed spread to bootstrap from). The interval's coverage is checked by simulation, not proven.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import stats

from ablate.core import names
from ablate.design.spec import StudySpec
from ablate.design.study_file import Claim
from ablate.tasks.checks import TRAITS

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
DECIDED = ("better", "worse", "equivalent")
MEETS = {"better": {"better"}, "worse": {"worse"}, "equivalent": {"equivalent"},
         "not worse": {"better", "equivalent"}, "not better": {"worse", "equivalent"}}  # fmt: skip
SOLVE_SHARE = 0.5
"""What "solves it" claims: the variant solves the task on at least this share of seeds. Published claims of solving
report runs that got there, not that every run does (a seed can stay on the plateau, as our MQAR runs show), so
"every seed" would test a claim nobody made; "more often than not" is the weakest reading that still says the method
works. Deciding it at alpha = 0.05 takes 6 of 6 seeds (or 7 of 8) to reproduce, 0 of 6 to refute."""


def combine(labels: list[str]) -> str:
    """A claim's verdict from its expectations' outcomes."""
    if not labels:
        return INCONCLUSIVE
    if NOT_REPRODUCED in labels:
        return NOT_REPRODUCED
    return REPRODUCED if all(label == REPRODUCED for label in labels) else INCONCLUSIVE


def tally(verdicts: list[str]) -> str:
    """``"2 of 3 reproduced, 1 not reproduced"``: claims' verdicts counted, for a headline."""
    counts = {v: verdicts.count(v) for v in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)}
    rest = [f"{n} {v}" for v, n in counts.items() if n and v != REPRODUCED]
    return ", ".join([f"{counts[REPRODUCED]} of {len(verdicts)} reproduced", *rest])


def judge_verdict(expected: str, measured: str, lo: float = math.nan, hi: float = math.nan,
                  margin: float = math.nan) -> str:
    """An expected verdict against the measured one and its interval ``[lo, hi]`` (see the module docstring);
    without an interval nothing is contradicted."""
    if measured in MEETS[expected]:
        return REPRODUCED
    return NOT_REPRODUCED if _outside(expected, lo, hi, margin) else INCONCLUSIVE


def _outside(expected: str, lo: float, hi: float, m: float) -> bool:
    """Whether the interval lies wholly outside the differences the expectation allows (NaN: never)."""
    return {"better": lo >= -m, "worse": hi <= 0, "equivalent": lo > m or hi < -m,
            "not worse": lo > m, "not better": hi < -m}[expected]  # fmt: skip


def tune_ceiling(tune: pd.DataFrame) -> float:
    """What a diverged tune run scores: the uniform-guess loss, else just above every loss (as ``design.plan``)."""
    known = tune["uniform_loss"].dropna() if "uniform_loss" in tune else pd.Series(dtype=float)
    losses = tune["value"].dropna() if "value" in tune else pd.Series(dtype=float)
    return float(known.max()) if len(known) else (float(losses.max()) + 1.0 if len(losses) else 1.0)


def sensitivity(losses: np.ndarray, ceiling: float) -> np.ndarray:
    """LR sensitivity of runs over learning rates (last axis): the mean of min(loss, ceiling) minus its minimum; a
    diverged run (NaN) counts at the ceiling."""
    y = np.asarray(losses, dtype=float)
    y = np.minimum(np.where(np.isnan(y), ceiling, y), ceiling)
    return (y - y.min(axis=-1, keepdims=True)).mean(axis=-1)


def seed_sensitivities(tune: pd.DataFrame, param: str, arms: list[str], ceiling: float) -> tuple[pd.DataFrame, int]:
    """Each arm's LR sensitivity per tune seed (rows: the tune seeds every arm ran; columns: ``arms``), over the
    learning rates every arm ran on each of those seeds, and how many learning rates that is. ``tune``: columns
    variant, seed, ``param``, value (NaN: diverged)."""
    empty = pd.DataFrame(columns=arms, dtype=float), 0
    if tune.empty:
        return empty
    runs = tune[tune["variant"].isin(arms)]
    runs = runs.assign(lr=runs[param].astype(float).round(12), loss=runs["value"].astype(float).fillna(ceiling),
                       seed=runs.get("seed", 0))  # fmt: skip
    grids = {a: runs[runs["variant"] == a].pivot_table(index="seed", columns="lr", values="loss") for a in arms}
    seeds = sorted(set.intersection(*(set(g.index) for g in grids.values())))
    lrs = sorted(set.intersection(*(set(g.columns) for g in grids.values())))
    grids = {a: g.loc[seeds, lrs] for a, g in grids.items()}
    lrs = [lr for lr in lrs if not any(g[lr].isna().any() for g in grids.values())]  # every arm, every seed
    if len(lrs) < 2:
        return empty
    return pd.DataFrame({a: sensitivity(g[lrs].to_numpy(), ceiling) for a, g in grids.items()}, index=seeds), len(lrs)


def paired_interval(diffs: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mean of paired differences (last axis) and its two-sided ``1 - alpha`` t-interval; NaN ends below 2."""
    d = np.asarray(diffs, dtype=float)
    mean, n = d.mean(axis=-1), d.shape[-1]
    if n < 2:
        return mean, mean + math.nan, mean + math.nan
    half = stats.t.isf(alpha / 2, n - 1) * d.std(axis=-1, ddof=1) / math.sqrt(n)
    return mean, mean - half, mean + half


def judge_sensitivity(lo: float, hi: float, margin: float) -> str:
    """Lower sensitivity claimed (A - B): reproduced when the interval lies below -margin, not reproduced above."""
    if hi < -margin:
        return REPRODUCED
    return NOT_REPRODUCED if lo > margin else INCONCLUSIVE


def judge_exponent(bounds: list[float], lo: float, hi: float) -> str:
    """Reproduced when the exponent's interval lies inside the expected range, not reproduced when wholly outside."""
    if bounds[0] <= lo and hi <= bounds[1]:
        return REPRODUCED
    return NOT_REPRODUCED if hi < bounds[0] or lo > bounds[1] else INCONCLUSIVE


def judge_solved(solved: int, seeds: int, alpha: float) -> tuple[str, float, float]:
    """Whether a variant solves a task, from how many of its seeds did: (outcome, low, high end of the two-sided
    ``1 - alpha`` Clopper-Pearson interval of the share of seeds that solve it; NaN without a seed)."""
    if seeds == 0:
        return INCONCLUSIVE, math.nan, math.nan
    ci = stats.binomtest(solved, seeds).proportion_ci(confidence_level=1 - alpha, method="exact")
    if ci.low >= SOLVE_SHARE:
        return REPRODUCED, ci.low, ci.high
    return (NOT_REPRODUCED if ci.high < SOLVE_SHARE else INCONCLUSIVE), ci.low, ci.high


def level(alpha: float) -> str:
    """``"95%"``: the confidence of a two-sided ``1 - alpha`` interval, for a sentence."""
    return f"{100 * (1 - alpha):.3g}%"


def _solved_line(variant: str, seeds: pd.DataFrame, alpha: float) -> tuple[str, str]:
    mine = seeds[seeds["variant"] == variant] if len(seeds) else seeds
    key = names.test_metric("acc")
    expected = (f"{variant}: expected to solve it (test accuracy >= {names.SOLVED_ACC:g} on at least "
                f"{SOLVE_SHARE:.0%} of seeds)")
    if len(mine) and key not in mine:  # a task scored by loss or bpc (charlm): nothing says "solved"
        return INCONCLUSIVE, f"{variant}: expected to solve it, but its runs log no {key} (a task scored by accuracy)"
    accuracies = [0.0 if status == "diverged" else float(acc)
                  for status, acc in zip(mine.get("status", []), mine.get(key, []), strict=True)]  # fmt: skip
    solved = sum(a >= names.SOLVED_ACC for a in accuracies)
    outcome, lo, hi = judge_solved(solved, len(accuracies), alpha)
    if not accuracies:
        return outcome, f"{expected}, measured no seed runs"
    return outcome, (f"{expected}, measured {solved} of {len(accuracies)} seeds (share {level(alpha)} interval "
                     f"[{lo:.2f}, {hi:.2f}], Clopper-Pearson; mean test accuracy {np.mean(accuracies):.3f})")


def judge(claim: Claim, spec: StudySpec, table: pd.DataFrame, tune: pd.DataFrame,
          exponents: Mapping[str, tuple[float, float, float]] | None = None, seeds: pd.DataFrame | None = None) -> dict:
    """One claim's verdict and a line per expectation (what was expected, what was measured, its outcome).

    ``table``: the study's verdict table (``analysis.verdict_table``); ``tune``: its tune runs (variant, seed, the
    nuisance parameter, value, uniform_loss); ``exponents``: variant -> (b, lo, hi) across a family's widths
    (``across.lr_by_width``), None in a single study (its lr_exponent expectations are then left to the family
    page); ``seeds``: its seed runs (``analysis.seed_runs``)."""
    rows = table.set_index("variant") if len(table) else pd.DataFrame()
    lines = [_expect_line(variant, expected, rows, spec) for variant, expected in claim.expect.items()]
    if claim.less_sensitive:
        lines.append(_sensitivity_line(claim, spec, tune))
    lines += [_solved_line(v, pd.DataFrame() if seeds is None else seeds, spec.alpha) for v in claim.solves]
    if exponents is not None:
        lines += [_exponent_line(v, bounds, exponents, spec.alpha) for v, bounds in claim.lr_exponent.items()]
    verdict = combine([outcome for outcome, _ in lines])
    return {"verdict": verdict, "lines": [{"outcome": o, "text": t} for o, t in lines]}


def _expect_line(variant: str, expected: str, rows: pd.DataFrame, spec: StudySpec) -> tuple[str, str]:
    margin, r = spec.margin, rows.loc[variant] if variant in rows.index else None
    if r is None:
        return INCONCLUSIVE, f"{variant}: expected {expected}, measured not run"
    measured = r["verdict"] or "undecided"
    detail = "" if math.isnan(r["diff"]) else (
        f" ({r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] {names.outcome_label(spec.outcome, prose=True)} vs the "
        f"base, {int(r['seeds'])} seeds)")
    outcome = judge_verdict(expected, measured, float(r["lo"]), float(r["hi"]), margin)
    why = "" if outcome != INCONCLUSIVE or measured == "undecided" else \
        f"; its interval does not exclude {expected} (margin ±{margin:g})"
    return outcome, f"{variant}: expected {expected}, measured {measured}{detail}{why}"


def _sensitivity_line(claim: Claim, spec: StudySpec, tune: pd.DataFrame) -> tuple[str, str]:
    a, b = claim.less_sensitive, claim.than
    sens, lrs = seed_sensitivities(tune, spec.nuisance[0].key, [a, b], tune_ceiling(tune) if len(tune) else math.nan)
    expected = f"(expected lower by more than the margin {spec.margin:g})"
    if sens.empty:
        return INCONCLUSIVE, f"LR sensitivity of {a} against {b}: no tune seed ran both at two rates {expected}"
    if len(sens) < 2:
        return INCONCLUSIVE, (f"LR sensitivity of {a} {sens[a].iloc[0]:.3f} against {b} {sens[b].iloc[0]:.3f} "
                              f"{names.OUTCOME_UNITS[spec.outcome]} on "
                              f"1 tune seed and the {lrs} learning rates both tried: no interval, which needs 2 tune "
                              f"seeds (set tune_seeds: 4) {expected}")
    mean, lo, hi = paired_interval((sens[a] - sens[b]).to_numpy(), spec.alpha)
    return judge_sensitivity(lo, hi, spec.margin), (
        f"LR sensitivity of {a} {sens[a].mean():.3f} against {b} {sens[b].mean():.3f} "
        f"{names.OUTCOME_UNITS[spec.outcome]}: difference {mean:+.3f}, "
        f"{level(spec.alpha)} interval [{lo:+.3f}, {hi:+.3f}] over {len(sens)} tune seeds, paired, and the {lrs} "
        f"learning rates both tried {expected}")


def _exponent_line(variant: str, bounds: list[float], exponents: Mapping, alpha: float) -> tuple[str, str]:
    b, lo, hi = exponents.get(variant, (math.nan,) * 3)
    if math.isnan(b):
        measured = "no two widths whose tuning bracketed the optimum"
    elif math.isnan(lo):
        measured = f"b = {b:+.2f}, no interval (one tune seed per point: no seed spread to bootstrap)"
    else:
        measured = f"b = {b:+.2f}, {level(alpha)} interval [{lo:+.2f}, {hi:+.2f}] (bootstrap of each width's tuning)"
    return (INCONCLUSIVE if math.isnan(lo) else judge_exponent(bounds, lo, hi),
            f"{variant}: best lr ∝ width^b, expected b in [{bounds[0]:+g}, {bounds[1]:+g}], {measured}")


def lr_grid(tune: pd.DataFrame, param: str, arms: list[str], logits: Mapping[str, float],
            outcome: str) -> pd.DataFrame:  # fmt: skip
    """Loss and divergence against the learning rate, arm by arm: per learning rate tried (rows), each arm's final
    validation outcome (``outcome``: val/loss, val/bpb) over its tune seeds (the mean of those that completed, and how
    many diverged; "diverged" when all did) and the largest attention logit over their training (``logits``: run id
    -> that logit; blank when not logged)."""
    rows = tune[tune["variant"].isin(arms)]
    rows = rows.assign(lr=rows[param].astype(float).round(12))
    out = pd.DataFrame({param: sorted(rows["lr"].unique())})
    for arm in arms:
        at = dict(tuple(rows[rows["variant"] == arm].groupby("lr")))
        out[f"{arm}: {names.outcome_label(outcome, 'val')}"] = [_loss_text(at[lr]) if lr in at else ""
                                                               for lr in out[param]]  # fmt: skip
        out[f"{arm}: max logit"] = [_max_logit(at[lr], logits) if lr in at else math.nan for lr in out[param]]
    return out


def _loss_text(runs: pd.DataFrame) -> str:
    diverged = int((runs["status"] == "diverged").sum())
    done = runs.loc[runs["status"] != "diverged", "value"].astype(float)
    if done.empty:
        return "diverged"
    text = f"{done.mean():.4f}" + (f" (mean of {len(done)})" if len(done) > 1 else "")
    return text + (f", {diverged} of {len(runs)} diverged" if diverged else "")


def _max_logit(runs: pd.DataFrame, logits: Mapping[str, float]) -> float:
    found = [logits[r] for r in runs["run_id"] if r in logits]
    return max(found) if found else math.nan


def setting(spec: StudySpec) -> str:
    """The scale and task a claim was tested at, for its caveats."""
    m, t, task = spec.base.model, spec.base.train, spec.base.task
    data = f"{task.name} ({task.source})" if TRAITS[task.name].text else task.name
    layers = f"{m.num_layers} layer{'s' * (m.num_layers != 1)}"
    return (f"tested at width {m.embed_dim}, {layers}, {t.steps} steps of {t.batch_size} x {task.seq_len} tokens"
            f" on {data}, {spec.min_seeds}-{spec.max_seeds} seeds per arm")
