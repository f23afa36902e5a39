"""Book tables: the HTML and the text form show the same formatted numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from saelib import bookhtml
from saelib.plots.tables import mean_sd, show_table


def test_show_table_formats_html_and_text_alike():
    df = pd.DataFrame({"name": ["a", "b"], "nmse": [0.123456, np.nan]}, index=["r1", "r2"])
    t = show_table(df, "{:.3f}")
    html, text = t._repr_html_(), repr(t)
    assert "<table" in html and "0.123" in html and "0.123456" not in html and "r1" not in html
    assert "0.123" in text and "0.1235" not in text and "r1" not in text
    assert "r1" in repr(show_table(df, lambda v: f"{v:.1e}", index=True)) and "1.2e-01" in repr(show_table(df, "{:.1e}"))
    # the book's renderer shows the HTML form as a table
    assert "<table" in bookhtml.cut_wide_tables(html)
    with pytest.raises(TypeError, match="DataFrame"):
        show_table([1, 2])


def test_mean_sd_merges_column_pairs():
    df = pd.DataFrame({"rule": ["topk"], "fvu_mean": [0.12345], "fvu_sd": [0.01], "n": [3], "x_sd": [1.0]})
    m = mean_sd(df)
    assert list(m.columns) == ["rule", "fvu", "n", "x_sd"]  # an _sd without its _mean is kept as is
    assert m.loc[0, "fvu"] == "0.123 ± 0.01" and m.loc[0, "n"] == 3
