"""Matplotlib figures shared by the chapters, one module per area."""

from saelib.plots.style import apply_style, savefig

__all__ = ["apply_style", "savefig"]
