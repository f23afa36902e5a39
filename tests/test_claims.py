"""Claims tables (chapters 5, 6) and the stitching report tables: verdicts follow the criteria."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from saelib import paper as P
from saelib.analysis import stitching as st
from saelib.analysis.claims import CLAIM_COLUMNS, meta_claims, stitching_claims, verdict
from saelib.analysis.stitch_report import (alive_decoder, alive_latents, family_table, novel_fraction_on, pair_label,
                                           pair_summary, path_table)
from tests.test_stitching import data, random_sae

MEETS, FAILS, NA = "meets our criterion", "fails our criterion", "not testable here"


def test_verdict():
    assert verdict(True) == MEETS and verdict(False) == FAILS and verdict(True, False) == NA


def _stitch_inputs(good: bool):
    ref = P.number("stitch_novel_fraction")
    summary = pd.DataFrame({
        "arch": ["relu", "relu", "relu", "topk"], "pair": ["8→16", "16→32", "8→32", "8→16"],
        "small": [8, 16, 8, 8], "large": [16, 32, 32, 16],
        "frac_novel": [0.3, 0.3, 0.5, 0.9], "frac_novel_proxy": [ref if good else ref + 0.3, 0.3, 0.5, 0.9],
        "proxy_acc@θ": [0.9, 0.85, 0.1, 0.1], "auroc": [0.9, 0.95 if good else 0.5, 0.1, 0.1],
        "mean_ΔMSE_novel": [-1.0, -2.0, 5.0, 5.0], "mean_ΔMSE_recon": [1.0, 2.0 if good else -2.0, -5.0, -5.0],
        "swaps_improving": [0.8, np.nan, 0.0, 0.0]})
    curves = pd.DataFrame({"arch": ["relu", "relu"], "pair": ["8→16", "16→32"], "start_mse": [1.0, 0.5],
                           "mse_S": [1.0, 0.5], "monotone_max_rise_rel": [0.0, 0.0 if good else 0.1],
                           "end_gap_rel": [0.01, -0.01], "frac_path_l0_above_trained": [0.9, 0.7]})
    frank = pd.DataFrame({"mse": [1.0, 0.4, 0.2], "l0": [5, 9, 12], "trained_mse_same_size": [1.0, 0.5, 0.3],
                          "trained_l0_same_size": [5, 8, 10]})
    return summary, curves, frank


def test_stitching_claims_follow_the_criteria():
    c = stitching_claims(*_stitch_inputs(True), theta=0.7).set_index("#")
    assert list(c.reset_index().columns) == CLAIM_COLUMNS and list(c.index) == list(range(3, 11))
    assert (c["verdict"] == MEETS).all(), c["verdict"]
    assert "2 pairs have both classes; signs right in 2" in c.loc[5, "ours"]
    assert c.loc[6, "ours"] == "8→16: 80%"  # the pair without swap families is left out
    assert c.loc[10, "ours"] == "2/2 steps below"  # the first Frankenstein row is the starting SAE
    bad = stitching_claims(*_stitch_inputs(False), theta=0.7).set_index("#")["verdict"]
    assert bad[3] == bad[4] == bad[5] == bad[7] == FAILS and bad[6] == bad[8] == MEETS


def _fve(fve, l0=4.0, dead=0.0):
    return SimpleNamespace(fve=fve, l0=l0, dead_fraction=dead)


def _cos(name, width, fwd, matched):
    return SimpleNamespace(name=name, width=width, forward=torch.full((5,), fwd), forward_matched=torch.full((5,), matched))


def test_meta_claims_follow_the_criteria():
    stats = [_cos("relu-16", 16, 0.5, 0.2), _cos("relu-32", 32, 0.6, 0.2), _cos("relu-64", 64, 0.55, 0.2)]
    split = pd.DataFrame([{"ratio_matched": 1.5, "ci_matched_low": 1.2, "ci_matched_high": 1.9, "matched_coverage": 0.8,
                           "ratio": 3.0, "parents": "relu-16", "theta": 0.5}])
    c = meta_claims(_fve(0.5), _fve(0.4, l0=3.5), k=4, cos_stats=stats, base_name="relu-64", split=split,
                    controls={"isotropic": _fve(0.2), "matched": _fve(0.3)}).set_index("#")["verdict"]
    assert c.to_dict() == {"11": MEETS, "12": MEETS, "13": MEETS, "14": NA, "15": MEETS, "16": MEETS}
    # no controls: claim 11 untestable; the base SAE closest: claim 15 fails; no split families: 16 untestable
    stats[2] = _cos("relu-64", 64, 0.9, 0.2)
    c = meta_claims(_fve(0.5, dead=0.1), _fve(0.4, l0=6), k=4, cos_stats=stats, base_name="relu-64",
                    split=split.iloc[:0]).set_index("#")
    assert c["verdict"].to_dict() == {"11": NA, "12": FAILS, "13": FAILS, "14": NA, "15": FAILS, "16": NA}
    assert "closest: relu-64" in c.loc["15", "ours"] and "rises with width" in c.loc["15", "ours"]


def test_pair_and_path_tables_and_novel_fraction():
    x = data(200)
    fam = SimpleNamespace(saes={"relu": {16: random_sae(16, "relu", 1), 32: random_sae(32, "relu", 2)}})
    cfg = st.StitchConfig(n_points=4)
    key = ("relu", 16, 32)
    results = {key: st.analyze_pair(fam.saes["relu"][16], fam.saes["relu"][32], x, cfg=cfg)}
    trained = family_table(fam, x, init_cos=False)
    assert list(trained["width"]) == [16, 32] and trained["cos_to_init"].isna().all()
    assert trained["mse"].iloc[0] == pytest.approx(st.reconstruction_stats(fam.saes["relu"][16], x)["mse"])
    s = pair_summary(results, cfg.theta).iloc[0]
    r = results[key]
    assert s["pair"] == pair_label(16, 32) == "16→32" and s["consecutive"]
    assert s["frac_novel"] == r.cls.frac_novel and s["frac_novel_thr"] == r.cls_threshold.frac_novel
    p = path_table(results, trained).iloc[0]
    assert p["start_mse"] == r.curve_monotone.mse[0] and p["mse_L"] == r.insertion.mse_large
    assert p["end_gap_rel"] == pytest.approx((r.curve_all.mse[-1] - r.insertion.mse_large) / r.insertion.mse_large)
    # every token kept: the recomputed threshold measure equals the pair's own
    keep = np.ones(len(x), dtype=bool)
    assert novel_fraction_on(results, fam, x, keep, key) == pytest.approx(r.cls_threshold.frac_novel)


def test_alive_latents_and_decoder():
    sae = random_sae(16, "relu", 3)
    x = data(64)
    fired = (sae.encode(x) > 0).any(0)
    assert torch.equal(alive_latents(sae, x, chunk=7), fired)
    W, alive = alive_decoder(sae, x)
    assert W.dtype == torch.float32 and torch.equal(W, sae.W_dec.detach().float()) and torch.equal(alive, fired)
    with torch.no_grad():
        sae.b_enc.fill_(-1e3)  # nothing fires
    assert not alive_latents(sae, x).any() and alive_decoder(sae, None)[1].all()
