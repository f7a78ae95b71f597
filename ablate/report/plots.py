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
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

from ablate.core import names  # noqa: E402
from ablate.report import across  # noqa: E402
from ablate.report.analysis import display, seed_runs  # noqa: E402
from ablate.report.load import StudyData, completed  # noqa: E402

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


BASE_COLOR = (0.3, 0.3, 0.3)  # the base, the same neutral grey in every panel and figure
VALUE_COLORS = [c for i, c in enumerate(sns.color_palette(PALETTE)) if i != 7]  # the palette less its grey


def variant_colors(data: StudyData) -> dict[str, tuple]:
    """One colour per variant, the same in every figure of the page and whatever has run so far: the base grey, each
    factor's values in palette order (the factors sit in panels of their own, so colours repeat only across panels);
    then any variant only the trials name (a search's), in palette order."""
    out = {"base": BASE_COLOR}
    by_factor: dict[str, int] = {}
    for v in data.spec.variants():
        if v.name != "base":
            k = by_factor[v.factor] = by_factor.get(v.factor, -1) + 1
            out[v.name] = VALUE_COLORS[k % len(VALUE_COLORS)]
    ran = [v for v in dict.fromkeys(data.trials["variant"]) if v and v not in out] if "variant" in data.trials else []
    return {**out, **dict(zip(ran, VALUE_COLORS * (1 + len(ran) // len(VALUE_COLORS)), strict=False))}


def _legend_outside(ax: plt.Axes, title: str | None = None) -> None:
    """The legend right of the panel, never over its data."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, title=title or None, title_fontsize=7,
                  frameon=False, borderaxespad=0)


def _log_x(ax: plt.Axes) -> None:
    """A log x axis with labels at 1, 2 and 5 of each decade only, written short (3e-3 would crowd its neighbours)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e")))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _factors(data: StudyData) -> dict[str, list[str]]:
    """Each scientific factor's variants, base first: what one panel of a faceted figure draws."""
    out: dict[str, list[str]] = {}
    for v in data.spec.variants():
        if v.factor:
            out.setdefault(v.factor, ["base"]).append(v.name)
    return out


VERDICT_STYLE = {  # verdict -> (palette index, marker): colour and shape both, so a grey print still tells them apart
    "better": (2, "D"),
    "worse": (3, "s"),
    "equivalent": (0, "o"),
    "undecided": (7, "o"),
}


def isolation(data: StudyData, table: pd.DataFrame) -> str | None:
    """Per factor: each value's paired difference from the base on the verdict metric (the outcome), with the interval
    the verdict was read off, the ±margin band of "equivalent", and every seed's own difference as a grey dot."""
    factors = [f for f in dict.fromkeys(table["factor"]) if f] if "factor" in table else []
    seeds = seed_differences(data)
    if not factors or (table["diff"].isna().all() and seeds.empty):
        return None
    fig, axes = _panels(len(factors), height=3.4)
    base = table[table["variant"] == "base"]
    seen: set[str] = set()
    for ax, factor in zip(axes, factors, strict=False):
        rows = table[table["factor"] == factor]
        seen |= set(rows["verdict"])
        _isolation_panel(ax, data, factor, base, rows, seeds)
    fig.legend(handles=_isolation_legend(seen, data.spec.margin, seeds["diverged"].any()), loc="outside lower center",
               ncols=4, fontsize=7, frameon=False)
    fig.suptitle(f"{names.outcome_label(data.spec.outcome)}: each value minus the base, paired by seed; error bar: "
                 f"the interval the verdict uses ({_levels(table)})\nshaded: ±{data.spec.margin:g}, the margin inside "
                 "which values are equivalent", fontsize=9)
    return to_uri(fig)


def _levels(table: pd.DataFrame) -> str:
    """The intervals' confidence, which the factor's number of alternatives and the look set: ``95%`` or
    ``97.5-98.3%``."""
    levels = sorted({round(100 * (1 - 2 * v), 1) for v in table.get("level", pd.Series(dtype=float)).dropna()})
    if not levels:
        return "Bonferroni-adjusted level"
    return f"{levels[0]:g}%" if len(levels) == 1 else f"{levels[0]:g}–{levels[-1]:g}%, Bonferroni-adjusted"


def seed_differences(data: StudyData) -> pd.DataFrame:
    """Per alternative and seed, its outcome minus the base's outcome for the same seed (the pairs the verdict
    uses), and whether either of the two runs diverged (its outcome is then the uniform-guess loss)."""
    columns = ["variant", "seed", "diff", "diverged"]
    runs = seed_runs(data)
    runs = runs[runs["seed"].notna()] if "seed" in runs else runs.iloc[:0]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    runs = runs.assign(seed=runs["seed"].astype(int), outcome=runs["outcome"].astype(float),
                       diverged=runs["status"].eq("diverged"))
    per = runs.groupby(["variant", "seed"]).agg(outcome=("outcome", "mean"), diverged=("diverged", "any"))
    base = per.loc["base"] if "base" in per.index.get_level_values(0) else per.iloc[:0].droplevel(0)
    alt = per.drop(index="base", level=0, errors="ignore").reset_index()
    alt = alt[alt["seed"].isin(base.index)]
    paired = base.loc[alt["seed"]]
    return pd.DataFrame({"variant": alt["variant"].to_numpy(), "seed": alt["seed"].to_numpy(),
                         "diff": alt["outcome"].to_numpy() - paired["outcome"].to_numpy(),
                         "diverged": alt["diverged"].to_numpy() | paired["diverged"].to_numpy()}, columns=columns)


def _isolation_panel(ax: plt.Axes, data: StudyData, factor: str, base: pd.DataFrame, rows: pd.DataFrame,
                     seeds: pd.DataFrame) -> None:
    margin = data.spec.margin
    points = [("base", data.spec.base_value(factor), base)] + [(r["variant"], r["value"], r.to_frame().T)
                                                                 for _, r in rows.iterrows()]
    listed = [display(v) for v in data.spec.scientific.get(factor, ())]
    points.sort(key=lambda p: sort_key(p[1], listed))
    ax.axhspan(-margin, margin, color=sns.color_palette(PALETTE)[0], alpha=0.12, lw=0, zorder=0)
    ax.axhline(0, ls="--", lw=1, color="0.3", zorder=1)
    extent = [-margin, margin]
    for x, (variant, _, row) in enumerate(points):
        if variant == "base":
            ax.scatter([x], [0], marker="*", s=140, color="0.2", zorder=3)
            continue
        r = row.iloc[0]
        extent += _draw_verdict(ax, x, r)
        pts = seeds[seeds["variant"] == variant]
        for diverged, sub in pts.groupby("diverged"):
            ax.scatter(np.full(len(sub), x + 0.18), sub["diff"], s=34 if diverged else 12, zorder=2,
                       marker="x" if diverged else "o", color="0.15" if diverged else "0.6")
        extent += list(pts["diff"])
    ax.set_xticks(range(len(points)), [_tick(variant, value, row) for variant, value, row in points],
                  fontsize=8 if len(points) <= 4 else 6)
    ax.set_xlim(-0.5, len(points) - 0.5)
    ax.set_xlabel(factor)
    ax.set_ylabel(f"{names.outcome_label(data.spec.outcome)} − base")
    ax.margins(y=0.15)
    extent = [e for e in extent if math.isfinite(e)]
    if max(map(abs, extent)) > 20 * margin:  # a diverged seed (uniform-guess loss) would flatten the margin band
        _symlog(ax, margin, min(extent), max(extent))
        ax.set_ylabel(f"{names.outcome_label(data.spec.outcome)} − base\n(log scale beyond ±{5 * margin:g})")


def _symlog(ax: plt.Axes, margin: float, lo: float, hi: float) -> None:
    """Linear within five margins (most of the height), logarithmic beyond; ticks at 0, two margins and powers of 10
    (none at the switch, where the next power would crowd it)."""
    linear = 5 * margin
    ax.set_yscale("symlog", linthresh=linear, linscale=4)
    pad = [v * 1.6 if abs(v) > linear else v + math.copysign(0.3 * linear, v) for v in (lo, hi)]
    ax.set_ylim(*pad)
    powers = [10.0**k for k in range(math.floor(math.log10(linear)) + 1, math.ceil(math.log10(max(-lo, hi))) + 1)]
    ticks = [0.0, -2 * margin, 2 * margin] + [s * p for p in powers for s in (-1, 1)]
    ax.set_yticks(sorted(t for t in ticks if pad[0] <= t <= pad[1]))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _draw_verdict(ax: plt.Axes, x: int, r: pd.Series) -> list[float]:
    """One alternative's mean difference and interval, styled by its verdict; the values it spans (for scaling)."""
    index, marker = VERDICT_STYLE.get(r["verdict"], VERDICT_STYLE["undecided"])
    color = sns.color_palette(PALETTE)[index]
    face = "white" if r["verdict"] == "undecided" else color
    diff, lo, hi = (float(r[k]) for k in ("diff", "lo", "hi"))
    if not math.isfinite(diff):
        ax.annotate("no paired seed", (x, 0), xytext=(0, 8), textcoords="offset points", ha="center", fontsize=7,
                    rotation=90)  # upright: side by side they would overlap
        return []
    if math.isfinite(lo) and math.isfinite(hi):
        ax.errorbar([x], [diff], yerr=[[max(diff - lo, 0)], [max(hi - diff, 0)]], fmt=marker, ms=7, color=color,
                    mfc=face, mew=1.5, capsize=4, zorder=3)
        return [diff, lo, hi]
    ax.plot([x], [diff], marker, ms=7, color=color, mfc=face, mew=1.5, zorder=3)
    ax.annotate("no interval\n(< 2 seeds)", (x, diff), xytext=(0, 9), textcoords="offset points", ha="center",
                fontsize=7)
    return [diff]


def _tick(variant: str, value: object, row: pd.DataFrame) -> str:
    """``value``, then ``(base)`` or the verdict, then the seeds counted (and how many of them diverged)."""
    r = row.iloc[0] if len(row) else pd.Series(dtype=object)
    seeds = f"n={int(r['seeds'])}" if pd.notna(r.get("seeds")) else "n=0"
    if pd.notna(r.get("diverged")) and int(r["diverged"]):
        seeds += f", {int(r['diverged'])} div."
    return f"{display(value)}\n{'(base)' if variant == 'base' else r.get('verdict', '')}\n{seeds}"


def _isolation_legend(verdicts: set[str], margin: float, diverged: bool) -> list:
    palette = sns.color_palette(PALETTE)
    handles = [Line2D([], [], marker="*", ls="", ms=10, color="0.2", label="base (0 by definition)")]
    for verdict, (index, marker) in VERDICT_STYLE.items():
        if verdict in verdicts:
            handles.append(Line2D([], [], marker=marker, ls="", ms=7, color=palette[index], mew=1.5,
                                  mfc="white" if verdict == "undecided" else palette[index], label=verdict))
    handles += [Patch(color=palette[0], alpha=0.12, label=f"±{margin:g}: equivalent"),
                Line2D([], [], marker="o", ls="", ms=4, color="0.6", label="one seed")]
    if diverged:
        handles.append(Line2D([], [], marker="x", ls="", ms=6, color="0.15", label="seed with a diverged run"))
    return handles


def sort_key(value: object, listed: list[str] = ()) -> tuple:
    """Numbers (also as MLflow's param strings) in numeric order, then other values in the study file's order
    (``listed``, as ``display`` writes them), then as text."""
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        text = display(value)
        return (1, listed.index(text) if text in listed else len(listed), text)


def lr_sensitivity(data: StudyData, param: str = "train.lr", table: pd.DataFrame | None = None) -> str | None:
    """Tune phase: the validation outcome (val/loss, val/bpb) against a nuisance parameter, one line per variant
    (panels by factor, the base in each), the chosen point starred with its basin (the range within the margin of its
    value) as a bar under it, diverged tune runs as crosses along the top (they have no value), and the searched range
    shaded."""
    t = data.trials
    if t.empty or "phase" not in t or param not in t:
        return None
    tune = t[(t["phase"] == "tune") & t[param].notna()]
    done, diverged = completed(tune), tune[tune["status"] == "diverged"]
    if done.empty and diverged.empty:
        return None
    factors = [f for f in dict.fromkeys(tune["factor"]) if f] or [""]
    fig, axes = _panels(len(factors), height=3.4)
    colors = variant_colors(data)
    chosen = _table_rows(table)
    spec = next((p for p in data.spec.nuisance if p.key == param), None)
    for ax, factor in zip(axes, factors, strict=False):
        for variant in [v for v in colors if v in set(tune.loc[tune["factor"].isin([factor, ""]), "variant"])]:
            color, label = colors[variant], _value_label(data, variant, factor)
            runs = done[done["variant"] == variant]
            sub = runs.groupby(param, as_index=False)["value"].mean().sort_values(param)  # seed means per point
            ax.plot(sub[param], sub["value"], marker="o", ms=4, color=color, label=label)
            if len(runs) > len(sub):  # several tune seeds: each run too, faintly
                ax.scatter(runs[param], runs["value"], s=8, color=color, alpha=0.35, lw=0, zorder=2)
            gone = diverged.loc[diverged["variant"] == variant, param]
            ax.scatter(gone, np.full(len(gone), 0.96), marker="x", s=36, color=color, zorder=3,
                       transform=ax.get_xaxis_transform())  # x: data, y: the axes' top, whatever the losses
            _star(ax, fig, sub, param, chosen.get(variant), color)
        if spec:
            ax.axvspan(spec.low, spec.high, color="0.95", zorder=0)
        if spec.log if spec else _wide(t[param]):
            _log_x(ax)
        ax.margins(y=0.12)
        ax.set_xlabel(param)
        ax.set_ylabel(f"final {names.outcome_label(data.spec.outcome, 'val')} (tune runs)")
        _legend_outside(ax, factor)
    fig.suptitle(f"Sensitivity to {param}: lines: seed means, dots: runs; ★ chosen point, bar under it: its basin "
                 f"(within ±{data.spec.margin:g} of the best mean);\n× along the top: diverged tune runs (no loss); "
                 "shaded: searched range", fontsize=9)
    return to_uri(fig)


def _table_rows(table: pd.DataFrame | None) -> dict[str, pd.Series]:
    if table is None or table.empty:
        return {}
    return {r["variant"]: r for _, r in table.iterrows()}


def _value_label(data: StudyData, variant: str, factor: str) -> str:
    """In a factor's panel a variant is its value: ``8``, ``base (4)``."""
    if not factor:
        return variant
    if variant == "base":
        value = data.spec.base_value(factor)
        return f"base ({'width / heads' if value is None and factor == 'model.head_dim' else display(value)})"
    return variant.partition("=")[2] if variant.startswith(f"{factor}=") else variant


def _star(ax: plt.Axes, fig: plt.Figure, sub: pd.DataFrame, param: str, row: pd.Series | None, color: tuple) -> None:
    """The chosen point (the table's, on the line of seed means; else the lowest mean) and its basin under it."""
    if sub.empty:
        return
    best = sub.loc[sub["value"].idxmin()]
    if row is not None and pd.notna(row.get("lr")):
        x = np.log(sub[param].astype(float).to_numpy())
        best = {param: float(row["lr"]), "value": float(np.interp(np.log(float(row["lr"])), x, sub["value"]))}
    ax.scatter([best[param]], [best["value"]], marker="*", s=170, color=color, edgecolor="k", lw=0.6, zorder=4)
    if row is None or not (pd.notna(row.get("basin_lo")) and pd.notna(row.get("basin_hi"))):
        return
    under = offset_copy(ax.transData, fig=fig, y=-10, units="points")
    ax.plot([row["basin_lo"], row["basin_hi"]], [best["value"]] * 2, transform=under, color=color, lw=2.2,
            marker="|", ms=7, mew=2.2, solid_capstyle="butt", zorder=4)


def _wide(values: pd.Series) -> bool:
    """Positive values spread over more than a factor of 20: a log axis reads better."""
    v = pd.to_numeric(values, errors="coerce").dropna()
    return len(v) > 0 and v.min() > 0 and v.max() > 20 * v.min()


def curves(data: StudyData, runs: dict[str, list[str]]) -> str | None:
    """Validation outcome histories (val/loss, val/bpb) over every seed run of each variant (``variant -> run
    ids``): the median over seeds as a line, the band from the lowest to the highest seed. An ablation gets a panel
    per factor, the base in each."""
    metric = names.val_metric(data.spec.outcome)  # bpb: logged at every evaluation, as the loss is
    frames = [data.history(run_id, metric).assign(variant=variant, run=run_id)
              for variant, ids in runs.items() for run_id in ids]  # fmt: skip
    df = pd.concat(frames) if frames else pd.DataFrame()
    if df.empty:
        return None
    panels = {f: [v for v in vs if v in runs] for f, vs in _factors(data).items()} if data.kind == "ablation" \
        else {"": list(runs)}  # fmt: skip
    panels = {f: vs for f, vs in panels.items() if vs} or {"": list(runs)}
    fig, axes = _panels(len(panels), height=2.8)
    colors = {**_colors(list(runs)), **variant_colors(data)}
    for ax, (factor, variants) in zip(axes, panels.items(), strict=False):
        for variant in variants:
            rows = df[df["variant"] == variant]
            sns.lineplot(rows, x="step", y="value", estimator="median", errorbar=("pi", 100), ax=ax,
                         color=colors[variant], label=_value_label(data, variant, factor), lw=1.2)
        ax.set_ylabel(names.outcome_label(data.spec.outcome, "val"))
        ax.set_title(factor, fontsize=8)
        _legend_outside(ax)
    fig.suptitle(f"{names.outcome_label(data.spec.outcome, 'val', prose=True)} during training: median over seed runs, "
                 "band from the lowest to the highest seed", fontsize=9)
    return to_uri(fig)


def pareto(data: StudyData) -> str | None:
    """The final validation outcome (val/loss, val/bpb) of every completed run against training FLOPs (else wall
    time); the Pareto front of all runs as a step. An ablation gets a panel per factor (the base in each), the front
    the same in every panel."""
    done = completed(data.trials)
    key = next((k for k in (names.FLOPS_TOTAL, names.WALL_S) if k in done and done[k].notna().any()), None)
    if key is None:
        return None
    rows = done.dropna(subset=[key])
    panels = (_factors(data) if data.kind == "ablation" else {}) or {"": []}  # one panel of every run otherwise
    fig, axes = _panels(len(panels), height=2.8)
    colors = variant_colors(data)
    front = across.frontier(rows, key)
    for ax, (factor, variants) in zip(axes, panels.items(), strict=False):
        for variant in variants or [None]:
            sub = rows if variant is None else rows[rows["variant"] == variant]
            if len(sub):
                ax.scatter(sub[key], sub["value"], s=14, color=colors.get(variant, BASE_COLOR), alpha=0.8, lw=0,
                           label=None if variant is None else _value_label(data, variant, factor))
        ax.step(front[key], front["value"], where="post", color="k", lw=1, label="Pareto front")
        if rows[key].max() > 20 * rows[key].min() > 0:
            _log_x(ax)
        ax.set_xlabel(key)
        ax.set_ylabel(f"final {names.outcome_label(data.spec.outcome, 'val')}")
        ax.set_title(factor, fontsize=8)
        _legend_outside(ax)
    return to_uri(fig)
