"""ReLU SAE with an L1 penalty (Bricken et al. 2023, "vanilla"): every positive pre-activation is
kept; sparsity comes from ``l1_coeff`` · mean over tokens of Σ_i a_i·||W_dec[i]||."""
from __future__ import annotations

from saelib.sae.rules.base import Rule


class ReLU(Rule):
    name, label, color, linestyle = "relu", "ReLU+L1", "#7f7f7f", ":"
    paper_label = "ReLU"
    knob, knob_tag, knob_default = "l1_coeff", "l1", 5.0
    uses_b_enc = True
    saelens_name = "standard"
    saelens_loads = ("standard",)

    def sparse_ok(self, sae) -> bool:
        return False  # every positive latent is kept: no sparse selection to gather


RULE = ReLU()
