"""Figures for the AFA theory: the ZF plot, half violins of NMSE vs εLBO, ε against Welch,
and the concentration of ‖f‖/‖z‖ on random dictionaries.

Every function takes data (tensors, arrays or the NamedTuples of ``saelib.analysis.afa``) and returns a
matplotlib Figure; nothing is shown or saved here (use ``saelib.plots.style.savefig``).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from saelib.analysis.afa import bound_slopes
from saelib.analysis.concentration import ConcentrationBand, NormRatioSim, concentration_band
from saelib.plots.style import kde_violin, legend_outside

__all__ = ["zf_plot", "half_violin", "epsilon_welch_plot", "norm_ratio_plot", "cone_slopes_plot"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _norm_pairs(stats: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Accept ZFStats, {label: ZFStats}, {label: (norm_z, norm_f)} or {label: mapping}."""

    def one(s: Any) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(s, "norm_z") and hasattr(s, "norm_f"):
            return _np(s.norm_z), _np(s.norm_f)
        if isinstance(s, Mapping):
            return _np(s["norm_z"]), _np(s["norm_f"])
        if isinstance(s, (tuple, list)) and len(s) == 2:
            return _np(s[0]), _np(s[1])
        raise TypeError(
            "zf_plot needs ZFStats, (norm_z, norm_f) pairs or mappings with 'norm_z'/'norm_f', "
            f"got {type(s).__name__}"
        )

    if hasattr(stats, "norm_z") or (isinstance(stats, (tuple, list)) and len(stats) == 2
                                    and not isinstance(stats[0], (tuple, list, Mapping))):
        return {"": one(stats)}
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError("zf_plot needs a non-empty mapping {layer label: stats}")
    return {str(k): one(v) for k, v in stats.items()}


def zf_plot(
    stats: Any,
    *,
    h: int | None = None,
    cone_eps_h: Sequence[float] = (0.25, 0.5, 1.0),
    cones: Mapping[str, tuple[float, float]] | None = None,
    band_d: int | None = None,
    band_coverage: float = 0.98,
    max_points: int = 3000,
    seed: int = 0,
    log: bool = False,
    cmap: str = "viridis",
    ax: plt.Axes | None = None,
    title: str | None = None,
) -> plt.Figure:
    """ZF plot: one point per token, x = ‖z‖ (Linear-AFA), y = ‖f̃‖, one colour per layer.

    Args:
        stats: ``ZFStats``, or ``{layer label: ZFStats | (norm_z, norm_f) | {"norm_z", "norm_f"}}``.
        h: dictionary size; when given, cone labels also show ε = eps_h/(h−1) as in the paper.
        cone_eps_h: worst-case cones ε(h−1) to shade (the paper's 0.25, 0.5, 1); ``()`` for none.
        cones: extra cones ``{label: (lower slope, upper slope)}`` drawn as dotted lines
            (e.g. ``saelib.analysis.afa.tight_slopes`` from a measured ε).
        band_d: if given, draw the probabilistic random-dictionary band for width d
            (``saelib.analysis.concentration.concentration_band(band_d, coverage=band_coverage)``) as dashed lines.
        max_points: points per layer (random subsample, seeded) to keep the figure light.
        log: log–log axes (useful when layer norms span orders of magnitude).
        ax: draw into this Axes instead of a new figure.
    """
    pairs = _norm_pairs(stats)
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 5.2))
    else:
        fig = ax.figure
    rng = np.random.default_rng(seed)
    colors = plt.get_cmap(cmap)(np.linspace(0.05, 0.95, max(len(pairs), 1)))
    hi = 0.0
    lo = math.inf
    for (label, (nz, nf)), c in zip(pairs.items(), colors):
        ok = np.isfinite(nz) & np.isfinite(nf)
        nz, nf = nz[ok], nf[ok]
        if nz.size > max_points:
            idx = rng.choice(nz.size, max_points, replace=False)
            nz, nf = nz[idx], nf[idx]
        if nz.size:
            hi = max(hi, float(nz.max()), float(nf.max()))
            pos = np.concatenate([nz[nz > 0], nf[nf > 0]])
            if pos.size:
                lo = min(lo, float(pos.min()))
        ax.scatter(nz, nf, s=4, alpha=0.5, color=c, label=label or None, rasterized=True, linewidths=0)
    hi = hi * 1.05 if hi > 0 else 1.0
    lo = lo * 0.8 if math.isfinite(lo) and log else 0.0
    xs = np.linspace(lo, hi, 200) if not log else np.geomspace(max(lo, 1e-12), hi, 200)

    # shaded worst-case cones, widest first so narrower ones stay visible on top
    greys = plt.get_cmap("Greys")
    for n, e in enumerate(sorted(cone_eps_h, reverse=True)):
        s = bound_slopes(float(e))
        upper = np.minimum(s.upper * xs, hi * 10) if math.isfinite(s.upper) else np.full_like(xs, hi * 10)
        lab = f"ε(h−1)={e:g}"
        if h is not None:
            lab += f" (ε={e / (h - 1):.1e})"
        ax.fill_between(xs, s.lower * xs, upper, color=greys(0.15 + 0.12 * n), alpha=0.35, lw=0, label=lab, zorder=0)
    if band_d is not None:
        b = concentration_band(band_d, coverage=band_coverage)
        lab = f"random-dictionary band d={band_d} ({100 * b.coverage:.0f}%)"
        ax.plot(xs, b.slope_lower * xs, "--", color="tab:blue", lw=1.0, label=lab)
        ax.plot(xs, b.slope_upper * xs, "--", color="tab:blue", lw=1.0)
    for (lab, (sl, su)), ls in zip((cones or {}).items(), (":", "-.", (0, (1, 3)), (0, (5, 2)))):
        ax.plot(xs, sl * xs, linestyle=ls, color="tab:purple", lw=1.0, label=lab)
        if math.isfinite(su):
            ax.plot(xs, su * xs, linestyle=ls, color="tab:purple", lw=1.0)
    ax.plot(xs, xs, "--", color="red", lw=1.0, label="y = x")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(xs[0], hi)
        ax.set_ylim(xs[0], hi)
    else:
        ax.set_xlim(0, hi)
        ax.set_ylim(0, hi)
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(r"Linear-AFA $\|\mathbf{z}\|_2$")
    ax.set_ylabel(r"SAE feature activation $\|\tilde{\mathbf{f}}\|_2$")
    if title:
        ax.set_title(title)
    legend_outside(ax, fontsize=7, markerscale=3, ncol=1 if len(pairs) <= 12 else 2)
    return fig


def half_violin(
    left: Mapping[Any, Any],
    right: Mapping[Any, Any],
    *,
    left_label: str = "Normalized MSE",
    right_label: str = "εLBO",
    right_scale: float = 1e-5,
    clip_quantile: float | None = 0.99,
    best_worst: bool = True,
    ax: plt.Axes | None = None,
    title: str | None = None,
    xlabel: str = "layer",
) -> plt.Figure:
    """Half violins per layer: ``left`` metric (blue, left axis) vs ``right`` (orange, twin axis).

    Args:
        left, right: ``{layer label: values}`` with the same keys (tensors or arrays per token).
        right_scale: the right metric is plotted in units of this (the paper uses 1e-5 for εLBO).
        clip_quantile: clip each metric at this *global* quantile before plotting (paper: 0.99);
            ``None`` for no clipping. Medians and IQR bars use the clipped values too.
        best_worst: mark the layers with the lowest and highest median of each metric.
    Each half has an IQR bar and a median dot.
    """
    keys = list(left.keys())
    if not keys or set(map(str, keys)) != set(map(str, right.keys())):
        raise ValueError("half_violin needs two non-empty mappings with the same layer keys")
    rmap = {str(k): v for k, v in right.items()}
    L = [_np(left[k]) for k in keys]
    R = [_np(rmap[str(k)]) / right_scale for k in keys]
    L = [x[np.isfinite(x)] for x in L]
    R = [x[np.isfinite(x)] for x in R]
    if clip_quantile is not None:
        for arrs in (L, R):
            allv = np.concatenate(arrs) if arrs else np.zeros(0)
            if allv.size:
                c = float(np.quantile(allv, clip_quantile))
                arrs[:] = [np.minimum(a, c) for a in arrs]
    names = [textwrap.fill(str(k), 14) for k in keys]
    if ax is None:
        widest = max(len(line) for n in names for line in n.split("\n"))
        fig, ax = plt.subplots(figsize=(max(5.0, len(keys) * max(0.55, 0.09 * widest) + 2), 4.0))
    else:
        fig = ax.figure
    ax2 = ax.twinx()
    pos = np.arange(len(keys), dtype=float)
    cl, cr = "tab:blue", "tab:orange"
    for axis, data, side, col in ((ax, L, "left", cl), (ax2, R, "right", cr)):
        for i, a in enumerate(data):
            kde_violin(axis, a, pos[i], side=side, color=col, lower=0.0 if a.size and a.min() >= 0 else None)
        off = -0.06 if side == "left" else 0.06
        for i, a in enumerate(data):
            if a.size == 0:
                continue
            q25, q50, q75 = np.quantile(a, [0.25, 0.5, 0.75])
            axis.vlines(pos[i] + off, q25, q75, color=col, lw=2.5)
            axis.plot(pos[i] + off, q50, "o", color="white", mec=col, ms=4, zorder=3)
    ax.set_ylabel(left_label, color=cl)
    scale_txt = "" if right_scale == 1 else f" (×{right_scale:g})"
    ax2.set_ylabel(right_label + scale_txt, color=cr)
    ax.tick_params(axis="y", colors=cl)
    ax2.tick_params(axis="y", colors=cr)
    ax2.grid(False)
    ax2.spines["right"].set_visible(True)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    tags: list[list[str]] = [[] for _ in keys]
    if best_worst:
        for data, name in ((L, "MSE"), (R, "εLBO")):
            med = np.array([np.median(a) if a.size else np.nan for a in data])
            if np.all(np.isnan(med)) or np.nanmax(med) == np.nanmin(med):
                continue  # no data or all tied: nothing to single out
            tags[int(np.nanargmin(med))].append(f"best {name}")
            tags[int(np.nanargmax(med))].append(f"worst {name}")
    ax.set_xticks(pos)
    ax.set_xticklabels(["\n".join([n] + t) for n, t in zip(names, tags)], fontsize=8)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    return fig


def epsilon_welch_plot(rows: Sequence[Mapping[str, Any]], *, ax: plt.Axes | None = None) -> plt.Figure:
    """Measured ε (max |cos|), RMS cos and mean |cos| per dictionary shape against the Welch bound.

    ``rows``: mappings with keys ``label``, ``max``, ``rms``, ``mean``, ``welch``.
    """
    if not rows:
        raise ValueError("epsilon_welch_plot needs at least one row")
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows) + 2), 3.8))
    else:
        fig = ax.figure
    x = np.arange(len(rows))
    w = 0.2
    for off, key, col, lab in ((-1.5, "max", "tab:red", "ε = max |cos|"),
                               (-0.5, "rms", "tab:purple", "RMS cos"),
                               (0.5, "mean", "tab:blue", "mean |cos|"),
                               (1.5, "welch", "black", "Welch bound")):
        ax.bar(x + off * w, [float(r[key]) for r in rows], width=w, color=col, label=lab,
               alpha=0.9 if key != "welch" else 0.6)
    ax.set_xticks(x)
    ax.set_xticklabels([str(r["label"]) for r in rows], fontsize=8)
    ax.set_ylabel("cosine")
    legend_outside(ax)
    return fig


def norm_ratio_plot(
    sim: NormRatioSim,
    *,
    band: ConcentrationBand | None = None,
    worst_case_lower: Sequence[float] | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
) -> plt.Figure:
    """Distribution of ‖f‖/‖z‖ per support size k (violins) with the probabilistic band.

    Args:
        sim: output of ``saelib.analysis.concentration.random_dictionary_norm_ratios``.
        band: ``concentration_band(sim.d)`` by default (dense-code limit, 98%).
        worst_case_lower: optional lower slopes of the worst-case bound per k to draw (they are
            usually off the scale, which is the point).
    """
    band = band or concentration_band(sim.d)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(sim.ks) + 2), 3.8))
    else:
        fig = ax.figure
    data = [_np(r) for r in sim.ratios]
    pos = np.arange(len(sim.ks))
    for i, a in enumerate(data):
        kde_violin(ax, a, pos[i], color="tab:blue", alpha=0.5, lower=0.0)
        if a.size:
            ax.hlines(np.median(a), pos[i] - 0.25, pos[i] + 0.25, color="tab:blue", lw=1.5)
    ax.axhline(1.0, color="red", ls="--", lw=1, label="y = 1 (‖f‖ = ‖z‖)")
    ax.axhspan(band.slope_lower, band.slope_upper, color="tab:blue", alpha=0.12,
               label=f"±{band.z_score:.2f}·√(2/d) band ({100 * band.coverage:.0f}%)")
    if worst_case_lower is not None:
        ax.plot(pos, list(worst_case_lower), "k:", marker="v", label="worst-case lower slope")
    ax.set_xticks(pos)
    ax.set_xticklabels([str(k) for k in sim.ks])
    ax.set_xlabel("support size k = ‖f‖₀")
    ax.set_ylabel("‖f‖ / ‖z‖")
    ax.set_title(title or f"random unit dictionary, d={sim.d}, h={sim.h}")
    legend_outside(ax)
    return fig


def cone_slopes_plot(
    eps: Mapping[str, float],
    ks: Sequence[int],
    *,
    d: int | None = None,
    ax: plt.Axes | None = None,
) -> plt.Figure:
    """Lower slope sqrt(1/(1+ε(k−1))) of the tight bound against k for several ε values.

    Shows how fast the guaranteed cone opens up: at a realistic ε the lower slope falls far below
    1 already at small k. With ``d`` the probabilistic band's lower edge is drawn for contrast.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
    else:
        fig = ax.figure
    k = np.asarray(list(ks), dtype=float)
    for lab, e in eps.items():
        s = bound_slopes(list(e * (k - 1)))
        ax.plot(k, _np(s.lower), marker="o", ms=3, label=f"{lab} (ε={e:.3g})")
    if d is not None:
        b = concentration_band(d)
        ax.axhline(b.slope_lower, color="tab:blue", ls="--", lw=1,
                   label=f"random-dictionary band lower edge (d={d})")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("k = ‖f‖₀")
    ax.set_ylabel("guaranteed lower slope of ‖f‖/‖z‖")
    legend_outside(ax, fontsize=7)
    return fig
