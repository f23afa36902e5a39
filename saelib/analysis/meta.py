"""Meta-SAEs: sparse autoencoders trained on the decoder rows of another SAE.

A meta-SAE treats an SAE's decoder matrix ``W_dec [n_latents, d_model]`` as a dataset of
``n_latents`` vectors and decomposes every latent's direction into a sparse, non-negative sum of
*meta-latents* (Bussmann, Pearce, Leask; Leask et al., "Sparse Autoencoders Do Not Find
Canonical Units of Analysis", arXiv 2502.04878). If a large SAE's latents were atoms, a
4-sparse code over a dictionary four times smaller could not explain much of their variance.

What this module gives:

* :class:`MetaSAEConfig` and :func:`train_meta_sae`: a BatchTopK meta-SAE (k = 4, width a quarter
  of the base width, Adam lr 1e-3, betas (0.9, 0.99), batch 16384 rows, aux alpha 1/16, dead after
  100 batches), a :class:`saelib.sae.core.SAE`, trained by the package's one trainer
  (:func:`saelib.sae.train.train_saes`) on shuffled decoder rows until the training FVE stops
  improving (an :class:`saelib.sae.train.EarlyStopping` hook). Its inference threshold is the
  SAE's own BatchTopK threshold.
* :func:`meta_codes`, :func:`fve`: the meta-code of every decoder row in *batch* mode (BatchTopK
  over the whole matrix as one batch: mean L0 = k exactly) or *threshold* mode (the estimated
  global threshold, the inference rule of BatchTopK), and the fraction of variance explained.
* :func:`decompose`, :func:`inverse_index`: latent -> sorted meta-latents, meta-latent -> members.
* :func:`max_cos_comparison`: meta-latents against the latents of smaller SAEs, both directions,
  with random-unit-vector and covariance-matched Gaussian baselines.
* :func:`split_recovery`, :func:`shared_meta_ratio`: do children of one parent latent share
  meta-latents more often than random pairs of latents? (ratio with a cluster-bootstrap CI)
* Reading a latent with its meta-latents: :mod:`saelib.analysis.inspect` (``latent_view`` takes a
  :class:`Decomposition`).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from saelib.analysis.afa import max_cosine
from saelib.analysis.concentration import random_unit_dictionary
from saelib.sae.metrics import ReconstructionMetrics
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.train import EarlyStopping, TrainConfig, train_saes

__all__ = [
    "MetaSAEConfig",
    "MetaTraining",
    "MetaCodes",
    "FVEResult",
    "Decomposition",
    "MaxCosStats",
    "SplitRecovery",
    "train_meta_sae",
    "meta_codes",
    "fve",
    "reconstruct",
    "decompose",
    "inverse_index",
    "max_cos_comparison",
    "max_cos_table",
    "random_rows",
    "fve_control",
    "matched_gaussian_vectors",
    "split_children",
    "shared_meta_ratio",
    "split_recovery",
]

_ROWS = "decoder_rows"  # the meta-SAE's "hook": its batches are {_ROWS: rows}


# --------------------------------------------------------------------------------------------
# Configuration and training
# --------------------------------------------------------------------------------------------


@dataclass
class MetaSAEConfig:
    """Hyper-parameters of a BatchTopK meta-SAE; defaults follow the paper's GPT-2 meta-SAE."""

    d_meta: int | None = None
    """Number of meta-latents. ``None``: ``round(width_ratio * n_rows)`` (the paper's GPT-2
    meta-SAE on the 49152-latent SAE used 2304, the SAEBench protocol a quarter)."""
    width_ratio: float = 0.25
    """Meta-latents per base latent when ``d_meta`` is ``None``."""
    k: int = 4
    """Mean number of active meta-latents per decoder row (BatchTopK over each batch)."""
    lr: float = 1e-3
    """Adam learning rate (the paper's GPT-2 meta-SAE: 1e-3)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas."""
    batch_size: int = 16384
    """Decoder rows per step (capped at the number of rows: full-batch training below that)."""
    aux_k: int = 512
    """Dead meta-latents used per row by the auxiliary loss (``top_k_aux``)."""
    aux_coeff: float = 1 / 16
    """Weight alpha of the auxiliary dead-latent loss (1/16 for meta-SAEs in the authors' code)."""
    n_batches_to_dead: int = 100
    """A meta-latent that has not fired for this many consecutive batches is dead."""
    use_b_enc: bool = False
    """Use an encoder bias. The released BatchTopK code has none in its forward pass."""
    normalize_rows: bool = True
    """Rescale input rows to unit norm first (a no-op for unit-norm decoders; guards the others)."""
    max_steps: int = 2000
    """Hard cap on optimiser steps (the released GPT-2 meta-SAE is the step-2000 checkpoint)."""
    min_steps: int = 200
    """Never stop before this many steps."""
    window: int = 100
    """Convergence window in steps: compare the mean training FVE of the last window with the
    window before it (checked at every history record, see ``log_every``)."""
    tol: float = 1e-3
    """Stop when the windowed training FVE improves by less than this (absolute)."""
    threshold_ema: float = 0.01
    """EMA rate of the inference threshold (the smallest surviving activation of each batch):
    ``SAEConfig.threshold_lr``."""
    select_dtype: str = "float32"
    """dtype of the BatchTopK selection's product ("float32" or "bfloat16": exact set, see
    :mod:`saelib.sae.rules.batchtopk`)."""
    seed: int = 49
    """Seed of the initialisation and the row shuffling (49 in the authors' code)."""
    device: str | None = None
    """Device; ``None`` uses the input matrix's device."""
    progress: bool = True
    """Show a tqdm progress bar."""
    log_every: int = 10
    """Record a history entry every ``gcd(log_every, window)`` steps (the trainer's log_every)."""

    def __post_init__(self) -> None:
        if self.d_meta is not None and self.d_meta < 1:
            raise ValueError(f"d_meta must be >= 1 or None (got {self.d_meta}).")
        if not 0 < self.width_ratio <= 64:
            raise ValueError(f"width_ratio must be in (0, 64] (got {self.width_ratio}).")
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (got {self.k}).")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0 (got {self.lr}).")
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives lists
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1) (got {self.betas}).")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {self.batch_size}).")
        if self.aux_k < 0 or self.aux_coeff < 0:
            raise ValueError("aux_k and aux_coeff must be >= 0 (set aux_coeff=0 to disable).")
        if self.n_batches_to_dead < 1:
            raise ValueError(f"n_batches_to_dead must be >= 1 (got {self.n_batches_to_dead}).")
        if self.max_steps < 1 or self.min_steps < 0 or self.window < 1 or self.log_every < 1:
            raise ValueError("max_steps, window and log_every must be >= 1 and min_steps >= 0.")
        if self.tol < 0:
            raise ValueError(f"tol must be >= 0 (got {self.tol}).")
        if not 0 < self.threshold_ema <= 1:
            raise ValueError(f"threshold_ema must be in (0, 1] (got {self.threshold_ema}).")

    def width_for(self, n_rows: int) -> int:
        """Number of meta-latents for a base dictionary of ``n_rows`` latents."""
        return int(self.d_meta) if self.d_meta is not None else max(1, round(self.width_ratio * n_rows))


class MetaTraining(NamedTuple):
    """A trained meta-SAE and how its training went."""

    sae: SAE
    """The meta-SAE: activation "batchtopk" over ``d_meta = sae.cfg.d_sae`` meta-latents; its
    inference threshold (threshold mode) is ``sae.threshold``."""
    history: list[dict]
    """The trainer's records (``step``, ``fvu``, ``loss``, ``mse_loss``, ``aux_loss``, ...) plus
    ``fve = 1 - fvu``, ``n_dead`` and ``threshold`` at that step."""
    n_steps: int
    converged: bool
    """Stopped by the FVE criterion (False: ran to ``max_steps``)."""
    wall_s: float
    s_per_step: float
    """Steady-state seconds per step (the first record, with the warm-up step, left out)."""


def _make_sae(d_in: int, d_sae: int, cfg: MetaSAEConfig, batch_size: int) -> SAE:
    """The BatchTopK :class:`saelib.sae.core.SAE` of a meta-SAE, its hyper-parameters in the SAE's
    own terms (a "token" is a decoder row: dead after ``n_batches_to_dead * batch_size`` rows).
    The SAE's seeded init is the authors': Kaiming-uniform W_enc, W_dec = W_enc^T with unit rows,
    zero biases."""
    return SAE(SAEConfig(
        d_in=d_in, d_sae=d_sae, activation="batchtopk", k=cfg.k, aux_k=cfg.aux_k,
        aux_coeff=cfg.aux_coeff, dead_after_tokens=cfg.n_batches_to_dead * batch_size,
        threshold_lr=cfg.threshold_ema, input_norm="none", use_b_enc=cfg.use_b_enc,
        seed=cfg.seed, hook_name=_ROWS, model_name="meta-sae",
    ))


def _pre_acts(x: torch.Tensor, W_enc: torch.Tensor, b_dec: torch.Tensor, b_enc: torch.Tensor | None) -> torch.Tensor:
    """relu((x - b_dec) @ W_enc + b_enc) in float32. [B, m]"""
    pre = (x - b_dec).float() @ W_enc.float()
    if b_enc is not None:
        pre = pre + b_enc.float()
    return torch.relu_(pre)


def _prepare_rows(W_dec: torch.Tensor, normalize: bool) -> torch.Tensor:
    if not isinstance(W_dec, torch.Tensor) or W_dec.ndim != 2:
        raise ValueError(
            "W_dec must be a 2-D tensor [n_latents, d_model] (an SAE's decoder matrix, e.g. sae.W_dec)."
        )
    W = W_dec.detach().float()
    if not torch.isfinite(W).all():
        raise ValueError("W_dec holds NaN or inf values: check the SAE checkpoint it came from.")
    if normalize:
        norms = W.norm(dim=1, keepdim=True)
        if (norms == 0).any():
            raise ValueError(
                f"{int((norms == 0).sum())} decoder rows are all zero and cannot be normalised: "
                "drop them (W_dec[W_dec.norm(dim=1) > 0]) or pass normalize_rows=False."
            )
        W = W / norms
    return W


def _row_batches(X: torch.Tensor, batch_size: int, seed: int):
    """Endless batches ``{_ROWS: rows}``: shuffled passes over the rows of ``X``, a new seeded
    permutation whenever fewer than ``batch_size`` rows are left (those are skipped)."""
    gen = torch.Generator().manual_seed(seed)
    N = X.shape[0]
    while True:
        perm = torch.randperm(N, generator=gen).to(X.device)
        for pos in range(0, N - batch_size + 1, batch_size):
            yield {_ROWS: X[perm[pos:pos + batch_size]]}


def train_meta_sae(W_dec: torch.Tensor, cfg: MetaSAEConfig | None = None, **overrides: Any) -> MetaTraining:
    """Train a BatchTopK meta-SAE on the rows of ``W_dec [n_latents, d_model]``.

    ``cfg`` fields can also be given as keyword arguments (``train_meta_sae(W, k=4, d_meta=2304)``).
    The training step is :func:`saelib.sae.train.train_saes`' (loss = MSE + aux_coeff * aux-k
    loss; radial decoder gradient removed, Adam, rows renormalised). Training stops at
    ``max_steps`` or, from ``max(min_steps, 2 * window)`` steps on, when the mean training FVE of
    the last ``window`` steps exceeds that of the window before by less than ``tol`` (absolute),
    checked every ``gcd(log_every, window)`` steps. The inference threshold is the SAE's BatchTopK
    EMA of the smallest activation that survived each batch (rate ``threshold_ema``).
    """
    cfg = cfg or MetaSAEConfig()
    if overrides:
        cfg = MetaSAEConfig(**{**asdict(cfg), **overrides})
    device = torch.device(cfg.device) if cfg.device else W_dec.device
    X = _prepare_rows(W_dec, cfg.normalize_rows).to(device)  # [N, d]
    N, d = X.shape
    if N < 2:
        raise ValueError(f"A meta-SAE needs at least 2 decoder rows (got {N}).")
    B = min(cfg.batch_size, N)
    sae = _make_sae(d, cfg.width_for(N), cfg, B)
    sae.select_dtype = cfg.select_dtype
    log_every = math.gcd(cfg.log_every, cfg.window)
    tc = TrainConfig(batch_size=B, n_tokens=cfg.max_steps * B, lr=cfg.lr, betas=cfg.betas, log_every=log_every,
                     dead_window_tokens=cfg.n_batches_to_dead * B, progress=cfg.progress, device=str(device),
                     seed=cfg.seed, batchtopk_threshold="ema")
    stop = EarlyStopping("fvu", min_improvement=cfg.tol, relative=False, window=cfg.window // log_every,
                         min_step=max(cfg.min_steps, 2 * cfg.window))
    history: list[dict] = []

    def record(step: int, records: dict[str, dict]) -> bool:
        rec = records["meta"]
        history.append({**rec, "fve": 1.0 - rec["fvu"], "n_dead": rec["dead"] or 0,
                        "threshold": float(sae.threshold)})
        return False

    start = time.perf_counter()
    sae = train_saes({"meta": sae}, _row_batches(X, B, cfg.seed), tc, hooks=[stop, record])["meta"]
    wall = time.perf_counter() - start
    sae.requires_grad_(False)
    steady = [B / h["tokens_per_s"] for h in history[1:]]
    return MetaTraining(sae, history, history[-1]["step"], stop.converged, wall,
                        sum(steady) / len(steady) if steady else wall / max(history[-1]["step"], 1))


# --------------------------------------------------------------------------------------------
# Codes, FVE, decompositions
# --------------------------------------------------------------------------------------------


class MetaCodes(NamedTuple):
    """Sparse meta-codes of a decoder matrix: entry ``e`` says latent ``rows[e]`` contains
    meta-latent ``cols[e]`` with activation ``vals[e]``. Sorted by row, then by value (desc)."""

    rows: torch.Tensor  # LongTensor [nnz]
    cols: torch.Tensor  # LongTensor [nnz]
    vals: torch.Tensor  # FloatTensor [nnz]
    n_latents: int
    d_meta: int
    mode: str  # "batch" or "threshold"

    @property
    def l0(self) -> float:
        """Mean number of active meta-latents per latent."""
        return self.rows.numel() / max(self.n_latents, 1)

    def per_latent_l0(self) -> torch.Tensor:
        """LongTensor [n_latents]: active meta-latents of every latent."""
        return torch.bincount(self.rows, minlength=self.n_latents)

    def members_per_meta(self) -> torch.Tensor:
        """LongTensor [d_meta]: latents each meta-latent is active in."""
        return torch.bincount(self.cols, minlength=self.d_meta)

    def dense(self) -> torch.Tensor:
        """FloatTensor [n_latents, d_meta] (only for small matrices)."""
        out = torch.zeros(self.n_latents, self.d_meta)
        out[self.rows, self.cols] = self.vals
        return out


@torch.no_grad()
def meta_codes(meta: SAE, W_dec: torch.Tensor, mode: str = "threshold", *,
               threshold: float | None = None, chunk_size: int = 8192, normalize_rows: bool = True) -> MetaCodes:
    """Meta-codes of every row of ``W_dec`` (rows normalised as in training).

    ``mode="batch"``: BatchTopK with the whole matrix as one batch (mean L0 = k exactly).
    ``mode="threshold"``: ``pre > threshold`` (default: the estimated ``meta.threshold``).
    """
    if mode not in ("batch", "threshold"):
        raise ValueError(f"mode must be 'batch' or 'threshold' (got {mode!r}).")
    X = _prepare_rows(W_dec, normalize_rows).to(meta.W_enc.device)
    N = X.shape[0]
    m = meta.cfg.d_sae
    if X.shape[1] != meta.W_enc.shape[0]:
        raise ValueError(
            f"W_dec has d_model {X.shape[1]} but the meta-SAE was trained on d_model "
            f"{meta.W_enc.shape[0]}: pass the decoder the meta-SAE was trained on."
        )
    if mode == "threshold":
        thr = float(meta.threshold) if threshold is None else float(threshold)
        rs, cs, vs = [], [], []
        for s in range(0, N, chunk_size):
            pre = _pre_acts(X[s:s + chunk_size], meta.W_enc, meta.b_dec, meta.b_enc)
            r, c = (pre > thr).nonzero(as_tuple=True)
            rs.append(r + s), cs.append(c), vs.append(pre[r, c])
        rows, cols, vals = torch.cat(rs), torch.cat(cs), torch.cat(vs)
    else:
        n = meta.cfg.k * N
        c = min(m, 4 * meta.cfg.k)
        while True:  # the top n are among each row's top c unless a row has all c above the cut
            cv, ci = [], []
            for s in range(0, N, chunk_size):
                v, i = _pre_acts(X[s:s + chunk_size], meta.W_enc, meta.b_dec, meta.b_enc).topk(c, dim=-1)
                cv.append(v), ci.append(i)
            cand_v, cand_i = torch.cat(cv), torch.cat(ci)
            flat_v, flat_pos = cand_v.flatten().topk(min(n, cand_v.numel()))
            if c == m or not bool((cand_v[:, -1] > flat_v[-1]).any()):
                break
            c = min(m, 4 * c)
        keep = flat_v > 0
        rows, cols, vals = flat_pos[keep] // c, cand_i.flatten()[flat_pos[keep]], flat_v[keep]
    # sort by row, then by value descending
    order = torch.argsort(vals, descending=True, stable=True)
    rows, cols, vals = rows[order], cols[order], vals[order]
    order = torch.argsort(rows, stable=True)
    return MetaCodes(rows[order].cpu(), cols[order].cpu(), vals[order].float().cpu(), N, m, mode)


@torch.no_grad()
def reconstruct(meta: SAE, codes: MetaCodes) -> torch.Tensor:
    """Reconstructed decoder rows [n_latents, d_model] from sparse meta-codes."""
    W = meta.W_dec.detach().float().cpu()
    out = meta.b_dec.detach().float().cpu().expand(codes.n_latents, -1).clone()
    out.index_add_(0, codes.rows, codes.vals[:, None] * W[codes.cols])
    return out


class FVEResult(NamedTuple):
    """Fraction of variance explained of a decoder matrix by its meta-codes."""

    fve: float
    l0: float
    dead_fraction: float  # meta-latents active in no row
    mode: str
    threshold: float | None


@torch.no_grad()
def fve(meta: SAE, W_dec: torch.Tensor, mode: str = "threshold", *,
        threshold: float | None = None, codes: MetaCodes | None = None, normalize_rows: bool = True) -> FVEResult:
    """FVE = 1 − Σ‖d − d̂‖² / Σ‖d − d̄‖² over the rows ``d`` of ``W_dec``: the ``explained_variance``
    of :class:`saelib.sae.metrics.ReconstructionMetrics` with decoder rows as the data."""
    codes = codes if codes is not None else meta_codes(meta, W_dec, mode, threshold=threshold)
    m = ReconstructionMetrics()
    m.add(_prepare_rows(W_dec, normalize_rows).cpu(), reconstruct(meta, codes))
    dead = float((codes.members_per_meta() == 0).float().mean())
    thr = (float(meta.threshold) if threshold is None else threshold) if codes.mode == "threshold" else None
    return FVEResult(m.result()["explained_variance"], codes.l0, dead, codes.mode, thr)


class Decomposition(NamedTuple):
    """One latent as a sorted list of (meta-latent, activation)."""

    latent: int
    meta_latents: list[int]
    acts: list[float]


def decompose(codes: MetaCodes, latents: int | Sequence[int] | None = None) -> list[Decomposition]:
    """Decompositions of ``latents`` (default all), meta-latents sorted by activation."""
    if latents is None:
        latents = range(codes.n_latents)
    elif isinstance(latents, (int, np.integer)):
        latents = [int(latents)]
    starts = torch.searchsorted(codes.rows, torch.arange(codes.n_latents + 1))
    out = []
    for i in latents:
        i = int(i)
        if not 0 <= i < codes.n_latents:
            raise ValueError(f"latent {i} out of range [0, {codes.n_latents}).")
        s, e = int(starts[i]), int(starts[i + 1])
        out.append(Decomposition(i, codes.cols[s:e].tolist(), codes.vals[s:e].tolist()))
    return out


def inverse_index(codes: MetaCodes) -> list[Decomposition]:
    """For every meta-latent, the latents it is active in, sorted by activation (desc).

    Returns ``Decomposition``-shaped tuples with ``latent`` = the meta-latent and
    ``meta_latents`` = its member latents (reused so both directions read alike).
    """
    order = torch.argsort(codes.vals, descending=True, stable=True)
    cols, rows, vals = codes.cols[order], codes.rows[order], codes.vals[order]
    order = torch.argsort(cols, stable=True)
    cols, rows, vals = cols[order], rows[order], vals[order]
    starts = torch.searchsorted(cols, torch.arange(codes.d_meta + 1))
    return [Decomposition(c, rows[int(starts[c]):int(starts[c + 1])].tolist(),
                          vals[int(starts[c]):int(starts[c + 1])].tolist())
            for c in range(codes.d_meta)]


# --------------------------------------------------------------------------------------------
# Meta-latents against smaller SAEs
# --------------------------------------------------------------------------------------------


def matched_gaussian_vectors(n: int, W: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``n`` unit vectors drawn from a Gaussian with the mean and covariance of the rows of ``W``.

    A stronger baseline than isotropic vectors: decoder rows are anisotropic (they share a mean
    direction and a few dominant ones), and random vectors with that shape already resemble them
    more than isotropic vectors do.
    """
    W = F.normalize(W.detach().float().cpu(), dim=1)
    mu = W.mean(0)
    C = torch.cov(W.T) + 1e-6 * torch.eye(W.shape[1])
    L = torch.linalg.cholesky(C)
    g = torch.Generator().manual_seed(seed)
    return F.normalize(mu + torch.randn(n, W.shape[1], generator=g) @ L.T, dim=1)


def random_rows(W: torch.Tensor, kind: str = "isotropic", seed: int = 0) -> torch.Tensor:
    """Random unit rows with the shape of ``W`` for an FVE or cosine control.

    ``"isotropic"``: uniform on the sphere. ``"matched"``: Gaussian with the mean and covariance
    of ``W``'s (unit-normalised) rows, then normalised (:func:`matched_gaussian_vectors`). Decoder
    rows are anisotropic; a meta-SAE explains more of anisotropic random rows than of isotropic
    ones, so only the excess over the *matched* control measures composition beyond the rows'
    second-order statistics.
    """
    if kind == "isotropic":
        return random_unit_dictionary(W.shape[0], W.shape[1], seed)
    if kind == "matched":
        return matched_gaussian_vectors(W.shape[0], W, seed)
    raise ValueError(f"kind must be 'isotropic' or 'matched', got {kind!r}")


def fve_control(W: torch.Tensor, cfg: "MetaSAEConfig | None" = None, *, kind: str = "matched", seed: int = 0,
                mode: str = "batch", **overrides: Any) -> FVEResult:
    """FVE of the same meta-SAE recipe trained on random rows (:func:`random_rows`) of ``W``'s shape."""
    R = random_rows(W, kind, seed)
    return fve(train_meta_sae(R, cfg, **overrides).sae, R, mode)


class MaxCosStats(NamedTuple):
    """Max-cosine distributions of one comparison set (e.g. meta-latents vs SAE of width w)."""

    name: str
    width: int
    forward: torch.Tensor  # [d_meta] max cos of each meta-latent to the SAE's latents
    forward_random: torch.Tensor  # [d_meta] same for isotropic random unit vectors
    forward_matched: torch.Tensor  # [d_meta] same for covariance-matched random vectors
    reverse: torch.Tensor  # [width] max cos of each SAE latent to the meta-latents
    reverse_random: torch.Tensor  # [width] ... to as many isotropic random vectors
    reverse_matched: torch.Tensor  # [width] ... to as many covariance-matched vectors


def max_cos_comparison(meta_dirs: torch.Tensor, decoders: dict[str, torch.Tensor], *,
                       base_W: torch.Tensor | None = None, seed: int = 0) -> list[MaxCosStats]:
    """Meta-latents (``meta_dirs [d_meta, d]``) against each decoder in ``decoders`` (name -> W_dec).

    Baselines: ``d_meta`` isotropic random unit vectors, and (when ``base_W``, the decoder the
    meta-SAE was trained on, is given) ``d_meta`` Gaussian vectors matched to its mean/covariance.
    """
    n, d = meta_dirs.shape
    rand = random_unit_dictionary(n, d, seed)
    matched = matched_gaussian_vectors(n, base_W, seed) if base_W is not None else None
    out = []
    for name, W in decoders.items():
        if W.shape[1] != d:
            raise ValueError(f"decoder {name!r} has d_model {W.shape[1]}, the meta-SAE {d}.")
        fwd, _, rev, _ = max_cosine(meta_dirs, W, both=True)
        fr, _, rr, _ = max_cosine(rand, W, both=True)
        if matched is not None:
            fm, _, rm, _ = max_cosine(matched, W, both=True)
        else:
            fm, rm = torch.full_like(fwd, float("nan")), torch.full_like(rev, float("nan"))
        out.append(MaxCosStats(name, W.shape[0], fwd, fr, fm, rev, rr, rm))
    return out


def max_cos_table(stats: list[MaxCosStats]):
    """A pandas DataFrame of means (one row per decoder) from :func:`max_cos_comparison`."""
    return pd.DataFrame([{
        "decoder": s.name, "width": s.width,
        "meta→SAE": s.forward.mean().item(), "random→SAE": s.forward_random.mean().item(),
        "matched→SAE": s.forward_matched.mean().item(),
        "SAE→meta": s.reverse.mean().item(), "SAE→random": s.reverse_random.mean().item(),
        "SAE→matched": s.reverse_matched.mean().item(),
    } for s in stats])


# --------------------------------------------------------------------------------------------
# Split recovery
# --------------------------------------------------------------------------------------------


def split_children(W_large: torch.Tensor, W_small: torch.Tensor, theta: float = 0.7, *,
                   min_children: int = 2, block_size: int = 4096) -> dict[int, list[int]]:
    """Children of each small-SAE latent: large-SAE latents with cos > ``theta`` to it.

    Returns ``{parent: [children...]}`` for parents with at least ``min_children`` children.
    """
    A = F.normalize(W_large.detach().float().cpu(), dim=1)
    Bm = F.normalize(W_small.detach().float().cpu(), dim=1)
    groups: dict[int, list[int]] = {}
    for s in range(0, A.shape[0], block_size):
        child, parent = ((A[s:s + block_size] @ Bm.T) > theta).nonzero(as_tuple=True)
        for c, p in zip((child + s).tolist(), parent.tolist()):
            groups.setdefault(p, []).append(c)
    return {p: sorted(cs) for p, cs in sorted(groups.items()) if len(cs) >= min_children}


class SplitRecovery(NamedTuple):
    """How often children of one parent share an active meta-latent, against random pairs."""

    n_groups: int
    n_child_pairs: int
    p_children: float  # fraction of child pairs sharing >= 1 active meta-latent
    p_random: float  # same for random pairs of latents
    ratio: float  # p_children / p_random
    ci_low: float  # bootstrap CI of the ratio (groups and random pairs resampled)
    ci_high: float
    parent_meta_coverage: float  # mean fraction of children in which the parent's
    # closest meta-latent is active (nan without parent directions)
    # cosine-matched baseline (nan when no decoder rows were given): random non-sibling pairs drawn
    # to follow the child pairs' own decoder-cosine distribution, so that "children are similar
    # directions" alone cannot produce the ratio
    mean_child_cos: float = float("nan")  # mean decoder cosine of the child pairs
    p_matched: float = float("nan")  # share rate of the cosine-matched random pairs
    ratio_matched: float = float("nan")  # p_children / p_matched
    ci_matched_low: float = float("nan")
    ci_matched_high: float = float("nan")
    matched_coverage: float = float("nan")  # share of child pairs whose cosine bin had random pairs
    seed: int = 0  # seed of the random pairs (differs between parent sets)


def _pair_shares(code_sets: list[set[int]], pairs: np.ndarray) -> np.ndarray:
    return np.array([bool(code_sets[a] & code_sets[b]) for a, b in pairs], dtype=bool)


def _matched_pairs(W: torch.Tensor, child_cos: np.ndarray, siblings: set[tuple[int, int]],
                   rng: np.random.Generator, *, n_bins: int = 10, per_bin: int = 2000,
                   n_anchors: int = 2048, pool: np.ndarray | None = None):
    """Random latent pairs whose decoder cosines follow ``child_cos``'s distribution.

    Bins: quantiles of the child-pair cosines. Candidates: every pair (anchor, j) with the anchor
    one of ``n_anchors`` random latents of ``pool``, j any other latent of the pool, not a sibling
    pair, cosine inside the child range. Up to ``per_bin`` candidates are drawn per bin.
    Returns (pairs [n, 2], bin of each pair, bin edges, child-pair share per bin).
    """
    X = F.normalize(W.detach().float().cpu(), dim=1)
    pool = np.arange(X.shape[0]) if pool is None else np.asarray(pool)
    edges = np.unique(np.quantile(child_cos, np.linspace(0, 1, n_bins + 1)))
    if len(edges) < 2:
        edges = np.array([child_cos.min() - 1e-6, child_cos.max() + 1e-6])
    edges[0], edges[-1] = edges[0] - 1e-9, edges[-1] + 1e-9
    child_bin = np.clip(np.searchsorted(edges, child_cos, side="right") - 1, 0, len(edges) - 2)
    w = np.bincount(child_bin, minlength=len(edges) - 1) / len(child_cos)
    anchors = rng.choice(pool, min(n_anchors, len(pool)), replace=False)
    Xp = X[torch.as_tensor(pool)]
    cand_a, cand_b, cand_c = [], [], []
    for s0 in range(0, len(anchors), 512):
        A = anchors[s0:s0 + 512]
        C = (X[torch.as_tensor(A)] @ Xp.T).numpy()
        ia, jb = np.nonzero((C > edges[0]) & (C < edges[-1]))
        a, b = A[ia], pool[jb]
        keep = a != b
        cand_a.append(a[keep]), cand_b.append(b[keep]), cand_c.append(C[ia, jb][keep])
    a, b, c = (np.concatenate(v) if v else np.zeros(0) for v in (cand_a, cand_b, cand_c))
    if siblings and len(a):
        sib = np.array([(min(x, y), max(x, y)) in siblings for x, y in zip(a.tolist(), b.tolist())], dtype=bool)
        a, b, c = a[~sib], b[~sib], c[~sib]
    cb = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, len(edges) - 2)
    out_pairs, out_bins = [], []
    for k in range(len(edges) - 1):
        idx = np.nonzero(cb == k)[0]
        if len(idx) > per_bin:
            idx = rng.choice(idx, per_bin, replace=False)
        out_pairs.append(np.stack([a[idx], b[idx]], 1).astype(int))
        out_bins.append(np.full(len(idx), k))
    return np.concatenate(out_pairs), np.concatenate(out_bins), edges, w


def shared_meta_ratio(codes: MetaCodes, groups: dict[int, list[int]] | list[list[int]], *,
                      n_random_pairs: int = 20000, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95, pool: Sequence[int] | None = None,
                      parent_meta: dict[int, int] | None = None, W: torch.Tensor | None = None,
                      n_bins: int = 10) -> SplitRecovery:
    """Share rate of >= 1 active meta-latent within groups vs random latent pairs.

    ``groups``: latent groups (e.g. children of one parent). Random pairs are drawn from ``pool``
    (default: all latents). The CI resamples groups (pairs in one group are not independent) and
    random pairs. ``parent_meta``: group key -> a meta-latent; reports how often it is active in
    the group's members.

    ``W`` (the decoder rows the codes were computed from) adds the **cosine-matched baseline**.
    Children are chosen by their cosine to a parent, so they are similar directions, and a
    meta-SAE's codes are a function of direction: similar rows share meta-latents whatever the
    meta-SAE has learned about composition. The matched baseline draws random non-sibling pairs
    whose decoder cosines follow the child pairs' distribution (``n_bins`` quantile bins,
    reweighted to the children's bin shares); ``ratio_matched`` is the excess sharing beyond
    what direction similarity alone gives. Pass different ``seed`` values for different parent
    sets so their random baselines are independent draws.
    """
    items = list(groups.items()) if isinstance(groups, dict) else list(enumerate(groups))
    items = [(k, list(v)) for k, v in items if len(v) >= 2]
    if not items:
        raise ValueError(
            "No group has 2 or more members: lower theta or use a larger/smaller SAE pair."
        )
    rng = np.random.default_rng(seed)
    code_sets: list[set[int]] = [set() for _ in range(codes.n_latents)]
    for r, c in zip(codes.rows.tolist(), codes.cols.tolist()):
        code_sets[r].add(c)
    per_group = []  # (n_shared, n_pairs) per group
    for _, members in items:
        ms = np.array(members)
        a, b = np.triu_indices(len(ms), k=1)
        shares = _pair_shares(code_sets, np.stack([ms[a], ms[b]], 1))
        per_group.append((shares.sum(), len(shares)))
    per_group = np.array(per_group, dtype=float)
    pool_arr = np.arange(codes.n_latents) if pool is None else np.asarray(pool)
    ra = rng.choice(pool_arr, n_random_pairs)
    rb = rng.choice(pool_arr, n_random_pairs)
    ok = ra != rb
    rand_shares = _pair_shares(code_sets, np.stack([ra[ok], rb[ok]], 1)).astype(float)
    p_child = per_group[:, 0].sum() / per_group[:, 1].sum()
    p_rand = rand_shares.mean()
    ratios = []
    for _ in range(n_boot):
        gi = rng.integers(0, len(per_group), len(per_group))
        pc = per_group[gi, 0].sum() / per_group[gi, 1].sum()
        pr = rand_shares[rng.integers(0, len(rand_shares), len(rand_shares))].mean()
        ratios.append(pc / pr if pr > 0 else np.inf)
    lo, hi = np.quantile(ratios, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    coverage = float("nan")
    if parent_meta is not None:
        cov = [np.mean([parent_meta[k] in code_sets[c] for c in members])
               for k, members in items if k in parent_meta]
        coverage = float(np.mean(cov)) if cov else float("nan")
    extra: dict[str, float] = {}
    if W is not None:
        if W.shape[0] != codes.n_latents:
            raise ValueError(f"W has {W.shape[0]} rows but the codes are for {codes.n_latents} latents: pass the "
                             "decoder the meta-codes were computed from")
        Xn = F.normalize(W.detach().float().cpu(), dim=1)
        child_pairs, child_group, siblings = [], [], set()
        for g, (_, members) in enumerate(items):
            ms = np.array(members)
            ia, ib = np.triu_indices(len(ms), k=1)
            for x, y in zip(ms[ia].tolist(), ms[ib].tolist()):
                child_pairs.append((x, y)), child_group.append(g), siblings.add((min(x, y), max(x, y)))
        cp = np.array(child_pairs)
        child_cos = (Xn[torch.as_tensor(cp[:, 0])] * Xn[torch.as_tensor(cp[:, 1])]).sum(1).numpy()
        child_share = _pair_shares(code_sets, cp).astype(float)
        child_group = np.array(child_group)
        pairs, bins, edges, w = _matched_pairs(W, child_cos, siblings, rng, n_bins=n_bins, pool=pool_arr)
        shares = _pair_shares(code_sets, pairs).astype(float) if len(pairs) else np.zeros(0)
        nb = len(edges) - 1
        child_bin = np.clip(np.searchsorted(edges, child_cos, side="right") - 1, 0, nb - 1)

        def matched_rate(sh: np.ndarray, bn: np.ndarray, cb: np.ndarray) -> tuple[float, float]:
            wts = np.bincount(cb, minlength=nb).astype(float)
            pb = np.array([sh[bn == k].mean() if (bn == k).any() else np.nan for k in range(nb)])
            covered = ~np.isnan(pb) & (wts > 0)
            if not covered.any():
                return float("nan"), 0.0
            return float((wts[covered] * pb[covered]).sum() / wts[covered].sum()), float(wts[covered].sum() / wts.sum())

        p_m, cover = matched_rate(shares, bins, child_bin)
        boot = []
        for _ in range(n_boot):
            gi = rng.integers(0, len(items), len(items))
            sel = np.concatenate([np.nonzero(child_group == g)[0] for g in gi])
            ri = rng.integers(0, len(shares), len(shares)) if len(shares) else np.zeros(0, dtype=int)
            pm, _ = matched_rate(shares[ri], bins[ri], child_bin[sel])
            pc = child_share[sel].mean()
            boot.append(pc / pm if pm > 0 else np.inf)
        mlo, mhi = np.quantile(boot, [(1 - ci) / 2, 1 - (1 - ci) / 2]) if boot else (np.nan, np.nan)
        extra = {"mean_child_cos": float(child_cos.mean()), "p_matched": p_m,
                 "ratio_matched": float(p_child / p_m) if p_m > 0 else float("inf") if p_m == 0 else float("nan"),
                 "ci_matched_low": float(mlo), "ci_matched_high": float(mhi), "matched_coverage": cover}
    return SplitRecovery(len(items), int(per_group[:, 1].sum()), float(p_child), float(p_rand),
                         float(p_child / p_rand) if p_rand > 0 else float("inf"),
                         float(lo), float(hi), coverage, seed=int(seed), **extra)


def split_recovery(meta: SAE, codes: MetaCodes, W_large: torch.Tensor, W_small: torch.Tensor,
                   theta: float = 0.7, **kwargs: Any) -> SplitRecovery:
    """Split recovery of a meta-SAE trained on ``W_large`` against parents in ``W_small``.

    Children of a parent: latents of ``W_large`` with cos > ``theta`` to it. Also reports how often
    the meta-latent closest to the parent's direction is active in its children, and (by default)
    the cosine-matched random baseline of :func:`shared_meta_ratio` (children are similar
    directions by construction, so only the excess over direction-matched pairs measures what the
    meta-SAE adds).
    """
    groups = split_children(W_large, W_small, theta)
    if not groups:
        raise ValueError(
            f"No small-SAE latent has 2+ children with cos > {theta}: lower theta, or use "
            "better-trained SAEs (untrained decoders share no directions)."
        )
    parents = torch.tensor(list(groups))
    closest = max_cosine(W_small[parents].cpu(), meta.W_dec.cpu()).indices
    parent_meta = dict(zip(parents.tolist(), closest.tolist()))
    kwargs.setdefault("W", W_large)
    return shared_meta_ratio(codes, groups, parent_meta=parent_meta, **kwargs)
