"""top-AFA SAE (Lee et al. 2025, arXiv 2503.24277): per token, keep the prefix of the
decoder-scaled ranking whose cumulative norm is nearest to ||x_n - b_dec|| (the kernels and their
deterministic choices are in :mod:`saelib.sae.topafa`). ``afa_rule="first_crossing"`` keeps the
shortest prefix reaching the target instead. Its knob is the AFA loss weight λ (``afa_coeff``,
default 1/16, the paper's most used value); the loss itself is computed for every rule.

SAELens has no top-AFA activation: an export is refused unless ``allow_lossy=True``, and then
loads in SAELens as a plain ReLU SAE (the "standard" layout, metadata ``saelib_architecture``)."""
from __future__ import annotations

import torch

from saelib.sae.rules.base import Rule
from saelib.sae.topafa import topafa_select, topafa_select_first_crossing, topafa_select_reference


class TopAFA(Rule):
    name, label, color, linestyle = "topafa", "top-AFA", "#2ca02c", "-."
    paper_label = "Top-AFA"
    knob, knob_tag, knob_default = "afa_coeff", "afa", 1 / 16
    competes = needs_x = has_reference = True
    mask_is_positive = uses_key_buffer = True
    cost = 3.0  # its L0 and its selection make a step ~2-5x a TopK step (benchmarks/README.md)
    saelens_name = "standard"
    saelens_lossy = ("SAELens has no top-AFA activation: it would run these weights as a plain ReLU SAE, "
                     "ReLU(W_enc (x - b_dec)) with every positive pre-activation kept instead of the top-AFA "
                     "prefix, so its outputs would differ")

    def knob_label(self, value):
        inv = 1 / value if value > 0 else float("inf")
        return f"λ=1/{inv:.0f}" if abs(inv - round(inv)) < 1e-6 else f"λ={value:g}"

    def mask(self, sae, pre, x_n, *, training, key_buffer=None):
        target = sae._target_n(x_n)
        if sae.cfg.afa_rule == "first_crossing":
            return topafa_select_first_crossing(pre, sae.decoder_norms(), target)
        mask = topafa_select(pre, sae.decoder_norms(), target, k_start=sae._afa_k_hint, key_buffer=key_buffer)
        # the next batch starts its partial sort near this one's largest k (speed only; a strided
        # sample of rows is enough, and observe_l0 refines it from exact counts)
        self.observe_l0(sae, mask[:: max(1, mask.shape[0] // 256)].view(torch.uint8).sum(-1, dtype=torch.int32))
        return mask

    def competing_keys(self, pre, dec_norms):
        return (pre * dec_norms) ** 2

    def reference_mask(self, sae, pre, x_n):
        return topafa_select_reference(pre, sae.decoder_norms(), sae._target_n(x_n))

    def observe_l0(self, sae, l0_tokens):
        """First K of the next batch's partial sort: 1.25x this batch's largest k (speed only)."""
        sae._afa_k_hint = int(l0_tokens.max()) * 5 // 4 + 16 if l0_tokens.numel() else None


RULE = TopAFA()
