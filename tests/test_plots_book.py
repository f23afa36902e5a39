"""Figure defects a reader would see: wrong depths, legends on data, identical runs, raw labels."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from saelib.plots import afa as ap
from saelib.plots import evaluation as ev
from saelib.plots import training as tr
from saelib.plots.style import kde_violin


def _labels(axis):
    axis.figure.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


def test_paper_vs_ours_puts_our_layers_at_their_relative_depth():
    paper = pd.DataFrame({"median_ratio": np.linspace(1, 1.3, 12)}, index=range(1, 13))
    ours = pd.DataFrame({"median_ratio": [1.1, 1.2, 1.25]}, index=[16 * 12 / 30, 19 * 12 / 30, 21 * 12 / 30])
    fig = ev.paper_vs_ours_plot(ours, paper, columns=("median_ratio",), labels=("r",), ours_label="ours")
    lines = {ln.get_label(): ln for ln in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["ours"].get_xdata(), [16 / 30, 19 / 30, 21 / 30])
    np.testing.assert_allclose(lines[next(k for k in lines if k.startswith("paper"))].get_xdata()[-1], 1.0)
    assert fig.legends and not fig.axes[0].get_legend(), "one legend, below the panels"


def test_training_curves_tell_runs_apart_and_label_axes_for_readers():
    names = ["s-topafa-a", "s-topafa-b", "s-topafa-c", "s-topk-x"]
    m = pd.concat([pd.DataFrame({"name": n, "tokens": np.arange(100000, 200001, 20000),
                                 "nmse": np.linspace(1, .5, 6) + i / 10, "dead_frac": np.linspace(0, .1, 6)})
                   for i, n in enumerate(names)])
    fig = tr.plot_training_curves(m, names, ys=("nmse", "dead_frac"))
    ax = fig.axes[0]
    styles = {(ln.get_color() if isinstance(ln.get_color(), str) else tuple(ln.get_color()), ln.get_linestyle())
              for ln in ax.get_lines()[:3]}
    assert len(styles) == 3, "three top-AFA runs need three looks"
    for a in fig.axes:
        assert "_" not in a.get_ylabel() and not a.get_ylabel().isupper(), a.get_ylabel()
        labels = _labels(a.xaxis)
        assert labels and all(len(t) <= 5 for t in labels), labels  # 120k, not 120000


def test_pareto_axes_have_tick_labels_and_readable_names():
    agg = pd.DataFrame({"activation": ["topk"] * 3 + ["topafa"] * 2, "l0": [40, 60, 80, 55, 70],
                        "nmse": [.2, .15, .12, .14, .13]})
    fig = ev.pareto_plot(agg, d_in=576)
    ax = fig.axes[0]
    assert len(_labels(ax.xaxis)) >= 2 and len(_labels(ax.yaxis)) >= 2
    assert "nmse" not in " ".join(ax.get_legend_handles_labels()[1]) + ax.get_ylabel()
    leg = ax.get_legend()
    assert leg is not None
    fig.canvas.draw()
    assert leg.get_window_extent().x0 >= ax.get_window_extent().x1, "legend beside the axes, not on the data"


def test_violins_are_not_cut_flat():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    v = np.random.default_rng(0).gamma(2.0, 1.0, 500)
    kde_violin(ax, v, 0.0, width=0.8)
    path = ax.collections[0].get_paths()[0].vertices
    top = path[:, 1].max()
    width_at_top = np.ptp(path[np.isclose(path[:, 1], top), 0])
    assert top > v.max() and width_at_top < 0.02
    fig = ap.half_violin({"a": v, "b": v * 2}, {"a": v * 1e-5, "b": v * 2e-5})
    assert fig.axes[0].collections, "half violins drawn"
