"""Approximate feature activation (AFA): quasi-orthogonality, the norm bound, f̃ and ZF statistics.

The theory of top-AFA SAEs (Lee et al., arXiv 2503.24277) in code:

* ``epsilon`` measures the quasi-orthogonality constant ε = max_{i≠j} |cos(w_i, w_j)| of a
  decoder (exactly, block by block, without an h×h Gram) and ``epsilon_sampled`` estimates it;
  ``welch_bound`` is the smallest ε any h unit vectors in R^d can reach.
* ``bound_slopes`` turns ε(h−1) (the paper's worst case) or ε(k−1) / δ_k (the tight and RIP
  forms) into the slopes of the cone ‖z‖/√(1+εh') ≤ ‖f‖ ≤ ‖z‖/√(1−εh') drawn on a ZF plot.
* ``f_tilde`` puts an SAE code in AFA form: decoder-norm-scaled activations plus the ‖b_dec‖
  atom, so that ẑ = f̃ · [Ŵ_dec; b̂_dec] with unit-norm atoms.
* ``zf_stats`` gives per-token ‖z‖, ‖f̃‖, their ratio, NMSE and εLBO (with a ẑ-based variant
  that splits reconstruction error from decoder geometry); ``zf_summary`` tabulates them.
* :mod:`saelib.analysis.concentration` gives the probabilistic (random-dictionary) statement
  that actually explains why ‖f‖ ≈ ‖z‖.

Every function takes plain tensors (``W_dec [h, d]``, ``b_dec [d]``, ``acts [N, h]``,
``z [N, d]``); ``*_sae`` wrappers take any SAE-like object (``W_dec``, ``b_dec``, ``encode``,
``cfg``; saelib or SAELens). Space convention: ``z`` must live in the SAE's *decoder space*, the
space in which ``acts @ W_dec + b_dec`` reconstructs it. For SAEs that normalise their input
(SAELens ``normalize_activations``, saelib ``input_norm``) the wrappers map z there first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.sae.geometry import Epsilon, MaxCosine, max_cosine, pair_cosines, unit_rows  # noqa: F401 - Epsilon/MaxCosine/max_cosine re-exported

__all__ = [
    "Epsilon",
    "epsilon",
    "epsilon_dense",
    "epsilon_sampled",
    "epsilon_sae",
    "welch_bound",
    "BoundSlopes",
    "bound_slopes",
    "worst_case_slopes",
    "tight_slopes",
    "rip_slopes",
    "eps_for_eps_h",
    "f_tilde",
    "f_tilde_atoms",
    "f_tilde_sq_norm",
    "ZFStats",
    "zf_stats",
    "zf_stats_sae",
    "zf_stats_model_space",
    "activation_class",
    "zf_summary",
    "eps_lbo",
    "mdl_bits",
    "sae_decoder",
    "to_decoder_space",
    "MaxCosine",
    "max_cosine",
]

_SQRT_HALF = math.sqrt(0.5)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _as_tensor(x: Any, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # pragma: no cover - message path
        raise TypeError(f"{name} must be a tensor or array-like, got {type(x).__name__}") from exc


def _decoder_matrix(W_dec: Any) -> Tensor:
    """``W_dec [h, d]`` as a float tensor; accepts an SAE-like object (uses its ``W_dec``)."""
    if hasattr(W_dec, "W_dec") and not isinstance(W_dec, Tensor):
        W_dec = W_dec.W_dec
    W = _as_tensor(W_dec, "W_dec")
    if W.ndim != 2:
        raise ValueError(
            f"W_dec must be 2-D [h, d] (one decoder row per latent), got shape {tuple(W.shape)}"
        )
    if not W.is_floating_point():
        W = W.float()
    if W.dtype in (torch.float16, torch.bfloat16):
        W = W.float()  # half-precision dot products are too coarse for ε ~ 1e-2
    return W


def _finite_decoder(W: Tensor) -> Tensor:
    """``W`` unchanged; NaN/inf entries raise (ε of such a decoder is undefined, never 0)."""
    n_bad = int((~torch.isfinite(W)).sum())
    if n_bad:
        rows = int((~torch.isfinite(W)).any(1).sum())
        raise ValueError(
            f"W_dec has {n_bad} non-finite (NaN/inf) entries in {rows} rows, so ε is undefined: the SAE "
            "diverged in training; retrain it (lower the learning rate or normalise the inputs)"
        )
    return W


def _bias_vector(b_dec: Any, d: int, like: Tensor) -> Tensor:
    if b_dec is None:
        return torch.zeros(d, dtype=like.dtype, device=like.device)
    b = _as_tensor(b_dec, "b_dec").to(dtype=like.dtype, device=like.device)
    if b.shape != (d,):
        raise ValueError(f"b_dec must have shape [d]=[{d}] to match W_dec, got {tuple(b.shape)}")
    return b


# --------------------------------------------------------------------------------------------
# ε-quasi-orthogonality
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def epsilon(
    W_dec: Any,
    *,
    block_size: int = 2048,
    exact: bool = True,
    n_pairs: int = 2_000_000,
    seed: int = 0,
    progress: bool = False,
) -> Epsilon:
    """ε-quasi-orthogonality of the rows of ``W_dec [h, d]`` (rows are normalised first).

    Exact mode is :func:`saelib.sae.geometry.pair_cosines` (the trainer's ε log uses it too): the
    upper triangle of the Gram matrix in ``block_size × block_size`` tiles, never the h×h Gram;
    about 58 MiB extra for h=12288, d=768 at the default block size.

    Args:
        W_dec: decoder ``[h, d]`` (tensor/array) or any object with a ``W_dec`` attribute.
        block_size: tile edge; smaller uses less memory, larger is a little faster.
        exact: if False, return ``epsilon_sampled(W_dec, n_pairs, seed)`` instead.
        n_pairs, seed: used only when ``exact=False``.
        progress: show a tqdm bar over row blocks (useful for h ≳ 50k on CPU).

    A decoder with NaN/inf entries raises ValueError (its ε is undefined, never reported as 0).
    """
    W = _finite_decoder(_decoder_matrix(W_dec))
    if not exact:
        return epsilon_sampled(W, n_pairs=n_pairs, seed=seed)
    return pair_cosines(W, block_size=block_size, progress=progress)


@torch.no_grad()
def epsilon_dense(W_dec: Any) -> Epsilon:
    """Reference ε from the full h×h Gram matrix (extra memory ≈ h²·4 bytes; tests and benchmarks)."""
    W = _finite_decoder(_decoder_matrix(W_dec))
    h = W.shape[0]
    if h < 2:
        raise ValueError(f"need at least 2 decoder rows to form a pair, got h={h}")
    U, _ = unit_rows(W)
    G = U @ U.T  # [h, h]
    G.fill_diagonal_(0.0)
    # G is symmetric: sums over ordered pairs are twice the sums over pairs i < j
    n = h * (h - 1) // 2
    mean_signed = float(G.sum(1).double().sum()) / (2 * n)
    rms = math.sqrt(float(torch.linalg.vector_norm(G, dim=1).double().square().sum()) / (2 * n))
    G.abs_()
    mean = float(G.sum(1).double().sum()) / (2 * n)
    G.triu_(1)  # argmax among i < j
    k = int(G.argmax())
    r, c = divmod(k, h)
    best = float(G[r, c])
    if best <= 0.0:
        r, c = 0, 1
    return Epsilon(max=best, mean=mean, mean_signed=mean_signed, rms=rms, n_pairs=n, argmax=(r, c),
                   exact=True, mean_stderr=0.0)


@torch.no_grad()
def epsilon_sampled(W_dec: Any, n_pairs: int = 1_000_000, seed: int = 0, *, min_blocks: int = 16) -> Epsilon:
    """Estimate ε statistics from about ``n_pairs`` random pairs i ≠ j, in random row blocks.

    Each of ``n_blocks`` (≥ ``min_blocks``) independent blocks draws two random row sets I, J of
    size m (with replacement) and uses all m² pairs (i, j), i ≠ j, via one small matmul: a
    gather of 2m rows instead of 2·n_pairs rows, so it is fast and memory-light (2·m·d + m²
    floats). ``mean``, ``mean_signed`` and ``rms`` are unbiased; ``mean_stderr`` is the spread
    of the block means / sqrt(n_blocks). ``max`` is the max over the sample, so it
    *under*-estimates the true ε: use ``epsilon`` when the maximum matters.
    """
    W = _finite_decoder(_decoder_matrix(W_dec)).float()
    h = W.shape[0]
    if h < 2:
        raise ValueError(f"need at least 2 decoder rows to form a pair, got h={h}")
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    _, norms = unit_rows(W)
    n_blocks = max(min_blocks, math.ceil(n_pairs / 1024**2))
    m = max(2, math.ceil(math.sqrt(n_pairs / n_blocks)))
    gen = torch.Generator().manual_seed(seed)
    s_abs = s_signed = s_sq = 0.0
    count = 0
    block_means = []
    best, best_ij = -1.0, (0, 1)
    for _ in range(n_blocks):
        I = torch.randint(0, h, (m,), generator=gen).to(W.device)
        J = torch.randint(0, h, (m,), generator=gen).to(W.device)
        C = (W[I] / norms[I, None]) @ (W[J] / norms[J, None]).T  # [m, m] cosines
        valid = I[:, None] != J[None, :]
        c = C[valid].double()
        if c.numel() == 0:
            continue
        a = c.abs()
        s_signed += float(c.sum())
        s_abs += float(a.sum())
        s_sq += float(c.square().sum())
        count += c.numel()
        block_means.append(float(a.mean()))
        k = int(a.argmax())
        if float(a[k]) > best:
            r, q = valid.nonzero()[k].tolist()
            best, best_ij = float(a[k]), tuple(sorted((int(I[r]), int(J[q]))))
    bm = torch.tensor(block_means, dtype=torch.float64)
    stderr = float(bm.std() / math.sqrt(len(block_means))) if len(block_means) > 1 else math.inf
    return Epsilon(
        max=best,
        mean=s_abs / count,
        mean_signed=s_signed / count,
        rms=math.sqrt(s_sq / count),
        n_pairs=count,
        argmax=best_ij,  # type: ignore[arg-type]
        exact=False,
        mean_stderr=stderr,
    )


def epsilon_sae(sae: Any, **kwargs: Any) -> Epsilon:
    """``epsilon`` of an SAE-like object's decoder (rows normalised, so decoder scaling is moot)."""
    return epsilon(sae_decoder(sae)[0], **kwargs)


def welch_bound(h: int, d: int) -> float:
    """Welch lower bound sqrt((h−d)/(d(h−1))) on max |cos| (and on RMS cos) of h unit vectors in R^d.

    Zero when h ≤ d (an orthonormal set exists). 0.0349 for d=768, h=12288.
    """
    if h < 2 or d < 1:
        raise ValueError(f"welch_bound needs h >= 2 and d >= 1, got h={h}, d={d}")
    if h <= d:
        return 0.0
    return math.sqrt((h - d) / (d * (h - 1)))


# --------------------------------------------------------------------------------------------
# the AFA norm bound and its cones
# --------------------------------------------------------------------------------------------


class BoundSlopes(NamedTuple):
    """Slopes of the cone lower·‖z‖ ≤ ‖f‖ ≤ upper·‖z‖ in the (‖z‖, ‖f‖) plane."""

    eps_h: Any
    """The product ε·(h−1) (worst case), ε·(k−1) (tight) or δ_k (RIP) the slopes were made from."""
    lower: Any
    """sqrt(1/(1+eps_h))."""
    upper: Any
    """sqrt(1/(1−eps_h)); ``inf`` where eps_h ≥ 1 (the bound gives no upper limit)."""


def bound_slopes(eps_h: float | Sequence[float] | Tensor) -> BoundSlopes:
    """Cone slopes of the AFA bound ‖z‖²/(1+eps_h) ≤ ‖f‖² ≤ ‖z‖²/(1−eps_h).

    ``eps_h`` is ε(h−1) in the paper's worst-case form, ε(k−1) in the tight form (k = ‖f‖₀) or
    the restricted-isometry constant δ_k. Scalars give floats; sequences/tensors give tensors.
    At eps_h = 0.25 / 0.5 / 1: lower 0.894 / 0.816 / 0.707, upper 1.155 / 1.414 / inf.
    """
    scalar = isinstance(eps_h, (int, float))
    e = torch.as_tensor(eps_h, dtype=torch.float64)
    if (e < 0).any():
        raise ValueError(f"eps_h must be >= 0 (it is ε times a count), got {eps_h}")
    lower = (1.0 / (1.0 + e)).sqrt()
    upper = torch.where(e < 1, (1.0 / (1.0 - e).clamp_min(1e-300)).sqrt(), torch.full_like(e, math.inf))
    if scalar:
        return BoundSlopes(float(e), float(lower), float(upper))
    return BoundSlopes(e, lower, upper)


def worst_case_slopes(eps: float, h: int) -> BoundSlopes:
    """The paper's cone: ``bound_slopes(eps * (h - 1))``."""
    return bound_slopes(eps * (h - 1))


def tight_slopes(eps: float, k: int | Tensor) -> BoundSlopes:
    """Cone for codes with at most k active latents: ``bound_slopes(eps * (k - 1))``.

    Cauchy–Schwarz on the support gives ‖f‖₁² ≤ k‖f‖₂², so h−1 may be replaced by k−1.
    """
    if isinstance(k, int):
        return bound_slopes(eps * (max(k, 1) - 1))
    return bound_slopes(eps * (torch.as_tensor(k, dtype=torch.float64).clamp_min(1) - 1))


def rip_slopes(delta_k: float | Tensor) -> BoundSlopes:
    """Cone from the restricted-isometry constant δ_k (Gershgorin: δ_k ≤ ε(k−1))."""
    return bound_slopes(delta_k)


def eps_for_eps_h(eps_h: float | Sequence[float], h: int) -> Any:
    """ε that gives a cone of width eps_h in the worst-case form: eps_h / (h − 1).

    The paper's cones ε(h−1) ∈ {0.25, 0.5, 1} at h=24576 are ε ≈ {1.0, 2.0, 4.1}·1e-5.
    """
    if h < 2:
        raise ValueError(f"h must be >= 2, got {h}")
    if isinstance(eps_h, (int, float)):
        return eps_h / (h - 1)
    return [e / (h - 1) for e in eps_h]


# --------------------------------------------------------------------------------------------
# f̃: an SAE code in AFA form
# --------------------------------------------------------------------------------------------


def f_tilde_atoms(W_dec: Any, b_dec: Any = None) -> Tensor:
    """Unit atoms ``[h+1, d]``: the normalised decoder rows, then b_dec/‖b_dec‖.

    Zero rows (and a zero bias) give zero atoms; their f̃ entry is 0, so ẑ = f̃·atoms still holds.
    """
    W = _decoder_matrix(W_dec)
    b = _bias_vector(b_dec, W.shape[1], W)
    M = torch.cat([W, b[None, :]], dim=0)
    n = M.norm(dim=1, keepdim=True)
    return torch.where(n > 0, M / n.clamp_min(torch.finfo(M.dtype).tiny), torch.zeros_like(M))


def f_tilde(acts: Any, W_dec: Any, b_dec: Any = None) -> Tensor:
    """Augmented code f̃ ``[N, h+1]`` = (f_i·‖W_dec[i]‖ for i < h, then ‖b_dec‖).

    With ``f_tilde_atoms``: acts @ W_dec + b_dec == f_tilde(...) @ f_tilde_atoms(...).
    """
    W = _decoder_matrix(W_dec)
    f = _as_tensor(acts, "acts").to(W.dtype)
    if f.ndim != 2 or f.shape[1] != W.shape[0]:
        raise ValueError(
            f"acts must be [N, h] with h={W.shape[0]} (= W_dec rows), got shape {tuple(f.shape)}"
        )
    b = _bias_vector(b_dec, W.shape[1], W)
    bias_col = b.norm().expand(f.shape[0], 1)
    return torch.cat([f * W.norm(dim=1)[None, :], bias_col], dim=1)


def f_tilde_sq_norm(acts: Any, W_dec: Any, b_dec: Any = None, *, chunk: int = 4096) -> Tensor:
    """‖f̃‖² per token ``[N]`` = Σ (f_i‖W_dec[i]‖)² + ‖b_dec‖², without building f̃ (chunked)."""
    W = _decoder_matrix(W_dec)
    f = _as_tensor(acts, "acts")
    if f.ndim != 2 or f.shape[1] != W.shape[0]:
        raise ValueError(
            f"acts must be [N, h] with h={W.shape[0]} (= W_dec rows), got shape {tuple(f.shape)}"
        )
    b = _bias_vector(b_dec, W.shape[1], W)
    dn2 = W.float().square().sum(dim=1)  # [h]
    out = torch.empty(f.shape[0], dtype=torch.float32, device=f.device)
    for c0 in range(0, f.shape[0], chunk):
        out[c0 : c0 + chunk] = f[c0 : c0 + chunk].float().square() @ dn2
    return out + float(b.float().square().sum())


# --------------------------------------------------------------------------------------------
# per-token ZF statistics
# --------------------------------------------------------------------------------------------


def eps_lbo(norm_z: Any, norm_f: Any, h: int) -> Tensor:
    """εLBO = |‖z‖² − ‖f‖²| / ((h−1)‖f‖²): the smallest ε consistent with the worst-case bound.

    Not a variational ELBO. With h fixed it is a rescaled relative norm mismatch.
    Tokens with ‖f‖ = 0 give inf (no ε can explain a non-zero z from an empty code).
    """
    if h < 2:
        raise ValueError(f"h must be >= 2, got {h}")
    z2 = torch.as_tensor(norm_z, dtype=torch.float64).square()
    f2 = torch.as_tensor(norm_f, dtype=torch.float64).square()
    num = (z2 - f2).abs()
    with torch.no_grad():
        out = num / ((h - 1) * f2)
    out = torch.where((f2 == 0) & (num == 0), torch.zeros_like(out), out)
    return out.float()


class ZFStats(NamedTuple):
    """Per-token ZF quantities (all ``[N]`` float32 tensors except ``h``).

    Everything is in the SAE's decoder space (where ẑ = acts @ W_dec + b_dec).
    """

    norm_z: Tensor
    """‖z‖ ("Linear-AFA", x-axis of the ZF plot)."""
    norm_f: Tensor
    """‖f̃‖ (decoder-scaled code plus the ‖b_dec‖ atom; y-axis of the ZF plot)."""
    norm_z_hat: Tensor
    """‖ẑ‖."""
    ratio: Tensor
    """‖f̃‖/‖z‖ (> 1: over-activated, < 1: under-activated)."""
    ratio_hat: Tensor
    """‖f̃‖/‖ẑ‖: the geometry alone (ẑ = f̃·atoms exactly, so ≠ 1 means cross terms do not cancel)."""
    nmse: Tensor
    """Normalised MSE ‖z − ẑ‖²/‖z‖²."""
    eps_lbo: Tensor
    """Paper's εLBO |‖z‖² − ‖f̃‖²| / ((h−1)‖f̃‖²)."""
    eps_lbo_hat: Tensor
    """Geometry part: |‖ẑ‖² − ‖f̃‖²| / ((h−1)‖f̃‖²) (decoder cross terms only)."""
    eps_lbo_recon: Tensor
    """Reconstruction part: |‖z‖² − ‖ẑ‖²| / ((h−1)‖f̃‖²); eps_lbo ≤ eps_lbo_hat + eps_lbo_recon."""
    l0: Tensor
    """Active latents per token."""
    k_eff: Tensor
    """Effective support ‖f̃‖₁²/‖f̃‖₂² ∈ [1, l0+1] (the bias atom counts): the count the bound needs."""
    coherence: Tensor
    """Weighted mean cosine of co-active atoms ρ = (‖ẑ‖² − ‖f̃‖²)/(‖f̃‖₁² − ‖f̃‖₂²), so that exactly
    ‖f̃‖/‖ẑ‖ = 1/sqrt(1 + ρ(k_eff − 1)); |ρ| ≤ ε. NaN when only one atom is active."""
    h: int
    """Dictionary size used in the εLBO denominators (h, not h+1, as in the paper)."""

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], h: int) -> ZFStats:
        """Rebuild from per-token arrays stored by field name (e.g. ``EvalResult.zf``)."""
        return cls(*[torch.as_tensor(arrays[f]) for f in cls._fields[:-1]], h=int(h))


@torch.no_grad()
def zf_stats(
    z: Any,
    acts: Any,
    W_dec: Any,
    b_dec: Any = None,
    *,
    z_hat: Any = None,
    h: int | None = None,
    chunk: int = 4096,
) -> ZFStats:
    """Per-token ZF statistics for inputs ``z [N, d]`` and codes ``acts [N, h]``.

    Args:
        z: dense inputs, in the decoder space (see module docstring).
        acts: the SAE's (dense, zero-filled) feature activations for ``z``.
        W_dec, b_dec: decoder ``[h, d]`` and bias ``[d]`` (``None`` = no bias).
        z_hat: reconstruction ``[N, d]``; default ``acts @ W_dec + b_dec``. Pass it if the SAE's
            decode differs (e.g. a tied output normalisation); the geometry split assumes ẑ
            is the affine decode.
        h: dictionary size for εLBO (default: rows of W_dec).
        chunk: tokens per chunk (bounds temporary memory to chunk × h floats).
    """
    W = _decoder_matrix(W_dec).float()
    Z = _as_tensor(z, "z").float()
    A = _as_tensor(acts, "acts")
    if Z.ndim != 2 or Z.shape[1] != W.shape[1]:
        raise ValueError(f"z must be [N, d] with d={W.shape[1]} (= W_dec columns), got {tuple(Z.shape)}")
    if A.ndim != 2 or A.shape != (Z.shape[0], W.shape[0]):
        raise ValueError(
            f"acts must be [N, h] = [{Z.shape[0]}, {W.shape[0]}] to match z and W_dec, got {tuple(A.shape)}"
        )
    b = _bias_vector(b_dec, W.shape[1], W)
    h = W.shape[0] if h is None else h
    N = Z.shape[0]
    dn2 = W.square().sum(dim=1)
    b2 = float(b.square().sum())
    norm_f2 = torch.empty(N, device=Z.device)
    norm_f1 = torch.empty(N, device=Z.device)
    dn = dn2.sqrt()
    bn = math.sqrt(b2)
    norm_zh = torch.empty(N, device=Z.device)
    err2 = torch.empty(N, device=Z.device)
    l0 = torch.empty(N, device=Z.device)
    Zh_given = None if z_hat is None else _as_tensor(z_hat, "z_hat").float()
    if Zh_given is not None and Zh_given.shape != Z.shape:
        raise ValueError(f"z_hat must have the shape of z {tuple(Z.shape)}, got {tuple(Zh_given.shape)}")
    for c0 in range(0, N, chunk):
        a = A[c0 : c0 + chunk].float()
        norm_f2[c0 : c0 + chunk] = a.square() @ dn2 + b2
        norm_f1[c0 : c0 + chunk] = a.abs() @ dn + bn
        zh = a @ W + b if Zh_given is None else Zh_given[c0 : c0 + chunk]
        norm_zh[c0 : c0 + chunk] = zh.norm(dim=1)
        err2[c0 : c0 + chunk] = (Z[c0 : c0 + chunk] - zh).square().sum(dim=1)
        l0[c0 : c0 + chunk] = (a != 0).sum(dim=1).float()
    norm_z = Z.norm(dim=1)
    norm_f = norm_f2.sqrt()
    z2, zh2 = norm_z.double().square(), norm_zh.double().square()
    denom = (h - 1) * norm_f2.double()

    def _div(num: Tensor) -> Tensor:
        out = num / denom
        return torch.where((denom == 0) & (num == 0), torch.zeros_like(out), out).float()

    safe = lambda a, c: torch.where(c > 0, a / c.clamp_min(1e-30), torch.full_like(a, math.nan))  # noqa: E731
    return ZFStats(
        norm_z=norm_z,
        norm_f=norm_f,
        norm_z_hat=norm_zh,
        ratio=safe(norm_f, norm_z),
        ratio_hat=safe(norm_f, norm_zh),
        nmse=safe(err2, norm_z.square()),
        eps_lbo=_div((z2 - norm_f2.double()).abs()),
        eps_lbo_hat=_div((zh2 - norm_f2.double()).abs()),
        eps_lbo_recon=_div((z2 - zh2).abs()),
        l0=l0,
        k_eff=safe(norm_f1.square(), norm_f2),
        coherence=_coherence(zh2, norm_f2.double(), norm_f1.double(), l0 + (1.0 if bn > 0 else 0.0)),
        h=int(h),
    )


def _coherence(zh2: Tensor, f2: Tensor, f1: Tensor, n_atoms: Tensor) -> Tensor:
    cross = f1.square() - f2  # Σ_{i≠j} |f̃_i f̃_j|
    # one active atom: no pairs (float32 rounding of ‖f̃‖₁² − ‖f̃‖₂² must not pass for cross terms)
    ok = (n_atoms.to(f2.device) >= 2) & (cross > 1e-9 * f2.clamp_min(1e-30))
    return torch.where(ok, (zh2 - f2) / cross.clamp_min(1e-300), torch.full_like(f2, math.nan)).float()


def _quantiles(x: Tensor, qs: Sequence[float]) -> list[float]:
    x = x.double().flatten()
    x = x[~torch.isnan(x)]
    if x.numel() == 0:
        return [math.nan] * len(qs)
    return [float(v) for v in torch.quantile(x, torch.tensor(list(qs), dtype=torch.float64))]


def activation_class(ratio: Any, tol: float = 0.0) -> np.ndarray:
    """Per-token class of the ZF ratio ‖f̃‖/‖z‖ with a tolerance band of half-width ``tol``:
    "over" (ratio > 1 + tol), "under" (ratio < 1 − tol), "within" (otherwise), "nan" (‖z‖ = 0).

    ``tol = 0`` is the paper's strict split (its "% over" counts ratio > 1). A band is needed to
    say anything: a norm-matching SAE (top-AFA) sits at ratio ≈ 1 by construction, and a strict
    split then labels half its tokens "over-activated" by rounding alone.
    """
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")
    r = torch.as_tensor(ratio, dtype=torch.float64).cpu().numpy()
    out = np.full(r.shape, "within", dtype=object)
    out[r > 1 + tol] = "over"
    out[r < 1 - tol] = "under"
    out[np.isnan(r)] = "nan"
    return out


def zf_summary(stats: ZFStats | Mapping[Any, ZFStats], *, pooled: bool = False, tol: float = 0.0):
    """One row per layer (or per key) like the paper's ZF table; returns a pandas DataFrame.

    Columns: n, median ‖z‖ and ‖f̃‖, median ratio with IQR, % over-activated (ratio > 1 + tol),
    % under-activated (ratio < 1 − tol) and % within the band, median NMSE and εLBO with IQRs,
    % at or above the √½ line (lower edge of the ε(h−1)=1 cone), the spread of ‖z‖ (its
    coefficient of variation: ≈ 0 means every token has the same norm, e.g. after per-token
    standardisation, and the ZF plot collapses to a vertical stripe), and the ẑ-based geometry
    columns (median ‖f̃‖/‖ẑ‖, % over vs ẑ, median geometry εLBO).
    ``tol = 0`` (default) is the paper's strict "% over"; pass e.g. ``tol=0.05`` for a ±5% band.
    With ``pooled=True`` a final row "pooled" summarises all keys together.
    """
    if tol < 0 or not math.isfinite(tol):
        raise ValueError(f"tol must be a finite number >= 0, got {tol}")

    if isinstance(stats, ZFStats):
        stats = {"all": stats}
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError("zf_summary needs a ZFStats or a non-empty mapping {label: ZFStats}")
    items = list(stats.items())
    if pooled and len(items) > 1:
        cat = ZFStats(*[torch.cat([s[i] for _, s in items]) for i in range(len(ZFStats._fields) - 1)],
                      h=items[0][1].h)
        items.append(("pooled", cat))
    rows = []
    for key, s in items:
        r25, r50, r75 = _quantiles(s.ratio, (0.25, 0.5, 0.75))
        n25, n50, n75 = _quantiles(s.nmse, (0.25, 0.5, 0.75))
        e25, e50, e75 = _quantiles(s.eps_lbo, (0.25, 0.5, 0.75))
        valid = ~torch.isnan(s.ratio)
        rv, rhv = s.ratio[valid], s.ratio_hat[~torch.isnan(s.ratio_hat)]
        rows.append(
            {
                "layer": key,
                "n": int(s.norm_z.numel()),
                "median_norm_z": _quantiles(s.norm_z, (0.5,))[0],
                "median_norm_f": _quantiles(s.norm_f, (0.5,))[0],
                "median_ratio": r50,
                "ratio_q25": r25,
                "ratio_q75": r75,
                "pct_over": 100.0 * float((rv > 1 + tol).float().mean()) if rv.numel() else math.nan,
                "pct_under": 100.0 * float((rv < 1 - tol).float().mean()) if rv.numel() else math.nan,
                "pct_within": 100.0 * float(((rv >= 1 - tol) & (rv <= 1 + tol)).float().mean())
                if rv.numel() else math.nan,
                "tol": float(tol),
                "norm_z_cv": float(s.norm_z.double().std() / s.norm_z.double().mean())
                if s.norm_z.numel() > 1 and float(s.norm_z.double().mean()) > 0 else math.nan,
                "median_nmse": n50,
                "nmse_q25": n25,
                "nmse_q75": n75,
                "median_eps_lbo": e50,
                "eps_lbo_q25": e25,
                "eps_lbo_q75": e75,
                "pct_above_sqrt_half": 100.0 * float((rv >= _SQRT_HALF).float().mean()) if rv.numel() else math.nan,
                "median_ratio_hat": _quantiles(s.ratio_hat, (0.5,))[0],
                "pct_over_hat": 100.0 * float((rhv > 1).float().mean()) if rhv.numel() else math.nan,
                "median_eps_lbo_hat": _quantiles(s.eps_lbo_hat, (0.5,))[0],
                "median_eps_lbo_recon": _quantiles(s.eps_lbo_recon, (0.5,))[0],
                "median_l0": _quantiles(s.l0, (0.5,))[0],
                "median_k_eff": _quantiles(s.k_eff, (0.5,))[0],
                "median_coherence": _quantiles(s.coherence, (0.5,))[0],
            }
        )
    return pd.DataFrame(rows).set_index("layer")


def mdl_bits(l0: float, bits_per_value: float = 7, dict_size: int = 12288) -> float:
    """Description length per token L0·(B + log2 D) in bits (Ayonrinde et al., 2024).

    Each active latent costs its index (log2 D bits) plus its value (B bits).
    MDL(L0=2037.29, B=7, D=12288) = 41,937.5 bits.
    """
    if l0 < 0 or bits_per_value < 0 or dict_size < 1:
        raise ValueError(
            f"mdl_bits needs l0 >= 0, bits_per_value >= 0, dict_size >= 1; got {l0}, {bits_per_value}, {dict_size}"
        )
    return float(l0) * (bits_per_value + math.log2(dict_size))


# --------------------------------------------------------------------------------------------
# SAE-like objects (saelib or SAELens)
# --------------------------------------------------------------------------------------------


def sae_decoder(sae: Any) -> tuple[Tensor, Tensor]:
    """``(W_dec [h, d], b_dec [d])`` of an SAE-like object, detached, float32.

    Rows are *not* normalised: SAELens decoders need not be unit norm, and f̃ accounts for it.
    """
    if not hasattr(sae, "W_dec"):
        raise TypeError(
            f"{type(sae).__name__} has no W_dec; pass an saelib/SAELens SAE or use the tensor functions"
        )
    W = sae.W_dec.detach().float()
    b = getattr(sae, "b_dec", None)
    b = torch.zeros(W.shape[1], device=W.device) if b is None else b.detach().float()
    return W, b


@torch.no_grad()
def to_decoder_space(sae: Any, z: Tensor) -> Tensor:
    """Map model activations ``z [N, d]`` into the SAE's decoder space (where acts@W_dec+b_dec lives).

    * SAELens: applies ``run_time_activation_norm_fn_in`` (identity when
      ``normalize_activations="none"``; pretrained "expected_average_only_in" SAEs have the
      factor folded into the weights at load time). ``apply_b_dec_to_input`` only changes the
      encoder input, not this space.
    * saelib: ``sae.normalize(z)[0]`` ("global": s·z; "token": per-token standardisation, the
      paper's top-AFA space; "none": z).
    * anything else: ``z`` unchanged.
    """
    dtype = sae.W_dec.dtype
    z = z.to(device=sae.W_dec.device, dtype=dtype)
    fn = getattr(sae, "run_time_activation_norm_fn_in", None)
    if fn is not None:
        return fn(z)
    cfg = getattr(sae, "cfg", None)
    norm = getattr(sae, "normalize", None)
    if callable(norm) and hasattr(cfg, "input_norm"):
        out = norm(z)  # saelib: (x_n, stats)
        return out[0] if isinstance(out, tuple) else out
    return z


@torch.no_grad()
def zf_stats_sae(sae: Any, z: Tensor, *, batch_size: int = 4096) -> ZFStats:
    """``zf_stats`` for an SAE-like object on model activations ``z [N, d]``.

    Encodes with ``sae.encode`` (batched), maps z to the decoder space with ``to_decoder_space``
    and decodes affinely (acts @ W_dec + b_dec) there, so the f̃ identity holds exactly.
    """
    W, b = sae_decoder(sae)
    if z.ndim != 2 or z.shape[1] != W.shape[1]:
        raise ValueError(f"z must be [N, d] with d={W.shape[1]} (the SAE's d_in), got {tuple(z.shape)}")
    was_training = getattr(sae, "training", False)
    if hasattr(sae, "eval"):
        sae.eval()
    try:
        parts: list[ZFStats] = []
        for c0 in range(0, z.shape[0], batch_size):
            zc = z[c0 : c0 + batch_size].to(device=W.device, dtype=sae.W_dec.dtype)
            acts = sae.encode(zc)
            zd = to_decoder_space(sae, zc)
            parts.append(zf_stats(zd.float(), acts.float(), W, b))
    finally:
        if was_training and hasattr(sae, "train"):
            sae.train()
    return ZFStats(*[torch.cat([p[i].cpu() for p in parts]) for i in range(len(ZFStats._fields) - 1)], h=parts[0].h)


@torch.no_grad()
def zf_stats_model_space(sae: Any, x: Tensor, *, batch_size: int = 4096) -> ZFStats:
    """ZF statistics in the **model's own activation space** (unnormalised ``x [N, d]``).

    Why: with per-token standardisation (``input_norm="token"``) every token's decoder-space
    input has the same norm (‖z‖ = sqrt(d−1) ≈ constant), so the decoder-space ZF plot is one
    vertical stripe and says nothing about how the code norm follows the input norm. Going back to
    model space spreads the tokens along the x-axis by their real norms.

    The map back is affine per token: x = σ_t·x_n + μ_t·1 ("token"), x = x_n / s ("global"),
    x = x_n ("none"). So x̂ = Σ_i (σ_t a_i) d_i + σ_t b_dec + μ_t 1, and f̃ gets the codes σ_t·a
    on the same atoms plus two bias atoms: b_dec (coefficient σ_t) and the unit vector 1/√d
    (coefficient μ_t √d); for "global" the codes and b_dec are divided by s. εLBO keeps h = the
    SAE's width. The ratio ‖f̃‖/‖x‖ of a token is therefore the decoder-space ratio up to the
    mean atom; what changes is that ‖x‖ now varies across tokens.

    saelib SAEs only (they expose ``cfg.input_norm`` and ``normalize``); other SAEs: use
    :func:`zf_stats_sae`, whose decoder space is already the model space when they do not normalise.
    """
    cfg = getattr(sae, "cfg", None)
    mode = getattr(cfg, "input_norm", None)
    if mode not in ("token", "global", "none"):
        raise TypeError(f"zf_stats_model_space needs a saelib SAE (cfg.input_norm in token/global/none), got "
                        f"{type(sae).__name__} with input_norm={mode!r}; use zf_stats_sae instead")
    W, b = sae_decoder(sae)
    if x.ndim != 2 or x.shape[1] != W.shape[1]:
        raise ValueError(f"x must be [N, d] with d={W.shape[1]} (the SAE's d_in), got {tuple(x.shape)}")
    h, d = W.shape
    ones = torch.full((1, d), 1.0 / math.sqrt(d), device=W.device)
    W_aug = torch.cat([W, b[None], ones], dim=0)
    was_training = getattr(sae, "training", False)
    sae.eval()
    try:
        parts: list[ZFStats] = []
        for c0 in range(0, x.shape[0], batch_size):
            xc = x[c0 : c0 + batch_size].to(device=W.device, dtype=sae.W_dec.dtype)
            acts = sae.encode(xc).float()
            n = xc.shape[0]
            if mode == "token":
                _, (mu, sd) = sae.normalize(xc)
                scale, mean_coef = sd.float(), mu.float() * math.sqrt(d)
            elif mode == "global":
                scale = torch.full((n, 1), 1.0 / float(sae.input_scale), device=W.device)
                mean_coef = torch.zeros(n, 1, device=W.device)
            else:
                scale, mean_coef = torch.ones(n, 1, device=W.device), torch.zeros(n, 1, device=W.device)
            a_aug = torch.cat([acts * scale, scale, mean_coef], dim=1)
            st = zf_stats(xc.float(), a_aug, W_aug, None, h=h)
            parts.append(st._replace(l0=(acts != 0).sum(dim=1).float()))  # the two bias atoms are not latents
    finally:
        if was_training:
            sae.train()
    return ZFStats(*[torch.cat([p[i].cpu() for p in parts]) for i in range(len(ZFStats._fields) - 1)], h=h)
