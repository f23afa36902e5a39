"""The auxiliary dead-latent loss: the fast path (gathered dead columns, dense or sparse decode)
equals the definition and the plain-autograd reference to float32 rounding."""
import pytest
import torch

from saelib.sae.core import SAE, SAEConfig

D_IN, D_SAE, K = 24, 192, 4


def aux_by_definition(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """aux_coeff · mean((e - r)^2) with e = (top-aux_k dead pre-activations, dense [N, d_sae]) @ W_dec,
    r = x - x_hat detached; written from the docstring's maths, with full [N, d_sae] tensors."""
    cfg = sae.cfg
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc + (sae.b_enc if cfg.use_b_enc else 0))
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.topk(cfg.k, dim=-1).indices, True)
    x_hat = (pre * keep) @ sae.W_dec + sae.b_dec
    dead = sae.dead_mask()
    kk = min(cfg.aux_k, int(dead.sum()))
    masked = torch.where(dead, pre.detach(), torch.tensor(-1.0))
    top = masked.topk(kk, dim=-1).indices
    sel = torch.zeros_like(keep).scatter_(-1, top, True) & dead
    e = (pre * sel) @ sae.W_dec
    return cfg.aux_coeff * (e - (x - x_hat).detach()).pow(2).mean()


def pair(n_dead: int, aux_k: int, use_b_enc: bool):
    g = torch.Generator().manual_seed(n_dead + aux_k)
    x = torch.randn(256, D_IN, generator=g) * 2 + 0.5
    saes = []
    for fast in (True, False):
        sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="topk", k=K, aux_k=aux_k, use_b_enc=use_b_enc,
                            dead_after_tokens=1000))
        with torch.no_grad():
            sae.W_enc[:, :n_dead] *= 0.02  # these never reach the top k: they stay dead
            sae.b_dec.normal_(generator=torch.Generator().manual_seed(1))
        sae.tokens_since_fired[:n_dead] = 10_000
        sae.sparse_kernels = fast
        saes.append(sae)
    return x, saes


@pytest.mark.parametrize("n_dead,aux_k,path", [
    (40, 64, "dense, every dead latent kept"),
    (150, 64, "dense over the dead columns, top-aux_k kept"),
    (170, 8, "sparse decode (aux_k < n_dead / 8)"),
])
@pytest.mark.parametrize("use_b_enc", [False, True])
def test_fast_aux_equals_reference_and_definition(n_dead, aux_k, path, use_b_enc):
    x, (fast, ref) = pair(n_dead, aux_k, use_b_enc)
    want = aux_by_definition(ref, x)
    grads_def = torch.autograd.grad(want, [ref.W_enc, ref.W_dec, ref.b_dec] + ([ref.b_enc] if use_b_enc else []))
    of, orf = fast(x), ref(x)
    assert int(of.n_dead) == n_dead and of.aux_loss > 0
    # float32, sums in another order: rtol 1e-5 on the loss, 1e-5 of the largest entry on gradients
    torch.testing.assert_close(of.aux_loss, orf.aux_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(of.aux_loss, want, rtol=1e-5, atol=0)
    params = ["W_enc", "W_dec", "b_dec"] + (["b_enc"] if use_b_enc else [])
    gf = torch.autograd.grad(of.aux_loss, [getattr(fast, p) for p in params])
    gr = torch.autograd.grad(orf.aux_loss, [getattr(ref, p) for p in params])
    for name, a, b, c in zip(params, gf, gr, grads_def):
        scale = float(c.abs().max())
        assert scale > 0, f"{name}: the aux loss must move it ({path})"
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{name} fast vs reference: {m}")
        torch.testing.assert_close(a, c, rtol=0, atol=1e-5 * scale, msg=lambda m: f"{name} fast vs definition: {m}")
    # only dead latents move (the residual is detached)
    live = torch.ones(D_SAE, dtype=torch.bool)
    live[:n_dead] = False
    assert gf[1][live].abs().max() == 0 and gf[0][:, live].abs().max() == 0


def test_fast_aux_cost_scales_with_dead_latents():
    """The fast aux path touches only the dead columns: with 2 dead latents it must not build
    [N, d_sae]-sized products (counted through the profiler's FLOP estimate of matmuls)."""
    from torch.profiler import ProfilerActivity, profile

    x, (fast, _) = pair(2, 64, False)
    fast(x)  # warm
    def aux_backward_flops(sae):
        out = sae(x if sae is fast else x2)
        sae.zero_grad()
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as p:
            out.aux_loss.backward()
        return sum(e.flops for e in p.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::matmul"))
    x2, (fast2, _) = pair(160, 200, False)
    small, big = aux_backward_flops(fast), aux_backward_flops(fast2)
    # three N·D·d_in products in the backward; dense over d_sae would be 3·2·N·d_sae·d_in
    n = x.shape[0]
    assert 0 < small <= 3 * 2 * n * 2 * D_IN
    assert big == 80 * small
