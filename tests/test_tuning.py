"""Each arm's learning rate from noisy tune runs: the choice recovers a known optimum, the penalty bound behaves,
and the whole tune-then-compare procedure keeps the verdicts' stated error rate against the tuned truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ablate.stats import tuning, verdicts

# ---------------------------------------------------------------------------------------------------------------
# The rule on known curves

GRID = (np.arange(4) + 0.5) / 4  # the default study's first points (quantiles of its range)


def test_the_vertex_of_an_exact_parabola_is_its_optimum():
    for optimum in (0.3, 0.45, 0.5, 0.62):
        t = tuning.tune(GRID, 1.8 + (GRID - optimum) ** 2, ceiling=4.0)
        assert t.interior and t.u == pytest.approx(optimum)


def test_at_an_edge_the_best_point_itself_and_ties_go_to_the_lower_point():
    t = tuning.tune(GRID, [1.9, 1.8, 1.7, 1.6], ceiling=4.0)
    assert not t.interior and t.u == GRID[-1]
    assert tuning.tune(GRID, [1.7, 1.7, 1.8, 1.9], ceiling=4.0).u == GRID[0]


def test_seed_means_decide_and_a_diverged_run_counts_at_the_ceiling():
    # one lucky seed at the top point does not win it: its mean, with a diverged seed at the ceiling, is worst
    u = np.repeat(GRID, 2)
    losses = [1.90, 1.92, 1.80, 1.84, 1.82, 1.81, 1.70, math.nan]
    t = tuning.tune(u, losses, ceiling=4.0)
    assert t.seeds.tolist() == [2, 2, 2, 2]
    assert t.means[-1] == pytest.approx((1.70 + 4.0) / 2)
    assert t.best == 2 and GRID[1] < t.u < GRID[3]


def test_the_penalty_bound_grows_with_the_noise_and_is_nothing_without_a_choice():
    t = tuning.tune(GRID, 1.8 + 0.3 * (GRID - 0.45) ** 2, ceiling=4.0)
    quiet, noisy = tuning.penalty_bound(t, 0.001), tuning.penalty_bound(t, 0.05)
    assert 0 <= quiet < noisy
    assert tuning.penalty_bound(t, 0.05) == noisy  # seeded: a resumed study re-computes the same bound
    assert math.isnan(tuning.penalty_bound(t, math.nan))
    assert tuning.penalty_bound(tuning.tune([0.5, 0.5], [1.8, 1.9], ceiling=4.0), 0.05) == 0.0


def test_pooled_sd_pools_only_groups_of_two_or_more():
    assert tuning.pooled_sd([[1.0, 3.0], [5.0], [2.0, 2.0, math.nan]]) == pytest.approx(math.sqrt(2 / 2))
    assert math.isnan(tuning.pooled_sd([[1.0], [2.0]]))


# ---------------------------------------------------------------------------------------------------------------
# The whole procedure, simulated: arms tuned on noisy seeds, then judged against the base on fresh seeds.
#
# An arm's val and test loss against the learning rate is c + k (x - x*)^2 in x = ln(lr), steeper above the
# optimum by ``steep`` (k = 0.05 is the default study's curvature: neighbouring points x2.15 apart differed by
# about 0.03 nats near the optimum). Its optimum x* lies anywhere in the two inner cells (half a cell off the grid
# as often as on it). A tune run adds seed noise of sd ``sd_tune`` (0.02 as measured), half of it shared by every
# arm on the same tune seed; ``spikes``: the probability that a run above the middle of the range spikes by 0.1
# (the heavy tail seen at 2e-2). The verdict seeds add noise of sd 0.02 with a per-seed part shared by the arms
# (paired differences of sd 0.024). The truth a verdict is judged against is the difference of the arms' minima.

MARGIN = 0.03
RULE = verdicts.Rule(margin=MARGIN, min_seeds=4, max_seeds=6)  # the default study's rule
SPAN = math.log(10)  # ln(lr) across the default study's range, 4e-3 to 4e-2


def _loss(u, optimum, c, k, steep):
    x = (np.asarray(u) - optimum) * SPAN
    return c + k * x**2 * np.where(x > 0, steep, 1.0)


def false_claim_rate(effects, studies=300, k=0.05, steep=1.0, sd_tune=0.02, spikes=0.0, rule=RULE,
                     one_seed_argmin=False, seed=0):
    """The share of simulated factors with any false claim (against the tuned truth), by the project's own rule:
    ``tuning.tune``, ``tuning.pooled_sd``, ``tuning.penalty_bound``, ``verdicts.judge_arrays``.
    ``one_seed_argmin``: the rule this replaced (each arm at its best point on one tune seed, no penalty)."""
    rng = np.random.default_rng(seed)
    c = 1.8 + np.array([0.0, *effects])
    truth = np.array(effects)
    false = 0
    for _ in range(studies):
        optimum = rng.uniform(GRID[1] - 0.125, GRID[2] + 0.125, len(c))
        shared = rng.standard_normal(2)
        runs = [_loss(GRID[:, None], optimum[a], c[a], k, steep)
                + sd_tune * (0.5 * shared + math.sqrt(0.75) * rng.standard_normal((len(GRID), 2)))
                + 0.1 * (rng.random((len(GRID), 2)) < spikes * (GRID[:, None] > 0.5)) for a in range(len(c))]
        if one_seed_argmin:
            chosen, penalty = [GRID[np.argmin(y[:, 0])] for y in runs], np.zeros(len(c))
        else:
            arms = [tuning.tune(np.repeat(GRID, 2), y.ravel(), ceiling=4.2) for y in runs]
            sd = tuning.pooled_sd([list(row) for y in runs for row in y])
            chosen, penalty = [a.u for a in arms], np.array([tuning.penalty_bound(a, sd) for a in arms])
        at = np.array([_loss(chosen[a], optimum[a], c[a], k, steep) for a in range(len(c))])
        seeds = rng.standard_normal(rule.max_seeds)
        tests = at[:, None] + 0.02 * (0.3 * seeds + math.sqrt(0.91) * rng.standard_normal((len(c), rule.max_seeds)))
        v = verdicts.judge_arrays(tests[0], tests[1:], rule, penalty[0], penalty[1:]).verdict
        wrong = (((v == verdicts.EQUIVALENT) & (np.abs(truth) >= MARGIN)) | ((v == verdicts.WORSE) & (truth <= 0))
                 | ((v == verdicts.BETTER) & (truth >= -MARGIN)))  # fmt: skip
        false += bool(wrong.any())
    return false / studies


def _at_most(rate: float, alpha: float, n: int) -> bool:
    """The rate is compatible with alpha: below it by more than 2.33 Monte Carlo standard errors' allowance."""
    return rate <= alpha + 2.33 * math.sqrt(alpha * (1 - alpha) / n)


TUNED = {  # id: effects of the alternatives (the base at 0), and the simulation's settings
    "no effect, two alternatives": ([0.0, 0.0], {}),
    "at +margin": ([MARGIN], {}),
    "at -margin": ([-MARGIN], {}),
    "at half the margin": ([MARGIN / 2, -MARGIN / 2], {}),
    "mixed effects": ([MARGIN, -MARGIN, 0.0, MARGIN / 2], {}),
    "steeper above the optimum": ([MARGIN], {"steep": 4.0}),
    "flat curves, noisy tuning": ([0.0, -MARGIN], {"k": 0.02, "sd_tune": 0.04}),
    "spikes at high learning rates": ([0.0], {"spikes": 0.3}),
}


@pytest.mark.parametrize("case", TUNED, ids=list(TUNED))
def test_tune_then_compare_keeps_the_stated_rate_against_the_tuned_truth(case):
    effects, settings = TUNED[case]
    rate = false_claim_rate(effects, **settings)
    assert _at_most(rate, RULE.alpha, 300), f"{case}: {rate:.3f}"


def test_the_rule_it_replaced_breaks_the_rate_where_the_new_one_keeps_it():
    """Each arm at its best point on one tune seed, judged without a penalty: the failure this module fixes."""
    old = false_claim_rate([-MARGIN], studies=600, one_seed_argmin=True, seed=1)  # 8.8% when written
    new = false_claim_rate([-MARGIN], studies=600, seed=1)  # 3.0%
    assert old > RULE.alpha + 2.33 * math.sqrt(RULE.alpha * (1 - RULE.alpha) / 600) and new < old / 2, (old, new)
