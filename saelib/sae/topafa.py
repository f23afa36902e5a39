"""Top-AFA selection: keep, per token, the prefix of latents whose cumulative norm is nearest
to a target norm (Lee et al. 2025, arXiv 2503.24277, "top-AFA").

Rule (paper's code, ``TopAFASAE.forward``):
  1. key_i = (a_i * ||W_dec[i]||)^2  (decoder-scaled squared activation), a = ReLU pre-acts;
  2. rank latents by key, descending (ties: lower index first, see below);
  3. cum_j = sqrt(sum of the j+1 largest keys); the last entry is replaced by a sentinel;
  4. k = argmin_j |cum_j - target| + 1 (first minimiser wins);
  5. keep the k highest-ranked latents (latents with a_i = 0 may be "kept" but contribute 0).

Two deterministic choices the paper's code leaves to chance or to float32:

* ties: equal keys are ranked lower index first (a stable sort), so masks are reproducible;
* precision: cumulative sums are taken in float64. The paper's float32 running sum stops growing
  once the remaining keys fall below its resolution (~6e-8 of the sum); on rows whose target
  exceeds the total energy it then stops before the tail of tiny activations (a_i below ~1e-2
  at init with per-token standardised inputs), which float64 keeps. Elsewhere both agree.

:func:`topafa_select` (fast) returns exactly the mask of :func:`topafa_select_reference` (full
sort); ``benchmarks/topafa.py`` measures the speed-up and asserts the equality.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["topafa_select", "topafa_select_reference", "topafa_select_first_crossing"]

_SENTINEL = 1e8  # the paper's code: cum[..., -1] = 1e8
_CHUNK_ELEMS = 1 << 22  # rows per full-sort chunk = this / h (memory bound, not speed)
_SELECT_CHUNK_ELEMS = 1 << 23  # rows per selection block = this / h (bounds the [rows, K] buffers)


def _check(pre_acts: Tensor, dec_norms: Tensor, target_norm: Tensor) -> None:
    if pre_acts.ndim != 2:
        raise ValueError(f"pre_acts must be [N, h], got shape {tuple(pre_acts.shape)}")
    n, h = pre_acts.shape
    if dec_norms.shape != (h,):
        raise ValueError(f"dec_norms must have shape [{h}] (one norm per latent), got {tuple(dec_norms.shape)}")
    if target_norm.shape != (n,):
        raise ValueError(f"target_norm must have shape [{n}] (one per token), got {tuple(target_norm.shape)}")


def _keys(pre_acts: Tensor, dec_norms: Tensor, out: Tensor | None = None) -> Tensor:
    """Ranking keys (a_i·||W_dec[i]||)^2, [N, h]; one expression so both versions agree bitwise.
    ``out``: a reusable buffer of the same shape and dtype (fresh [N, h] allocations are costly)."""
    key = torch.mul(pre_acts, dec_norms, out=out) if out is not None else pre_acts * dec_norms
    return key.mul_(key)  # == (pre_acts * dec_norms) ** 2 bitwise


def _cum_norms(sorted_keys: Tensor) -> Tensor:
    """sqrt of the cumulative sum of descending keys, in float64.

    The cumulative sum runs sequentially along the last dim (CPU kernel), so the first K entries
    of the cumsum over all h sorted keys equal, bit for bit, the cumsum of the K largest keys:
    this is what lets the fast version reproduce the reference exactly. On CUDA the scan is
    parallel, so prefix sums of K and of h keys can differ in the last float64 bits: the masks
    then agree except where two prefixes are within ~1e-15 (relative) of the target's distance."""
    return sorted_keys.double().cumsum(-1)


_NUMPY_SORTS = True
"""Use numpy's sorts for CPU tensors (speed only). Other devices (CUDA) always take the torch
path; tests switch this off to run that path on CPU."""


def _numpy_ok(key: Tensor) -> bool:
    return _NUMPY_SORTS and key.device.type == "cpu" and key.dtype in (torch.float32, torch.float64)


def _sorted_desc(key: Tensor) -> Tensor:
    """All values of each row, descending (values only: equal keys are indistinguishable, so no
    tie order is involved). On CPU numpy's SIMD sort is several times faster than torch.sort."""
    if _numpy_ok(key):
        return torch.from_numpy(np.ascontiguousarray(np.sort(key.numpy(), axis=-1)[:, ::-1]))
    return torch.sort(key, dim=-1, descending=True).values


def _largest_desc(key: Tensor, K: int) -> Tensor:
    """The K largest values of each row, descending (values only)."""
    h = key.shape[1]
    if K >= h:
        return _sorted_desc(key)
    if _numpy_ok(key) and K >= 256:
        # np.partition copies its input: in row chunks, so the copy is a chunk, not all [n, h]
        a = key.numpy()
        out = np.empty((a.shape[0], K), dtype=a.dtype)
        step = max(1, _CHUNK_ELEMS // h)
        for c in range(0, a.shape[0], step):
            part = np.partition(a[c:c + step], h - K, axis=-1)[:, h - K:]
            out[c:c + step] = np.sort(part, axis=-1)[:, ::-1]
        return torch.from_numpy(out)
    return key.topk(K, dim=-1, sorted=True).values


def _nearest_prefix(cum: Tensor, target: Tensor, *, full: bool) -> Tensor:
    """First index j minimising |sqrt(cum_j) - target|; with ``full`` the last entry is the
    paper's sentinel. Returns j [n] (k = j + 1)."""
    if full:
        cum[:, -1] = _SENTINEL
    # in place: cum is a fresh float64 [n, K] buffer owned by the caller
    return cum.sqrt_().sub_(target.double()[:, None]).abs_().argmin(-1)


@torch.no_grad()
def topafa_select_reference(pre_acts: Tensor, dec_norms: Tensor, target_norm: Tensor) -> Tensor:
    """Naive top-AFA selection with a full sort over all h latents (the paper's code path).

    Args:
        pre_acts: [N, h] non-negative (post-ReLU) pre-selection activations.
        dec_norms: [h] decoder row norms ||W_dec[i]||.
        target_norm: [N] per-token target norm (the paper: ||x - b_dec||).

    Returns:
        BoolTensor [N, h], True where the latent is kept *and* positive.

    Ties: equal keys are ranked lower index first (stable sort), so the mask is deterministic.
    Arithmetic: keys in the input dtype, cumulative sums in float64 (the paper: float32).
    """
    _check(pre_acts, dec_norms, target_norm)
    n, h = pre_acts.shape
    key = _keys(pre_acts, dec_norms)
    vals, idx = torch.sort(key, dim=-1, descending=True, stable=True)
    j = _nearest_prefix(_cum_norms(vals), target_norm, full=True)
    keep_sorted = torch.arange(h, device=pre_acts.device)[None, :] <= j[:, None]
    mask = torch.zeros_like(keep_sorted).scatter_(1, idx, keep_sorted)
    return mask & (pre_acts > 0)


@torch.no_grad()
def topafa_select_first_crossing(pre_acts: Tensor, dec_norms: Tensor, target_norm: Tensor) -> Tensor:
    """The "first crossing" variant of top-AFA: keep the *shortest* prefix of the same ranking
    whose cumulative norm reaches the target, k = min{j : sqrt(cum_j) >= target} (every
    positive latent when the total energy stays below the target). The paper's step-by-step
    notebook shows this rule as the "basic" alternative; its trained SAEs use the nearest
    prefix (:func:`topafa_select_reference`). Where both differ, first crossing keeps one
    latent more: it never stops short of the target. Full sort (used for ablations only).

    Returns BoolTensor [N, h], True where the latent is kept and positive."""
    _check(pre_acts, dec_norms, target_norm)
    n, h = pre_acts.shape
    key = _keys(pre_acts, dec_norms)
    vals, idx = torch.sort(key, dim=-1, descending=True, stable=True)
    cum = _cum_norms(vals).sqrt_()
    reached = cum >= target_norm.double()[:, None]
    # first index reaching the target; rows that never reach it keep everything (h - 1)
    j = torch.where(reached.any(-1), reached.float().argmax(-1), torch.full_like(reached[:, 0], h - 1, dtype=torch.long))
    keep_sorted = torch.arange(h, device=pre_acts.device)[None, :] <= j[:, None]
    mask = torch.zeros_like(keep_sorted).scatter_(1, idx, keep_sorted)
    return mask & (pre_acts > 0)


def _prefix_mask(key: Tensor, vals: Tensor, j: Tensor, pre: Tensor) -> Tensor:
    """Mask of the first j+1 latents of the stable descending ranking of ``key`` [n, h], given
    the sorted values ``vals`` [n, K > j] of its K largest keys (indices are not needed: the cut
    value decides, and ties at the cut go to the lowest indices), intersected with pre > 0
    (assuming pre >= 0; the caller handles negative inputs)."""
    v = vals.gather(1, j[:, None])  # [n, 1] cut value
    keep = key >= v
    # #keys >= v, counted on the K sorted values (exact unless the ties reach past K)
    n_ge = (vals >= v).sum(-1)
    over = (n_ge > j + 1) | (vals[:, -1] >= v.squeeze(1))  # ties straddle the cut (or may)
    if over.any():
        r = over.nonzero().squeeze(1)
        kr, vr = key[r], v[r]
        gt = kr > vr
        eq = kr == vr
        room = (j[r] + 1 - gt.sum(-1))[:, None]
        keep[r] = gt | (eq & (eq.cumsum(-1) <= room))
    zero_cut = v.squeeze(1) == 0  # zero keys kept: only those with pre > 0 count
    if zero_cut.any():
        r = zero_cut.nonzero().squeeze(1)
        keep[r] &= pre[r] > 0
    return keep


@torch.no_grad()
def topafa_select(pre_acts: Tensor, dec_norms: Tensor, target_norm: Tensor, *, k_start: int | None = None,
                  growth: int = 4, key_buffer: Tensor | None = None) -> Tensor:
    """Fast top-AFA selection; returns exactly the mask of :func:`topafa_select_reference`.

    Instead of sorting all h latents, take the ``K`` largest keys (``topk``, sorted) and solve
    the nearest-prefix problem on them. A row is *resolved* when its answer provably cannot lie
    beyond K:

    * its K-th largest key is 0 (the cumulative norm has plateaued: later entries tie and the
      first minimiser wins), with the sentinel checked explicitly; or
    * its cumulative norm at K already reaches the target (|c_j - t| only grows after that)
      and is below the sentinel.

    Unresolved rows are retried with ``growth``·K, and with a full sort once K ≥ h/2.

    Args:
        pre_acts, dec_norms, target_norm: as in :func:`topafa_select_reference`.
        k_start: first K to try (e.g. 1.25x the largest k of the previous batch); default:
            1.25x the largest k among 32 evenly spaced rows solved by a full sort, plus 16.
        growth: factor by which K grows for unresolved rows.
        key_buffer: optional scratch tensor shaped and typed like ``pre_acts`` that receives the
            ranking keys (overwritten). A training loop that passes the same buffer every step
            saves one [N, h] allocation per step.
    """
    _check(pre_acts, dec_norms, target_norm)
    if growth < 2:
        raise ValueError(f"growth must be >= 2 (K grows by this factor each round), got {growth}")
    n, h = pre_acts.shape
    if n == 0:
        return torch.zeros_like(pre_acts, dtype=torch.bool)
    if key_buffer is not None and (key_buffer.shape != pre_acts.shape or key_buffer.dtype != pre_acts.dtype
                                   or key_buffer.device != pre_acts.device or not key_buffer.is_contiguous()):
        raise ValueError(f"key_buffer must be a contiguous {pre_acts.dtype} tensor of shape {tuple(pre_acts.shape)} "
                         f"on {pre_acts.device}, got {key_buffer.dtype} {tuple(key_buffer.shape)} on {key_buffer.device}")
    if k_start is None:  # estimate from a few rows solved by full sort (cheap: n_s/N of a sort)
        n_s = min(n, 32)
        probe = torch.linspace(0, n - 1, n_s, device=pre_acts.device).long()
        pv = _sorted_desc(_keys(pre_acts[probe], dec_norms))
        pj = _nearest_prefix(_cum_norms(pv), target_norm[probe], full=True)
        k_start = int(pj.max()) * 5 // 4 + 16
    step = max(1, _SELECT_CHUNK_ELEMS // h)
    if n <= step:
        return _select_rows(pre_acts, dec_norms, target_norm, k_start, growth, key_buffer)
    # row chunks: the sorted values and float64 cumulative sums of a round are [rows, K], and K
    # can approach h/2 at high L0, so whole-batch rounds would cost several [N, h] buffers
    keep = torch.empty((n, h), dtype=torch.bool, device=pre_acts.device)
    for c in range(0, n, step):
        keep[c:c + step] = _select_rows(pre_acts[c:c + step], dec_norms, target_norm[c:c + step], k_start, growth,
                                        None if key_buffer is None else key_buffer[c:c + step])
    return keep


def _select_rows(pre_acts: Tensor, dec_norms: Tensor, target_norm: Tensor, k_start: int, growth: int,
                 key_buffer: Tensor | None) -> Tensor:
    """:func:`topafa_select` on one block of rows (inputs already checked)."""
    n, h = pre_acts.shape
    key = _keys(pre_acts, dec_norms, key_buffer)
    keep = None  # allocated only if rows are resolved in several rounds
    K = int(min(max(k_start, 1), h))
    rows = None  # None = all rows
    while True:
        sub = key if rows is None else key[rows]
        t = target_norm if rows is None else target_norm[rows]
        if 2 * K >= h:  # the rest: full sort (values: same sequence as the reference), in row chunks
            psub = pre_acts if rows is None else pre_acts[rows]
            part = torch.empty(sub.shape, dtype=torch.bool, device=sub.device)
            step = max(1, _CHUNK_ELEMS // h)  # bounds the sort/cumsum buffers
            for c in range(0, sub.shape[0], step):
                sc = sub[c:c + step]
                vals = _sorted_desc(sc)
                j = _nearest_prefix(_cum_norms(vals), t[c:c + step], full=True)
                part[c:c + step] = _prefix_mask(sc, vals, j, psub[c:c + step])
            if rows is None:
                keep = part
            else:
                keep[rows] = part
            break
        vals = _largest_desc(sub, K)
        cum = _cum_norms(vals)
        c_last = cum[:, -1].sqrt()
        cum_last = cum[:, -1].clone()
        j = _nearest_prefix(cum, t, full=False)  # turns cum into |sqrt(cum) - t|
        t64 = t.double()
        d_best = cum.gather(1, j[:, None]).squeeze(1)
        sentinel_d = (torch.tensor(_SENTINEL, dtype=torch.float64, device=sub.device).sqrt() - t64).abs()
        plateau = vals[:, -1] == 0
        sentinel_wins = plateau & (sentinel_d < d_best)  # reference picks k = h: every positive latent
        resolved = plateau | ((c_last >= t64) & (cum_last <= _SENTINEL))
        all_done = bool(resolved.all())
        if all_done:  # common case: no row copies
            part = _prefix_mask(sub, vals, j, pre_acts if rows is None else pre_acts[rows])
            if sentinel_wins.any():
                sw = sentinel_wins.nonzero().squeeze(1)
                part[sw] = (pre_acts[sw] if rows is None else pre_acts[rows[sw]]) > 0
            if rows is None:
                keep = part
            else:
                keep[rows] = part
            break
        if keep is None:
            keep = torch.zeros((n, h), dtype=torch.bool, device=pre_acts.device)
        if resolved.any():
            rr = resolved.nonzero().squeeze(1)
            prr = pre_acts[rr] if rows is None else pre_acts[rows[rr]]
            part = _prefix_mask(sub[rr], vals[rr], j[rr], prr)
            if sentinel_wins[rr].any():
                sw = sentinel_wins[rr].nonzero().squeeze(1)
                part[sw] = prr[sw] > 0
            if rows is None:
                keep[rr] = part
            else:
                keep[rows[rr]] = part
        left = (~resolved).nonzero().squeeze(1)
        rows = left if rows is None else rows[left]
        K = min(K * growth, h)
    if bool(pre_acts.min() < 0):  # pre-activations are meant to be ReLU outputs; be exact anyway
        keep.logical_and_(pre_acts > 0)
    return keep
