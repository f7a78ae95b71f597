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
        choice, reason = _cheapest(base, by["equivalent"], costs)
    else:
        guess = min(by["undecided"] + by["equivalent"], key=_mean)
        choice = guess.name if _mean(guess) < 0 else base.name
        reason = f"Undecided: {undecided} still straddle the margin; best guess so far, not a verdict: {choice}."
    diverged = [c for c in comparisons if c.diverged]
    if diverged:
        reason += " Diverged seed runs, counted at the uniform-guess loss: " + ", ".join(
            f"{c.name} {c.diverged} of {c.n}" for c in diverged) + "."
    return Answer(choice=choice, decided=not undecided, reason=reason)


def _cheapest(base: ArmResult, equivalents: list[Comparison], costs: dict[str, float]) -> tuple[str, str]:
    if not equivalents:
        return base.name, f"Keep {base.name}: every alternative is worse."
    candidates = {base.name: base.cost, **{c.name: costs[c.name] for c in equivalents}}
    names = _names(equivalents)
    if any(math.isnan(v) for v in candidates.values()):
        return base.name, f"{names} equivalent to {base.name} within the margin; no cost to compare: keep {base.name}."
    cheapest = min(candidates, key=candidates.get)  # the base first, so it wins a tie
    return cheapest, (f"{names} equivalent to {base.name} within the margin, the rest worse: choose the cheapest, "
                      f"which is {cheapest} (cost: " + ", ".join(f"{n} {c:.4g}" for n, c in candidates.items()) + ").")


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
    return ", ".join(c.name for c in comparisons)
