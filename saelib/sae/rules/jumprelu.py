"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"), trainable.

Selection: a_i = pre_i · H(pre_i - θ_i), one threshold θ_i >= 0 per latent (parameter
``jump_threshold``). H has no useful gradient, so training uses straight-through estimators
with the rectangle kernel K(u) = 1[-1/2 < u < 1/2] and bandwidth ε (``jump_bandwidth``):

    ∂/∂θ JumpReLU(z; θ) := -(θ/ε) K((z - θ)/ε)        ∂/∂z JumpReLU(z; θ) = H(z - θ)
    ∂/∂θ H(z - θ)       := -(1/ε) K((z - θ)/ε)        (no gradient to z)

and the sparsity penalty is ``l0_coeff`` · mean over tokens of Σ_i H(pre_i - θ_i) (SAEOutput.rule_loss).
SAELens' JumpReLU training does the same (``JumpReLU`` and ``Step`` functions, "step" sparsity
mode, STE to the threshold only). Deviations, each as current SAELens:

* θ is a parameter itself, not exp(log θ) as in the paper: Adam moves a parameter by ~lr per
  step, so log θ barely moves a small initial θ; θ is clamped at 0 before each training step.
* defaults ε = 0.05, initial θ = 0.01 (SAELens); the paper's ε = 0.001 assumes inputs scaled to
  unit mean squared norm, ours (per-token standardised) have ||x_n||^2 ≈ d_in.

Also: z here is the ReLU pre-activation (every saelib rule selects from relu(pre)), which
changes the θ-gradient only for θ < ε/2 (negative pre-activations then sit inside the kernel at
0), and saelib's ``mse_loss`` is a mean over N·d_in, so ``l0_coeff`` = SAELens'
``l0_coefficient`` / d_in for the same balance. SAELens export is exact (``jumprelu``)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from saelib.sae.rules.base import Rule


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class JumpReLUFn(torch.autograd.Function):
    """z·H(z - θ) with the straight-through threshold gradient above."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        g_theta = -(theta / ctx.eps) * rectangle((z - theta) / ctx.eps) * g
        return (z > theta) * g, g_theta.sum(0), None


class StepFn(torch.autograd.Function):
    """H(z - θ) with the straight-through threshold gradient above (none to z)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * rectangle((z - theta) / ctx.eps) * g).sum(0), None


class JumpReLU(Rule):
    name, label, color, linestyle = "jumprelu", "JumpReLU", "#9467bd", (0, (3, 1, 1, 1, 1, 1))
    paper_label = "JumpReLU"
    knob, knob_tag, knob_default = "l0_coeff", "l0", 1e-3
    uses_b_enc = True
    state_names = ("jump_threshold",)
    saelens_name = "jumprelu"
    saelens_loads = ("jumprelu",)

    def validate(self, cfg):
        super().validate(cfg)
        for f in ("jump_bandwidth", "jump_init_threshold"):
            v = getattr(cfg, f)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"SAEConfig.{f} must be a finite number > 0, got {v!r}")

    def init_state(self, sae):
        sae.jump_threshold = nn.Parameter(torch.full((sae.cfg.d_sae,), float(sae.cfg.jump_init_threshold),
                                                     dtype=sae.cfg.torch_dtype))

    def mask(self, sae, pre, x_n, *, training, key_buffer=None):
        return pre > sae.jump_threshold

    def sparse_ok(self, sae):
        return False  # θ's gradient needs the pre-activations near θ, selected or not

    def activate(self, sae, pre_g, mask):
        return JumpReLUFn.apply(pre_g, sae.jump_threshold, sae.cfg.jump_bandwidth)

    @torch.no_grad()
    def before_step(self, sae):
        sae.jump_threshold.clamp_(min=0.0)

    def loss(self, sae, pre, n):
        if not sae.cfg.l0_coeff:
            return None
        step = StepFn.apply(pre.detach(), sae.jump_threshold, sae.cfg.jump_bandwidth)
        return sae.cfg.l0_coeff * step.sum(-1).mean()

    def to_saelens(self, sae, w):
        w["threshold"] = sae.jump_threshold.detach().clone()
        return {}

    def from_saelens(self, lsae, lcfg, meta):
        return {}, {"jump_threshold": lsae.threshold.detach().float().cpu()}


RULE = JumpReLU()
