"""Published claims put to the test: each claim of a study file (``spec.Claim``) judged from the study's own numbers.

A claim is **reproduced** when every one of its expectations is met, **not reproduced** when any is contradicted, and
**inconclusive** otherwise. The expectations, and what decides each:
- ``expect: {variant: verdict}``: the variant's verdict against the base (``ablate.verdicts``: paired test-loss
  differences, margin, Holm, alpha per factor). Met when the verdict is the expected one ("not worse": better or
  equivalent); contradicted when a decided verdict is another; an undecided verdict decides nothing.
- ``less_sensitive: A, than: B``: A's learning-rate sensitivity (Wortsman et al. 2023: over the learning rates both
  tried, the mean of min(val loss, L0) minus the best, L0 the uniform-guess loss, a diverged run at L0) is lower
  than B's by more than the margin; contradicted when higher by more than the margin. One run per learning rate
  gives no interval, which the verdict says.
- ``solves: [variant, ...]`` (a generated task scored by accuracy): the variant's seed runs' mean test accuracy,
  with its t-interval, against ``names.SOLVED_ACC``: met when the interval lies at or above it, contradicted when
  it lies below; a diverged run counts as accuracy 0 (it solved nothing).
- ``lr_exponent: {variant: [low, high]}`` (a family with a width ladder): b in best lr ∝ width^b lies in the range;
  contradicted when outside it; inconclusive without two widths whose tuning bracketed the optimum.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd

from ablate import names
from ablate.report.analysis import mean_ci
from ablate.spec import Claim, StudySpec

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
DECIDED = ("better", "worse", "equivalent")
MEETS = {"better": {"better"}, "worse": {"worse"}, "equivalent": {"equivalent"},
         "not worse": {"better", "equivalent"}, "not better": {"worse", "equivalent"}}  # fmt: skip


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


def judge_verdict(expected: str, measured: str) -> str:
    if measured in MEETS[expected]:
        return REPRODUCED
    return NOT_REPRODUCED if measured in DECIDED else INCONCLUSIVE


def lr_sensitivity(tune: pd.DataFrame, param: str, ceiling: float) -> float:
    """Mean over tune runs of min(val loss, ceiling) minus the best; a diverged or failed run counts at the ceiling.
    ``tune``: columns ``param``, ``value`` (final val loss, NaN when it diverged). NaN below two runs."""
    if len(tune) < 2 or not math.isfinite(ceiling):
        return math.nan
    losses = tune["value"].astype(float).fillna(ceiling).clip(upper=ceiling)
    return float((losses - losses.min()).mean())


def judge_sensitivity(lower: float, higher: float, margin: float) -> str:
    if math.isnan(lower) or math.isnan(higher):
        return INCONCLUSIVE
    if lower < higher - margin:
        return REPRODUCED
    return NOT_REPRODUCED if lower > higher + margin else INCONCLUSIVE


def judge_exponent(bounds: list[float], exponent: float, resolution: float = 0.0) -> str:
    """Reproduced when b ± resolution lies inside the expected range, not reproduced when it lies wholly outside."""
    if math.isnan(exponent):
        return INCONCLUSIVE
    res = 0.0 if math.isnan(resolution) else resolution
    lo, hi = exponent - res, exponent + res
    if bounds[0] <= lo and hi <= bounds[1]:
        return REPRODUCED
    return NOT_REPRODUCED if hi < bounds[0] or lo > bounds[1] else INCONCLUSIVE


def judge_solved(accuracies: list[float], threshold: float = names.SOLVED_ACC) -> tuple[str, float, float]:
    """Whether seed runs' test accuracies solve a task: (outcome, mean, half-width of the t-interval)."""
    mean, half = mean_ci(accuracies)
    if math.isnan(half):  # no seed, or one: no interval
        return INCONCLUSIVE, mean, half
    if mean - half >= threshold:
        return REPRODUCED, mean, half
    return (NOT_REPRODUCED if mean + half < threshold else INCONCLUSIVE), mean, half


def _solved_line(variant: str, seeds: pd.DataFrame) -> tuple[str, str]:
    mine = seeds[seeds["variant"] == variant] if len(seeds) else seeds
    key = names.test_metric("acc")
    if len(mine) and key not in mine:  # a task scored by loss or bpc (charlm): nothing says "solved"
        return INCONCLUSIVE, f"{variant}: expected to solve it, but its runs log no {key} (a task scored by accuracy)"
    accuracies = [0.0 if status == "diverged" else float(acc)
                  for status, acc in zip(mine.get("status", []), mine.get(key, []), strict=True)]  # fmt: skip
    outcome, mean, half = judge_solved(accuracies)
    solved = sum(a >= names.SOLVED_ACC for a in accuracies)
    measured = "no seed runs" if not accuracies else (
        f"test accuracy {mean:.3f}" + ("" if math.isnan(half) else f" ± {half:.3f}")
        + f" ({solved} of {len(accuracies)} seeds at or above {names.SOLVED_ACC:g})")
    return outcome, f"{variant}: expected to solve it (accuracy >= {names.SOLVED_ACC:g}), measured {measured}"


def judge(claim: Claim, spec: StudySpec, table: pd.DataFrame, tune: pd.DataFrame,
          exponents: Mapping[str, tuple[float, float]] | None = None, seeds: pd.DataFrame | None = None) -> dict:
    """One claim's verdict and a line per expectation (what was expected, what was measured, its outcome).

    ``table``: the study's verdict table (``analysis.verdict_table``); ``tune``: its tune runs (variant, the nuisance
    parameter, value, uniform_loss); ``exponents``: variant -> (b, its grid resolution) across a family's widths,
    None in a single study
    (its lr_exponent expectations are then left to the family page)."""
    rows = table.set_index("variant") if len(table) else pd.DataFrame()
    lines: list[tuple[str, str]] = []
    for variant, expected in claim.expect.items():
        r = rows.loc[variant] if variant in rows.index else None
        measured = (r["verdict"] or "undecided") if r is not None else "not run"
        detail = "" if r is None or math.isnan(r["diff"]) else \
            f" ({r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] test loss vs the base, {int(r['seeds'])} seeds)"
        outcome = judge_verdict(expected, measured)
        lines.append((outcome, f"{variant}: expected {expected}, measured {measured}{detail}"))
    if claim.less_sensitive:
        lines.append(_sensitivity_line(claim, spec, tune))
    lines += [_solved_line(variant, pd.DataFrame() if seeds is None else seeds) for variant in claim.solves]
    for variant, bounds in claim.lr_exponent.items():
        if exponents is None:
            continue
        b, res = exponents.get(variant, (math.nan, math.nan))
        measured = "no two bracketed widths" if math.isnan(b) else f"b = {b:+.2f} ± {res:.2f} (the tune grid's step)"
        lines.append((judge_exponent(bounds, b, res),
                      f"{variant}: best lr ∝ width^b, expected b in [{bounds[0]:+g}, {bounds[1]:+g}], {measured}"))
    verdict = combine([outcome for outcome, _ in lines])
    return {"verdict": verdict, "lines": [{"outcome": o, "text": t} for o, t in lines]}


def _sensitivity_line(claim: Claim, spec: StudySpec, tune: pd.DataFrame) -> tuple[str, str]:
    param = spec.nuisance[0].key
    ceiling = float(tune["uniform_loss"].dropna().max()) if "uniform_loss" in tune and len(tune) else math.nan
    arms = {v: tune[tune["variant"] == v] if len(tune) else tune for v in (claim.less_sensitive, claim.than)}
    common = set.intersection(*(set(a[param].round(12)) for a in arms.values())) if len(tune) else set()
    value = {v: lr_sensitivity(a[a[param].round(12).isin(common)], param, ceiling) for v, a in arms.items()}
    lo, hi = value[claim.less_sensitive], value[claim.than]
    outcome = judge_sensitivity(lo, hi, spec.margin)
    text = (f"LR sensitivity of {claim.less_sensitive} {lo:.3f} against {claim.than} {hi:.3f} nats (expected lower "
            f"by more than the margin {spec.margin:g}; one run per learning rate, so no interval)")
    return outcome, text


def lr_grid(tune: pd.DataFrame, param: str, arms: list[str], logits: Mapping[str, float]) -> pd.DataFrame:
    """Loss and divergence against the learning rate, arm by arm: per learning rate tried (rows), each arm's final
    val loss ("diverged" for a diverged run) and the largest attention logit over its training (``logits``: run id
    -> that logit; blank when not logged)."""
    rows = tune[tune["variant"].isin(arms)]
    out = pd.DataFrame({param: sorted(rows[param].round(12).unique())})
    for arm in arms:
        mine = rows[rows["variant"] == arm].assign(lr=lambda d: d[param].round(12)).set_index("lr")
        out[f"{arm}: val/loss"] = [_loss_text(mine, lr) for lr in out[param]]
        out[f"{arm}: max logit"] = [logits.get(mine.at[lr, "run_id"], math.nan) if lr in mine.index else math.nan
                                    for lr in out[param]]  # fmt: skip
    return out


def _loss_text(runs: pd.DataFrame, lr: float) -> str:
    if lr not in runs.index:
        return ""
    return "diverged" if runs.at[lr, "status"] == "diverged" else f"{runs.at[lr, 'value']:.4f}"


def setting(spec: StudySpec) -> str:
    """The scale and task a claim was tested at, for its caveats."""
    m, t, task = spec.base.model, spec.base.train, spec.base.task
    data = f"{task.name} ({task.source})" if task.name == "charlm" else task.name
    layers = f"{m.num_layers} layer{'s' * (m.num_layers != 1)}"
    return (f"tested at width {m.embed_dim}, {layers}, {t.steps} steps of {t.batch_size} x {task.seq_len} tokens"
            f" on {data}, {spec.min_seeds}-{spec.max_seeds} seeds per arm")
