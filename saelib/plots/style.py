"""One look for every figure in the book, and an atomic PNG writer."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

if not os.environ.get("DISPLAY") and "ipykernel" not in matplotlib.get_backend().lower():
    # Headless runs (tests, papermill without a display) must not need a GUI backend.
    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))

import matplotlib.pyplot as plt  # noqa: E402

from saelib.io import atomic_path  # noqa: E402



def apply_style() -> None:
    """Set the book's rc parameters (readable sizes, light grid, no top/right spines)."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "figure.figsize": (6.4, 4.0),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.titlesize": 11,
            "axes.labelsize": 10,
            "legend.fontsize": 9,
            "legend.frameon": False,
        }
    )


# Axis labels for the metric names used in tables (never print a raw column name on an axis).
METRIC_LABELS = {
    "nmse": "normalised MSE", "mse": "MSE (per element)", "l0": "L0 (active latents per token)",
    "dead_frac": "fraction of dead latents",
    "ce_recovered_zero": "CE loss recovered (zero ablation)", "loss": "loss", "aux": "auxiliary loss",
    "fve": "fraction of variance explained", "eps_lbo": "εLBO",
}


def metric_label(name: str) -> str:
    """A reader's label for a metric column name (falls back to the name with spaces)."""
    return METRIC_LABELS.get(name, name.replace("_", " "))


def legend_outside(ax: plt.Axes, **kwargs) -> None:
    """A legend to the right of the axes, so it never covers data."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kwargs)


def figure_legend_below(fig: plt.Figure, axes, ncol: int | None = None, **kwargs) -> None:
    """One legend for a multi-panel figure, under the panels (unique labels, in order)."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if not lab.startswith("_"):
                seen.setdefault(lab, h)
    fig.tight_layout()
    if seen:  # below the figure's own area; savefig's tight bounding box takes it in
        n = ncol or min(len(seen), 4)
        fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=n, bbox_to_anchor=(0.5, 0.0), **kwargs)


def log_ticks(axis) -> None:
    """Label a log axis at 1-2-5 steps whatever its range (one decade or less gets labels too)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    import numpy as np

    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    decades = range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
    for subs in ((1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [t for t in (m * 10.0**e for e in decades for m in subs) if lo <= t <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) > 8:
        ticks = [t for t in ticks if f"{t:g}".lstrip("0.").startswith("1")]
    if len(ticks) < 2:  # a very narrow range: label its ends
        ticks = [lo, hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    axis.set_minor_locator(NullLocator())


def count_formatter():
    """Tick labels for large counts: 120000 -> 120k (long numbers run into each other)."""
    from matplotlib.ticker import EngFormatter

    return EngFormatter(sep="")


def kde_violin(ax: plt.Axes, values, position: float, *, side: str = "both", width: float = 0.8,
               color: str = "tab:blue", alpha: float = 0.45, lower: float | None = None) -> None:
    """A violin whose density runs past the data by three bandwidths, so its ends are rounded.

    Matplotlib's ``violinplot`` stops the density at the sample minimum and maximum, which cuts
    every violin flat at the top. Values are never below ``lower`` (e.g. 0 for norms and errors).
    """
    import numpy as np
    from scipy.stats import gaussian_kde

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size < 2 or np.ptp(v) == 0:
        return
    kde = gaussian_kde(v)
    bw = float(np.sqrt(kde.covariance[0, 0]))
    lo, hi = v.min() - 3 * bw, v.max() + 3 * bw
    if lower is not None:
        lo = max(lo, lower)
    y = np.linspace(lo, hi, 200)
    d = kde(y)
    d = d / d.max() * width / 2
    left = position - d if side in ("both", "left") else np.full_like(d, position)
    right = position + d if side in ("both", "right") else np.full_like(d, position)
    ax.fill_betweenx(y, left, right, color=color, alpha=alpha, lw=0.8, edgecolor=color)


def savefig(fig: plt.Figure, path: str | Path, caption: str | None = None) -> None:
    """Write ``fig`` as PNG to ``path`` atomically, show it inline in a notebook, and close it.

    The PNG is written through a temp file in the same folder and a rename. Inside a Jupyter
    kernel the same PNG bytes are displayed as an ``image/png`` output whatever the matplotlib
    backend is (papermill kernels inherit ``MPLBACKEND=Agg``, which never shows figures), so the
    executed notebook, the offline HTML and the MyST site all carry the figure. The figure is
    closed afterwards so that the inline backend, when it is active, does not show it twice.
    ``caption`` (default: the figure's title, else its file name) travels in the output's
    metadata; the book numbers each figure "Figure <chapter>.<n>" under that caption.
    Returns nothing: a returned path would print as an absolute machine path.
    """
    path = Path(path)
    caption = caption or figure_caption(fig, path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    if _in_kernel():
        from IPython.display import Image, display

        display(Image(data=path.read_bytes(), format="png"), metadata={"saelib": {"caption": caption}})


def figure_caption(fig: plt.Figure, path: Path) -> str:
    """A default caption: the figure's suptitle, else the titles of its panels, else its file name."""
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        return sup.get_text()
    titles = [t for t in (ax.get_title() for ax in fig.axes) if t]
    if titles:
        return "; ".join(dict.fromkeys(titles))
    return path.stem.replace("_", " ")


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (papermill, Lab), False in scripts and tests."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
