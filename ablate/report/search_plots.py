"""The figures of a search study (many trials sampled jointly): parameter importances and the interaction of the
two most important parameters."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display needed: figures go into the page
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ablate.core import names
from ablate.report import plots  # noqa: E402
from ablate.report.analysis import display  # noqa: E402
from ablate.report.load import StudyData, completed  # noqa: E402


def importance(imp: pd.DataFrame) -> str | None:
    """fANOVA importance per parameter (bars) and PED-ANOVA (dots). The bar's error bar is the sd of fANOVA over
    forest seeds: the estimator's own randomness, not uncertainty about the study (a rerun study could differ more)."""
    if imp.empty:
        return None
    fig, ax = plt.subplots(figsize=(plots.WIDTH + 1, 1.0 + 0.4 * len(imp)))
    ax.barh(imp["param"], imp["fanova"], xerr=imp["fanova_std"].fillna(0), color=sns.color_palette(plots.PALETTE)[0],
            capsize=3, label="fANOVA (mean ± sd over forest seeds)")
    if imp["ped_anova"].notna().any():
        ax.scatter(imp["ped_anova"], imp["param"], color=sns.color_palette(plots.PALETTE)[1], zorder=3,
                   label="PED-ANOVA")
    ax.invert_yaxis()
    ax.set_xlabel("importance (normalised)\nerror bar: sd of fANOVA over forest seeds, the estimator's own "
                  "randomness,\nnot uncertainty about the study", fontsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    return plots.to_uri(fig)


def interaction(data: StudyData, a: str, b: str) -> str | None:
    """Mean trial value (val/loss, val/bpb: the study's outcome) per cell of two parameters (continuous ones binned
    into quartiles), with each cell's count: a cell's minimum would reward the cells that happened to get more
    trials."""
    done = completed(data.trials).dropna(subset=[a, b])
    if done.empty:
        return None
    mean, count = cell_means(done.assign(**{a: _bins(done[a]), b: _bins(done[b])}), a, b)
    annot = np.where(count.to_numpy() > 0, [[f"{m:.3g}\n(n={int(n)})" for m, n in zip(mr, nr, strict=True)]
                                            for mr, nr in zip(mean.to_numpy(), count.to_numpy(), strict=True)], "")
    fig, ax = plt.subplots(figsize=(plots.WIDTH + 1, 3.4))
    metric = names.outcome_label(data.spec.outcome, "val")
    sns.heatmap(mean, annot=annot, fmt="", annot_kws={"fontsize": 7}, cmap="viridis_r", ax=ax,
                cbar_kws={"label": f"mean {metric}"})
    ax.set_title(f"Interaction: {a} × {b} (mean {metric} of the completed runs per cell)", fontsize=9)
    return plots.to_uri(fig)


def cell_means(grid: pd.DataFrame, a: str, b: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean trial value and run count per ``(a, b)`` cell, ``a`` down and ``b`` across; an empty cell is NaN and 0."""
    cells = grid.groupby([a, b], observed=False)["value"].agg(["mean", "count"])
    return cells["mean"].unstack(b), cells["count"].unstack(b).fillna(0).astype(int)


def _bins(values: pd.Series) -> pd.Series:
    """Few distinct values as they are (numbers in numeric order), many numbers as quartile bins."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any() or numeric.nunique() <= 6:
        labels = values.map(display)
        order = sorted(dict.fromkeys(zip(labels, values, strict=True)), key=lambda p: plots.sort_key(p[1]))
        categories = list(dict.fromkeys(label for label, _ in order))
        return pd.Series(pd.Categorical(labels, categories=categories, ordered=True), index=values.index)
    edges = np.unique(np.quantile(numeric, [0, 0.25, 0.5, 0.75, 1]))
    labels = [f"{display(lo)}–{display(hi)}" for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
    return pd.cut(numeric, edges, labels=labels, include_lowest=True)
