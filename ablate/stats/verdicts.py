"""The verdict of an ablation: each alternative of a factor against the base, at a stated margin, with error control.

Every arm is re-run on seeds 1..n and a seed fixes the data order, so the comparison is paired by seed:
``d_s = arm_s - base_s`` over the seeds both ran (lower is better, so ``d < 0`` favours the alternative).
``margin`` (delta) is the smallest difference that matters. What is judged is the difference of the two arms as
tuned well: each arm ran at its chosen learning rate, which can cost it up to its tuning-penalty bound
(``tuning``) and never helps it, so the tuned difference lies between ``mean - P_alt`` and ``mean + P_base``
up to sampling. Each alternative ends as one claim:

- equivalent: within ``[-delta, +delta]``  (TOST on ``mean - P_alt > -delta`` and ``mean + P_base < +delta``)
- worse: above 0                           (one-sided t-test on ``mean - P_alt > 0``)
- better: below ``-delta``                 (on ``mean + P_base < -delta``)
- undecided: none of the three could be claimed.

The claim is the one with the smallest p-value (ties: equivalent, worse, better), and that p-value is the one
tested, so a claim is never reported on another claim's evidence. The asymmetry is the decision's: switching away
from the base must pay for itself (better by more than the margin), while staying needs only that the alternative is
worse or that the difference does not matter. Read off an interval: at one-sided level ``l`` "equivalent" holds
exactly when the two-sided ``1 - 2l`` t-interval, widened by the penalties, lies inside ``[-delta, +delta]``,
"worse" when it lies above 0, "better" when below ``-delta``; each is false only if that interval misses the tuned
difference, which it does with chance at most ``2l``. That is why each look tests at half its alpha per side
(``SIDES``): an alternative may claim in either direction, and with the full alpha per side the chance of a false
claim under no effect and large noise tends to ``2 alpha`` (the CPMP "switching between superiority and
non-inferiority" argument: one two-sided interval, any claim).

Seeds come in two looks: look 1 after ``min_seeds`` seeds of every arm, look 2 after ``max_seeds`` for the arms
undecided at look 1; alpha is split between the looks by an O'Brien-Fleming-type spending function. Within a factor
of ``k`` alternatives, look ``j`` tests each at ``alpha_j / SIDES / k``. The bound is then a plain sum: alternative
``i`` makes a false claim at look ``j`` with chance at most ``alpha_j / k``, and summed over the ``k`` alternatives
and the looks that is ``alpha``, whatever the alternatives' true differences, for normal paired differences and
penalty bounds that hold. The factor's alternatives are combined by Bonferroni, not Holm's step-down: whatever its
true difference, every alternative has a claim that would be false, so one that is decided, truly, frees no alpha
for the others. Holm's step-down let alternatives at +delta, called "worse" (true) nearly always and
"equivalent" (false) sometimes, pass their alpha to one at -delta: with four at +delta, one at -delta and alpha 5%,
a false claim in 6.0-6.9% of factors at 12 seeds and 5.2% at 6 (tests/test_verdicts.py checks the rates by
simulation).

A study's factors share the base; each judged at ``alpha``, the chance of a false claim somewhere in the study
reaches about ``F alpha`` for ``F`` factors. :func:`judge_study` judges each at ``alpha / F`` instead. For an
alternative left undecided, :func:`seeds_to_decide` gives the seeds that would decide it if its numbers held (a
planning figure). Decisions are final and a pure function of the results, so a study killed and resumed reaches
the same ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
from scipy import special, stats

VERDICTS = ("undecided", "better", "worse", "equivalent")
"""Verdict names, indexed by the integer codes of :class:`Judged`."""
UNDECIDED, BETTER, WORSE, EQUIVALENT = range(4)
SIDES = 2
"""Each look's alpha is halved per side: one two-sided interval backs every claim (see the module docstring)."""


@dataclass(frozen=True)
class ArmResult:
    """One alternative (or the base) of one factor, as the caller collects it."""

    name: str
    """Variant name, e.g. ``"model.num_heads=8"``."""
    outcomes: dict[int, float]
    """Seed (1, 2, ...) -> metric, lower is better. A diverged run is an outcome: its entry is the loss of a uniform
    guess (``uniform_loss``, the caller's), never dropped."""
    diverged: frozenset[int] = frozenset()
    """Seeds whose run diverged; each must have its uniform-guess loss in ``outcomes``."""
    cost: float | tuple[float, ...] = math.nan
    """Parameters, or (parameters, FLOPs per token, seconds per token) as ``answers.COSTS``: lower is cheaper, a tie
    on one broken by the next; NaN when unknown."""
    penalty: float = 0.0
    """Bound on the loss its learning-rate choice can cost it (``ablate.stats.tuning.penalty_bound``); 0 when it has no
    tuned nuisance, infinite (or NaN) when it cannot be bounded, e.g. its best point at an unextended edge."""

    def __post_init__(self) -> None:
        bad = [s for s, v in self.outcomes.items() if not (_is_seed(s) and math.isfinite(v))]
        if bad:
            raise ValueError(f"{self.name}: outcomes need int seeds >= 1 and finite values (a diverged run gets "
                             f"its uniform-guess loss); bad seeds: {sorted(bad, key=str)}")
        if not (self.penalty >= 0 or math.isnan(self.penalty)):
            raise ValueError(f"{self.name}: a tuning penalty is >= 0, got {self.penalty}")
        if not self.diverged <= self.outcomes.keys():
            missing = sorted(self.diverged - self.outcomes.keys())
            raise ValueError(f"{self.name}: diverged seeds {missing} have no outcome (give them the uniform loss)")


def _is_seed(s: object) -> bool:
    return isinstance(s, (int, np.integer)) and s >= 1


def spent(alpha: float, t: float) -> float:
    """Alpha spent by information fraction ``t``: Lan-DeMets O'Brien-Fleming type, ``2 - 2 Phi(z_{1-alpha/2}/sqrt t)``.

    Small early (little is spent on few seeds, so the last look keeps nearly all of alpha) and ``alpha`` at ``t = 1``.
    """
    if t >= 1.0:
        return alpha
    return float(2.0 * stats.norm.sf(stats.norm.isf(alpha / 2) / math.sqrt(t)))


@dataclass(frozen=True)
class Rule:
    """The study's decision rule (from the study file)."""

    margin: float
    """Smallest difference of the metric that matters, in its units (> 0)."""
    alpha: float = 0.05
    """Per factor, the chance of any false claim over all looks."""
    min_seeds: int = 3
    """Seeds of every arm at look 1. At 3 (2 degrees of freedom, a critical t of 13 to 30 after the split per side,
    per alternative and per look) look 1 decides 0.5-5% of alternatives (margin 0.03, paired sd 0.02-0.03, 1 to 5
    alternatives) and saves under 0.15 seeds per arm, while one look at ``max_seeds`` decides more; a look 1 that
    pays for itself needs 5 or more seeds (5 then 8: 6-35% decided at look 1)."""
    max_seeds: int = 6
    """Seeds of the arms still undecided at look 1 (and of the base) at look 2; equal to ``min_seeds``: one look."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.margin) and self.margin > 0):
            raise ValueError(f"margin: must be > 0, got {self.margin}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha: must be in (0, 1), got {self.alpha}")
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise ValueError(f"seeds: need 2 <= min_seeds <= max_seeds, got {self.min_seeds} and {self.max_seeds}")

    def looks(self) -> tuple[int, ...]:
        """Seeds per arm at each look."""
        return (self.max_seeds,) if self.min_seeds == self.max_seeds else (self.min_seeds, self.max_seeds)

    def look_alphas(self) -> tuple[float, ...]:
        """The alpha of each look (both sides together): ``alpha(t_j) - alpha(t_{j-1})``, summing to ``alpha``."""
        cumulative = [spent(self.alpha, n / self.max_seeds) for n in self.looks()]
        return tuple(np.diff([0.0, *cumulative]).tolist())

    def statement(self, k: int) -> str:
        """The error-rate sentence for a factor with ``k`` alternatives, numbers computed from this rule."""
        family = f"Bonferroni over the factor's {k} alternatives" if k > 1 else "one alternative"
        return (f"Per factor, the chance of any false 'better', 'worse' or 'equivalent' (within ±{self.margin:g}) "
                f"claim is at most {_pct(self.alpha)} ({family}, each claim read off a two-sided interval; "
                f"{self._spending()}).")

    def for_study(self, factors: int) -> Rule:
        """This rule at ``alpha / factors``: each factor's share of a study-wide alpha (Bonferroni over factors)."""
        if factors < 1:
            raise ValueError(f"factors: a study has at least one, got {factors}")
        return replace(self, alpha=self.alpha / factors)

    def study_statement(self, factors: int, alternatives: int) -> str:
        """The error-rate sentence for a study judged by :func:`judge_study`: ``factors`` factors sharing one base,
        ``alternatives`` alternatives over all of them."""
        share = self.for_study(factors)
        return (f"Over the study's {_count(factors, 'factor')} ({_count(alternatives, 'alternative')} against one "
                f"base), the chance of any false 'better', 'worse' or 'equivalent' (within ±{self.margin:g}) claim is "
                f"at most {_pct(self.alpha)} (each factor at {_pct(self.alpha)} / {factors} = {_pct(share.alpha)}, "
                f"Bonferroni over its alternatives, each claim read off a two-sided interval; {share._spending()}).")

    def _spending(self) -> str:
        looks = self.looks()
        if len(looks) == 1:
            return f"one look at {looks[0]} seeds"
        return f"alpha spent over {len(looks)} looks: " + ", ".join(
            f"{_pct(a)} at {n}" + (" seeds" if j == 0 else "")
            for j, (a, n) in enumerate(zip(self.look_alphas(), looks, strict=True)))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _pct(x: float) -> str:
    return f"{100 * x:.3g}%"


@dataclass(frozen=True)
class Comparison:
    """One alternative against the base."""

    name: str
    verdict: str
    """``"better"``, ``"worse"``, ``"equivalent"`` or ``"undecided"``."""
    n: int
    """Paired seeds used."""
    mean: float
    """Mean paired difference (alternative - base); NaN without a paired seed."""
    se: float
    """Its standard error (the paired differences' sd over sqrt(n)); NaN below 2 paired seeds."""
    lo: float
    hi: float
    """Where the difference of the arms as tuned well lies: the two-sided ``1 - 2 level`` t-interval of ``mean``,
    its low end lowered by the alternative's tuning-penalty bound and its high end raised by the base's (infinite
    below 2 paired seeds)."""
    level: float
    """One-sided level it was tested at: the look's alpha, halved per side, over the factor's number of alternatives
    (Bonferroni). The claim holds exactly when ``p <= level``."""
    p: float
    """Claim p-value: the smallest of its equivalence (TOST), worse and better p-values, the verdict being the claim
    it belongs to; 1 below 2 paired seeds."""
    look: int
    """1 or 2: the look at which the verdict was reached (the last look taken, if undecided)."""
    diverged: int
    """Diverged seed runs of this alternative among the ``n`` used."""
    penalty: float = 0.0
    base_penalty: float = 0.0
    """The two arms' tuning-penalty bounds, by which ``lo`` and ``hi`` are widened (``tuning``)."""


@dataclass(frozen=True)
class Judged:
    """:class:`Comparison` fields as arrays of shape ``(..., k)``: the vectorised form, for simulations."""

    verdict: np.ndarray  # int codes into VERDICTS
    n: np.ndarray
    mean: np.ndarray
    se: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    level: np.ndarray
    p: np.ndarray
    look: np.ndarray


def judge_arrays(base: np.ndarray, alternatives: np.ndarray, rule: Rule, base_penalty: np.ndarray | float = 0.0,
                 penalties: np.ndarray | float = 0.0) -> Judged:
    """The two-look procedure on arrays: ``base`` ``(..., S)``, ``alternatives`` ``(..., k, S)``, column ``s`` is
    seed ``s + 1``, NaN where a seed did not run; seeds past ``max_seeds`` are ignored. ``base_penalty`` ``(...)``
    and ``penalties`` ``(..., k)``: each arm's tuning-penalty bound (NaN or inf: unbounded).

    Look 1 uses seeds ``1..min_seeds`` only, whatever else exists, so a late analysis repeats its decisions. Look 2
    judges, on the paired seeds up to ``max_seeds``, each alternative undecided at look 1 that has seeds beyond it;
    one without them stays undecided, and one decided at look 1 keeps that verdict. The runner must not stop an arm
    inside look 2 on a look-2 verdict: that would be a third look, unpaid for.
    """
    diffs = _columns(alternatives, rule.max_seeds) - _columns(base, rule.max_seeds)[..., None, :]
    shifts = _unbounded(penalties) + 0 * diffs[..., 0], _unbounded(base_penalty)[..., None] + 0 * diffs[..., 0]
    alphas = rule.look_alphas()
    first = _look(diffs[..., : rule.looks()[0]], alphas[0], rule.margin, shifts)
    if len(alphas) == 1:
        return first
    extended = np.sum(~np.isnan(diffs), axis=-1) > first.n
    second = _look(diffs, alphas[1], rule.margin, shifts, look=2)
    take = (first.verdict == UNDECIDED) & extended
    return Judged(**{f.name: np.where(take, getattr(second, f.name), getattr(first, f.name)) for f in fields(Judged)})


def _unbounded(penalty: np.ndarray | float) -> np.ndarray:
    penalty = np.asarray(penalty, dtype=float)
    return np.where(np.isnan(penalty), np.inf, penalty)


def _columns(values: np.ndarray, seeds: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)[..., :seeds]
    missing = seeds - values.shape[-1]
    return np.concatenate([values, np.full((*values.shape[:-1], missing), np.nan)], axis=-1) if missing else values


def _look(diffs: np.ndarray, alpha: float, margin: float, shifts: tuple[np.ndarray, np.ndarray],
          look: int = 1) -> Judged:
    """One look: the three tests per alternative, each alternative at ``alpha / SIDES / k`` (Bonferroni over the
    last axis but one, the alternatives)."""
    n = np.sum(~np.isnan(diffs), axis=-1)
    df = np.maximum(n - 1, 1)  # a placeholder below 2 seeds, where p is forced to 1 and the interval is infinite
    mean = np.where(n > 0, np.nansum(diffs, axis=-1) / np.maximum(n, 1), np.nan)
    squares = np.nansum((diffs - mean[..., None]) ** 2, axis=-1)
    se = np.where(n >= 2, np.sqrt(squares / df / np.maximum(n, 1)), np.nan)
    tests = _p_values(mean, se, df, margin, *shifts)
    p = np.where(n >= 2, tests.min(axis=0), 1.0)
    level = np.full(p.shape, alpha / SIDES / max(p.shape[-1], 1))
    # the claim reported is the one whose p-value was tested, so the rate controlled is the rate of what is said
    claim = np.array([EQUIVALENT, WORSE, BETTER])[np.argmin(tests, axis=0)]
    half = np.where(n >= 2, -special.stdtrit(df, level) * np.where(n >= 2, se, 0.0), np.inf)
    low, high = mean - shifts[0], mean + shifts[1]
    return Judged(verdict=np.where(p <= level, claim, UNDECIDED), n=n, mean=mean, se=se, lo=low - half,
                  hi=high + half, level=level, p=p, look=np.full(n.shape, look))


def _p_values(mean: np.ndarray, se: np.ndarray, df: np.ndarray, margin: float, pen_alt: np.ndarray,
              pen_base: np.ndarray) -> np.ndarray:
    """The p-values of (equivalent, worse, better), stacked on a new first axis; ties in argmin go to the first.

    The tests are of the difference between the arms as tuned well: the alternative's own mistuning can only have
    raised its loss (by at most its penalty bound), the base's only raised the base's, so "worse" and the lower
    equivalence bound test ``mean - alternative's penalty``, "better" and the upper bound ``mean + base's penalty``.
    """
    low, high = mean - pen_alt, mean + pen_base  # the tuned difference lies between these, up to sampling
    # stdtr(df, t) is the t distribution's cdf (scipy.stats.t.cdf without its per-call overhead, for simulations)
    p_better = special.stdtr(df, _t(high + margin, se))
    p_worse = special.stdtr(df, -_t(low, se))
    p_equivalent = np.maximum(special.stdtr(df, -_t(low + margin, se)), special.stdtr(df, _t(high - margin, se)))
    return np.stack([p_equivalent, p_worse, p_better])


def _t(x: np.ndarray, se: np.ndarray) -> np.ndarray:
    """``x / se``, and ``+-inf`` (0 for ``x = 0``) when the differences have no spread: a constant difference of
    -0.1 is as clear as differences get, and must neither crash nor turn NaN."""
    return np.where(se > 0, x / np.where(se > 0, se, 1.0), np.where(x > 0, np.inf, np.where(x < 0, -np.inf, 0.0)))


def judge_factor(base: ArmResult, alternatives: list[ArmResult], rule: Rule) -> list[Comparison]:
    """Each alternative of one factor against its base, in the order given (see :func:`judge_arrays`)."""
    if not alternatives:
        return []
    judged = judge_arrays(_row(base, rule), np.stack([_row(a, rule) for a in alternatives]), rule,
                          base.penalty, np.array([a.penalty for a in alternatives]))
    out = []
    for j, arm in enumerate(alternatives):
        seeds = range(1, rule.looks()[int(judged.look[j]) - 1] + 1)
        paired = {s for s in seeds if s in arm.outcomes and s in base.outcomes}
        out.append(Comparison(
            name=arm.name, verdict=VERDICTS[judged.verdict[j]], n=int(judged.n[j]), mean=float(judged.mean[j]),
            se=float(judged.se[j]),
            lo=float(judged.lo[j]), hi=float(judged.hi[j]), level=float(judged.level[j]), p=float(judged.p[j]),
            look=int(judged.look[j]), diverged=len(arm.diverged & paired), penalty=arm.penalty,
            base_penalty=base.penalty))
    return out


def judge_study(base: ArmResult, factors: dict[str, list[ArmResult]], rule: Rule) -> dict[str, list[Comparison]]:
    """Every factor of a study against the base they share, at a study-wide ``rule.alpha``: each factor judged by
    :func:`judge_factor` at ``alpha / F``, ``F`` the factors with an alternative (Bonferroni over factors), so the
    chance of any false claim in the whole study is at most ``alpha`` (:meth:`Rule.study_statement`).

    The runner should pick look 2's arms at the same share, ``needs_more_seeds(base, alternatives,
    rule.for_study(F))``. If it picked them at the per-factor ``alpha``, an alternative decided at look 1 there may
    be undecided at ``alpha / F`` and have no look-2 seeds: it stays undecided. That is valid, because the bound adds
    up the chances of false claims at the looks that could be taken, and a look not taken only removes claims; and
    conservative, because such an alternative could have decided at look 2 had it run on.
    """
    share = rule.for_study(max(1, sum(1 for alternatives in factors.values() if alternatives)))
    return {name: judge_factor(base, alternatives, share) for name, alternatives in factors.items()}


def _row(arm: ArmResult, rule: Rule) -> np.ndarray:
    return np.array([arm.outcomes.get(s, np.nan) for s in range(1, rule.max_seeds + 1)], dtype=float)


def needs_more_seeds(base: ArmResult, alternatives: list[ArmResult], rule: Rule) -> set[str]:
    """Names of the alternatives undecided at look 1, once look 1 is complete (every arm has seeds
    ``1..min_seeds``); empty before that and with a single look. Depends on look-1 results only, so it gives the same
    set before and after their extra seeds ran. The caller also runs the base up to ``max_seeds`` if this set is
    non-empty in any factor, and runs these arms to ``max_seeds`` whatever their intermediate numbers say.
    """
    first = rule.looks()[0]
    arms = (base, *alternatives)
    if len(rule.looks()) == 1 or any(s not in arm.outcomes for arm in arms for s in range(1, first + 1)):
        return set()
    judged = judge_factor(_first(base, first), [_first(a, first) for a in alternatives], rule)  # look 1 alone
    return {c.name for c in judged if c.verdict == "undecided"}


def _first(arm: ArmResult, seeds: int) -> ArmResult:
    return replace(arm, outcomes={s: v for s, v in arm.outcomes.items() if s <= seeds},
                   diverged=frozenset(s for s in arm.diverged if s <= seeds))


def seeds_to_decide(comparison: Comparison, rule: Rule, k: int, cap: int = 64) -> int | None:
    """The paired seeds that would decide this alternative if its numbers held: the smallest ``n``, from the seeds it
    has up to ``cap``, at which its observed mean difference, its seeds' sd (``se * sqrt(n_observed)``) and both
    penalties give one of the three claims a p-value at most ``alpha / SIDES / k`` (one final look with all of
    ``alpha``, ``k`` alternatives). A decided comparison returns its own ``n``; None when no ``n`` up to ``cap``
    would do, or below 2 paired seeds (no sd to plan with).

    A planning figure, not a promise: the mean and sd of a few seeds are rough, and an alternative left undecided
    is one whose mean sits near a boundary, where more seeds often move it to the other side. A study planned with
    two looks at ``max_seeds = n`` spends part of alpha at look 1, so it needs slightly more. Seeds added to a
    finished study are a look its alpha did not pay for: plan them as a new study, not as a third look of this one.
    """
    if comparison.verdict != "undecided":
        return comparison.n
    if comparison.n < 2 or not math.isfinite(comparison.se):
        return None
    n = np.arange(comparison.n, max(cap, comparison.n) + 1)
    se = comparison.se * np.sqrt(comparison.n / n)
    tests = _p_values(np.float64(comparison.mean), se, n - 1, rule.margin, _unbounded(comparison.penalty),
                      _unbounded(comparison.base_penalty))
    decided = np.flatnonzero(tests.min(axis=0) <= rule.alpha / SIDES / k)
    return int(n[decided[0]]) if decided.size else None


def seeds_to_decide_factor(comparisons: list[Comparison], rule: Rule, cap: int = 64) -> dict[str, int | None]:
    """:func:`seeds_to_decide` for each undecided alternative of one factor, ``k`` its number of alternatives. For a
    study judged by :func:`judge_study`, pass ``rule.for_study(F)``."""
    return {c.name: seeds_to_decide(c, rule, len(comparisons), cap) for c in comparisons if c.verdict == "undecided"}
