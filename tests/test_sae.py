"""SAE core: config validation, init, losses, selection rules, decoder constraint, save/load."""
import json
import math

import pytest
import torch

from saelib.sae.core import SAE, SAEConfig, SAEOutput
from saelib.sae.topafa import topafa_select_reference

D_IN, D_SAE = 16, 96


def make(activation="topk", **kw):
    if activation in ("topk", "batchtopk"):
        kw.setdefault("k", 6)
    return SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, **kw))


def data(n=64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * scale + 1.0


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw,match", [
    (dict(activation="topk", k=200), "k=200 > d_sae"),
    (dict(activation="topk"), "needs k"),
    (dict(activation="batchtopk"), "needs k"),
    (dict(activation="topafa", afa_coeff=-0.1), "afa_coeff"),
    (dict(activation="gelu"), "Unknown activation"),
    (dict(activation="relu", k=4), "only used by topk"),
    (dict(activation="topk", k=4, input_norm="layer"), "Unknown input_norm"),
    (dict(activation="topafa", afa_target="x"), "afa_target"),
    (dict(activation="topk", k=0), "positive int"),
    (dict(activation="relu", dtype="int8"), "dtype"),
    (dict(activation="relu", dead_after_tokens=0), "dead_after_tokens"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)


def test_config_defaults_follow_the_paper():
    c = SAEConfig(d_in=8, d_sae=32, activation="topafa")
    assert c.afa_coeff == 1 / 16 and c.use_b_enc is False and c.l1_coeff == 0 and c.seed == 49
    assert SAEConfig(d_in=8, d_sae=32, activation="topk", k=4).afa_coeff == 0
    assert SAEConfig(d_in=8, d_sae=32, activation="relu").use_b_enc is True
    with pytest.raises(ValueError, match="Unknown SAEConfig keys"):
        SAEConfig.from_dict({**c.to_dict(), "bogus": 1})


@pytest.mark.parametrize("bad", [torch.randn(4, D_IN + 1), torch.randn(D_IN + 2)])
def test_wrong_input_width(bad):
    sae = make()
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae(bad)
    with pytest.raises(ValueError, match=f"d_in={D_IN}"):
        sae.encode(bad)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(value):
    x = data(8)
    x[3, 2] = value
    sae = make("topafa")
    with pytest.raises(ValueError, match="NaN or inf"):
        sae(x)
    with pytest.raises(ValueError, match="NaN or inf"):
        sae.encode(x)


# ----------------------------------------------------------------------------- init
def test_init_is_seeded_and_tied():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    assert torch.equal(a.W_enc, b.W_enc) and not torch.equal(a.W_enc, c.W_enc)
    Wt = a.W_enc.T / a.W_enc.T.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(a.W_dec, Wt)
    assert a.b_enc.abs().max() == 0 and a.b_dec.abs().max() == 0


def test_init_fan_in_quirk():
    big = SAE(SAEConfig(d_in=64, d_sae=1024, activation="topafa"))
    fixed = SAE(SAEConfig(d_in=64, d_sae=1024, activation="topafa", init_fan_in="d_in"))
    # U(-b, b) has max close to b; the paper's bound uses fan_in = d_sae
    assert big.W_enc.abs().max() <= math.sqrt(6 / 1024) and big.W_enc.abs().max() > 0.95 * math.sqrt(6 / 1024)
    assert fixed.W_enc.abs().max() > 0.95 * math.sqrt(6 / 64)
    # the paper's W_enc: kaiming_uniform_ after seeding with 49
    torch.manual_seed(49)
    ref = torch.nn.init.kaiming_uniform_(torch.empty(64, 1024))
    assert torch.equal(big.W_enc.data, ref)


# ----------------------------------------------------------------------------- forward / losses
@pytest.mark.parametrize("act", ["relu", "topk", "batchtopk", "topafa"])
@pytest.mark.parametrize("norm", ["none", "global", "token"])
def test_forward_output_and_encode_decode(act, norm):
    sae = make(act, input_norm=norm)
    x = data()
    if norm == "global":
        sae.fit_input_norm(x)
    with torch.no_grad():
        sae.b_dec.normal_()
    out = sae(x)
    assert isinstance(out, SAEOutput)
    assert out.x_hat.shape == x.shape and out.acts.shape == (64, D_SAE)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.mse_loss + sae.cfg.afa_coeff * out.afa_loss + out.aux_loss + out.l1_loss)
    assert out.l0 == (out.acts > 0).sum(-1).float().mean()
    if act == "topk":
        assert (out.acts > 0).sum(-1).max() <= 6
    if act == "batchtopk":
        assert (out.acts > 0).sum() <= 6 * 64
    sae.eval()
    acts = sae.encode(x)
    if act != "batchtopk":  # training uses the batch rule, eval the threshold
        torch.testing.assert_close(acts, out.acts)
        torch.testing.assert_close(sae.decode(acts, x=x), out.x_hat)
    torch.testing.assert_close(sae.reconstruct(x), sae.decode(acts, x=x))
    # encode/decode work on [batch, seq, d] too
    torch.testing.assert_close(sae.reconstruct(x.reshape(4, 16, D_IN)).reshape(64, D_IN), sae.reconstruct(x))


def test_token_norm_mode_needs_x_to_decode_and_matches_paper_formula():
    sae = make("topk", input_norm="token")
    x = data()
    with pytest.raises(ValueError, match="decode\\(acts, x=x\\)"):
        sae.decode(sae.encode(x))
    mu = x.mean(-1, keepdim=True)
    sd = (x - mu).std(-1, keepdim=True)
    xn = (x - mu) / (sd + 1e-5)
    torch.testing.assert_close(sae.normalize(x)[0], xn)
    out = sae(x)
    xhat_n = out.acts @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(out.x_hat, xhat_n * sd + mu)
    torch.testing.assert_close(out.mse_loss, (xhat_n - xn).pow(2).mean())  # mean over B·d, normalised space
    torch.testing.assert_close(out.afa_loss, (out.acts.norm(dim=-1) - xn.norm(dim=-1)).pow(2).mean())


def test_global_norm_fit():
    sae = make("topk", input_norm="global")
    x = data(scale=40.0)
    s = sae.fit_input_norm(x)
    torch.testing.assert_close((x * s).norm(dim=-1).mean(), torch.tensor(math.sqrt(D_IN)))
    with pytest.raises(ValueError, match="input_norm='global'"):
        make("topk").fit_input_norm(x)


def test_topafa_uses_centred_target_and_decoder_norms():
    sae = make("topafa")
    x = data()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # non-unit rows
    out = sae(x)
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc)
    mask = topafa_select_reference(pre, sae.W_dec.norm(dim=-1), (x - sae.b_dec).norm(dim=-1))
    assert torch.equal(out.acts > 0, mask & (pre > 0))
    cons = make("topafa", afa_target="consistent")
    cons.load_state_dict(sae.state_dict())
    o2 = cons(x)
    expect = ((o2.acts * cons.W_dec.norm(dim=-1)).norm(dim=-1) - (x - cons.b_dec).norm(dim=-1)).pow(2).mean()
    torch.testing.assert_close(o2.afa_loss, expect)


def test_batchtopk_threshold_is_learned_and_used_in_eval():
    sae = make("batchtopk", threshold_lr=0.5)
    assert torch.isnan(sae.threshold)
    x = data(256)
    for i in range(3):
        out = sae(x[i * 64:(i + 1) * 64])
    theta = float(sae.threshold)
    assert math.isfinite(theta) and theta > 0
    sae.eval()
    pre = sae.pre_acts(x)
    torch.testing.assert_close(sae.encode(x), pre * (pre > theta))
    # eval encoding of one token does not depend on the rest of the batch
    torch.testing.assert_close(sae.encode(x[:1]), sae.encode(x)[:1])
    assert float(sae.threshold) == theta  # eval does not update it


def test_dead_latents_counted_in_tokens_and_aux_detached():
    x = data(32)
    for detach in (True, False):
        sae = make("topk", dead_after_tokens=64, aux_detach_residual=detach)
        sae(x)
        assert sae.dead_mask().sum() == 0 and sae.tokens_since_fired.max() == 32  # 32 < 64 tokens
        sae(x)  # 64 tokens: latents that never fired are now dead
        out = sae(x)
        dead = sae.dead_mask()
        assert dead.any() and out.n_dead == dead.sum() and out.aux_loss > 0
        sae.zero_grad()
        out.aux_loss.backward()
        live_grad = sae.W_dec.grad[~dead].abs().max()
        if detach:  # residual detached: the aux loss only moves dead latents
            assert live_grad == 0 and sae.W_dec.grad[dead].abs().max() > 0
        else:  # the paper's code: the aux loss also pushes on the live reconstruction
            assert live_grad > 0
    sae.eval()
    before = sae.tokens_since_fired.clone()
    sae(x)
    assert torch.equal(before, sae.tokens_since_fired)


@pytest.mark.parametrize("act,extra", [("topk", {}), ("batchtopk", {}), ("topafa", {"input_norm": "token"}),
                                       ("topk", {"use_b_enc": True}), ("topafa", {"afa_target": "consistent"})])
def test_sparse_path_equals_dense_path(act, extra):
    x = data(48)
    a, b = make(act, dead_after_tokens=16, **extra), make(act, dead_after_tokens=16, **extra)
    a.sparse_max_density = 1.0
    b.sparse_kernels = False
    with torch.no_grad():
        a.b_dec.normal_()
        a.b_enc.normal_()
    b.load_state_dict(a.state_dict())
    a.tokens_since_fired[::3] = 100
    b.tokens_since_fired[::3] = 100
    oa, ob = a(x), b(x)
    assert (oa.aux_loss > 0) == (oa.n_dead > 0)
    if act != "topafa" or "input_norm" in extra:
        assert oa.aux_loss > 0
    for f in ("x_hat", "acts", "loss", "mse_loss", "afa_loss", "aux_loss", "l0"):
        torch.testing.assert_close(getattr(oa, f), getattr(ob, f), rtol=1e-5, atol=1e-5)
    for o in (oa, ob):  # per-token L0 and firing latents are counted without the dense acts
        assert torch.equal(o.l0_tokens, (o.acts != 0).sum(-1))
        assert torch.equal(o.fired, (o.acts != 0).any(0))
    assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    torch.testing.assert_close(a.threshold, b.threshold, equal_nan=True)  # BatchTopK's inference threshold
    oa.loss.backward()
    ob.loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- decoder constraint
def test_unit_norm_decoder_and_orthogonal_gradient():
    sae = make("topafa")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) * 3 + 0.1)
    sae(data()).loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    g, w = sae.W_dec.grad, sae.W_dec.detach()
    cos = (g * w).sum(-1) / (g.norm(dim=-1) * w.norm(dim=-1) + 1e-30)
    assert cos.abs().max() < 1e-5
    sae.set_decoder_norm_to_unit_norm()
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() < 1e-6


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("act,norm", [("topk", "none"), ("batchtopk", "token"), ("topafa", "global"), ("relu", "none")])
def test_save_load_round_trip(tmp_path, act, norm):
    sae = make(act, input_norm=norm, hook_name="blocks.3.hook_resid_pre", model_name="tiny")
    x = data()
    if norm == "global":
        sae.fit_input_norm(x * 10)
    sae(x)  # BatchTopK threshold, dead counters
    sae.eval()
    sae.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae.safetensors"]
    back = SAE.load(tmp_path / "s")
    assert back.cfg == sae.cfg
    back.eval()
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    if norm == "global":
        from safetensors.torch import load_file
        raw = load_file(str(tmp_path / "s" / "sae.safetensors"))  # folded: works in model space
        pre = torch.relu((x - raw["b_dec"]) @ raw["W_enc"])
        torch.testing.assert_close(pre, sae.pre_acts(x), rtol=1e-4, atol=1e-4)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No saelib SAE"):
        SAE.load(tmp_path / "nothing")
    sae = make("topk")
    sae.save(tmp_path / "a")
    with pytest.raises(ValueError, match="expected 'topafa'"):
        SAE.load(tmp_path / "a", expect={"activation": "topafa"})
    # cfg.json of another architecture next to these weights
    doc = json.loads((tmp_path / "a" / "cfg.json").read_text())
    doc["cfg"].update(activation="jumprelu", k=None)
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="another architecture"):
        SAE.load(tmp_path / "a")
    doc["cfg"].update(activation="topk", k=6, d_sae=D_SAE * 2)
    (tmp_path / "a" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="do not belong together"):
        SAE.load(tmp_path / "a")
    (tmp_path / "a" / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": 3}))
    with pytest.raises(ValueError, match="not written by saelib"):
        SAE.load(tmp_path / "a")


def test_path_switching_keeps_results():
    x = data(48)
    a, b = make("topafa"), make("topafa")
    b.sparse_kernels = False
    ref = b(x)
    ref.loss.backward()
    for density in (0.0, 1.0, 1.0, 0.0):  # dense, then dense-first with a sparse mask, then sparse
        a.sparse_max_density = density
        a.zero_grad()
        out = a(x)
        torch.testing.assert_close(out.x_hat, ref.x_hat, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        for pa, pb in zip(a.parameters(), b.parameters()):
            if pb.grad is not None:
                torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "topk"])
def test_fused_dense_encoder_gradients(act):
    x = data(32)
    a, b = make(act, use_b_enc=True, dead_after_tokens=16), make(act, use_b_enc=True, dead_after_tokens=16)
    a.sparse_max_density = 0.0  # topk: dense path with the fused encoder
    b.sparse_kernels = False
    with torch.no_grad():
        a.b_dec.normal_()
        a.b_enc.normal_()
    b.load_state_dict(a.state_dict())
    a.tokens_since_fired[::4] = 100
    b.tokens_since_fired[::4] = 100
    oa, ob = a(x), b(x)
    oa.loss.backward()
    ob.loss.backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert pa.grad is not None, name
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("act", ["topafa", "batchtopk"])
def test_sparse_training_is_reproducible_across_threads(act):
    """Same seed, same data, two threads: bitwise the same weights (a gradient gathered with
    ``dn[cols]`` accumulated duplicates in a thread-dependent order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(6, 256, 64, generator=g) * torch.linspace(0.2, 3, 64)

        def train():
            extra = dict(k=16) if act == "batchtopk" else dict(afa_target="consistent", l1_coeff=1e-3)
            sae = SAE(SAEConfig(d_in=64, d_sae=512, activation=act, **extra))
            sae.sparse_max_density = 1.0  # always the sparse kernels
            opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
            for x in X:
                out = sae(x)
                opt.zero_grad()
                out.loss.backward()
                opt.step()
            return torch.cat([p.detach().flatten() for p in sae.parameters()])

        assert torch.equal(train(), train())
    finally:
        torch.set_num_threads(threads)
