"""Each arm's learning rate from noisy tune runs, and how much loss that choice can cost it. numpy only.

The rule, the same for every arm (``ablate.design.plan`` runs it, the report shows it):

- Every tune point (a cell of the nuisance grid, at quantile ``u`` of its range) runs on the study's tune seeds,
  which are never verdict seeds: an arm's point is not chosen on the data order it is then judged on.
- A point's score is the mean over its tune seeds of the final validation loss; a diverged run counts at the
  ceiling (the uniform-guess loss), so a learning rate that sometimes diverges is scored by how often it does.
- The best point is the lowest mean. When it has a tried neighbour on each side, the arm's point is the vertex of
  the parabola through the three means (a convex fit, within half a cell of the best on an even grid); at an edge
  of the tried points it is the best point itself.
- The tuning penalty bound: how much validation loss the choice can cost the arm against its best learning rate in
  the tried range. A parametric bootstrap of the rule above: the arm's own curve (the parabola around the best, the
  means elsewhere, straight lines between) is taken as the truth, the noise of a mean of ``n`` runs (the study's
  pooled seed spread over ``sqrt(n)``) is added, the rule re-run, and the loss of its choice on the curve above the
  curve's minimum is the draw's penalty; the bound is the ``LEVEL`` quantile of the draws. Its seeded draws make it
  a pure function of the results, so a resumed study re-computes the same bounds.

The verdicts (``ablate.stats.verdicts``) widen each comparison by the two arms' bounds, so "worse" and "better" hold of
the arms as tuned well, not as tuned by one noisy choice. Whether that keeps the stated error rate is checked by a
simulation of the whole tune-then-compare procedure in ``tests/test_tuning.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

LEVEL = 0.75
"""Quantile of the bootstrap penalties taken as an arm's bound. Not a confidence level of its own: the bound only
shifts the verdicts' tests, and the rate that matters, false claims against the tuned truth, is what the simulation
in tests/test_tuning.py checks (0.75 keeps it under alpha there with room; 0.5 came within a point of alpha)."""
DRAWS = 2000
BOOTSTRAP_SEED = 0
TUNE_SEED0 = 10_000
"""Tune seeds are TUNE_SEED0, TUNE_SEED0 + 1, ...; verdict seeds are 1..max_seeds (at most 1000): never shared."""


@dataclass(frozen=True)
class Tuned:
    """An arm's tuning: its tried points, their seed means, the choice and where it sits."""

    points: np.ndarray
    """Distinct tried points, sorted (quantiles of the nuisance range)."""
    means: np.ndarray
    """Seed mean of the final val loss per point, a diverged run at the ceiling."""
    seeds: np.ndarray
    """Runs per point."""
    u: float
    """The chosen point."""
    best: int
    """Index of the point with the lowest mean."""

    @property
    def interior(self) -> bool:
        """The best point has a tried neighbour on each side: the optimum is bracketed by the tried points."""
        return 0 < self.best < len(self.points) - 1


def tune(points: Iterable[float], losses: Iterable[float], ceiling: float) -> Tuned | None:
    """An arm's tuning from its finished tune runs: each run's point and final val loss (NaN: diverged). None
    without a run."""
    u = np.asarray(list(points), dtype=float)
    y = np.asarray(list(losses), dtype=float)
    if len(u) == 0:
        return None
    y = np.where(np.isfinite(y), np.minimum(y, ceiling), ceiling)
    grid, index = np.unique(np.round(u, 12), return_inverse=True)
    means = np.bincount(index, weights=y) / np.bincount(index)
    seeds = np.bincount(index)
    chosen, best = choose(grid, means)
    return Tuned(points=grid, means=means, seeds=seeds, u=float(chosen), best=int(best))


def choose(points: np.ndarray, means: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rule on arrays: ``means`` (..., P) at sorted ``points`` (P,) -> (chosen point, index of the best), each
    (...). The lowest mean wins a tie at the lower point."""
    means = np.asarray(means, dtype=float)
    best = np.argmin(means, axis=-1)
    if len(points) < 3:
        return np.asarray(points)[best], best
    mid = np.clip(best, 1, len(points) - 2)
    x0, x1, x2 = points[mid - 1], points[mid], points[mid + 1]
    m0, m1, m2 = (np.take_along_axis(means, (mid + d)[..., None], axis=-1)[..., 0] for d in (-1, 0, 1))
    vertex = _vertex(x0, x1, x2, m0, m1, m2)
    interior = (best > 0) & (best < len(points) - 1)
    return np.where(interior, vertex, np.asarray(points)[best]), best


def _vertex(x0, x1, x2, m0, m1, m2):
    """The vertex of the parabola through three points whose middle one is lowest (x1 where they are level)."""
    a, b = (x1 - x0) * (m1 - m2), (x1 - x2) * (m1 - m0)
    den = a - b
    num = (x1 - x0) * a - (x1 - x2) * b
    safe = np.abs(den) > 1e-15
    return np.where(safe, x1 - 0.5 * num / np.where(safe, den, 1.0), x1)


def curve(tuned: Tuned, u: np.ndarray) -> np.ndarray:
    """The arm's loss curve as the bootstrap takes it to be: the parabola through the best point and its
    neighbours between them, straight lines between the other means."""
    u = np.asarray(u, dtype=float)
    out = np.interp(u, tuned.points, tuned.means)
    if tuned.interior:
        i = tuned.best
        x, m = tuned.points[i - 1: i + 2], tuned.means[i - 1: i + 2]
        inside = (u >= x[0]) & (u <= x[2])
        out = np.where(inside, _parabola(x, m, u), out)
    return out


def _parabola(x: np.ndarray, m: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Lagrange's form of the parabola through (x_i, m_i)."""
    return sum(m[j] * np.prod([(u - x[k]) / (x[j] - x[k]) for k in range(3) if k != j], axis=0) for j in range(3))


def penalty_bound(tuned: Tuned, sd: float, level: float = LEVEL, draws: int = DRAWS) -> float:
    """The ``level`` quantile of the bootstrap penalty (see the module docstring); NaN when the noise is unknown,
    0 with a single tried point (nothing was chosen)."""
    if not math.isfinite(sd):
        return math.nan
    if len(tuned.points) < 2:
        return 0.0
    chosen = bootstrap_choices(tuned, sd, draws)
    fine = np.linspace(tuned.points[0], tuned.points[-1], 512)
    floor = min(float(curve(tuned, fine).min()), float(curve(tuned, np.array([tuned.u]))[0]))
    penalties = curve(tuned, chosen) - floor
    return float(np.quantile(penalties, level))


def pooled_sd(groups: Iterable[Iterable[float]]) -> float:
    """The seed spread at a fixed point, pooled over groups of runs that differ in seed only (finite losses); NaN
    without a group of two."""
    squares, df = 0.0, 0
    for group in groups:
        y = np.asarray([v for v in group if math.isfinite(v)], dtype=float)
        if len(y) >= 2:
            squares += float(((y - y.mean()) ** 2).sum())
            df += len(y) - 1
    return math.sqrt(squares / df) if df else math.nan


def bootstrap_choices(tuned: Tuned, sd: float, draws: int = DRAWS, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """The rule re-run on ``draws`` noisy copies of the arm's curve (see :func:`penalty_bound`): where its choice
    falls when the seeds come out otherwise, for an interval of the chosen point (quantile units). Arms whose draws
    are combined (a slope across widths) need a ``seed`` each, or draw j gives them all the same noise."""
    rng = np.random.default_rng(seed)
    truth = curve(tuned, tuned.points)
    noisy = truth + rng.standard_normal((draws, len(truth))) * sd / np.sqrt(tuned.seeds)
    return choose(tuned.points, noisy)[0]
