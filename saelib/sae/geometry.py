"""Cosine geometry of decoder rows, blockwise: never the full h x h (or n x m) cosine matrix.

* :func:`pair_cosines` -- the paper's ε statistics over all pairs i < j of rows of one matrix
  (max |cos| with its pair, mean |cos|, signed mean, RMS), walking the upper triangle of the
  Gram matrix in ``block_size x block_size`` tiles: extra memory is one unit-row copy of W plus
  one float32 tile and a boolean mask (5 * block_size^2 bytes; ~58 MiB for h = 12288, d = 768).
  Row sums are float32, totals float64.
* :func:`max_cosine` -- for each row of A, the largest cosine over the rows of B and its index
  (and, with ``both``, the same for B's rows against A's, from the same blocks).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["MaxCosine", "Epsilon", "pair_cosines", "max_cosine", "unit_rows"]

_TRIL: dict[tuple[int, str], Tensor] = {}


class Epsilon(NamedTuple):
    """Quasi-orthogonality of a dictionary: statistics of cos(w_i, w_j) over pairs i < j."""

    max: float
    """ε = max_{i<j} |cos(w_i, w_j)| (for a sampled estimate: the max over the sample, a lower bound)."""
    mean: float
    """Mean |cos| over pairs (the paper's code logs a *signed* mean instead; see ``mean_signed``)."""
    mean_signed: float
    """Signed mean of cos over pairs (≈ 0 for most dictionaries, so not a useful summary)."""
    rms: float
    """sqrt(mean cos²); the Welch bound also bounds this from below, so it is the fair comparison."""
    n_pairs: int
    """Number of unordered pairs used (h(h−1)/2 when exact)."""
    argmax: tuple[int, int]
    """Indices (i, j) of the pair with the largest |cos| (within the sample if sampled)."""
    exact: bool
    """True for the exhaustive computation, False for a sampled estimate."""
    mean_stderr: float
    """Standard error of ``mean`` (0.0 when exact)."""


def unit_rows(W: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``W [h, d]`` scaled to unit norm (float32 or wider), and the norms. NaN/inf entries or
    all-zero rows raise: the cosine is undefined there, never reported as 0."""
    if not isinstance(W, Tensor) or W.ndim != 2:
        raise ValueError(f"W_dec must be a 2-D tensor [h, d] (one row per latent), got {getattr(W, 'shape', type(W))}")
    W = W.detach()
    if not W.is_floating_point() or W.dtype in (torch.float16, torch.bfloat16):
        W = W.float()  # half-precision dot products are too coarse for ε ~ 1e-2
    bad = ~torch.isfinite(W)
    if bool(bad.any()):
        raise ValueError(
            f"W_dec has {int(bad.sum())} non-finite (NaN/inf) entries in {int(bad.any(1).sum())} rows, so its "
            "cosines are undefined: the SAE diverged in training; retrain it (lower the learning rate or "
            "normalise the inputs)"
        )
    norms = W.norm(dim=1)
    n_zero = int((norms == 0).sum())
    if n_zero:
        raise ValueError(
            f"W_dec has {n_zero} all-zero rows; the cosine of a zero vector is undefined. "
            "Drop them first, e.g. W_dec[W_dec.norm(dim=1) > 0]."
        )
    return W / norms[:, None], norms


def _lower_incl_diag(b: int, device: torch.device) -> Tensor:
    key = (b, str(device))
    if key not in _TRIL:
        _TRIL.clear()  # at most one mask alive (memory budget)
        _TRIL[key] = torch.ones(b, b, dtype=torch.bool, device=device).tril_()
    return _TRIL[key]


@torch.no_grad()
def pair_cosines(W_dec: Tensor, *, block_size: int = 2048, progress: bool = False) -> Epsilon:
    """ε statistics of the rows of ``W_dec [h, d]`` (normalised first), exact, tile by tile."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    U, _ = unit_rows(W_dec)
    h = U.shape[0]
    if h < 2:
        raise ValueError(f"need at least 2 decoder rows to form a pair, got h={h}")
    block_size = min(block_size, h)
    sum_abs = sum_signed = sum_sq = 0.0
    best, best_ij = -1.0, (0, 1)
    starts = range(0, h, block_size)
    if progress:
        starts = tqdm(starts, desc="ε row blocks", unit="block")
    for i0 in starts:
        i1 = min(i0 + block_size, h)
        for j0 in range(i0, h, block_size):
            j1 = min(j0 + block_size, h)
            G = U[i0:i1] @ U[j0:j1].T  # [bi, bj] tile of the Gram matrix
            if j0 == i0:  # diagonal tile: strict upper triangle only (pairs i < j)
                G.masked_fill_(_lower_incl_diag(block_size, G.device)[: i1 - i0, : j1 - j0], 0.0)
            sum_signed += float(G.sum(1).double().sum())
            sum_sq += float(torch.linalg.vector_norm(G, dim=1).double().square().sum())
            G.abs_()
            sum_abs += float(G.sum(1).double().sum())
            m = float(G.max())
            if m > best:
                r, c = divmod(int(G.argmax()), G.shape[1])
                best, best_ij = m, (i0 + r, j0 + c)
            del G
    if best <= 0.0:  # orthonormal rows: every pair is a maximiser
        best_ij = (0, 1)
    n = h * (h - 1) // 2
    return Epsilon(max(best, 0.0), sum_abs / n, sum_signed / n, math.sqrt(sum_sq / n), n, best_ij, True, 0.0)


class MaxCosine(NamedTuple):
    """Row-wise max cosine of A's rows against B's rows (and, with ``both``, of B's against A's)."""

    values: Tensor
    """[n_A] max cosine of each row of A over the rows of B."""
    indices: Tensor
    """[n_A] the row of B achieving it."""
    values_b: Tensor | None = None
    """[n_B] max cosine of each row of B over the rows of A (``both=True``)."""
    indices_b: Tensor | None = None
    """[n_B] the row of A achieving it (``both=True``)."""


@torch.no_grad()
def max_cosine(A: Tensor, B: Tensor, *, both: bool = False, block_size: int = 4096) -> MaxCosine:
    """For each row of ``A [n, d]``, the max cosine over the rows of ``B [m, d]`` and its argmax;
    with ``both`` also each row of B against A's rows, from the same blocks. Blockwise over A's
    rows: memory ``block_size × m``, like :func:`pair_cosines`."""
    A = F.normalize(torch.as_tensor(A).detach().float(), dim=1)
    B = F.normalize(torch.as_tensor(B).detach().float().to(A.device), dim=1)
    if A.ndim != 2 or B.ndim != 2 or A.shape[1] != B.shape[1]:
        raise ValueError(f"max_cosine needs A [n, d] and B [m, d] of one width d; got {tuple(A.shape)}, {tuple(B.shape)}")
    vals, idx = [], []
    vb = torch.full((B.shape[0],), -2.0, device=A.device)
    ib = torch.zeros(B.shape[0], dtype=torch.long, device=A.device)
    for s in range(0, A.shape[0], block_size):
        C = A[s : s + block_size] @ B.T
        v, i = C.max(dim=1)
        vals.append(v)
        idx.append(i)
        if both:
            cv, ci = C.max(dim=0)
            better = cv > vb
            vb, ib = torch.where(better, cv, vb), torch.where(better, ci + s, ib)
    return MaxCosine(torch.cat(vals), torch.cat(idx), *((vb, ib) if both else (None, None)))
