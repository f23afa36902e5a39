"""Chapter 3's sweep tables: matched-L0 comparison with the frontiers and the paper's numbers beside ours."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from saelib.analysis.frontier import frontier_at, frontier_summary, matched_l0, paper_comparison
from saelib.sae.rules import knob_text


def _table():
    rows = [("topk", 10, 0.0, 10.0, 0.4), ("topk", 100, 0.0, 100.0, 0.1),
            ("batchtopk", 20, 0.0, 20.0, 0.3), ("batchtopk", 40, 0.0, 40.0, 0.2),
            ("topafa", 0, 1 / 32, 10 ** 1.5, 0.15)]
    t = pd.DataFrame(rows, columns=["activation", "k", "afa_coeff", "l0", "nmse"])
    t["layer"], t["name"], t["mse_loss"] = 3, [f"r{i}" for i in range(len(t))], 0.5
    t["knob"] = [knob_text(r) for _, r in t.iterrows()]
    return t


def test_knob_labels():
    assert list(_table()["knob"]) == ["k=10", "k=100", "k=20", "k=40", "λ=1/32"]


def test_frontier_is_interpolated_in_log_log():
    f = pd.DataFrame({"l0": [10.0, 100.0], "nmse": [0.4, 0.1]})
    assert frontier_at(10 ** 1.5, f) == pytest.approx(0.2)  # geometric mean at the log midpoint
    assert frontier_at(10.0, f) == pytest.approx(0.4)
    assert math.isnan(frontier_at(5.0, f)) and math.isnan(frontier_at(50.0, f.iloc[:1]))


def test_matched_l0_and_summary():
    m = matched_l0(_table())
    assert len(m) == 1
    r = m.iloc[0]
    assert r["topk_nmse"] == pytest.approx(0.2) and r["vs_topk"] == pytest.approx(-0.25)
    assert r["batchtopk_nmse"] == pytest.approx(np.exp(np.interp(1.5 * np.log(10), np.log([20, 40]), np.log([0.3, 0.2]))))
    text = frontier_summary(_table())
    assert "lowest NMSE 0.1 by topk k=100" in text
    assert "topk at that L0 ≈ 0.2 (top-AFA -25%)" in text


def test_paper_comparison_matches_rule_and_knob():
    t = _table()
    paper = pd.DataFrame([{"activation": "topk", "layer": 6, "k": 10, "afa_coeff": np.nan, "l0": 10.0, "nmse": 0.05},
                          {"activation": "topafa", "layer": 6, "k": np.nan, "afa_coeff": 1 / 32, "l0": 2000.0, "nmse": 0.01}])
    c = paper_comparison(t, paper, {3: 6}, pd.Series(0.9, index=t["name"])).set_index("k or λ")
    assert c.loc["k=10", "paper: NMSE"] == 0.05 and c.loc["λ=1/32", "paper: L0"] == 2000.0
    assert np.isnan(c.loc["k=100", "paper: L0"])
    assert (c["layer (paper/ours)"] == "6/3").all() and (c["ours: train NMSE"] == 0.9).all()


def test_zf_stats_round_trip_through_arrays():
    import torch

    from saelib.analysis.afa import ZFStats, zf_stats

    g = torch.Generator().manual_seed(0)
    W = torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1)
    acts = torch.relu(torch.randn(32, 16, generator=g))
    s = zf_stats(acts @ W + 0.01 * torch.randn(32, 8, generator=g), acts, W)
    back = ZFStats.from_arrays({f: getattr(s, f).numpy() for f in ZFStats._fields[:-1]}, h=s.h)
    assert back.h == s.h and all(torch.equal(getattr(back, f), getattr(s, f)) for f in ZFStats._fields[:-1])
