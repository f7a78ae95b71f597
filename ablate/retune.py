"""Do a finished study's decided verdicts survive re-tuning? ``python -m ablate.retune studies/default.yaml``.

For every decided alternative and the base, each arm is re-run on fresh seeds (``FRESH``: neither tune nor verdict
seeds) at its chosen learning rate and at the tried points on either side of its best one. Each arm is then
re-tuned on those runs' mean outcome (test loss; test/bpb with ``outcome: bpb``): the best of its three learning
rates, a search around the study's own choice. Then the alternative is judged against the base again by the
study's rule (one look, Bonferroni within the factor, no tuning penalty: the re-tuned point is taken as tuned). As a
claim's expectation is judged (``report.claims.judge_verdict``): the verdict holds when the re-tuned one meets it,
is contradicted when the re-tuned interval lies wholly outside what the verdict says ("worse" against an interval at
or below 0, say), and is questioned otherwise. Writes ``reports/bench/retune.md`` (and prints it).

A benchmark, not a test: it trains (three learning rates x fresh seeds per arm), which takes minutes on a CPU.
"""

from __future__ import annotations

import argparse
import math
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import optuna

from ablate.core import names
from ablate.core.config import with_values
from ablate.core.urls import default_storage
from ablate.design import plan
from ablate.design.families import load_spec
from ablate.design.spec import StudySpec
from ablate.report import claims
from ablate.runner.objective import outcome_of
from ablate.stats import verdicts

FRESH = (2001, 2002, 2003, 2004)
"""Seeds of the re-runs: never a verdict seed (1..1000) nor a tune seed (10000...)."""


OUTCOMES = {claims.REPRODUCED: "holds", claims.NOT_REPRODUCED: "contradicted", claims.INCONCLUSIVE: "questioned"}


def arms_to_check(spec: StudySpec, results: list[plan.Result]) -> tuple[dict[str, str], dict[str, list[float]]]:
    """The decided alternatives (name -> verdict) and, for them and the base, the learning rates to re-run: the
    chosen one and the tried points on either side of the best."""
    arms, rule = plan.arm_results(spec, results), plan.rule(spec)
    decided = {}
    for alternatives in plan.factors(spec).values():
        for c in verdicts.judge_factor(arms["base"], [arms[a] for a in alternatives], rule):
            if c.verdict != "undecided":
                decided[c.name] = c.verdict
    key = spec.nuisance[0]
    rates = {}
    for name in ["base", *decided]:
        tune = [r for r in results if r.variant == name and r.phase == "tune"]
        arm, chosen = plan.tuned(spec, tune), plan.chosen_point(spec, tune)[key.key]
        around = [arm.points[i] for i in (arm.best - 1, arm.best + 1) if 0 <= i < len(arm.points)]
        rates[name] = sorted({float(chosen), *(float(key.value_at(u)) for u in around)})
    return decided, rates


def _run(job: tuple[StudySpec, str, float, int]) -> tuple[str, float, int, float]:
    from ablate.training.train import train  # torch only in the workers

    spec, name, lr, seed = job
    values = {**spec.variant(name).values, spec.nuisance[0].key: lr, "train.seed": seed, "train.threads": 1}
    result = train(with_values(spec.base, values))
    return name, lr, seed, float(outcome_of(result, spec.outcome))  # train raises rather than return a failed run


def retuned(losses: dict[tuple[str, float, int], float], name: str) -> dict[int, float]:
    """An arm's fresh-seed outcomes at its best learning rate by mean over the fresh seeds."""
    mine = {lr for n, lr, _ in losses if n == name}
    best = min(mine, key=lambda lr: np.mean([v for (n, r, _), v in losses.items() if n == name and r == lr]))
    return {s: v for (n, r, s), v in losses.items() if n == name and r == best}


def judge_again(spec: StudySpec, decided: dict[str, str], losses: dict) -> list[dict]:
    """Per decided alternative: the study's verdict, the re-tuned one, and whether they contradict."""
    rule = verdicts.Rule(margin=spec.margin, alpha=spec.alpha, min_seeds=len(FRESH), max_seeds=len(FRESH))
    shift = {s: i + 1 for i, s in enumerate(FRESH)}
    arm = {n: verdicts.ArmResult(n, {shift[s]: v for s, v in retuned(losses, n).items()})
           for n in ["base", *decided]}  # fmt: skip
    rows = []
    for factor, alternatives in plan.factors(spec).items():
        mine = [a for a in alternatives if a in decided]
        for c in verdicts.judge_factor(arm["base"], [arm[a] for a in mine], rule) if mine else []:
            then = decided[c.name]
            outcome = OUTCOMES[claims.judge_verdict(then, c.verdict, c.lo, c.hi, spec.margin)]
            rows.append({"factor": factor, "variant": c.name, "study": then, "re-tuned": c.verdict,
                         "diff": c.mean, "lo": c.lo, "hi": c.hi, "outcome": outcome})
    return rows


def parser() -> argparse.ArgumentParser:
    """The command's arguments (the docs' commands are checked against it)."""
    top = argparse.ArgumentParser(prog="python -m ablate.retune", description=__doc__.splitlines()[0])
    top.add_argument("study", help="the study file of a finished ablation (its stores under runs/)")
    top.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    top.add_argument("--out", default="reports/bench/retune.md")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    spec = load_spec(args.study, preflight=False)
    study = optuna.load_study(study_name=spec.name, storage=spec.storage or default_storage())
    results = plan.results_of(study.get_trials(deepcopy=False))
    decided, rates = arms_to_check(spec, results)
    jobs = [(spec, n, lr, s) for n, lrs in rates.items() for lr in lrs for s in FRESH]
    print(f"re-running {len(decided)} decided alternatives and the base: {len(jobs)} runs", flush=True)
    with ProcessPoolExecutor(args.workers) as pool:
        losses = {(n, lr, s): v for n, lr, s, v in pool.map(_run, jobs)}
    rows = judge_again(spec, decided, losses)
    text = _markdown(spec, rates, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 1 if any(r["outcome"] == "contradicted" for r in rows) else 0


def _markdown(spec: StudySpec, rates: dict[str, list[float]], rows: list[dict]) -> str:
    lines = [f"# Re-tuning check of {spec.name}", "",
             f"Fresh seeds {list(FRESH)}; each arm at its chosen {spec.nuisance[0].key} and the tried points beside "
             f"its best one, re-tuned on the fresh seeds' mean {names.outcome_label(spec.outcome)}, then judged "
             "again by the study's rule.", "",
             f"| variant | learning rates | study | re-tuned | Δ {names.test_metric(spec.outcome)} [interval] "
             "| outcome |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lrs = ", ".join(f"{x:.3g}" for x in rates[r["variant"]])
        interval = "" if math.isnan(r["diff"]) else f"{r['diff']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}]"
        lines.append(f"| {r['variant']} | {lrs} | {r['study']} | {r['re-tuned']} | {interval} | {r['outcome']} |")
    lines += ["", "base: " + ", ".join(f"{x:.3g}" for x in rates["base"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
