"""TopK SAE (Gao et al. 2024): keep the k largest ReLU pre-activations of each token.

SAELens export: ``topk`` with ``rescale_acts_by_decoder_norm=False`` (b_enc = 0 when unused)."""
from __future__ import annotations

import torch

from saelib.sae.rules.base import Rule


class TopK(Rule):
    name, label, color, linestyle = "topk", "TopK", "#1f77b4", "-"
    paper_label = "Top-k"
    knob, knob_tag = "k", "k"
    competes = per_token_k = True
    saelens_name = "topk"
    saelens_loads = ("topk",)

    def mask(self, sae, pre, x_n, *, training, key_buffer=None):
        idx = pre.topk(sae.cfg.k, dim=-1, sorted=False).indices
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, True)

    def sparse_ok(self, sae) -> bool:
        return sae.cfg.k <= sae.sparse_max_density * sae.cfg.d_sae

    def sparse_select(self, sae, pre):
        k = sae.cfg.k
        cols = pre.topk(k, dim=-1, sorted=False).indices.flatten()
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, cols

    def to_saelens(self, sae, w):
        return {"k": sae.cfg.k, "rescale_acts_by_decoder_norm": False}

    def from_saelens(self, lsae, lcfg, meta):
        return {"k": int(lcfg.k)}, {}


RULE = TopK()
