"""Synthetic superposition data (saelib.analysis.synthetic), the b_dec initialisation option, the
BatchTopK inference threshold and the first-crossing top-AFA rule."""

from __future__ import annotations

import math

import pytest
import torch

from saelib.sae.core import SAE, SAEConfig, geometric_median
from saelib.analysis.synthetic import SyntheticData, SyntheticSpec, afa_diagnostics, recovery, run_synthetic
from saelib.sae.topafa import topafa_select_first_crossing, topafa_select_reference
from saelib.sae.metrics import held_out_metrics
from saelib.sae.train import TrainConfig, train_saes

HOOK = "synthetic"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the generator
def test_generator_matches_its_spec():
    spec = SyntheticSpec(d=16, n_features=64, l0=4.0, group_size=4, rho=0.6, mag_sigma=0.5, seed=3)
    data = SyntheticData(spec)
    x, f = data.sample(20_000, torch.Generator().manual_seed(0))
    assert torch.allclose(data.W.norm(dim=-1), torch.ones(64), atol=1e-5)
    assert torch.allclose(x, f @ data.W, atol=1e-5)
    assert (f >= 0).all()
    assert abs(float(data.probs.sum()) - 4.0) < 1e-9
    # true L0 is the requested one (the "no empty token" fix adds a little)
    assert 4.0 <= float((f > 0).sum(-1).float().mean()) < 4.4
    # firing frequencies follow the probabilities
    freq = (f > 0).float().mean(0)
    assert torch.allclose(freq, data.probs.float(), atol=0.02)
    # co-firing: features of one group correlate, features of different groups do not
    on = (f > 0).float()
    c = torch.corrcoef(on.T)
    same = c[0, 1:4].mean()
    other = c[0, 4:].mean()
    assert same > 0.1 and abs(float(other)) < 0.03, (float(same), float(other))
    # magnitudes vary across features
    assert float(data.scales.max() / data.scales.min()) > 2


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="l0"):
        SyntheticSpec(d=8, n_features=8, l0=5.0)  # more than p_max * n
    with pytest.raises(ValueError, match="rho"):
        SyntheticSpec(rho=1.0)


def test_recovery_of_truth_and_of_random():
    data = SyntheticData(SyntheticSpec(d=16, n_features=64, l0=2.0))
    perm = data.W[torch.randperm(64, generator=torch.Generator().manual_seed(0))] * 3.0
    assert recovery(data.W, perm)["recovery"] == pytest.approx(1.0, abs=1e-6)
    rand = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    r = recovery(data.W, rand)
    assert r["recovery"] < 0.8 and r["frac_recovered"] < 0.1


def test_oracle_rule_is_exact_for_an_orthonormal_dictionary():
    """h = d and orthonormal directions: ||f|| = ||x|| and relu(x W^T) = f, so the top-AFA rule
    with the true dictionary keeps exactly the true features."""
    d = 16
    data = SyntheticData(SyntheticSpec(d=d, n_features=d, l0=3.0, group_size=1, rho=0.0))
    # a permuted standard basis: orthonormal exactly in floating point (a rotated basis leaves
    # ~1e-8 overlaps, and any positive pre-activation, however tiny, moves the nearest prefix on)
    data.W = torch.eye(d)[torch.randperm(d, generator=torch.Generator().manual_seed(0))]
    diag = afa_diagnostics(data, n=2000)
    assert diag["eps_max"] < 1e-5
    assert diag["ratio_median"] == pytest.approx(1.0, abs=1e-5)
    assert diag["oracle_afa_l0"] == pytest.approx(diag["true_l0"], abs=1e-9)


def test_run_synthetic_rows_and_truth_start():
    df = run_synthetic([{"n_features": 32, "l0": 2.0}], [0], base={"d": 16}, steps=5, batch_size=64,
                       rules=["topk", "topafa-consistent"], truth_init=["topk"], eval_tokens=256)
    assert sorted(df["rule"]) == ["topafa-consistent", "topk", "topk+truth"]
    assert set(df["start"]) == {"random", "truth"}
    row = df[df["rule"] == "topk"].iloc[0]
    assert row["sae_l0"] == pytest.approx(2.0) and row["k"] == 2
    # five tiny steps from the truth keep the truth; from random, not yet
    assert df[df["rule"] == "topk+truth"]["recovery"].iloc[0] > 0.95
    assert row["recovery"] < 0.9
    assert all(math.isfinite(v) for v in df["fvu"])


# ------------------------------------------------------------------ b_dec initialisation
def skewed(n=512, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).abs() * 2 + 1.0
    x[:8] += 200.0  # a few huge outliers: the mean moves, the geometric median barely
    return x


def test_geometric_median_minimises_the_sum_of_distances():
    x = skewed().double()
    m = geometric_median(x)
    cost = lambda c: float((x - c).norm(dim=-1).sum())  # noqa: E731
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        assert cost(m) <= cost(m + 1e-2 * torch.randn(m.shape, generator=g, dtype=torch.float64)) + 1e-9
    assert cost(m) < cost(x.mean(0))
    assert float((m - x[8:].median(0).values).norm()) < float((x.mean(0) - x[8:].median(0).values).norm())


@pytest.mark.parametrize("mode", ["zeros", "mean", "geometric_median"])
def test_b_dec_init_option_does_what_it_says(mode):
    x = skewed()
    cfg = SAEConfig(d_in=8, d_sae=16, activation="topk", k=2, b_dec_init=mode, hook_name=HOOK, seed=0)
    # the trainer applies it on the first batch; a vanishing lr keeps b_dec where the init put it
    tc = TrainConfig(batch_size=512, n_tokens=512, lr=1e-12, progress=False)
    sae = train_saes({"s": cfg}, [{HOOK: x}], tc)["s"]
    want = {"zeros": torch.zeros(8), "mean": x.mean(0), "geometric_median": geometric_median(x.double()).float()}[mode]
    assert torch.allclose(sae.b_dec.detach(), want, atol=1e-4), (mode, sae.b_dec, want)


def test_b_dec_init_works_in_the_normalised_space():
    x = skewed()
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="topafa", b_dec_init="mean", input_norm="token"))
    sae.init_b_dec(x)
    x_n, _ = sae.normalize(x)
    assert torch.allclose(sae.b_dec.detach(), x_n.mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="b_dec_init"):
        SAEConfig(d_in=8, d_sae=16, b_dec_init="median", k=2)


def test_trainer_keeps_the_bias_of_a_trained_sae():
    x = skewed()
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=2, b_dec_init="mean", hook_name=HOOK))
    with torch.no_grad():
        sae.b_dec.fill_(7.0)
    train_saes({"s": sae}, [{HOOK: x}], TrainConfig(batch_size=512, n_tokens=512, lr=1e-12, progress=False))
    assert torch.allclose(sae.b_dec.detach(), torch.full((8,), 7.0), atol=1e-4)


# ------------------------------------------------------------------ BatchTopK threshold
def gaussian_stream(d, batch, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {HOOK: torch.randn(batch, d, generator=g)}


def test_batchtopk_threshold_converges_to_the_known_quantile():
    """Frozen weights (vanishing lr) on Gaussian data: the inference threshold must be the
    level that a fraction k/h of all pre-activations exceed, and held-out L0 must be k."""
    d, h, k, b = 16, 64, 4, 256
    cfg = SAEConfig(d_in=d, d_sae=h, activation="batchtopk", k=k, hook_name=HOOK, seed=0, aux_k=0)
    sae = train_saes({"s": cfg}, gaussian_stream(d, b, 0),
                     TrainConfig(batch_size=b, n_tokens=b * 40, lr=1e-12, progress=False))["s"]
    x = torch.randn(50_000, d, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        pre = sae.pre_acts(x).flatten()
    known = float(pre.kthvalue(pre.numel() - k * x.shape[0]).values)
    assert float(sae.threshold) == pytest.approx(known, rel=0.03)
    with torch.no_grad():
        l0 = float((sae.eval().encode(x) > 0).sum(-1).float().mean())
    assert l0 == pytest.approx(k, rel=0.05)


def test_batchtopk_final_threshold_gives_held_out_l0_k_after_real_training():
    """Weights that move: the training EMA lags behind them (and starts at the first batch);
    the final estimate with the final weights gives held-out L0 close to k."""
    spec = SyntheticSpec(d=16, n_features=64, l0=4.0, seed=0)
    data = SyntheticData(spec)
    x_held, _ = data.sample(4096, torch.Generator().manual_seed(5))
    l0 = {}
    for mode in ("final", "ema"):
        cfg = SAEConfig(d_in=16, d_sae=64, activation="batchtopk", k=4, hook_name=HOOK, seed=0)
        tc = TrainConfig(batch_size=128, n_tokens=128 * 80, lr=1e-2, progress=False, batchtopk_threshold=mode,
                         decay_steps=20)
        sae = train_saes({"s": cfg}, data.batches(128, seed=1, hook=HOOK), tc)["s"]
        l0[mode] = float(held_out_metrics({"s": sae}, [{HOOK: x_held}])["s"]["l0"])
    assert l0["final"] == pytest.approx(4.0, rel=0.1), l0
    assert abs(l0["ema"] - 4.0) > 2 * abs(l0["final"] - 4.0), l0


def test_calibrate_threshold_rejects_other_rules():
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="topk", k=2))
    with pytest.raises(ValueError, match="batchtopk"):
        sae.calibrate_threshold([torch.randn(4, 8)])
    with pytest.raises(ValueError, match="batchtopk_threshold"):
        TrainConfig(batchtopk_threshold="median")


# ------------------------------------------------------------------ first-crossing rule
def test_first_crossing_on_a_toy_example():
    pre = torch.tensor([[4.0, 3.0, 1.0, 0.0]])
    dn = torch.ones(4)
    # cumulative norms 4, 5, 5.10, 5.10: target 4.5 is equally near 4 and 5
    assert topafa_select_reference(pre, dn, torch.tensor([4.5])).tolist() == [[True, False, False, False]]
    assert topafa_select_first_crossing(pre, dn, torch.tensor([4.5])).tolist() == [[True, True, False, False]]
    # target beyond the total energy: every positive latent
    assert topafa_select_first_crossing(pre, dn, torch.tensor([9.0])).tolist() == [[True, True, True, False]]
    # exactly reached at the first latent
    assert topafa_select_first_crossing(pre, dn, torch.tensor([4.0])).tolist() == [[True, False, False, False]]


def test_first_crossing_keeps_at_least_the_nearest_prefix():
    g = torch.Generator().manual_seed(0)
    pre = torch.rand(200, 64, generator=g).relu() * (torch.rand(200, 64, generator=g) > 0.5)
    dn = 0.5 + torch.rand(64, generator=g)
    t = 3 * torch.rand(200, generator=g)
    near = topafa_select_reference(pre, dn, t).sum(-1)
    first = topafa_select_first_crossing(pre, dn, t).sum(-1)
    assert (first >= near).all() and (first <= near + 1).all() and (first > near).any()
    sae = SAE(SAEConfig(d_in=8, d_sae=64, activation="topafa", afa_rule="first_crossing"))
    x = torch.randn(32, 8, generator=g)
    sae_near = SAE(SAEConfig(d_in=8, d_sae=64, activation="topafa"))
    with torch.no_grad():
        assert (sae.encode(x) > 0).sum() >= (sae_near.encode(x) > 0).sum()
        assert torch.isfinite(sae(x).loss)


# ------------------------------------------------------------------ ablation helpers
def test_l0_correlates_matches_scipy_spearman_with_ties():
    import numpy as np

    from saelib.analysis.ablations import l0_correlates

    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    l0 = rng.integers(0, 6, 500)  # many ties, as a per-token L0 has
    cov = {"mono": np.exp(l0 + 0.0), "noisy": l0 + rng.normal(0, 2, 500), "indep": rng.normal(size=500)}
    res = l0_correlates(l0, cov).set_index("covariate")
    assert res.loc["mono", "spearman"] == pytest.approx(1.0)
    for k in cov:
        assert res.loc[k, "spearman"] == pytest.approx(scipy_stats.spearmanr(l0, cov[k]).statistic, abs=1e-12)
    assert res.loc["indep", "ci_low"] < 0 < res.loc["indep", "ci_high"]
    with pytest.raises(ValueError, match="one value per token"):
        l0_correlates(l0, {"bad": np.zeros(3)})


def test_factor_effects_recovers_a_planted_main_effect():
    import itertools

    import pandas as pd

    from saelib.analysis.ablations import factor_effects

    rows = []
    for a, b, s in itertools.product(["x", "y"], ["u", "v"], [0, 1, 2]):
        rows.append({"A": a, "B": b, "seed": s, "m": 1.0 + 0.5 * (a == "y") + 0.1 * s})
    eff = factor_effects(pd.DataFrame(rows), {"A": ("x", "y"), "B": ("u", "v")}, ["m"]).set_index("factor")
    assert eff.loc["A", "diff"] == pytest.approx(0.5) and eff.loc["A", "se"] == pytest.approx(0.0)
    assert eff.loc["B", "diff"] == pytest.approx(0.0) and eff.loc["A", "n"] == 6


def test_design_configs_cover_the_factorial():
    from saelib.analysis.ablations import b_dec_init_configs, topafa_design_configs

    cfgs = topafa_design_configs(8, 16, HOOK, [0, 1], afa_coeff=0.1)
    assert len(cfgs) == 16 and len(set(cfgs)) == 16
    assert {(c.afa_target, c.input_norm, c.afa_rule) for c in cfgs.values()} == {
        (t, n, r) for t in ("paper", "consistent") for n in ("token", "global") for r in ("nearest", "first_crossing")}
    b = b_dec_init_configs(8, 16, HOOK, [0], {"topk": {"activation": "topk", "k": 2}})
    assert sorted(c.b_dec_init for c in b.values()) == ["geometric_median", "mean", "zeros"]
