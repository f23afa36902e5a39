"""Model loading and hook names (offline, tiny random-weight models)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from saelib.io import file_sha256
from saelib.lm import models
from saelib.lm.models import (
    HubUnavailableError,
    check_embedded_cache,
    check_hook,
    hook_layer,
    hook_name,
    load_model,
)


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def tiny_gpt2():
    return load_model("tiny-gpt2", device="cpu")


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_models_load_offline_with_transformerlens_hooks(name):
    m = load_model(name, device="cpu", seed=3)
    assert m.saelib_name == name
    assert m.cfg.n_layers == 4 and m.cfg.d_model == 64
    for layer in range(4):
        for site in ("resid_pre", "resid_mid", "resid_post", "mlp_out", "attn_out"):
            assert hook_name(layer, site) in m.hook_dict
    assert "blocks.4.hook_resid_pre" not in m.hook_dict
    assert not m.training


def test_tiny_weights_are_seeded(tiny_llama):
    again = load_model("tiny-llama", device="cpu", seed=0)
    other = load_model("tiny-llama", device="cpu", seed=1)
    w0 = tiny_llama.original_model.model.embed_tokens.weight
    assert torch.equal(w0, again.original_model.model.embed_tokens.weight)
    assert not torch.equal(w0, other.original_model.model.embed_tokens.weight)


def test_to_tokens_prepends_bos(tiny_gpt2):
    toks = tiny_gpt2.to_tokens("hello world")
    assert toks[0, 0].item() == tiny_gpt2.tokenizer.bos_token_id
    assert toks.shape[1] == len(tiny_gpt2.tokenizer("hello world", add_special_tokens=False).input_ids) + 1


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_resid_pre_equals_hf_hidden_states(fixture, request):
    m = request.getfixturevalue(fixture)
    toks = torch.randint(3, 500, (2, 9))
    hooks = [hook_name(layer) for layer in range(m.cfg.n_layers)]
    with torch.inference_mode():
        _, cache = m.run_with_cache(toks, names_filter=hooks)
        hf = m.original_model(toks, output_hidden_states=True).hidden_states
    for layer, h in enumerate(hooks):
        torch.testing.assert_close(cache[h], hf[layer], rtol=0, atol=1e-6)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="embedded") as e:
        load_model("tiny-lama")
    assert "tiny-llama" in str(e.value)
    with pytest.raises(ValueError, match="non-empty"):
        load_model("")


def test_hub_name_offline_points_to_embedded(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnavailableError, match="model_name='embedded'"):
        load_model("gpt2")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        load_model("EleutherAI/pythia-70m")


def test_hook_helpers():
    assert hook_name(8) == "blocks.8.hook_resid_pre"
    assert hook_name(2, "hook_resid_post") == "blocks.2.hook_resid_post"
    assert hook_layer("blocks.11.hook_resid_mid") == 11
    with pytest.raises(ValueError, match="per-layer"):
        hook_layer("hook_embed")
    with pytest.raises(ValueError):
        hook_name(-1)


def test_check_hook_messages(tiny_llama):
    assert check_hook(tiny_llama, "blocks.3.hook_resid_pre") == "blocks.3.hook_resid_pre"
    with pytest.raises(ValueError, match=r"0\.\.3"):
        check_hook(tiny_llama, "blocks.7.hook_resid_pre")
    with pytest.raises(ValueError, match="blocks.1.hook_resid_pre") as e:
        check_hook(tiny_llama, "blocks.1.hook_resid_pr")
    assert "Closest" in str(e.value)


def _fake_cache(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    files = {}
    for name, content in {"model.safetensors": os.urandom(4096), "config.json": b"{}"}.items():
        (d / name).write_bytes(content)
        files[name] = {"bytes": len(content), "sha256": file_sha256(d / name)}
    (d / "manifest.json").write_text(json.dumps({"files": files}))
    return d


def test_embedded_cache_integrity_check(tmp_path):
    d = _fake_cache(tmp_path)
    check_embedded_cache(d)
    # Same size, one byte changed: only the checksum can tell.
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[100] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="sha256"):
        check_embedded_cache(d)
    (d / "model.safetensors").write_bytes(bytes(raw[:1000]))
    with pytest.raises(ValueError, match="bytes"):
        check_embedded_cache(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        check_embedded_cache(d)


def test_corrupt_embedded_cache_is_rebuilt(tmp_path, monkeypatch):
    """load_model notices a damaged cache and rebuilds it (the rebuild itself is stubbed)."""
    d = tmp_path / "models" / models.EMBEDDED_KEY
    d.parent.mkdir(parents=True)
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    calls = []

    def fake_prepare(target, force=False, verbose=True):
        calls.append((target, force))
        raise RuntimeError("stop here")

    monkeypatch.setattr(models, "prepare_embedded_model", fake_prepare)
    with pytest.warns(UserWarning, match="rebuilding"), pytest.raises(RuntimeError, match="stop here"):
        load_model("embedded", cache_dir=tmp_path)
    assert calls == [(d, True)]


@pytest.mark.skipif(
    not (models.embedded_cache_dir() / "manifest.json").is_file(),
    reason="embedded model cache not built (run the setup script)",
)
def test_embedded_model_loads_from_cache():
    m = load_model("embedded", device="cpu")
    assert m.saelib_name == "smollm2-135m"
    assert (m.cfg.n_layers, m.cfg.d_model) == (30, 576)
    toks = m.to_tokens("The cat sat on the mat.")
    assert toks[0, 0].item() == m.tokenizer.bos_token_id == 1
    with torch.inference_mode():
        _, cache = m.run_with_cache(toks, names_filter="blocks.5.hook_resid_pre", stop_at_layer=6)
    norms = cache["blocks.5.hook_resid_pre"][0].norm(dim=-1)
    # The BOS position is the attention sink: far larger than the rest of the row.
    assert norms[0] > 3 * norms[2:].median()


def test_transformerlens_processing_centres_the_residual_stream():
    """HookedTransformer's processing (centre writing weights) makes every resid vector mean-zero."""
    toks = torch.randint(3, 500, (2, 9))
    hook = "blocks.2.hook_resid_pre"
    means = {}
    for processing in ("raw", "transformerlens"):
        m = load_model("tiny-gpt2", device="cpu", processing=processing)
        assert m.saelib_processing == processing
        with torch.inference_mode():
            _, cache = m.run_with_cache(toks, names_filter=hook)
        means[processing] = cache[hook].mean(-1).abs().max().item()
    assert means["transformerlens"] < 1e-5 < means["raw"]
    with pytest.raises(ValueError, match="processing"):
        load_model("tiny-gpt2", processing="folded")


def test_model_device_reads_the_first_parameter():
    assert models.model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    if torch.cuda.is_available():
        assert models.model_device(torch.nn.Linear(2, 2).cuda()).type == "cuda"
    assert models.model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters
    assert models.model_device(object()) == torch.device("cpu")  # not a module at all
