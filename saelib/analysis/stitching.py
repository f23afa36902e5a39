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
5. **Stitched SAE** (:func:`stitch`, an :class:`~saelib.sae.core.SAE`): encoder columns, encoder
   biases re-centred on the stitched decoder bias (b'_enc = b_enc + W_enc·(b_dec' − b_dec): each
   latent keeps its own input centring), decoder rows of the kept latents, and S's decoder bias only.
6. **Interpolation** (:func:`interpolation_curve`): operations ordered by their own ΔMSE (most
   negative first), applied cumulatively with a running reconstruction; MSE and L0 per point.
7. **Frankenstein** (:func:`frankenstein`): grow the smallest SAE by the novel latents (max cos < θ
   against the current dictionary) of each larger SAE in turn.

Conventions (printed by the chapter, see :class:`StitchConfig`): MSE is per element (mean over
tokens and dimensions, SAELens' ``l2_loss``), in model space; BOS positions are excluded upstream
(``saelib.lm.activations.harvest``); BatchTopK SAEs are used in inference mode (one global
threshold θ, so their latents do not compete, like JumpReLU; stitched, they become a JumpReLU
SAE with per-latent thresholds); the stitched SAE applies the smaller SAE's rule (and k) to all
its latents, whether they compete is ``Rule.competes``.

Everything works on model-space float32 copies of the SAEs (:meth:`SAE.affine` /
:meth:`SAE.from_affine`, input_norm "none" or "global"), with each SAE's own selection rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saelib.sae.core import SAE
from saelib.sae.geometry import MaxCosine, max_cosine
from saelib.sae.metrics import ReconstructionMetrics

__all__ = [
    "StitchConfig", "MaxCosine", "max_cosine", "CosineMatch", "decoder_cosine", "InsertionResult",
    "insertion_delta_mse", "insertion_delta_mse_bruteforce", "Classification", "classify_latents",
    "auroc", "Families", "build_families", "family_summary", "op_delta_mse", "stitch", "Curve",
    "interpolation_curve", "reconstruction_stats", "cos_to_init", "firing_frequency", "frankenstein",
    "PairAnalysis", "analyze_pair", "log_interp",
]

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
# Model-space views of SAEs
# ============================================================================================


def _view(sae: Any, device=None) -> SAE:
    """``sae`` as a float32 model-space SAE (input_norm "none") in eval mode, on ``device``."""
    if not isinstance(sae, SAE):
        raise TypeError(f"stitching expects saelib SAEs, got {type(sae).__name__}; convert SAELens SAEs with "
                        "saelib.interop.from_saelens first")
    c = sae.cfg
    if c.input_norm == "none" and c.dtype == "float32" and not sae.training and (device is None or sae.device == torch.device(device)):
        return sae
    if c.input_norm == "token":
        raise ValueError("stitching needs an SAE that is affine in model space, but this one uses per-token "
                         "input standardisation (input_norm='token'); train the width family with "
                         "input_norm='none' or 'global'")
    sae.rule.latent_state(sae)  # refuses a rule state that cannot be stitched (a NaN BatchTopK threshold)
    return SAE.from_affine(*(t.float().to(device) for t in sae.affine()), like=sae, dtype="float32")


def _select(S: SAE, pre: Tensor, x: Tensor) -> Tensor:
    mask = S.rule.mask(S, pre, x, training=False)
    return pre if mask is None else pre * mask


def _encode(S: SAE, x: Tensor) -> Tensor:
    """Activations [N, m] of model-space x [N, d_in] under S's rule."""
    return _select(S, S._pre_acts_n(x), x)


def _decode(S: SAE, acts: Tensor) -> Tensor:
    return acts @ S.W_dec + S.b_dec


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


def _stitched_rule(S: SAE) -> str:
    return S.rule.stitched_as or S.cfg.activation


def _check_pair(S: SAE, L: SAE) -> None:
    if S.cfg.d_in != L.cfg.d_in:
        raise ValueError(f"the two SAEs read different widths (d_in {S.cfg.d_in} vs {L.cfg.d_in}); stitch SAEs of one hook")
    if _stitched_rule(S) != _stitched_rule(L):
        raise ValueError(f"cannot stitch a {S.cfg.activation!r} SAE with a {L.cfg.activation!r} SAE: the stitched SAE "
                         f"applies one activation rule; pick SAEs of the same architecture")


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
    S, L = _view(small, device), _view(large, device)
    dS = F.normalize(S.W_dec, dim=1)
    dL = F.normalize(L.W_dec, dim=1)
    mx, am, edges, ecos = [], [], [], []
    mx_s = torch.full((S.cfg.d_sae,), -2.0, device=dS.device)
    for s in range(0, L.cfg.d_sae, block):
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


def _competing_dse(S: SAE, L: SAE, x: Tensor, pre_S: Tensor, acts_S: Tensor, pre_L: Tensor,
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
    key_S, key_L = S.rule.competing_keys(pre_S, dn_S), S.rule.competing_keys(pre_L, dn_L)
    vals, order = torch.sort(key_S, dim=1, descending=True, stable=True)  # [T, m_S]
    asc = vals.flip(1).contiguous()
    # q = number of S keys >= e (S latents win ties: they have lower indices in the stitched SAE)
    q = mS - torch.searchsorted(asc, key_L.contiguous(), right=False)  # [T, m_L]
    n_pos_S = (pre_S > 0).sum(1, keepdim=True)  # [T, 1]
    n_S = (acts_S > 0).sum(1, keepdim=True)  # [T, 1] kept positive S latents = top n_S ranks
    pos_L = key_L > 0
    if S.rule.per_token_k:  # a fixed count k (TopK); else top-AFA's nearest cumulative norm
        k = min(S.cfg.k, mS + 1)
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
    S, L = _view(small, device), _view(large, device)
    _check_pair(S, L)
    dev = S.W_dec.device
    dse = torch.zeros(L.cfg.d_sae, dtype=torch.float64, device=dev)
    fL = torch.zeros(L.cfg.d_sae, dtype=torch.float64, device=dev)
    fS = torch.zeros(S.cfg.d_sae, dtype=torch.float64, device=dev)
    se_S = se_L = l0_S = l0_L = 0.0
    n = 0
    it = _chunks(x, chunk_tokens, dev)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="insertion ΔMSE", leave=False)
    dn2_L = (L.W_dec ** 2).sum(1)
    for xc in it:
        pre_S = S._pre_acts_n(xc)
        acts_S = _select(S, pre_S, xc)
        r = xc - _decode(S, acts_S)
        pre_L = L._pre_acts_n(xc)
        acts_L = _select(L, pre_L, xc)
        P = r @ L.W_dec.T  # [T, m_L]  r·d_j
        if S.rule.competes and mode == "rule":
            d = _competing_dse(S, L, xc, pre_S, acts_S, pre_L, r, P)
        else:
            d = acts_L * acts_L * dn2_L - 2 * acts_L * P
        dse += d.sum(0, dtype=torch.float64)
        fL += (acts_L > 0).sum(0)
        fS += (acts_S > 0).sum(0)
        se_S += float((r ** 2).sum(dtype=torch.float64))
        se_L += float(((xc - _decode(L, acts_L)) ** 2).sum(dtype=torch.float64))
        l0_S += float((acts_S > 0).sum())
        l0_L += float((acts_L > 0).sum())
        n += xc.shape[0]
    if n == 0:
        raise ValueError("insertion_delta_mse got no tokens; pass activations [N, d_in] with N > 0")
    D = S.cfg.d_in
    return InsertionResult((dse / (n * D)).cpu(), (fL / n).cpu(), (fS / n).cpu(), se_S / (n * D), se_L / (n * D),
                           l0_S / n, l0_L / n, n)


@torch.no_grad()
def insertion_delta_mse_bruteforce(small: Any, large: Any, x: Tensor, latents: Sequence[int] | Tensor, *,
                                   chunk_tokens: int = 4096) -> Tensor:
    """Reference ΔMSE: for each latent j, build the stitched SAE S + j and re-encode (slow loop)."""
    S, L = _view(small), _view(large)
    _check_pair(S, L)
    x = x.float()
    base = sum(float(((xc - _decode(S, _encode(S, xc))) ** 2).sum(dtype=torch.float64))
               for xc in _chunks(x, chunk_tokens))
    out = []
    keep_S = torch.ones(S.cfg.d_sae, dtype=torch.bool)
    for j in torch.as_tensor(latents).tolist():
        keep_L = torch.zeros(L.cfg.d_sae, dtype=torch.bool)
        keep_L[j] = True
        st = stitch(S, L, keep_S, keep_L)
        se = sum(float(((xc - _decode(st, _encode(st, xc))) ** 2).sum(dtype=torch.float64))
                 for xc in _chunks(x, chunk_tokens))
        out.append((se - base) / (x.shape[0] * S.cfg.d_in))
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
    S, L = _view(small, device), _view(large, device)
    _check_pair(S, L)
    op_comp, opS, opL = _ops(fam)
    n_ops = len(op_comp)
    dev = S.W_dec.device
    opS, opL = opS.to(dev), opL.to(dev)
    # members of every op, as indices into the concatenation [S latents, L latents], with signs
    lat_op = torch.cat([opS, opL])
    sign = torch.cat([-torch.ones(S.cfg.d_sae, device=dev), torch.ones(L.cfg.d_sae, device=dev)])
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
        aS = _encode(S, xc)
        aL = _encode(L, xc)
        r = xc - _decode(S, aS)
        A = torch.cat([aS, aL], dim=1)  # [T, m_S + m_L]
        h = (A * (r @ D.T)) * sign  # [T, m]  s_l a_l (r·d_l)
        lin.index_add_(0, lat_op[in_op], h[:, in_op].sum(0, dtype=torch.float64))
        for ops_s, mem, G in groups:
            Am = A[:, mem]  # [T, n, s]
            quad[ops_s] += torch.einsum("tns,nsr,tnr->n", Am, G, Am).double()
        n += xc.shape[0]
    return ((quad - 2 * lin) / (n * S.cfg.d_in)).cpu()


# ============================================================================================
# Step E: the stitched SAE
# ============================================================================================


def stitch(small: Any, large: Any, keep_small: Tensor | np.ndarray, keep_large: Tensor | np.ndarray, *,
           decoder_bias: str = "small") -> SAE:
    """The stitched SAE (model space, float32, eval mode) over the kept latents: S's kept latents
    first, then L's, with S's decoder bias (``decoder_bias="large"``: L's).

    Each latent keeps its encoder column and its own input centring, so its encoder bias is
    re-centred on the new decoder bias: b'_enc = b_enc + (b_dec' − b_dec) @ W_enc. The rule (and
    k) is S's; per-latent rule state is concatenated (BatchTopK's thresholds θ_S, θ_L make the
    stitched SAE a JumpReLU SAE with per-latent thresholds, ``Rule.stitched_as``).
    """
    S, L = _view(small), _view(large)
    _check_pair(S, L)
    kS, kL = (torch.as_tensor(k if isinstance(k, Tensor) else np.asarray(k)).to(S.device, torch.bool)
              for k in (keep_small, keep_large))
    mS, mL = S.cfg.d_sae, L.cfg.d_sae
    if kS.shape != (mS,) or kL.shape != (mL,):
        raise ValueError(f"keep masks must have shapes [{mS}] and [{mL}], got {tuple(kS.shape)}, {tuple(kL.shape)}")
    if decoder_bias not in ("small", "large"):
        raise ValueError(f"decoder_bias must be 'small' or 'large', got {decoder_bias!r}")
    with torch.no_grad():
        b_dec = (S.b_dec if decoder_bias == "small" else L.b_dec).detach().clone()
        b_enc = [(P.b_enc + (b_dec - P.b_dec) @ P.W_enc)[k] for P, k in ((S, kS), (L, kL))]
        stS, stL = S.rule.latent_state(S), L.rule.latent_state(L)
        state = {n: torch.cat([stS[n][kS], stL[n][kL]]) for n in stS}
        return SAE.from_affine(torch.cat([S.W_enc[:, kS], L.W_enc[:, kL]], dim=1), torch.cat(b_enc),
                               torch.cat([S.W_dec[kS], L.W_dec[kL]]), b_dec, like=S, activation=_stitched_rule(S),
                               state=state)


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
    S, L = _view(small, device), _view(large, device)
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
    n_lat = S.cfg.d_sae + np.concatenate([[0], np.cumsum(dS)])[pts]
    x = x.float().to(dev)
    N = x.shape[0]
    var = float(((x - x.mean(0)) ** 2).sum(dtype=torch.float64))
    se = np.zeros(len(pts))
    l0 = np.zeros(len(pts))
    if decoder_bias == "large":
        raise NotImplementedError("decoder_bias='large' curves: build the endpoints with stitch(...) instead")
    if S.rule.competes:
        for pi, c in enumerate(pts):
            kS = ~((rS >= 0) & (rS < c))
            kL = (rL >= 0) & (rL < c)
            st = stitch(S, L, kS, kL)
            for xc in _chunks(x, chunk_tokens, dev):
                a = _encode(st, xc)
                se[pi] += float(((xc - _decode(st, a)) ** 2).sum(dtype=torch.float64))
                l0[pi] += float((a > 0).sum())
    else:
        sign = torch.cat([-torch.ones(S.cfg.d_sae, device=dev), torch.ones(L.cfg.d_sae, device=dev)])
        D = torch.cat([S.W_dec, L.W_dec]) * sign[:, None]
        rk = torch.cat([rS, rL])
        seg_lat = [((rk >= lo) & (rk < hi)).nonzero(as_tuple=True)[0] for lo, hi in zip(pts[:-1], pts[1:])]
        for xc in _chunks(x, chunk_tokens, dev):
            aS = _encode(S, xc)
            aL = _encode(L, xc)
            A = torch.cat([aS, aL], dim=1)
            fired = (A > 0).float()
            xh = _decode(S, aS)
            se[0] += float(((xc - xh) ** 2).sum(dtype=torch.float64))
            cur_l0 = float((aS > 0).sum())
            l0[0] += cur_l0
            for pi, lat in enumerate(seg_lat, start=1):
                if lat.numel():
                    xh = xh + A[:, lat] @ D[lat]
                    cur_l0 += float((fired[:, lat] * sign[lat]).sum())
                se[pi] += float(((xc - xh) ** 2).sum(dtype=torch.float64))
                l0[pi] += cur_l0
    return Curve(pts, n_lat, se / (N * S.cfg.d_in), se / var, l0 / N, order, np.asarray(op_delta, float)[order])


@torch.no_grad()
def reconstruction_stats(sae: Any, x: Tensor, *, chunk_tokens: int = 2048, device: str | None = None) -> dict[str, float]:
    """``n_latents`` and the :class:`~saelib.sae.metrics.ReconstructionMetrics` (``mse``, ``fvu``,
    ``nmse``, ``l0``, ``dead``, ...) of an SAE on activations x [N, d]."""
    p = _view(sae, device)
    m = ReconstructionMetrics(p.cfg.d_sae)
    for xc in _chunks(x.float(), chunk_tokens, p.W_dec.device):
        a = _encode(p, xc)
        m.add(xc, _decode(p, a), a)
    return {"n_latents": p.cfg.d_sae, **m.result()}


@torch.no_grad()
def firing_frequency(sae: Any, x: Tensor, *, chunk_tokens: int = 2048, device: str | None = None) -> Tensor:
    """[m] fraction of tokens of x on which each latent is active (0 = dead on this set)."""
    p = _view(sae, device)
    cnt = torch.zeros(p.cfg.d_sae, dtype=torch.float64, device=p.W_dec.device)
    for xc in _chunks(x, chunk_tokens, p.W_dec.device):
        cnt += (_encode(p, xc) > 0).sum(0)
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
    one row per step: source width, latents and :func:`reconstruction_stats`; and the final stitched SAE."""
    import pandas as pd

    views = [_view(s) for s in saes]
    cur = views[0]
    rows = [{"step": 0, "source": views[0].cfg.d_sae, "added": 0, **reconstruction_stats(cur, x, chunk_tokens=chunk_tokens)}]
    for i, P in enumerate(views[1:], start=1):
        mc = max_cosine(P.W_dec, cur.W_dec).values
        fired = firing_frequency(P, x, chunk_tokens=chunk_tokens) > 0
        add = (mc < theta) & fired
        cur = stitch(cur, P, torch.ones(cur.cfg.d_sae, dtype=torch.bool), add)
        rows.append({"step": i, "source": P.cfg.d_sae, "added": int(add.sum()),
                     **reconstruction_stats(cur, x, chunk_tokens=chunk_tokens)})
    return pd.DataFrame(rows), cur


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
    competing = small.rule.competes
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
    S, L = _view(small), _view(large)
    return PairAnalysis(ins, match, cls, fam, od, cm, ca, swap_imp, float((S.b_dec - L.b_dec).detach().norm()), ins_t, cls_t)


def log_interp(n: np.ndarray | float, n_ref: Sequence[float], y_ref: Sequence[float]) -> np.ndarray:
    """Trained-SAE value at latent count ``n``, linear in log2(width) between trained widths."""
    o = np.argsort(n_ref)
    return np.interp(np.log2(np.asarray(n, float)), np.log2(np.asarray(n_ref, float)[o]), np.asarray(y_ref, float)[o])
