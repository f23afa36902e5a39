"""Independent references for the formulas the book reports.

Every expected value here is a hand computation (small numbers worked out in comments) or a
brute-force loop written for the test: never a second call into a library path that shares the
formula under test. Tolerances are tight enough that the off-by-one versions (h vs h − 1, > vs
>=, a missing bias atom, an uncentred denominator, lr vs 1 − lr) fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saelib.analysis import afa
from saelib.sae.core import SAE, SAEConfig


pytestmark = pytest.mark.usefixtures("one_thread")


# ============================================================================ brute-force helpers


def brute_topafa(pre: np.ndarray, dn: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Top-AFA selection, one token at a time in plain Python floats (the paper's rule).

    Rank latents by (a_i·‖W_dec[i]‖)², descending, lower index first on ties; prefix norms
    c_j = sqrt(sum of the j+1 largest keys), the full prefix replaced by sqrt(1e8) (the paper's
    sentinel); keep the first argmin_j |c_j − target| + 1 latents, positive ones only."""
    n, h = pre.shape
    mask = np.zeros((n, h), dtype=bool)
    for t in range(n):
        keys = [(float(pre[t, i]) * float(dn[i])) ** 2 for i in range(h)]
        order = sorted(range(h), key=lambda i: (-keys[i], i))
        best_j, best_d, s = 0, math.inf, 0.0
        for j, i in enumerate(order):
            s += keys[i]
            c = math.sqrt(1e8) if j == h - 1 else math.sqrt(s)
            d = abs(c - float(target[t]))
            if d < best_d:
                best_j, best_d = j, d
        for i in order[: best_j + 1]:
            mask[t, i] = pre[t, i] > 0
    return mask


def brute_topk(pre: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(pre.shape, dtype=bool)
    for t in range(pre.shape[0]):
        for i in sorted(range(pre.shape[1]), key=lambda i: -pre[t, i])[:k]:
            mask[t, i] = pre[t, i] > 0
    return mask


def token_standardise(x: np.ndarray) -> np.ndarray:
    """The paper's per-token standardisation (x − mean) / (std + 1e-5), std with n − 1."""
    out = np.empty_like(x)
    d = x.shape[1]
    for t in range(x.shape[0]):
        m = sum(x[t]) / d
        sd = math.sqrt(sum((v - m) ** 2 for v in x[t]) / (d - 1))
        out[t] = (x[t] - m) / (sd + 1e-5)
    return out


def _sae_with_bias(activation: str, *, k: int | None = None, target: str = "paper", norm: str = "none",
                   d_in: int = 8, d_sae: int = 64, seed: int = 0) -> SAE:
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, k=k, afa_coeff=0.25, afa_target=target,
                    input_norm=norm, aux_k=0, seed=seed)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_dec.mul_(0.5 + 1.5 * torch.rand(d_sae, 1, generator=g))  # non-unit rows: scaling matters
        sae.b_dec.copy_(0.7 * torch.randn(d_in, generator=g))  # ‖b_dec‖ ~ 2: target modes differ
        if sae.cfg.use_b_enc:
            sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
    return sae


def _inputs(n: int = 24, d: int = 8, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 0.5


# ============================================================================ SAE losses

CASES = [
    ("topk", 2, True),  # k <= d_sae/16: the sparse training kernels
    ("topk", 16, False),  # dense path
    ("topafa", None, None),
    ("relu", None, None),
]


@pytest.mark.parametrize("target", ["paper", "consistent"])
@pytest.mark.parametrize("norm", ["none", "token"])
@pytest.mark.parametrize("activation,k,sparse", CASES)
@pytest.mark.parametrize("kernels", [True, False])
def test_losses_match_hand_formulas(activation, k, sparse, target, norm, kernels):
    sae = _sae_with_bias(activation, k=k, target=target, norm=norm)
    sae.sparse_kernels = kernels
    x = _inputs()
    out = sae.train()(x)

    X = x.double().numpy()
    Xn = token_standardise(X) if norm == "token" else X
    W_enc, W_dec = sae.W_enc.detach().double().numpy(), sae.W_dec.detach().double().numpy()
    b_dec, b_enc = sae.b_dec.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    pre = np.maximum((Xn - b_dec) @ W_enc + (b_enc if sae.cfg.use_b_enc else 0), 0)
    dn = np.sqrt((W_dec ** 2).sum(1))
    if activation == "topk":
        mask = brute_topk(pre, k)
    elif activation == "topafa":
        mask = brute_topafa(pre, dn, np.sqrt(((Xn - b_dec) ** 2).sum(1)))
    else:
        mask = pre > 0
    acts = pre * mask
    np.testing.assert_allclose(out.acts.detach().double().numpy(), acts, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.l0_tokens, torch.from_numpy(mask.sum(1)).long())

    x_hat_n = acts @ W_dec + b_dec
    mse = ((x_hat_n - Xn) ** 2).mean()
    if target == "paper":  # unscaled ‖f‖ against ‖x_n‖ (not ‖x_n − b_dec‖)
        afa_ref = ((np.sqrt((acts ** 2).sum(1)) - np.sqrt((Xn ** 2).sum(1))) ** 2).mean()
    else:  # decoder-scaled ‖f‖ against ‖x_n − b_dec‖
        afa_ref = ((np.sqrt(((acts * dn) ** 2).sum(1)) - np.sqrt(((Xn - b_dec) ** 2).sum(1))) ** 2).mean()
    l1 = sae.cfg.l1_coeff * (acts * dn).sum(1).mean()
    assert float(out.mse_loss.detach()) == pytest.approx(mse, rel=1e-5)
    assert float(out.afa_loss.detach()) == pytest.approx(afa_ref, rel=1e-5)
    assert float(out.l1_loss.detach()) == pytest.approx(l1, rel=1e-5, abs=1e-9)
    assert float(out.aux_loss.detach()) == 0.0
    assert float(out.loss.detach()) == pytest.approx(mse + 0.25 * afa_ref + l1, rel=1e-5)
    assert float(out.l0) == pytest.approx(mask.sum(1).mean(), rel=1e-6)
    if norm == "token":  # back to model space with the token's own mean and std (no eps)
        m = X.mean(1, keepdims=True)
        sd = X.std(1, ddof=1, keepdims=True)
        np.testing.assert_allclose(out.x_hat.detach().double().numpy(), x_hat_n * sd + m, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(out.x_hat.detach().double().numpy(), x_hat_n, rtol=1e-5, atol=1e-5)


def test_aux_loss_hand_formula():
    """aux = aux_coeff · mean over N·d of (e − r)², e decoding the top-aux_k dead pre-activations."""
    sae = _sae_with_bias("topk", k=2, d_sae=16)
    sae.cfg.aux_k, sae.cfg.aux_coeff, sae.cfg.dead_after_tokens = 3, 0.5, 10
    sae.sparse_kernels = False
    x = _inputs(n=12)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 5, 9, 12]] = True
    with torch.no_grad():
        sae.tokens_since_fired.copy_(torch.where(dead, 10**6, 0))
    sae.train()
    # which latents are dead after this batch's update: those that stay silent
    out = sae(x)
    dead_now = sae.dead_mask().numpy()
    X = x.double().numpy()
    W_enc, W_dec, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.W_dec, sae.b_dec))
    pre = np.maximum((X - b_dec) @ W_enc, 0)
    acts = pre * brute_topk(pre, 2)
    resid = X - (acts @ W_dec + b_dec)
    idx = np.flatnonzero(dead_now)
    assert len(idx) >= 3
    e = np.zeros_like(X)
    for t in range(X.shape[0]):
        top = sorted(idx, key=lambda i: -pre[t, i])[:3]
        for i in top:
            e[t] += pre[t, i] * W_dec[i]
    assert float(out.aux_loss.detach()) == pytest.approx(0.5 * ((e - resid) ** 2).mean(), rel=1e-5)
    assert int(out.n_dead) == len(idx)


def test_dead_latent_rule_boundary():
    """Dead once silent for dead_after_tokens tokens (>=): 5 + 5 tokens make 10 = dead_after_tokens."""
    sae = SAE(SAEConfig(d_in=4, d_sae=6, activation="topk", k=2, dead_after_tokens=10, aux_k=0, seed=0))
    with torch.no_grad():
        sae.W_enc[:, 3] = -100.0  # latent 3 never fires on positive inputs
        sae.W_enc[:, 0] = 100.0  # latent 0 always fires
    x = torch.rand(5, 4) + 0.1
    sae.train()
    out1 = sae(x)
    assert int(out1.n_dead) == 0 and int(sae.tokens_since_fired[3]) == 5
    assert int(sae.tokens_since_fired[0]) == 0
    out2 = sae(x)
    assert int(sae.tokens_since_fired[3]) == 10
    assert bool(sae.dead_mask()[3]) and not bool(sae.dead_mask()[0])
    assert int(out2.n_dead) == int((sae.tokens_since_fired >= 10).sum()) >= 1
    sae2 = SAE(SAEConfig(d_in=4, d_sae=6, activation="topk", k=2, dead_after_tokens=11, aux_k=0, seed=0))
    with torch.no_grad():
        sae2.W_enc.copy_(sae.W_enc)
    sae2.train()
    sae2(x)
    sae2(x)
    assert not bool(sae2.dead_mask()[3])  # 10 < 11


def test_trainer_dead_metric_boundary(tmp_path):
    """The trainer's ``dead`` metric: silent on the last dead_window_tokens tokens (>=)."""
    from saelib.pipeline import load_metrics
    from saelib.sae.train import TrainConfig, train_saes

    import copy

    cfg = SAEConfig(d_in=4, d_sae=6, activation="topk", k=1, aux_k=0, seed=0, hook_name="h")
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = 1.0  # only latent 0 ever fires: 5 latents dead
    frozen = copy.deepcopy(sae).eval()  # lr = 1e-9: the trained SAE stays this one to ~1e-9
    x = torch.rand(20, 4) + 0.5  # batches of 5 tokens (not d_in = 4: tokens, not widths, are counted)
    batches = ({"h": x[i * 5:(i + 1) * 5]} for i in range(4))
    tc = TrainConfig(batch_size=5, n_tokens=20, lr=1e-9, log_every=2, dead_window_tokens=10,
                     progress=False, out_dir=tmp_path)
    train_saes({"s": sae}, batches, tc)
    recs = load_metrics(tmp_path, as_frame=False)["s"]
    assert [r["step"] for r in recs] == [2, 4]
    assert recs[0]["dead"] == 5 and recs[1]["dead"] == 5  # 10 tokens seen = the window: counted
    # every token has L0 = k = 1: the per-token L0 histogram puts all quantiles at 1
    assert [recs[1][k] for k in ("l0_p10", "l0_p50", "l0_p90", "l0_max")] == [1, 1, 1, 1]
    assert recs[1]["dead_frac"] == pytest.approx(5 / 6)
    # NMSE: mean over the window's 10 tokens; FVU: summed error over the window's tokens / their
    # summed squared distance to the window's mean (not a mean of per-batch FVUs)
    xw = x[:10].double()
    with torch.no_grad():
        xh = frozen.reconstruct(x[:10]).double()
    err = ((xw - xh) ** 2).sum(1)
    assert recs[0]["fvu"] == pytest.approx(float(err.sum() / ((xw - xw.mean(0)) ** 2).sum()), rel=1e-4)
    assert recs[0]["nmse"] == pytest.approx(float((err / (xw ** 2).sum(1)).mean()), rel=1e-4)
    per_batch_fvu = sum(float(err[i:i + 5].sum() / ((xw[i:i + 5] - xw[i:i + 5].mean(0)) ** 2).sum()) for i in (0, 5)) / 2
    assert abs(recs[0]["fvu"] - per_batch_fvu) > 1e-3 * per_batch_fvu  # the two definitions differ here
    tc2 = TrainConfig(batch_size=5, n_tokens=20, lr=1e-9, log_every=2, dead_window_tokens=11,
                      progress=False, out_dir=tmp_path / "b")
    sae2 = SAE(cfg)
    with torch.no_grad():
        sae2.W_enc.zero_()
        sae2.W_enc[:, 0] = 1.0
    train_saes({"s": sae2}, ({"h": x[i * 5:(i + 1) * 5]} for i in range(4)), tc2)
    recs2 = load_metrics(tmp_path / "b", as_frame=False)["s"]
    assert recs2[0]["dead"] is None and recs2[1]["dead"] == 5  # 10 < 11 tokens: not yet counted


# ============================================================================ BatchTopK threshold


@pytest.mark.parametrize("lr", [0.3, 0.05])
def test_batchtopk_threshold_converges_to_the_known_cut(lr):
    """θ ← θ + lr·(m − θ) with m the smallest kept activation; m is 2.0 on every batch after
    the first (5.0), so θ_t = 2 + 3·(1 − lr)^t exactly, and θ → 2."""
    sae = SAE(SAEConfig(d_in=4, d_sae=4, activation="batchtopk", k=1, threshold_lr=lr, aux_k=0, seed=0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.b_dec.zero_()
    first = torch.tensor([[5.0, 0, 0, 0], [0, 9.0, 0, 0]])  # batch top-2 keeps 9 and 5: cut 5
    later = torch.tensor([[2.0, 1.0, 0, 0], [0, 0, 3.0, 1.5]])  # keeps 3 and 2: cut 2
    sae.train()
    sae(first)
    assert float(sae.threshold) == pytest.approx(5.0)
    steps = 200
    for t in range(1, steps + 1):
        sae(later)
        if t in (1, 2, 10):
            assert float(sae.threshold) == pytest.approx(2 + 3 * (1 - lr) ** t, rel=1e-5), t
    assert float(sae.threshold) == pytest.approx(2.0, abs=1e-3)
    # eval mode uses θ: pre > θ
    sae.eval()
    acts = sae.encode(torch.tensor([[2.5, 1.9, 0.0, 7.0]]))
    assert acts.tolist() == [[2.5, 0.0, 0.0, 7.0]]


def test_batchtopk_threshold_on_random_batches():
    """Batches whose k·B-th largest activation is known: the EMA settles at the batch cut."""
    sae = SAE(SAEConfig(d_in=8, d_sae=8, activation="batchtopk", k=2, threshold_lr=0.2, aux_k=0, seed=0))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
    sae.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        # each row: two values above 1 (kept), the rest in (0, 0.5); cut = min of the kept ones
        x = torch.rand(16, 8, generator=g) * 0.5
        cols = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(16)])
        x.scatter_(1, cols, 1.0 + torch.rand(16, 2, generator=g))
        x[0, cols[0, 0]] = 1.0  # the batch cut is exactly 1.0
        sae(x)
    assert float(sae.threshold) == pytest.approx(1.0, abs=1e-6)


# ============================================================================ f̃ and ZF statistics


def test_zf_stats_with_bias_hand_computed():
    # W rows ‖·‖ = 5, 1, 2; b = (1, 2), ‖b‖² = 5
    W = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([1.0, 2.0])
    acts = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    z = torch.tensor([[4.0, 9.0], [3.0, 0.0]])
    ft = afa.f_tilde(acts, W, b)
    torch.testing.assert_close(ft, torch.tensor([[5.0, 0.0, 4.0, math.sqrt(5)], [0.0, 0.0, 0.0, math.sqrt(5)]]))
    torch.testing.assert_close(afa.f_tilde_sq_norm(acts, W, b), torch.tensor([46.0, 5.0]))
    s = afa.zf_stats(z, acts, W, b)
    # token 0: ‖f̃‖² = 25 + 16 + 5 = 46; ẑ = (3,4) + 2·(0,2) + (1,2) = (4, 10); ‖z‖² = 97
    # token 1: ‖f̃‖² = 5 (bias atom only); ẑ = b = (1, 2); ‖z‖² = 9
    torch.testing.assert_close(s.norm_f, torch.tensor([math.sqrt(46), math.sqrt(5)]))
    torch.testing.assert_close(s.norm_z, torch.tensor([math.sqrt(97), 3.0]))
    torch.testing.assert_close(s.norm_z_hat, torch.tensor([math.sqrt(116), math.sqrt(5)]))
    torch.testing.assert_close(s.ratio, torch.tensor([math.sqrt(46 / 97), math.sqrt(5) / 3]))
    torch.testing.assert_close(s.ratio_hat, torch.tensor([math.sqrt(46 / 116), 1.0]))
    torch.testing.assert_close(s.nmse, torch.tensor([1 / 97, 8 / 9]))  # ‖(0,−1)‖², ‖(2,−2)‖²
    # εLBO with h − 1 = 2 in the denominator
    torch.testing.assert_close(s.eps_lbo, torch.tensor([51 / (2 * 46), 4 / (2 * 5)]))
    torch.testing.assert_close(s.eps_lbo_hat, torch.tensor([70 / (2 * 46), 0.0]))
    torch.testing.assert_close(s.eps_lbo_recon, torch.tensor([19 / (2 * 46), 4 / (2 * 5)]))
    assert s.l0.tolist() == [2.0, 0.0]
    l1 = 5 + 4 + math.sqrt(5)
    torch.testing.assert_close(s.k_eff, torch.tensor([l1 ** 2 / 46, 1.0]))
    # coherence: (‖ẑ‖² − ‖f̃‖²) / (‖f̃‖₁² − ‖f̃‖₂²); one atom only → NaN
    assert float(s.coherence[0]) == pytest.approx(70 / (l1 ** 2 - 46), rel=1e-5)
    assert math.isnan(float(s.coherence[1]))
    assert s.h == 3


def test_coherence_is_the_weighted_mean_cosine_brute_force():
    """ρ = Σ_{i≠j} f̃_i f̃_j cos(a_i, a_j) / Σ_{i≠j} |f̃_i f̃_j| over the unit atoms, pair by pair."""
    g = torch.Generator().manual_seed(3)
    h, d = 12, 5
    W = torch.randn(h, d, generator=g, dtype=torch.float64) * (0.5 + torch.rand(h, 1, generator=g, dtype=torch.float64))
    b = torch.randn(d, generator=g, dtype=torch.float64)
    acts = torch.relu(torch.randn(6, h, generator=g, dtype=torch.float64))
    acts[0] = 0
    acts[0, 0], acts[0, 1] = 50.0, 0.1  # one dominant atom: K_eff < 2, still a defined ρ
    s = afa.zf_stats(acts @ W + b, acts, W, b)
    assert float(s.k_eff[0]) < 2 and not math.isnan(float(s.coherence[0]))
    # ratios of norms do not depend on the scale of the code (tiny codes included)
    tiny = afa.zf_stats((acts @ W + b) * 1e-6, acts * 1e-6, W, b * 1e-6)
    torch.testing.assert_close(tiny.coherence, s.coherence, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(tiny.k_eff, s.k_eff, rtol=1e-4, atol=0)
    atoms = [W[i] / W[i].norm() for i in range(h)] + [b / b.norm()]
    for t in range(acts.shape[0]):
        f = [float(acts[t, i] * W[i].norm()) for i in range(h)] + [float(b.norm())]
        num = den = 0.0
        for i in range(h + 1):
            for j in range(h + 1):
                if i != j:
                    num += f[i] * f[j] * float(atoms[i] @ atoms[j])
                    den += abs(f[i] * f[j])
        assert float(s.coherence[t]) == pytest.approx(num / den, rel=1e-3, abs=1e-5)
        f1, f2 = sum(abs(v) for v in f), sum(v * v for v in f)
        assert float(s.k_eff[t]) == pytest.approx(f1 * f1 / f2, rel=1e-5)
        # and the exact identity ‖f̃‖/‖ẑ‖ = 1/sqrt(1 + ρ(k_eff − 1)) with the brute-force ρ
        assert float(s.ratio_hat[t]) == pytest.approx(1 / math.sqrt(1 + num / den * (f1 * f1 / f2 - 1)), rel=1e-4)


# ============================================================================ Welch, εLBO


def _simplex(d: int) -> torch.Tensor:
    """d + 1 unit vectors in R^d with pairwise cosine −1/d (the regular simplex, an ETF)."""
    E = torch.eye(d + 1, dtype=torch.float64) - 1.0 / (d + 1)  # centred basis: rows span a d-dim subspace
    Q, _ = torch.linalg.qr(E[:, :d])  # orthonormal basis of that subspace
    U = E @ Q
    return U / U.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("d", [2, 3, 5, 9])
def test_welch_bound_is_met_by_the_simplex(d):
    """Equiangular tight frames meet the Welch bound: the simplex (h = d + 1) has coherence 1/d.
    (With h in place of h − 1 the bound would be 1/sqrt(d(d+1)), below what the frame reaches.)"""
    U = _simplex(d)
    eps = afa.epsilon(U)
    assert eps.max == pytest.approx(1 / d, abs=1e-6)
    assert afa.welch_bound(d + 1, d) == pytest.approx(1 / d, rel=1e-12)
    assert afa.welch_bound(d + 1, d) == pytest.approx(eps.max, abs=1e-6)


def test_welch_bound_hand_values():
    # sqrt((h − d)/(d(h − 1))): h = 3, d = 2 → 1/2 (the "Mercedes" frame); h = 6, d = 3 → sqrt(3/15)
    assert afa.welch_bound(3, 2) == pytest.approx(0.5, rel=1e-12)
    assert afa.welch_bound(6, 3) == pytest.approx(math.sqrt(1 / 5), rel=1e-12)
    assert afa.welch_bound(12288, 768) == pytest.approx(math.sqrt(11520 / (768 * 12287)), rel=1e-12)
    assert afa.welch_bound(4, 4) == 0.0


def test_eps_lbo_uses_h_minus_one():
    # |9 − 4| / ((3 − 1)·4) = 5/8
    assert float(afa.eps_lbo([3.0], [2.0], 3)[0]) == pytest.approx(5 / 8, rel=1e-6)


# ============================================================================ evaluation metrics


class TableSAE(torch.nn.Module):
    """encode(x) looks the code up by token id (stored in x[:, 0]); decode = acts @ W + b."""

    def __init__(self, codes: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.codes, self.W_dec, self.b_dec = codes, W, b

    def encode(self, x):
        return self.codes[x[:, 0].round().long()]

    def decode(self, acts):
        return acts @ self.W_dec + self.b_dec


def _table_setup():
    g = torch.Generator().manual_seed(5)
    n, d, h = 20, 6, 8
    x = torch.randn(n, d, generator=g) + 0.7
    x[:, 0] = torch.arange(n, dtype=torch.float32)
    codes = torch.zeros(n, h)
    codes[:, 0] = 1.0 + torch.rand(n, generator=g)  # latent 0: every token (dense)
    codes[:2, 1] = 0.5  # latent 1: exactly 10% of tokens (not dense: > 0.1 is)
    codes[:3, 2] = 0.8  # latent 2: 15% (dense)
    codes[7, 3] = 0.3  # latent 3: one token (alive)
    codes[5:15, 4] = torch.rand(10, generator=g) + 0.1
    # latents 5, 6, 7 never fire: dead
    W = torch.randn(h, d, generator=g) * 0.5
    b = torch.randn(d, generator=g) * 0.3
    return x, codes, W, b


def test_reconstruction_metrics_hand_computed():
    from saelib.analysis.evaluate import reconstruction_metrics

    x, codes, W, b = _table_setup()
    r = reconstruction_metrics(TableSAE(codes, W, b), x, batch_size=3)  # 7 uneven batches
    m = r.metrics
    Z = x.double().numpy()
    Zh = (codes.double() @ W.double() + b.double()).numpy()
    n, d = Z.shape
    err = [sum((Z[t, j] - Zh[t, j]) ** 2 for j in range(d)) for t in range(n)]
    zsq = [sum(Z[t, j] ** 2 for j in range(d)) for t in range(n)]
    hsq = [sum(Zh[t, j] ** 2 for j in range(d)) for t in range(n)]
    dot = [sum(Z[t, j] * Zh[t, j] for j in range(d)) for t in range(n)]
    mean = [sum(Z[t, j] for t in range(n)) / n for j in range(d)]
    tot = sum((Z[t, j] - mean[j]) ** 2 for t in range(n) for j in range(d))
    assert m["fvu"] == pytest.approx(sum(err) / tot, rel=1e-6)
    assert m["explained_variance"] == pytest.approx(1 - sum(err) / tot, rel=1e-6)
    assert m["mse"] == pytest.approx(sum(err) / (n * d), rel=1e-6)
    nm = sorted(e / s for e, s in zip(err, zsq))
    assert m["nmse"] == pytest.approx(sum(nm) / n, rel=1e-6)
    assert m["nmse_median"] == pytest.approx((nm[9] + nm[10]) / 2, rel=1e-6)
    assert m["cosine"] == pytest.approx(sum(dt / math.sqrt(a * c) for dt, a, c in zip(dot, zsq, hsq)) / n, rel=1e-6)
    assert m["l2_ratio"] == pytest.approx(sum(math.sqrt(c / a) for a, c in zip(zsq, hsq)) / n, rel=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(sum(hsq) / sum(dot), rel=1e-6)
    l0 = [int((codes[t] != 0).sum()) for t in range(n)]
    mu = sum(l0) / n
    assert m["l0"] == pytest.approx(mu)
    assert m["l0_std"] == pytest.approx(math.sqrt(sum((v - mu) ** 2 for v in l0) / n), rel=1e-6)
    assert m["l0_median"] == sorted(l0)[9] == sorted(l0)[10]
    assert m["dead"] == 3 and m["dead_frac"] == pytest.approx(3 / 8)
    assert m["dense"] == 3  # latents 0 (100%), 2 (15%), 4 (50%); latent 1 sits at 10%: not dense
    assert m["n_tokens"] == 20
    np.testing.assert_allclose(r.latent_freq, [1.0, 0.1, 0.15, 0.05, 0.5, 0, 0, 0], rtol=1e-6)
    # ZF: ‖f̃‖² = Σ (f_i ‖W_i‖)² + ‖b‖² per token, in plain loops
    nf = [math.sqrt(sum((float(codes[t, i]) * float(W[i].norm())) ** 2 for i in range(8)) + float(b @ b))
          for t in range(n)]
    ratio = [f / math.sqrt(a) for f, a in zip(nf, zsq)]
    lbo = sorted(abs(a - f * f) / (7 * f * f) for a, f in zip(zsq, nf))
    assert m["zf_ratio_median"] == pytest.approx(float(np.median(ratio)), rel=1e-5)
    assert m["zf_frac_over"] == pytest.approx(sum(v > 1 for v in ratio) / n)
    assert 0 < m["zf_frac_over"] < 1  # both sides occur, so the count is informative
    assert m["eps_lbo_median"] == pytest.approx((lbo[9] + lbo[10]) / 2, rel=1e-5)


def _tiny():
    from saelib.lm.models import load_model

    return load_model("tiny-gpt2", device="cpu")


def test_ce_recovered_and_kl_score_brute_force():
    """Splice by hand with run_with_hooks and compute CE, KL and the derived scores per token."""
    from saelib.analysis.evaluate import evaluate_sae

    model = _tiny()
    hook = "blocks.2.hook_resid_pre"
    d = model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, 2000, (3, 10), generator=g)
    toks[:, 0] = model.tokenizer.bos_token_id or 1
    sae = SAE(SAEConfig(d_in=d, d_sae=128, activation="topk", k=8, hook_name=hook, seed=3)).eval()
    mean_act = torch.randn(d, generator=g)
    r = evaluate_sae(sae, model, toks, batch_size=2, mean_act=mean_act, progress=False, zf=False)

    def run(kind):
        def fn(act, hook=None):
            out = act.clone()
            if kind == "zero":
                out[:, 1:] = 0
            elif kind == "mean":
                out[:, 1:] = mean_act
            elif kind == "sae":
                z = act[:, 1:].reshape(-1, d)
                out[:, 1:] = sae.decode(sae.encode(z)).reshape(act.shape[0], -1, d)
            return out

        with torch.no_grad():
            logits = model.run_with_hooks(toks, fwd_hooks=[(hook, fn)], return_type="logits")
        return torch.log_softmax(logits.double(), -1)[:, 1:-1]  # predictions from non-BOS positions

    lp = {k: run(k) for k in ("clean", "zero", "mean", "sae")}
    tgt = toks[:, 2:]
    ce = {k: float(-v.gather(-1, tgt[..., None]).mean()) for k, v in lp.items()}
    kl = {k: float((lp["clean"].exp() * (lp["clean"] - v)).sum(-1).mean()) for k, v in lp.items()}
    m = r.metrics
    assert m["ce_clean"] == pytest.approx(ce["clean"], rel=1e-4)
    assert m["ce_sae"] == pytest.approx(ce["sae"], rel=1e-4)
    assert m["ce_zero_abl"] == pytest.approx(ce["zero"], rel=1e-4)
    assert m["ce_mean_abl"] == pytest.approx(ce["mean"], rel=1e-4)
    assert m["kl_sae"] == pytest.approx(kl["sae"], rel=1e-3, abs=1e-6)
    assert m["kl_zero_abl"] == pytest.approx(kl["zero"], rel=1e-3)
    rec0 = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"])
    rec_m = (ce["mean"] - ce["sae"]) / (ce["mean"] - ce["clean"])
    assert m["ce_recovered_zero"] == pytest.approx(rec0, rel=1e-3, abs=1e-4)
    assert m["ce_recovered_mean"] == pytest.approx(rec_m, rel=1e-3, abs=1e-4)
    assert m["kl_score"] == pytest.approx((kl["zero"] - kl["sae"]) / kl["zero"], rel=1e-3, abs=1e-4)
    assert 0.0 < kl["sae"] < kl["zero"]  # a non-trivial score
    per_tok = (lp["clean"].exp() * (lp["clean"] - lp["sae"])).sum(-1).reshape(-1)
    np.testing.assert_allclose(np.sort(r.kl), np.sort(per_tok.clamp_min(0).float().numpy()), rtol=1e-3, atol=1e-6)


# ============================================================================ meta-SAE FVE


def test_meta_fve_hand_formula():
    """FVE = 1 − Σ‖d − d̂‖² / Σ‖d − d̄‖², centred: rows sharing one direction make d̄ large."""
    from saelib.analysis import meta as M

    g = torch.Generator().manual_seed(0)
    n, dm, m = 60, 10, 16
    u = torch.randn(dm, generator=g)
    rows = 3 * u / u.norm() + 0.6 * torch.randn(n, dm, generator=g)  # strong common component
    sae = SAE(SAEConfig(d_in=dm, d_sae=m, activation="batchtopk", k=3, seed=1))
    with torch.no_grad():
        sae.b_dec.copy_(0.2 * torch.randn(dm, generator=g))
        sae.threshold.fill_(0.05)
    meta = sae.eval()
    res = M.fve(meta, rows, "threshold")
    X = (rows / rows.norm(dim=1, keepdim=True)).double().numpy()  # normalize_rows=True
    W_enc, W_dec, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.W_dec, sae.b_dec))
    pre = np.maximum((X - b_dec) @ W_enc, 0)
    codes = np.where(pre > 0.05, pre, 0)
    Xh = codes @ W_dec + b_dec
    err = ((X - Xh) ** 2).sum()
    centred = ((X - X.mean(0)) ** 2).sum()
    assert res.fve == pytest.approx(1 - err / centred, rel=1e-4, abs=1e-5)
    assert abs((1 - err / (X ** 2).sum()) - (1 - err / centred)) > 0.1  # the uncentred version differs
    assert res.l0 == pytest.approx((codes > 0).sum(1).mean(), rel=1e-6)
    assert res.dead_fraction == pytest.approx(((codes > 0).sum(0) == 0).mean())
    assert res.mode == "threshold" and res.threshold == pytest.approx(0.05)  # the meta-SAE's own threshold
    assert M.fve(meta, rows, "threshold", threshold=0.2).threshold == 0.2
    assert M.fve(meta, rows, "batch").threshold is None


# ============================================================================ schedule


def test_lr_at_hand_values():
    """10 steps, warm-up 3, decay 4 to 0: 1/3, 2/3, 1, 1, 1, 1, 3/4, 1/2, 1/4, 0."""
    from saelib.sae.train import TrainConfig

    tc = TrainConfig(batch_size=1, n_tokens=10, lr=1.0, warmup_steps=3, decay_steps=4, lr_end_factor=0.0,
                     progress=False)
    got = [tc.lr_at(s) for s in range(10)]
    assert got == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0.0], abs=1e-12)
    tc2 = TrainConfig(batch_size=2, n_tokens=20, lr=2.0, warmup_steps=0, decay_steps=2, lr_end_factor=0.5,
                      progress=False)
    assert [tc2.lr_at(s) for s in range(10)] == pytest.approx([2.0] * 8 + [1.5, 1.0], abs=1e-12)
    tc3 = TrainConfig(batch_size=1, n_tokens=5, lr=0.3, warmup_steps=5, progress=False)
    assert [tc3.lr_at(s) for s in range(5)] == pytest.approx([0.06, 0.12, 0.18, 0.24, 0.3], abs=1e-12)
    assert TrainConfig(batch_size=1, n_tokens=5, lr=0.3, progress=False).lr_at(4) == 0.3


def test_trainer_applies_the_schedule(tmp_path):
    """The optimiser steps with lr_at(step): 4 steps, warm-up 2, decay 1 → 0.2, 0.4, 0.4, 0."""
    from saelib.sae.train import TrainConfig, train_saes

    cfg = SAEConfig(d_in=4, d_sae=8, activation="topk", k=2, aux_k=0, seed=0, hook_name="h")
    x = torch.randn(8, 4)
    seen = []
    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.Adam.step = spy
    try:
        tc = TrainConfig(batch_size=2, n_tokens=8, lr=0.4, warmup_steps=2, decay_steps=1, progress=False)
        train_saes({"s": cfg}, ({"h": x[i * 2:(i + 1) * 2]} for i in range(4)), tc)
    finally:
        torch.optim.Adam.step = orig
    assert seen == pytest.approx([0.2, 0.4, 0.4, 0.0])


# ============================================================================ batch order and seeds


def test_tensor_batches_seed_changes_order_and_epochs_are_permutations():
    from saelib.lm.activations import tensor_batches

    x = torch.arange(40, dtype=torch.float32)[:, None]
    a = [b[:, 0].long().tolist() for b in tensor_batches(x, 8, seed=0, epochs=2)]
    b = [b[:, 0].long().tolist() for b in tensor_batches(x, 8, seed=1, epochs=2)]
    a2 = [b[:, 0].long().tolist() for b in tensor_batches(x, 8, seed=0, epochs=2)]
    assert a == a2
    assert a[0] != b[0] and a[5] != b[5]
    for run in (a, b):
        first, second = sum(run[:5], []), sum(run[5:], [])
        assert sorted(first) == sorted(second) == list(range(40))  # each epoch: a permutation
        assert first != second  # and a fresh one
    plain = [b[:, 0].long().tolist() for b in tensor_batches(x, 8, shuffle=False)]
    assert sum(plain, []) == list(range(40))
    three = [b[:, 0].long().tolist() for b in tensor_batches(x, 40, seed=0, epochs=3)]
    assert len({tuple(e) for e in three}) == 3  # every epoch draws a permutation of its own
    ones = [b[:, 0].long().tolist() for b in tensor_batches(x, 1, seed=3)]  # batch size 1 is valid
    assert len(ones) == 40 and sorted(sum(ones, [])) == list(range(40))


def test_iter_batches_seed_changes_batches(tmp_path):
    from saelib.lm.cache import ActivationCache

    model = _tiny()
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, 2000, (4, 9), generator=g)
    toks[:, 0] = model.tokenizer.bos_token_id or 1
    hook = "blocks.1.hook_resid_pre"
    cache = ActivationCache.build(tmp_path / "c", model, toks, hook, shard_tokens=10, progress=False)
    full = cache.load(hook)
    assert full.shape[0] == 32  # BOS dropped: 4 rows x 8 tokens

    def ids(seed):
        out = []
        for bt in cache.iter_batches(hook, 8, seed=seed):
            rows = [int(((full - r).abs().sum(1) == 0).nonzero()[0]) for r in bt[hook]]
            out.append(sorted(rows))
        return out

    moved = next(cache.iter_batches(hook, 8, seed=0, device="meta"))[hook]  # device= is honoured
    assert moved.device.type == "meta" and moved.shape == (8, full.shape[1])
    s0, s1 = ids(0), ids(1)
    assert s0 == ids(0)
    assert s0 != s1
    assert sorted(sum(s0, [])) == sorted(sum(s1, [])) == list(range(32))


# ============================================================================ stitching bookkeeping


def test_insertion_result_reports_both_saes_by_hand():
    """mse_small/large and l0_small/large of insertion_delta_mse, against encode/decode by hand."""
    from saelib.analysis.stitching import insertion_delta_mse

    g = torch.Generator().manual_seed(2)
    small = SAE(SAEConfig(d_in=6, d_sae=8, activation="relu", seed=1))
    large = SAE(SAEConfig(d_in=6, d_sae=16, activation="relu", seed=2))
    with torch.no_grad():
        for s in (small, large):
            s.b_enc.copy_(0.1 * torch.randn(s.cfg.d_sae, generator=g))
            s.b_dec.copy_(0.2 * torch.randn(6, generator=g))
    x = torch.randn(50, 6, generator=g)
    res = insertion_delta_mse(small, large, x, chunk_tokens=16)
    for sae, mse, l0 in ((small, res.mse_small, res.l0_small), (large, res.mse_large, res.l0_large)):
        with torch.no_grad():
            a = sae.encode(x)
            err = ((x - (a @ sae.W_dec + sae.b_dec)) ** 2).double()
        assert mse == pytest.approx(float(err.sum() / (50 * 6)), rel=1e-5)
        assert l0 == pytest.approx(float((a > 0).sum()) / 50, rel=1e-9)
    assert res.n_tokens == 50 and 0 < res.l0_small < res.l0_large


# ============================================================================ error paths in scope


def test_epsilon_and_f_tilde_flags_and_shape_errors():
    W = torch.randn(5, 3)
    assert afa.epsilon(W).exact is True and afa.epsilon(W, exact=False, n_pairs=10).exact is False
    with pytest.raises(ValueError, match="acts must be"):
        afa.f_tilde(torch.zeros(2, 4), W)  # 2-D but 4 latents for a 5-row decoder
    with pytest.raises(ValueError, match="acts must be"):
        afa.f_tilde(torch.zeros(5), W)  # 1-D
