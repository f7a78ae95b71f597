"""The figures of a run's attention: entropy per layer and head, and the largest logit over training. In the
report's theme (``plots``)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ablate.report.load import StudyData
from ablate.report.plots import WIDTH, to_uri


def entropy(row: pd.Series) -> str | None:
    """Final attention entropy per layer and head of one run (from its attn/entropy/l{L}h{H} metrics)."""
    cells = []
    for key, value in row.items():
        if isinstance(key, str) and key.startswith("attn/entropy/l") and pd.notna(value):
            layer, _, head = key.removeprefix("attn/entropy/l").partition("h")
            cells.append({"layer": int(layer), "head": int(head), "entropy": float(value)})
    if not cells:
        return None
    grid = pd.DataFrame(cells).pivot(index="layer", columns="head", values="entropy")
    fig, ax = plt.subplots(figsize=(min(1.0 + 0.6 * grid.shape[1], 8), 0.6 + 0.5 * grid.shape[0]))
    sns.heatmap(grid, annot=True, fmt=".2f", cmap="viridis", ax=ax, cbar_kws={"label": "entropy (nats)"})
    ax.set_title("Attention entropy per head (final)")
    return to_uri(fig)


def max_logit(data: StudyData, row: pd.Series) -> str | None:
    """Growth of the largest attention logit per layer during training."""
    keys = sorted(k for k in row.index if isinstance(k, str) and k.startswith("attn/max_logit/"))
    frames = [data.history(row["run_id"], k).assign(layer=k.rsplit("/", 1)[1]) for k in keys]
    df = pd.concat(frames) if frames else pd.DataFrame()
    if df.empty:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH, 2.8))
    sns.lineplot(df, x="step", y="value", hue="layer", marker=".", ax=ax)
    ax.set_ylabel("max attention logit")
    ax.set_title("Largest attention logit per layer")
    return to_uri(fig)
