"""Meta-SAEs on decoders with a planted compositional structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from saelib.analysis import meta as M
from saelib.sae.core import SAE
from saelib.analysis.afa import max_cosine

D, N_META, N_ROWS, K = 48, 24, 1536, 3


def planted_decoder(seed: int = 0, n_rows: int = N_ROWS, d: int = D, n_meta: int = N_META, k: int = K):
    """Rows = normalised non-negative sums of ``k`` of ``n_meta`` planted unit directions.

    The first component of every row gets the largest weight, so each row has a dominant
    "parent" direction (used for planted splits)."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_meta, d, generator=g), dim=1)
    idx = torch.stack([torch.randperm(n_meta, generator=g)[:k] for _ in range(n_rows)])
    w = 0.3 + 0.4 * torch.rand(n_rows, k, generator=g)
    w[:, 0] = 1.5
    rows = F.normalize((w[:, :, None] * dirs[idx]).sum(1), dim=1)
    return rows, dirs, idx


@pytest.fixture(scope="module")
def trained():
    rows, dirs, idx = planted_decoder()
    run = M.train_meta_sae(rows, d_meta=2 * N_META, k=K, batch_size=4096, lr=1e-2, max_steps=600,
                           min_steps=100, window=50, tol=1e-4, seed=0, progress=False)
    return rows, dirs, idx, run


def test_config_validation():
    with pytest.raises(ValueError, match="k must be"):
        M.MetaSAEConfig(k=0)
    with pytest.raises(ValueError, match="log_every"):
        M.MetaSAEConfig(log_every=0)
    assert M.MetaSAEConfig().width_for(49152) == 12288
    assert M.MetaSAEConfig(d_meta=2304).width_for(49152) == 2304
    with pytest.raises(ValueError, match="2-D"):
        M.train_meta_sae(torch.zeros(5))


def test_convergence_rule_and_trainer_settings():
    rows = planted_decoder(n_rows=256)[0]
    # any gain is below a huge tol: stops at the first check from max(min_steps, 2 * window) on
    run = M.train_meta_sae(rows, d_meta=16, k=2, batch_size=64, max_steps=100, min_steps=30, window=10,
                           tol=10.0, log_every=4, seed=0, progress=False)
    assert run.converged and run.n_steps == 30 and run.history[-1]["step"] == 30
    assert [h["step"] for h in run.history] == list(range(2, 31, 2))  # every gcd(log_every, window) steps
    sae = run.sae
    assert isinstance(sae, SAE) and sae.cfg.activation == "batchtopk" and sae.cfg.d_sae == 16
    assert not sae.training and sae.cfg.dead_after_tokens == 100 * 64
    assert float(sae.threshold) == pytest.approx(run.history[-1]["threshold"]) and float(sae.threshold) > 0
    h = run.history[-1]
    assert h["fve"] == pytest.approx(1 - h["fvu"]) and h["n_dead"] == 0 and h["l0"] == pytest.approx(2)
    # no gain is enough with tol = 0 ... unless the FVE decreases; max_steps caps the run
    capped = M.train_meta_sae(rows, d_meta=16, k=2, batch_size=64, max_steps=12, min_steps=0, window=5,
                              tol=0.0, seed=0, progress=False)
    assert capped.n_steps == 12 and not capped.converged and run.s_per_step > 0 and run.wall_s > 0
    # the same seed gives the same meta-SAE
    again = M.train_meta_sae(rows, d_meta=16, k=2, batch_size=64, max_steps=100, min_steps=30, window=10,
                             tol=10.0, log_every=4, seed=0, progress=False)
    assert torch.equal(again.sae.W_dec, sae.W_dec)


def test_fve_and_recovery_on_planted_dictionary(trained):
    rows, dirs, _, run = trained
    meta = run.sae
    res_b = M.fve(meta, rows, "batch")
    res_t = M.fve(meta, rows, "threshold")
    assert res_b.fve >= 0.9 and res_t.fve >= 0.9, (res_b, res_t)
    assert res_b.l0 == pytest.approx(K, abs=1e-9)  # batch mode: mean L0 = k exactly
    assert abs(res_t.l0 - K) < 0.5, res_t
    assert meta.threshold > 0
    cos = max_cosine(dirs, meta.W_dec).values
    assert cos.mean() >= 0.9, cos
    # A meta-SAE reconstructing random unit rows must do far worse (the measure can fail).
    noise = F.normalize(torch.randn(N_ROWS, D), dim=1)
    assert M.fve(meta, noise, "batch").fve < res_b.fve - 0.3
    # training history and convergence bookkeeping
    assert run.history and run.history[-1]["step"] == run.n_steps
    assert run.history[-1]["fve"] > run.history[0]["fve"]
    assert run.converged and run.n_steps < 600


def test_decompositions_and_inverse_index_agree(trained):
    rows, _, _, run = trained
    meta = run.sae
    codes = M.meta_codes(meta, rows, "threshold")
    dec = M.decompose(codes)
    inv = M.inverse_index(codes)
    assert len(dec) == rows.shape[0] and len(inv) == meta.cfg.d_sae
    pairs_dec = {(d.latent, c) for d in dec for c in d.meta_latents}
    pairs_inv = {(l, m.latent) for m in inv for l in m.meta_latents}
    assert pairs_dec == pairs_inv and len(pairs_dec) == codes.rows.numel()
    for d in dec[:50]:
        assert d.acts == sorted(d.acts, reverse=True) and all(a > meta.threshold for a in d.acts)
    for m in inv[:10]:
        assert m.acts == sorted(m.acts, reverse=True)
    # the decomposition reconstructs the row
    dense = codes.dense()
    recon = dense @ meta.W_dec + meta.b_dec
    assert torch.allclose(recon, M.reconstruct(meta, codes), atol=1e-5)
    assert codes.per_latent_l0().sum() == codes.members_per_meta().sum() == codes.rows.numel()


def test_save_load_roundtrip(trained, tmp_path):
    rows, _, _, run = trained
    meta = run.sae
    meta.save(tmp_path / "meta")
    back = SAE.load(tmp_path / "meta")
    assert float(back.threshold) == pytest.approx(float(meta.threshold))
    for mode in ("batch", "threshold"):
        assert M.fve(back, rows, mode).fve == pytest.approx(M.fve(meta, rows, mode).fve, abs=1e-6)


def test_max_cos_comparison_beats_random(trained):
    rows, dirs, _, run = trained
    meta = run.sae
    stats = M.max_cos_comparison(meta.W_dec, {"planted": dirs}, base_W=rows, seed=7)
    s = stats[0]
    alive = M.meta_codes(meta, rows, "batch").members_per_meta() > 0
    assert s.forward[alive].mean() > s.forward_random.mean() + 0.3
    assert s.reverse.mean() > s.reverse_random.mean() + 0.3
    table = M.max_cos_table(stats)
    assert list(table["width"]) == [N_META]


def test_split_recovery_planted_and_random(trained):
    rows, dirs, idx, run = trained
    meta = run.sae
    codes = M.meta_codes(meta, rows, "threshold")
    rec = M.split_recovery(meta, codes, rows, dirs, theta=0.7, n_boot=200, seed=0)
    assert rec.n_groups > 5
    assert rec.ratio > 2 and rec.ci_low > 1, rec
    assert rec.parent_meta_coverage > 0.8, rec
    # random groups of latents: no excess sharing
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(N_ROWS, generator=g).tolist()
    groups = [perm[i:i + 6] for i in range(0, 600, 6)]
    rnd = M.shared_meta_ratio(codes, groups, n_boot=200, seed=0)
    assert 0.75 < rnd.ratio < 1.3, rnd
    with pytest.raises(ValueError, match="2 or more"):
        M.shared_meta_ratio(codes, [[1]])


def _direction_codes(rows: torch.Tensor, anchors: torch.Tensor) -> M.MetaCodes:
    """Codes that are a pure function of direction: each row 'contains' its two nearest anchors."""
    top = (F.normalize(rows, dim=1) @ anchors.T).topk(2, dim=1).indices
    n = rows.shape[0]
    return M.MetaCodes(torch.arange(n).repeat_interleave(2), top.reshape(-1), torch.ones(2 * n), n,
                       anchors.shape[0], "threshold")


def test_split_recovery_matched_baseline_removes_the_direction_tautology():
    """Children are chosen by cosine, so codes that only encode direction already make them share
    meta-latents: the isotropic ratio is large, the cosine-matched ratio is about 1."""
    g = torch.Generator().manual_seed(5)
    d = 32
    parents = F.normalize(torch.randn(60, d, generator=g), dim=1)
    # 4 children per parent (cos ~ 0.8 to it) and 1500 unrelated latents
    kids = F.normalize(parents.repeat_interleave(4, 0) + 0.7 * torch.randn(240, d, generator=g) / d ** 0.5,
                       dim=1)
    # decoys: 150 non-parent centres with 3 near copies each (similar pairs that are not siblings)
    centres = F.normalize(torch.randn(150, d, generator=g), dim=1)
    decoys = F.normalize(centres.repeat_interleave(3, 0) + 0.7 * torch.randn(450, d, generator=g) / d ** 0.5, dim=1)
    W = torch.cat([kids, decoys, F.normalize(torch.randn(1000, d, generator=g), dim=1)])
    anchors = F.normalize(torch.randn(40, d, generator=g), dim=1)
    codes = _direction_codes(W, anchors)
    groups = M.split_children(W, parents, 0.7)
    assert len(groups) > 20
    rec = M.shared_meta_ratio(codes, groups, W=W, n_boot=100, seed=1)
    assert rec.ratio > 3, rec  # the tautology: similar directions share codes
    assert 0.6 < rec.ratio_matched < 1.5, rec  # nothing beyond direction
    assert rec.matched_coverage > 0.9 and rec.mean_child_cos > 0.4
    # planted shared component beyond direction: siblings also share a private meta-latent
    extra_rows, extra_cols = [], []
    for p, kids_p in groups.items():
        for c in kids_p:
            extra_rows.append(c), extra_cols.append(40 + p)
    codes2 = M.MetaCodes(torch.cat([codes.rows, torch.tensor(extra_rows)]), torch.cat([codes.cols, torch.tensor(extra_cols)]),
                         torch.ones(codes.rows.numel() + len(extra_rows)), codes.n_latents, 40 + 60, "threshold")
    rec2 = M.shared_meta_ratio(codes2, groups, W=W, n_boot=100, seed=1)
    assert rec2.ratio_matched > 1.5 and rec2.ci_matched_low > 1.0, rec2
    # independent seeds give different random baselines
    rec3 = M.shared_meta_ratio(codes, groups, W=W, n_boot=10, seed=2)
    assert rec3.p_random != rec.p_random and rec3.seed == 2
    with pytest.raises(ValueError, match="rows"):
        M.shared_meta_ratio(codes, groups, W=W[:-1], n_boot=10)


def test_random_rows_matched_control_is_anisotropic():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(48, 48, generator=g)
    W = F.normalize(torch.randn(800, 48, generator=g) * torch.linspace(3, 0.05, 48) @ basis, dim=1)
    iso, mat = M.random_rows(W, "isotropic", seed=1), M.random_rows(W, "matched", seed=1)
    assert iso.shape == mat.shape == W.shape
    top = lambda X: torch.linalg.svdvals(X - X.mean(0))[0] ** 2 / (X - X.mean(0)).pow(2).sum()  # noqa: E731
    assert top(mat) > 2 * top(iso)  # the matched rows share the decoder's dominant directions
    assert abs(float(top(mat) - top(W))) < 0.25 * float(top(W))
    with pytest.raises(ValueError, match="isotropic"):
        M.random_rows(W, "other")
    r_iso = M.fve_control(W, kind="isotropic", d_meta=24, k=3, max_steps=60, min_steps=60, progress=False)
    r_mat = M.fve_control(W, kind="matched", d_meta=24, k=3, max_steps=60, min_steps=60, progress=False)
    assert r_mat.fve > r_iso.fve + 0.05, (r_mat, r_iso)
