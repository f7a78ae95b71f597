"""A factor's answer from its verdicts: the value to choose and why, in sentences built from the numbers
(``ablate.stats.verdicts`` makes the verdicts; this reads them)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ablate.stats.verdicts import VERDICTS, ArmResult, Comparison


@dataclass(frozen=True)
class Answer:
    """A factor's answer."""

    choice: str
    """The arm to choose: the base's name or an alternative's."""
    decided: bool
    """Every alternative decided (better, worse or equivalent). A better alternative with others still undecided
    is chosen but not decided: an undecided one might still beat it."""
    reason: str
    """One or two sentences built from the numbers."""


def answer_factor(base: ArmResult, comparisons: list[Comparison], alternatives: list[ArmResult]) -> Answer:
    """The value to choose and why: the better alternative with the lowest mean difference; else, every
    alternative decided, the cheapest of the base and its equivalents; else undecided, with the best guess so far."""
    costs = {a.name: a.cost for a in alternatives}
    if set(costs) != {c.name for c in comparisons}:
        raise ValueError(f"comparisons {[c.name for c in comparisons]} and alternatives {list(costs)} differ")
    by = {v: [c for c in comparisons if c.verdict == v] for v in VERDICTS}
    undecided = "; ".join(f"{c.name} ({_interval(c)})" for c in by["undecided"])
    if by["better"]:
        best = min(by["better"], key=_mean)
        choice, reason = best.name, f"{best.name} is better than {base.name} by {-best.mean:.3g} ({_interval(best)})."
        if len(by["better"]) > 1:
            reason += (f" Also better: {_names(c for c in by['better'] if c is not best)}; better alternatives were "
                       "not tested against each other, so this is the lowest mean difference, not a proven best.")
        if undecided:
            reason += f" Still undecided: {undecided}."
    elif not undecided:
        choice, reason = _cheapest(base, by["equivalent"], costs, by["worse"])
    else:
        guess = min(by["undecided"] + by["equivalent"], key=_mean)
        choice = guess.name if _mean(guess) < 0 else base.name
        verb = "straddles" if len(by["undecided"]) == 1 else "straddle"
        reason = f"Undecided: {undecided} still {verb} the margin; best guess so far, not a verdict: {choice}."
    diverged = [c for c in comparisons if c.diverged]
    if diverged:
        reason += " Diverged seed runs, counted at the uniform-guess loss: " + ", ".join(
            f"{c.name}: {c.diverged} of {c.n} seeds" for c in diverged) + "."
    return Answer(choice=choice, decided=not undecided, reason=reason)


COSTS = ("parameters", "FLOPs per token", "seconds per token")
"""What ``ArmResult.cost`` holds, in the order a tie on one is broken by the next (a plain number: parameters)."""


def _cheapest(base: ArmResult, equivalents: list[Comparison], costs: dict[str, object],
              worse: list[Comparison]) -> tuple[str, str]:  # fmt: skip
    if not equivalents:
        return base.name, f"Keep {base.name}: every alternative is worse."
    candidates = {base.name: _cost(base.cost), **{c.name: _cost(costs[c.name]) for c in equivalents}}
    same = f"{_names(equivalents)} {_be(equivalents)} equivalent to {base.name} within the margin"
    if worse:
        same += f", {_names(worse)} {_be(worse)} worse"
    if any(not v or math.isnan(v[0]) for v in candidates.values()):
        return base.name, f"{same}; no cost to compare: keep {base.name}."
    cheapest = base.name  # an alternative replaces it only where a measured cost tells them apart
    for name, cost in candidates.items():
        k = _deciding(candidates[cheapest], cost)
        if k is not None and cost[k] < candidates[cheapest][k]:
            cheapest = name
    rival = base.name if cheapest != base.name else min(
        (n for n in candidates if n != base.name), key=lambda n: [x if x == x else math.inf for x in candidates[n]])
    k = _deciding(candidates[cheapest], candidates[rival])
    if k is None:
        return cheapest, f"{same}; {cheapest} and {rival} cost the same by every measure taken: keep {cheapest}."
    ties = f"{' and '.join(COSTS[:k])} tie, " if k else ""
    shown = ", ".join(f"{n} {_show(candidates[n][k], k)}" for n in candidates)
    return cheapest, f"{same}: choose the cheapest, {cheapest} ({ties}{COSTS[k]}: {shown})."


def _deciding(first: tuple[float, ...], second: tuple[float, ...]) -> int | None:
    """The index of the cost that tells ``first`` from ``second``; None when they tie up to one not measured."""
    for k, (x, y) in enumerate(zip(first, second, strict=False)):
        if math.isnan(x) or math.isnan(y):
            return None
        if x != y:
            return k
    return None


def _be(comparisons: list[Comparison]) -> str:
    return "is" if len(comparisons) == 1 else "are"


def _cost(cost: object) -> tuple[float, ...]:
    return tuple(float(c) for c in cost) if isinstance(cost, tuple) else (float(cost),)


def _show(value: float, k: int) -> str:
    return f"{1 / value:.4g} tokens/s" if COSTS[k] == "seconds per token" and value > 0 else f"{value:.4g}"


def _mean(c: Comparison) -> float:
    return math.inf if math.isnan(c.mean) else c.mean  # no paired seed: never a best guess


def _interval(c: Comparison) -> str:
    if c.n == 0:
        return "no paired seed run yet"
    if c.n == 1:
        return f"difference {c.mean:+.3g} from 1 seed, no interval"
    return (f"difference {c.mean:+.3g}, {100 * (1 - 2 * c.level):.3g}% interval {c.lo:+.3g} to {c.hi:+.3g}, "
            f"{c.n} seeds")


def _names(comparisons: object) -> str:
    names = [c.name for c in comparisons]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
