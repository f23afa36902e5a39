"""Figures of chapter 3: the L0-NMSE frontier, top-AFA's per-token L0 distribution, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.colors as mc
import matplotlib.pyplot as plt
import numpy as np

from saelib.plots.style import count_formatter, log_ticks, figure_legend_below, legend_outside, metric_label
from saelib.sae.rules import RULES, knob_text

__all__ = ["plot_frontier", "plot_l0_distribution", "plot_training_curves"]


def _nice_log_ticks(axis) -> None:
    """Label a log axis at 1-2-5 steps whatever its range (see :func:`saelib.plots.style.log_ticks`)."""
    log_ticks(axis)


def _layer_of(hook: str) -> str:
    parts = hook.split(".")
    return parts[1] if len(parts) > 1 and parts[1].isdigit() else hook


def plot_frontier(
    table,
    *,
    x: str = "l0",
    y: str = "nmse",
    d_model: int | None = None,
    hooks: Sequence[str] | None = None,
    annotate: bool = True,
    title: str | None = None,
) -> plt.Figure:
    """Log-log sparsity-fidelity frontier, one panel per hook (the paper's Fig. for E3).

    Args:
        table: DataFrame from :func:`saelib.pipeline.sweep_table` (columns hook, activation, k,
            afa_coeff, ``x``, ``y``).
        d_model: draw a vertical line at L0 = d (above it any SAE can reconstruct almost exactly).
        annotate: label each point with its k or λ.
    A star marks each panel's lowest ``y``.
    """
    hooks = list(hooks) if hooks is not None else sorted(table["hook"].unique(), key=lambda h: int(_layer_of(h)) if _layer_of(h).isdigit() else 0)
    fig, axes = plt.subplots(1, len(hooks), figsize=(4.2 * len(hooks), 3.8), squeeze=False, sharey=True)
    for ax, hook in zip(axes[0], hooks):
        sub = table[table["hook"] == hook]
        for act, rule in RULES.items():
            s = sub[sub["activation"] == act]
            if s.empty:
                continue
            s = s.sort_values(x)
            ax.plot(s[x], s[y], ls=rule.linestyle, marker="o", ms=4, color=rule.color, label=rule.label)
            if annotate:
                for _, r in s.iterrows():
                    ax.annotate(knob_text(r), (r[x], r[y]), fontsize=6, xytext=(3, 3), textcoords="offset points", color=rule.color)
        if not sub.empty:
            best = sub.loc[sub[y].idxmin()]
            ax.plot([best[x]], [best[y]], "*", ms=14, color="k", zorder=5, label="lowest " + metric_label(y))
        if d_model:
            ax.axvline(d_model, color="0.5", lw=0.8, ls=":")
            ax.text(d_model, 1.0, " L0 = d", transform=ax.get_xaxis_transform(), fontsize=7, va="top", color="0.4")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity L0 (held-out mean)")
        ax.set_title(f"layer {_layer_of(hook)} ({hook})", fontsize=9)
    for ax in axes[0]:  # after every panel is drawn: the y axis is shared
        ax.autoscale_view()
        _nice_log_ticks(ax.xaxis)
    _nice_log_ticks(axes[0][0].yaxis)
    axes[0][0].set_ylabel(f"{metric_label(y)} (held-out)")
    if title:
        fig.suptitle(title)
    figure_legend_below(fig, axes[0], fontsize=8)
    return fig


def _shade(color: str, j: int, n: int) -> tuple:
    """The j-th of n shades of ``color``: from the colour itself towards black."""
    rgb = np.array(mc.to_rgb(color))
    f = 0.0 if n <= 1 else 0.55 * j / (n - 1)
    return tuple(rgb * (1 - f))


def plot_l0_distribution(
    evals: Mapping[str, Mapping[str, Any]],
    names: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    ks: Sequence[int] = (),
    d_model: int | None = None,
    title: str | None = None,
) -> plt.Figure:
    """Per-token L0 distributions (held-out ``l0_hist`` of eval.json) as step histograms.

    ``ks`` draws vertical lines at fixed TopK budgets for comparison; ``d_model`` one at L0 = d.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    labels = list(labels) if labels is not None else list(names)
    cmap = plt.get_cmap("viridis")
    for i, (n, lab) in enumerate(zip(names, labels)):
        hist = np.asarray(evals[n]["l0_hist"], dtype=float)
        if hist.sum() == 0:
            continue
        vals = np.arange(len(hist))
        nz = hist > 0
        # log-spaced bins: L0 spans orders of magnitude across λ
        lo, hi = max(vals[nz].min(), 1), max(vals[nz].max(), 2)
        bins = np.unique(np.round(np.geomspace(lo, hi + 1, 30)).astype(int))
        counts, edges = np.histogram(vals, bins=bins, weights=hist)
        dens = counts / hist.sum() / np.diff(edges)
        ax.stairs(dens, edges, color=cmap(i / max(len(names) - 1, 1)), label=f"{lab} (mean {evals[n]['l0']:.0f})")
    ax.set_xscale("log")
    xlo, xhi = ax.get_xlim()
    for i, k in enumerate(k for k in ks if xlo / 2 <= k <= xhi * 2):
        ax.axvline(k, color="0.6", lw=0.8, ls="--", label="TopK budgets k" if i == 0 else None)
    if d_model:
        ax.axvline(d_model, color="0.3", lw=0.8, ls=":", label=f"L0 = d = {d_model}")
    _nice_log_ticks(ax.xaxis)
    ax.set_xlabel("latents active on a token (L0)")
    ax.set_ylabel("fraction of tokens per unit L0")
    legend_outside(ax, fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_training_curves(
    metrics,
    names: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    ys: Sequence[str] = ("nmse", "l0"),
    title: str | None = None,
) -> plt.Figure:
    """Training records (``load_metrics`` DataFrame) against tokens, one panel per metric (log y)."""
    labels = list(labels) if labels is not None else list(names)
    fig, axes = plt.subplots(1, len(ys), figsize=(4.4 * len(ys), 3.4), squeeze=False)
    # runs of one architecture share its hue; each gets its own shade and line style
    acts = [next((a for a in RULES if f"-{a}-" in n), "topk") for n in names]
    styles = ["-", "--", ":", "-."]
    nth = {n: sum(a == acts[i] for a in acts[:i]) for i, n in enumerate(names)}
    count = {a: acts.count(a) for a in set(acts)}
    for ax, y in zip(axes[0], ys):
        for n, lab, act in zip(names, labels, acts):
            m = metrics[metrics["name"] == n]
            if m.empty or y not in m:
                continue
            j = nth[n]
            shade = _shade(RULES[act].color, j, count[act])
            ax.plot(m["tokens"], m[y], styles[j % len(styles)], color=shade, label=lab, lw=1.3)
        # fractions such as dead_frac can be exactly 0: keep those on a linear axis
        ax.set_yscale("linear" if y.startswith("dead") else "log")
        if not y.startswith("dead"):
            ax.autoscale_view()
            log_ticks(ax.yaxis)
        ax.xaxis.set_major_formatter(count_formatter())  # 120k, not 120000 run into its neighbour
        ax.set_xlabel("training tokens")
        ax.set_ylabel(metric_label(y) + " (training, per window)")
    if title:
        fig.suptitle(title)
    figure_legend_below(fig, axes[0], fontsize=8)
    return fig
