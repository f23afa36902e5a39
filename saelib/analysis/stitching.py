"""SAE stitching: how a larger SAE's latents relate to a smaller one's (Leask et al. 2025,
"Sparse Autoencoders Do Not Find Canonical Units of Analysis", arXiv 2502.04878).

Pipeline, for a smaller SAE S (m_S latents) and a larger SAE L (m_L latents) on one hook:

1. **Similarity** (:func:`decoder_cosine`): for every L latent the max cosine of its decoder row
   against S's rows, its argmax, and the sparse edge list {(i, j): cos > θ_min}. Blockwise;
   the m_L × m_S matrix is never materialised.
2. **Insertion ΔMSE** (:func:`insertion_delta_mse`): the exact change in MSE when one L latent is
   added to S, for all L latents at once. ReLU (and threshold/JumpReLU) SAEs: closed form,
   ΔSE_j = a_j²‖d_j‖² − 2 a_j (r·d_j) with r = x − x̂_S (two matmuls per token chunk).
   TopK / top-AFA: the inserted latent competes in S's selection; the new selection is found by
   rank arithmetic (searchsorted on S's sorted keys and cumulative norms), batched over latents.
3. **Classification** (:func:`classify_latents`): novel ⇔ ΔMSE < 0, reconstruction ⇔ ΔMSE > 0,
   dead latents (never fire on the eval set) excluded; the max-cosine proxy swept over θ.
4. **Families** (:func:`build_families`): connected components of the bipartite graph
   cos > θ over alive latents; kinds "insert" (L only), "swap" (S and L), "small_only".
5. **Stitched SAE** (:func:`stitch`, :class:`StitchedSAE`): encoder columns, folded encoder
   biases (b'_enc = b_enc − W_enc·b_dec: each latent keeps its own input centring), decoder rows
   of the kept latents, and S's decoder bias only.
6. **Interpolation** (:func:`interpolation_curve`): operations ordered by their own ΔMSE (most
   negative first), applied cumulatively with a running reconstruction; MSE and L0 per point.
7. **Frankenstein** (:func:`frankenstein`): grow the smallest SAE by the novel latents (max cos < θ
   against the current dictionary) of each larger SAE in turn.

Conventions (printed by the chapter, see :class:`StitchConfig`): MSE is per element (mean over
tokens and dimensions, SAELens' ``l2_loss``), in model space; BOS positions are excluded upstream
(``saelib.lm.activations.harvest``); BatchTopK SAEs are used in inference mode (one global
threshold θ, so their latents do not compete, like JumpReLU); the stitched SAE applies the
smaller SAE's activation rule (and k) to all its latents.

Everything works on :class:`SAEParts`, the activation-space view of an SAE
(``pre = relu(x @ W_enc + b_enc)``, ``x_hat = acts @ W_dec + b_dec``), extracted from a saelib
:class:`~saelib.sae.core.SAE` (input_norm "none" or "global") by :func:`sae_parts`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelib.analysis.afa import MaxCosine, max_cosine  # noqa: F401 - re-exported: stitching's Step A
from saelib.io import atomic_write_json
from saelib.sae.core import SAE
from saelib.sae.metrics import ReconstructionMetrics

__all__ = [
    "RULES",
    "StitchConfig",
    "SAEParts",
    "sae_parts",
    "parts_pre_acts",
    "parts_encode",
    "parts_decode",
    "MaxCosine",
    "max_cosine",
    "CosineMatch",
    "decoder_cosine",
    "InsertionResult",
    "insertion_delta_mse",
    "insertion_delta_mse_bruteforce",
    "Classification",
    "classify_latents",
    "auroc",
    "Families",
    "build_families",
    "family_summary",
    "op_delta_mse",
    "stitch",
    "StitchedSAE",
    "Curve",
    "interpolation_curve",
    "reconstruction_stats",
    "cos_to_init",
    "firing_frequency",
    "frankenstein",
    "WidthFamily",
    "ensure_width_family",
    "family_eval_activations",
    "DEFAULT_LAYERS",
    "WIDTH_FAMILY_PRESETS",
    "width_family_preset",
    "load_saelens_family",
    "member_name",
    "PairAnalysis",
    "analyze_pair",
    "log_interp",
]

RULES = ("relu", "threshold", "topk", "topafa")
_COMPETING = ("topk", "topafa")
_SENTINEL = 1e8  # top-AFA: the last cumulative entry (squared norm) is replaced by this (paper's code)


@dataclass
class StitchConfig:
    """Every convention the stitching analysis fixes, in one place (print it in the chapter)."""

    theta: float = 0.7
    """Cosine threshold for the max-cos proxy (novel ⇔ max cos < θ) and for family edges."""
    theta_grid: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    """Thresholds swept for the proxy's agreement with the ΔMSE sign."""
    chunk_tokens: int = 1024
    """Tokens per chunk in the ΔMSE and curve passes (memory ~ chunk_tokens × m_L)."""
    cos_block: int = 4096
    """Rows of the larger decoder per block of the cosine computation."""
    n_points: int = 100
    """Points recorded along an interpolation curve (the spec: about 100)."""
    mse: str = "per-element"
    """MSE convention: mean over tokens and d_in of (x - x_hat)^2 in model space (not settable)."""
    dead: str = "never fires on the eval set"
    """Dead-latent rule: a latent with zero firing count on the eval tokens is excluded."""
    decoder_bias: str = "small"
    """Decoder bias of the stitched SAE: "small" (the paper: b_dec of S only) or "large"."""
    competing_tokens: int = 2048
    """TopK / top-AFA pairs: eval tokens for insertion ΔMSE and curves (the re-selection costs
    more than the ReLU closed form)."""
    competing_points: int = 12
    """TopK / top-AFA pairs: points per interpolation curve (each point re-encodes the stitched SAE)."""

    def __post_init__(self) -> None:
        if not 0 < self.theta < 1:
            raise ValueError(f"theta must be in (0, 1), got {self.theta!r}")
        if not self.theta_grid or any(not 0 < t < 1 for t in self.theta_grid):
            raise ValueError(f"theta_grid must be non-empty with values in (0, 1), got {self.theta_grid!r}")
        for name in ("chunk_tokens", "cos_block", "n_points", "competing_tokens", "competing_points"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"StitchConfig.{name} must be a positive int, got {v!r}")
        if self.decoder_bias not in ("small", "large"):
            raise ValueError(f"decoder_bias must be 'small' or 'large', got {self.decoder_bias!r}")


# ============================================================================================
# Activation-space view of an SAE
# ============================================================================================


class SAEParts(NamedTuple):
    """An SAE as plain tensors in model space, input centring folded into the encoder bias.

    ``pre = relu(x @ W_enc + b_enc)``; ``acts = rule(pre)``; ``x_hat = acts @ W_dec + b_dec``.
    """

    W_enc: Tensor
    """[d_in, m] encoder."""
    b_enc: Tensor
    """[m] encoder bias with the input centring folded in (b_enc − b_dec @ W_enc)."""
    W_dec: Tensor
    """[m, d_in] decoder rows."""
    b_dec: Tensor
    """[d_in] decoder bias (also the centre of the top-AFA target ‖x − b_dec‖)."""
    rule: str
    """"relu", "threshold" (JumpReLU / BatchTopK at inference), "topk" or "topafa"."""
    k: int | None = None
    """Latents per token for "topk"."""
    threshold: Tensor | None = None
    """[m] per-latent threshold for "threshold" (a latent fires when pre > threshold)."""

    @property
    def m(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_dec.shape[1]

    def to(self, device=None, dtype=None) -> "SAEParts":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return self._replace(W_enc=mv(self.W_enc), b_enc=mv(self.b_enc), W_dec=mv(self.W_dec),
                             b_dec=mv(self.b_dec), threshold=mv(self.threshold))


def sae_parts(sae: Any) -> SAEParts:
    """The activation-space :class:`SAEParts` of a saelib ``SAE`` (or return ``SAEParts`` as is).

    Handles ``input_norm`` "none" and "global" (the scale s is folded: W_enc·s, W_dec/s, b_dec/s).
    BatchTopK SAEs are taken in inference mode (their global threshold θ); SAELens SAEs must first
    be converted with ``saelib.interop``.
    """
    if isinstance(sae, SAEParts):
        return sae
    cfg = getattr(sae, "cfg", None)
    if cfg is None or not all(hasattr(sae, n) for n in ("W_enc", "W_dec", "b_dec")):
        raise TypeError(f"sae_parts expects a saelib SAE or SAEParts, got {type(sae).__name__}; convert "
                        f"SAELens SAEs with saelib.interop first")
    norm = getattr(cfg, "input_norm", "none")
    if norm == "token":
        raise ValueError("stitching needs an SAE that is affine in model space, but this one uses per-token "
                         "input standardisation (input_norm='token'); train the width family with "
                         "input_norm='none' or 'global'")
    with torch.no_grad():
        s = float(getattr(sae, "input_scale", torch.tensor(1.0))) if norm == "global" else 1.0
        W_enc = sae.W_enc.detach().float() * s
        b_dec_n = sae.b_dec.detach().float()
        b_enc = sae.b_enc.detach().float() if getattr(cfg, "use_b_enc", True) else torch.zeros_like(sae.b_enc.detach().float())
        # pre = relu((s x − b_dec) W_enc + b_enc) = relu(x (s W_enc) + b_enc − b_dec W_enc)
        b_enc = b_enc - b_dec_n @ sae.W_enc.detach().float()
        W_dec = sae.W_dec.detach().float() / s
        b_dec = b_dec_n / s
    act = cfg.activation
    threshold = None
    k = None
    if act == "relu":
        rule = "relu"
    elif act == "topk":
        rule, k = "topk", int(cfg.k)
    elif act == "topafa":
        rule = "topafa"
    elif act == "batchtopk":
        th = float(sae.threshold)
        if math.isnan(th):
            raise ValueError("this BatchTopK SAE has no inference threshold yet (threshold is NaN); train it "
                             "(the trainer's EMA sets it) before stitching")
        rule, threshold = "threshold", torch.full((W_dec.shape[0],), th)
    elif act == "jumprelu":
        rule, threshold = "threshold", sae.jump_threshold.detach().float().clone()
    else:
        raise ValueError(f"cannot stitch activation {act!r}; supported: relu, topk, batchtopk, topafa, jumprelu")
    return SAEParts(W_enc.contiguous(), b_enc.contiguous(), W_dec.contiguous(), b_dec.contiguous(), rule, k, threshold)


def parts_pre_acts(p: SAEParts, x: Tensor) -> Tensor:
    """ReLU pre-activations [N, m] (before the selection rule)."""
    return F.relu(x @ p.W_enc + p.b_enc)


def _topafa_mask(pre: Tensor, dec_norms: Tensor, target: Tensor) -> Tensor:
    try:
        from saelib.sae.topafa import topafa_select
    except ImportError:  # pragma: no cover - the package always ships it
        topafa_select = None
    if topafa_select is not None:
        return topafa_select(pre, dec_norms, target)
    raise ImportError("saelib.sae.topafa is missing")


def _select(p: SAEParts, pre: Tensor, x: Tensor) -> Tensor:
    if p.rule == "relu":
        return pre
    if p.rule == "threshold":
        return pre * (pre > p.threshold)
    if p.rule == "topk":
        idx = pre.topk(min(p.k, pre.shape[1]), dim=-1, sorted=False).indices
        return pre * torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, True)
    if p.rule == "topafa":
        return pre * _topafa_mask(pre, p.W_dec.norm(dim=-1), (x - p.b_dec).norm(dim=-1))
    raise ValueError(f"unknown rule {p.rule!r}; one of {RULES}")


def parts_encode(p: SAEParts, x: Tensor) -> Tensor:
    """Activations [N, m] of model-space x [N, d_in] under the parts' rule."""
    return _select(p, parts_pre_acts(p, x), x)


def parts_decode(p: SAEParts, acts: Tensor) -> Tensor:
    """Reconstruction [N, d_in] of activations [N, m]."""
    return acts @ p.W_dec + p.b_dec


def _as_parts(sae: Any, device=None) -> SAEParts:
    p = sae_parts(sae)
    return p.to(device=device, dtype=torch.float32) if device is not None else p.to(dtype=torch.float32)


def _chunks(x: Tensor | Iterable[Tensor], chunk: int, device=None) -> Iterator[Tensor]:
    """Token chunks [<=chunk, d] of a tensor [N, d] or an iterable of tensors / {hook: tensor}."""
    if isinstance(x, Tensor):
        for s in range(0, x.shape[0], chunk):
            yield x[s:s + chunk].to(device=device, dtype=torch.float32)
        return
    for b in x:
        if isinstance(b, Mapping):
            if len(b) != 1:
                raise ValueError("pass a tensor or batches with one hook; select the hook first")
            b = next(iter(b.values()))
        for s in range(0, b.shape[0], chunk):
            yield b[s:s + chunk].to(device=device, dtype=torch.float32)


def _check_pair(S: SAEParts, L: SAEParts) -> None:
    if S.d_in != L.d_in:
        raise ValueError(f"the two SAEs read different widths (d_in {S.d_in} vs {L.d_in}); stitch SAEs of one hook")
    if S.rule != L.rule:
        raise ValueError(f"cannot stitch a {S.rule!r} SAE with a {L.rule!r} SAE: the stitched SAE applies one "
                         f"activation rule; pick SAEs of the same architecture")


# ============================================================================================
# Step A: decoder cosine similarity, blockwise
# ============================================================================================


class CosineMatch(NamedTuple):
    """Decoder similarity between a larger SAE L and a smaller SAE S."""

    max_cos: Tensor
    """[m_L] max cosine of each L decoder row against S's rows."""
    argmax: Tensor
    """[m_L] the S latent achieving it."""
    max_cos_small: Tensor
    """[m_S] max cosine of each S decoder row against L's rows."""
    edges: Tensor
    """[n_edges, 2] long (i_small, j_large) with cos > ``theta_min``."""
    edge_cos: Tensor
    """[n_edges] their cosines."""
    theta_min: float
    """The threshold the edge list was cut at (filter it for larger θ)."""


@torch.no_grad()
def decoder_cosine(small: Any, large: Any, *, theta_min: float = 0.5, block: int = 4096,
                   device: str | None = None) -> CosineMatch:
    """Blockwise decoder cosines between L's rows and S's rows: max, argmax and sparse edges."""
    S, L = _as_parts(small, device), _as_parts(large, device)
    dS = F.normalize(S.W_dec, dim=1)
    dL = F.normalize(L.W_dec, dim=1)
    mx, am, edges, ecos = [], [], [], []
    mx_s = torch.full((S.m,), -2.0, device=dS.device)
    for s in range(0, L.m, block):
        C = dL[s:s + block] @ dS.T  # [block, m_S]
        v, i = C.max(dim=1)
        mx.append(v)
        am.append(i)
        mx_s = torch.maximum(mx_s, C.max(dim=0).values)
        jj, ii = (C > theta_min).nonzero(as_tuple=True)
        edges.append(torch.stack([ii, jj + s], dim=1))
        ecos.append(C[jj, ii])
    return CosineMatch(torch.cat(mx).cpu(), torch.cat(am).cpu(), mx_s.cpu(), torch.cat(edges).cpu(),
                       torch.cat(ecos).cpu(), float(theta_min))


# ============================================================================================
# Step B: exact ΔMSE of inserting each L latent into S
# ============================================================================================


class InsertionResult(NamedTuple):
    """Per-latent effect of inserting L's latents into S, on one eval set."""

    delta_mse: Tensor
    """[m_L] float64: MSE(S + j) − MSE(S), per element."""
    freq_large: Tensor
    """[m_L] firing frequency of each L latent in L itself (0 = dead on the eval set)."""
    freq_small: Tensor
    """[m_S] firing frequency of each S latent in S."""
    mse_small: float
    """MSE of S (per element)."""
    mse_large: float
    """MSE of L (per element)."""
    l0_small: float
    """Mean active latents per token of S."""
    l0_large: float
    """Mean active latents per token of L."""
    n_tokens: int
    """Eval tokens used."""


def _competing_dse(S: SAEParts, L: SAEParts, x: Tensor, pre_S: Tensor, acts_S: Tensor, pre_L: Tensor,
                   r: Tensor, P: Tensor, pair_batch: int = 1 << 16, mem_floats: int = 1 << 24) -> Tensor:
    """ΔSE [T, m_L] of inserting each L latent into S when latents compete (TopK, top-AFA).

    With S's ranking fixed, inserting latent j (value p_j, key e_j) at rank q_j changes the kept
    set to "j (if it makes the cut) + S's top n'_j". Writing v = Σ_{S ranks n'+1..n_S} a_i d_i
    (the S latents pushed out) and r = x − x̂_S:
        ΔSE = enter·(p²‖d_j‖² − 2p d_j·(r + v)) + 2 r·v + ‖v‖².
    r·v and ‖v‖² depend on (token, n') only; d_j·v is gathered for the pairs that push latents out.
    """
    T, mS = pre_S.shape
    dn_S = S.W_dec.norm(dim=1)
    dn_L = L.W_dec.norm(dim=1)
    if S.rule == "topk":
        key_S, key_L = pre_S, pre_L
    else:
        key_S, key_L = (pre_S * dn_S) ** 2, (pre_L * dn_L) ** 2
    vals, order = torch.sort(key_S, dim=1, descending=True, stable=True)  # [T, m_S]
    asc = vals.flip(1).contiguous()
    # q = number of S keys >= e (S latents win ties: they have lower indices in the stitched SAE)
    q = mS - torch.searchsorted(asc, key_L.contiguous(), right=False)  # [T, m_L]
    n_pos_S = (pre_S > 0).sum(1, keepdim=True)  # [T, 1]
    n_S = (acts_S > 0).sum(1, keepdim=True)  # [T, 1] kept positive S latents = top n_S ranks
    pos_L = key_L > 0
    if S.rule == "topk":
        k = min(S.k, mS + 1)
        enter = (q < k) & pos_L
        n_new = k - enter.long()
    else:
        # merged cumulative (squared) norms: M_n = Cz[n] (n <= q), Cz[n-1] + e (q < n <= m_S),
        # sentinel at n = m_S + 1; k' = first argmin_n |sqrt(M_n) − τ|.
        C = torch.cat([vals.new_zeros(T, 1), vals.cumsum(1)], dim=1).contiguous()  # [T, m_S+1], Cz
        tau = (x - S.b_dec).norm(dim=1, keepdim=True)  # [T, 1]
        tau2 = tau ** 2
        e = key_L

        def M_at(n: Tensor) -> Tensor:
            n_c = n.clamp(1, mS + 1)
            left = C.gather(1, n_c.clamp(max=mS))
            right = C.gather(1, (n_c - 1).clamp(max=mS)) + e
            out = torch.where(n_c <= q, left, right)
            return torch.where(n_c == mS + 1, torch.full_like(out, _SENTINEL), out)

        # first n <= q with Cz[n] >= τ²
        a = torch.searchsorted(C[:, 1:].contiguous(), tau2.contiguous(), right=False) + 1  # [T,1] in 1..m_S+1
        a = a.expand_as(q)
        # first n > q with Cz[n-1] + e >= τ²
        b = torch.searchsorted(C[:, :mS].contiguous(), (tau2 - e).contiguous(), right=False) + 1
        b = torch.maximum(b, q + 1)
        n1 = torch.where(a <= q, a, b).clamp(max=mS + 1)
        n_pos_M = n_pos_S + pos_L.long()
        n0 = torch.minimum(n1 - 1, n_pos_M.clamp(min=1))
        f1 = (M_at(n1).sqrt() - tau).abs()
        f0 = (M_at(n0).sqrt() - tau).abs()
        use0 = (n1 > 1) & (f0 <= f1)
        kk = torch.where(use0, n0, n1)
        enter = (q < kk) & pos_L
        n_new = kk - enter.long()
    n_new = torch.minimum(n_new, n_pos_S)
    delta = (n_S - n_new)  # [T, m_L] S latents pushed out (>= 0)
    delta = delta.clamp(min=0)
    p = pre_L
    dse = enter * (p * p * dn_L ** 2 - 2 * p * P)
    W = int(delta.max()) if delta.numel() else 0
    if W == 0:
        return dse
    d = x.shape[1]
    sub = max(1, mem_floats // ((W + 1) * d))
    for s in range(0, T, sub):
        t_sl = slice(s, min(T, s + sub))
        Tn = t_sl.stop - t_sl.start
        # V[t, w] = sum of the contributions of S ranks n_S - w .. n_S - 1 (0-based), w = 0..W
        rank = n_S[t_sl] - 1 - torch.arange(W, device=x.device)[None, :]  # [Tn, W]
        lat = order[t_sl].gather(1, rank.clamp(min=0))
        a_ = pre_S[t_sl].gather(1, lat) * (rank >= 0)
        V = torch.cat([x.new_zeros(Tn, 1, d), (a_[..., None] * S.W_dec[lat]).cumsum(1)], dim=1)
        rv = torch.einsum("twd,td->tw", V, r[t_sl])
        vv = (V * V).sum(-1)
        dl = delta[t_sl]
        dse[t_sl] += 2 * rv.gather(1, dl) + vv.gather(1, dl)
        # d_j · v for pairs that enter and push S latents out
        tt, jj = ((dl > 0) & enter[t_sl]).nonzero(as_tuple=True)
        for ps in range(0, tt.numel(), pair_batch):
            ti, ji = tt[ps:ps + pair_batch], jj[ps:ps + pair_batch]
            dv = (V[ti, dl[ti, ji]] * L.W_dec[ji]).sum(-1)
            dse[t_sl][ti, ji] -= 2 * p[t_sl][ti, ji] * dv
    return dse


INSERTION_MODES = ("rule", "threshold")


@torch.no_grad()
def insertion_delta_mse(small: Any, large: Any, x: Tensor | Iterable[Tensor], *, chunk_tokens: int = 1024,
                        device: str | None = None, progress: bool = False, mode: str = "rule") -> InsertionResult:
    """Exact ΔMSE (per element) of inserting each latent of ``large`` into ``small``, all at once.

    The inserted latent keeps its own encoder row and folded bias (so its own input centring) and
    adds its decoder row; no second decoder bias.

    ``mode="rule"`` (default): the latent enters under S's own rule. ReLU/threshold: closed form.
    TopK/top-AFA: the latent competes in S's selection (see :func:`_competing_dse`), so entering
    usually pushes S latents out, and ΔMSE is then positive for most latents whatever they encode.
    ``mode="threshold"``: the **non-competing** insertion for every rule: S's code is kept fixed
    and the latent adds a_j(x)·d_j with a_j its activation in L (L's own selection); closed form
    ΔSE = a_j²‖d_j‖² − 2a_j r·d_j. This is the ReLU measure applied to every architecture, so
    it compares across architectures; for ReLU and BatchTopK (inference threshold) both modes agree.
    """
    if mode not in INSERTION_MODES:
        raise ValueError(f"mode must be one of {INSERTION_MODES}, got {mode!r}")
    S, L = _as_parts(small, device), _as_parts(large, device)
    _check_pair(S, L)
    dev = S.W_dec.device
    dse = torch.zeros(L.m, dtype=torch.float64, device=dev)
    fL = torch.zeros(L.m, dtype=torch.float64, device=dev)
    fS = torch.zeros(S.m, dtype=torch.float64, device=dev)
    se_S = se_L = l0_S = l0_L = 0.0
    n = 0
    it = _chunks(x, chunk_tokens, dev)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="insertion ΔMSE", leave=False)
    dn2_L = (L.W_dec ** 2).sum(1)
    for xc in it:
        pre_S = parts_pre_acts(S, xc)
        acts_S = _select(S, pre_S, xc)
        r = xc - parts_decode(S, acts_S)
        pre_L = parts_pre_acts(L, xc)
        acts_L = _select(L, pre_L, xc)
        P = r @ L.W_dec.T  # [T, m_L]  r·d_j
        if S.rule in _COMPETING and mode == "rule":
            d = _competing_dse(S, L, xc, pre_S, acts_S, pre_L, r, P)
        else:
            d = acts_L * acts_L * dn2_L - 2 * acts_L * P
        dse += d.sum(0, dtype=torch.float64)
        fL += (acts_L > 0).sum(0)
        fS += (acts_S > 0).sum(0)
        se_S += float((r ** 2).sum(dtype=torch.float64))
        se_L += float(((xc - parts_decode(L, acts_L)) ** 2).sum(dtype=torch.float64))
        l0_S += float((acts_S > 0).sum())
        l0_L += float((acts_L > 0).sum())
        n += xc.shape[0]
    if n == 0:
        raise ValueError("insertion_delta_mse got no tokens; pass activations [N, d_in] with N > 0")
    D = S.d_in
    return InsertionResult((dse / (n * D)).cpu(), (fL / n).cpu(), (fS / n).cpu(), se_S / (n * D), se_L / (n * D),
                           l0_S / n, l0_L / n, n)


@torch.no_grad()
def insertion_delta_mse_bruteforce(small: Any, large: Any, x: Tensor, latents: Sequence[int] | Tensor, *,
                                   chunk_tokens: int = 4096) -> Tensor:
    """Reference ΔMSE: for each latent j, build the stitched SAE S + j and re-encode (slow loop)."""
    S, L = _as_parts(small), _as_parts(large)
    _check_pair(S, L)
    x = x.float()
    base = sum(float(((xc - parts_decode(S, parts_encode(S, xc))) ** 2).sum(dtype=torch.float64))
               for xc in _chunks(x, chunk_tokens))
    out = []
    keep_S = torch.ones(S.m, dtype=torch.bool)
    for j in torch.as_tensor(latents).tolist():
        keep_L = torch.zeros(L.m, dtype=torch.bool)
        keep_L[j] = True
        st = stitch(S, L, keep_S, keep_L)
        se = sum(float(((xc - parts_decode(st, parts_encode(st, xc))) ** 2).sum(dtype=torch.float64))
                 for xc in _chunks(x, chunk_tokens))
        out.append((se - base) / (x.shape[0] * S.d_in))
    return torch.tensor(out, dtype=torch.float64)


# ============================================================================================
# Step C: classification and the max-cos proxy
# ============================================================================================


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for binary ``label`` (Mann–Whitney, ties averaged)."""
    from scipy.stats import rankdata

    score, label = np.asarray(score, float), np.asarray(label, bool)
    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class Classification(NamedTuple):
    """Novel / reconstruction classes of L's latents and the max-cos proxy's agreement."""

    label: np.ndarray
    """[m_L] "novel" (ΔMSE < 0), "reconstruction" (ΔMSE > 0) or "dead" (never fires / ΔMSE = 0)."""
    frac_novel: float
    """Fraction novel among alive latents (ground truth, ΔMSE sign)."""
    n_alive: int
    """Alive (classified) latents."""
    proxy: Any
    """pandas DataFrame, one row per θ: frac_novel_proxy, accuracy, precision, recall."""
    auroc: float
    """AUROC of −max cos as a predictor of "novel"."""
    best_theta: float
    """θ of the sweep with the highest accuracy."""


def classify_latents(delta_mse: Tensor | np.ndarray, freq_large: Tensor | np.ndarray,
                     max_cos: Tensor | np.ndarray, *, theta_grid: Sequence[float] = StitchConfig().theta_grid) -> Classification:
    """Classify L's latents by the sign of ΔMSE; sweep the max-cos proxy (novel ⇔ max cos < θ)."""
    import pandas as pd

    dm = np.asarray(delta_mse, dtype=float)
    fr = np.asarray(freq_large, dtype=float)
    mc = np.asarray(max_cos, dtype=float)
    if not (dm.shape == fr.shape == mc.shape):
        raise ValueError(f"delta_mse, freq_large and max_cos must have one entry per L latent; got shapes "
                         f"{dm.shape}, {fr.shape}, {mc.shape}")
    alive = (fr > 0) & (dm != 0)
    label = np.where(~alive, "dead", np.where(dm < 0, "novel", "reconstruction"))
    novel = dm[alive] < 0
    rows = []
    for t in theta_grid:
        pred = mc[alive] < t
        tp = int((pred & novel).sum())
        rows.append({"theta": float(t), "frac_novel_proxy": float(pred.mean()) if alive.any() else float("nan"),
                     "accuracy": float((pred == novel).mean()) if alive.any() else float("nan"),
                     "precision": tp / max(int(pred.sum()), 1), "recall": tp / max(int(novel.sum()), 1)})
    proxy = pd.DataFrame(rows)
    best = float(proxy.loc[proxy["accuracy"].idxmax(), "theta"]) if alive.any() else float("nan")
    return Classification(label, float(novel.mean()) if alive.any() else float("nan"), int(alive.sum()), proxy,
                          auroc(-mc[alive], novel), best)


# ============================================================================================
# Step D: families (connected components) and the effect of each operation
# ============================================================================================


class Families(NamedTuple):
    """Connected components of the bipartite graph cos > θ over alive latents of S and L."""

    comp_small: np.ndarray
    """[m_S] component id of each S latent (−1 = dead)."""
    comp_large: np.ndarray
    """[m_L] component id of each L latent (−1 = dead)."""
    kind: np.ndarray
    """[n_comp] "insert" (L only), "swap" (S and L) or "small_only"."""
    n_small: np.ndarray
    """[n_comp] S latents per component."""
    n_large: np.ndarray
    """[n_comp] L latents per component."""
    theta: float
    """The cosine threshold used."""


def build_families(match: CosineMatch, *, theta: float, alive_small: Tensor | np.ndarray,
                   alive_large: Tensor | np.ndarray) -> Families:
    """Families = connected components (scipy) of alive S and L latents joined where cos > θ."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if theta < match.theta_min:
        raise ValueError(f"theta={theta} is below the edge list's cut {match.theta_min}; recompute decoder_cosine "
                         f"with theta_min <= {theta}")
    aS, aL = np.asarray(alive_small, bool), np.asarray(alive_large, bool)
    mS, mL = aS.size, aL.size
    e = match.edges.numpy()
    keep = (match.edge_cos.numpy() > theta)
    if e.size:
        keep &= aS[e[:, 0]] & aL[e[:, 1]]
    e = e[keep]
    n = mS + mL
    g = coo_matrix((np.ones(len(e)), (e[:, 0], mS + e[:, 1])), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    alive = np.concatenate([aS, aL])
    # renumber components of alive nodes 0..n_comp-1
    uniq, comp = np.unique(lab[alive], return_inverse=True)
    full = np.full(n, -1)
    full[alive] = comp
    n_comp = len(uniq)
    cS, cL = full[:mS], full[mS:]
    n_small = np.bincount(cS[cS >= 0], minlength=n_comp)
    n_large = np.bincount(cL[cL >= 0], minlength=n_comp)
    kind = np.where(n_small == 0, "insert", np.where(n_large == 0, "small_only", "swap"))
    return Families(cS, cL, kind, n_small, n_large, float(theta))


def family_summary(fam: Families):
    """pandas DataFrame: count and latents per kind, plus the largest component's size."""
    import pandas as pd

    rows = []
    for k in ("insert", "swap", "small_only"):
        sel = fam.kind == k
        rows.append({"kind": k, "families": int(sel.sum()), "small_latents": int(fam.n_small[sel].sum()),
                     "large_latents": int(fam.n_large[sel].sum()),
                     "max_size": int((fam.n_small + fam.n_large)[sel].max()) if sel.any() else 0})
    return pd.DataFrame(rows).set_index("kind")


def _ops(fam: Families) -> tuple[np.ndarray, Tensor, Tensor]:
    """Operation ids (components of kind insert/swap) and, for S and L latents, their op index (−1 none)."""
    op_comp = np.nonzero(fam.kind != "small_only")[0]
    remap = np.full(len(fam.kind), -1)
    remap[op_comp] = np.arange(len(op_comp))
    opS = np.where(fam.comp_small >= 0, remap[np.maximum(fam.comp_small, 0)], -1)
    opL = np.where(fam.comp_large >= 0, remap[np.maximum(fam.comp_large, 0)], -1)
    return op_comp, torch.as_tensor(opS), torch.as_tensor(opL)


@torch.no_grad()
def op_delta_mse(small: Any, large: Any, fam: Families, x: Tensor | Iterable[Tensor], *, chunk_tokens: int = 1024,
                 device: str | None = None) -> Tensor:
    """ΔMSE (per element) of each operation (insert / swap) applied alone to S, [n_ops] float64.

    u_op = Σ_{j∈L_F} a_j d_j − Σ_{i∈S_F} a_i d_i, ΔSE = ‖u‖² − 2 r·u, with each latent's activation
    in its own SAE. Exact for ReLU / threshold SAEs (latents do not compete); for TopK / top-AFA it
    ignores the re-selection a swap would cause and serves only to order operations.
    """
    S, L = _as_parts(small, device), _as_parts(large, device)
    _check_pair(S, L)
    op_comp, opS, opL = _ops(fam)
    n_ops = len(op_comp)
    dev = S.W_dec.device
    opS, opL = opS.to(dev), opL.to(dev)
    # members of every op, as indices into the concatenation [S latents, L latents], with signs
    lat_op = torch.cat([opS, opL])
    sign = torch.cat([-torch.ones(S.m, device=dev), torch.ones(L.m, device=dev)])
    D = torch.cat([S.W_dec, L.W_dec])
    in_op = (lat_op >= 0).nonzero(as_tuple=True)[0]
    order = in_op[torch.argsort(lat_op[in_op], stable=True)]
    sizes = torch.bincount(lat_op[in_op], minlength=n_ops)
    starts = torch.cumsum(sizes, 0) - sizes
    groups = []  # (ops of one size s, member matrix [n, s], signed Gram [n, s, s])
    for s in torch.unique(sizes).tolist():
        ops_s = (sizes == s).nonzero(as_tuple=True)[0]
        mem = order[starts[ops_s][:, None] + torch.arange(s, device=dev)[None, :]]  # [n, s]
        Dm = D[mem] * sign[mem][..., None]
        groups.append((ops_s, mem, Dm @ Dm.transpose(1, 2)))
    lin = torch.zeros(n_ops, dtype=torch.float64, device=dev)
    quad = torch.zeros(n_ops, dtype=torch.float64, device=dev)
    n = 0
    for xc in _chunks(x, chunk_tokens, dev):
        aS = parts_encode(S, xc)
        aL = parts_encode(L, xc)
        r = xc - parts_decode(S, aS)
        A = torch.cat([aS, aL], dim=1)  # [T, m_S + m_L]
        h = (A * (r @ D.T)) * sign  # [T, m]  s_l a_l (r·d_l)
        lin.index_add_(0, lat_op[in_op], h[:, in_op].sum(0, dtype=torch.float64))
        for ops_s, mem, G in groups:
            Am = A[:, mem]  # [T, n, s]
            quad[ops_s] += torch.einsum("tns,nsr,tnr->n", Am, G, Am).double()
        n += xc.shape[0]
    return ((quad - 2 * lin) / (n * S.d_in)).cpu()


# ============================================================================================
# Step E: the stitched SAE
# ============================================================================================


def stitch(small: Any, large: Any, keep_small: Tensor | np.ndarray, keep_large: Tensor | np.ndarray, *,
           decoder_bias: str = "small") -> SAEParts:
    """Stitched SAE parts over the kept latents: S's kept latents first, then L's.

    Encoder columns and folded encoder biases of each kept latent (each keeps its own input
    centring), their decoder rows, and S's decoder bias (``decoder_bias="large"``: L's). The
    activation rule (and k) is S's.
    """
    S, L = _as_parts(small), _as_parts(large)
    _check_pair(S, L)
    kS = torch.as_tensor(np.asarray(keep_small), dtype=torch.bool)
    kL = torch.as_tensor(np.asarray(keep_large), dtype=torch.bool)
    if kS.shape != (S.m,) or kL.shape != (L.m,):
        raise ValueError(f"keep masks must have shapes [{S.m}] and [{L.m}], got {tuple(kS.shape)}, {tuple(kL.shape)}")
    th = None
    if S.rule == "threshold":
        th = torch.cat([S.threshold[kS], L.threshold[kL]])
    if decoder_bias not in ("small", "large"):
        raise ValueError(f"decoder_bias must be 'small' or 'large', got {decoder_bias!r}")
    b_dec = S.b_dec if decoder_bias == "small" else L.b_dec
    return SAEParts(torch.cat([S.W_enc[:, kS], L.W_enc[:, kL]], dim=1), torch.cat([S.b_enc[kS], L.b_enc[kL]]),
                    torch.cat([S.W_dec[kS], L.W_dec[kL]]), b_dec.clone(), S.rule, S.k, th)


class StitchedSAE(nn.Module):
    """A stitched SAE as a module: ``encode``/``decode``/``reconstruct`` in model space."""

    def __init__(self, parts: SAEParts):
        super().__init__()
        self.rule, self.k = parts.rule, parts.k
        self.W_enc = nn.Parameter(parts.W_enc.clone(), requires_grad=False)
        self.b_enc = nn.Parameter(parts.b_enc.clone(), requires_grad=False)
        self.W_dec = nn.Parameter(parts.W_dec.clone(), requires_grad=False)
        self.b_dec = nn.Parameter(parts.b_dec.clone(), requires_grad=False)
        self.register_buffer("threshold", None if parts.threshold is None else parts.threshold.clone())

    @classmethod
    def from_saes(cls, small: Any, large: Any, keep_small, keep_large, **kw) -> "StitchedSAE":
        return cls(stitch(small, large, keep_small, keep_large, **kw))

    @property
    def parts(self) -> SAEParts:
        return SAEParts(self.W_enc.data, self.b_enc.data, self.W_dec.data, self.b_dec.data, self.rule, self.k,
                        self.threshold)

    @property
    def d_sae(self) -> int:
        return self.W_dec.shape[0]

    def encode(self, x: Tensor) -> Tensor:
        return parts_encode(self.parts, x.float())

    def decode(self, acts: Tensor) -> Tensor:
        return parts_decode(self.parts, acts)

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)


# ============================================================================================
# Step F: interpolation curves
# ============================================================================================


class Curve(NamedTuple):
    """An interpolation path from S towards L, recorded at a few points."""

    n_ops: np.ndarray
    """[P] operations applied."""
    n_latents: np.ndarray
    """[P] latents of the stitched SAE (m_S − removed + added)."""
    mse: np.ndarray
    """[P] per-element MSE."""
    fvu: np.ndarray
    """[P] Σ‖x − x̂‖² / Σ‖x − x̄‖² (saelib.sae.metrics' ``fvu``)."""
    l0: np.ndarray
    """[P] mean active latents per token."""
    order: np.ndarray
    """[n_used] op indices in application order."""
    op_delta: np.ndarray
    """[n_used] individual ΔMSE of the applied ops, in order."""


def _op_order(op_delta: Tensor, monotone: bool) -> np.ndarray:
    d = np.asarray(op_delta, dtype=float)
    order = np.argsort(d, kind="stable")
    return order[d[order] < 0] if monotone else order


@torch.no_grad()
def interpolation_curve(small: Any, large: Any, fam: Families, op_delta: Tensor, x: Tensor, *, monotone: bool = True,
                        n_points: int = 100, chunk_tokens: int = 1024, device: str | None = None,
                        decoder_bias: str = "small") -> Curve:
    """MSE and L0 of the stitched SAE after the first c operations, for ~``n_points`` values of c.

    Operations are ordered by their own ΔMSE (most negative first); ``monotone`` drops those with
    ΔMSE >= 0, otherwise they come last. ReLU/threshold SAEs use a running reconstruction
    (x̂ += u_op; exact because latents do not compete); TopK/top-AFA re-encode the stitched SAE at
    every point (exact, slower).
    """
    S, L = _as_parts(small, device), _as_parts(large, device)
    _check_pair(S, L)
    dev = S.W_dec.device
    op_comp, opS, opL = _ops(fam)
    order = _op_order(op_delta, monotone)
    n_used = len(order)
    pts = np.unique(np.linspace(0, n_used, min(n_points, n_used + 1)).round().astype(int))
    rank = np.full(len(op_comp), -1)
    rank[order] = np.arange(n_used)
    rS = torch.as_tensor(np.where(opS.numpy() >= 0, rank[np.maximum(opS.numpy(), 0)], -1), device=dev)
    rL = torch.as_tensor(np.where(opL.numpy() >= 0, rank[np.maximum(opL.numpy(), 0)], -1), device=dev)
    dS = (fam.n_large - fam.n_small)[op_comp][order]
    n_lat = S.m + np.concatenate([[0], np.cumsum(dS)])[pts]
    x = x.float().to(dev)
    N = x.shape[0]
    var = float(((x - x.mean(0)) ** 2).sum(dtype=torch.float64))
    se = np.zeros(len(pts))
    l0 = np.zeros(len(pts))
    if decoder_bias == "large":
        raise NotImplementedError("decoder_bias='large' curves: build the endpoints with stitch(...) instead")
    if S.rule in _COMPETING:
        for pi, c in enumerate(pts):
            kS = ~((rS >= 0) & (rS < c))
            kL = (rL >= 0) & (rL < c)
            st = stitch(S.to("cpu"), L.to("cpu"), kS.cpu(), kL.cpu()).to(dev)
            for xc in _chunks(x, chunk_tokens, dev):
                a = parts_encode(st, xc)
                se[pi] += float(((xc - parts_decode(st, a)) ** 2).sum(dtype=torch.float64))
                l0[pi] += float((a > 0).sum())
    else:
        sign = torch.cat([-torch.ones(S.m, device=dev), torch.ones(L.m, device=dev)])
        D = torch.cat([S.W_dec, L.W_dec]) * sign[:, None]
        rk = torch.cat([rS, rL])
        seg_lat = [((rk >= lo) & (rk < hi)).nonzero(as_tuple=True)[0] for lo, hi in zip(pts[:-1], pts[1:])]
        for xc in _chunks(x, chunk_tokens, dev):
            aS = parts_encode(S, xc)
            aL = parts_encode(L, xc)
            A = torch.cat([aS, aL], dim=1)
            fired = (A > 0).float()
            xh = parts_decode(S, aS)
            se[0] += float(((xc - xh) ** 2).sum(dtype=torch.float64))
            cur_l0 = float((aS > 0).sum())
            l0[0] += cur_l0
            for pi, lat in enumerate(seg_lat, start=1):
                if lat.numel():
                    xh = xh + A[:, lat] @ D[lat]
                    cur_l0 += float((fired[:, lat] * sign[lat]).sum())
                se[pi] += float(((xc - xh) ** 2).sum(dtype=torch.float64))
                l0[pi] += cur_l0
    return Curve(pts, n_lat, se / (N * S.d_in), se / var, l0 / N, order, np.asarray(op_delta, float)[order])


@torch.no_grad()
def reconstruction_stats(sae: Any, x: Tensor, *, chunk_tokens: int = 2048, device: str | None = None) -> dict[str, float]:
    """``n_latents`` and the :class:`~saelib.sae.metrics.ReconstructionMetrics` (``mse``, ``fvu``,
    ``nmse``, ``l0``, ``dead``, ...) of an SAE (or parts) on activations x [N, d]."""
    p = _as_parts(sae, device)
    m = ReconstructionMetrics(p.m)
    for xc in _chunks(x.float(), chunk_tokens, p.W_dec.device):
        a = parts_encode(p, xc)
        m.add(xc, parts_decode(p, a), a)
    return {"n_latents": p.m, **m.result()}


@torch.no_grad()
def firing_frequency(sae: Any, x: Tensor, *, chunk_tokens: int = 2048, device: str | None = None) -> Tensor:
    """[m] fraction of tokens of x on which each latent is active (0 = dead on this set)."""
    p = _as_parts(sae, device)
    cnt = torch.zeros(p.m, dtype=torch.float64, device=p.W_dec.device)
    for xc in _chunks(x, chunk_tokens, p.W_dec.device):
        cnt += (parts_encode(p, xc) > 0).sum(0)
    return (cnt / max(int(x.shape[0]), 1)).cpu()


@torch.no_grad()
def cos_to_init(sae: Any) -> Tensor:
    """[d_sae] cosine between each trained decoder row and the same row at initialisation.

    saelib's SAEs are initialised from ``cfg.seed`` alone, so the initial decoder is rebuilt
    here. Near 1: the row has barely moved (short training); near 0: it has found its own
    direction (random directions in d dimensions have |cos| ≈ 1/√d)."""
    if not hasattr(sae, "cfg") or not hasattr(sae.cfg, "seed"):
        raise ValueError("cos_to_init needs a saelib SAE (its init is rebuilt from cfg.seed); "
                         f"got {type(sae).__name__}")
    W0 = SAE(sae.cfg).W_dec.detach().float()
    W = sae.W_dec.detach().float().cpu()
    return F.cosine_similarity(W, W0, dim=-1)


# ============================================================================================
# Step G: the Frankenstein SAE
# ============================================================================================


@torch.no_grad()
def frankenstein(saes: Sequence[Any], x: Tensor, *, theta: float = 0.7, chunk_tokens: int = 2048):
    """Grow the first (smallest) SAE by each later SAE's novel latents (max cos < θ against the
    current dictionary; latents dead on ``x`` skipped), no swaps. Returns a pandas DataFrame with
    one row per step: source width, latents and :func:`reconstruction_stats`; and the final parts."""
    import pandas as pd

    parts = [_as_parts(s) for s in saes]
    cur = parts[0]
    rows = [{"step": 0, "source": parts[0].m, "added": 0, **reconstruction_stats(cur, x, chunk_tokens=chunk_tokens)}]
    for i, P in enumerate(parts[1:], start=1):
        mc = max_cosine(P.W_dec, cur.W_dec).values
        fired = firing_frequency(P, x, chunk_tokens=chunk_tokens) > 0
        add = (mc < theta) & fired
        cur = stitch(cur, P, torch.ones(cur.m, dtype=torch.bool), add)
        rows.append({"step": i, "source": P.m, "added": int(add.sum()),
                     **reconstruction_stats(cur, x, chunk_tokens=chunk_tokens)})
    return pd.DataFrame(rows), cur


# ============================================================================================
# The width family: SAEs of several widths on one hook, trained in one pass
# ============================================================================================

DEFAULT_LAYERS = {"embedded": 10, "smollm2-135m": 10, "gpt2": 8, "gpt2-small": 8, "tiny-gpt2": 1, "tiny-llama": 1}
"""Hook layer per model. GPT-2: block 8, the paper's. SmolLM2-135M (30 layers): block 10, an
intermediate layer past the early token-level layers; the paper's relative depth (8/12) would be
block 20, which doubles the cost of every harvest on CPU (forwards stop at the hook)."""

SAELENS_RELEASE = "gpt2-small-res-jb-feature-splitting"


class WidthFamily(NamedTuple):
    """SAEs of several widths on one hook: ``saes[arch][width]``."""

    name: str
    """Folder name under ``<runs_dir>/sae/``."""
    path: Path | None
    """``<runs_dir>/sae/<name>`` (None for a released family loaded from SAELens)."""
    hook: str
    """Hook the SAEs read, e.g. ``blocks.10.hook_resid_pre``."""
    widths: tuple[int, ...]
    """Widths in increasing order."""
    saes: dict[str, dict[int, Any]]
    """``{architecture: {width: SAE}}``."""

    def chain(self, arch: str) -> list[Any]:
        """The SAEs of one architecture, smallest first."""
        if arch not in self.saes:
            raise KeyError(f"no {arch!r} SAEs in family {self.name!r}; it has {sorted(self.saes)}")
        return [self.saes[arch][w] for w in sorted(self.saes[arch])]


def member_name(arch: str, width: int) -> str:
    """Folder name of one family member, e.g. ``relu-2304``."""
    return f"{arch}-{width}"


def family_name(model_name: str, hook: str) -> str:
    """Default family folder name, e.g. ``widths-embedded-blocks.10.hook_resid_pre``."""
    return f"widths-{model_name}-{hook}"


def _tokens_and_cache(runs: Path, model, model_name: str, corpus: str, hook: str, split: str, n_tokens: int,
                      seq_len: int, seed: int, progress: bool):
    from saelib.lm.activations import ActivationCache
    from saelib.lm.data import token_rows

    from saelib.io import ACTIVATION_CODE, code_fingerprint

    path = runs / "activations" / model_name / Path(str(corpus)).name / split / f"{hook}-{n_tokens}-s{seed}"
    if (path / "manifest.json").exists():
        try:  # reused without loading the model only when the current code made it
            cache = ActivationCache(path)
            if cache.n_tokens > 0 and cache.manifest.get("code") == code_fingerprint(*ACTIVATION_CODE):
                return cache
        except Exception:  # noqa: BLE001 - incomplete or stale cache: build (resumes or rebuilds)
            pass
    m = model() if callable(model) else model
    toks = token_rows(m, corpus, split=split, n_tokens=n_tokens, seq_len=seq_len, seed=seed, progress=progress)
    return ActivationCache.build(path, m, toks, [hook], progress=progress)


def family_eval_activations(runs_dir: str | Path, *, model_name: str = "embedded", corpus: str = "embedded",
                            hook: str | None = None, layer: int | None = None, n_tokens: int = 16_384,
                            seq_len: int = 128, seed: int = 1, model: Any = None, progress: bool = True) -> Tensor:
    """Held-out activations [N, d] (BOS excluded) at the family's hook, cached under
    ``<runs_dir>/activations/``; the stitching eval set."""
    from saelib.runs import runs_dir as _runs

    hook = hook or f"blocks.{DEFAULT_LAYERS.get(model_name, 6) if layer is None else layer}.hook_resid_pre"
    runs = _runs(runs_dir)
    model = model if model is not None else (lambda: _load_model(model_name))
    cache = _tokens_and_cache(runs, model, model_name, corpus, hook, "heldout", n_tokens, seq_len, seed, progress)
    return cache.load(hook).float()


def _load_model(model_name: str):
    from saelib.lm.models import load_model

    return load_model(model_name)


def ensure_width_family(
    runs_dir: str | Path,
    *,
    model_name: str = "embedded",
    corpus: str = "embedded",
    layer: int | None = None,
    multipliers: Sequence[int] = (1, 2, 4, 8),
    architectures: Sequence[str] | Mapping[str, Sequence[int]] = ("relu", "topk", "batchtopk", "topafa"),
    n_tokens: int = 131_072,
    batch_size: int = 1024,
    lr: float = 1e-3,
    k: int = 32,
    l1_coeff: float = 3e-3,
    afa_coeff: float = 1 / 16,
    afa_target: str = "consistent",
    input_norm: str = "global",
    train_tokens: int | None = None,
    seq_len: int = 128,
    seed: int = 0,
    name: str | None = None,
    device: str | None = None,
    progress: bool = True,
    model: Any = None,
    release: str | None = None,
) -> WidthFamily:
    """Load the width family from ``<runs_dir>/sae/<name>/``, training (in one pass) what is missing.

    Widths are ``d_model × multipliers`` (the default d·{1, 2, 4, 8}); every architecture gets
    every width (or, when ``architectures`` maps architecture → multipliers, its own widths), all trained together off one cached activation stream with
    :func:`saelib.sae.train.train_saes` (same tokens, same order, same optimiser settings, so width
    and architecture are the only variables). TopK and BatchTopK use ``k`` at every width; ReLU
    uses ``l1_coeff``; top-AFA ``afa_coeff`` and ``afa_target``. ``input_norm="global"`` keeps the
    SAEs affine in model space (stitching folds the scale). ``n_tokens`` activations are cached;
    ``train_tokens`` (default ``n_tokens``) are served from that cache, cycling epochs, so a short
    CPU run can take several passes over a cache that is cheap to harvest.

    Two defaults matter on a short budget. ``afa_target="consistent"``: b_dec starts at the data
    mean, so ||x_n − b_dec|| (what the top-AFA selection matches) is much smaller than ||x_n||
    (what the paper's AFA loss matches); the paper's loss then inflates every activation until
    one or two latents exceed the selection target and the SAE collapses (L0 ≈ 1.5, FVU > 1).
    The consistent target uses ||x_n − b_dec|| in both places. ``l1_coeff`` is weighed against a
    *per-element* MSE (mean over d_in), so it must be about 1/d_in of the usual sum-of-squares
    value: 0.2 kills every ReLU latent (L0 < 1, FVU ≈ 1), 3e-3 gives L0 of tens.

    The folder's ``family.json`` records the recipe (data, optimisation) and a fingerprint of the
    code that trains the family (saelib's SAE, top-AFA, trainer, activation and model modules and
    this function): when either differs, the whole family is retrained, so a family made by older
    code is never reused. Members whose weights do not load (checksum, non-finite) are retrained.

    ``release="gpt2-small-res-jb-feature-splitting"`` instead loads Bloom's GPT-2 feature-splitting
    family (widths 768–98304, ReLU) through SAE Lens (needs the Hugging Face Hub; a local folder or
    ``"standin:<release>"`` works offline, see :func:`load_saelens_family`); ``multipliers`` then
    selects widths 768·m.
    """
    if release is not None:
        return load_saelens_family(release, multipliers=multipliers, device=device, model_name=model_name)
    from saelib.runs import runs_dir as _runs
    from saelib.sae.train import TrainConfig

    if not isinstance(architectures, Mapping):
        architectures = {a: tuple(multipliers) for a in architectures}
    bad = [a for a in architectures if a not in ("relu", "topk", "batchtopk", "topafa")]
    if bad:
        raise ValueError(f"unknown architectures {bad}; choose from relu, topk, batchtopk, topafa")
    for a, mults in architectures.items():
        if not mults or any(int(m) <= 0 for m in mults):
            raise ValueError(f"multipliers for {a} must be positive ints (width = d_model × m), got {tuple(mults)}")
    layer = DEFAULT_LAYERS.get(model_name, 6) if layer is None else layer
    hook = f"blocks.{layer}.hook_resid_pre"
    runs = _runs(runs_dir)
    name = name or family_name(model_name, hook)
    out = runs / "sae" / name
    loaded: dict[str, Any] = {}

    def get_model():
        if "m" not in loaded:
            loaded["m"] = model if model is not None else _load_model(model_name)
        return loaded["m"]

    d_model = _family_d_model(out, model_name, get_model)
    widths_of = {a: tuple(sorted({int(d_model * int(m)) for m in mults})) for a, mults in architectures.items()}
    widths = tuple(sorted({w for ws in widths_of.values() for w in ws}))
    from saelib.sae.core import SAEConfig

    configs = {}
    for arch in architectures:
        for w in widths_of[arch]:
            kw: dict[str, Any] = dict(d_in=d_model, d_sae=w, activation=arch, hook_name=hook, model_name=model_name,
                                      input_norm=input_norm, seed=seed)
            if arch in ("topk", "batchtopk"):
                kw["k"] = min(k, w)
            elif arch == "topafa":
                kw["afa_coeff"] = afa_coeff
                kw["afa_target"] = afa_target
            else:
                kw["l1_coeff"] = l1_coeff
            configs[member_name(arch, w)] = SAEConfig(**kw)
    train_tokens = n_tokens if train_tokens is None else int(train_tokens)
    if train_tokens < batch_size:
        raise ValueError(f"train_tokens={train_tokens} is less than one batch ({batch_size}); raise train_tokens")
    tcfg = TrainConfig(batch_size=batch_size, n_tokens=train_tokens, lr=lr, out_dir=out, progress=progress,
                       device=device, seed=seed, log_every=max(1, (train_tokens // batch_size) // 20))

    # what the SAE configs do not record: the data and the optimisation (a changed preset retrains)
    # ... and the code that trains it: a family made by other saelib code is retrained
    from saelib.io import TRAINING_CODE, code_fingerprint

    recipe = dict(model_name=model_name, corpus=corpus, hook=hook, n_tokens=int(n_tokens), train_tokens=train_tokens,
                  batch_size=int(batch_size), lr=float(lr), seq_len=int(seq_len), seed=int(seed),
                  code=code_fingerprint(*TRAINING_CODE, ensure_width_family, _tokens_and_cache))
    same_recipe = _read_json(out / "family.json") == recipe
    missing = {n: c for n, c in configs.items() if not (same_recipe and _member_done(out / n, c))}
    if missing:
        from saelib.sae.core import SAE
        from saelib.sae.train import train_saes

        cache = _tokens_and_cache(runs, get_model, model_name, corpus, hook, "train", n_tokens, seq_len, seed, progress)
        sample = next(cache.iter_batches([hook], min(8192, cache.n_tokens), seed=seed + 1))[hook].float()
        init = {}
        for n, c in missing.items():
            sae = SAE(c)
            # start b_dec at the data mean (the paper's SAEs start at the geometric median): with a
            # short CPU budget, learning the large mean of the residual stream wastes most steps
            scale = sae.fit_input_norm(sample) if c.input_norm == "global" else 1.0
            with torch.no_grad():
                sae.b_dec.copy_(sample.mean(0) * scale)
            init[n] = sae
        from saelib.io import folder_lock

        with folder_lock(out, "width family folder"):  # one writer; the recipe lands after its SAEs
            train_saes(init, cache.iter_batches([hook], batch_size, seed=seed, n_tokens=train_tokens), tcfg)
            atomic_write_json(out / "family.json", recipe)
    from saelib.sae.train import load_saes

    saes = load_saes(out, list(configs), device=device)
    fam: dict[str, dict[int, Any]] = {a: {} for a in architectures}
    for arch in architectures:
        for w in widths_of[arch]:
            fam[arch][w] = saes[member_name(arch, w)].eval()
    return WidthFamily(name, out, hook, widths, fam)


WIDTH_FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # seconds: a toy family for CI (the chapter's code path, not its conclusions)
    "ci": dict(architectures={"relu": (1, 2, 4), "topk": (1, 2), "batchtopk": (1, 2), "topafa": (1, 2)},
               n_tokens=4096, batch_size=256, lr=2e-3),
    # the book's main job on 2 CPU cores: ReLU at d·{1,2,4,8} (the paper's setting), the
    # beyond-the-paper architectures at d·{1,2,4}
    # 64k cached tokens (one LM pass), 4 epochs in 512 steps of 512 (about 4.5 minutes with the
    # harvest). l1_coeff: see ensure_width_family (per-element MSE); 3e-3 gives ReLU L0 ≈ 31-38
    # at every width, held-out FVU ≈ 0.23-0.25. A 5x shorter run (49k tokens) left the decoders
    # so close to their initialisations that 96-99% of the wider ReLU latents came out novel;
    # this one gives 80-88% (measured on the held-out eval tokens of the stitching chapter).
    "embedded": dict(architectures={"relu": (1, 2, 4, 8), "topk": (1, 2, 4), "batchtopk": (1, 2, 4),
                                    "topafa": (1, 2, 4)},
                     n_tokens=65_536, train_tokens=262_144, batch_size=512, lr=2e-3, l1_coeff=3e-3),
    # the papers' ratios on one GPU (profiles/gpu): ReLU at d·2^n, n = 0..6 (Bloom's GPT-2 family is
    # 768·2^n), the other rules at d·{1..16}; 81,924,096 tokens per SAE (20,001 steps of 4096)
    # cycling a 4.19 M-token cache; lr 4e-4 and batch 4096 are Bloom's, l1_coeff 3e-3 is ours
    "gpu": dict(architectures={"relu": (1, 2, 4, 8, 16, 32, 64), "topk": (1, 2, 4, 8, 16),
                               "batchtopk": (1, 2, 4, 8, 16), "topafa": (1, 2, 4, 8, 16)},
                n_tokens=4_194_304, train_tokens=81_924_096, batch_size=4096, lr=4e-4, l1_coeff=3e-3, k=32),
}
"""Named width-family settings shared by the stitching and meta-SAE chapters (the same preset
gives the same folder and configs, so the family is trained once)."""


def width_family_preset(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`ensure_width_family` for a named preset ("ci", "embedded",
    "gpu"), with ``overrides`` (a mapping of the same arguments, checked) laid over it."""
    if name not in WIDTH_FAMILY_PRESETS:
        raise ValueError(f"unknown width-family preset {name!r}; choose one of {sorted(WIDTH_FAMILY_PRESETS)}")
    overrides = dict(overrides or {})
    if overrides:
        import inspect

        allowed = set(inspect.signature(ensure_width_family).parameters) - {
            "runs_dir", "model_name", "corpus", "layer", "seed", "name", "device", "progress", "model", "release"}
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise ValueError(f"width-family settings {bad} are not ensure_width_family arguments; allowed: {sorted(allowed)}")
    return {**WIDTH_FAMILY_PRESETS[name], **overrides}


def _read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or unreadable."""
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _member_done(folder: Path, cfg: Any) -> bool:
    """A family member is done when its saved SAE has exactly this config."""
    if not (folder / "cfg.json").exists() or not (folder / "sae.safetensors").exists():
        return False
    try:
        from saelib.sae.core import SAE

        return SAE.load(folder).cfg.to_dict() == cfg.to_dict()
    except Exception:  # noqa: BLE001 - unreadable: retrain
        return False


def _family_d_model(out: Path, model_name: str, get_model) -> int:
    """d_model from an existing member's cfg.json (no model load), else from the model."""
    import json

    for p in sorted(out.glob("*/cfg.json")):
        try:
            doc = json.loads(p.read_text())
            return int(doc.get("cfg", doc)["d_in"])
        except Exception:  # noqa: BLE001
            continue
    return int(get_model().cfg.d_model)


def load_saelens_family(release: str = SAELENS_RELEASE, *, multipliers: Sequence[int] = (1, 2, 4, 8),
                        device: str | None = None, model_name: str = "tiny-gpt2-small") -> WidthFamily:
    """A released width family of SAELens SAEs, e.g. Bloom's GPT-2 layer-8 feature-splitting SAEs
    (widths 768·2^n), converted with ``saelib.interop``.

    ``release`` is an SAELens release name (needs the Hugging Face Hub), a local folder of it (one
    sub-folder per sae id), or ``"standin:<release>"`` (random-weight stand-in for ``model_name``,
    see :func:`saelib.interop.write_standin_release`). Its sae ids must read ``<hook>_<width>`` on
    one hook; the smallest width is the base (d_model), and ``multipliers`` select widths base·m."""
    import re

    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a released SAE family needs sae-lens: pip install sae-lens") from e
    from saelib import interop

    ids = interop.release_sae_ids(release, model_name=model_name)
    parsed = {}
    for sae_id in ids:
        m = re.fullmatch(r"(blocks\.\d+\.hook_resid_pre)_(\d+)", sae_id)
        if m:
            parsed[int(m.group(2))] = (m.group(1), sae_id)
    hooks = {h for h, _ in parsed.values()}
    if len(hooks) != 1:
        raise ValueError(f"release {release!r} is not a width family (sae ids '<hook>_<width>' on one hook); its ids: {ids}")
    base = min(parsed)
    widths = tuple(sorted(base * int(m) for m in multipliers))
    if not set(widths) <= set(parsed):
        raise ValueError(f"the release has widths {sorted(parsed)}; multipliers {tuple(multipliers)} give {widths}")
    saes = {w: interop.from_saelens(interop.load_release_sae(release, parsed[w][1], device=device,
                                                             model_name=model_name)).eval()
            for w in widths}
    return WidthFamily(str(release), None, hooks.pop(), widths, {"relu": saes})


# ============================================================================================
# One call per pair (what the chapter runs for every width pair)
# ============================================================================================


class PairAnalysis(NamedTuple):
    """Everything the chapter reports for one (smaller, larger) pair."""

    insertion: InsertionResult
    match: CosineMatch
    cls: Classification
    fam: Families
    op_delta: Tensor
    """[n_ops] individual ΔMSE of every insert / swap operation."""
    curve_monotone: Curve | None
    """Improving ops only, most negative first."""
    curve_all: Curve | None
    """Every op (non-improving ones last): ends at "L's latents + S-only leftovers + b_S"."""
    swap_frac_improving: float
    """Fraction of swap families whose swap alone lowers the MSE."""
    bias_gap: float
    """‖b_dec^S − b_dec^L‖."""
    insertion_threshold: InsertionResult | None = None
    """The non-competing (threshold) insertion on the same tokens (``mode="threshold"``); for
    ReLU / BatchTopK it is the same object as ``insertion``."""
    cls_threshold: Classification | None = None
    """Classification by the sign of the threshold-insertion ΔMSE."""


def analyze_pair(small: Any, large: Any, x: Tensor, *, cfg: StitchConfig | None = None, curves: bool = True,
                 device: str | None = None, progress: bool = False) -> PairAnalysis:
    """Insertion ΔMSE, cosines, classification, families, op ΔMSE and both interpolation curves."""
    cfg = cfg or StitchConfig()
    theta_min = min(min(cfg.theta_grid), cfg.theta)
    competing = sae_parts(small).rule in _COMPETING
    if competing:
        x = x[: cfg.competing_tokens]
    ins = insertion_delta_mse(small, large, x, chunk_tokens=cfg.chunk_tokens, device=device, progress=progress)
    match = decoder_cosine(small, large, theta_min=theta_min, block=cfg.cos_block, device=device)
    cls = classify_latents(ins.delta_mse, ins.freq_large, match.max_cos, theta_grid=cfg.theta_grid)
    if competing:
        ins_t = insertion_delta_mse(small, large, x, chunk_tokens=cfg.chunk_tokens, device=device, mode="threshold")
        cls_t = classify_latents(ins_t.delta_mse, ins_t.freq_large, match.max_cos, theta_grid=cfg.theta_grid)
    else:
        ins_t, cls_t = ins, cls
    fam = build_families(match, theta=cfg.theta, alive_small=ins.freq_small > 0, alive_large=ins.freq_large > 0)
    od = op_delta_mse(small, large, fam, x, chunk_tokens=cfg.chunk_tokens, device=device)
    op_comp = np.nonzero(fam.kind != "small_only")[0]
    is_swap = fam.kind[op_comp] == "swap"
    swap_imp = float((od.numpy()[is_swap] < 0).mean()) if is_swap.any() else float("nan")
    cm = ca = None
    if curves:
        kw = dict(n_points=cfg.competing_points if competing else cfg.n_points, chunk_tokens=cfg.chunk_tokens,
                  device=device)
        cm = interpolation_curve(small, large, fam, od, x, monotone=True, **kw)
        ca = interpolation_curve(small, large, fam, od, x, monotone=False, **kw)
    S, L = sae_parts(small), sae_parts(large)
    return PairAnalysis(ins, match, cls, fam, od, cm, ca, swap_imp, float((S.b_dec - L.b_dec).norm()), ins_t, cls_t)


def log_interp(n: np.ndarray | float, n_ref: Sequence[float], y_ref: Sequence[float]) -> np.ndarray:
    """Trained-SAE value at latent count ``n``, linear in log2(width) between trained widths."""
    o = np.argsort(n_ref)
    return np.interp(np.log2(np.asarray(n, float)), np.log2(np.asarray(n_ref, float)[o]), np.asarray(y_ref, float)[o])
