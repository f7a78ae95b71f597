"""The report's figures, in one seaborn theme with a colour-blind palette. Each returns a PNG data URI (or None when
there is nothing to draw), so the page embeds its images and opens offline."""

from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI; must precede pyplot

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ablate import names  # noqa: E402
from ablate.report.analysis import fmt, nuisance_ranges, seed_runs, variant_order  # noqa: E402
from ablate.report.load import StudyData  # noqa: E402

PALETTE = "colorblind"
WIDTH = 4.2  # inches per panel; at 110 dpi two panels fit a laptop's content column


def theme() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, font_scale=0.9)


def to_uri(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _panels(n: int, height: float = 3.2) -> tuple[plt.Figure, list[plt.Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH * cols, height * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _colors(keys: list[str]) -> dict[str, tuple]:
    return dict(zip(keys, sns.color_palette(PALETTE, len(keys)), strict=False))


def variant_colors(data: StudyData) -> dict[str, tuple]:
    """One colour per variant, the same in every figure of the page."""
    return _colors(variant_order(data)) if "variant" in data.trials else {}


def isolation(data: StudyData, table: pd.DataFrame) -> str | None:
    """Per factor: val/loss of each value's re-tuned best point, mean with 95% CI over seeds, seeds as dots."""
    factors = [f for f in dict.fromkeys(table["factor"]) if f]
    runs = seed_runs(data)
    if not factors or runs.empty:
        return None
    fig, axes = _panels(len(factors))
    base = table[table["variant"] == "base"]
    for ax, factor in zip(axes, factors, strict=False):
        rows = pd.concat([base.assign(value=_base_label(data, factor)), table[table["factor"] == factor]])
        keys = [_sort_key(v) for v in rows["value"]]
        rows = rows.iloc[sorted(range(len(rows)), key=keys.__getitem__)]
        labels = [fmt(v) for v in rows["value"]]
        x = np.arange(len(rows))
        colors = ["0.35" if v == "base" else sns.color_palette(PALETTE)[0] for v in rows["variant"]]
        ax.errorbar(x, rows["mean"], yerr=rows["ci"].fillna(0), fmt="none", ecolor="0.3", capsize=4, zorder=1)
        ax.scatter(x, rows["mean"], c=colors, s=60, zorder=2, label="mean ± 95% CI")
        for i, variant in enumerate(rows["variant"]):
            pts = runs.loc[runs["variant"] == variant, "value"]
            ax.scatter(np.full(len(pts), i + 0.12), pts, s=12, color="0.55", zorder=2)
        ax.set_xticks(x, [f"{lab}\n(base)" if v == "base" else lab for lab, v in zip(labels, rows["variant"],
                                                                                      strict=False)])
        ax.set_xlabel(factor)
        ax.set_ylabel("final val/loss (seed runs)")
    fig.suptitle("Best val/loss per value after re-tuning, 95% CI over seeds (grey dots: single seeds)")
    return to_uri(fig)


def _sort_key(value: object) -> tuple:
    """Numbers (also as MLflow's param strings) in numeric order, then other values as text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _base_label(data: StudyData, factor: str) -> object:
    from ablate.report.analysis import base_value

    return base_value(factor, data)


def lr_sensitivity(data: StudyData, param: str = "train.lr") -> str | None:
    """Tune phase: val/loss against a nuisance parameter, one line per variant, each best point starred."""
    t = data.trials
    if "phase" not in t or param not in t:
        return None
    tune = t[(t["phase"] == "tune") & (t["status"] == "completed") & t["value"].notna()]
    if tune.empty:
        return None
    factors = [f for f in dict.fromkeys(tune["factor"]) if f] or [""]
    fig, axes = _panels(len(factors))
    colors = variant_colors(data)
    spec = nuisance_ranges(data).get(param)
    for ax, factor in zip(axes, factors, strict=False):
        rows = tune[tune["factor"].isin([factor, ""])]
        for variant, sub in rows.groupby("variant", sort=False):
            sub = sub.sort_values(param)
            ax.plot(sub[param], sub["value"], marker="o", ms=4, color=colors[variant], label=variant)
            best = sub.loc[sub["value"].idxmin()]
            ax.scatter([best[param]], [best["value"]], marker="*", s=160, color=colors[variant], edgecolor="k",
                       zorder=3)
        if spec:
            ax.axvspan(float(spec["low"]), float(spec["high"]), color="0.9", zorder=0)
            ax.set_xlim(float(spec["low"]) * 0.8, float(spec["high"]) * 1.25)
        if spec is None or spec.get("log"):
            ax.set_xscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel("final val/loss (tune runs)")
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Sensitivity to {param} (shaded: searched range; ★ best point)")
    return to_uri(fig)


def curves(data: StudyData, best: dict[str, str]) -> str | None:
    """val/loss and train/loss histories of the best run of each variant."""
    frames = []
    for variant, run_id in best.items():
        for key in (names.VAL_LOSS, names.TRAIN_LOSS):
            h = data.history(run_id, key)
            frames.append(h.assign(variant=variant, metric=key))
    df = pd.concat(frames) if frames else pd.DataFrame()
    if df.empty:
        return None
    fig, axes = _panels(2)
    for ax, key in zip(axes, (names.VAL_LOSS, names.TRAIN_LOSS), strict=False):
        palette = {**_colors(list(best)), **variant_colors(data)}
        sns.lineplot(df[df["metric"] == key], x="step", y="value", hue="variant", ax=ax, marker="." if key ==
                     names.VAL_LOSS else None, palette={k: palette[k] for k in best})
        ax.set_ylabel(key)
        ax.legend(fontsize=7)
    return to_uri(fig)


def pareto(data: StudyData) -> str | None:
    """Final val/loss of every completed run against training FLOPs and wall time; the Pareto front as a step."""
    t = data.trials
    done = t[(t["status"] == "completed") & t["value"].notna()]
    xs = [k for k in (names.FLOPS_TOTAL, names.WALL_S) if k in done and done[k].notna().any()]
    if not xs:
        return None
    fig, axes = _panels(len(xs))
    hue = "variant" if data.kind == "ablation" else None
    for ax, key in zip(axes, xs, strict=False):
        rows = done.dropna(subset=[key])
        colors = variant_colors(data)
        sns.scatterplot(rows, x=key, y="value", hue=hue, ax=ax, s=30, palette=colors if hue else None,
                        hue_order=list(colors) if hue else None)
        front = pareto_front(rows, key)
        ax.step(front[key], front["value"], where="post", color="k", lw=1, label="Pareto front")
        if rows[key].max() > 20 * rows[key].min() > 0:
            ax.set_xscale("log")
        ax.set_ylabel("final val/loss")
        ax.legend(fontsize=7)
    return to_uri(fig)


def pareto_front(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    """Rows no other row beats on both ``key`` (cost) and val/loss, sorted by cost."""
    rows = rows.sort_values([key, "value"])
    keep = rows["value"] < rows["value"].cummin().shift(fill_value=np.inf)
    return rows[keep]


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


def importance(imp: pd.DataFrame) -> str | None:
    if imp.empty:
        return None
    fig, ax = plt.subplots(figsize=(WIDTH + 1, 0.6 + 0.4 * len(imp)))
    ax.barh(imp["param"], imp["fanova"], xerr=imp["fanova_std"].fillna(0), color=sns.color_palette(PALETTE)[0],
            capsize=3, label="fANOVA (mean ± sd over forest seeds)")
    if imp["ped_anova"].notna().any():
        ax.scatter(imp["ped_anova"], imp["param"], color=sns.color_palette(PALETTE)[1], zorder=3, label="PED-ANOVA")
    ax.invert_yaxis()
    ax.set_xlabel("importance (normalised)")
    ax.legend(fontsize=7)
    return to_uri(fig)


def interaction(data: StudyData, a: str, b: str) -> str | None:
    """Best val/loss per cell of two parameters (continuous ones binned into quartiles)."""
    t = data.trials
    done = t[(t["status"] == "completed") & t["value"].notna()].dropna(subset=[a, b])
    if done.empty:
        return None
    grid = done.assign(**{a: _bins(done[a]), b: _bins(done[b])})
    pivot = grid.pivot_table(index=a, columns=b, values="value", aggfunc="min", observed=False)
    fig, ax = plt.subplots(figsize=(WIDTH + 1, 3.4))
    sns.heatmap(pivot, annot=True, fmt=".3g", cmap="viridis_r", ax=ax, cbar_kws={"label": "best val/loss"})
    ax.set_title(f"Interaction: {a} × {b}")
    return to_uri(fig)


def _bins(values: pd.Series) -> pd.Series:
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.isna().any() or numeric.nunique() <= 6:
        return values.map(fmt)
    edges = np.unique(np.quantile(numeric, [0, 0.25, 0.5, 0.75, 1]))
    labels = [f"{fmt(lo)}–{fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:], strict=False)]
    return pd.cut(numeric, edges, labels=labels, include_lowest=True)
