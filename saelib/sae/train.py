"""Train many SAEs off one activation stream: metrics, checkpoints, exact resume, held-out eval.

One pass over a stream of ``dict[hook, Tensor[B, d]]`` batches trains a whole sweep (hook
points x activation rules x k x afa_coeff x seeds), so the language model runs once. Every SAE
has its own Adam optimiser; SAE ``name`` reads ``batch[sae.cfg.hook_name]``.

Step order per SAE (Bussmann et al. / the top-AFA paper's code, see below for the one change)::

    out = sae(x); out.loss.backward()
    clip_grad_norm_ (optional)
    sae.remove_gradient_parallel_to_decoder_directions()   # drop the radial gradient component
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()                   # rows back on the unit sphere

The paper's code renormalises the rows *before* ``optimizer.step()``, so its rows sit slightly
off the unit sphere between steps (which is why its top-AFA rule multiplies by row norms). We
renormalise after the step, so the rows are unit norm whenever the SAE is used, saved or
evaluated; the sequence of updates is otherwise the same.

Metric definitions (written to ``<out_dir>/<name>/metrics.jsonl`` every ``log_every`` steps as
means over the steps since the previous record, and to ``eval.json`` on held-out tokens):

* ``nmse`` -- per-token normalised squared error, averaged over tokens:
  ``mean_t ||x_t - x_hat_t||^2 / ||x_t||^2`` (model space). With the paper's per-token
  standardisation ``||x_t||^2 = d - 1`` for every token, so this is the quantity the paper calls
  "Normalized MSE" up to the factor d/(d-1); the SAE's own ``mse_loss`` (its normalised space)
  is logged too, and for ``input_norm="token"`` it *is* the paper's ``l2_loss``.
* ``fvu`` -- fraction of variance unexplained, ``sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - x_bar||^2``
  with ``x_bar`` the per-dimension mean over the batch (training) or over the whole eval set.
* ``l0`` -- mean number of non-zero latents per token; ``l0_p10/p50/p90/max`` its per-token
  quantiles (top-AFA and BatchTopK choose a different number of latents per token).
* ``dead`` -- latents that have not fired on the last ``dead_window_tokens`` training tokens
  (only counted once that many tokens were seen; before that the value is ``null``).
* every scalar ``*_loss`` field of the SAE's output (``loss, mse_loss, afa_loss, aux_loss, l1_loss``).
* ``tokens_per_s`` -- stream tokens processed per second by the whole trainer (all SAEs).
* ``eps_max`` / ``eps_mean`` -- max and mean |cos| between distinct decoder rows, every
  ``eps_every`` steps (blockwise, never the full h x h Gram at once).

Exact resume: ``<out_dir>/checkpoint.pt`` (written atomically every ``checkpoint_every`` steps)
holds every SAE's weights and buffers (dead counters, BatchTopK threshold), its optimiser state,
the trainer's dead-latent counters and metric accumulators, the step count and the RNG states.
Re-running :func:`train_saes` with the same configs, the same ``out_dir`` and a *fresh* batch
iterable that yields the same sequence as before (same source, same seed) resumes: the trainer
skips the ``step`` batches it already consumed and continues. The result is bit-identical to an
uninterrupted run (tested). The learning-rate schedule is a pure function of the step.
The checkpoint holds tensors and plain data only and is read with ``torch.load(weights_only=True)``
(nothing is unpickled); it records fingerprints of the first batch and of the last batch before
it, so resuming on another stream is an error. A torn last line of ``metrics.jsonl`` (a kill
during an append) is dropped on resume.

Reliability: one process writes a run folder at a time (an advisory lock; a second gets an
error naming the holder's pid). Training stops at the first non-finite loss (on CPU at once; on
a GPU at the next log or checkpoint step, without a host sync per step) with
:class:`TrainingDivergedError` naming the SAE, the step and the likely causes; non-finite weights
are never checkpointed, saved or returned, and metrics are never written as ``null``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import random
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelib.io import TRAINING_CODE, atomic_path, atomic_write_text, code_fingerprint, folder_lock
from saelib.sae.metrics import held_out_metrics

__all__ = [
    "TrainConfig",
    "TrainingDivergedError",
    "train_saes",
    "sweep_configs",
    "sweep_name",
    "load_saes",
    "load_metrics",
    "load_evals",
    "sweep_table",
    "ensure_sweep",
    "decoder_epsilon",
    "paper_gpt2_results",
]

CHECKPOINT = "checkpoint.pt"
_CHECKPOINT_FORMAT = 2  # 2: no pickled objects (weights_only load), batch-stream fingerprint
_NAME_RE = re.compile(r"^[A-Za-z0-9_.+=-]+$")
_QUANTILES = (0.1, 0.5, 0.9)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """How to train a sweep of SAEs off one activation stream."""

    batch_size: int = 4096
    """Tokens per optimiser step. Every batch of the stream must have this many rows (a shorter
    final batch is dropped)."""
    n_tokens: int = 81_924_096
    """Training tokens per SAE; the run takes ``n_tokens // batch_size`` steps (paper: 20,001 x 4096)."""
    lr: float = 3e-4
    """Adam learning rate (paper: 3e-4)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam betas (paper: (0.9, 0.99))."""
    adam_eps: float = 1e-8
    """Adam epsilon (PyTorch default, as the paper)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up from 0 over this many steps (paper: none)."""
    decay_steps: int = 0
    """Linear decay to ``lr * lr_end_factor`` over the last this-many steps (paper: none)."""
    lr_end_factor: float = 0.0
    """Learning-rate multiplier reached at the end of the decay."""
    grad_clip: float | None = None
    """Max global gradient norm per SAE, or None for no clipping (paper: 1e5, i.e. effectively none)."""
    log_every: int = 50
    """Write a metrics record every this many steps (and at the last step)."""
    eps_every: int = 0
    """Compute decoder epsilon (max/mean |cos| between rows) every this many steps; 0 = never.
    Must be a multiple of ``log_every`` so the value lands in a metrics record."""
    eps_block: int = 2048
    """Rows per block of the blockwise Gram used for epsilon (memory ~ eps_block x d_sae)."""
    dead_window_tokens: int = 1_000_000
    """A latent that fired on none of the last this-many training tokens counts as dead in the
    ``dead`` metric (the SAE's aux loss has its own window, ``SAEConfig.dead_after_tokens``)."""
    checkpoint_every: int = 0
    """Write ``<out_dir>/checkpoint.pt`` every this many steps (0 = never); enables resume."""
    keep_checkpoint: bool = False
    """Keep the last checkpoint after a successful run (it holds optimiser state: ~3x the SAEs)."""
    resume: bool = True
    """Resume from ``<out_dir>/checkpoint.pt`` when it exists (see module docstring)."""
    out_dir: str | Path | None = None
    """Folder for ``<name>/metrics.jsonl``, ``<name>/eval.json``, final SAEs and ``metrics.csv``;
    None keeps everything in memory (no metrics, no checkpoints)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (imported lazily; off by default)."""
    device: str | None = None
    """Torch device for the SAEs; None = "cuda" when available, else "cpu"."""
    seed: int = 0
    """Seed for torch/numpy/python RNGs at the start of training (SAE init uses ``SAEConfig.seed``)."""
    batchtopk_threshold: str = "final"
    """How BatchTopK's inference threshold θ is set. "final": after training, θ is the mean over
    the last ``threshold_batches`` training batches of the smallest activation the batch rule
    keeps, with the final weights (:meth:`SAE.calibrate_threshold`). "ema": keep the training
    EMA (SAELens' ``topk_threshold_lr`` rule, started at the first batch's value), which lags
    behind the weights and, in a few hundred steps, still remembers its start."""
    threshold_batches: int = 8
    """Training batches (the last ones) that the "final" BatchTopK threshold averages over."""

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                lo = "0" if allow_zero else "1"
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")

        positive_int("batch_size")
        positive_int("n_tokens")
        positive_int("log_every")
        positive_int("eps_every", allow_zero=True)
        positive_int("eps_block")
        positive_int("dead_window_tokens")
        positive_int("checkpoint_every", allow_zero=True)
        positive_int("warmup_steps", allow_zero=True)
        positive_int("decay_steps", allow_zero=True)
        positive_int("threshold_batches")
        if self.batchtopk_threshold not in ("final", "ema"):
            raise ValueError(f"TrainConfig.batchtopk_threshold must be 'final' or 'ema', got {self.batchtopk_threshold!r}")
        if self.n_tokens < self.batch_size:
            raise ValueError(
                f"TrainConfig.n_tokens ({self.n_tokens}) is smaller than batch_size ({self.batch_size}): "
                "no step would run; raise n_tokens or lower batch_size"
            )
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = (float(betas[0]), float(betas[1]))
        if not self.adam_eps > 0:
            raise ValueError(f"TrainConfig.adam_eps must be > 0, got {self.adam_eps!r}")
        if not 0.0 <= self.lr_end_factor <= 1.0:
            raise ValueError(f"TrainConfig.lr_end_factor must be in [0, 1], got {self.lr_end_factor!r}")
        if self.warmup_steps + self.decay_steps > self.n_steps:
            raise ValueError(
                f"TrainConfig.warmup_steps + decay_steps ({self.warmup_steps} + {self.decay_steps}) exceeds the "
                f"{self.n_steps} training steps (n_tokens // batch_size); shorten the schedule or add tokens"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None (no clipping), got {self.grad_clip!r}")
        if self.eps_every and self.eps_every % self.log_every:
            raise ValueError(
                f"TrainConfig.eps_every ({self.eps_every}) must be a multiple of log_every ({self.log_every}) "
                "so each epsilon lands in a metrics record; e.g. eps_every = 10 * log_every"
            )
        if self.checkpoint_every and self.out_dir is None:
            raise ValueError("TrainConfig.checkpoint_every > 0 needs an out_dir to write checkpoints to; set out_dir")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"TrainConfig.device {self.device!r} is not a torch device (try 'cpu' or 'cuda')") from e
        if self.out_dir is not None:
            self.out_dir = Path(self.out_dir)

    @property
    def n_steps(self) -> int:
        """Optimiser steps per SAE: ``n_tokens // batch_size``."""
        return self.n_tokens // self.batch_size

    def lr_at(self, step: int) -> float:
        """Learning rate for 0-based ``step``: linear warm-up, constant, linear decay."""
        n = self.n_steps
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay_steps and step >= n - self.decay_steps:
            frac = (step - (n - self.decay_steps) + 1) / self.decay_steps
            return self.lr * (1.0 - frac * (1.0 - self.lr_end_factor))
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = None if self.out_dir is None else str(self.out_dir)
        d["betas"] = list(self.betas)
        return d


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _sae_module():
    from saelib.sae import core as sae_mod  # imported lazily: sae.py may import this module's siblings

    return sae_mod


def _atomic_torch_save(obj: Any, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            torch.save(obj, tmp)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); the previous checkpoint (if any) is kept. "
                               "Free disk space and run again to resume from it") from None


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    return {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


@torch.no_grad()
def decoder_epsilon(W_dec: Tensor, block_size: int = 2048) -> tuple[float, float]:
    """Max and mean |cos| between distinct rows of ``W_dec [h, d]`` (the paper's epsilon), blockwise.

    Only ``block_size x h`` cosines exist at a time, so h = 12288 needs ~100 MB instead of the
    paper's 600 MB Gram matrix per step. The mean is over the h(h-1) ordered off-diagonal pairs
    (the paper logs a *signed* mean, which is ~0 and says little; |cos| is what matters).
    """
    W = W_dec.detach().float()
    if not bool(torch.isfinite(W).all()):
        raise ValueError(
            f"decoder_epsilon: W_dec holds {int((~torch.isfinite(W)).sum())} non-finite entries (NaN/inf), so its "
            "epsilon is undefined; the SAE diverged: retrain it (lower lr, normalise inputs)"
        )
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    h = W.shape[0]
    if h < 2:
        return 0.0, 0.0
    mx = torch.zeros((), device=W.device)
    total = torch.zeros((), dtype=torch.float64, device=W.device)
    for start in range(0, h, block_size):
        blk = W[start : start + block_size] @ W.T  # [b, h]
        idx = torch.arange(blk.shape[0], device=W.device)
        blk[idx, idx + start] = 0.0  # drop self-similarity
        blk = blk.abs()
        mx = torch.maximum(mx, blk.max())
        total += blk.sum(dtype=torch.float64)
    return float(mx), float(total / (h * (h - 1)))


def _epsilon(W_dec: Tensor, block_size: int) -> tuple[float, float]:
    """(max |cos|, mean |cos|) of the decoder rows: saelib.analysis.afa.epsilon (exact, tiled upper
    triangle) when available, else the local blockwise :func:`decoder_epsilon`."""
    try:
        from saelib.analysis.afa import epsilon
    except ImportError:
        return decoder_epsilon(W_dec, block_size)
    e = epsilon(W_dec.detach(), block_size=block_size)
    return float(e.max), float(e.mean)


def _loss_fields(out: Any) -> dict[str, Tensor]:
    """Scalar ``*loss`` tensors of an SAE output NamedTuple (None entries skipped)."""
    items = out._asdict().items() if hasattr(out, "_asdict") else vars(out).items()
    return {
        k: v.detach()
        for k, v in items
        if k.endswith("loss") and isinstance(v, Tensor) and v.numel() == 1
    }


# --------------------------------------------------------------------------------------------
# per-SAE training state
# --------------------------------------------------------------------------------------------
def make_adam(params: Iterable[torch.nn.Parameter], *, lr: float, betas: tuple[float, float],
              eps: float = 1e-8) -> torch.optim.Adam:
    """Adam, fused where PyTorch has the kernel (CPU/CUDA floating point): one pass per step and
    no [d_sae, d_in]-sized temporaries, the same update rule as the default implementation."""
    params = list(params)
    devices = {p.device.type for p in params}
    fused = (len(devices) == 1 and devices <= {"cpu", "cuda"}
             and all(p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for p in params))
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=True if fused else None)


class _Run:
    """One SAE being trained: model, optimiser, counters and the current metrics window."""

    def __init__(self, name: str, sae: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.name = name
        self.sae = sae
        self.hook = sae.cfg.hook_name
        self.d_sae = int(sae.cfg.d_sae)
        self.opt = make_adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        # tokens since each latent last fired (trainer-side, for the `dead` metric)
        self.since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=device)
        self.tokens_seen = 0
        # first step with a non-finite loss (-1: none); tracked on the device, read at check points
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.reset_window(device)

    def reset_window(self, device: torch.device) -> None:
        # accumulated on the device without .item(): one sync per log record
        self.acc: dict[str, Tensor] = {}
        self.l0_hist = torch.zeros(self.d_sae + 1, dtype=torch.long, device=device)
        self.n_steps_window = 0

    def add(self, key: str, value: Tensor) -> None:
        v = value.detach().double()
        self.acc[key] = self.acc[key] + v if key in self.acc else v

    def state(self) -> dict[str, Any]:
        return {
            "model": self.sae.state_dict(),
            "optim": self.opt.state_dict(),
            "since_fired": self.since_fired,
            "tokens_seen": self.tokens_seen,
            "acc": self.acc,
            "l0_hist": self.l0_hist,
            "n_steps_window": self.n_steps_window,
        }

    def load_state(self, st: Mapping[str, Any]) -> None:
        self.sae.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        self.since_fired.copy_(st["since_fired"])
        self.tokens_seen = int(st["tokens_seen"])
        self.acc = {k: v.to(self.since_fired.device).clone() for k, v in st["acc"].items()}
        self.l0_hist.copy_(st["l0_hist"])
        self.n_steps_window = int(st["n_steps_window"])


def _prepare_saes(saes: Mapping[str, Any], device: torch.device) -> dict[str, torch.nn.Module]:
    sae_mod = _sae_module()
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("train_saes needs a non-empty dict {name: SAEConfig | SAE}; e.g. sweep_configs(...)")
    out: dict[str, torch.nn.Module] = {}
    for name, obj in saes.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(
                f"SAE name {name!r} is not a valid folder name: use letters, digits and . _ - + = only "
                "(sweep_name() builds valid names)"
            )
        if isinstance(obj, sae_mod.SAEConfig):
            sae = sae_mod.SAE(obj)
        elif isinstance(obj, sae_mod.SAE):
            sae = obj
        else:
            raise ValueError(f"saes[{name!r}] is a {type(obj).__name__}; expected saelib.sae.core.SAEConfig or SAE")
        if sae.cfg.activation == "jumprelu":
            raise ValueError(
                f"saes[{name!r}] is a JumpReLU SAE, which saelib only runs for inference; "
                "train 'batchtopk' instead (its eval-mode threshold makes it a JumpReLU-style SAE)"
            )
        if not getattr(sae.cfg, "hook_name", None):
            raise ValueError(
                f"saes[{name!r}].cfg.hook_name is empty: set it to the batch key the SAE reads, "
                "e.g. 'blocks.6.hook_resid_pre'"
            )
        out[name] = sae.to(device)
    return out


@torch.no_grad()
def _fit_global_norms(runs: list[_Run], batch: Mapping[str, Tensor], device: torch.device) -> None:
    """input_norm="global": fit the scale on the first batch unless it was set beforehand."""
    for r in runs:
        if r.sae.cfg.input_norm == "global" and float(r.sae.input_scale) == 1.0:
            r.sae.fit_input_norm(batch[r.hook].to(device=device, dtype=r.sae.W_dec.dtype))


@torch.no_grad()
def _init_b_decs(runs: list[_Run], batch: Mapping[str, Tensor], device: torch.device) -> None:
    """SAEConfig.b_dec_init on the first batch, for SAEs whose b_dec is still all zero (a
    passed-in, already trained SAE keeps its bias)."""
    for r in runs:
        if getattr(r.sae.cfg, "b_dec_init", "zeros") != "zeros" and not bool(r.sae.b_dec.any()):
            r.sae.init_b_dec(batch[r.hook].to(device=device, dtype=r.sae.W_dec.dtype))


def _check_batch(batch: Any, runs: list[_Run], cfg: TrainConfig) -> bool:
    """Validate a stream batch; returns False for a short batch to drop."""
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"the batch stream yielded a {type(batch).__name__}; expected dict[hook, Tensor[B, d]] "
            "(ActivationCache.iter_batches / tensor_batches produce these)"
        )
    sizes = set()
    for r in runs:
        if r.hook not in batch:
            raise ValueError(
                f"SAE {r.name!r} reads hook {r.hook!r} but the batch has only {sorted(batch)}; "
                "add that hook to the activation source or fix SAEConfig.hook_name"
            )
        x = batch[r.hook]
        d_in = int(r.sae.cfg.d_in)
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(
                f"batch[{r.hook!r}] has shape {tuple(x.shape)} but SAE {r.name!r} expects [B, {d_in}] "
                "(flatten [B, S, d] activations to tokens first)"
            )
        sizes.add(x.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"hooks in one batch have different token counts {sorted(sizes)}; they must match")
    (b,) = sizes
    if b > cfg.batch_size:
        raise ValueError(
            f"the stream yielded a batch of {b} tokens but TrainConfig.batch_size is {cfg.batch_size}; "
            "make the source yield batch_size rows (e.g. iter_batches(hooks, batch_size=cfg.batch_size))"
        )
    return b == cfg.batch_size


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _accumulate(run: _Run, x: Tensor, out: Any) -> None:
    x_hat = out.x_hat.detach()
    err = (x - x_hat).pow(2).sum(-1)  # [B]
    sq = x.pow(2).sum(-1)  # [B]
    run.add("nmse", (err / sq.clamp_min(1e-12)).mean())
    run.add("fvu", err.sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    l0_tok = out.l0_tokens  # [B], counted by the forward pass without an [B, d_sae] temporary
    run.add("l0", l0_tok.float().mean())
    run.l0_hist += torch.bincount(l0_tok, minlength=run.d_sae + 1)
    for k, v in _loss_fields(out).items():
        run.add(k, v)
    run.n_steps_window += 1
    run.since_fired += x.shape[0]
    run.since_fired[out.fired] = 0
    run.tokens_seen += x.shape[0]


def _hist_quantiles(hist: Tensor, qs=_QUANTILES) -> dict[str, float]:
    h = hist.double().cpu()
    total = float(h.sum())
    if total == 0:
        return {}
    cdf = h.cumsum(0) / total
    res = {f"l0_p{int(q * 100)}": int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))) for q in qs}
    nz = torch.nonzero(h).flatten()
    res["l0_max"] = int(nz[-1]) if len(nz) else 0
    res["l0_min"] = int(nz[0]) if len(nz) else 0
    return res


def _window_record(run: _Run, cfg: TrainConfig, step: int, tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    keys = list(run.acc)
    vals = torch.stack([run.acc[k] for k in keys]).cpu().tolist() if keys else []
    n = max(run.n_steps_window, 1)
    rec: dict[str, Any] = {"step": step, "tokens": tokens}
    rec.update({k: v / n for k, v in zip(keys, vals)})
    rec.update(_hist_quantiles(run.l0_hist))
    if run.tokens_seen >= cfg.dead_window_tokens:
        dead = int((run.since_fired >= cfg.dead_window_tokens).sum())
        rec["dead"], rec["dead_frac"] = dead, dead / run.d_sae
    else:
        rec["dead"], rec["dead_frac"] = None, None
    rec.update(extra)
    bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # never written as null: a non-finite metric means the run diverged
        raise TrainingDivergedError(
            f"SAE {run.name!r}: metrics {bad} are non-finite at step {step}; " + _DIVERGED_ADVICE
        )
    return {k: _jsonable(v) for k, v in rec.items()}


def _log_all(runs: list[_Run], cfg: TrainConfig, out_dir: Path, step: int, tokens: int, lr: float,
             tokens_per_s: float, wb: Any, pbar: Any) -> None:
    """Append one record per SAE (the window since the last record) and reset the windows."""
    do_eps = bool(cfg.eps_every) and (step % cfg.eps_every == 0 or step == cfg.n_steps)
    wb_log: dict[str, Any] = {}
    rec: dict[str, Any] = {}
    for r in runs:
        extra: dict[str, Any] = {"lr": lr, "tokens_per_s": tokens_per_s}
        if do_eps:
            extra["eps_max"], extra["eps_mean"] = _epsilon(r.sae.W_dec, cfg.eps_block)
        rec = _window_record(r, cfg, step, tokens, extra)
        mpath = out_dir / r.name / "metrics.jsonl"
        try:
            with open(mpath, "a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        except OSError as e:
            raise OSError(e.errno, f"could not append to {mpath} ({e.strerror or e}); free disk space (or fix the "
                                   "folder's permissions) and run again: training resumes from the last checkpoint "
                                   "and a torn last line is dropped") from None
        if wb is not None:
            wb_log.update({f"{r.name}/{k}": v for k, v in rec.items() if v is not None})
        r.reset_window(r.since_fired.device)
    if wb is not None:
        wb.log(wb_log, step=step)
    if pbar is not None and len(runs) == 1:
        pbar.set_postfix(loss=f"{rec.get('loss', float('nan')):.3g}", l0=f"{rec.get('l0', 0):.1f}")


def _read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` pairs of a metrics file. A torn last line (a kill during an append) is
    dropped with a warning; an unreadable line elsewhere is an error naming the file and line."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a torn last line (an interrupted append): {line[:60]!r}", stacklevel=3)
                break
            raise ValueError(
                f"{path}:{i + 1} is not a JSON record ({e}); the metrics file is damaged: delete that line "
                "(or the file, losing the training curve) and run again"
            ) from None
        out.append((line, rec))
    return out


def _truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records past ``max_step`` (written after the checkpoint we resume from) and a torn last line."""
    if not path.exists():
        return
    keep = [line for line, rec in _read_jsonl(path) if rec.get("step", 0) <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def _write_combined_csv(out_dir: Path) -> Path | None:
    rows = []
    for name, recs in load_metrics(out_dir, as_frame=False).items():
        rows += [{"name": name, **r} for r in recs]
    if not rows:
        return None
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    path = out_dir / "metrics.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in st["cuda"]])


def _batch_fingerprint(batch: Mapping[str, Tensor], hooks: Iterable[str]) -> str:
    """sha256 of the hooks' tensors of one batch (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for k in sorted(set(hooks)):
        t = batch[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _identity(runs: list[_Run], cfg: TrainConfig) -> dict[str, Any]:
    """What must match for a checkpoint to be resumable."""
    tc = cfg.to_dict()
    for k in ("progress", "out_dir", "wandb_project", "checkpoint_every", "keep_checkpoint", "resume", "device", "log_every", "eps_every", "eps_block"):
        tc.pop(k, None)
    return {"train": tc, "saes": {r.name: _cfg_dict(r.sae.cfg) for r in runs}}


def _save_checkpoint(path: Path, runs: list[_Run], cfg: TrainConfig, step: int, tokens: int,
                     stream: dict[str, Any]) -> None:
    _atomic_torch_save(
        {
            "format": _CHECKPOINT_FORMAT,
            "step": step,
            "tokens": tokens,
            "identity": _identity(runs, cfg),
            "stream": stream,
            "runs": {r.name: r.state() for r in runs},
            "rng": _rng_state(),
        },
        path,
    )


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain data only, never unpickled objects."""
    import pickle
    import zipfile

    fix = (f"delete {path} to start over (the SAEs restart from step 0), or pass TrainConfig(resume=False)")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (a crash while it was written?): {fix}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # a torch archive or a pickle stream
            raise ValueError(
                f"{path} is not a saelib checkpoint: it holds pickled objects, which saelib never loads "
                f"(they could run code). ({str(e).splitlines()[0][:200]}) Remove that file: {fix}"
            ) from None
        raise ValueError(f"{path} is not a checkpoint (unrecognised bytes); it is corrupt: {fix}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'truncated'}); "
            f"it is truncated or corrupt: {fix}"
        ) from None
    if not isinstance(ck, dict) or ck.get("format") != _CHECKPOINT_FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path} has checkpoint format {got!r}, this saelib reads format {_CHECKPOINT_FORMAT}: {fix}")
    missing = [k for k in ("step", "tokens", "identity", "stream", "runs", "rng") if k not in ck]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is damaged: {fix}")
    return ck


def _load_checkpoint(path: Path, runs: list[_Run], cfg: TrainConfig) -> tuple[int, int, dict[str, Any]]:
    ck = _read_checkpoint(path)
    want = _identity(runs, cfg)
    if ck.get("identity") != want:
        have = ck.get("identity", {})
        diff = sorted(set(have.get("saes", {})) ^ set(want["saes"]))
        what = f"SAE names differ ({diff})" if diff else "SAE or training configs differ"
        raise ValueError(
            f"{path} belongs to a different run: {what}. Use another out_dir, delete the checkpoint, "
            "or pass TrainConfig(resume=False) to start over"
        )
    for r in runs:
        r.load_state(ck["runs"][r.name])
    _set_rng_state(ck["rng"])
    return int(ck["step"]), int(ck["tokens"]), dict(ck["stream"])


class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss, metric or weight; nothing of it was saved."""


_DIVERGED_ADVICE = (
    "training stopped and the diverged weights were not saved. Likely causes: a learning rate too high "
    "for the input scale (lower TrainConfig.lr, add warmup_steps or grad_clip), inputs with a large or "
    "uneven norm (SAEConfig.input_norm='global' or 'token'), or NaN/inf in the activations."
)


def _check_finite(runs: list[_Run], cfg: TrainConfig, n_done: int, *, weights: bool) -> None:
    """Raise :class:`TrainingDivergedError` when some SAE had a non-finite loss (or weight)."""
    for r in runs:
        bad = int(r.bad_step)
        bad_w = [n for n, p in r.sae.named_parameters() if not bool(torch.isfinite(p).all())] if weights else []
        if bad >= 0:
            raise TrainingDivergedError(
                f"SAE {r.name!r} diverged: its loss became non-finite (NaN/inf) at step {bad} "
                f"(0-based, lr {cfg.lr_at(bad):.3g}); " + _DIVERGED_ADVICE
            )
        if bad_w:
            raise TrainingDivergedError(
                f"SAE {r.name!r} diverged: its weights {bad_w} are non-finite after step {n_done}; " + _DIVERGED_ADVICE
            )


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _lazy_wandb(cfg: TrainConfig, names: list[str]):
    if not cfg.wandb_project:
        return None
    try:
        import wandb  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError("TrainConfig.wandb_project is set but wandb is not installed: pip install wandb, or set it to None") from e
    return wandb.init(project=cfg.wandb_project, config={"train": cfg.to_dict(), "saes": names})


def train_saes(
    saes: Mapping[str, Any],
    batches: Iterable[Mapping[str, Tensor]],
    cfg: TrainConfig,
    *,
    eval_batches: Iterable[Mapping[str, Tensor]] | None = None,
) -> dict[str, torch.nn.Module]:
    """Train every SAE in ``saes`` on one pass over ``batches``; return ``{name: trained SAE}``.

    Args:
        saes: ``{name: SAEConfig | SAE}``. Names become folders under ``cfg.out_dir``. Each SAE
            reads ``batch[sae.cfg.hook_name]``; configs are instantiated with ``SAE(cfg)``.
        batches: iterable of ``dict[hook, Tensor[batch_size, d]]`` (e.g.
            ``ActivationCache.iter_batches(hooks, cfg.batch_size, epochs=...)``). Must yield at
            least ``cfg.n_steps`` full batches; to resume, pass a fresh iterable that repeats the
            original sequence (the consumed prefix is skipped).
        cfg: the :class:`TrainConfig`.
        eval_batches: optional held-out batches; after training every SAE is evaluated on all of
            them (:func:`saelib.sae.metrics.held_out_metrics`) and ``<out_dir>/<name>/eval.json`` is written.

    Files under ``cfg.out_dir``: ``<name>/metrics.jsonl``, ``<name>/sae.safetensors`` +
    ``cfg.json`` (``SAE.save``), ``<name>/eval.json``, ``metrics.csv`` (all SAEs, all records),
    ``train.json`` (the TrainConfig) and, while training, ``checkpoint.pt``.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if batches is None or not isinstance(batches, Iterable):
        raise ValueError("batches must be an iterable of dict[hook, Tensor[B, d]] (e.g. ActivationCache.iter_batches(...))")
    if cfg.out_dir is None:
        return _train(saes, batches, cfg, eval_batches)
    with folder_lock(cfg.out_dir, "run folder"):  # one writer per run folder
        return _train(saes, batches, cfg, eval_batches)


def _train(saes, batches, cfg: TrainConfig, eval_batches) -> dict[str, torch.nn.Module]:
    device = _resolve_device(cfg)
    modules = _prepare_saes(saes, device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)

    runs = [_Run(n, m, cfg, device) for n, m in modules.items()]
    out_dir: Path | None = cfg.out_dir  # type: ignore[assignment]
    ckpt_path = out_dir / CHECKPOINT if out_dir is not None else None
    step, tokens = 0, 0
    stream: dict[str, Any] = {}  # fingerprints of the first batch and of the last one before a checkpoint
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if ckpt_path.exists() and cfg.resume:
            step, tokens, stream = _load_checkpoint(ckpt_path, runs, cfg)

    n_steps = cfg.n_steps
    hooks = [r.hook for r in runs]
    it: Iterator = iter(batches)
    # the last training batches of each BatchTopK hook, for the final inference threshold
    calib_hooks = sorted({r.hook for r in runs if r.sae.cfg.activation == "batchtopk"}) \
        if cfg.batchtopk_threshold == "final" else []
    recent: collections.deque = collections.deque(maxlen=cfg.threshold_batches)
    if step:  # replay the stream up to where the checkpoint left it
        skipped = 0
        while skipped < step:
            try:
                b = next(it)
            except StopIteration:
                raise ValueError(
                    f"cannot resume at step {step}: the batch stream ended after {skipped} batches; "
                    "pass the same (fresh) batch iterable as the interrupted run"
                ) from None
            if _check_batch(b, runs, cfg):
                for key, at in (("first", 0), ("last", stream.get("last_step", 0) - 1)):
                    if skipped == at and stream.get(key) != _batch_fingerprint(b, hooks):
                        raise ValueError(
                            f"cannot resume {ckpt_path} at step {step}: batch {at} of this stream differs from the one "
                            "the checkpoint was trained on (another dataset, seed, order or dtype). Pass the same (fresh) "
                            "batch iterable as the interrupted run, or start over with TrainConfig(resume=False)"
                        )
                skipped += 1
                if calib_hooks:
                    recent.append({h: b[h] for h in calib_hooks})

    if out_dir is not None:  # written only once the checkpoint and the stream are known to belong to this run
        atomic_write_text(out_dir / "train.json", json.dumps(cfg.to_dict(), indent=2))
        for r in runs:
            mpath = out_dir / r.name / "metrics.jsonl"
            if step:
                _truncate_jsonl(mpath, step)
            elif mpath.exists():
                mpath.unlink()  # a fresh run starts a fresh log
            (out_dir / r.name).mkdir(parents=True, exist_ok=True)

    wb = _lazy_wandb(cfg, [r.name for r in runs])
    pbar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        pbar = tqdm(total=n_steps, initial=step, desc=f"training {len(runs)} SAE(s)", unit="step")
    t_window, tok_window = time.perf_counter(), 0
    for r in runs:
        r.sae.train()
    try:
        while step < n_steps:
            try:
                batch = next(it)
            except StopIteration:
                warnings.warn(
                    f"the batch stream ended after {step} of {n_steps} steps ({tokens} tokens); the SAEs are "
                    "saved as they are. Pass more batches (e.g. epochs=...) to train the full n_tokens",
                    stacklevel=2,
                )
                break
            if not _check_batch(batch, runs, cfg):
                continue  # drop a short trailing batch
            if step == 0:
                _fit_global_norms(runs, batch, device)
                if ckpt_path is not None:
                    stream["first"] = _batch_fingerprint(batch, hooks)
                _init_b_decs(runs, batch, device)
            if calib_hooks:
                recent.append({h: batch[h] for h in calib_hooks})
            lr = cfg.lr_at(step)
            for r in runs:
                x = batch[r.hook].to(device=device, dtype=r.sae.W_dec.dtype, non_blocking=True)
                for g in r.opt.param_groups:
                    g["lr"] = lr
                out = r.sae(x)
                finite = torch.isfinite(out.loss.detach())
                if device.type == "cpu":  # free to check at once: stop before the step spoils the weights
                    if not bool(finite):
                        r.bad_step.fill_(step)
                        _check_finite(runs, cfg, step, weights=False)
                else:  # no host sync per step: the first bad step is read at the next check point
                    r.bad_step = torch.where(~finite & (r.bad_step < 0), step, r.bad_step)
                r.opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(r.sae.parameters(), cfg.grad_clip)
                r.sae.remove_gradient_parallel_to_decoder_directions()
                r.opt.step()
                r.sae.set_decoder_norm_to_unit_norm()
                _accumulate(r, x, out)
            step += 1
            tokens += cfg.batch_size
            tok_window += cfg.batch_size

            if out_dir is not None and (step % cfg.log_every == 0 or step == n_steps):
                _check_finite(runs, cfg, step, weights=True)
                _log_all(runs, cfg, out_dir, step, tokens, lr, tok_window / max(time.perf_counter() - t_window, 1e-9), wb, pbar)
                t_window, tok_window = time.perf_counter(), 0
            if ckpt_path is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < n_steps:
                _check_finite(runs, cfg, step, weights=True)  # a checkpoint never holds diverged weights
                stream.update(last=_batch_fingerprint(batch, hooks), last_step=step)
                _save_checkpoint(ckpt_path, runs, cfg, step, tokens, stream)
            if pbar is not None:
                pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()
    _check_finite(runs, cfg, step, weights=True)  # non-finite weights are never saved or returned
    if out_dir is not None and runs[0].n_steps_window:  # the stream ended mid-window: log the rest
        _log_all(runs, cfg, out_dir, step, tokens, cfg.lr_at(max(step - 1, 0)),
                 tok_window / max(time.perf_counter() - t_window, 1e-9), wb, None)

    if calib_hooks and recent:
        with torch.no_grad():
            for r in runs:
                if r.sae.cfg.activation == "batchtopk":
                    r.sae.calibrate_threshold([b[r.hook].to(device=device, dtype=r.sae.W_dec.dtype) for b in recent])
    result = {r.name: r.sae.eval() for r in runs}
    if out_dir is not None:
        for r in runs:
            r.sae.save(out_dir / r.name)
    if eval_batches is not None:
        evals = held_out_metrics(result, eval_batches, device=device, progress=cfg.progress)
        if out_dir is not None:
            for name, ev in evals.items():
                ev = {"train_steps": step, "train_tokens": tokens, **ev}
                atomic_write_text(out_dir / name / "eval.json", json.dumps(ev, indent=2))
    if out_dir is not None:
        _write_combined_csv(out_dir)
        if ckpt_path is not None and ckpt_path.exists() and not cfg.keep_checkpoint:
            ckpt_path.unlink()
    if wb is not None:
        wb.finish()
    return result


# --------------------------------------------------------------------------------------------
# sweeps
# --------------------------------------------------------------------------------------------
def _fmt_num(v: float) -> str:
    return f"{v:g}"


def sweep_name(hook: str, activation: str, *, k: int | None = None, afa_coeff: float | None = None,
               l1_coeff: float | None = None, seed: int = 0) -> str:
    """Folder name of one sweep member, e.g. ``blocks.15.hook_resid_pre-topk-k32-s0``."""
    if activation in ("topk", "batchtopk"):
        knob = f"k{k}"
    elif activation == "topafa":
        knob = f"afa{_fmt_num(afa_coeff)}"
    else:
        knob = f"l1{_fmt_num(l1_coeff)}"
    return f"{hook}-{activation}-{knob}-s{seed}"


def sweep_configs(
    hooks: Iterable[str],
    d_in: int,
    d_sae: int,
    *,
    topk_ks: Iterable[int] = (),
    batchtopk_ks: Iterable[int] = (),
    afa_coeffs: Iterable[float] = (),
    relu_l1_coeffs: Iterable[float] = (),
    seeds: Iterable[int] = (0,),
    **common: Any,
) -> dict[str, Any]:
    """The grid hooks x {TopK over ``topk_ks``, BatchTopK over ``batchtopk_ks``, top-AFA over
    ``afa_coeffs``, ReLU+L1 over ``relu_l1_coeffs``} x seeds, as ``{name: SAEConfig}``.

    ``common`` goes to every ``SAEConfig`` (e.g. ``input_norm="token"``, ``model_name=...``).
    The paper's grid: ``topk_ks = batchtopk_ks = (32, ..., 8192)``, ``afa_coeffs = (1/128, 1/64,
    1/32, 1/24, 1/16)``. Names come from :func:`sweep_name`; ``seeds`` set ``SAEConfig.seed``
    (the initialisation), so seed replicates differ only in their init.
    """
    SAEConfig = _sae_module().SAEConfig
    hooks, seeds = list(hooks), list(seeds)
    if not hooks:
        raise ValueError("sweep_configs needs at least one hook name, e.g. ['blocks.6.hook_resid_pre']")
    grid: list[tuple[str, dict[str, Any]]] = []
    grid += [("topk", {"k": int(k)}) for k in topk_ks]
    grid += [("batchtopk", {"k": int(k)}) for k in batchtopk_ks]
    grid += [("topafa", {"afa_coeff": float(c)}) for c in afa_coeffs]
    grid += [("relu", {"l1_coeff": float(c)}) for c in relu_l1_coeffs]
    if not grid:
        raise ValueError("sweep_configs got an empty grid: give topk_ks, batchtopk_ks, afa_coeffs or relu_l1_coeffs")
    for act, knob in grid:
        if "k" in knob and not 1 <= knob["k"] <= d_sae:
            raise ValueError(f"{act} k={knob['k']} is outside [1, d_sae={d_sae}]; fix the k grid or d_sae")
    out: dict[str, Any] = {}
    for hook, (act, knob), seed in itertools.product(hooks, grid, seeds):
        name = sweep_name(hook, act, seed=seed, **knob)
        kw = {**common, **knob}
        if act != "topafa":
            kw.setdefault("afa_coeff", 0.0)
        if act != "relu":
            kw.setdefault("l1_coeff", 0.0)
        out[name] = SAEConfig(d_in=d_in, d_sae=d_sae, activation=act, hook_name=hook, seed=seed, **kw)
    return out


def load_saes(out_dir: str | Path, names: Iterable[str] | None = None, *, device: str | None = None) -> dict[str, Any]:
    """Load the final SAEs of a sweep folder (every ``<out_dir>/<name>/`` with ``cfg.json``)."""
    SAE = _sae_module().SAE
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {out_dir}; train it first (train_saes / ensure_sweep)")
    found = sorted((p.parent.name for p in out_dir.glob("*/cfg.json")), key=_natural_key)
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in found]
        if missing:
            raise FileNotFoundError(f"{out_dir} has no trained SAE(s) {missing}; available: {found}")
        found = names
    saes = {}
    for n in found:
        sae = SAE.load(out_dir / n)
        sae = sae.to(device) if device is not None else sae
        saes[n] = sae.eval()  # eval mode: BatchTopK uses its inference threshold
    return saes


def load_metrics(out_dir: str | Path, *, as_frame: bool = True):
    """Training records of every SAE in ``out_dir``: a pandas DataFrame (column ``name``) or a dict."""
    out_dir = Path(out_dir)
    res: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(out_dir.glob("*/metrics.jsonl"), key=lambda p: _natural_key(p.parent.name)):
        res[p.parent.name] = [rec for _, rec in _read_jsonl(p)]
    if not as_frame:
        return res
    import pandas as pd

    rows = [{"name": n, **r} for n, recs in res.items() for r in recs]
    return pd.DataFrame(rows)


def load_evals(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: eval.json contents}`` for every evaluated SAE of a sweep folder."""
    out_dir = Path(out_dir)
    return {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(out_dir.glob("*/eval.json"), key=lambda p: _natural_key(p.parent.name))
    }


def sweep_table(out_dir: str | Path):
    """One row per evaluated SAE: config (hook, activation, k, afa_coeff, seed, d_sae) + eval metrics."""
    import pandas as pd

    out_dir = Path(out_dir)
    rows = []
    for name, ev in load_evals(out_dir).items():
        cfg = json.loads((out_dir / name / "cfg.json").read_text())
        cfg = cfg.get("cfg", cfg)
        act = cfg.get("activation")
        rows.append(
            {
                "name": name,
                "hook": cfg.get("hook_name"),
                "activation": act,
                "k": cfg.get("k") if act in ("topk", "batchtopk") else None,
                "afa_coeff": cfg.get("afa_coeff") if act == "topafa" else None,
                "l1_coeff": cfg.get("l1_coeff") if act == "relu" else None,
                "seed": cfg.get("seed"),
                "d_sae": cfg.get("d_sae"),
                **{k: v for k, v in ev.items() if k != "l0_hist"},
            }
        )
    return pd.DataFrame(rows)


def _is_finished(folder: Path, cfg: Any, need_eval: bool) -> bool:
    if not (folder / "cfg.json").exists() or not any(folder.glob("*.safetensors")):
        return False
    if need_eval and not (folder / "eval.json").exists():
        return False
    try:  # compare configs without loading the weights
        doc = json.loads((folder / "cfg.json").read_text())
        have = type(cfg).from_dict(doc.get("cfg", doc)) if hasattr(type(cfg), "from_dict") else None
    except Exception:  # noqa: BLE001 - an unreadable folder is simply "not finished"
        return False
    if have is None or _cfg_dict(have) != _cfg_dict(cfg):
        return False
    try:  # the weights must load: checksum matches, all finite (a diverged SAE is never reused)
        _sae_module().SAE.load(folder)
    except (ValueError, OSError) as e:
        warnings.warn(f"{folder} holds an unusable SAE ({e}); retraining it", stacklevel=3)
        return False
    return True


def ensure_sweep(
    configs: Mapping[str, Any],
    batches: Callable[[], Iterable[Mapping[str, Tensor]]] | Iterable[Mapping[str, Tensor]],
    cfg: TrainConfig,
    *,
    eval_batches: Callable[[], Iterable[Mapping[str, Tensor]]] | Iterable[Mapping[str, Tensor]] | None = None,
    data_tag: str | None = None,
) -> dict[str, Any]:
    """Load a finished sweep from ``cfg.out_dir``, training (in one pass) only what is missing.

    A member is finished when its folder holds the saved SAE with the same config, whose
    weights load (checksum and finiteness checked), (and ``eval.json`` when ``eval_batches`` is
    given) and the folder's ``sweep.json`` records the same training settings (tokens, batch size,
    optimiser, schedule, seed), the same code (a fingerprint of saelib's SAE, top-AFA, trainer,
    activation and model modules: results of older code are retrained) and ``data_tag`` (a
    string naming the activation source, e.g. model/corpus/hooks/rows; ``None`` = do not check
    the data, e.g. when a later chapter reuses a sweep it did not build). When those differ the
    whole sweep is retrained (with a warning) rather than silently reusing stale SAEs.
    ``batches`` / ``eval_batches`` may be zero-argument callables so no activations are
    produced when nothing needs training. Returns ``{name: SAE}`` for every name in ``configs``.
    """
    if cfg.out_dir is None:
        raise ValueError("ensure_sweep needs TrainConfig.out_dir (the sweep folder to load from / train into)")
    from saelib.io import FolderInUseError

    try:
        lock = folder_lock(cfg.out_dir, "sweep folder")
        lock.__enter__()
    except FolderInUseError:
        raise
    except OSError as e:  # a read-only folder: fine as long as nothing needs training
        return _ensure_sweep(configs, batches, cfg, eval_batches, data_tag, cannot_write=e)
    try:
        return _ensure_sweep(configs, batches, cfg, eval_batches, data_tag)
    finally:
        lock.__exit__(None, None, None)


def _ensure_sweep(configs, batches, cfg: TrainConfig, eval_batches, data_tag, cannot_write=None) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    stamp = {"train": _identity([], cfg)["train"], "code": code_fingerprint(*TRAINING_CODE), "data_tag": data_tag}
    stamp_path = out_dir / "sweep.json"
    same = False
    if stamp_path.exists():
        try:
            have = json.loads(stamp_path.read_text())
        except ValueError:
            have = {}  # unreadable: retrain rather than trust the folder
        if not isinstance(have, dict):
            have = {}
        want = json.loads(json.dumps(stamp))
        if data_tag is None:  # the caller does not name its data: compare the training settings only
            have.pop("data_tag", None)
            want.pop("data_tag", None)
        same = have == want
    if same:
        missing = {n: c for n, c in configs.items() if not _is_finished(out_dir / n, c, eval_batches is not None)}
    else:
        if any(_is_finished(out_dir / n, c, False) for n, c in configs.items()):
            warnings.warn(
                f"{out_dir} holds SAEs trained with other settings, data or saelib code (sweep.json differs); "
                "retraining the sweep",
                stacklevel=2,
            )
        missing = dict(configs)
    if missing and cannot_write is not None:
        raise cannot_write
    if missing:
        b = batches() if callable(batches) else batches
        e = eval_batches() if callable(eval_batches) else eval_batches
        train_saes(missing, b, cfg, eval_batches=e)
        if data_tag is None and stamp_path.exists():  # keep the data name a previous caller recorded
            try:
                stamp["data_tag"] = json.loads(stamp_path.read_text()).get("data_tag")
            except (ValueError, AttributeError):
                pass
        atomic_write_text(stamp_path, json.dumps(stamp, indent=2))
    return load_saes(out_dir, list(configs))


# --------------------------------------------------------------------------------------------
# the paper's numbers (for comparison tables; never used as targets)
def paper_gpt2_results():
    """The paper's E3 table (moved to :func:`saelib.paper.e3_results`, which names the source)."""
    from saelib.paper import e3_results

    return e3_results()
