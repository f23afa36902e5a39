"""Figures of the stitching chapter: each takes data and returns a matplotlib Figure."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import matplotlib.pyplot as plt
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from saelib.plots.style import legend_outside, metric_label
from saelib.sae.rules import rule_attr

CLASS_COLORS = {"novel": "#2ca02c", "reconstruction": "#d62728", "dead": "#bbbbbb"}


def novel_fraction_bars(table) -> plt.Figure:
    """% novel (ΔMSE < 0) per width pair and architecture. ``table``: DataFrame with columns
    arch, pair (label), frac_novel, frac_novel_proxy."""
    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    archs = list(dict.fromkeys(table["arch"]))
    pairs = list(dict.fromkeys(table["pair"]))
    w = 0.8 / max(len(archs), 1)
    for i, a in enumerate(archs):
        sub = table[table["arch"] == a].set_index("pair")
        xs = np.arange(len(pairs)) + (i - (len(archs) - 1) / 2) * w
        vals = [100 * sub.loc[p, "frac_novel"] if p in sub.index else np.nan for p in pairs]
        ax.bar(xs, vals, width=w, color=rule_attr(a, "color"), label=a)
        if "frac_novel_proxy" in sub:
            pv = [100 * sub.loc[p, "frac_novel_proxy"] if p in sub.index else np.nan for p in pairs]
            ax.scatter(xs, pv, marker="_", s=120, color="k", zorder=3)
    ax.set_xticks(np.arange(len(pairs)), pairs, rotation=20)
    ax.set_ylabel("% novel latents in the larger SAE")
    ax.set_title("Novel latents per width pair (bars: ΔMSE sign; ticks: max-cos proxy)")
    ax.set_ylim(0, 105)
    ax.legend(ncol=len(archs), loc="upper center", bbox_to_anchor=(0.5, -0.22))
    return fig


def delta_vs_maxcos(max_cos: np.ndarray, delta_mse: np.ndarray, label: np.ndarray, *, theta: float | None = None,
                    title: str = "") -> plt.Figure:
    """Scatter of each larger-SAE latent's insertion ΔMSE against its max decoder cosine."""
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for c in ("reconstruction", "novel"):
        sel = label == c
        ax.scatter(max_cos[sel], delta_mse[sel], s=4, alpha=0.5, color=CLASS_COLORS[c], label=f"{c} ({sel.sum()})")
    ax.axhline(0, color="k", lw=0.7)
    if theta is not None:
        ax.axvline(theta, color="k", ls="--", lw=0.8, label=f"θ = {theta:g}")
    alive = label != "dead"
    if alive.any():
        lim = np.quantile(np.abs(delta_mse[alive]), 0.995)
        thresh = max(lim * 1e-3, 1e-12)
        ax.set_yscale("symlog", linthresh=thresh)
        # labels at every other decade above the linear band and at 0: the ±linthresh labels
        # would otherwise sit on top of each other around zero
        top = np.abs(delta_mse[alive]).max()
        decades = [10.0 ** e for e in range(int(np.ceil(np.log10(thresh * 10))), int(np.ceil(np.log10(max(top, thresh * 10)))) + 1)]
        decades = decades[::-1][::2][::-1] if len(decades) > 4 else decades
        ax.yaxis.set_major_locator(FixedLocator([-d for d in decades[::-1]] + [0.0] + decades))
        ax.yaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("max cosine to the smaller SAE's decoder")
    ax.set_ylabel("ΔMSE of inserting the latent")
    ax.set_title(title or "Insertion ΔMSE vs max cosine")
    legend_outside(ax, markerscale=3)
    return fig


def delta_by_class(delta: Mapping[str, np.ndarray]) -> plt.Figure:
    """Histograms of ΔMSE for novel and reconstruction latents (``{class: values}``)."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    vals = np.concatenate([np.asarray(v) for v in delta.values() if len(v)]) if delta else np.array([0.0])
    lim = np.quantile(np.abs(vals), 0.99) if vals.size else 1.0
    bins = np.linspace(-lim, lim, 60)
    for c, v in delta.items():
        ax.hist(np.clip(v, -lim, lim), bins=bins, alpha=0.6, color=CLASS_COLORS.get(c), label=f"{c} (n={len(v)})")
    ax.axvline(0, color="k", lw=0.7)
    ax.set_xlabel("ΔMSE of inserting the latent")
    ax.set_ylabel("latents")
    ax.set_title("ΔMSE by class")
    legend_outside(ax)
    return fig


def proxy_sweep(proxy_tables: Mapping[str, "object"]) -> plt.Figure:
    """Accuracy of the max-cos proxy against θ, one line per pair/architecture."""
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    for name, t in proxy_tables.items():
        ax.plot(t["theta"], t["accuracy"], marker="o", ms=3, label=name)
    ax.set_xlabel("θ (novel ⇔ max cos < θ)")
    ax.set_ylabel("agreement with the ΔMSE sign")
    ax.set_title("The max-cosine proxy")
    legend_outside(ax, fontsize=7)
    return fig


def interpolation_curves(curves: Sequence[dict], trained: Sequence[dict], *, y: str = "mse",
                         ylabel: str | None = None, title: str = "") -> plt.Figure:
    """Stitched paths (``curves``: dicts with n_latents, the y key, label, color, ls) beside trained
    SAEs (``trained``: dicts with n_latents, y, label, color)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for c in curves:
        ax.plot(c["n_latents"], c[y], color=c.get("color"), ls=c.get("ls", "-"), lw=1.4, label=c.get("label"))
    seen = set()
    for t in trained:
        lab = t.get("label") if t.get("label") not in seen else None
        seen.add(t.get("label"))
        ax.scatter([t["n_latents"]], [t[y]], color=t.get("color", "k"), marker=t.get("marker", "o"), s=36, zorder=4,
                   edgecolor="k", label=lab)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0f}"))  # 1024, not 2^10
    ax.set_xlabel("latents in the SAE")
    ax.set_ylabel(ylabel or metric_label(y))
    ax.set_title(title)
    legend_outside(ax, fontsize=7)
    return fig


def family_sizes(sizes: Mapping[str, np.ndarray]) -> plt.Figure:
    """Distribution of swap-family sizes (S + L latents per component), per pair."""
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    for name, s in sizes.items():
        s = np.asarray(s)
        if s.size == 0:
            continue
        u, c = np.unique(s, return_counts=True)
        ax.plot(u, c, marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latents in the family (S + L)")
    ax.set_ylabel("families")
    ax.set_title("Swap-family sizes")
    if ax.get_legend_handles_labels()[0]:
        legend_outside(ax, fontsize=7)
    else:
        ax.text(0.5, 0.5, "no swap families at this θ", ha="center", va="center", transform=ax.transAxes)
    return fig


def stitched_paths(results: Mapping, trained, arch: str, *, y: str = "mse",
                   ylabel: str = "MSE (per element)") -> plt.Figure:
    """The stitched paths of one architecture's 2x pairs (``results``: ``{(arch, small, large):
    PairAnalysis}``), monotone and full, against its trained SAEs (``trained``: one row per SAE
    with ``arch, width`` and ``y``)."""
    curves = []
    for (ar, a, b), v in results.items():
        if ar != arch or b != 2 * a or v.curve_monotone is None:
            continue
        curves.append({"n_latents": v.curve_monotone.n_latents, y: getattr(v.curve_monotone, y),
                       "color": rule_attr(arch, "color"), "label": "stitched (monotone)" if not curves else None})
        curves.append({"n_latents": v.curve_all.n_latents, y: getattr(v.curve_all, y), "color": "k", "ls": ":",
                       "label": "stitched (all ops)" if len(curves) == 1 else None})
    tr = [{"n_latents": row.width, y: row[y], "label": f"trained {arch}", "color": "white"}
          for _, row in trained[trained.arch == arch].iterrows()]
    return interpolation_curves(curves, tr, y=y, ylabel=ylabel, title=f"{arch}: stitched paths between widths")
