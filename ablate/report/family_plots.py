"""A family's figures (a ladder of widths, several budgets): every arm's outcome (test loss, test/bpb) against its
training FLOPs with the frontier, and each arm's chosen learning rate across widths. In the report's theme
(``plots``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ablate.core import names
from ablate.report.plots import WIDTH, to_uri


def frontier(points: pd.DataFrame, on: pd.DataFrame, outcome: str) -> str | None:
    """A family's arms: mean outcome (``outcome``: test loss, test/bpb) against mean training FLOPs, a marker per
    member, the frontier as a step."""
    if points.empty:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH * 1.6, 3.6), layout="constrained")
    sns.scatterplot(points, x=names.FLOPS_TOTAL, y="test_mean", hue="member", style="member", s=45, ax=ax)
    ax.step(on[names.FLOPS_TOTAL], on["test_mean"], where="post", color="k", lw=1, label="frontier")
    for _, r in on.iterrows():
        ax.annotate(r["variant"], (r[names.FLOPS_TOTAL], r["test_mean"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    if points[names.FLOPS_TOTAL].max() > 20 * points[names.FLOPS_TOTAL].min() > 0:
        ax.set_xscale("log")
    ax.set(xlabel="training FLOPs (mean over seeds)", ylabel=f"{names.outcome_label(outcome)} (mean over seeds)")
    ax.legend(fontsize=7)
    return to_uri(fig)


def lr_by_width(lr: pd.DataFrame) -> str | None:
    """Each arm's chosen learning rate against width (bracketed tunings only), log-log."""
    cols = [c for c in lr.columns if c.startswith("lr @ ")]
    long = lr.melt(id_vars="variant", value_vars=cols, var_name="width", value_name="lr").dropna()
    if long.empty:
        return None
    long["width"] = long["width"].str.removeprefix("lr @ ").astype(int)
    fig, ax = plt.subplots(figsize=(WIDTH * 1.4, 3.4), layout="constrained")
    sns.lineplot(long, x="width", y="lr", hue="variant", marker="o", ax=ax)
    ax.set(xscale="log", yscale="log", xlabel="width (embed_dim)", ylabel="chosen learning rate")
    ax.legend(fontsize=7)
    return to_uri(fig)
