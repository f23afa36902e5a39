"""Tables in the book: one object that shows as an HTML table in the pages and as aligned text in
a terminal, with the same formatted numbers in both (so the prose-number check finds them)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

__all__ = ["Table", "show_table"]


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
