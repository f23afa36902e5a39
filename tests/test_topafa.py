"""Top-AFA selection: the paper's toy example, invariants, and fast == reference masks."""
import pytest
import torch

from saelib.sae.topafa import topafa_select, topafa_select_reference

BOTH = [topafa_select_reference, topafa_select]


def _toy():
    acts = torch.tensor([[5.0, 4, 3], [1, 1, 1], [1, 10, 2]])
    D = torch.tensor([[1.0, 2], [3, 4], [5, 6]])
    return acts, D


@pytest.mark.parametrize("fn", BOTH)
def test_paper_toy_example(fn):
    acts, D = _toy()
    target = (acts @ D).norm(dim=-1)
    torch.testing.assert_close(target, torch.tensor([54.4059, 15.0, 67.8012]), atol=1e-3, rtol=0)
    mask = fn(acts, D.norm(dim=-1), target)
    assert mask.sum(-1).tolist() == [2, 2, 2]
    assert (acts * mask).tolist() == [[0, 4, 3], [0, 1, 1], [0, 10, 2]]


@pytest.mark.parametrize("fn", BOTH)
def test_decoder_norms_change_the_ranking(fn):
    acts, D = _toy()
    target = (acts @ D).norm(dim=-1)
    # with unit decoder norms the ranking is by raw activation: row 0 keeps {5, 4}, not {4, 3}
    mask = fn(acts, torch.ones(3), target)
    assert mask[0].tolist() == [True, True, False]


def _random_case(seed, n, h, kind):
    g = torch.Generator().manual_seed(seed)
    pre = torch.relu(torch.randn(n, h, generator=g))
    dn = torch.rand(h, generator=g) + 0.5
    if kind == "ties":  # coarse grid: many exactly equal keys
        pre = torch.round(pre * 2) / 2
        dn = torch.ones(h)
    elif kind == "zeros":
        pre[::4] = 0  # all-zero rows
        pre[:, ::3] = 0
    elif kind == "sparse":
        pre = pre * (torch.rand(n, h, generator=g) < 0.02)
    elif kind == "wide_range":  # keys spanning ~60 orders of magnitude
        pre = pre * torch.exp(torch.randn(n, h, generator=g) * 15).clamp(max=1e15)
    elif kind == "zero_dec_norm":
        dn[::5] = 0.0
    energy = (pre * dn).norm(dim=-1)
    t = torch.rand(n, generator=g) * energy * 1.4
    t[::7] = energy[::7] * 3 + 1  # target above the total energy
    t[1::11] = 0.0
    if kind == "huge_target":
        t[::2] = 2e4  # beyond the paper's sentinel sqrt(1e8) = 1e4
    return pre, dn, t


KINDS = ["gauss", "ties", "zeros", "sparse", "wide_range", "zero_dec_norm", "huge_target"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed,n,h", [(0, 37, 50), (1, 64, 300), (2, 16, 1000), (3, 5, 7)])
def test_fast_equals_reference(kind, seed, n, h):
    pre, dn, t = _random_case(seed, n, h, kind)
    ref = topafa_select_reference(pre, dn, t)
    for k_start in (None, 1, 3, h):
        fast = topafa_select(pre, dn, t, k_start=k_start)
        assert torch.equal(ref, fast), f"{kind}: {(ref != fast).sum()} entries differ (k_start={k_start})"
    buf = torch.full_like(pre, float("nan"))  # stale contents must not matter
    assert torch.equal(ref, topafa_select(pre, dn, t, key_buffer=buf))
    torch.testing.assert_close(buf, (pre * dn) ** 2, rtol=0, atol=0)  # it now holds the keys


def test_exact_tie_at_the_cut_keeps_lower_indices():
    # four equal keys, target = norm of two of them: the two lowest indices are kept
    pre = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0, 1.0]])
    t = torch.tensor([2.0 ** 0.5])
    for fn in BOTH:
        assert fn(pre, torch.ones(6), t).tolist() == [[False, True, True, False, False, False]]
    # keys that tie only after squaring in float32 still rank by index
    a = torch.tensor(1.0000001)
    pre = torch.tensor([[a.item(), 1.0, 0.3]])
    ref = topafa_select_reference(pre, torch.ones(3), torch.tensor([1.0]))
    assert torch.equal(ref, topafa_select(pre, torch.ones(3), torch.tensor([1.0]), k_start=1))


@pytest.mark.parametrize("fn", BOTH)
def test_invariants(fn):
    pre, dn, t = _random_case(5, 200, 400, "zeros")
    mask = fn(pre, dn, t)
    n_pos = (pre > 0).sum(-1)
    l0 = mask.sum(-1)
    assert (l0 <= n_pos).all()
    assert (l0[(pre == 0).all(-1)] == 0).all()  # all-zero row selects nothing
    assert not (mask & (pre == 0)).any()
    energy = (pre * dn).norm(dim=-1)
    above = t > energy * 1.01
    assert above.any() and torch.equal(l0[above], n_pos[above])  # target above energy: all positive
    # the kept set is a prefix of the decoder-scaled ranking
    key = pre * dn
    for i in range(0, 200, 13):
        if mask[i].any():
            rest = key[i][~mask[i] & (pre[i] > 0)]
            if rest.numel():
                assert key[i][mask[i]].min() >= rest.max()


def test_nearest_not_first_crossing():
    # ranking 4, 3, 0.1 → cumulative norms 4, 5, 5.001: target 4.4 is nearer to 4 (k=1; the
    # first-crossing rule would give k=2), target 4.6 nearer to 5 (k=2)
    pre = torch.tensor([[3.0, 4.0, 0.1]])
    for fn in BOTH:
        assert fn(pre, torch.ones(3), torch.tensor([4.4])).tolist() == [[False, True, False]]
        assert fn(pre, torch.ones(3), torch.tensor([4.6])).tolist() == [[True, True, False]]


def test_shape_errors():
    with pytest.raises(ValueError, match="dec_norms"):
        topafa_select(torch.ones(2, 3), torch.ones(4), torch.ones(2))
    with pytest.raises(ValueError, match="target_norm"):
        topafa_select(torch.ones(2, 3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="pre_acts"):
        topafa_select(torch.ones(3), torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="key_buffer"):
        topafa_select(torch.ones(2, 3), torch.ones(3), torch.ones(2), key_buffer=torch.ones(3, 2))
    with pytest.raises(ValueError, match="key_buffer"):
        topafa_select(torch.ones(2, 3), torch.ones(3), torch.ones(2), key_buffer=torch.ones(2, 3, dtype=torch.float64))


def test_full_sort_fallback_in_row_chunks(monkeypatch):
    import saelib.sae.topafa as T

    monkeypatch.setattr(T, "_CHUNK_ELEMS", 3 * 300)  # 3 rows per chunk
    pre, dn, t = _random_case(7, 40, 300, "zeros")
    ref = topafa_select_reference(pre, dn, t)
    assert torch.equal(ref, topafa_select(pre, dn, t, k_start=300))  # straight to the full sort
    assert torch.equal(ref, topafa_select(pre, dn, t, k_start=2))  # rounds, then the full sort


@pytest.mark.parametrize("kind", ["gauss", "ties", "zeros"])
def test_partial_sort_in_row_chunks(monkeypatch, kind):
    import saelib.sae.topafa as T

    monkeypatch.setattr(T, "_CHUNK_ELEMS", 5 * 1200)  # 5 rows per np.partition chunk
    pre, dn, t = _random_case(11, 23, 1200, kind)
    ref = topafa_select_reference(pre, dn, t)
    for k_start in (256, 300, 500):  # K >= 256 and 2K < h: the chunked numpy partial sort
        assert torch.equal(ref, topafa_select(pre, dn, t, k_start=k_start)), k_start


@pytest.mark.parametrize("kind", KINDS)
def test_selection_in_row_blocks(monkeypatch, kind):
    import saelib.sae.topafa as T

    monkeypatch.setattr(T, "_SELECT_CHUNK_ELEMS", 7 * 300)  # blocks of 7 rows (the last one shorter)
    pre, dn, t = _random_case(5, 40, 300, kind)
    ref = topafa_select_reference(pre, dn, t)
    for k_start in (None, 2, 300):
        assert torch.equal(ref, topafa_select(pre, dn, t, k_start=k_start)), k_start
    buf = torch.empty_like(pre)
    assert torch.equal(ref, topafa_select(pre, dn, t, key_buffer=buf))
    torch.testing.assert_close(buf, (pre * dn) ** 2, rtol=0, atol=0)  # every block wrote its keys


def test_negative_inputs_are_never_selected():
    pre, dn, t = _random_case(8, 30, 200, "gauss")
    pre = pre - 0.3  # not ReLU outputs
    ref = topafa_select_reference(pre, dn, t)
    assert not (ref & (pre <= 0)).any()
    assert torch.equal(ref, topafa_select(pre, dn, t))
