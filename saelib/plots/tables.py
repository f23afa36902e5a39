"""Tables in the book: one object that shows as an HTML table in the pages and as aligned text in
a terminal, with the same formatted numbers in both (so the prose-number check finds them)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

__all__ = ["Table", "mean_sd", "show_table"]


class Table:
    """A DataFrame with a fixed float format; the last expression of a cell renders it.

    ``_repr_html_`` gives the notebook's (and the book's) HTML table; ``repr`` the text table.
    """

    def __init__(self, df: pd.DataFrame, float_format: str | Callable[[float], str] = "{:.4g}",
                 index: bool = False, max_colwidth: int | None = None):
        if not isinstance(df, pd.DataFrame):
            raise TypeError(f"show_table needs a pandas DataFrame, got {type(df).__name__}")
        self.df, self.index, self.max_colwidth = df, index, max_colwidth
        self.float_format = float_format.format if isinstance(float_format, str) else float_format

    def _repr_html_(self) -> str:
        with pd.option_context("display.max_colwidth", self.max_colwidth):
            return self.df.to_html(index=self.index, float_format=self.float_format, border=0, na_rep="–")

    def __repr__(self) -> str:
        with pd.option_context("display.max_colwidth", self.max_colwidth):
            return self.df.to_string(index=self.index, float_format=self.float_format, na_rep="–")


def show_table(df: pd.DataFrame, float_format: str | Callable[[float], str] = "{:.4g}", *,
               index: bool = False, max_colwidth: int | None = None) -> Table:
    """``df`` as a :class:`Table` (``float_format``: a ``str.format`` pattern or a function)."""
    return Table(df, float_format, index, max_colwidth)


def mean_sd(df: pd.DataFrame, fmt: str = "{:.3g}") -> pd.DataFrame:
    """Merge every ``<c>_mean`` / ``<c>_sd`` column pair into one text column ``<c>`` holding
    ``"mean ± sd"`` (each formatted with ``fmt``), in place of the pair; other columns are kept."""
    out = {}
    for c in df.columns:
        if isinstance(c, str) and c.endswith("_mean") and f"{c[:-5]}_sd" in df.columns:
            base = c[:-5]
            out[base] = [f"{fmt.format(m)} ± {fmt.format(s)}" for m, s in zip(df[c], df[f"{base}_sd"])]
        elif not (isinstance(c, str) and c.endswith("_sd") and f"{c[:-3]}_mean" in df.columns):
            out[c] = df[c]
    return pd.DataFrame(out, index=df.index)
