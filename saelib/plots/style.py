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

# A colour per SAE family, reused in every chapter so a reader learns them once.
ARCH_COLORS = {
    "topk": "#1f77b4",
    "batchtopk": "#ff7f0e",
    "topafa": "#2ca02c",
    "relu": "#7f7f7f",
    "jumprelu": "#9467bd",
}


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


def savefig(fig: plt.Figure, path: str | Path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically, show it inline in a notebook, and close it.

    The PNG is written through a temp file in the same folder and a rename. Inside a Jupyter
    kernel the same PNG bytes are displayed as an ``image/png`` output whatever the matplotlib
    backend is (papermill kernels inherit ``MPLBACKEND=Agg``, which never shows figures), so the
    executed notebook, the offline HTML and the MyST site all carry the figure. The figure is
    closed afterwards so that the inline backend, when it is active, does not show it twice.
    Returns nothing: a returned path would print as an absolute machine path.
    """
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    if _in_kernel():
        from IPython.display import Image, display

        display(Image(data=path.read_bytes(), format="png"))


def _in_kernel() -> bool:
    """True inside a Jupyter kernel (papermill, Lab), False in scripts and tests."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None
