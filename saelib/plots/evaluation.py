"""Figures for SAE evaluation: sparsity–fidelity frontiers, per-seed comparisons, L0 and density
distributions, and our per-layer ZF medians beside the paper's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from saelib.analysis.evaluate import mean_ci
from saelib.plots.style import apply_style, figure_legend_below, legend_outside, log_ticks, metric_label
from saelib.sae.rules import rule_attr, rule_in

import matplotlib.pyplot as plt  # noqa: E402  (style module picks a headless backend first)



def _axes(ax: plt.Axes | None, figsize=(6.4, 4.0)) -> tuple[plt.Figure, plt.Axes]:
    apply_style()
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def pareto_plot(
    frame: pd.DataFrame,
    *,
    x: str = "l0_mean",
    y: str = "nmse_mean",
    yerr: str | None = None,
    hue: str = "activation",
    d_in: int | None = None,
    logx: bool = True,
    logy: bool = True,
    star: bool = True,
    ax: plt.Axes | None = None,
    title: str | None = None,
    ylabel: str | None = None,
) -> plt.Figure:
    """Sparsity (x) against a fidelity metric (y), one line per architecture, as in the paper.

    ``frame``: one row per SAE or per configuration (e.g. seed means); ``yerr`` names a column
    of error-bar half-widths (e.g. 95% CI). A ★ marks the global minimum of ``y`` and a dotted
    vertical line the width ``d_in`` (right of it any SAE can reconstruct almost exactly).
    """
    fig, ax = _axes(ax)
    for act, g in frame.groupby(hue, sort=False):
        g = g.sort_values(x)
        ax.errorbar(g[x], g[y], yerr=None if yerr is None else g[yerr], marker="o", ms=4,
                    ls=rule_attr(str(act), "linestyle", "-"), color=rule_attr(str(act), "color"), capsize=2,
                    label=rule_attr(str(act), "paper_label", str(act)))
    if star and len(frame):
        best = frame.loc[frame[y].idxmin()]
        ax.scatter([best[x]], [best[y]], marker="*", s=220, color="gold", edgecolor="black", zorder=5,
                   label=f"lowest {metric_label(y)}")
    if d_in is not None:
        ax.axvline(d_in, color="grey", ls=":", lw=1)
        ax.text(d_in, 0.98, f"L0 = d = {d_in} ", transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="top", fontsize=8, color="grey")
    if logx:
        ax.set_xscale("log")
        log_ticks(ax.xaxis)  # 1-2-5 labels: a range inside one decade would get none
    if logy:
        ax.set_yscale("log")
        log_ticks(ax.yaxis)
    ax.set_xlabel("Sparsity (L0)")
    ax.set_ylabel(ylabel or metric_label(y))
    legend_outside(ax)
    if title:
        ax.set_title(title)
    return fig


def seed_comparison_plot(
    frame: pd.DataFrame,
    metric: str,
    *,
    group: str = "activation",
    panel: str | None = "regime",
    ylabel: str | None = None,
    confidence: float = 0.95,
) -> plt.Figure:
    """One dot per seed and the mean with its t-distribution CI, per architecture (and per panel).

    ``frame``: one row per trained SAE with columns ``group``, ``metric`` and optionally ``panel``.
    """
    apply_style()
    panels = [None] if panel is None or panel not in frame.columns else list(dict.fromkeys(frame[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels) + 0.6, 3.6), squeeze=False)
    for ax, p in zip(axes[0], panels):
        sub = frame if p is None else frame[frame[panel] == p]
        groups = list(dict.fromkeys(sub[group]))
        for i, gname in enumerate(groups):
            vals = sub.loc[sub[group] == gname, metric].to_numpy(dtype=float)
            color = rule_attr(str(gname), "color", "black")
            jitter = np.linspace(-0.12, 0.12, len(vals)) if len(vals) > 1 else np.zeros(1)
            ax.scatter(i + jitter, vals, s=14, color=color, alpha=0.6)
            ci = mean_ci(vals, confidence)
            err = 0 if np.isnan(ci.half_width) else ci.half_width
            ax.errorbar([i + 0.28], [ci.mean], yerr=[err], fmt="s", color=color, capsize=3, ms=5)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([rule_attr(str(g), "paper_label", str(g)) for g in groups], rotation=15)
        ax.set_title(str(p) if p is not None else "")
        ax.set_ylabel(ylabel or metric_label(metric))
    fig.tight_layout()
    return fig


def l0_distribution_plot(
    l0: Mapping[str, Any],
    *,
    d_in: int | None = None,
    bins: int = 40,
    ax: plt.Axes | None = None,
    title: str | None = "Per-token L0",
) -> plt.Figure:
    """Histograms of per-token L0 (top-AFA chooses L0 per token; TopK is a spike at k)."""
    fig, ax = _axes(ax)
    arrays = {k: np.asarray(v, dtype=float).ravel() for k, v in l0.items()}
    hi = max(max(a.max() for a in arrays.values() if a.size), 1.0)
    edges = np.linspace(0, hi * 1.02 + 1, bins + 1)
    for label, a in arrays.items():
        ax.hist(a, bins=edges, histtype="step", lw=1.5, color=rule_attr(rule_in(label), "color"), label=str(label),
                density=True)
    if d_in is not None:
        ax.axvline(d_in, color="grey", ls=":", lw=1)
    ax.set_xlabel("active latents per token (L0)")
    ax.set_ylabel("density")
    legend_outside(ax, fontsize=7)
    if title:
        ax.set_title(title)
    return fig


def latent_density_plot(
    freqs: Mapping[str, Any],
    *,
    n_tokens: int | None = None,
    bins: int = 40,
    ax: plt.Axes | None = None,
    title: str | None = "Latent firing frequency on held-out tokens",
) -> plt.Figure:
    """Histogram of log10 firing frequency per latent; dead latents counted in the legend."""
    fig, ax = _axes(ax)
    floor = -7.0 if n_tokens is None else np.log10(0.5 / n_tokens)
    for label, f in freqs.items():
        f = np.asarray(f, dtype=float)
        dead = int((f == 0).sum())
        ax.hist(np.log10(np.maximum(f, 10**floor)), bins=bins, histtype="step", lw=1.5,
                color=rule_attr(rule_in(label), "color"), label=f"{label} ({dead} dead)")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    legend_outside(ax, fontsize=7)
    if title:
        ax.set_title(title)
    return fig


def paper_vs_ours_plot(
    ours: pd.DataFrame,
    paper: pd.DataFrame,
    *,
    columns: Sequence[str] = ("median_ratio", "median_nmse", "median_eps_lbo"),
    labels: Sequence[str] = ("median ‖f̃‖/‖z‖", "median NMSE", "median εLBO"),
    ours_label: str = "ours",
    paper_label: str = "paper (gpt2-small-res-jb, §4.1 table)",
    n_layers: float = 12,
    ours_n_layers: float | None = None,
) -> plt.Figure:
    """Per-layer medians: ours (x = relative depth) beside the paper's GPT-2 table.

    Both frames are indexed by 1-based layer; depth is layer / n_layers (12 for GPT-2 small;
    ``ours_n_layers`` for our model, default the same scale), so models of different depth share
    an axis. Each series is divided by its model's depth, never by its own deepest plotted layer:
    three SAEs at blocks 16, 19 and 21 of 30 sit at 0.53, 0.63 and 0.70.
    """
    apply_style()
    fig, axes = plt.subplots(1, len(columns), figsize=(4.0 * len(columns), 3.4))
    axes = np.atleast_1d(axes)
    for ax, col, lab in zip(axes, columns, labels):
        for frame, name, style, depth_of in ((paper, paper_label, "s--", n_layers),
                                             (ours, ours_label, "o-", ours_n_layers or n_layers)):
            if col not in frame.columns:
                continue
            layers = np.asarray(frame.index, dtype=float)
            depth = layers / depth_of
            ax.plot(depth, frame[col].to_numpy(dtype=float), style, ms=4, label=name)
        ax.set_xlabel("relative depth (layer / n_layers)")
        ax.set_ylabel(lab)
        if "eps" in col or "nmse" in col:
            ax.set_yscale("log")
            ax.autoscale_view()
            log_ticks(ax.yaxis)
        ax.set_xlim(0, 1.05)
    figure_legend_below(fig, axes, ncol=2)
    return fig
