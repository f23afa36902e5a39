"""The code paths CUDA tensors take, run on CPU: top-AFA selection without numpy's sorts, and the
sparse training step (embedding_bag decode, index_add, gathered aux) compared with plain autograd."""
import pytest
import torch

import saelib.sae.topafa as topafa
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.topafa import topafa_select, topafa_select_reference


@pytest.fixture
def torch_sorts(monkeypatch):
    monkeypatch.setattr(topafa, "_NUMPY_SORTS", False)


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0])
def test_topafa_torch_path_equals_reference(torch_sorts, scale):
    g = torch.Generator().manual_seed(int(scale))
    d, h, n = 32, 640, 96
    x = torch.randn(n, d, generator=g)
    pre = torch.relu(x @ (torch.randn(d, h, generator=g) * scale / d**0.5))
    dn = 1 + 0.01 * torch.randn(h, generator=g)
    target = x.norm(dim=-1)
    ref = topafa_select_reference(pre, dn, target)
    assert torch.equal(topafa_select(pre, dn, target), ref)
    assert torch.equal(topafa_select(pre, dn, target, k_start=300), ref)  # the K >= 256 branch
    assert 0 < ref.sum(-1).float().mean() < h


@pytest.mark.parametrize("act", ["topk", "topafa"])
def test_training_step_torch_path_equals_autograd(torch_sorts, act):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 24, generator=g) * 2
    kw = dict(k=4) if act == "topk" else {}
    a = SAE(SAEConfig(d_in=24, d_sae=160, activation=act, dead_after_tokens=64, **kw))
    b = SAE(SAEConfig(d_in=24, d_sae=160, activation=act, dead_after_tokens=64, **kw))
    with torch.no_grad():
        a.W_enc.mul_(3.0)
    b.load_state_dict(a.state_dict())
    b.sparse_kernels = False
    a.sparse_max_density = 1.0
    for s in (a, b):
        s.tokens_since_fired[::2] = 1000
    oa, ob = a(x), b(x)
    assert oa.aux_loss > 0
    torch.testing.assert_close(oa.loss, ob.loss, rtol=1e-5, atol=1e-6)
    oa.loss.backward()
    ob.loss.backward()
    for name in ("W_enc", "W_dec", "b_dec"):
        ga, gb = getattr(a, name).grad, getattr(b, name).grad
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-5 * float(gb.abs().max()))
