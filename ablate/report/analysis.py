"""The numbers behind the answer: per variant its tuning, its seed re-runs and its verdict against the base; per
factor the value to choose; health checks and, for search studies, parameter importances. Pandas/scipy only.

The verdicts come from ``ablate.stats.verdicts`` on the same results the runner decided its seeds with
(``ablate.design.plan.arm_results`` of the Optuna trials), so the page and the plan cannot disagree. Selection is on
validation (each variant's chosen learning rate), verdicts on the test split (the seed re-runs' test loss, a
diverged run counted at the uniform-guess loss). Lower is better.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import optuna
import pandas as pd
from scipy import stats

from ablate.core import names
from ablate.core.config import fmt, to_dict
from ablate.design import plan
from ablate.report.load import StudyData, completed
from ablate.report.wording import value_label
from ablate.stats import verdicts
from ablate.stats.answers import answer_factor

LEVEL = 0.95
COST_KEYS = (names.PARAMS, names.FLOPS_PER_TOKEN, names.FLOPS_TOTAL, names.TOKENS_PER_S, names.WALL_S)
CHOICE_COST = names.PARAMS
"""What "the cheapest" of equivalent values means: fewest parameters (FLOPs per token follow them here)."""
FAIR_LEVEL = 0.95
"""The tuning penalty a page calls "fair" against the margin: its 95% bootstrap bound (``stats.tuning``), stricter
than the bound the verdicts are widened by."""


def mean_ci(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its t-interval (NaN half-width below 2 values)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan
    if len(values) < 2:
        return float(values.mean()), math.nan
    half = stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def seed_runs(data: StudyData) -> pd.DataFrame:
    """Seed-phase runs with an outcome (completed: test loss; diverged: the uniform-guess loss)."""
    t = data.trials
    if t.empty or "phase" not in t or "outcome" not in t:
        return t.iloc[0:0]
    return t[(t["phase"] == "seed") & t["outcome"].notna() & t["status"].isin(names.OUTCOMES)]


def tune_runs(data: StudyData) -> pd.DataFrame:
    """Tune-phase runs that are results (completed, or diverged: a learning rate too high is an outcome too)."""
    t = data.trials
    if t.empty or "phase" not in t:
        return t.iloc[0:0]
    return t[(t["phase"] == "tune") & t["status"].isin(names.OUTCOMES)]


def plan_results(data: StudyData) -> list[plan.Result]:
    return plan.results_of(data.study.get_trials(deepcopy=False))


def variant_value(variant: str, factor: str, data: StudyData) -> object:
    """The scientific value a variant sets."""
    if factor and variant != "base":
        return data.spec.variant(variant).values[factor] if variant in _names(data) else variant.partition("=")[2]
    return ""


def _names(data: StudyData) -> set[str]:
    return {v.name for v in data.spec.variants()}


def base_value(factor: str, data: StudyData) -> object:
    return data.spec.base_value(factor)


def variant_order(data: StudyData) -> list[str]:
    """Variants as the study file lists them, base first (then any other variant a search produced)."""
    planned = [v.name for v in data.spec.variants()]
    seen = [v for v in dict.fromkeys(data.trials["variant"]) if v and v not in planned] if "variant" in data.trials \
        else []  # fmt: skip
    present = set(data.trials["variant"]) if "variant" in data.trials else set()
    return [v for v in planned if v in present] + seen


def _factor(variant: str, data: StudyData) -> str:
    return data.spec.variant(variant).factor if variant in _names(data) else ""


def _changed(variant: str, factor: str, data: StudyData) -> str:
    if variant == "base" or not factor:
        return "—"
    return f"{factor}: {display(base_value(factor, data))} → {display(variant_value(variant, factor, data))}"


def display(value: object) -> str:
    """Short, stable text for a config value or number in a table (``null`` as a study file writes it)."""
    return fmt(value, digits=4)


def basin(tune: pd.DataFrame, param: str, margin: float) -> tuple[float, float]:
    """The range of ``param`` over the tried points whose seed mean of val/loss is within ``margin`` of the best
    mean: how much the choice tolerates a mistuned learning rate (NaN without two completed points)."""
    done = completed(tune)
    if param not in done or done[param].nunique() < 2:
        return math.nan, math.nan
    means = done.groupby(param)["value"].mean()
    near = means[means <= means.min() + margin].index.astype(float)
    return float(near.min()), float(near.max())


def verdict_table(data: StudyData, results: list[plan.Result]) -> pd.DataFrame:
    """One row per variant (base first): its tuning, its seed re-runs, its verdict against the base, its costs.
    ``results`` are the study's trials as the plan sees them (``plan_results``), read once per report."""
    spec = data.spec
    arms = plan.arm_results(spec, results)
    comparisons = {c.name: c for c in _comparisons(data, arms)}
    sd = plan.seed_spread(spec, results) if spec.nuisance else math.nan
    runs, t = seed_runs(data), data.trials
    param = spec.nuisance[0].key if spec.nuisance else ""
    rows = []
    for variant in variant_order(data):
        mine = t[t["variant"] == variant]
        tune = mine[mine["phase"] == "tune"]
        seeds = runs[runs["variant"] == variant]
        factor = _factor(variant, data)
        test_mean, test_ci = mean_ci(seeds["outcome"].to_numpy())
        val = completed(mine[mine["phase"] == "seed"])["value"].to_numpy()
        c = comparisons.get(variant)
        tried = [r for r in results if r.variant == variant and r.phase == "tune"]
        cells = {plan.cell_of(spec, r.point) for r in tried}
        chosen = plan.chosen_point(spec, tried) if spec.nuisance else None
        lo, hi = basin(tune, param, spec.margin) if param else (math.nan, math.nan)
        row = {
            "variant": variant, "factor": factor, "value": variant_value(variant, factor, data),
            "changed": _changed(variant, factor, data), "seeds": len(seeds),
            "diverged": int((seeds["status"] == "diverged").sum()), "test_mean": test_mean, "test_ci": test_ci,
            "val_mean": float(val.mean()) if len(val) else math.nan,
            "diff": c.mean if c else math.nan, "lo": c.lo if c else math.nan, "hi": c.hi if c else math.nan,
            "level": c.level if c else math.nan, "look": c.look if c else 0, "verdict": c.verdict if c else "",
            "se": c.se if c else math.nan, "paired": c.n if c else 0,
            "lr": chosen[param] if chosen else math.nan, "tune_points": len(cells),
            "tune_runs": len(tried), "extra_points": sum(cell >= spec.points for cell in cells),
            "penalty": arms[variant].penalty if variant in arms else math.nan,
            "penalty_95": plan.penalty(spec, tried, sd, FAIR_LEVEL) if spec.nuisance else 0.0, "seed_sd": sd,
            "edge": ", ".join(f"{end}" for _, end in plan.edge_of_tried(spec, tried)) if spec.nuisance else "",
            "basin_lo": lo, "basin_hi": hi,
        }
        row["bracketed"] = bool(chosen) and not row["edge"]
        row["fair"] = bool(chosen) and row["penalty_95"] < spec.margin  # shown to cost less than the margin
        for key in length_metrics(data):
            row[key] = float(seeds[key].mean()) if key in seeds and seeds[key].notna().any() else math.nan
        done = completed(mine)
        for key in COST_KEYS:
            row[key] = float(done[key].mean()) if key in done and done[key].notna().any() else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


LONGER = re.compile(r"^test/(\w+)_(\d+)x$")  # names.at_length: a test metric scored at k x the training length


def length_metrics(data: StudyData) -> list[str]:
    """The task's test metric at 1x and at every longer length some run was scored at (``task.eval_lengths``),
    then recall's solved multiple: the columns of length generalisation, in order. Empty when none was logged."""
    longer = [c for c in data.trials.columns if isinstance(c, str) and LONGER.match(c)]
    if not longer:
        return []
    metric = next((m.group(1) for c in longer if (m := LONGER.match(c)) and m.group(1) != "loss"), "loss")
    keys = sorted((c for c in longer if LONGER.match(c).group(1) == metric), key=lambda c: int(LONGER.match(c)[2]))
    return [f"test/{metric}", *keys] + ([names.SOLVED_X] if names.SOLVED_X in data.trials else [])


def _comparisons(data: StudyData, arms: dict[str, verdicts.ArmResult]) -> list[verdicts.Comparison]:
    rule = plan.rule(data.spec)
    if rule is None or data.kind != "ablation":
        return []
    out = []
    for alternatives in plan.factors(data.spec).values():
        out += verdicts.judge_factor(arms["base"], [arms[a] for a in alternatives], rule)
    return out


def answers(data: StudyData, table: pd.DataFrame, results: list[plan.Result]) -> list[dict]:
    """Per scientific factor: the value to choose, whether that is decided at the factor's alpha and at the study's
    share of it (``verdicts.judge_study``), why, the error rate each controls, and the seeds that would decide the
    alternatives still undecided."""
    rule = plan.rule(data.spec)
    costs = {r["variant"]: (r[names.PARAMS], r[names.FLOPS_PER_TOKEN], 1 / r[names.TOKENS_PER_S])
             for _, r in table.iterrows()} if len(table) else {}  # fmt: skip
    arms = {k: replace(a, cost=costs.get(k, math.nan)) for k, a in plan.arm_results(data.spec, results).items()}
    factors = {f: [arms[a] for a in alternatives] for f, alternatives in plan.factors(data.spec).items()}
    wide = verdicts.judge_study(arms["base"], factors, rule) if rule else {}
    out = []
    for factor, alternatives in factors.items():
        bval = arm_label("base", factor, data)
        base_key = f"{factor}={display(base_value(factor, data))}"
        if rule is None:
            out.append({"factor": factor, "choice": bval, "choice_key": base_key, "verdict": "undecided",
                        "decided": False, "statement": "", "study_decided": False, "seeds": "",
                        "text": f"Undecided: this study runs {data.spec.min_seeds} seed per variant; a verdict needs "
                                "at least 2 (set seeds: 3 or more)."})
            continue
        comparisons = verdicts.judge_factor(arms["base"], alternatives, rule)
        answer = answer_factor(arms["base"], comparisons, alternatives)
        study = answer_factor(arms["base"], wide[factor], alternatives)
        chosen = next((c for c in comparisons if c.name == answer.choice), None)
        if chosen and (answer.decided or chosen.verdict == "better"):
            label = chosen.verdict
        else:
            label = "keep base" if answer.decided else "undecided"  # a best guess is not labelled by its verdict
        choice = arm_label(answer.choice, factor, data) if chosen else bval
        labels = {a.name: arm_label(a.name, factor, data) for a in alternatives}
        text = in_words(answer.reason, labels, bval) + in_words(_cost_sentence(table, answer.choice), labels)
        out.append({"factor": factor, "choice": choice, "choice_key": answer.choice if chosen else base_key,
                    "verdict": label, "decided": answer.decided,
                    "study_decided": study.decided and study.choice == answer.choice,
                    "text": text, "statement": rule.statement(len(alternatives)),
                    "seeds": in_words(_seeds_line(verdicts.seeds_to_decide_factor(comparisons, rule),
                                                  data.spec.max_seeds), labels, bval)})  # fmt: skip
    return out


def arm_label(variant: str, factor: str, data: StudyData) -> str:
    """The value ``variant`` gives ``factor``, as a person says it (``wording.value_label``)."""
    values = data.spec.variant(variant).values if variant in _names(data) else {}
    model = {**to_dict(data.spec.base)["model"], **{k.split(".", 1)[1]: v for k, v in values.items()
                                                      if k.startswith("model.")}}  # fmt: skip
    value = values[factor] if factor in values else base_value(factor, data)
    return value_label(factor, value, model)


def in_words(text: str, labels: dict[str, str], base_label: str = "") -> str:
    """``text`` with each variant's config name (``model.num_heads=8``) in words, and (given ``base_label``) the
    base's first mention named by its value."""
    for name in sorted(labels, key=len, reverse=True):
        text = text.replace(name, labels[name])
    if not base_label:
        return text
    first = "Keep base" if "Keep base" in text else "base"  # the first mention is named; the rest stay short
    text = re.sub(rf"\b{first}\b", first.replace("base", f"the base ({base_label})"), text, count=1)
    return text[:1].upper() + text[1:]  # a sentence may now start with a value: "8 heads", "width 128"


def study_statement(data: StudyData) -> str:
    """What the whole study's answers control together (``verdicts.Rule.study_statement``); empty without a rule."""
    rule, factors = plan.rule(data.spec), [a for a in plan.factors(data.spec).values() if a]
    return rule.study_statement(len(factors), sum(map(len, factors))) if rule and factors else ""


def _seeds_line(needed: dict[str, int | None], seeds: int) -> str:
    """What more compute would buy: per undecided alternative, the paired seeds that would decide it if its numbers
    held (``verdicts.seeds_to_decide``)."""
    if not needed:
        return ""
    parts = [f"{name}: {n} seeds" if n else f"{name}: not within 64 seeds at its mean and spread (or nothing to plan "
             "with: under 2 seeds, or an unbounded tuning penalty)"
             for name, n in needed.items()]
    return (f"Seeds that would decide the undecided at the margin, if their mean and spread held (this study ran at "
            f"most {seeds}): " + "; ".join(parts) + ".")


def _cost_sentence(table: pd.DataFrame, variant: str) -> str:
    if variant == "base" or table.empty:
        return ""
    row, base = table.set_index("variant").loc[variant], table.set_index("variant").loc["base"]
    what = ((names.PARAMS, "parameters"), (names.FLOPS_PER_TOKEN, "FLOPs per token"), (names.TOKENS_PER_S, "tokens/s"))
    costs = [ratio_text(row[k], base[k], w) for k, w in what]
    costs = [c for c in costs if c]
    return f" It costs {', '.join(costs)}." if costs else ""


def _edge_text(data: StudyData, r: pd.Series) -> str:
    """Why a variant's chosen point is the most extreme one tried, and what the user can do about it."""
    p = data.spec.nuisance[0]
    where = {"high": "the highest", "low": "the lowest", "only": "the only"}
    ends = " and ".join(where.get(e.strip(), e) for e in r["edge"].split(","))
    if math.isclose(r["lr"], p.high) or math.isclose(r["lr"], p.low):
        why = "it sits at a hard limit of the range: widen the range"
    elif r["extra_points"] >= data.spec.max_extra_points:
        why = f"the bracketing search used its {data.spec.max_extra_points} extra points: raise max_extra_points"
    else:
        why = "no further point was tried: resume the study to finish its tuning"
    return (f"{ends} value tried ({int(r['tune_points'])} points, {int(r['extra_points'])} beyond the first); {why}. "
            "Its optimum may lie beyond, so its comparison may be unfair.")


def ratio_text(value: float, base: float, what: str) -> str:
    if math.isnan(value) or math.isnan(base) or base == 0:
        return ""
    return f"{value / base:.2f}× the base's {what}"


def tuning_warnings(data: StudyData, table: pd.DataFrame) -> list[dict]:
    """Each variant whose chosen point is the most extreme point tried: its comparison is not known to be fair."""
    out = []
    for _, r in table.iterrows():
        if r["tune_points"] == 0 or r["bracketed"]:
            continue
        if pd.isna(r["lr"]):
            text = f"{r['variant']}: no tune run completed (all diverged or failed): nothing to re-run on seeds."
        else:
            chosen = f"the chosen {data.spec.nuisance[0].key} = {display(r['lr'])}"
            text = f"{r['variant']}: {chosen} is " + _edge_text(data, r)
        out.append({"variant": r["variant"], "text": text})
    return out


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
    done = completed(data.trials)
    keys = varied_params(data, done) or varied_params(data)
    cols = ["trial", "value"] + [c for c in (names.BEST_VAL_LOSS,) if c in done] + keys
    return done.sort_values("value").head(n)[cols]


COST_LENGTHS = 6  # the training length and five doublings beyond it: 16 -> 512, 64 -> 2048


def kind_costs(data: StudyData, table: pd.DataFrame) -> dict | None:
    """Self-attention against its recurrent baselines (``model.kind``) in cost: per kind its parameters, training
    FLOPs per token at the training length and at doublings of it, and the throughput it measured here; per
    recurrent kind the length from which attention spends more FLOPs per token (``sizes.crossover_from``: the
    Transformer's per-token cost grows by ``sizes.attention_slope`` per token of context, an RNN's does not).
    None when the study compares no model kinds."""
    from ablate.core import sizes  # counting only: budget imports no torch

    if "model.kind" not in data.spec.scientific:
        return None
    by_variant = table.set_index("variant")
    kinds = {data.spec.variant(v).values["model.kind"]: by_variant.loc[v] for v in by_variant.index
             if v in _names(data) and _factor(v, data) in ("", "model.kind")}  # fmt: skip
    if len(kinds) < 2 or "transformer" not in kinds:
        return None
    T, slope = data.spec.base.task.seq_len, sizes.attention_slope(data.spec.base.model)
    lengths = [T * 2**i for i in range(COST_LENGTHS)]
    rows = []
    for kind, arm in kinds.items():
        growth = [slope * (n - T) if kind == "transformer" else 0 for n in lengths]
        rows.append({"kind": kind, "params": arm[names.PARAMS], "tokens/s here": arm[names.TOKENS_PER_S],
                     **{f"FLOPs/token at {n}": arm[names.FLOPS_PER_TOKEN] + g
                        for n, g in zip(lengths, growth, strict=True)}})  # fmt: skip
    attention = kinds["transformer"][names.FLOPS_PER_TOKEN]
    crossover = {kind: sizes.crossover_from(attention, T, arm[names.FLOPS_PER_TOKEN], slope)
                 for kind, arm in kinds.items() if kind != "transformer" and math.isfinite(arm[names.FLOPS_PER_TOKEN])
                 and math.isfinite(attention)}  # fmt: skip
    return {"table": pd.DataFrame(rows), "crossover": crossover, "seq_len": T}
