"""Sparse autoencoders: configuration, model, losses, save/load.

One class, :class:`SAE`, for every activation rule; each rule (ReLU+L1, TopK, BatchTopK, top-AFA,
JumpReLU) lives in :mod:`saelib.sae.rules` with its selection, knob, losses and threshold update.

Shapes: ``x`` [N, d_in], ``pre_acts``/``acts`` [N, d_sae], ``W_enc`` [d_in, d_sae],
``W_dec`` [d_sae, d_in], ``b_enc`` [d_sae], ``b_dec`` [d_in].

Forward pass (in the *normalised* space, see ``input_norm``)::

    pre  = relu((x_n - b_dec) @ W_enc + b_enc)      # b_enc only when cfg.use_b_enc
    acts = select(pre)                               # the rule (SAE.rule)
    x_hat_n = acts @ W_dec + b_dec

Input normalisation (``SAEConfig.input_norm``); "model space" is the space of the model's x:

* ``"none"``   x_n = x.
* ``"global"`` x_n = s·x, one scalar s (buffer ``input_scale``) fitted by :meth:`SAE.fit_input_norm`
  so that mean ||s·x|| = sqrt(d_in). :meth:`save` folds s into the weights (W_enc·s, W_dec/s,
  b_dec/s), so the file works in model space for any tool; :meth:`load` unfolds it.
* ``"token"``  the paper's per-token standardisation x_n = (x - mean(x)) / (std(x) + 1e-5) (std
  unbiased, over d_in), back with x_hat = x_hat_n·std + mean (no eps, as the paper and SAELens'
  "layer_norm"); ||x_n|| ≈ sqrt(d_in - 1). Undoing it needs the token's own mean and std, so
  ``decode(acts, x=x)`` needs the input (without it, it raises; so does ``center_input``).

:meth:`encode`, :meth:`decode`, :meth:`reconstruct` and :meth:`forward` take and return model space.

Losses (``SAEOutput``), in the normalised space as in the paper:

* ``mse_loss`` = mean over N·d_in of (x_hat_n - x_n)^2 (the paper's "normalised MSE");
* ``afa_loss`` = mean over tokens of (||f|| - target)^2, weighted by ``afa_coeff``
  (``afa_target="paper"``: f unscaled, target ||x_n||; ``"consistent"``: f decoder-scaled,
  target ||x_n - b_dec||, the same target the selection uses);
* ``aux_loss`` = aux_coeff · mean over N·d_in of (e - r)^2, r = x_n - x_hat_n *detached* (Gao et
  al.; the paper's code does not detach: ``aux_detach_residual``), e the reconstruction (no
  bias) from the top-``aux_k`` pre-activations among dead latents;
* ``l1_loss``  = l1_coeff · mean over tokens of sum_i acts_i·||W_dec[i]|| (ReLU SAEs);
* ``rule_loss`` = the rule's own term (JumpReLU's L0 penalty), 0 for the others.

The trainer keeps decoder rows at unit norm: after ``backward()``
:meth:`SAE.remove_gradient_parallel_to_decoder_directions`, step, then
:meth:`SAE.set_decoder_norm_to_unit_norm`.

Where this differs from the paper's code (arXiv 2503.24277, ``training/sae.py``), and why:

* BatchTopK has an inference threshold θ (:mod:`saelib.sae.rules.batchtopk`).
* ``b_dec_init`` (default "zeros", the paper) can start b_dec at the first batch's mean
  (sparsify) or geometric median (dictionary_learning); ``afa_rule="first_crossing"`` keeps the
  shortest top-AFA prefix reaching the target (paper: nearest prefix).
* The aux residual is detached by default (above). Dead latents are counted in tokens, not
  batches (same default: 5 × 4096 tokens), with one comparison (``>=``) for loss and count.
* Top-AFA ties are broken by latent index and cumulative sums use float64 (:mod:`saelib.sae.topafa`).
* Defaults that keep the paper: no encoder bias for topk/batchtopk/topafa, the Kaiming fan-in
  quirk (``init_fan_in``), seed 49, λ_AFA = 1/16, aux 1/32 over 512 latents.
* Training steps with few active latents take a sparse path (:mod:`saelib.sae.kernels`; same
  maths, tested against plain autograd): the encoder backward and the decoder touch only the
  selected latents, the aux loss only the dead ones.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.sae.checkpoint import CFG_FILE, load_files, save_files
from saelib.sae.kernels import DenseEncode, GatheredDecode, GatherPreActs, safe_sqrt, sparse_decode
from saelib.sae.rules import RULES, Rule, get_rule

__all__ = [
    "ACTIVATIONS",
    "SAEConfig",
    "SAE",
    "SAEOutput",
    "load_sae",
    "geometric_median",
]

ACTIVATIONS = tuple(RULES)
INPUT_NORMS = ("none", "global", "token")
AFA_TARGETS = ("paper", "consistent")
INIT_FAN_IN = ("paper", "d_in")
B_DEC_INITS = ("zeros", "mean", "geometric_median")
AFA_RULES = ("nearest", "first_crossing")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKEN_NORM_EPS = 1e-5  # the paper's x / (std + 1e-5)


@dataclass
class SAEConfig:
    """Configuration of one sparse autoencoder (see the module docstring for the maths)."""

    d_in: int
    """Width of the input activations (the model's d_model at ``hook_name``)."""
    d_sae: int
    """Number of latents (dictionary size h)."""
    activation: str = "topk"
    """Activation rule, a name in :data:`saelib.sae.rules.RULES`."""
    k: int | None = None
    """Latents per token for "topk"; average latents per token for "batchtopk". Required for
    those two, ignored (must be None) for the others."""
    afa_coeff: float | None = None
    """Weight λ of the AFA norm-matching loss. None → 1/16 for "topafa", 0 otherwise. The term
    is always computed and logged. (None for a coefficient = the rule's default when it is the
    rule's knob, else 0.)"""
    afa_target: str = "paper"
    """"paper": the paper's code (selection targets ||x_n - b_dec||, the loss compares the unscaled
    ||f|| with ||x_n||). "consistent": selection and loss both target ||x_n - b_dec|| and the loss
    uses decoder-scaled activations (the f̃ view of the theory)."""
    l1_coeff: float | None = None
    """L1 sparsity weight (decoder-norm weighted). None → 5.0 for "relu", 0 otherwise."""
    l0_coeff: float | None = None
    """JumpReLU L0 penalty weight. None → 1e-3 for "jumprelu", 0 otherwise."""
    jump_bandwidth: float = 0.05
    """JumpReLU: bandwidth ε of the straight-through estimator's rectangle kernel."""
    jump_init_threshold: float = 0.01
    """JumpReLU: initial threshold θ of every latent."""
    aux_k: int = 512
    """Number of dead latents used by the auxiliary dead-latent loss (top_k_aux); 0 disables it."""
    aux_coeff: float = 1 / 32
    """Weight of the auxiliary dead-latent loss (the paper's aux_penalty = 1/32)."""
    aux_detach_residual: bool = True
    """Detach the residual the aux loss reconstructs (Gao et al.). The paper's code does not
    detach (False reproduces it), which lets the aux loss push on the live reconstruction."""
    dead_after_tokens: int = 20_480
    """A latent is dead once it has not fired for this many training tokens. The default is the
    paper's 5 batches of 4096 tokens; the TopK literature uses ~10M."""
    threshold_lr: float = 0.01
    """BatchTopK only: EMA rate of the inference threshold θ, updated each training step towards
    the smallest positive activation kept by the batch rule (as SAELens' ``topk_threshold_lr``)."""
    input_norm: str = "none"
    """Input normalisation: "none", "global" (one fitted scalar; folded into the weights at save
    time) or "token" (the paper's per-token standardisation)."""
    center_input: bool = False
    """Subtract each token's mean over d_in before the SAE (and add it back after decoding): for
    SAEs trained on TransformerLens-centred residual streams (``center_writing_weights``, e.g.
    gpt2-small-res-jb) run on a model with raw weights, whose streams differ by exactly that mean."""
    use_b_enc: bool | None = None
    """Use an encoder bias. None → the rule's default (``Rule.uses_b_enc``: False for
    topk/batchtopk/topafa, as the paper's and Bussmann et al.'s code; True for relu/jumprelu)."""
    init_fan_in: str = "paper"
    """Kaiming-uniform fan-in for W_enc: "paper" uses PyTorch's fan_in = size(1) = d_sae of the
    [d_in, d_sae] matrix (the paper's code, 4x smaller than intended at 16x expansion); "d_in"
    uses the true fan-in d_in."""
    seed: int = 49
    """Seed of the initialisation (the paper uses 49)."""
    b_dec_init: str = "zeros"
    """Initial decoder bias: "zeros" (the top-AFA paper's and Bussmann et al.'s code), "mean"
    (the mean of the first training batch, in the normalised space; EleutherAI's sparsify) or
    "geometric_median" (Weiszfeld iterations on the first batch; saprmarks/dictionary_learning).
    Applied by :meth:`SAE.init_b_dec`, which the trainer calls on its first batch."""
    afa_rule: str = "nearest"
    """top-AFA only: "nearest" keeps the prefix whose cumulative norm is nearest to the target
    (the paper's code); "first_crossing" keeps the shortest prefix whose cumulative norm reaches
    the target (the "basic" variant of the paper's step-by-step notebook, unused there)."""
    dtype: str = "float32"
    """Parameter dtype: "float32" (the paper), "float64", "bfloat16" or "float16"."""
    hook_name: str = "blocks.0.hook_resid_pre"
    """TransformerLens hook the SAE reads (``batches[hook_name]`` in training)."""
    model_name: str = ""
    """Name of the language model the SAE was trained on (metadata)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {v!r}")
        rule = get_rule(self.activation)
        rule.validate(self)
        if rule.knob != "k" and self.k is not None:
            uses = "/".join(r.name for r in RULES.values() if r.knob == "k")
            raise ValueError(f"k={self.k} is only used by {uses}, not {self.activation!r}; pass k=None")
        for f in ("afa_coeff", "l1_coeff", "l0_coeff"):
            if getattr(self, f) is None:
                setattr(self, f, rule.knob_default if rule.knob == f else 0.0)
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{f} must be a finite number >= 0, got {v!r}")
        if self.afa_target not in AFA_TARGETS:
            raise ValueError(f"Unknown afa_target {self.afa_target!r}; choose one of {AFA_TARGETS}")
        if isinstance(self.aux_k, bool) or not isinstance(self.aux_k, int) or self.aux_k < 0:
            raise ValueError(f"aux_k must be an int >= 0 (0 disables the aux loss), got {self.aux_k!r}")
        if not math.isfinite(self.aux_coeff) or self.aux_coeff < 0:
            raise ValueError(f"aux_coeff must be a finite number >= 0, got {self.aux_coeff!r}")
        if isinstance(self.dead_after_tokens, bool) or not isinstance(self.dead_after_tokens, int) or self.dead_after_tokens <= 0:
            raise ValueError(f"dead_after_tokens must be a positive int (tokens), got {self.dead_after_tokens!r}")
        if not (0 < self.threshold_lr <= 1):
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr!r}")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"Unknown input_norm {self.input_norm!r}; choose one of {INPUT_NORMS}")
        if self.use_b_enc is None:
            self.use_b_enc = rule.uses_b_enc
        if self.init_fan_in not in INIT_FAN_IN:
            raise ValueError(f"Unknown init_fan_in {self.init_fan_in!r}; choose one of {INIT_FAN_IN}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose one of {tuple(_DTYPES)}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"Unknown b_dec_init {self.b_dec_init!r}; choose one of {B_DEC_INITS}")
        if self.afa_rule not in AFA_RULES:
            raise ValueError(f"Unknown afa_rule {self.afa_rule!r}; choose one of {AFA_RULES}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def rule(self) -> Rule:
        return get_rule(self.activation)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown SAEConfig keys {unknown}: this config was written by another "
                             f"library or version; known keys are {sorted(names)}")
        return cls(**d)


class SAEOutput(NamedTuple):
    """Output of :meth:`SAE.forward`. Losses are scalars in the normalised space."""

    x_hat: Tensor
    """[N, d_in] reconstruction in model space."""
    acts: Tensor
    """[N, d_sae] selected activations (dense, zeros elsewhere)."""
    loss: Tensor
    """Total loss = mse + afa_coeff·afa + aux + l1 (the coefficients already applied to aux, l1)."""
    mse_loss: Tensor
    """Mean over N·d_in of the squared error in the normalised space."""
    afa_loss: Tensor
    """Unweighted AFA loss mean_b (||f_b|| - target_b)^2 (weighted by afa_coeff in ``loss``)."""
    aux_loss: Tensor
    """Weighted auxiliary dead-latent loss (0 when no latent is dead or aux_k = 0)."""
    l1_loss: Tensor
    """Weighted L1 penalty."""
    rule_loss: Tensor
    """The rule's own weighted term (:meth:`Rule.loss`, e.g. JumpReLU's L0 penalty), else 0."""
    l0: Tensor
    """Mean number of non-zero activations per token (float scalar, no grad)."""
    pre_acts: Tensor
    """[N, d_sae] ReLU pre-activations before selection (detached)."""
    n_dead: Tensor
    """Number of latents currently counted dead (long scalar)."""
    l0_tokens: Tensor
    """[N] number of non-zero activations of each token (long; the per-token L0)."""
    fired: Tensor
    """[d_sae] bool: latents with a non-zero activation on some token of the batch."""


class SAE(nn.Module):
    """Sparse autoencoder; its activation rule is ``cfg.activation`` (:attr:`rule`)."""

    def __init__(self, cfg: SAEConfig, *, device: str | torch.device | None = None):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE expects an SAEConfig, got {type(cfg).__name__}; build one with SAEConfig(d_in=..., d_sae=..., ...)")
        self.cfg = cfg
        dt = cfg.torch_dtype
        g = torch.Generator().manual_seed(cfg.seed)
        # The paper: kaiming_uniform_(empty(d_in, d_sae)) after manual_seed(49); PyTorch takes
        # fan_in = size(1) = d_sae ("paper"). mode="fan_out" uses size(0) = d_in, the true fan-in.
        W_enc = nn.init.kaiming_uniform_(torch.empty(cfg.d_in, cfg.d_sae), generator=g,
                                         mode="fan_in" if cfg.init_fan_in == "paper" else "fan_out")
        W_dec = W_enc.T.contiguous()  # row-major: row gathers (embedding_bag) need it
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.W_enc = nn.Parameter(W_enc.to(dt))
        self.W_dec = nn.Parameter(W_dec.to(dt))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dt))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dt))
        if not cfg.use_b_enc:
            self.b_enc.requires_grad_(False)
        # "global" input normalisation scale s (x_n = s·x)
        self.register_buffer("input_scale", torch.ones((), dtype=dt))
        # BatchTopK inference threshold θ (NaN until the first training step)
        self.register_buffer("threshold", torch.full((), float("nan"), dtype=dt))
        self._afa_k_hint: int | None = None  # top-AFA: where the next partial sort starts (speed only)
        self.rule.init_state(self)
        self._last_dense = False  # the previous training batch took the dense path (speed only)
        # tokens since each latent last fired (training only)
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ helpers
    @property
    def rule(self) -> Rule:
        return get_rule(self.cfg.activation)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def _check_input(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor [N, {self.cfg.d_in}], got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"{name} has width {tuple(x.shape)[-1:] or '()'} (shape {tuple(x.shape)}), but this SAE "
                             f"expects d_in={self.cfg.d_in} (hook {self.cfg.hook_name!r}); pass activations of that hook")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf values; clean the activations (e.g. drop those tokens) before the SAE")
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        return x

    def _flatten(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, x.shape[-1]), lead

    def normalize(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor | None] | None]:
        """Model space [N, d_in] → normalised space; returns (x_n, stats) where stats =
        (mean [N,1], std [N,1]) in "token" mode, (mean, None) with ``center_input``, else None."""
        mode, stats = self.cfg.input_norm, None
        if self.cfg.center_input or mode == "token":
            mean = x.mean(-1, keepdim=True)
            x = x - mean
            stats = (mean, None)
        if mode == "global":
            return x * self.input_scale, stats
        if mode == "token":
            std = x.std(-1, keepdim=True)
            return x / (std + _TOKEN_NORM_EPS), (mean, std)
        return x, stats

    def denormalize(self, x_n: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
        """Inverse of :meth:`normalize`."""
        mode = self.cfg.input_norm
        if mode == "global":
            x_n = x_n / self.input_scale
        if not (self.cfg.center_input or mode == "token"):
            return x_n
        if stats is None:
            raise ValueError(f"input_norm={mode!r}, center_input={self.cfg.center_input} needs the per-token mean (and "
                             "std) of the original input to go back to model space: call decode(acts, x=x) or reconstruct(x)")
        mean, std = stats
        return (x_n if std is None else x_n * std) + mean  # the paper and SAELens' layer_norm: no eps on the way back

    @torch.no_grad()
    def fit_input_norm(self, x: Tensor) -> float:
        """Fit the "global" scale s so that mean ||s·x|| = sqrt(d_in) on a sample x [N, d_in].
        Returns s. Only valid for input_norm="global"."""
        if self.cfg.input_norm != "global":
            raise ValueError(f"fit_input_norm is for input_norm='global', this SAE has {self.cfg.input_norm!r}")
        x = self._check_input(x)
        x, _ = self._flatten(x)
        mean_norm = x.double().norm(dim=-1).mean().item()
        if mean_norm <= 0:
            raise ValueError("fit_input_norm got all-zero activations; pass real activations")
        s = math.sqrt(self.cfg.d_in) / mean_norm
        self.input_scale.fill_(s)
        return s

    def affine(self, *, normalised: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Model-space (W_enc [d_in, m], b_enc [m], W_dec [m, d_in], b_dec [d_in]), detached
        copies, with pre = relu((x - b_dec) @ W_enc + b_enc) and x_hat = acts @ W_dec + b_dec:
        a "global" scale s is folded in (W_enc·s, W_dec/s, b_dec/s) and b_enc is 0 when unused.
        Per-token standardisation and centring depend on each token, so they have no affine view;
        ``normalised=True`` returns the tensors of the normalised space instead (any input_norm)."""
        if not normalised and (self.cfg.input_norm == "token" or self.cfg.center_input):
            raise ValueError("an SAE with input_norm='token' or center_input=True is not affine in model space; "
                             "use encode/decode (or retrain with input_norm='none'/'global')")
        W_enc, b_enc = self.W_enc.detach().clone(), self.b_enc.detach().clone()
        W_dec, b_dec = self.W_dec.detach().clone(), self.b_dec.detach().clone()
        if not self.cfg.use_b_enc:
            b_enc.zero_()
        if self.cfg.input_norm == "global" and not normalised:
            s = self.input_scale.detach()
            W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
        return W_enc, b_enc, W_dec, b_dec

    @classmethod
    def from_affine(cls, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, like: "SAE",
                    **overrides: Any) -> "SAE":
        """An SAE in eval mode from model-space affine tensors (see :meth:`affine`), with the rule,
        its state (thresholds) and the config of ``like``: d_sae = W_enc.shape[1], input_norm
        "none", encoder bias on; ``overrides`` replace config fields (e.g. ``k``). Per-latent rule
        state (JumpReLU's thresholds) comes from ``like`` or ``state={name: tensor}``."""
        state = overrides.pop("state", None)
        d_in, m = W_enc.shape
        if W_dec.shape != (m, d_in) or b_enc.shape != (m,) or b_dec.shape != (d_in,):
            raise ValueError(f"from_affine: shapes W_enc {tuple(W_enc.shape)}, b_enc {tuple(b_enc.shape)}, W_dec "
                             f"{tuple(W_dec.shape)}, b_dec {tuple(b_dec.shape)} do not fit [d_in, m], [m], [m, d_in], [d_in]")
        d = {**like.cfg.to_dict(), "d_in": d_in, "d_sae": m, "input_norm": "none", "use_b_enc": True, **overrides}
        if get_rule(d["activation"]).knob != "k":  # another rule (stitched BatchTopK -> JumpReLU) drops k
            d["k"] = None
        cfg = SAEConfig.from_dict(d)
        sae = cls(cfg, device=W_dec.device)
        if state is None:  # the rule's own per-latent state (same rule, same latents)
            state = {n: getattr(like, n) for n in like.rule.state_names} if cfg.activation == like.cfg.activation else {}
        with torch.no_grad():
            for name, v in {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec,
                            "threshold": like.threshold, **state}.items():
                getattr(sae, name).copy_(v.detach().to(sae.dtype))
        return sae.eval()

    def with_cfg(self, **changes: Any) -> "SAE":
        """A copy with config fields replaced (e.g. ``center_input=True``), same weights and state."""
        sae = type(self)(SAEConfig.from_dict({**self.cfg.to_dict(), **changes}), device=self.device)
        sae.load_state_dict(self.state_dict())
        return sae.train(self.training)

    def decoder_norms(self) -> Tensor:
        """[d_sae] row norms of W_dec (detached)."""
        return self.W_dec.detach().norm(dim=-1)

    @torch.no_grad()
    def init_b_dec(self, x: Tensor) -> Tensor:
        """Set b_dec from a sample x [N, d_in] (model space) as ``cfg.b_dec_init`` says, in the
        normalised space the SAE works in: "zeros" leaves it at 0, "mean" takes the mean of the
        normalised x, "geometric_median" the point minimising the sum of Euclidean distances
        to them (:func:`geometric_median`). Returns the new b_dec."""
        mode = self.cfg.b_dec_init
        if mode == "zeros":
            return self.b_dec.detach()
        x = self._check_input(x)
        x_n, _ = self.normalize(self._flatten(x)[0])
        if x_n.shape[0] == 0:
            raise ValueError("init_b_dec got an empty sample; pass at least one token")
        b = x_n.double().mean(0) if mode == "mean" else geometric_median(x_n.double())
        self.b_dec.copy_(b.to(self.dtype))
        return self.b_dec.detach()

    def calibrate_threshold(self, batches: list[Tensor]) -> float:
        """Re-estimate the rule's inference threshold with the current weights over ``batches``
        (model-space training batches; BatchTopK: :meth:`BatchTopK.calibrate`). Returns θ."""
        if not self.rule.calibrates:
            names = "/".join(n for n, r in RULES.items() if r.calibrates)
            raise ValueError(f"calibrate_threshold is for {names} SAEs, this one is {self.cfg.activation!r}")
        return self.rule.calibrate(self, batches)

    # ------------------------------------------------------------------ encode/decode
    def _pre_acts_n(self, x_n: Tensor) -> Tensor:
        pre = (x_n - self.b_dec) @ self.W_enc
        if not torch.is_grad_enabled():  # in place: one [N, d_sae] buffer instead of three
            if self.cfg.use_b_enc:
                pre.add_(self.b_enc)
            return pre.relu_()
        if self.cfg.use_b_enc:
            pre = pre + self.b_enc
        return F.relu(pre)

    def _target_n(self, x_n: Tensor) -> Tensor:
        """top-AFA selection target ||x_n - b_dec|| [N] (both afa_target modes)."""
        return (x_n - self.b_dec.detach()).norm(dim=-1)

    def pre_acts(self, x: Tensor) -> Tensor:
        """ReLU pre-activations [N, d_sae] (before selection) of model-space x [N, d_in]."""
        x = self._check_input(x)
        x2, lead = self._flatten(x)
        x_n, _ = self.normalize(x2)
        return self._pre_acts_n(x_n).reshape(*lead, self.cfg.d_sae)

    def _select_mask(self, pre: Tensor, x_n: Tensor, *, training: bool,
                     key_buffer: Tensor | None = None) -> Tensor | None:
        """Boolean keep-mask [N, d_sae] (None = keep all). ``key_buffer``: scratch like ``pre``."""
        with torch.no_grad():
            return self.rule.mask(self, pre, x_n, training=training, key_buffer=key_buffer)

    def select(self, pre_acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Apply the activation rule to ReLU pre-activations [N, d_sae]; ``x`` (model space) is
        needed for "topafa" (the target norm). Uses the eval-mode rule when not training."""
        if self.rule.needs_x and x is None:
            raise ValueError(f"select() for {self.cfg.activation} needs the input x (its norm is the target): select(pre_acts, x)")
        x_n = None
        if x is not None:
            x = self._check_input(x)
            x_n, _ = self.normalize(self._flatten(x)[0])
        pre2, lead = self._flatten(pre_acts)
        mask = self._select_mask(pre2, x_n, training=self.training)
        out = pre2 if mask is None else pre2 * mask
        return out.reshape(*lead, self.cfg.d_sae)

    def _encode_flat(self, x2: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Model-space x [N, d_in] → (activations [N, d_sae], normalisation stats)."""
        x_n, stats = self.normalize(x2)
        pre = self._pre_acts_n(x_n)
        mask = self._select_mask(pre, x_n, training=self.training)
        return (pre if mask is None else pre * mask), stats

    def encode(self, x: Tensor) -> Tensor:
        """Model-space x [..., d_in] → sparse activations [..., d_sae] (dense tensor with zeros)."""
        x2, lead = self._flatten(self._check_input(x))
        acts, _ = self._encode_flat(x2)
        return acts.reshape(*lead, self.cfg.d_sae)

    def decode(self, acts: Tensor, x: Tensor | None = None) -> Tensor:
        """Activations [..., d_sae] → reconstruction in model space [..., d_in].

        In input_norm="token" mode pass the original input ``x`` (its per-token mean and std undo
        the standardisation)."""
        if not isinstance(acts, Tensor):
            raise TypeError(f"acts must be a torch.Tensor [N, {self.cfg.d_sae}], got {type(acts).__name__}; "
                            "convert it first (torch.as_tensor(acts))")
        if acts.ndim < 1 or acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"acts has shape {tuple(acts.shape)}, but this SAE has d_sae={self.cfg.d_sae}: "
                             "pass activations of this SAE (its encode output)")
        a2, lead = self._flatten(acts.to(self.dtype))
        x_hat_n = a2 @ self.W_dec + self.b_dec
        stats = None
        if (self.cfg.input_norm == "token" or self.cfg.center_input) and x is not None:
            x = self._check_input(x)
            _, stats = self.normalize(self._flatten(x)[0])
        return self.denormalize(x_hat_n, stats).reshape(*lead, self.cfg.d_in)

    def reconstruct(self, x: Tensor) -> Tensor:
        """Model-space x → model-space x_hat (works in every input_norm mode)."""
        x2, lead = self._flatten(self._check_input(x))
        acts, stats = self._encode_flat(x2)
        return self.denormalize(acts @ self.W_dec + self.b_dec, stats).reshape(*lead, self.cfg.d_in)

    # ------------------------------------------------------------------ training forward
    sparse_kernels: bool = True
    """Use the fast training kernels: with few active latents, gather the selected
    pre-activations with a sparse encoder backward and decode with ``embedding_bag``; otherwise a
    dense encoder whose backward skips the input gradient. ``False`` runs plain autograd (the
    naive reference the tests compare the fast paths with)."""
    sparse_max_density: float = 1 / 16
    """Largest fraction of active latents for which the sparse path is used."""

    def forward(self, x: Tensor) -> SAEOutput:
        """Full forward pass with losses; x [N, d_in] in model space. In training mode it also
        updates the dead-latent counters and (BatchTopK) the inference threshold."""
        cfg, rule = self.cfg, self.rule
        if self.training:
            rule.before_step(self)
        x = self._check_input(x)
        x, _ = self._flatten(x)
        n = x.shape[0]
        x_n, stats = self.normalize(x)
        x_cent = x_n - self.b_dec.detach()
        can_sparse = self.sparse_kernels and not x_n.requires_grad and rule.sparse_ok(self)
        pre_g = None
        acts_buf = None
        fused = self.sparse_kernels and not x_n.requires_grad

        def encode_with_grad(pre_done: Tensor | None = None) -> Tensor:  # [N, d_sae] ReLU pre-acts with grad
            if fused:  # backward without the [N, d_in] input-gradient product; reuses pre_done
                return DenseEncode.apply(x_cent, self.W_enc, self.b_enc, self.b_dec, cfg.use_b_enc, pre_done)
            return self._pre_acts_n(x_n)

        if not can_sparse or self._last_dense:  # one encoder matmul, with grad
            pre_g = encode_with_grad()
            pre = pre_g.detach()
            with torch.no_grad():
                mask = self._select_mask(pre, x_n, training=self.training)
            use_sparse = False
            if can_sparse:  # density decides the next batch's path
                self._last_dense = bool(torch.count_nonzero(mask) > self.sparse_max_density * mask.numel())
        else:
            with torch.no_grad():
                pre = rule.selection_pre_acts(self, x_n)
                picked = rule.sparse_select(self, pre)
                if picked is not None:  # no dense mask needed (TopK)
                    mask = None
                    rows, cols = picked
                    use_sparse = True
                else:
                    # ranking keys (top-AFA) go to the buffer that later holds the dense
                    # activations: one [N, d_sae] allocation serves both
                    acts_buf = torch.empty_like(pre) if rule.uses_key_buffer else None
                    mask = self._select_mask(pre, x_n, training=self.training, key_buffer=acts_buf)
                    if not rule.mask_is_positive:
                        mask &= pre > 0
                    use_sparse = int(torch.count_nonzero(mask)) <= self.sparse_max_density * mask.numel()
                    if use_sparse:
                        rows, cols = mask.nonzero(as_tuple=True)
            self._last_dense = not use_sparse
        if use_sparse:
            vals = GatherPreActs.apply(x_cent, self.W_enc, self.b_enc, self.b_dec, rows, cols,
                                        pre[rows, cols], cfg.use_b_enc)
            x_hat_n = sparse_decode(self.W_dec, rows, cols, vals, n) + self.b_dec
            acts = acts_buf.zero_() if acts_buf is not None else vals.new_zeros(n, cfg.d_sae)
            acts.index_put_((rows, cols), vals)  # in place: no second [N, d_sae] buffer
            with torch.no_grad():  # per-token L0 and firing latents from the nnz entries, not [N, d_sae]
                pos = vals.detach() > 0
                l0_tokens = torch.bincount(rows[pos], minlength=n)
                fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=x.device)
                fired[cols[pos]] = True
            sq = vals.new_zeros(n).index_add(0, rows, vals.square())
            dn = self.W_dec.norm(dim=-1)
            dn_sel = dn.index_select(0, cols)  # not dn[cols]: its backward accumulates in a thread-dependent order
            sq_scaled = vals.new_zeros(n).index_add(0, rows, (vals * dn_sel).square())
            abs_scaled = None
        else:
            if pre_g is None:  # the sparse attempt found a dense selection: attach its pre-acts to the graph
                acts_buf = None  # the keys are no longer needed
                pre_g = encode_with_grad(pre)
            acts = rule.activate(self, pre_g, mask)
            x_hat_n = acts @ self.W_dec + self.b_dec
            with torch.no_grad():  # pre >= 0 (ReLU), so acts != 0 <=> selected and pre > 0
                nz = pre > 0 if mask is None else mask & (pre > 0)
                l0_tokens = nz.view(torch.uint8).sum(-1, dtype=torch.int32).long()  # 2x faster than bool.sum
                fired = nz.any(0)
                del nz
            dn = self.W_dec.norm(dim=-1)
            a2 = acts.square()  # one [N, d_sae] temporary for the three norms
            sq = a2.sum(-1)
            sq_scaled = a2 @ dn.square()
            abs_scaled = acts @ dn

        mse = (x_hat_n - x_n).pow(2).mean()
        if cfg.afa_target == "paper":
            afa = (safe_sqrt(sq) - x_n.norm(dim=-1)).pow(2).mean()
        else:
            afa = (safe_sqrt(sq_scaled) - x_cent.norm(dim=-1)).pow(2).mean()
        if cfg.l1_coeff > 0:
            if abs_scaled is None:
                abs_scaled = vals.new_zeros(n).index_add(0, rows, vals * dn_sel)
            l1 = cfg.l1_coeff * abs_scaled.mean()
        else:
            l1 = x.new_zeros(())

        rule.observe_l0(self, l0_tokens)
        if self.training:
            self._update_dead(fired, n)
            rule.after_step(self, vals.detach() if use_sparse else acts.detach())
        dead = self.dead_mask()
        n_dead = dead.sum()
        aux = x.new_zeros(())
        if self.training and cfg.aux_k > 0 and cfg.aux_coeff > 0 and bool(n_dead > 0):
            resid = x_n - x_hat_n
            if cfg.aux_detach_residual:
                resid = resid.detach()
            kk = min(cfg.aux_k, int(n_dead))
            dead_idx = dead.nonzero().squeeze(1)
            if self.sparse_kernels and not x_n.requires_grad:
                e = self._aux_decode(x_cent, pre, dead_idx, kk)
            else:  # plain autograd: the reference the fast path is tested against
                with torch.no_grad():
                    top = pre[:, dead_idx].topk(kk, dim=-1, sorted=False).indices  # [N, kk]
                a_rows = torch.arange(n, device=x.device).repeat_interleave(kk)
                a_cols = dead_idx[top.flatten()]
                a_vals = (pre_g if pre_g is not None else self._pre_acts_n(x_n))[a_rows, a_cols]
                e = sparse_decode(self.W_dec, a_rows, a_cols, a_vals, n)
            aux = cfg.aux_coeff * (e - resid).pow(2).mean()

        rule_loss = rule.loss(self, pre, n)
        if rule_loss is None:
            rule_loss = x.new_zeros(())
        loss = mse + cfg.afa_coeff * afa + aux + l1 + rule_loss
        l0 = l0_tokens.float().mean()
        x_hat = self.denormalize(x_hat_n, stats)
        return SAEOutput(x_hat=x_hat, acts=acts, loss=loss, mse_loss=mse, afa_loss=afa, aux_loss=aux,
                         l1_loss=l1, rule_loss=rule_loss, l0=l0, pre_acts=pre, n_dead=n_dead, l0_tokens=l0_tokens, fired=fired)

    aux_dense_min_density: float = 1 / 8
    """The aux loss decodes its dead latents with dense products over the gathered dead columns
    while at least this fraction of them is kept per token (aux_k / n_dead), else sparsely."""

    def _aux_decode(self, x_cent: Tensor, pre: Tensor, dead_idx: Tensor, kk: int) -> Tensor:
        """Aux reconstruction e [N, d_in] = sum over each token's top-``kk`` dead pre-activations
        of pre_i · W_dec[i], with gradients for W_enc, b_enc, b_dec and W_dec, at a cost
        proportional to the number of dead latents D (not to d_sae).

        The ReLU pre-activations of every latent exist already (``pre``, no grad), so the dead
        ones are a column gather [N, D]. With kk >= D/8 the decode is one dense [N, D] x [D, d_in]
        product and its backward three more of that size, over the gathered encoder columns and decoder rows
        (BLAS is ~10x faster per FLOP than a gather-sum); with fewer kept per token the kept
        entries go through the sparse ``embedding_bag`` decode. Same maths as the reference
        (``sparse_kernels=False``), summed in another order: equal to float32 rounding."""
        cfg = self.cfg
        n = pre.shape[0]
        with torch.no_grad():
            acts_d = pre.index_select(1, dead_idx)  # [N, D]
            n_dead = acts_d.shape[1]
            sparse = kk < self.aux_dense_min_density * n_dead
            if kk < n_dead:
                top = acts_d.topk(kk, dim=-1, sorted=False)
                if sparse:
                    a_rows = torch.arange(n, device=pre.device).repeat_interleave(kk)
                    a_cols = dead_idx[top.indices.flatten()]
                else:
                    acts_d = torch.zeros_like(acts_d).scatter_(-1, top.indices, top.values)
        if sparse:
            a_vals = GatherPreActs.apply(x_cent, self.W_enc, self.b_enc, self.b_dec, a_rows, a_cols,
                                          top.values.flatten(), cfg.use_b_enc)
            return sparse_decode(self.W_dec, a_rows, a_cols, a_vals, n)
        return GatheredDecode.apply(x_cent, self.W_enc, self.b_enc, self.b_dec, self.W_dec, dead_idx, acts_d,
                                     cfg.use_b_enc)

    @torch.no_grad()
    def _update_dead(self, fired: Tensor, n_tokens: int) -> None:
        """``fired`` [d_sae] bool: latents active on some token of a batch of ``n_tokens``."""
        self.tokens_since_fired.add_(n_tokens)
        self.tokens_since_fired[fired] = 0

    def dead_mask(self) -> Tensor:
        """[d_sae] bool: latents that have not fired for ``dead_after_tokens`` training tokens."""
        return self.tokens_since_fired >= self.cfg.dead_after_tokens

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit norm."""
        self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of each decoder row's gradient its component along the row (radial part),
        so a step keeps rows (to first order) on the unit sphere. Call after backward()."""
        g = self.W_dec.grad
        if g is None:
            return
        W = self.W_dec.detach()
        # g -= (g·w / ||w||^2) w, row-wise, without [d_sae, d_in] temporaries
        coef = torch.linalg.vecdot(g, W) / torch.linalg.vecdot(W, W).clamp_min(1e-24)
        g.addcmul_(W, coef[:, None], value=-1)

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, *, fold_input_norm: bool = True, metadata: dict | None = None) -> Path:
        """Write ``path/sae.safetensors`` and ``path/cfg.json`` atomically (no pickle); see
        :func:`saelib.sae.checkpoint.save_files`. With input_norm="global" and ``fold_input_norm``
        (default) the stored weights work in model space (W_enc·s, W_dec/s, b_dec/s); :meth:`load`
        unfolds them."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        folded = None
        if self.cfg.input_norm == "global" and fold_input_norm:
            s = self.input_scale.detach().cpu()
            folded = float(s)
            tensors.update(W_enc=(tensors["W_enc"] * s).contiguous(), W_dec=(tensors["W_dec"] / s).contiguous(),
                           b_dec=(tensors["b_dec"] / s).contiguous(), input_scale=torch.ones_like(tensors["input_scale"]))
        return save_files(Path(path), tensors, self.cfg.to_dict(), folded=folded, metadata=metadata,
                          check=self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None,
             expect: SAEConfig | dict | None = None) -> "SAE":
        """Load an SAE written by :meth:`save` (checksums, config and shapes checked: see
        :func:`saelib.sae.checkpoint.load_files`). ``expect`` (an SAEConfig or a dict of fields)
        is compared with the stored config; any mismatch raises ValueError. The module comes back
        in training mode (the nn.Module default): call ``.eval()`` before inference (BatchTopK
        then uses its threshold)."""
        path = Path(path)
        doc, read = load_files(path)
        try:
            cfg = SAEConfig.from_dict(doc["cfg"])
        except TypeError as e:  # a required field (d_in, d_sae) is missing
            raise ValueError(f"{path / CFG_FILE}: field 'cfg' is incomplete ({e}); the file is damaged: re-save the SAE") from None
        except ValueError as e:
            raise ValueError(f"{path / CFG_FILE}: field 'cfg' is invalid: {e}") from None
        if expect is not None:
            exp = expect.to_dict() if isinstance(expect, SAEConfig) else dict(expect)
            have = cfg.to_dict()
            diff = {k: (v, have.get(k, "<missing>")) for k, v in exp.items() if have.get(k, "<missing>") != v}
            if diff:
                raise ValueError(f"Checkpoint at {path} does not match the expected config: "
                                 + ", ".join(f"{k}: expected {a!r}, found {b!r}" for k, (a, b) in diff.items()))
        sae = cls(cfg)
        tensors = read(sae.state_dict(), cfg.activation)
        s = doc["saelib"].get("folded_input_scale")
        if s is not None:
            tensors.update(W_enc=tensors["W_enc"] / s, W_dec=tensors["W_dec"] * s, b_dec=tensors["b_dec"] * s,
                           input_scale=torch.full_like(tensors["input_scale"], s))
        sae.load_state_dict(tensors)
        if device is not None:
            sae.to(device)
        return sae

    def extra_repr(self) -> str:
        c = self.cfg
        return f"d_in={c.d_in}, d_sae={c.d_sae}, activation={c.activation!r}, k={c.k}, input_norm={c.input_norm!r}"


def load_sae(path: str | os.PathLike, **kw) -> SAE:
    """Alias of :meth:`SAE.load`."""
    return SAE.load(path, **kw)


@torch.no_grad()
def geometric_median(points: Tensor, *, max_iter: int = 200, tol: float = 1e-7) -> Tensor:
    """Geometric median of ``points`` [N, d] (argmin_m sum_i ||p_i - m||) by Weiszfeld's
    iteration from the mean, m <- sum_i w_i p_i / sum_i w_i with w_i = 1 / ||p_i - m||
    (distances floored at 1e-12·scale so a point that coincides with m does not divide by 0).
    Stops when m moves less than ``tol`` times the data scale."""
    m = points.mean(0)
    scale = float(points.std(0).norm()) if points.shape[0] > 1 else 1.0
    scale = scale if scale > 0 else 1.0
    for _ in range(max_iter):
        w = 1.0 / (points - m).norm(dim=-1).clamp_min(1e-12 * scale)
        m_new = (w[:, None] * points).sum(0) / w.sum()
        done = float((m_new - m).norm()) < tol * scale
        m = m_new
        if done:
            break
    return m
