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


def savefig(fig: plt.Figure, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path
