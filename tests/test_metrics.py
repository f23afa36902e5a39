"""ReconstructionMetrics: every metric equals a direct computation on the concatenated data,
for any batch split."""

import numpy as np
import pytest
import torch

from saelib.sae.metrics import ReconstructionMetrics


def _data(n=203, d=6, m=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 5  # far from zero mean: a naive variance would cancel
    acts = torch.relu(torch.randn(n, m, generator=g) - 0.8)
    acts[:, 3] = 0  # one dead latent
    acts[:, 4] = 1.0  # one dense latent
    x_hat = x + 0.3 * torch.randn(n, d, generator=g)
    return x, x_hat, acts


def _direct(x, x_hat, acts):
    x, h = x.double(), x_hat.double()
    err = ((x - h) ** 2).sum(1)
    l0 = (acts != 0).sum(1).numpy()
    freq = (acts != 0).double().mean(0)
    return {
        "nmse": float((err / (x ** 2).sum(1)).mean()),
        "fvu": float(err.sum() / ((x - x.mean(0)) ** 2).sum()),
        "mse": float(err.sum() / x.numel()),
        "cosine": float(torch.nn.functional.cosine_similarity(x, h, dim=1).mean()),
        "l2_ratio": float((h.norm(dim=1) / x.norm(dim=1)).mean()),
        "relative_reconstruction_bias": float((h ** 2).sum() / (x * h).sum()),
        "l0": float(l0.mean()), "l0_std": float(l0.std()), "l0_median": float(np.median(l0)),
        "l0_min": int(l0.min()), "l0_max": int(l0.max()),
        "dead": int((freq == 0).sum()), "dead_frac": float((freq == 0).double().mean()),
        "dense": int((freq > 0.1).sum()),
        "nmse_median": float(np.median((err / (x ** 2).sum(1)).numpy())),
    }


@pytest.mark.parametrize("splits", [[203], [1, 202], [7] * 29, [100, 3, 50, 50]])
def test_exact_for_any_batch_split(splits):
    x, x_hat, acts = _data()
    want = _direct(x, x_hat, acts)
    m = ReconstructionMetrics(keep_tokens=True)
    s = 0
    for b in splits:
        m.add(x[s:s + b], x_hat[s:s + b], acts[s:s + b])
        s += b
    got = m.result()
    assert got["n_tokens"] == 203
    whole = ReconstructionMetrics(keep_tokens=True)
    whole.add(x, x_hat, acts)
    for k, v in whole.result().items():  # the split changes only float32 rounding of each batch's centring
        assert got[k] == pytest.approx(v, rel=1e-7, abs=1e-15), k
    for k, v in want.items():  # per-row reductions run in the inputs' float32
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-12), k
    assert got["explained_variance"] == pytest.approx(1 - want["fvu"], rel=1e-6)
    l0 = (acts != 0).sum(1).numpy()
    for q in (10, 50, 90):  # inverse CDF: smallest value with at least q% of rows at or below
        assert got[f"l0_p{q}"] == int(np.quantile(l0, q / 100, method="inverted_cdf"))
    tok = m.tokens()
    assert np.array_equal(tok["l0"], l0) and tok["nmse"].shape == (203,)
    assert sum(m.l0_hist()) == 203 and len(m.l0_hist()) == l0.max() + 1
    assert torch.allclose(m.latent_freq, (acts != 0).double().mean(0))


def test_l0_and_fired_without_dense_codes_and_loss():
    x, x_hat, acts = _data()
    m = ReconstructionMetrics(d_sae=11)
    for s in range(0, 203, 50):
        a = acts[s:s + 50]
        m.add(x[s:s + 50], x_hat[s:s + 50], l0=(a != 0).sum(1), fired=(a != 0).any(0), loss=torch.tensor(2.0))
    r, want = m.result(), _direct(x, x_hat, acts)
    assert r["l0"] == pytest.approx(want["l0"]) and r["dead"] == 1 and "dense" not in r
    assert r["mse_loss"] == pytest.approx(2.0)


def test_bad_input_and_non_finite_are_errors():
    m = ReconstructionMetrics()
    with pytest.raises(ValueError, match="no rows"):
        m.result()
    with pytest.raises(ValueError, match="d_sae="):
        m.add(torch.ones(2, 3), torch.ones(2, 3), l0=torch.ones(2))
    m = ReconstructionMetrics()
    m.add(torch.ones(2, 3), torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        m.result()
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        m.add(torch.ones(2, 3), torch.ones(2, 4))


def test_state_dict_round_trip_is_bit_exact():
    x, x_hat, acts = _data()
    whole = ReconstructionMetrics()
    first = ReconstructionMetrics()
    for s in range(0, 203, 40):
        whole.add(x[s:s + 40], x_hat[s:s + 40], acts[s:s + 40])
        if s < 80:
            first.add(x[s:s + 40], x_hat[s:s + 40], acts[s:s + 40])
    resumed = ReconstructionMetrics()
    resumed.load_state_dict(torch.load(_roundtrip(first.state_dict()), weights_only=True))
    for s in range(80, 203, 40):
        resumed.add(x[s:s + 40], x_hat[s:s + 40], acts[s:s + 40])
    assert resumed.result() == whole.result()
    with pytest.raises(ValueError, match="keep_tokens"):
        ReconstructionMetrics(keep_tokens=True).state_dict()


def _roundtrip(state):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("n", [11, 10])  # odd and even: the median is one order statistic or two
def test_l0_statistics_on_distinct_values_and_tiny_norms(n):
    """Every L0 value 0..n-1 once (no ties hide an off-by-one) and rows of norm << 1 (no clamp
    may touch a real norm)."""
    acts = (torch.arange(12)[None, :] < torch.arange(n)[:, None]).float()  # row r: r active latents
    x = 1e-3 * torch.randn(n, 5, generator=torch.Generator().manual_seed(1))
    x_hat = 0.5 * x
    m = ReconstructionMetrics(keep_tokens=True)
    m.add(x[:3], x_hat[:3], acts[:3])
    m.add(x[3:], x_hat[3:], acts[3:])
    r, l0 = m.result(), np.arange(n)
    assert r["l0_median"] == np.median(l0) and r["l0_std"] == pytest.approx(l0.std())
    assert (r["l0_min"], r["l0_max"]) == (0, n - 1)
    for q in (10, 50, 90):
        assert r[f"l0_p{q}"] == int(np.quantile(l0, q / 100, method="inverted_cdf"))
    assert r["nmse"] == pytest.approx(0.25) and r["nmse_median"] == pytest.approx(0.25)
    assert r["l2_ratio"] == pytest.approx(0.5) and r["cosine"] == pytest.approx(1.0)
    assert r["relative_reconstruction_bias"] == pytest.approx(0.5)


def test_constant_rows_have_no_variance_so_fvu_is_nan():
    m = ReconstructionMetrics()
    m.add(torch.ones(4, 3), torch.zeros(4, 3))
    r = m.result()
    assert np.isnan(r["fvu"]) and r["nmse"] == 1.0 and r["mse"] == 1.0


def test_shape_false_keeps_error_and_sparsity_and_drops_the_shape_metrics():
    x, x_hat, acts = _data()
    full, lean = ReconstructionMetrics(), ReconstructionMetrics(shape=False)
    full.add(x, x_hat, acts)
    lean.add(x, x_hat, acts)
    f, s = full.result(), lean.result()
    assert not {"cosine", "l2_ratio", "relative_reconstruction_bias"} & set(s)
    assert {k: f[k] for k in s} == s  # the same numbers for every metric it keeps
    with pytest.raises(ValueError, match="shape=True"):
        ReconstructionMetrics(keep_tokens=True, shape=False)
