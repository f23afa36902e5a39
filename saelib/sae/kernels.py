"""Autograd kernels of the SAE training forward's fast paths (:meth:`saelib.sae.core.SAE.forward`).

Same maths as plain autograd, tested against it (``SAE.sparse_kernels = False``): a dense encoder
whose backward skips the input gradient, a gather of the selected pre-activations with a sparse
backward, decodes with ``embedding_bag``, and the aux loss over gathered dead latents. Also
BatchTopK's exact training selection without a flat sort (float32 and bfloat16 products),
tested against the flat top-(k·N)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def safe_sqrt(sq: Tensor) -> Tensor:
    """sqrt with a zero (not NaN/inf) gradient at 0 (rows with no active latent)."""
    pos = sq > 0
    return torch.where(pos, sq.clamp_min(1e-30).sqrt(), sq.new_zeros(()))


def bag_sum(table: Tensor, bags: Tensor, index: Tensor, weights: Tensor, n_bags: int) -> Tensor:
    """[n_bags, table cols]: out[b] = sum over entries j with bags[j] = b of weights_j ·
    table[index_j]; ``bags`` must be sorted. ``embedding_bag`` sums the groups without the dense
    [n_bags, table rows] matrix a matrix product would need."""
    offsets = torch.zeros(n_bags, dtype=torch.long, device=bags.device)
    offsets[1:] = torch.bincount(bags, minlength=n_bags).cumsum(0)[:-1]
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)


def sparse_decode(W_dec: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, n: int) -> Tensor:
    """sum_j vals_j · W_dec[cols_j] per row, [n, d_in]; rows must be sorted (row-major
    nonzero order)."""
    return bag_sum(W_dec, rows, cols, vals, n)


class DenseEncode(torch.autograd.Function):
    """relu(x_cent @ W_enc + b_enc) for a constant input: b_dec's gradient is
    -W_enc @ (column sums of the pre-activation gradient), so the backward skips the dense
    [N, d_sae] @ [d_sae, d_in] product autograd would spend on d/dx_cent."""

    @staticmethod
    def forward(ctx, x_cent, W_enc, b_enc, b_dec, use_b_enc, pre_done=None):
        if pre_done is not None:  # computed without grad already (same expression): not again
            pre = pre_done.view_as(pre_done)
        else:
            pre = x_cent @ W_enc
            if use_b_enc:
                pre = pre + b_enc
            pre = pre.relu_()
        ctx.save_for_backward(x_cent, W_enc, pre)
        ctx.use_b_enc = use_b_enc
        return pre

    @staticmethod
    def backward(ctx, g):
        x_cent, W_enc, pre = ctx.saved_tensors
        g = g * (pre > 0)
        gW = x_cent.T @ g if ctx.needs_input_grad[1] else None
        col_sum = g.sum(0)
        gb_enc = col_sum if (ctx.use_b_enc and ctx.needs_input_grad[2]) else None
        gb_dec = -(W_enc @ col_sum) if ctx.needs_input_grad[3] else None
        return None, gW, gb_enc, gb_dec, None, None


class GatherPreActs(torch.autograd.Function):
    """Selected ReLU pre-activations relu((x_cent @ W_enc + b_enc)[rows, cols]) with a sparse
    backward: the gradients of W_enc, b_enc and b_dec only need the selected entries, so the
    dense [N, d_sae] backward products of a naive implementation become O(nnz · d_in)."""

    @staticmethod
    def forward(ctx, x_cent, W_enc, b_enc, b_dec, rows, cols, vals, use_b_enc):
        ctx.save_for_backward(x_cent, W_enc, rows, cols, vals)
        ctx.use_b_enc = use_b_enc
        ctx.h = W_enc.shape[1]
        return vals.clone()

    @staticmethod
    def backward(ctx, g):
        x_cent, W_enc, rows, cols, vals = ctx.saved_tensors
        g = g * (vals > 0)  # ReLU
        h = ctx.h
        gW = gb_enc = gb_dec = None
        col_sum = None
        if ctx.needs_input_grad[1]:
            # gW[:, c] = sum over entries e with cols[e] = c of g_e * x_cent[rows[e]]: group the
            # entries by column and let embedding_bag sum each group (3x faster than sparse.mm)
            order = torch.argsort(cols, stable=True)
            gW = bag_sum(x_cent, cols[order], rows[order], g[order], h).T
        if (ctx.use_b_enc and ctx.needs_input_grad[2]) or ctx.needs_input_grad[3]:
            col_sum = g.new_zeros(h).index_add_(0, cols, g)
        if ctx.use_b_enc and ctx.needs_input_grad[2]:
            gb_enc = col_sum
        if ctx.needs_input_grad[3]:
            gb_dec = -(W_enc @ col_sum)
        return None, gW, gb_enc, gb_dec, None, None, None, None


class GatheredDecode(torch.autograd.Function):
    """e = acts_d @ W_dec[cols] for a few latents ``cols`` (D of them), where acts_d [N, D] are
    the kept ReLU pre-activations relu(x_cent @ W_enc[:, cols] + b_enc[cols]) (zero where not
    kept). The backward works on the gathered [d_in, D] / [D, d_in] slices: three dense
    products of N·D·d_in each, and the gradients land in the ``cols`` columns/rows of W_enc,
    b_enc and W_dec (``cols`` unique, so ``index_copy`` is exact and order-free)."""

    @staticmethod
    def forward(ctx, x_cent, W_enc, b_enc, b_dec, W_dec, cols, acts_d, use_b_enc):
        W_dec_c = W_dec.index_select(0, cols)  # [D, d_in]
        ctx.save_for_backward(x_cent, W_enc, W_dec_c, cols, acts_d)
        ctx.use_b_enc = use_b_enc
        return acts_d @ W_dec_c

    @staticmethod
    def backward(ctx, g):
        x_cent, W_enc, W_dec_c, cols, acts_d = ctx.saved_tensors
        gW_enc = gb_enc = gb_dec = gW_dec = None
        if ctx.needs_input_grad[4]:
            gW_dec = torch.zeros(W_enc.shape[1], W_dec_c.shape[1], dtype=g.dtype, device=g.device)
            gW_dec.index_copy_(0, cols, acts_d.T @ g)
        g_a = (g @ W_dec_c.T).mul_(acts_d > 0)  # [N, D]; ReLU and the kept set
        if ctx.needs_input_grad[1]:
            gW_enc = torch.zeros_like(W_enc).index_copy_(1, cols, x_cent.T @ g_a)
        need_sum = (ctx.use_b_enc and ctx.needs_input_grad[2]) or ctx.needs_input_grad[3]
        col_sum = g_a.sum(0) if need_sum else None
        if ctx.use_b_enc and ctx.needs_input_grad[2]:
            gb_enc = torch.zeros(W_enc.shape[1], dtype=g.dtype, device=g.device).index_copy_(0, cols, col_sum)
        if ctx.needs_input_grad[3]:
            gb_dec = -(W_enc.index_select(1, cols) @ col_sum)
        return None, gW_enc, gb_enc, gb_dec, gW_dec, None, None, None


@torch.no_grad()
def batch_topk_select(pre: Tensor, n: int, hint: float | None = None) -> tuple[Tensor, Tensor]:
    """(rows, cols), sorted row-major, of the positive entries among the ``n`` largest entries of
    ``pre`` [N, m] (ReLU pre-activations): the BatchTopK training selection, without a flat top-n
    over all N·m entries (seconds on a CPU at N·m ~ 4e7).

    Exact. Let v* be the n-th largest value. Ties at v* go to the lowest flat (row-major) index;
    every entry above v* is kept, so the kept set is a deterministic function of ``pre``.

    * ``hint`` (e.g. a little below the previous batch's cut): if at least n entries exceed it,
      they contain every entry >= v*; the answer is read off them.
    * Otherwise each row proposes its top c = 4·ceil(n/N) entries and v_c is the n-th largest
      candidate (v_c <= v*). A row whose c-th value exceeds v_c may hide larger entries: it is
      widened to all its entries >= v_c. Then every non-candidate is <= the new n-th candidate,
      which is therefore v* (one widening suffices); an entry equal to v* can hide only in an
      unwidened row whose c-th value is v*, and then the ties are looked up in the whole matrix.
    """
    N, m = pre.shape
    n = min(n, N * m)
    flat = pre.reshape(-1)
    if n <= 0:
        e = torch.zeros(0, dtype=torch.long, device=pre.device)
        return e, e
    if hint is not None and hint > 0:
        idx = (flat > hint).nonzero().squeeze(1)
        if idx.numel() >= n:
            return _take_top(flat, idx, flat[idx], n, m, hidden_ties=False)
    c = min(m, 4 * -(-n // N))
    cv, ci = pre.topk(c, dim=1, sorted=False)
    idx = (ci + torch.arange(N, device=pre.device)[:, None] * m).flatten()
    vals = cv.flatten()
    if c == m:
        return _take_top(flat, idx, vals, n, m, hidden_ties=False)
    last = cv.min(1).values
    cut = vals.topk(n, sorted=False).values.min()
    sat = last > cut
    if bool(sat.any()):
        rows = sat.nonzero().squeeze(1)
        sub = pre.index_select(0, rows)
        r, col = (sub >= cut if cut > 0 else sub > 0).nonzero(as_tuple=True)
        keep = (~sat)[:, None].expand(N, c).flatten()
        idx = torch.cat([idx[keep], rows[r] * m + col])
        vals = torch.cat([vals[keep], sub[r, col]])
        last = last.masked_fill(sat, float("-inf"))  # widened rows hide nothing >= v_c
    cut = vals.topk(n, sorted=False).values.min()
    return _take_top(flat, idx, vals, n, m, hidden_ties=bool((last == cut).any()), cut=cut)


def _take_top(flat: Tensor, idx: Tensor, vals: Tensor, n: int, m: int, *, hidden_ties: bool,
              cut: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The positive entries among the top n, given candidates (flat ``idx``, ``vals``) holding every
    entry above the n-th largest value v* and (unless ``hidden_ties``) every entry equal to it."""
    if cut is None:
        cut = vals.topk(min(n, vals.numel()), sorted=False).values.min()
    if cut <= 0:  # fewer than n positive entries: keep them all
        sel = idx[vals > 0]
    else:
        gt = vals > cut
        need = n - int(gt.sum())
        eq = (flat == cut).nonzero().squeeze(1) if hidden_ties else idx[vals == cut]
        sel = torch.cat([idx[gt], eq.sort().values[:need]])
    sel = sel.sort().values
    return sel // m, sel % m


@torch.no_grad()
def batch_topk_select_lowp(p: Tensor, x_cent: Tensor, W_enc: Tensor, b_enc: Tensor | None, n: int,
                           hint: float | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """Exact BatchTopK selection when ``p`` [N, m] = relu(x_cent @ W_enc + b_enc) came from a
    bfloat16 product (float32 accumulation): (rows, cols, float32 values) of the positive entries
    among the n largest float32-rescored pre-activations (ties to the lowest row-major index), or
    None when the bound cannot narrow the search (the caller computes the float32 product).

    Rounding bound: |p_rj - exact_rj| <= E_rj = a·||x_r||·||W[:, j]|| + u·(p_rj + |b_j|) with
    a = 2·2^-8 + 2^-15 + d·2^-23 (inputs rounded to 8 bits, float32 accumulation) and
    u = 1.01·2^-8 (the bfloat16 output of the product, |product| <= p + |b|; the ReLU only
    shrinks differences). The top n of ``p`` have exact values >= lo = min (p - E) over them, so
    v* >= lo, and every entry with exact >= v* has p + E >= lo: those candidates are rescored in
    float32 (a dot product each, ``sampled_addmm``), checked against the bound (else None), and
    the top n taken among them."""
    N, m = p.shape
    rows, cols = batch_topk_select(p, n, hint)
    if rows.numel() < min(n, N * m):
        return None  # fewer than n positive entries: no positive lower bound
    a = 2 * 2.0 ** -8 + 2.0 ** -15 + x_cent.shape[1] * 2.0 ** -23
    u = 1.01 * 2.0 ** -8
    xn, wn = a * x_cent.norm(dim=1), W_enc.norm(dim=0)
    bn = u * (b_enc.abs() if b_enc is not None else torch.zeros_like(wn))
    lo = (p[rows, cols] * (1 - u) - xn[rows] * wn[cols] - bn[cols]).min()
    if lo <= 0:
        return None
    r, c = (p >= ((lo - xn * wn.max() - bn.max()) / (1 + u))[:, None]).nonzero(as_tuple=True)
    if r.numel() > 8 * n:
        return None
    crow = torch.zeros(N + 1, dtype=torch.long, device=p.device)
    crow[1:] = torch.bincount(r, minlength=N).cumsum(0)
    with warnings.catch_warnings():  # CSR is "beta"; sampled_addmm (a dot product per entry) is tested
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, c, torch.ones_like(r, dtype=x_cent.dtype), (N, m),
                                          check_invariants=False)
        vals = torch.sparse.sampled_addmm(pattern, x_cent, W_enc, beta=0.0).values()
    if b_enc is not None:
        vals += b_enc[c]
    vals.relu_()
    pc = p[r, c]
    if bool(((pc - vals).abs() > xn[r] * wn[c] + u * pc + bn[c]).any()):
        return None  # the bound failed (not float32 accumulation?): use float32
    idx = r * m + c
    rows, cols = _take_top(vals, idx, vals, n, m, hidden_ties=False)
    return rows, cols, vals[torch.searchsorted(idx, rows * m + cols)]
