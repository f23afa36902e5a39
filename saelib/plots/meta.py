"""Figures of the meta-SAE chapter. Each function takes data and returns a Figure."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from saelib.plots.style import apply_style, figure_legend_below, legend_outside
from saelib.sae.rules import rule_attr

__all__ = [
    "plot_meta_training",
    "plot_meta_code_stats",
    "plot_max_cos",
    "plot_split_recovery",
    "plot_fve_by_sae",
]


def plot_meta_training(history: list[dict], *, title: str = "Meta-SAE training") -> plt.Figure:
    """Training FVE (per batch, batch-TopK mode) and dead meta-latents against the step."""
    apply_style()
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.plot(steps, [h["fve"] for h in history], color="#1f77b4", label="training FVE")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of variance explained")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["n_dead"] for h in history], color="#7f7f7f", ls="--", label="dead meta-latents")
    ax2.set_ylabel("dead meta-latents")
    ax2.set_ylim(bottom=0, top=max(1, max(h["n_dead"] for h in history)) * 1.1)
    ax2.grid(False)
    ax2.spines["right"].set_visible(True)  # the book style hides it; a twin axis needs it
    lines = ax.get_lines() + ax2.get_lines()
    # beside the axes (right of the twin axis's labels), never on the curves
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", bbox_to_anchor=(1.18, 1.0),
              borderaxespad=0.0)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_meta_code_stats(per_latent_l0: np.ndarray, members_per_meta: np.ndarray, *,
                         k: int | None = None) -> plt.Figure:
    """Left: meta-latents per latent (threshold mode). Right: latents per meta-latent."""
    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    l0 = np.asarray(per_latent_l0)
    a.hist(l0, bins=np.arange(l0.max() + 2) - 0.5, color="#1f77b4")
    if k is not None:
        a.axvline(k, color="k", ls=":", label=f"k = {k}")
        a.legend()
    a.set_xlabel("active meta-latents per latent")
    a.set_ylabel("latents")
    mem = np.asarray(members_per_meta)
    b.hist(mem, bins=40, color="#ff7f0e")
    b.set_yscale("log")
    b.set_xlabel("latents a meta-latent is active in")
    b.set_ylabel("meta-latents")
    fig.tight_layout()
    return fig


def plot_max_cos(stats: Sequence, *, title: str = "Meta-latents against SAEs of each width") -> plt.Figure:
    """Mean max cosine per SAE width: meta-latents -> SAE and SAE -> meta-latents, each beside its
    random-unit-vector and covariance-matched baselines (error bars: 10th-90th percentile)."""
    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    x = np.arange(len(stats))
    specs = [
        ("forward", "forward_random", "forward_matched", "each meta-latent vs the SAE's latents"),
        ("reverse", "reverse_random", "reverse_matched", "each SAE latent vs the meta-latents"),
    ]
    for ax, (real, rnd, mat, sub) in zip(axes, specs):
        for off, field, label, color in ((-0.25, real, "meta-SAE", "#1f77b4"),
                                          (0.0, mat, "matched Gaussian", "#9467bd"),
                                          (0.25, rnd, "random unit", "#7f7f7f")):
            vals = [getattr(s, field).float().numpy() for s in stats]
            if all(np.isnan(v).all() for v in vals):
                continue
            mean = np.array([np.nanmean(v) for v in vals])
            lo = mean - np.array([np.nanquantile(v, 0.1) for v in vals])
            hi = np.array([np.nanquantile(v, 0.9) for v in vals]) - mean
            ax.bar(x + off, mean, width=0.25, color=color, label=label, yerr=[lo, hi], capsize=2)
        ax.set_xticks(x, [s.name for s in stats])
        ax.set_xlabel("SAE (alive latents)")
        ax.set_title(sub)
    axes[0].set_ylabel("max cosine similarity")
    axes[0].legend(loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_split_recovery(rows: Sequence[dict]) -> plt.Figure:
    """Share rate of >= 1 meta-latent: children of one parent vs random pairs (and, when given,
    random non-sibling pairs matched on decoder cosine), and the ratios, per parent SAE.

    ``rows``: dicts with ``label``, ``p_children``, ``p_random``, ``ratio``, ``ci_low``, ``ci_high``
    and optionally ``p_matched``, ``ratio_matched``, ``ci_matched_low``, ``ci_matched_high`` (the
    baseline the book's verdict uses). The ratio axis is logarithmic: the unmatched ratio is tens,
    the matched one near 1.
    """
    apply_style()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    x = np.arange(len(rows))
    labels = [r["label"] for r in rows]
    matched = all(np.isfinite(r.get("ratio_matched", np.nan)) for r in rows)
    bars = [("p_children", "children of one parent", "#1f77b4"), ("p_random", "random pairs", "#7f7f7f")]
    if matched:
        bars.append(("p_matched", "random pairs, cosine-matched", "#9467bd"))
    w = 0.8 / len(bars)
    for i, (key, label, color) in enumerate(bars):
        a.bar(x + (i - (len(bars) - 1) / 2) * w, [r[key] for r in rows], width=w, label=label, color=color)
    a.set_xticks(x, labels)
    a.set_ylabel("pairs sharing >= 1 meta-latent")
    a.set_ylim(0, 1.05)
    ratios = [("ratio", "ci_low", "ci_high", "children / random", "#ff7f0e")]
    if matched:
        ratios.append(("ratio_matched", "ci_matched_low", "ci_matched_high", "children / cosine-matched", "#9467bd"))
    w = 0.8 / len(ratios)
    for i, (key, lo, hi, label, color) in enumerate(ratios):
        val = np.array([r[key] for r in rows])
        err = [val - np.array([r[lo] for r in rows]), np.array([r[hi] for r in rows]) - val]
        b.bar(x + (i - (len(ratios) - 1) / 2) * w, val, width=w, color=color, yerr=err, capsize=3, label=label)
    b.axhline(1, color="k", ls=":", lw=1)
    b.set_yscale("log")
    b.set_xticks(x, labels)
    b.set_ylabel("ratio (95% bootstrap CI)")
    figure_legend_below(fig, (a, b), ncol=3, fontsize=8)
    return fig


def plot_fve_by_sae(df, *, title: str = "How much of each SAE's dictionary is composite?") -> plt.Figure:
    """FVE of a meta-SAE per base SAE, batch and threshold mode; ``df`` columns
    ``sae``, ``arch``, ``fve_batch``, ``fve_threshold`` (and optionally ``fve_random``)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(6.8, 3.6))
    x = np.arange(len(df))
    colors = [rule_attr(a, "color", "#333333") for a in df["arch"]]
    ax.bar(x - 0.2, df["fve_batch"], width=0.4, color=colors, label="batch mode")
    ax.bar(x + 0.2, df["fve_threshold"], width=0.4, color=colors, alpha=0.5, hatch="//",
           label="threshold mode")
    if "fve_random" in df:
        ax.scatter(x, df["fve_random"], color="k", marker="_", s=300, zorder=3,
                   label="same meta-SAE recipe on random unit rows")
    ax.set_xticks(x, df["sae"], rotation=25, ha="right")  # names like "batchtopk-2304" collide flat
    ax.set_ylabel("meta-SAE FVE of decoder rows")
    ax.set_ylim(0, 1)
    legend_outside(ax)
    ax.set_title(title)
    fig.tight_layout()
    return fig
