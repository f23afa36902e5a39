"""saelib.analysis.inspect: contexts, logits and views of any SAE's latents."""

from __future__ import annotations

import pytest
import torch

from saelib.analysis import inspect as I
from saelib.analysis.meta import Decomposition
from saelib.lm.models import load_model
from saelib.sae.core import SAE, SAEConfig


def test_top_activating_contexts_tiny_model():
    model = load_model("tiny-llama")
    hook = "blocks.1.hook_resid_pre"
    sae = SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=16, activation="topk", k=3, hook_name=hook)).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(3, vocab, (6, 12), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else 1
    latents = [0, 3, 7]
    ctx = I.top_activating_contexts(model, sae, tokens, latents, n=4, batch_size=4, before=3, after=1)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == hook)
    with torch.no_grad():
        acts = sae.encode(cache[hook].reshape(-1, model.cfg.d_model)).reshape(6, 12, -1)
    for lat in latents:
        a = acts[:, 1:, lat].flatten()
        expected = a[a > 0].sort(descending=True).values[:4]
        got = [c.act for c in ctx[lat]]
        assert got == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
        for c in ctx[lat]:
            assert c.pos >= 1 and c.act == pytest.approx(float(acts[c.row, c.pos, lat]), rel=1e-4)
            tok = model.tokenizer.decode([int(tokens[c.row, c.pos])]).replace("\n", "↵")
            assert f"[[{tok}]]" in c.text and "<mark>" in c.html
    # top logits of a direction via the unembedding
    W_U = I.unembedding(model)
    direction = W_U[:, 5] / W_U[:, 5].norm()
    top = I.top_logits(direction, model, k=3)
    assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    # readable views
    codes_row = Decomposition(0, [2, 1], [0.5, 0.2])
    text = I.latent_view(0, codes_row, contexts=ctx[0], latent_logits=top)
    assert "meta     2" in text or "meta 2" in text.replace("  ", " ")
    assert "<table>" in I.latent_view_html(0, codes_row, contexts=ctx[0])
    # without a decomposition: any SAE's latent, no meta-latent section
    plain = I.latent_view(3, contexts=ctx[3], latent_logits=top)
    assert "meta-latents" not in plain and "top contexts" in plain and "latent 3" in plain
    assert "<th>meta-latent</th>" not in I.latent_view_html(3, contexts=ctx[3])
    with pytest.raises(ValueError, match=r"\[rows, seq_len\]"):
        I.top_activating_contexts(model, sae, tokens[0], 0)
