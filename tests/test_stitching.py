"""Stitching on small synthetic SAEs whose answers are known by construction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from saelib.analysis import stitching as st
from saelib.sae.core import SAE, SAEConfig

D = 24


def random_sae(m: int, act: str, seed: int, *, k: int | None = None, input_norm: str = "none", dtype: str = "float32",
               enc_scale: float = 1.0) -> SAE:
    """An SAE with random weights and non-zero biases (so input centring matters)."""
    cfg = SAEConfig(d_in=D, d_sae=m, activation=act, k=k, seed=seed, use_b_enc=True, input_norm=input_norm,
                    dtype=dtype)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc.mul_(enc_scale)
        sae.b_enc.copy_(torch.randn(m, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.5)
        if act == "batchtopk":
            sae.threshold.fill_(0.15)
        if input_norm == "global":
            sae.input_scale.fill_(0.7)
    return sae.eval()


def data(n: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


ARCHS = [("relu", None), ("batchtopk", 4), ("topk", 5), ("topafa", None)]


@pytest.mark.parametrize("act,k", ARCHS)
@pytest.mark.parametrize("norm", ["none", "global"])
def test_affine_view_reproduces_sae(act, k, norm):
    sae = random_sae(40, act, 1, k=k, input_norm=norm)
    x = data()
    p = SAE.from_affine(*sae.affine(), like=sae)
    assert p.cfg.input_norm == "none" and p.cfg.activation == act and p.cfg.k == k
    torch.testing.assert_close(p.encode(x), sae.encode(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.decode(sae.encode(x)), sae.decode(sae.encode(x)), atol=1e-4, rtol=1e-4)


def test_token_norm_is_rejected_with_a_fix():
    sae = random_sae(16, "relu", 0, input_norm="token")
    with pytest.raises(ValueError, match="input_norm"):
        st.reconstruction_stats(sae, data())


@pytest.mark.parametrize("act,k", ARCHS)
def test_insertion_delta_mse_matches_bruteforce(act, k):
    """Closed form (ReLU, threshold) and batched re-selection (TopK, top-AFA) vs re-encoding S + j."""
    S, L = random_sae(32, act, 1, k=k), random_sae(64, act, 2, k=k)
    x = data(200)
    res = st.insertion_delta_mse(S, L, x, chunk_tokens=64)
    bf = st.insertion_delta_mse_bruteforce(S, L, x, range(64))
    scale = bf.abs().max()
    assert scale > 0
    torch.testing.assert_close(res.delta_mse, bf, atol=1e-6 * float(scale) + 1e-9, rtol=1e-4)
    # both classes occur in this random case, so the sign test is not trivial
    assert (bf < 0).any() and (bf > 0).any()
    assert res.mse_small == pytest.approx(st.reconstruction_stats(S, x)["mse"], rel=1e-5)


def test_topafa_delta_mse_with_heavy_latents():
    """Large inserted activations push many S latents out of the top-AFA prefix at once."""
    S = random_sae(48, "topafa", 3)
    L = random_sae(40, "topafa", 4, enc_scale=4.0)
    x = data(150, seed=5)
    res = st.insertion_delta_mse(S, L, x, chunk_tokens=50)
    bf = st.insertion_delta_mse_bruteforce(S, L, x, range(40))
    torch.testing.assert_close(res.delta_mse, bf, atol=1e-6 * float(bf.abs().max()) + 1e-9, rtol=1e-4)


def test_rule_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same architecture"):
        st.insertion_delta_mse(random_sae(8, "relu", 0), random_sae(8, "topk", 0, k=2), data(10))


# ---------------------------------------------------------------- planted dictionaries


def planted(n_feat: int = 40, d: int = D + 40, seed: int = 0):
    """Orthonormal ground-truth features; S knows features 0..19 exactly.

    L = duplicates of S features 0..7, a two-way split of S feature 8 (8 ± a small tilt),
    novel features 20..29. S features 9..19 have no counterpart in L.
    """
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, n_feat, generator=g))
    E = Q.T.contiguous()  # [n_feat, d] orthonormal rows

    like = SAE(SAEConfig(d_in=d, d_sae=1, activation="relu"))

    def relu_parts(rows: torch.Tensor) -> SAE:
        return SAE.from_affine(rows.T.contiguous(), torch.zeros(rows.shape[0]), rows.clone(), torch.zeros(d), like=like)

    S = relu_parts(E[:20])
    tilt = E[39]  # a direction no data uses
    split = torch.stack([E[8] * 0.95 + tilt * 0.3122, E[8] * 0.95 - tilt * 0.3122])
    L = relu_parts(torch.cat([E[:8], split, E[20:30]]))
    coef = torch.rand(1000, n_feat, generator=g) * (torch.rand(1000, n_feat, generator=g) < 0.15)
    coef[:, 30:] = 0
    x = coef @ E
    return S, L, x


def test_planted_classification_and_proxy():
    S, L, x = planted()
    res = st.insertion_delta_mse(S, L, x)
    match = st.decoder_cosine(S, L, theta_min=0.5)
    cls = st.classify_latents(res.delta_mse, res.freq_large, match.max_cos)
    expected = np.array(["reconstruction"] * 10 + ["novel"] * 10)
    assert (cls.label == expected).all()
    assert cls.frac_novel == pytest.approx(0.5)
    assert cls.auroc == pytest.approx(1.0)
    row = cls.proxy.set_index("theta").loc[0.7]
    assert row["accuracy"] == pytest.approx(1.0)


def test_dead_latents_are_excluded():
    S, L, x = planted()
    with torch.no_grad():
        L.b_enc[20 - 1] = -1e3  # last novel latent never fires
    res = st.insertion_delta_mse(S, L, x)
    cls = st.classify_latents(res.delta_mse, res.freq_large, st.decoder_cosine(S, L).max_cos)
    assert cls.label[19] == "dead" and cls.n_alive == 19
    assert cls.frac_novel == pytest.approx(9 / 19)


def test_planted_families():
    S, L, x = planted()
    res = st.insertion_delta_mse(S, L, x)
    match = st.decoder_cosine(S, L, theta_min=0.5)
    fam = st.build_families(match, theta=0.7, alive_small=res.freq_small > 0, alive_large=res.freq_large > 0)
    summary = st.family_summary(fam)
    assert summary.loc["insert", "families"] == 10  # novel features 20..29
    assert summary.loc["swap", "families"] == 9  # 8 duplicates + 1 split
    assert summary.loc["small_only", "families"] == 11  # S features 9..19
    split = fam.comp_large[8]
    assert fam.comp_large[9] == split and fam.comp_small[8] == split
    assert fam.n_small[split] == 1 and fam.n_large[split] == 2


def test_op_delta_mse_matches_bruteforce_swaps():
    S, L = random_sae(24, "relu", 1), random_sae(48, "relu", 2)
    x = data(300)
    res = st.insertion_delta_mse(S, L, x)
    match = st.decoder_cosine(S, L, theta_min=0.1)
    fam = st.build_families(match, theta=0.2, alive_small=res.freq_small > 0, alive_large=res.freq_large > 0)
    assert (fam.kind == "swap").any()
    op_comp, opS, opL = st._ops(fam)
    d = st.op_delta_mse(S, L, fam, x)
    base = st.reconstruction_stats(S, x)["mse"]
    for o in range(len(op_comp)):
        st_parts = st.stitch(S, L, (opS != o).numpy(), (opL == o).numpy())
        want = st.reconstruction_stats(st_parts, x)["mse"] - base
        assert float(d[o]) == pytest.approx(want, rel=1e-4, abs=1e-9)


# ---------------------------------------------------------------- the stitched SAE


@pytest.mark.parametrize("act,k", ARCHS)
def test_stitched_endpoints(act, k):
    S, L = random_sae(20, act, 1, k=k), random_sae(36, act, 2, k=k)
    x = data(128)
    start = st.stitch(S, L, torch.ones(20, dtype=torch.bool), torch.zeros(36, dtype=torch.bool))
    torch.testing.assert_close(start.reconstruct(x), S.decode(S.encode(x)), atol=1e-4, rtol=1e-4)
    end = st.stitch(S, L, torch.zeros(20, dtype=torch.bool), torch.ones(36, dtype=torch.bool),
                    decoder_bias="large")
    torch.testing.assert_close(end.reconstruct(x), L.decode(L.encode(x)), atol=1e-4, rtol=1e-4)
    # with S's decoder bias (the paper's), the end differs by exactly b_S - b_L
    end_s = st.stitch(S, L, torch.zeros(20, dtype=torch.bool), torch.ones(36, dtype=torch.bool))
    if act != "topafa":  # top-AFA's target ||x - b_dec|| depends on the bias, so the selection may change
        torch.testing.assert_close(end_s.reconstruct(x) - end.reconstruct(x),
                                   (S.b_dec - L.b_dec).detach().expand(128, D), atol=1e-4, rtol=1e-4)


def test_curve_planted_is_monotone_and_ends_at_the_stitched_sae():
    S, L, x = planted()
    res = st.insertion_delta_mse(S, L, x)
    match = st.decoder_cosine(S, L, theta_min=0.5)
    fam = st.build_families(match, theta=0.7, alive_small=res.freq_small > 0, alive_large=res.freq_large > 0)
    od = st.op_delta_mse(S, L, fam, x)
    cur = st.interpolation_curve(S, L, fam, od, x, monotone=True)
    assert cur.mse[0] == pytest.approx(res.mse_small, rel=1e-9)
    assert np.all(np.diff(cur.mse) <= 1e-12)
    assert cur.mse[-1] < cur.mse[0]
    assert (cur.op_delta < 0).all()
    # the last point equals the stitched SAE with every applied op, re-encoded from scratch
    op_comp, opS, opL = st._ops(fam)
    applied = torch.as_tensor(np.isin(np.arange(len(op_comp)), cur.order))
    kS = ~((opS >= 0) & applied[opS.clamp(min=0)])
    kL = (opL >= 0) & applied[opL.clamp(min=0)]
    final = st.reconstruction_stats(st.stitch(S, L, kS, kL), x)
    assert cur.mse[-1] == pytest.approx(final["mse"], rel=1e-6)
    assert cur.l0[-1] == pytest.approx(final["l0"], rel=1e-6)
    assert cur.n_latents[-1] == final["n_latents"]


@pytest.mark.parametrize("act,k", [("relu", None), ("topk", 5)])
def test_curve_points_match_reencoding(act, k):
    """The running reconstruction (ReLU) and the re-encoded path (TopK) equal fresh stitched SAEs."""
    S, L = random_sae(20, act, 1, k=k), random_sae(40, act, 2, k=k)
    x = data(200)
    res = st.insertion_delta_mse(S, L, x)
    match = st.decoder_cosine(S, L, theta_min=0.1)
    fam = st.build_families(match, theta=0.25, alive_small=res.freq_small > 0, alive_large=res.freq_large > 0)
    od = st.op_delta_mse(S, L, fam, x)
    cur = st.interpolation_curve(S, L, fam, od, x, monotone=False, n_points=7, chunk_tokens=64)
    op_comp, opS, opL = st._ops(fam)
    assert cur.n_ops[-1] == len(op_comp)  # the non-monotone variant applies every op
    for c, mse, l0 in zip(cur.n_ops, cur.mse, cur.l0):
        applied = torch.zeros(len(op_comp), dtype=torch.bool)
        applied[torch.as_tensor(cur.order[:c], dtype=torch.long)] = True
        kS = ~((opS >= 0) & applied[opS.clamp(min=0)])
        kL = (opL >= 0) & applied[opL.clamp(min=0)]
        ref = st.reconstruction_stats(st.stitch(S, L, kS, kL), x)
        assert mse == pytest.approx(ref["mse"], rel=1e-5)
        assert l0 == pytest.approx(ref["l0"], rel=1e-5)


def test_frankenstein_adds_only_novel_latents():
    S, L, x = planted()
    table, final = st.frankenstein([S, L], x, theta=0.7)
    assert list(table["added"]) == [0, 10]
    assert final.cfg.d_sae == 30
    assert table["mse"].iloc[1] < table["mse"].iloc[0]


def test_max_cosine_blockwise_matches_dense():
    A, B = torch.randn(50, D), torch.randn(30, D)
    mc = st.max_cosine(A, B, block_size=7)
    dense = torch.nn.functional.normalize(A, dim=1) @ torch.nn.functional.normalize(B, dim=1).T
    torch.testing.assert_close(mc.values, dense.max(1).values)
    assert (mc.indices == dense.argmax(1)).all()
    m = st.decoder_cosine(random_sae(30, "relu", 0), random_sae(50, "relu", 1), theta_min=0.2, block=8)
    assert len(m.edges) == len(m.edge_cos) and (m.edge_cos > 0.2).all()


def test_auroc_known_values():
    assert st.auroc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert st.auroc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    assert st.auroc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
@pytest.mark.parametrize("act,k", ARCHS)
def test_threshold_insertion_keeps_S_fixed(act, k):
    """mode="threshold": S's code stays as it is and latent j adds a_j^L d_j; checked against an
    explicit reconstruction, and equal to the rule mode where latents do not compete."""
    S, L = random_sae(32, act, 1, k=k), random_sae(48, act, 2, k=k)
    x = data(120)
    res = st.insertion_delta_mse(S, L, x, chunk_tokens=40, mode="threshold")
    with torch.no_grad():
        xs, aL = S.decode(S.encode(x)), L.encode(x)
    base = ((x - xs) ** 2).mean()
    ref = torch.stack([((x - xs - aL[:, j:j + 1] * L.W_dec[j].detach()) ** 2).mean() - base for j in range(48)])
    torch.testing.assert_close(res.delta_mse.float(), ref, atol=1e-5 * float(ref.abs().max()) + 1e-8, rtol=1e-3)
    rule = st.insertion_delta_mse(S, L, x, chunk_tokens=40)
    if act in ("relu", "batchtopk"):
        torch.testing.assert_close(res.delta_mse, rule.delta_mse)
    else:  # competing rules: entering pushes S latents out, so the rule ΔMSE differs
        assert not torch.allclose(res.delta_mse, rule.delta_mse)
    with pytest.raises(ValueError, match="mode"):
        st.insertion_delta_mse(S, L, x, mode="other")


def test_analyze_pair_reports_both_measures_on_the_same_tokens():
    S, L = random_sae(16, "topk", 1, k=3), random_sae(32, "topk", 2, k=3)
    cfg = st.StitchConfig(competing_tokens=64, n_points=4, competing_points=4)
    r = st.analyze_pair(S, L, data(200), cfg=cfg, curves=True)
    assert r.insertion.n_tokens == r.insertion_threshold.n_tokens == 64
    assert r.cls_threshold is not None and r.cls_threshold.n_alive > 0
    # the stitched path starts at S's MSE on the very tokens the pair was analysed on
    assert r.curve_monotone.mse[0] == pytest.approx(r.insertion.mse_small, rel=1e-5)
    R = st.analyze_pair(random_sae(16, "relu", 1), random_sae(32, "relu", 2), data(100), cfg=cfg, curves=False)
    assert R.insertion_threshold is R.insertion
