"""The rules registry: every rule answers the questions the rest of saelib asks it."""
from __future__ import annotations

import pytest
import torch

from saelib.sae.core import ACTIVATIONS, SAE, SAEConfig
from saelib.sae.kernels import batch_topk_select, batch_topk_select_lowp
from saelib.sae.rules import RULES, Rule, get_rule, knob_text, register, rule_attr, rule_in
from saelib.pipeline import sweep_configs, sweep_name


@pytest.mark.parametrize("name", list(RULES))
def test_every_rule_answers_the_contract(name):
    r = get_rule(name)
    assert r.name == name and name in ACTIVATIONS
    for attr in ("label", "paper_label", "color", "saelens_name", "knob", "knob_tag"):
        assert getattr(r, attr), attr
    assert isinstance(r.competes, bool) and isinstance(r.uses_b_enc, bool) and r.linestyle
    kw = {"k": 4} if r.knob == "k" else {}
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation=name, **kw))
    assert sae.rule is r and sae.cfg.use_b_enc == r.uses_b_enc


def test_lookups_and_errors():
    assert rule_in("blocks.3-batchtopk-k8-s0") == "batchtopk" and rule_in("x-jumprelu-l00.001-s0") == "jumprelu"
    assert rule_attr("standard", "color", "grey") == "grey"  # an SAELens architecture is no rule
    assert knob_text({"activation": "topafa", "afa_coeff": 1 / 16}) == "λ=1/16"
    assert knob_text({"activation": "topk", "k": 32.0}) == "k=32"
    with pytest.raises(ValueError, match="Unknown activation"):
        get_rule("gelu")
    with pytest.raises(ValueError, match="taken"):
        register(RULES["topk"])
    with pytest.raises(ValueError, match="empty"):
        register(Rule())


def test_sweep_names_and_grid_come_from_the_rules():
    assert sweep_name("h", "topk", k=32, seed=1) == "h-topk-k32-s1"
    assert sweep_name("h", "topafa", afa_coeff=0.0625) == "h-topafa-afa0.0625-s0"
    assert sweep_name("h", "relu", l1_coeff=5.0) == "h-relu-l15-s0"
    cfgs = sweep_configs(["h"], 8, 32, topk_ks=[4], knobs={"jumprelu": [1e-3, 1e-2]})
    assert sorted(cfgs) == ["h-jumprelu-l00.001-s0", "h-jumprelu-l00.01-s0", "h-topk-k4-s0"]
    assert cfgs["h-jumprelu-l00.01-s0"].l0_coeff == 0.01 and cfgs["h-topk-k4-s0"].l0_coeff == 0.0


def _flat_reference(pre, n):
    """The flat top-n with ties at the cut to the lowest row-major index (a stable sort), positive only."""
    flat = pre.flatten()
    top = torch.sort(-flat, stable=True).indices[:min(n, flat.numel())]
    top = top[flat[top] > 0].sort().values
    return top // pre.shape[1], top % pre.shape[1]


KINDS = ["gauss", "ties", "heavy_rows", "few_positive", "one_row_all", "zeros"]


@pytest.mark.parametrize("seed,kind", enumerate(KINDS))
def test_batch_topk_select_is_the_flat_top_kn(seed, kind):
    g = torch.Generator().manual_seed(seed)
    for trial in range(200):
        N, m = (int(v) for v in torch.randint(1, 48, (2,), generator=g))
        pre = torch.randn(N, m, generator=g)
        if kind == "ties":  # many equal values, the cut inside a tie group
            pre = (pre * 2).round() / 2
        elif kind == "heavy_rows":  # a few rows hold most large values: their candidates saturate
            pre[torch.randperm(N, generator=g)[: max(1, N // 6)]] += 4
        elif kind == "few_positive":  # N·k >= number of positive entries
            pre -= 2
        elif kind == "one_row_all":
            pre[0] = (pre[0].abs() + 10).round()
        elif kind == "zeros":
            pre.zero_()
        pre = pre.relu()
        k = int(torch.randint(1, m + 2, (1,), generator=g))
        want = _flat_reference(pre, k * N)
        for hint in (None, 1e-3, 0.5, 1.5, 50.0):  # the hint changes the speed only
            got = batch_topk_select(pre, k * N, hint)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (trial, hint)


def test_batchtopk_training_selection_mask_and_sparse_path_agree():
    sae = SAE(SAEConfig(d_in=16, d_sae=256, activation="batchtopk", k=3, seed=0)).train()
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    pre = sae.pre_acts(x).detach()
    rows, cols = sae.rule.sparse_select(sae, pre)
    mask = sae.rule.mask(sae, pre, None, training=True)
    assert torch.equal(mask.nonzero(as_tuple=True)[0], rows) and torch.equal(mask.nonzero(as_tuple=True)[1], cols)
    want = _flat_reference(pre, 3 * 64)
    assert torch.equal(rows, want[0]) and torch.equal(cols, want[1]) and rows.numel() == 3 * 64
    assert sae._batchtopk_hint == pytest.approx(0.9 * float(pre[rows, cols].min()))


@pytest.mark.parametrize("norms,b_scale", [(0.0, 0.0), (0.7, 0.1), (0.3, 1.0)])
def test_batch_topk_select_lowp_is_exact_in_float32(norms, b_scale):
    g = torch.Generator().manual_seed(3)
    N, d, m, k = 512, 64, 256, 3
    x = torch.randn(N, d, generator=g) * torch.randn(N, 1, generator=g).mul(norms).exp()
    W = torch.randn(d, m, generator=g) / d ** 0.5
    b = torch.randn(m, generator=g) * b_scale if b_scale else None
    exact = (x @ W + (0 if b is None else b)).relu()
    p = (x.bfloat16() @ W.bfloat16()).float().add(0 if b is None else b).relu()
    got = batch_topk_select_lowp(p, x, W, b, k * N)
    assert got is not None  # the bound narrows the search on such data
    want = batch_topk_select(exact, k * N)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    torch.testing.assert_close(got[2], exact[want], rtol=1e-5, atol=1e-6)
    # a pre-activation matrix that violates the rounding bound is refused, not trusted
    assert batch_topk_select_lowp(p * 1.5, x, W, b, k * N) is None
    # fewer than k·N positive entries: no positive lower bound, the caller uses float32
    assert batch_topk_select_lowp((p - 10).relu(), x, W, b, k * N) is None


def test_batchtopk_bfloat16_selection_trains_like_float32():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(256, 32, generator=g) for _ in range(6)]
    runs = {}
    for dt in ("float32", "bfloat16"):
        sae = SAE(SAEConfig(d_in=32, d_sae=512, activation="batchtopk", k=4, aux_k=16, dead_after_tokens=256,
                            seed=0)).train()
        sae.select_dtype = dt
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        for x in xs:
            out = sae(x)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        runs[dt] = (sae, out)
    (s32, o32), (s16, o16) = runs["float32"], runs["bfloat16"]
    assert torch.equal(o32.acts != 0, o16.acts != 0)  # the same kept set in the last step
    torch.testing.assert_close(o16.acts, o32.acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s16.W_enc, s32.W_enc, rtol=1e-4, atol=1e-5)
    aux16, aux32 = float(o16.aux_loss.detach()), float(o32.aux_loss.detach())
    assert aux16 > 0 and aux16 == pytest.approx(aux32, rel=1e-4)
    sae = SAE(SAEConfig(d_in=32, d_sae=512, activation="batchtopk", k=4)).train()
    sae.select_dtype = "float16"
    with pytest.raises(ValueError, match="select_dtype"):
        sae(xs[0])
