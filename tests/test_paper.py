"""saelib.paper: every external number carries a known source, and the old entry points agree."""

from __future__ import annotations

import pytest

from saelib import paper


def test_every_number_names_a_known_source():
    assert paper.NUMBERS
    for key, n in paper.NUMBERS.items():
        assert n.source in paper.SOURCES, key
        assert n.what, key
    assert set(paper.table()["key"]) == set(paper.NUMBERS)
    assert "LessWrong" in paper.cite("stitch_novel_fraction")
    assert paper.NUMBERS["stitch_theta"].source == "recalled"  # not presented as a checked paper number
    with pytest.raises(KeyError, match="known"):
        paper.number("no_such_number")


def test_tables_carry_sources_and_old_entry_points_delegate():
    for df in (paper.zf_medians(), paper.best_runs(), paper.e3_results()):
        assert df.attrs["source"].startswith("Lee et al. 2025")
    # a transcription check: the MDL table's layer-6 top-AFA row (topafa:rebuttal, 41,937.5 bits)
    row = paper.best_runs().query("layer == 6 and activation == 'topafa'").iloc[0]
    assert row["l0"] == pytest.approx(2037.3)
