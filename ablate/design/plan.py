"""Which trials a study runs: a pure function of the study spec and the results so far.

Ablation, per variant (the same rule for every arm):
1. Tune: the spec's first points (``StudySpec.first_points``), each on ``tune_seeds`` tune seeds (``tune_seed``:
   never a verdict seed). Then, while the best point (lowest seed mean of val loss, a diverged run at the
   uniform-guess loss) is the most extreme point tried along a nuisance dimension, one more point one step (a grid
   cell) beyond it on every tune seed, up to the range's hard limits and ``max_extra_points``.
2. Seeds: once its tuning is final, seeds 1..min_seeds at the chosen point (``ablate.stats.tuning``: the vertex of the
   parabola through the best seed mean and its neighbours, with one nuisance parameter; the best point with more).
3. More seeds: once every arm has finished look 1, the arms the verdict rule leaves undecided at the study-wide
   share of alpha (and the base, which every comparison is paired with) get seeds up to max_seeds
   (``ablate.stats.verdicts``).

Because every decision is a function of finished trials, a study killed and resumed reaches the same plan.
Search: one trial per variant first (so no arm is starved by the sampler), then the sampler's own trials.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ablate.core import names
from ablate.design import recovery
from ablate.design.spec import StudySpec, Variant
from ablate.stats import tuning, verdicts

EPS = 1e-9


@dataclass(frozen=True)
class PlannedTrial:
    phase: str  # "tune" or "seed" (ablation), "arm" (search: one per variant first)
    variant: Variant
    point: int  # tune: cell * tune_seeds + the tune seed's index (``cell_of``, ``tune_seed``); seed: train.seed
    params: dict[str, Any]  # what is enqueued: scientific values + nuisance values

    @property
    def key(self) -> tuple[str, str, int]:
        return self.phase, self.variant.name, self.point


@dataclass(frozen=True)
class Result:
    """A trial as the plan and the verdicts see it (from Optuna's trial and its user attrs)."""

    phase: str
    variant: str
    point: int
    state: str  # Optuna state name: WAITING, RUNNING, COMPLETE, PRUNED, FAIL
    status: str  # the trainer's: completed, diverged, stopped, failed ("" while not finished)
    params: dict[str, Any] = field(default_factory=dict)
    value: float | None = None  # validation loss: selects the tune point
    outcome: float | None = None  # the verdict metric: test loss, or uniform_loss for a diverged run

    @property
    def finished(self) -> bool:
        return self.state not in ("WAITING", "RUNNING")


def result_of(trial: Any) -> Result:
    """A Result from an Optuna FrozenTrial."""
    attrs = trial.user_attrs
    outcome = attrs.get(names.ATTR_OUTCOME)
    return Result(
        phase=attrs.get(names.ATTR_PHASE, ""),
        variant=attrs.get(names.ATTR_VARIANT, ""),
        point=int(attrs.get(names.ATTR_POINT, -1)),
        state=trial.state.name,
        status=names.status_of(attrs.get(names.ATTR_STATUS), trial.state.name),
        params=dict(trial.params),
        value=trial.value if trial.state.name == "COMPLETE" else None,
        outcome=float(outcome) if outcome is not None else None,
    )


def results_of(trials: Iterable[Any]) -> list[Result]:
    """Results in trial order; of a planned key tried more than once, the latest attempt only (the earlier ones
    were interrupted, lost their worker or raised, and were re-queued: ``ablate.design.recovery``)."""
    return [result_of(t) for t in recovery.current_attempts(list(trials))]


def cell_of(spec: StudySpec, point: int) -> int:
    """The tune cell (nuisance point) of a tune trial's point index; its tune seeds are the cell's other indices."""
    return point // spec.tune_seeds


def tune_seed(spec: StudySpec, point: int) -> int:
    """train.seed of a tune trial: ``tuning.TUNE_SEED0`` + the index of its tune seed, the same for every arm."""
    return tuning.TUNE_SEED0 + point % spec.tune_seeds


def seed_of(spec: StudySpec, phase: str, point: int) -> int:
    """train.seed of a planned trial: a seed run's point is its seed; a tune run's is ``tune_seed``."""
    if phase == "seed":
        return point
    return tune_seed(spec, point) if phase == "tune" else spec.base.train.seed


def rule(spec: StudySpec) -> verdicts.Rule | None:
    """The study's decision rule; None below 2 seeds per arm, where nothing can be decided."""
    if spec.min_seeds < 2:
        return None
    return verdicts.Rule(margin=spec.margin, alpha=spec.alpha, min_seeds=spec.min_seeds, max_seeds=spec.max_seeds)


def first_trials(spec: StudySpec) -> list[PlannedTrial]:
    """What a new study enqueues: every variant's first tune points, point-major (point 0 of every variant, then
    point 1, ...) so a study cut short still gives every variant the same points. No nuisance: seeds directly."""
    variants = spec.variants()
    if spec.kind == "search":
        first = spec.at(spec.first_points()[0]) if spec.nuisance else {}
        return [PlannedTrial("arm", v, 0, {**v.values, **first}) for v in variants]
    if not spec.nuisance:
        return [PlannedTrial("seed", v, s, dict(v.values)) for s in range(1, spec.min_seeds + 1) for v in variants]
    ts = spec.tune_seeds
    return [PlannedTrial("tune", v, i * ts + r, {**v.values, **spec.at(q)})
            for i, q in enumerate(spec.first_points()) for r in range(ts) for v in variants]  # fmt: skip


def next_trials(spec: StudySpec, results: list[Result]) -> list[PlannedTrial]:
    """Trials to enqueue now (none already planned); empty when the plan is complete or waits on running trials."""
    if spec.kind != "ablation":
        return []
    planned = {(r.phase, r.variant, r.point) for r in results}
    out: list[PlannedTrial] = []
    for variant in spec.variants():
        out += _variant_next(spec, variant, [r for r in results if r.variant == variant.name])
    out += _more_seeds(spec, results)
    return [p for p in dict((p.key, p) for p in out).values() if p.key not in planned]


def _variant_next(spec: StudySpec, variant: Variant, mine: list[Result]) -> list[PlannedTrial]:
    tune = [r for r in mine if r.phase == "tune"]
    if spec.nuisance and (not tune or not all(r.finished for r in tune)):
        return []
    if spec.nuisance:
        extra = bracket_step(spec, tune)
        if extra is not None:
            cell = max(cell_of(spec, r.point) for r in tune) + 1
            return [PlannedTrial("tune", variant, cell * spec.tune_seeds + i, {**variant.values, **extra})
                    for i in range(spec.tune_seeds)]  # fmt: skip
    chosen = chosen_point(spec, tune)
    if spec.nuisance and chosen is None:
        return []  # nothing completed: the report says so
    return [PlannedTrial("seed", variant, s, {**variant.values, **(chosen or {})})
            for s in range(1, spec.min_seeds + 1)]  # fmt: skip


def chosen_point(spec: StudySpec, tune: list[Result]) -> dict[str, Any] | None:
    """The nuisance values an arm's seeds run at (``ablate.stats.tuning``), or None before any tune run completed."""
    cells = _cells(spec, tune)
    if not any(c.completed for c in cells):
        return None
    arm = tuned(spec, tune)
    if arm is not None and arm.interior:
        p = spec.nuisance[0]
        return {p.key: p.value_at(arm.u)}
    return dict(_best(cells, _ceiling(tune)).params)  # at an edge (or several nuisance keys): the best as tried


@dataclass(frozen=True)
class _Cell:
    """One tried nuisance point of an arm: its values, its quantiles and its tune seeds' results."""

    params: dict[str, Any]
    quantiles: dict[str, float]
    losses: list[float]  # final val loss per finished run, NaN for a diverged one
    completed: int


def _cells(spec: StudySpec, tune: list[Result]) -> list[_Cell]:
    """The arm's tried points: runs that completed or diverged, grouped by their nuisance values."""
    groups: dict[tuple, list[Result]] = {}
    for r in tune:
        if r.status in names.OUTCOMES and all(p.key in r.params for p in spec.nuisance):
            groups.setdefault(tuple(round(float(r.params[p.key]), 12) for p in spec.nuisance), []).append(r)
    out = []
    for runs in groups.values():
        params = {p.key: runs[0].params[p.key] for p in spec.nuisance}
        losses = [r.value if r.status == "completed" and r.value is not None else math.nan for r in runs]
        out.append(_Cell(params, {p.key: p.quantile(params[p.key]) for p in spec.nuisance}, losses,
                         sum(math.isfinite(v) for v in losses)))
    return out


def tuned(spec: StudySpec, tune: list[Result]) -> tuning.Tuned | None:
    """An arm with one nuisance parameter: its tuning (seed means, the choice) in quantile units; else None."""
    if len(spec.nuisance) != 1:
        return None
    key = spec.nuisance[0].key
    cells = _cells(spec, tune)
    runs = [(c.quantiles[key], v) for c in cells for v in c.losses]
    return tuning.tune([u for u, _ in runs], [v for _, v in runs], ceiling=_ceiling(tune)) if runs else None


def _ceiling(tune: list[Result]) -> float:
    """What a diverged tune run scores: the uniform-guess loss (a diverged run's outcome), else above every loss."""
    known = [r.outcome for r in tune if r.status == "diverged" and r.outcome is not None]
    losses = [r.value for r in tune if r.value is not None]
    return max(known) if known else (max(losses) + 1.0 if losses else 1.0)


def _best(cells: list[_Cell], ceiling: float) -> _Cell:
    """The tried point with the lowest seed mean (a diverged run at ``ceiling``, as ``tuned`` scores it); the lowest
    point wins a tie."""
    return min(cells, key=lambda c: (float(np.mean([v if math.isfinite(v) else ceiling for v in c.losses])),
                                     tuple(c.quantiles.values())))  # fmt: skip


def bracket_step(spec: StudySpec, tune: list[Result]) -> dict[str, Any] | None:
    """The next tune point of a variant whose best point is not yet bracketed, or None when tuning is final."""
    extra = len({cell_of(spec, r.point) for r in tune if cell_of(spec, r.point) >= spec.points})
    if extra >= spec.max_extra_points:
        return None
    cells = _cells(spec, tune)
    if not cells:
        return None
    step = 1.0 / spec.points
    q = {p.key: [c.quantiles[p.key] for c in cells] for p in spec.nuisance}
    if not any(c.completed for c in cells):  # everything diverged: step down from the lowest point tried
        low = {p.key: min(q[p.key]) for p in spec.nuisance}
        if all(u <= EPS for u in low.values()):
            return None
        return spec.at({k: max(0.0, u - step) for k, u in low.items()})
    best = _best(cells, _ceiling(tune)).quantiles
    for p in spec.nuisance:
        u = best[p.key]
        if u >= max(q[p.key]) - EPS and u < 1 - EPS:
            return spec.at({**best, p.key: min(1.0, u + step)})
        if u <= min(q[p.key]) + EPS and u > EPS:
            return spec.at({**best, p.key: max(0.0, u - step)})
    return None


def edge_of_tried(spec: StudySpec, tune: list[Result]) -> list[tuple[str, str]]:
    """(key, "low"/"high") for each dimension along which the best point is the most extreme point tried: at a hard
    limit of the range, or where the extension budget ran out. Empty: the optimum is bracketed."""
    cells = _cells(spec, tune)
    if not any(c.completed for c in cells):
        return []
    best = _best(cells, _ceiling(tune)).quantiles
    out = []
    for p in spec.nuisance:
        values = [c.quantiles[p.key] for c in cells]
        if len(set(values)) < 2:
            out.append((p.key, "only"))
        elif math.isclose(best[p.key], max(values)):
            out.append((p.key, "high"))
        elif math.isclose(best[p.key], min(values)):
            out.append((p.key, "low"))
    return out


def penalty(spec: StudySpec, tune: list[Result], sd: float, level: float = tuning.LEVEL) -> float:
    """The arm's tuning-penalty bound (``tuning.penalty_bound``): 0 without a nuisance parameter; infinite where it
    cannot be bounded: more than one nuisance parameter, or a best point at an edge of the tried points that is not
    a hard limit of the range (the optimum may lie beyond it)."""
    if not spec.nuisance:
        return 0.0
    arm = tuned(spec, tune)
    if arm is None:
        return math.inf
    at_limit = {"low": arm.points[0] <= EPS, "high": arm.points[-1] >= 1 - EPS, "only": False}
    if any(not at_limit[end] for _, end in edge_of_tried(spec, tune)):
        return math.inf
    return tuning.penalty_bound(arm, sd, level)


def seed_spread(spec: StudySpec, results: list[Result]) -> float:
    """The study's seed spread of val loss at a fixed point (``tuning.pooled_sd``): over every arm's tune points and
    its look-1 seed runs, all final before any verdict is taken, so the bounds the runner used are the report's."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        if r.status != "completed" or r.value is None or r.phase not in ("tune", "seed"):
            continue
        if r.phase == "seed" and r.point > spec.min_seeds:
            continue
        where = tuple(round(float(r.params.get(p.key, math.nan)), 12) for p in spec.nuisance)
        groups.setdefault((r.variant, r.phase, where), []).append(r.value)
    return tuning.pooled_sd(groups.values())


def arm_results(spec: StudySpec, results: list[Result]) -> dict[str, verdicts.ArmResult]:
    """Per variant, its seed-phase outcomes (diverged runs at the uniform-guess loss) and its tuning-penalty bound,
    for the verdicts."""
    out = {}
    sd = seed_spread(spec, results) if spec.nuisance else math.nan
    for variant in spec.variants():
        seeds = [r for r in results if r.variant == variant.name and r.phase == "seed" and r.finished
                 and r.outcome is not None and r.status in names.OUTCOMES]  # fmt: skip
        out[variant.name] = verdicts.ArmResult(
            name=variant.name,
            outcomes={r.point: r.outcome for r in seeds},
            diverged=frozenset(r.point for r in seeds if r.status == "diverged"),
            penalty=penalty(spec, [r for r in results if r.variant == variant.name and r.phase == "tune"], sd),
        )
    return out


def factors(spec: StudySpec) -> dict[str, list[str]]:
    """Scientific key -> its alternatives' variant names (the base is every factor's reference)."""
    out: dict[str, list[str]] = {key: [] for key in spec.scientific}
    for v in spec.variants():
        if v.factor:
            out[v.factor].append(v.name)
    return out


def _more_seeds(spec: StudySpec, results: list[Result]) -> list[PlannedTrial]:
    if spec.max_seeds <= spec.min_seeds:
        return []
    first = range(1, spec.min_seeds + 1)
    seeds = {(r.variant, r.point): r for r in results if r.phase == "seed"}
    active = [v.name for v in spec.variants() if not _seedless(spec, v, results)]
    if "base" not in active or not all((v, s) in seeds and seeds[v, s].finished for v in active for s in first):
        return []  # look 1 needs the first seeds of every arm that has a tuned point
    arms, r = arm_results(spec, results), rule(spec)
    # at the study-wide share (alpha / factors, ``verdicts.judge_study``): it leaves undecided every arm the factor's
    # own alpha does and more, so both the per-factor and the study-wide verdicts have look 2 wherever they need it
    share = r.for_study(max(1, sum(1 for alternatives in factors(spec).values() if alternatives)))
    more = set()
    for alternatives in factors(spec).values():
        arms_of = [arms[a] for a in alternatives if a in active]
        more |= verdicts.needs_more_seeds(arms["base"], arms_of, share)
    if more:
        more.add("base")
    out = []
    for variant in spec.variants():
        if variant.name in more:
            params = seeds[variant.name, 1].params
            out += [PlannedTrial("seed", variant, s, {**variant.values, **params})
                    for s in range(spec.min_seeds + 1, spec.max_seeds + 1)]  # fmt: skip
    return out


def _seedless(spec: StudySpec, variant: Variant, results: list[Result]) -> bool:
    """Tuning is over and no tune run completed: the variant has nothing to re-run on seeds."""
    tune = [r for r in results if r.variant == variant.name and r.phase == "tune"]
    return (bool(spec.nuisance) and bool(tune) and all(r.finished for r in tune)
            and bracket_step(spec, tune) is None and chosen_point(spec, tune) is None)  # fmt: skip


def planned_size(spec: StudySpec, results: list[Result]) -> int:
    """Trials planned so far plus the seeds still to come at the least (a progress bar's total)."""
    planned = {(r.phase, r.variant, r.point) for r in results}
    seeds = {(v.name, s) for v in spec.variants() for s in range(1, spec.min_seeds + 1)}
    return len(planned) + len({("seed", *k) for k in seeds} - planned)
