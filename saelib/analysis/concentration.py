"""What actually holds: concentration of ‖f‖/‖z‖ for random dictionaries (the probabilistic
companion of the AFA bound in :mod:`saelib.analysis.afa`).

For random unit directions, ‖z‖²/‖f‖² = 1 + Σ_{i≠j} f_i f_j cos_ij concentrates around 1 with
standard deviation ≤ sqrt(2/d) (JL-style), which is why ‖f‖ ≈ ‖z‖ far inside the worst-case cone.
:func:`concentration_band` gives the band; :func:`random_dictionary_norm_ratios` simulates it with
:func:`random_unit_dictionary` (or :func:`coherent_unit_dictionary`) and :func:`random_sparse_codes`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelib.analysis.afa import _as_tensor, _decoder_matrix
from saelib.sae.geometry import unit_rows

__all__ = ["ConcentrationBand", "concentration_sigma", "concentration_band", "NormRatioSim", "random_unit_dictionary",
           "coherent_unit_dictionary", "random_sparse_codes", "random_dictionary_norm_ratios"]


# --------------------------------------------------------------------------------------------
# what actually holds: concentration for random dictionaries
# --------------------------------------------------------------------------------------------


class ConcentrationBand(NamedTuple):
    """Probabilistic band for random unit dictionaries in R^d (JL-style concentration).

    ‖z‖²/‖f‖² = 1 + Σ_{i≠j} f_i f_j cos_ij has mean 1 and standard deviation
    sigma = sqrt(2/d)·sqrt(1 − ‖f‖₄⁴/‖f‖₂⁴) ≤ sqrt(2/d) when the directions are random.
    """

    d: int
    """Model width."""
    sigma: float
    """Standard deviation of ‖z‖²/‖f‖² (sqrt(2/d) in the dense-code limit)."""
    z_score: float
    """Number of standard deviations spanned on each side."""
    coverage: float
    """Two-sided normal coverage of ±z_score."""
    ratio_sq_lower: float
    """1 − z·sigma, lower edge for ‖z‖²/‖f‖²."""
    ratio_sq_upper: float
    """1 + z·sigma, upper edge for ‖z‖²/‖f‖²."""
    slope_lower: float
    """Lower edge for ‖f‖/‖z‖ = 1/sqrt(1 + z·sigma)."""
    slope_upper: float
    """Upper edge for ‖f‖/‖z‖ = 1/sqrt(1 − z·sigma) (inf if z·sigma ≥ 1)."""


def concentration_sigma(d: int, f: Any = None) -> Any:
    """Std of ‖z‖²/‖f‖² for random unit directions: sqrt(2/d · (1 − Σf⁴/(Σf²)²)).

    Without ``f`` returns the dense-code limit sqrt(2/d). With ``f [..., h]`` returns a tensor
    (a 1-sparse code has sigma 0: one atom reproduces its norm exactly).
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    if f is None:
        return math.sqrt(2.0 / d)
    F = _as_tensor(f, "f").double()
    s2 = F.square().sum(-1)
    s4 = F.pow(4).sum(-1)
    return (2.0 / d * (1 - s4 / s2.square().clamp_min(1e-300))).clamp_min(0).sqrt()


def _normal_ppf(p: float) -> float:
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def concentration_band(
    d: int, *, coverage: float = 0.98, z_score: float | None = None, sigma: float | None = None
) -> ConcentrationBand:
    """The ±z·sqrt(2/d) band for ‖z‖²/‖f‖² and the matching ‖f‖/‖z‖ slopes.

    Args:
        d: model width.
        coverage: two-sided normal coverage used when ``z_score`` is not given (0.98 → z=2.326).
        z_score: number of standard deviations (overrides ``coverage``).
        sigma: standard deviation to use (default the dense-code limit sqrt(2/d)).

    For d=768 at 98%: ‖f‖/‖z‖ ∈ [0.945, 1.065].
    """
    if z_score is None:
        if not 0 < coverage < 1:
            raise ValueError(f"coverage must be in (0, 1), got {coverage}")
        z_score = _normal_ppf(0.5 + coverage / 2)
    else:
        coverage = 2 * float(torch.special.ndtr(torch.tensor(z_score, dtype=torch.float64))) - 1
    s = concentration_sigma(d) if sigma is None else float(sigma)
    w = z_score * s
    return ConcentrationBand(
        d=d,
        sigma=s,
        z_score=float(z_score),
        coverage=float(coverage),
        ratio_sq_lower=1 - w,
        ratio_sq_upper=1 + w,
        slope_lower=1 / math.sqrt(1 + w),
        slope_upper=1 / math.sqrt(1 - w) if w < 1 else math.inf,
    )


def random_unit_dictionary(h: int, d: int, seed: int = 0, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``[h, d]`` rows drawn uniformly on the unit sphere (normalised Gaussians), seeded."""
    if h < 1 or d < 1:
        raise ValueError(f"h and d must be >= 1, got h={h}, d={d}")
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(h, d, generator=gen, dtype=dtype)
    return W / W.norm(dim=1, keepdim=True)


def coherent_unit_dictionary(h: int, d: int, mean_cos: float, seed: int = 0) -> Tensor:
    """``[h, d]`` unit rows sharing one common direction u: w_i ∝ sqrt(1−a)·g_i + sqrt(a)·u.

    With g_i random unit vectors, pairwise cosines concentrate around ``a = mean_cos`` (± ~1/√d):
    a toy for decoders whose co-active atoms are not orthogonal on average.
    """
    if not 0 <= mean_cos < 1:
        raise ValueError(f"mean_cos must be in [0, 1), got {mean_cos}")
    G = random_unit_dictionary(h + 1, d, seed)
    u, G = G[0], G[1:]
    W = math.sqrt(1 - mean_cos) * G + math.sqrt(mean_cos) * u[None, :]
    return W / W.norm(dim=1, keepdim=True)


def random_sparse_codes(
    n: int, h: int, k: int | Tensor, *, generator: torch.Generator | None = None, values: str = "exponential"
) -> Tensor:
    """``[n, h]`` non-negative codes with uniformly random supports of size ``k`` (int or ``[n]``).

    Values are i.i.d. ``"exponential"`` (rate 1), ``"uniform"`` on (0, 1) or ``"halfnormal"``.
    """
    gen = generator or torch.Generator().manual_seed(0)
    kk = torch.full((n,), int(k)) if isinstance(k, int) else torch.as_tensor(k).long().flatten()
    if kk.numel() != n or (kk < 0).any() or (kk > h).any():
        raise ValueError(f"k must be an int or [n] tensor with values in [0, h={h}]")
    if values == "exponential":
        v = torch.empty(n, h).exponential_(1.0, generator=gen)
    elif values == "uniform":
        v = torch.rand(n, h, generator=gen)
    elif values == "halfnormal":
        v = torch.randn(n, h, generator=gen).abs()
    else:
        raise ValueError(f"values must be 'exponential', 'uniform' or 'halfnormal', got {values!r}")
    # random support: the k smallest of n×h uniform keys per row
    keys = torch.rand(n, h, generator=gen, dtype=torch.float64)  # float64: ties ~impossible
    if isinstance(k, int):
        if k == 0:
            return torch.zeros_like(v)
        thr = keys.kthvalue(k, dim=1, keepdim=True).values
    else:
        thr = keys.sort(dim=1).values.gather(1, (kk - 1).clamp_min(0)[:, None])
        thr = torch.where(kk[:, None] > 0, thr, torch.full_like(thr, -1.0))
    return torch.where(keys <= thr, v, torch.zeros_like(v))


class NormRatioSim(NamedTuple):
    """‖f‖/‖z‖ for random codes on a random unit dictionary, one row per k."""

    ks: list[int]
    """Support sizes simulated."""
    ratios: Tensor
    """``[len(ks), n]`` values of ‖f‖/‖z‖."""
    sigma_pred: Tensor
    """``[len(ks), n]`` per-sample predicted std of ‖z‖²/‖f‖² (``concentration_sigma``)."""
    k_eff: Tensor
    """``[len(ks), n]`` effective support ‖f‖₁²/‖f‖₂²."""
    mean_cos: float
    """Signed mean cosine c̄ over all pairs of the dictionary; E‖z‖²/‖f‖² − 1 = c̄(k_eff − 1)."""
    d: int
    """Model width."""
    h: int
    """Dictionary size."""


@torch.no_grad()
def random_dictionary_norm_ratios(
    d: int,
    h: int,
    ks: Iterable[int],
    n: int = 1000,
    seed: int = 0,
    *,
    dictionary: Tensor | None = None,
    values: str = "exponential",
    chunk: int = 256,
    progress: bool = False,
) -> NormRatioSim:
    """Simulate ‖f‖/‖z‖ with z = f·W for a random unit dictionary W ``[h, d]`` and sparse f ≥ 0.

    For each k: ``n`` codes with a uniformly random support of size k and i.i.d. non-negative
    values (``"exponential"``, ``"uniform"`` or ``"halfnormal"``). Cost n·h·d per k (dense
    matmul in chunks of ``chunk`` codes, on the dictionary's device), independent of k.
    """
    ks = [int(k) for k in ks]
    if any(k < 1 or k > h for k in ks):
        raise ValueError(f"every k must be in [1, h={h}], got {ks}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    W = random_unit_dictionary(h, d, seed) if dictionary is None else _decoder_matrix(dictionary).float()
    if W.shape != (h, d):
        raise ValueError(f"dictionary must be [h, d] = [{h}, {d}], got {tuple(W.shape)}")
    U, _ = unit_rows(W)
    s = U.sum(0)
    mean_cos = (float(s.double().square().sum()) - h) / (h * (h - 1))
    gen = torch.Generator().manual_seed(seed + 1)
    ratios = torch.empty(len(ks), n)
    sig = torch.empty(len(ks), n)
    keff = torch.empty(len(ks), n)
    k_iter = enumerate(ks)
    if progress:
        k_iter = tqdm(k_iter, total=len(ks), desc=f"‖f‖/‖z‖ d={d} h={h}", unit="k")
    for r, k in k_iter:
        for c0 in range(0, n, chunk):
            m = min(chunk, n - c0)
            f = random_sparse_codes(m, h, k, generator=gen, values=values)
            zz = f.to(U.device) @ U
            fn = f.norm(dim=1)
            ratios[r, c0 : c0 + m] = fn / zz.norm(dim=1).cpu()
            sig[r, c0 : c0 + m] = concentration_sigma(d, f).float()
            keff[r, c0 : c0 + m] = f.sum(1).square() / fn.square()
    return NormRatioSim(ks=ks, ratios=ratios, sigma_pred=sig, k_eff=keff, mean_cos=mean_cos, d=d, h=h)
