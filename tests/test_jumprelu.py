"""Trainable JumpReLU (saelib.sae.rules.jumprelu): the straight-through threshold gradient against
its formula, recovery of a known dictionary with L0 falling as l0_coeff rises, and an exact
SAELens round trip."""
from __future__ import annotations

import pytest
import torch

from saelib.analysis.synthetic import SyntheticData, SyntheticSpec, recovery, synthetic_rules
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.rules import get_rule
from saelib.sae.rules.jumprelu import JumpReLUFn, StepFn
from saelib.sae.train import TrainConfig, train_saes


def test_ste_threshold_gradient_matches_the_formula():
    z = torch.tensor([[0.30, 0.52, 0.00, 0.41], [0.49, 0.10, 0.60, 0.44]], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.02, 0.4], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1.0, -2.0, 3.0, 0.5], [4.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    eps = 0.1
    out = JumpReLUFn.apply(z, theta, eps)
    torch.testing.assert_close(out, z.detach() * (z.detach() > theta.detach()))
    out.backward(g)
    zd, td = z.detach(), theta.detach()
    window = ((zd - td).abs() < eps / 2).double()  # K((z - θ)/ε) = 1 inside |z - θ| < ε/2
    torch.testing.assert_close(theta.grad, (-(td / eps) * window * g).sum(0))
    torch.testing.assert_close(z.grad, (zd > td).double() * g)
    # by hand for latent 0: only z = 0.49 is within 0.05 of θ = 0.5, with g = 4: -(0.5/0.1)·4 = -20
    assert float(theta.grad[0]) == pytest.approx(-20.0)
    theta.grad = None
    StepFn.apply(z.detach(), theta, eps).sum(-1).mean().backward()
    torch.testing.assert_close(theta.grad, -(1 / eps) * window.sum(0) / 2)  # mean over the 2 tokens


def test_l0_penalty_and_loss_in_the_forward():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, activation="jumprelu", l0_coeff=0.5, jump_bandwidth=0.2))
    x = torch.randn(32, 8)
    out = sae(x)
    with torch.no_grad():
        pre = sae.pre_acts(x)
        l0 = (pre > sae.jump_threshold).sum(-1).double().mean()
    assert float(out.rule_loss.detach()) == pytest.approx(0.5 * float(l0), rel=1e-6)
    assert float(out.l0) == pytest.approx(float(l0))
    torch.testing.assert_close(out.loss, out.mse_loss + sae.cfg.afa_coeff * out.afa_loss + out.aux_loss + out.l1_loss + out.rule_loss)
    out.loss.backward()
    assert sae.jump_threshold.grad is not None and bool(sae.jump_threshold.grad.abs().sum() > 0)


def test_rule_knobs_and_defaults():
    rule = get_rule("jumprelu")
    cfg = SAEConfig(d_in=4, d_sae=8, activation="jumprelu")
    assert (rule.knob, cfg.l0_coeff, cfg.use_b_enc, cfg.l1_coeff, cfg.afa_coeff) == ("l0_coeff", 1e-3, True, 0.0, 0.0)
    with pytest.raises(ValueError, match="jump_bandwidth"):
        SAEConfig(d_in=4, d_sae=8, activation="jumprelu", jump_bandwidth=0.0)
    with pytest.raises(ValueError, match="l0_coeff"):
        SAEConfig(d_in=4, d_sae=8, activation="jumprelu", l0_coeff=-1.0)


SPEC = SyntheticSpec(d=32, n_features=64, l0=2.0, group_size=1, rho=0.0, freq_decay=0.0, mag_sigma=0.0)
COEFFS = (3e-4, 1e-3, 1e-2)


@pytest.fixture(scope="module")
def trained():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = SyntheticData(SPEC)
        cfgs = {f"l0={c:g}": synthetic_rules(32, 128, 2, l1_coeff=0.0, afa_coeff=0.0, seed=0, rules=["jumprelu"],
                                             l0_coeff=c)["jumprelu"] for c in COEFFS}
        tc = TrainConfig(batch_size=256, n_tokens=256 * 600, lr=1e-2, progress=False, seed=0)
        return data, train_saes(cfgs, data.batches(256, seed=1), tc)
    finally:
        torch.set_num_threads(n)


def test_jumprelu_recovers_a_known_dictionary_and_l0_falls_with_l0_coeff(trained):
    data, saes = trained
    x, f = data.sample(4096, torch.Generator().manual_seed(7))
    true_l0 = float((f > 0).sum(-1).double().mean())
    l0s = []
    for c in COEFFS:
        sae = saes[f"l0={c:g}"]
        with torch.no_grad():
            l0s.append(float(sae.eval()(x).l0))
        if c >= 1e-3:  # a random decoder scores ~0.45 here
            rec = recovery(data.W, sae.W_dec)
            assert rec["recovery"] >= 0.95 and rec["frac_recovered"] >= 0.9, (c, rec)
            assert l0s[-1] < 1.5 * true_l0, (c, l0s[-1], true_l0)
    assert l0s[0] > l0s[1] > l0s[2], l0s


def test_exact_saelens_round_trip(tmp_path, trained):
    pytest.importorskip("sae_lens")
    from sae_lens import SAE as LensSAE

    from saelib.interop import from_saelens, to_saelens

    _, saes = trained
    sae = saes["l0=0.001"].eval()
    to_saelens(sae, tmp_path / "lens")
    lens = LensSAE.load_from_disk(str(tmp_path / "lens"), device="cpu")
    assert lens.cfg.architecture() == "jumprelu"
    x = torch.randn(64, 32) * 0.5
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), sae.encode(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(lens.decode(lens.encode(x)), sae.reconstruct(x), rtol=0, atol=1e-6)
    back = from_saelens(tmp_path / "lens")
    assert back.cfg.activation == "jumprelu" and back.cfg.l0_coeff == sae.cfg.l0_coeff
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "jump_threshold"):
        assert torch.equal(getattr(back, name), getattr(sae, name)), name
