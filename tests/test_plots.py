"""The report's figures, drawn from a hand-built study: a PNG for normal input, None for nothing to draw, and the
marks a reader relies on (the verdict's interval, the margin band, diverged runs, the basin, cell means)."""

from __future__ import annotations

import base64
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ablate.design.spec import spec_from_mapping
from ablate.report import plots, search_plots
from ablate.report.load import StudyData

MARGIN = 0.02
UNIFORM = math.log(64)  # the uniform-guess loss a diverged seed run counts at
SPEC = {
    "name": "figs", "kind": "ablation", "task": {"name": "charlm", "seq_len": 16},
    "model": {"embed_dim": 16, "num_heads": 4, "num_layers": 1},
    "scientific": {"model.num_heads": [4, 16, 2], "model.scaling": ["sqrt", "none"]},
    "nuisance": {"train.lr": {"low": 1e-3, "high": 3e-2, "log": True}}, "margin": MARGIN,
}  # fmt: skip
LRS = (1.8e-3, 5.5e-3, 1.7e-2)
# variant -> (factor, value, offset of its loss, seed outcomes: seed -> (test loss, diverged))
VARIANTS = {
    "base": ("", "", 0.0, {1: (2.00, False), 2: (2.03, False), 3: (1.98, False)}),
    "model.num_heads=16": ("model.num_heads", 16, -0.1, {1: (1.89, False), 2: (1.92, False), 3: (1.90, False)}),
    "model.num_heads=2": ("model.num_heads", 2, 0.05, {1: (2.02, False), 2: (UNIFORM, True), 3: (2.00, False)}),
    "model.scaling=none": ("model.scaling", "none", 0.3, {1: (2.31, False)}),
}  # fmt: skip


class Data(StudyData):
    """A StudyData whose histories come from a formula instead of an MLflow store."""

    def history(self, run_id: str, key: str) -> pd.DataFrame:
        steps = np.arange(0, 101, 25)
        floor = 1.5 + 0.1 * (key == "val/loss") - 0.1 * run_id.startswith("model.num_heads=16")
        return pd.DataFrame({"step": steps, "value": floor + 2.5 / (1 + steps / 20)})


def _trials() -> pd.DataFrame:
    rows = []
    for variant, (factor, value, offset, seeds) in VARIANTS.items():
        changes = {"model.num_heads": 4, "model.scaling": "sqrt", **({factor: value} if factor else {})}
        for lr in LRS:
            loss = 2.0 + offset + 0.3 * (math.log10(lr) - math.log10(5.5e-3)) ** 2
            rows.append({"phase": "tune", "status": "completed", "value": loss, "train.lr": lr, **changes})
        for seed, (outcome, diverged) in seeds.items():
            rows.append({"phase": "seed", "status": "diverged" if diverged else "completed", "seed": seed,
                         "value": math.nan if diverged else outcome - 0.01, "outcome": outcome, "train.lr": 5.5e-3,
                         **changes})  # fmt: skip
        for row in rows[-len(seeds) - len(LRS):]:
            row.update(variant=variant, factor=factor, run_id=f"{variant}/{row.get('seed', row['train.lr'])}")
    rows.append({"phase": "tune", "status": "diverged", "value": math.nan, "train.lr": 3e-2, "variant": "base",
                 "factor": "", "run_id": "base/diverged", "model.num_heads": 4, "model.scaling": "sqrt"})
    t = pd.DataFrame(rows)
    t["trial"] = range(len(t))
    t["state"] = t["status"].map({"completed": "COMPLETE", "diverged": "FAIL"})
    return t


def _table() -> pd.DataFrame:
    """The verdict table as analysis builds it (numbers made up, consistent with the trials)."""
    rows = [
        ("base", "", "", 3, 0, 2.003, 0.06, math.nan, math.nan, math.nan, ""),
        ("model.num_heads=16", "model.num_heads", 16, 3, 0, 1.903, 0.04, -0.10, -0.16, -0.04, "better"),
        ("model.num_heads=2", "model.num_heads", 2, 3, 1, 2.725, 3.1, 0.72, -2.9, 4.3, "undecided"),
        ("model.scaling=none", "model.scaling", "none", 1, 0, 2.31, math.nan, 0.31, math.nan, math.nan, "undecided"),
    ]  # fmt: skip
    cols = ["variant", "factor", "value", "seeds", "diverged", "test_mean", "test_ci", "diff", "lo", "hi", "verdict"]
    table = pd.DataFrame(rows, columns=cols)
    level = [math.nan, 0.0125, 0.025, 0.025]  # one-sided: each of two alternatives (Bonferroni), a lone alternative
    return table.assign(level=level, lr=5.5e-3, bracketed=True, basin_lo=3.1e-3, basin_hi=9.7e-3)


@pytest.fixture
def data() -> Data:
    spec = spec_from_mapping(SPEC)
    return Data("figs", "ablation", spec, "sqlite://", "sqlite://", study=None, trials=_trials(), client=None)


@pytest.fixture
def empty(data: Data) -> Data:
    return Data("figs", "ablation", data.spec, "sqlite://", "sqlite://", study=None, trials=data.trials.iloc[:0],
                client=None)


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list:
    """The figures the functions hand to ``to_uri``, still open for inspection."""
    figures, real = [], plots.to_uri

    def keep(fig: object) -> str:
        figures.append(fig)  # closing it in to_uri leaves its artists readable
        return real(fig)

    monkeypatch.setattr(plots, "to_uri", keep)
    plots.theme()
    return figures


def _is_png(uri: str | None) -> bool:
    return bool(uri) and base64.b64decode(uri.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"


def test_seed_differences_pair_each_alternative_with_the_base_seed_by_seed(data: Data) -> None:
    diffs = plots.seed_differences(data).set_index(["variant", "seed"])
    assert diffs.loc[("model.num_heads=16", 2), "diff"] == pytest.approx(1.92 - 2.03)
    assert diffs.loc[("model.num_heads=2", 2), "diff"] == pytest.approx(UNIFORM - 2.03)
    assert diffs["diverged"].sum() == 1 and diffs.loc[("model.num_heads=2", 2), "diverged"]
    assert len(diffs) == 7 and "base" not in diffs.index.get_level_values(0)


def test_isolation_draws_the_verdict_interval_the_margin_and_every_seed(data: Data, drawn: list) -> None:
    assert _is_png(plots.isolation(data, _table()))
    heads, scaling = drawn[0].axes[:2]
    assert "the interval the verdict uses (95–97.5%, Bonferroni-adjusted)" in drawn[0].get_suptitle()
    heads_ylim = heads.get_ylim()
    labels = [t.get_text() for t in heads.get_xticklabels()]
    assert [label.split("\n")[0] for label in labels] == ["2", "4", "16"]  # numeric, not text, order
    assert "(base)" in labels[1] and "better" in labels[2] and "1 div." in labels[0]
    band = [p for p in heads.patches if p.get_height() == pytest.approx(2 * MARGIN)]
    assert band and band[0].get_y() == pytest.approx(-MARGIN)
    for diff in plots.seed_differences(data)["diff"]:  # the diverged seed too, on its log-scaled axis
        assert heads_ylim[0] <= diff <= heads_ylim[1]
    assert heads.get_yscale() == "symlog" and scaling.get_yscale() == "linear"
    assert "n=1" in scaling.get_xticklabels()[1].get_text()  # one seed: no interval, shown as such
    assert any("no interval" in t.get_text() for t in scaling.texts)


def test_lr_sensitivity_marks_the_chosen_point_its_basin_and_diverged_runs(data: Data, drawn: list) -> None:
    table = _table()
    assert _is_png(plots.lr_sensitivity(data, "train.lr", table))
    ax = drawn[0].axes[0]
    xlim = ax.get_xlim()
    assert ax.get_xscale() == "log" and xlim[0] < 1e-3 and xlim[1] > 3e-2  # searched range and diverged point
    bars = [line for line in ax.lines if list(line.get_xdata()) == [3.1e-3, 9.7e-3]]
    assert len(bars) == 3  # base, 16 and 2 heads: one basin under each star
    assert _is_png(plots.lr_sensitivity(data))  # without a table: stars, no basins
    assert not [line for line in drawn[1].axes[0].lines if list(line.get_xdata()) == [3.1e-3, 9.7e-3]]


SEED_RUNS = {"base": ["base/2", "base/1", "base/3"], "model.num_heads=16": ["model.num_heads=16/1"],
             "model.scaling=none": ["model.scaling=none/1"]}  # fmt: skip


def test_curves_have_a_panel_per_factor_the_base_in_each_and_a_band_over_seeds(data: Data, drawn: list) -> None:
    assert _is_png(plots.curves(data, SEED_RUNS))
    heads, scaling = drawn[0].axes[:2]
    assert [ax.get_title() for ax in (heads, scaling)] == ["model.num_heads", "model.scaling"]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in (heads, scaling)]
    assert legends == [["base (4)", "16"], ["base (sqrt)", "none"]]
    base_colour = heads.get_lines()[0].get_color()
    assert base_colour == scaling.get_lines()[0].get_color()  # the base alike in every panel
    assert len(heads.collections) >= 1  # the band over the base's three seeds


def test_every_variant_keeps_its_colour_and_a_factor_never_repeats_one(data: Data) -> None:
    colours = plots.variant_colors(data)
    assert colours["base"] == plots.BASE_COLOR
    heads = [colours[v] for v in ("model.num_heads=16", "model.num_heads=2")]
    assert len(set(heads)) == 2 and plots.BASE_COLOR not in heads


def overlaps(fig) -> list[str]:
    """What a reader would find drawn over something else: a legend over plotted points or lines, or tick labels
    of one axis that touch (matplotlib gives every extent once the figure is drawn)."""
    canvas = FigureCanvasAgg(fig)  # the figure was closed once saved: draw it again to measure it
    canvas.draw()
    renderer, found = canvas.get_renderer(), []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None and legend.get_visible():
            box = legend.get_window_extent(renderer)
            points = [line.get_transform().transform(line.get_xydata()) for line in ax.get_lines()]
            points += [c.get_offset_transform().transform(c.get_offsets()) for c in ax.collections
                       if len(c.get_offsets())]  # fmt: skip
            inside = [p for block in points for p in np.asarray(block) if box.contains(*p)]
            if inside:
                found.append(f"{ax.get_title() or ax.get_xlabel()}: legend over {len(inside)} plotted points")
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels(which="both")
                     if t.get_visible() and t.get_text()]  # fmt: skip
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    if a.overlaps(b):
                        found.append(f"{ax.get_title() or ax.get_xlabel()}: tick labels overlap")
    return found


def test_no_figure_draws_a_legend_over_data_or_tick_labels_over_each_other(data: Data, drawn: list) -> None:
    table = _table()
    flops = data.trials["model.num_heads"].map({2: 0.8e12, 4: 1e12, 16: 2.2e12}) * (1 + data.trials["trial"] % 3)
    costed = Data("figs", "ablation", data.spec, "sqlite://", "sqlite://", study=None,
                  trials=data.trials.assign(**{"cost/flops_total": flops}), client=None)  # fmt: skip
    for draw in (lambda: plots.isolation(data, table), lambda: plots.lr_sensitivity(data, "train.lr", table),
                 lambda: plots.curves(data, SEED_RUNS), lambda: plots.pareto(costed)):  # fmt: skip
        draw()
    assert len(drawn) == 4
    assert [problem for fig in drawn for problem in overlaps(fig)] == []


def test_interaction_shows_the_mean_per_cell_with_its_count(data: Data, drawn: list) -> None:
    done = data.trials[data.trials["status"] == "completed"]
    mean, count = search_plots.cell_means(done, "model.num_heads", "train.lr")
    cell = done[(done["model.num_heads"] == 2) & (done["train.lr"] == 5.5e-3)]["value"]
    assert len(cell) == 3 and mean.loc[2, 5.5e-3] == pytest.approx(cell.mean()) != pytest.approx(cell.min())
    assert count.loc[2, 5.5e-3] == 3
    assert _is_png(search_plots.interaction(data, "model.num_heads", "train.lr"))
    ax = drawn[0].axes[0]
    assert f"{cell.mean():.3g}\n(n=3)" in [t.get_text() for t in ax.texts]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["2", "4", "16"]  # numeric order
    assert drawn[0].axes[1].get_ylabel() == "mean val/loss"  # the colour bar


def test_importance_says_what_its_error_bar_measures(drawn: list) -> None:
    imp = pd.DataFrame({"param": ["train.lr", "model.num_heads"], "fanova": [0.7, 0.3], "fanova_std": [0.05, 0.04],
                        "ped_anova": [0.6, 0.4]})  # fmt: skip
    assert _is_png(search_plots.importance(imp))
    label = drawn[0].axes[0].get_xlabel()
    assert "sd of fANOVA over forest seeds" in label and "not uncertainty about the study" in label


def test_nothing_to_draw_gives_no_figure(data: Data, empty: Data) -> None:
    assert plots.isolation(empty, pd.DataFrame()) is None
    assert plots.isolation(empty, _table().assign(diff=math.nan)) is None  # no seed run finished yet
    assert plots.lr_sensitivity(empty, "train.lr", _table()) is None
    assert plots.lr_sensitivity(data, "model.head_dim") is None  # not a column of the trials
    assert plots.curves(data, {}) is None
    assert search_plots.interaction(empty, "model.num_heads", "train.lr") is None
    assert search_plots.importance(pd.DataFrame()) is None


def test_the_overlap_check_sees_a_legend_over_data_and_crowded_tick_labels() -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot(np.linspace(0, 1, 50), np.linspace(0, 1, 50), label="a line under its legend")
    ax.legend(loc="center")
    ax.set_xticks(np.linspace(0, 1, 30))
    ax.set_xticklabels([f"{x:.4f}" for x in np.linspace(0, 1, 30)])
    problems = overlaps(fig)
    plt.close(fig)
    assert any("legend over" in p for p in problems) and any("tick labels overlap" in p for p in problems)
