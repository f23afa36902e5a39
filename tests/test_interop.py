"""Interop with SAELens: export to its disk format, import its SAEs (built in memory, offline)."""
import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedSAE, GatedSAEConfig,  # noqa: E402
                      JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig)

from saelib.interop import from_saelens, to_saelens  # noqa: E402
from saelib.sae.core import SAE, SAEConfig  # noqa: E402

D_IN, D_SAE = 16, 64


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) * 2 + 0.5


def _randomise(lsae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lsae.named_parameters():
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 2 else 0.2))
    return lsae


def _lens_recon(lsae, x):
    with torch.no_grad():
        return lsae.decode(lsae.encode(x))


@pytest.mark.parametrize("make", [
    lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
    lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm")),
    lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5)),
    lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True)),
    lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
], ids=["standard", "standard-no-bdec-in", "standard-layernorm", "topk", "topk-rescaled", "jumprelu"])
def test_import_matches_saelens(make, tmp_path):
    lsae = _randomise(make())
    x = data()
    want = _lens_recon(lsae, x)
    for src in (lsae, tmp_path):
        if src is tmp_path:
            lsae.save_model(tmp_path)
        ours = from_saelens(src)
        assert not ours.training
        torch.testing.assert_close(ours.reconstruct(x), want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            want_acts = lsae.encode(x)
        torch.testing.assert_close(ours.encode(x), want_acts, rtol=1e-4, atol=1e-4)


def test_import_batchtopk_training_object():
    lsae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    _randomise(lsae)
    lsae.topk_threshold = torch.tensor(0.3, dtype=torch.double)
    ours = from_saelens(lsae)
    assert ours.cfg.activation == "batchtopk" and ours.cfg.k == 4
    x = data()
    pre = ours.pre_acts(x)
    torch.testing.assert_close(ours.encode(x), pre * (pre > 0.3))


def test_unsupported_architectures_raise(tmp_path):
    gated = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(ValueError, match="not supported"):
        from_saelens(gated)
    with pytest.raises(FileNotFoundError, match="No SAELens SAE"):
        from_saelens(tmp_path / "none")
    SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="topk", k=3)).save(tmp_path / "ours")
    with pytest.raises(ValueError, match="saelib SAE"):
        from_saelens(tmp_path / "ours")


@pytest.mark.parametrize("act,norm,lens_cls", [
    ("relu", "none", StandardSAE), ("topk", "token", TopKSAE), ("topk", "global", TopKSAE),
    ("batchtopk", "none", JumpReLUSAE), ("topafa", "token", StandardSAE),
])
def test_export_loads_in_saelens(tmp_path, act, norm, lens_cls):
    k = 5 if act in ("topk", "batchtopk") else None
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=act, k=k, input_norm=norm, hook_name="blocks.2.hook_resid_pre"))
    x = data(64)
    if norm == "global":
        sae.fit_input_norm(x * 7)
    with torch.no_grad():
        sae.b_dec.normal_()
        if sae.cfg.use_b_enc:
            sae.b_enc.normal_()
    sae(x)  # training step: BatchTopK threshold
    sae.eval()
    to_saelens(sae, tmp_path, allow_lossy=act == "topafa")
    lsae = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert isinstance(lsae, lens_cls)
    assert lsae.cfg.metadata.hook_name == "blocks.2.hook_resid_pre"
    assert lsae.cfg.metadata.saelib_architecture == act
    if act != "topafa":  # SAELens cannot run top-AFA: it loads the weights as a ReLU SAE
        torch.testing.assert_close(_lens_recon(lsae, x), sae.reconstruct(x), rtol=1e-4, atol=1e-4)
    back = from_saelens(tmp_path)
    assert back.cfg.activation == act
    assert back.cfg.afa_coeff == sae.cfg.afa_coeff and back.cfg.hook_name == sae.cfg.hook_name
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_export_batchtopk_without_threshold_raises(tmp_path):
    sae = SAE(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="batchtopk", k=3))
    with pytest.raises(ValueError, match="threshold"):
        to_saelens(sae, tmp_path)
