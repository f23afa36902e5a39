"""Tests for saelib.analysis.afa: ε, Welch, the AFA bound, f̃, ZF statistics, MDL and concentration."""

from __future__ import annotations

import math

import pytest
import torch

from saelib.analysis import afa
from saelib.analysis import concentration as conc

# ---------------------------------------------------------------- the authors' 3×3 toy example

TOY_ACTS = torch.tensor([[5.0, 4.0, 3.0], [1.0, 1.0, 1.0], [1.0, 10.0, 2.0]])
TOY_D = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])


def test_toy_example_targets_and_decoder_scaled_values():
    # targets ||acts @ D|| and decoder-scaled values (acts·||D_i||)² from the tutorial notebook
    s = afa.zf_stats(TOY_ACTS @ TOY_D, TOY_ACTS, TOY_D, None)
    torch.testing.assert_close(s.norm_z, torch.tensor([54.406, 15.000, 67.801]), atol=1e-3, rtol=0)
    ft = afa.f_tilde(TOY_ACTS, TOY_D, None)
    assert ft.shape == (3, 4)
    expected = torch.tensor([[125.0, 400.0, 549.0], [5.0, 25.0, 61.0], [5.0, 2500.0, 244.0]])
    torch.testing.assert_close(ft[:, :3].square(), expected, atol=1e-3, rtol=1e-5)
    assert torch.all(ft[:, 3] == 0)  # no bias → zero bias atom
    # ||f̃||² is the row sum of the decoder-scaled values; the toy dictionary is far from orthogonal
    torch.testing.assert_close(s.norm_f.square(), expected.sum(1), atol=1e-2, rtol=1e-5)
    assert torch.all(s.ratio < 1)  # positive cosines: ||z|| > ||f̃||
    torch.testing.assert_close(s.nmse, torch.zeros(3), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- f̃

def _random_sae(h=48, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(h, d, generator=g) * (0.5 + torch.rand(h, 1, generator=g) * 2)  # non-unit rows
    b = torch.randn(d, generator=g)
    acts = torch.relu(torch.randn(64, h, generator=g) - 1.0) * 3
    return W, b, acts


@pytest.mark.parametrize("bias", ["random", "zero", "none"])
def test_f_tilde_identity(bias):
    W, b, acts = _random_sae()
    b = {"random": b, "zero": torch.zeros_like(b), "none": None}[bias]
    z_hat = acts @ W + (0 if b is None else b)
    ft = afa.f_tilde(acts, W, b)
    atoms = afa.f_tilde_atoms(W, b)
    assert ft.shape == (64, 49) and atoms.shape == (49, 16)
    torch.testing.assert_close(ft @ atoms, z_hat, atol=1e-4, rtol=0)
    norms = atoms.norm(dim=1)
    expected_norms = torch.ones(49)
    if bias != "random":
        expected_norms[-1] = 0.0  # zero bias → zero atom, and f̃ is zero there too
    torch.testing.assert_close(norms, expected_norms, atol=1e-6, rtol=0)


def test_f_tilde_sq_norm_formula():
    W, b, acts = _random_sae(seed=3)
    # hand formula: sum_i (f_i ||W_i||)^2 + ||b||^2, written as an explicit loop over latents
    manual = torch.zeros(acts.shape[0], dtype=torch.float64)
    for i in range(W.shape[0]):
        manual += (acts[:, i].double() * W[i].double().norm()) ** 2
    manual += b.double().square().sum()
    torch.testing.assert_close(afa.f_tilde_sq_norm(acts, W, b).double(), manual, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(afa.f_tilde(acts, W, b).square().sum(1).double(), manual, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(afa.f_tilde_sq_norm(acts, W, b, chunk=7), afa.f_tilde_sq_norm(acts, W, b))


def test_orthonormal_dictionary_preserves_norm():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    f = torch.rand(100, 32, generator=g, dtype=torch.float64) * (torch.rand(100, 32, generator=g) < 0.3)
    f[0] = 0
    f[0, 3] = 2.5
    z = f @ Q
    s = afa.zf_stats(z, f, Q.float(), None)
    torch.testing.assert_close(s.norm_f, s.norm_z, atol=1e-5, rtol=0)
    assert float(s.eps_lbo.max()) < 1e-6
    assert afa.epsilon(Q).max < 1e-6
    i, j = afa.epsilon(Q).argmax
    assert 0 <= i < j < 32  # a pair i < j
    eye = afa.epsilon(torch.eye(6))  # exactly orthogonal: every pair ties at 0, the first pair is reported
    assert eye.max == 0.0 and eye.argmax == (0, 1)
    assert afa.welch_bound(32, 32) == 0.0


# ---------------------------------------------------------------- bound, εLBO, MDL

def test_bound_slopes_values():
    s = afa.bound_slopes([0.25, 0.5, 1.0])
    torch.testing.assert_close(s.lower, torch.tensor([0.8944, 0.8165, 0.7071], dtype=torch.float64), atol=5e-4, rtol=0)
    torch.testing.assert_close(s.upper[:2], torch.tensor([1.1547, 1.4142], dtype=torch.float64), atol=5e-4, rtol=0)
    assert math.isinf(float(s.upper[2]))
    one = afa.bound_slopes(0.5)
    assert isinstance(one.lower, float) and abs(one.upper - math.sqrt(2)) < 1e-12
    assert math.isinf(afa.bound_slopes(3.0).upper)
    # worst-case vs tight form: same ε, h−1 vs k−1
    assert afa.worst_case_slopes(1e-3, 1001).lower == pytest.approx(math.sqrt(0.5))
    assert afa.tight_slopes(1e-3, 1).lower == 1.0 and afa.tight_slopes(1e-3, 1).upper == 1.0
    assert afa.tight_slopes(0.1, 6).lower == pytest.approx(math.sqrt(1 / 1.5))
    assert afa.rip_slopes(0.25).lower == pytest.approx(0.8944, abs=5e-4)
    eps = afa.eps_for_eps_h([0.25, 0.5, 1.0], 24576)
    assert [round(e * 1e5, 1) for e in eps] == [1.0, 2.0, 4.1]
    with pytest.raises(ValueError, match=">= 0"):
        afa.bound_slopes(-0.1)


def test_eps_lbo():
    torch.testing.assert_close(afa.eps_lbo([3.0, 5.0], [3.0, 5.0], 100), torch.zeros(2))
    # |4 - 1| / (10 · 1) = 0.3
    assert float(afa.eps_lbo([2.0], [1.0], 11)[0]) == pytest.approx(0.3)
    assert float(afa.eps_lbo([0.0], [0.0], 11)[0]) == 0.0
    assert math.isinf(float(afa.eps_lbo([1.0], [0.0], 11)[0]))


def test_mdl_bits():
    assert afa.mdl_bits(2037.29, bits_per_value=7, dict_size=12288) == pytest.approx(41937.5, abs=0.5)
    assert afa.mdl_bits(1024, 7, 12288) == pytest.approx(21079.0, abs=0.5)
    with pytest.raises(ValueError):
        afa.mdl_bits(-1)


# ---------------------------------------------------------------- ε and Welch

def test_welch_bound_values():
    assert afa.welch_bound(12288, 768) == pytest.approx(0.0349, abs=5e-5)
    assert afa.welch_bound(24576, 768) == pytest.approx(0.0355, abs=5e-5)
    assert afa.welch_bound(16384, 2304) == pytest.approx(0.0193, abs=5e-5)
    assert afa.welch_bound(10, 20) == 0.0


@pytest.mark.parametrize("block_size", [3, 7, 64, 200, 1000])
def test_blockwise_epsilon_equals_dense(block_size):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(200, 12, generator=g) * torch.rand(200, 1, generator=g).add(0.1)
    blk, dense = afa.epsilon(W, block_size=block_size), afa.epsilon_dense(W)
    U = W / W.norm(dim=1, keepdim=True)
    G = (U @ U.T).double()
    off = G[~torch.eye(200, dtype=torch.bool)]
    assert blk.max == pytest.approx(float(off.abs().max()), abs=1e-6)
    assert blk.mean == pytest.approx(float(off.abs().mean()), rel=1e-6)
    assert blk.rms == pytest.approx(float(off.square().mean().sqrt()), rel=1e-6)
    assert blk.mean_signed == pytest.approx(float(off.mean()), abs=1e-7)
    assert blk.n_pairs == dense.n_pairs == 200 * 199 // 2
    assert blk.argmax == dense.argmax and blk.argmax[0] < blk.argmax[1]
    assert abs(float(G[blk.argmax])) == pytest.approx(blk.max, abs=1e-6)


def test_epsilon_respects_welch_and_accepts_sae_like():
    W = conc.random_unit_dictionary(400, 20, seed=2)
    e = afa.epsilon(W)
    wb = afa.welch_bound(400, 20)
    assert e.max >= wb and e.rms >= wb - 1e-9  # Welch bounds both the max and the RMS
    assert e.rms < 1.2 * math.sqrt(1 / 20)  # random is near the RMS bound when h ≫ d

    class Fake:
        W_dec = W * 3.0
        b_dec = torch.zeros(20)

    assert afa.epsilon_sae(Fake()).max == pytest.approx(e.max, abs=1e-6)
    assert afa.epsilon(Fake()).mean == pytest.approx(e.mean, rel=1e-6)


def test_epsilon_sampled_close_to_exact():
    W = conc.random_unit_dictionary(1500, 48, seed=4)
    ex = afa.epsilon(W, block_size=256)
    est = afa.epsilon_sampled(W, n_pairs=200_000, seed=1)
    assert not est.exact and 0.95 * 200_000 <= est.n_pairs <= 1.1 * 200_000
    assert abs(est.mean - ex.mean) < 5 * est.mean_stderr + 1e-6
    assert est.rms == pytest.approx(ex.rms, rel=0.02)
    assert est.max <= ex.max + 1e-6 and est.max > 0.8 * ex.max
    via_flag = afa.epsilon(W, exact=False, n_pairs=1000, seed=1)
    assert not via_flag.exact and 900 <= via_flag.n_pairs <= 1300


def test_epsilon_errors_are_helpful():
    W = torch.randn(10, 4)
    W[3] = 0
    with pytest.raises(ValueError, match="all-zero rows"):
        afa.epsilon(W)
    with pytest.raises(ValueError, match=r"2-D \[h, d\]"):
        afa.epsilon(torch.randn(5))
    with pytest.raises(ValueError, match="acts must be"):
        afa.zf_stats(torch.randn(3, 4), torch.randn(3, 9), torch.randn(10, 4))


# ---------------------------------------------------------------- ZF statistics

def test_zf_stats_decomposition_and_summary():
    W, b, acts = _random_sae(h=96, d=24, seed=5)
    g = torch.Generator().manual_seed(9)
    z = acts @ W + b + 0.3 * torch.randn(64, 24, generator=g)
    s = afa.zf_stats(z, acts, W, b)
    z_hat = acts @ W + b
    torch.testing.assert_close(s.norm_z_hat, z_hat.norm(dim=1))
    torch.testing.assert_close(s.nmse, (z - z_hat).square().sum(1) / z.square().sum(1))
    torch.testing.assert_close(s.ratio, s.norm_f / s.norm_z)
    torch.testing.assert_close(
        s.eps_lbo, ((s.norm_z**2 - s.norm_f**2).abs() / (95 * s.norm_f**2)), rtol=1e-4, atol=1e-9
    )
    assert torch.all(s.eps_lbo <= s.eps_lbo_hat + s.eps_lbo_recon + 1e-7)  # triangle inequality
    # geometry: ρ is the f̃-weighted mean cosine of co-active atoms, computed here pair by pair
    # from the unit atoms (not from the norms zf_stats uses), and ‖f̃‖/‖ẑ‖ = 1/sqrt(1 + ρ(k_eff − 1))
    ft, atoms = afa.f_tilde(acts, W, b).double(), afa.f_tilde_atoms(W, b).double()
    for t in range(0, 64, 9):
        on = (ft[t] != 0).nonzero().squeeze(1).tolist()
        num = sum(float(ft[t, i] * ft[t, j] * (atoms[i] @ atoms[j])) for i in on for j in on if i != j)
        den = sum(float(ft[t, i] * ft[t, j]) for i in on for j in on if i != j)
        k_eff = float(ft[t].sum()) ** 2 / float(ft[t].square().sum())
        assert float(s.coherence[t]) == pytest.approx(num / den, rel=1e-4)
        assert float(s.k_eff[t]) == pytest.approx(k_eff, rel=1e-5)
        assert float(s.ratio_hat[t]) == pytest.approx(1 / math.sqrt(1 + num / den * (k_eff - 1)), rel=1e-4)
    assert torch.all(s.k_eff <= s.l0 + 1 + 1e-4)
    # passing z_hat explicitly gives the same answer
    s2 = afa.zf_stats(z, acts, W, b, z_hat=z_hat, chunk=10)
    torch.testing.assert_close(s2.nmse, s.nmse)
    table = afa.zf_summary({"a": s, "b": s2}, pooled=True)
    assert list(table.index) == ["a", "b", "pooled"]
    assert table.loc["a", "pct_over"] == pytest.approx(100 * float((s.ratio > 1).float().mean()))
    assert table.loc["a", "pct_above_sqrt_half"] == pytest.approx(100 * float((s.ratio >= 0.5**0.5).float().mean()))
    assert table.loc["a", "median_ratio"] == pytest.approx(float(s.ratio.double().quantile(0.5)), rel=1e-6)
    assert table.loc["pooled", "n"] == 128


def test_zf_stats_sae_with_saelib_sae():
    sae_mod = pytest.importorskip("saelib.sae.core")
    for mode in ("none", "token"):
        cfg = sae_mod.SAEConfig(d_in=16, d_sae=64, activation="topk", k=8, input_norm=mode, seed=0)
        sae = sae_mod.SAE(cfg).eval()
        with torch.no_grad():
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, 64)[:, None])  # non-unit rows must not matter
            sae.b_dec.normal_()
        x = torch.randn(50, 16) * 4 + 1
        s = afa.zf_stats_sae(sae, x, batch_size=16)
        x_n = sae.normalize(x)[0]
        acts = sae.encode(x)
        ref = afa.zf_stats(x_n, acts, sae.W_dec.detach(), sae.b_dec.detach())
        torch.testing.assert_close(s.norm_f, ref.norm_f)
        torch.testing.assert_close(s.norm_z, x_n.norm(dim=1))
        assert torch.all(s.l0 <= 8)


def test_zf_stats_sae_with_saelens_normalisation():
    sl = pytest.importorskip("sae_lens")
    cfg = sl.StandardSAEConfig(d_in=16, d_sae=64, apply_b_dec_to_input=True,
                               normalize_activations="constant_norm_rescale")
    sae = sl.StandardSAE(cfg)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.W_dec.mul_(1.7)
    x = torch.randn(40, 16) * torch.linspace(1, 30, 40)[:, None]
    s = afa.zf_stats_sae(sae, x)
    # decoder space: every token rescaled to norm sqrt(d_in)
    torch.testing.assert_close(s.norm_z, torch.full((40,), 4.0), atol=1e-4, rtol=0)
    with torch.no_grad():
        x_hat = sae.decode(sae.encode(x))  # model space
    nmse = (x - x_hat).square().sum(1) / x.square().sum(1)  # per-token rescaling leaves NMSE unchanged
    torch.testing.assert_close(s.nmse, nmse, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- concentration

def test_concentration_band_values():
    b = conc.concentration_band(768)
    assert b.sigma == pytest.approx(math.sqrt(2 / 768))
    assert b.z_score == pytest.approx(2.326, abs=1e-3)
    assert b.slope_lower == pytest.approx(0.945, abs=1e-3) and b.slope_upper == pytest.approx(1.065, abs=1e-3)
    assert conc.concentration_band(768, z_score=1.0).coverage == pytest.approx(0.6827, abs=1e-4)
    assert math.isinf(conc.concentration_band(2, z_score=2.0).slope_upper)
    # one active atom: no cross terms, zero spread
    assert float(conc.concentration_sigma(100, torch.tensor([0.0, 3.0, 0.0]))) == 0.0


def test_random_dictionary_ratios_concentrate():
    d, h = 256, 2048
    sim = conc.random_dictionary_norm_ratios(d, h, ks=[1, 16, 256], n=400, seed=0)
    assert sim.ratios.shape == (3, 400)
    torch.testing.assert_close(sim.ratios[0], torch.ones(400), atol=1e-5, rtol=0)  # k = 1 is exact
    band = conc.concentration_band(d)
    for r in sim.ratios[1:]:
        assert abs(float(r.median()) - 1) < 0.02
        inside = ((r >= band.slope_lower) & (r <= band.slope_upper)).float().mean()
        assert float(inside) > 0.93
    # predicted spread sqrt(2/d (1 − Σf⁴/(Σf²)²)) matches the simulated spread of ||z||²/||f||²
    emp = (1 / sim.ratios[2].double() ** 2).std()
    pred = sim.sigma_pred[2].double().mean()
    assert float(emp / pred) == pytest.approx(1.0, abs=0.2)
    # the worst-case bound is vacuous for this random dictionary
    eps = afa.epsilon(conc.random_unit_dictionary(h, d, seed=0)).max
    assert eps * (h - 1) > 1


def test_random_sparse_codes_and_coherent_dictionary():
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([0, 1, 5, 50, 100])
    f = conc.random_sparse_codes(5, 100, k, generator=g)
    assert torch.equal((f > 0).sum(1), k) and torch.all(f >= 0)
    assert torch.all((conc.random_sparse_codes(4, 30, 7, generator=g) > 0).sum(1) == 7)
    W = conc.coherent_unit_dictionary(300, 64, 0.05, seed=1)
    e = afa.epsilon(W)
    assert e.mean_signed == pytest.approx(0.05, abs=0.01)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(300))
    # a shared positive overlap makes codes under-activated by 1/sqrt(1 + a(K − 1))
    codes = conc.random_sparse_codes(200, 300, 40, generator=g)
    s = afa.zf_stats(codes @ W, codes, W, None)
    pred = 1 / torch.sqrt(1 + 0.05 * (s.k_eff - 1))
    assert float((s.ratio.median() - pred.median()).abs()) < 0.03
    assert float(s.ratio.median()) < 0.8


def test_simulator_mean_cos_matches_dictionary():
    W = conc.random_unit_dictionary(300, 20, seed=3)
    sim = conc.random_dictionary_norm_ratios(20, 300, [5], n=50, seed=3, dictionary=W)
    assert sim.mean_cos == pytest.approx(afa.epsilon(W).mean_signed, abs=1e-9)
    assert sim.k_eff.shape == (1, 50) and torch.all(sim.k_eff <= 5 + 1e-4)


def test_plots_draw_the_data():
    plots = pytest.importorskip("saelib.plots.afa")
    import matplotlib.collections as mc
    import matplotlib.pyplot as plt
    import numpy as np

    W, b, acts = _random_sae(seed=6)
    z = acts @ W + b
    st = {"L1": afa.zf_stats(z, acts, W, b), "L2": afa.zf_stats(z * 1.1, acts, W, b)}
    fig = plots.zf_plot(st, h=48, band_d=16, cones={"tight": (0.5, 2.0)})
    ax = fig.axes[0]
    # one scatter per layer holding exactly that layer's (‖z‖, ‖f̃‖) points
    pts = [c for c in ax.collections if isinstance(c, mc.PathCollection)]
    assert [c.get_label() for c in pts] == ["L1", "L2"]
    for c, key in zip(pts, ["L1", "L2"]):
        np.testing.assert_allclose(c.get_offsets(), np.stack([st[key].norm_z, st[key].norm_f], 1), rtol=1e-6)
    # three shaded worst-case cones, labelled with ε(h−1) and ε = ε(h−1)/(h−1)
    cones = [c for c in ax.collections if isinstance(c, mc.PolyCollection)]
    assert sorted(c.get_label() for c in cones) == sorted(
        [f"ε(h−1)={e:g} (ε={e / 47:.1e})" for e in (0.25, 0.5, 1.0)])
    # lines through the origin: slope = y/x at the right end
    slopes = {}
    for ln in ax.get_lines():
        x, y = ln.get_data()
        slopes.setdefault(ln.get_label(), []).append(float(y[-1] / x[-1]))
    band = conc.concentration_band(16)
    assert slopes["y = x"] == pytest.approx([1.0])
    assert slopes["tight"] == pytest.approx([0.5])  # the upper (2.0) line carries no label
    lab = next(k for k in slopes if k.startswith("random-dictionary band d=16"))
    assert slopes[lab] == pytest.approx([band.slope_lower])
    assert sorted(v for vals in slopes.values() for v in vals) == pytest.approx(
        sorted([1.0, 0.5, 2.0, band.slope_lower, band.slope_upper]))
    top = max(max(float(s.norm_z.max()), float(s.norm_f.max())) for s in st.values())
    assert ax.get_xlim() == pytest.approx((0, 1.05 * top)) and ax.get_ylim() == pytest.approx((0, 1.05 * top))
    assert "z" in ax.get_xlabel() and "f" in ax.get_ylabel()
    fig2 = plots.zf_plot({"a": (st["L1"].norm_z, st["L1"].norm_f)}, log=True, cone_eps_h=())
    ax2 = fig2.axes[0]
    assert ax2.get_xscale() == "log" and ax2.get_yscale() == "log"
    assert not [c for c in ax2.collections if isinstance(c, mc.PolyCollection)]  # no cones asked for
    assert len([c for c in ax2.collections if isinstance(c, mc.PathCollection)][0].get_offsets()) == 64
    # half violins: the median dots sit at each group's median (εLBO in units of 1e-5)
    fig3 = plots.half_violin({k: v.nmse for k, v in st.items()}, {k: v.eps_lbo for k, v in st.items()},
                             clip_quantile=None)
    left, right = fig3.axes[0], fig3.axes[1]
    med_l = [float(ln.get_ydata()[0]) for ln in left.get_lines()]
    med_r = [float(ln.get_ydata()[0]) for ln in right.get_lines()]
    assert med_l == pytest.approx([float(np.median(st[k].nmse.numpy())) for k in ("L1", "L2")], rel=1e-6)
    assert med_r == pytest.approx([float(np.median(st[k].eps_lbo.numpy())) / 1e-5 for k in ("L1", "L2")], rel=1e-6)
    labels = [t.get_text() for t in left.get_xticklabels()]
    worst_mse = int(np.argmax(med_l))
    assert "worst MSE" in labels[worst_mse] and "best MSE" in labels[1 - worst_mse]
    assert any("worst εLBO" in t for t in labels)
    assert "1e-05" in right.get_ylabel() and left.get_ylabel() == "Normalized MSE"
    with pytest.raises(ValueError, match="same layer keys"):
        plots.half_violin({"a": [1.0]}, {"b": [1.0]})
    plt.close("all")


def test_zf_tolerance_band_and_activation_class():
    from saelib.analysis.afa import ZFStats, activation_class, zf_summary

    ratio = torch.tensor([0.90, 0.97, 1.0, 1.001, 1.03, 1.2, float("nan")])
    n = ratio.numel()
    one = torch.ones(n)
    st = ZFStats(norm_z=one, norm_f=ratio, norm_z_hat=one, ratio=ratio, ratio_hat=ratio, nmse=one, eps_lbo=one,
                 eps_lbo_hat=one, eps_lbo_recon=one, l0=one, k_eff=one, coherence=one, h=8)
    assert list(activation_class(ratio, 0.05)) == ["under", "within", "within", "within", "within", "over", "nan"]
    strict = zf_summary(st).iloc[0]
    assert strict["pct_over"] == pytest.approx(100 * 3 / 6)  # the paper's strict > 1: 1.001 counts as over
    band = zf_summary(st, tol=0.05).iloc[0]
    assert band["pct_over"] == pytest.approx(100 / 6) and band["pct_under"] == pytest.approx(100 / 6)
    assert band["pct_within"] == pytest.approx(400 / 6) and band["tol"] == 0.05
    assert band["norm_z_cv"] == pytest.approx(0.0)  # every ‖z‖ equal: the degenerate stripe
    with pytest.raises(ValueError, match="tol"):
        zf_summary(st, tol=-0.1)


@pytest.mark.parametrize("norm", ["token", "global", "none"])
def test_zf_in_model_space(norm):
    """Model-space ZF: ‖x̂‖ matches the SAE's own reconstruction and ‖z‖ varies across tokens,
    while the decoder-space ‖z‖ of a per-token standardised SAE is one constant."""
    from saelib.analysis.afa import zf_stats_model_space, zf_stats_sae
    from saelib.sae.core import SAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g) * (0.5 + 5 * torch.rand(64, 1, generator=g)) + 0.4
    sae = SAE(SAEConfig(d_in=16, d_sae=48, activation="topk", k=4, input_norm=norm, seed=1))
    if norm == "global":
        sae.fit_input_norm(x)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        st = zf_stats_model_space(sae, x)
        x_hat = sae.reconstruct(x)
    torch.testing.assert_close(st.norm_z_hat, x_hat.norm(dim=1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(st.norm_z, x.norm(dim=1))
    assert (st.l0 == (sae.encode(x) != 0).sum(1)).all()
    dec = zf_stats_sae(sae, x)
    if norm == "token":
        assert float(dec.norm_z.std() / dec.norm_z.mean()) < 1e-4  # the stripe
    assert float(st.norm_z.std() / st.norm_z.mean()) > 0.3
    # every ratio is finite (no zero-norm token)
    assert torch.isfinite(st.ratio).all()


def test_zf_model_space_rejects_foreign_saes():
    from saelib.analysis.afa import zf_stats_model_space

    class Foreign(torch.nn.Module):
        W_dec = torch.zeros(4, 3)

    with pytest.raises(TypeError, match="zf_stats_sae"):
        zf_stats_model_space(Foreign(), torch.zeros(2, 3))


def test_max_cosine_both_directions_match_dense():
    from saelib.analysis.afa import max_cosine

    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(50, 9, generator=g), torch.randn(30, 9, generator=g)
    mc = max_cosine(A, B, both=True, block_size=7)  # uneven blocks
    dense = torch.nn.functional.normalize(A, dim=1) @ torch.nn.functional.normalize(B, dim=1).T
    torch.testing.assert_close(mc.values, dense.max(1).values)
    torch.testing.assert_close(mc.values_b, dense.max(0).values)
    assert (mc.indices == dense.argmax(1)).all() and (mc.indices_b == dense.argmax(0)).all()
    assert max_cosine(A, B).values_b is None
    with pytest.raises(ValueError, match="one width"):
        max_cosine(A, torch.randn(3, 8))
