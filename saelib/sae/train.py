"""Train many SAEs off one activation stream: metrics, hooks, checkpoints, exact resume, held-out eval.

One pass over a stream of ``dict[hook, Tensor[B, d]]`` batches trains a whole sweep (hook
points x activation rules x k x afa_coeff x seeds), so the language model runs once. Every SAE
has its own Adam optimiser; SAE ``name`` reads ``batch[sae.cfg.hook_name]``. Every SAE in the
package trains through this one step, meta-SAEs included (``saelib.analysis.meta``).

Step order per SAE (:func:`train_step`; Bussmann et al. / the top-AFA paper's code, see below for
the one change)::

    out = sae(x); out.loss.backward()
    clip_grad_norm_ (optional)
    sae.remove_gradient_parallel_to_decoder_directions()   # drop the radial gradient component
    optimizer.step()
    sae.set_decoder_norm_to_unit_norm()                   # rows back on the unit sphere

The paper's code renormalises the rows *before* ``optimizer.step()``, so its rows sit slightly
off the unit sphere between steps (which is why its top-AFA rule multiplies by row norms). We
renormalise after the step, so the rows are unit norm whenever the SAE is used, saved or
evaluated; the sequence of updates is otherwise the same.

Metric records, every ``log_every`` steps, over the tokens since the previous record (to
``<out_dir>/<name>/metrics.jsonl`` and to the hooks; ``eval.json`` on held-out tokens), in the one
vocabulary of :mod:`saelib.sae.metrics`:

* ``nmse`` -- ``mean_t ||x_t - x_hat_t||^2 / ||x_t||^2`` (model space). With the paper's per-token
  standardisation ``||x_t||^2 = d - 1``, so this is the paper's "Normalized MSE" up to d/(d-1);
  the SAE's ``mse_loss`` (its normalised space) is logged too, and for ``input_norm="token"`` it
  *is* the paper's ``l2_loss``.
* ``fvu`` -- ``sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - x_bar||^2``, sums and ``x_bar`` (the
  per-dimension mean) over the window's tokens (training) or over the whole eval set.
* ``l0`` -- mean non-zero latents per token; ``l0_p10/p50/p90/min/max`` its per-token quantiles.
* ``dead`` / ``dead_frac`` -- latents silent on the last ``dead_window_tokens`` training tokens
  (``null`` until that many tokens were seen).
* every scalar ``*_loss`` of the SAE's output; ``lr``; ``tokens_per_s`` (the whole trainer).
* ``eps_max`` / ``eps_mean`` -- max and mean |cos| between distinct decoder rows, every
  ``eps_every`` steps (:func:`saelib.sae.geometry.pair_cosines`, blockwise).

Hooks: ``train_saes(..., hooks=[h])`` calls ``h(step, records)`` after every record, with
``records = {name: record}``; a hook returning True stops training there (the SAEs are then
finished as after the last step: threshold, save, eval). :class:`EarlyStopping` is such a hook.
On resume the records already in ``metrics.jsonl`` are replayed to the hooks first, so a
stateful hook decides as in an uninterrupted run.

Exact resume from ``<out_dir>/checkpoint.pt``, bit-identical to an uninterrupted run: see
:mod:`saelib.sae.train_files`, which owns the run folder's files.

Reliability: one process writes a run folder at a time (an advisory lock; a second gets an
error naming the holder's pid). Training stops at the first non-finite loss (on CPU at once; on
a GPU at the next log or checkpoint step, without a host sync per step) with
:class:`TrainingDivergedError` naming the SAE, the step and the likely causes; non-finite weights
are never checkpointed, saved or returned, and metrics are never written as ``null``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
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
from tqdm.auto import tqdm

from saelib.io import atomic_write_text, folder_lock
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.geometry import pair_cosines
from saelib.sae.metrics import ReconstructionMetrics, held_out_metrics
from saelib.sae.train_files import (CHECKPOINT, METRICS, append_jsonl, batch_fingerprint, load_checkpoint, open_logs,
                                    save_checkpoint, write_combined_csv)

__all__ = ["TrainConfig", "TrainingDivergedError", "EarlyStopping", "make_adam", "train_step", "train_saes"]

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+=-]+$")


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
    """Resume from ``<out_dir>/checkpoint.pt`` when it exists (see :mod:`saelib.sae.train_files`)."""
    out_dir: str | Path | None = None
    """Folder for ``<name>/metrics.jsonl``, ``<name>/eval.json``, final SAEs and ``metrics.csv``;
    None keeps everything in memory (no files, no checkpoints; hooks still get the records)."""
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
        for name in ("batch_size", "n_tokens", "log_every", "eps_every", "eps_block", "dead_window_tokens",
                     "checkpoint_every", "warmup_steps", "decay_steps", "threshold_batches"):
            v, lo = getattr(self, name), int(name not in ("eps_every", "checkpoint_every", "warmup_steps", "decay_steps"))
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")
        if self.batchtopk_threshold not in ("final", "ema"):
            raise ValueError(f"TrainConfig.batchtopk_threshold must be 'final' or 'ema', got {self.batchtopk_threshold!r}")
        if self.n_tokens < self.batch_size:
            raise ValueError(f"TrainConfig.n_tokens ({self.n_tokens}) is smaller than batch_size ({self.batch_size}): "
                             "no step would run; raise n_tokens or lower batch_size")
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
            raise ValueError(f"TrainConfig.warmup_steps + decay_steps ({self.warmup_steps} + {self.decay_steps}) exceeds "
                             f"the {self.n_steps} training steps (n_tokens // batch_size); shorten the schedule or add tokens")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be > 0 or None (no clipping), got {self.grad_clip!r}")
        if self.eps_every and self.eps_every % self.log_every:
            raise ValueError(f"TrainConfig.eps_every ({self.eps_every}) must be a multiple of log_every ({self.log_every}) "
                             "so each epsilon lands in a metrics record; e.g. eps_every = 10 * log_every")
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
# the training step and each SAE's state
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


def train_step(sae: SAE, opt: torch.optim.Optimizer, x: Tensor, *, grad_clip: float | None = None,
               check: Callable[[Tensor], None] | None = None) -> Any:
    """One optimiser step of ``sae`` on the batch ``x`` in the order of the module docstring; returns
    the SAE's output. ``check(loss)`` runs between the forward and the backward pass."""
    out = sae(x)
    if check is not None:
        check(out.loss.detach())
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    return out


class _Run:
    """One SAE being trained: model, optimiser, counters and the current metrics window."""

    def __init__(self, name: str, sae: torch.nn.Module, cfg: TrainConfig, device: torch.device):
        self.name, self.sae, self.hook, self.d_sae = name, sae, sae.cfg.hook_name, int(sae.cfg.d_sae)
        self.opt = make_adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
        # tokens since each latent last fired (trainer-side, for the `dead` metric)
        self.since_fired = torch.zeros(self.d_sae, dtype=torch.long, device=device)
        self.tokens_seen = 0
        # first step with a non-finite loss (-1: none); tracked on the device, read at check points
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.reset_window(device)

    def reset_window(self, device: torch.device) -> None:
        # accumulated on the device without .item(): one sync per log record
        self.acc: dict[str, Tensor] = {}  # the step losses, summed
        self.window = ReconstructionMetrics(self.d_sae, shape=False)  # nmse, fvu, l0 ... of the window's tokens
        self.n_steps_window = 0

    def add(self, key: str, value: Tensor) -> None:
        v = value.detach().double()
        self.acc[key] = self.acc[key] + v if key in self.acc else v

    def state(self) -> dict[str, Any]:
        return {"model": self.sae.state_dict(), "optim": self.opt.state_dict(), "since_fired": self.since_fired,
                "tokens_seen": self.tokens_seen, "acc": self.acc, "window": self.window.state_dict(),
                "n_steps_window": self.n_steps_window}

    def load_state(self, st: Mapping[str, Any]) -> None:
        self.sae.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optim"])
        self.since_fired.copy_(st["since_fired"])
        self.tokens_seen = int(st["tokens_seen"])
        self.acc = {k: v.to(self.since_fired.device).clone() for k, v in st["acc"].items()}
        self.window.load_state_dict(st["window"])
        self.n_steps_window = int(st["n_steps_window"])


def _prepare_saes(saes: Mapping[str, Any], device: torch.device) -> dict[str, torch.nn.Module]:
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("train_saes needs a non-empty dict {name: SAEConfig | SAE}; e.g. sweep_configs(...)")
    out: dict[str, torch.nn.Module] = {}
    for name, obj in saes.items():
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"SAE name {name!r} is not a valid folder name: use letters, digits and . _ - + = only "
                             "(sweep_name() builds valid names)")
        sae = SAE(obj) if isinstance(obj, SAEConfig) else obj
        if not isinstance(sae, SAE):
            raise ValueError(f"saes[{name!r}] is a {type(obj).__name__}; expected saelib.sae.core.SAEConfig or SAE")
        if not getattr(sae.cfg, "hook_name", None):
            raise ValueError(f"saes[{name!r}].cfg.hook_name is empty: set it to the batch key the SAE reads, "
                             "e.g. 'blocks.6.hook_resid_pre'")
        out[name] = sae.to(device)
    return out


@torch.no_grad()
def _init_from_first_batch(runs: list[_Run], batch: Mapping[str, Tensor], device: torch.device) -> None:
    """input_norm="global" fits its scale unless it was set beforehand; SAEConfig.b_dec_init sets
    b_dec where it is still all zero (a passed-in, already trained SAE keeps its own)."""
    for r in runs:
        x = batch[r.hook].to(device=device, dtype=r.sae.W_dec.dtype)
        if r.sae.cfg.input_norm == "global" and float(r.sae.input_scale) == 1.0:
            r.sae.fit_input_norm(x)
        if getattr(r.sae.cfg, "b_dec_init", "zeros") != "zeros" and not bool(r.sae.b_dec.any()):
            r.sae.init_b_dec(x)


def _check_batch(batch: Any, runs: list[_Run], cfg: TrainConfig) -> bool:
    """Validate a stream batch; returns False for a short batch to drop."""
    if not isinstance(batch, Mapping):
        raise ValueError(f"the batch stream yielded a {type(batch).__name__}; expected dict[hook, Tensor[B, d]] "
                         "(ActivationCache.iter_batches / tensor_batches produce these)")
    sizes = set()
    for r in runs:
        if r.hook not in batch:
            raise ValueError(f"SAE {r.name!r} reads hook {r.hook!r} but the batch has only {sorted(batch)}; "
                             "add that hook to the activation source or fix SAEConfig.hook_name")
        x = batch[r.hook]
        d_in = int(r.sae.cfg.d_in)
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"batch[{r.hook!r}] has shape {tuple(x.shape)} but SAE {r.name!r} expects [B, {d_in}] "
                             "(flatten [B, S, d] activations to tokens first)")
        sizes.add(x.shape[0])
    if len(sizes) != 1:
        raise ValueError(f"hooks in one batch have different token counts {sorted(sizes)}; they must match")
    (b,) = sizes
    if b > cfg.batch_size:
        raise ValueError(f"the stream yielded a batch of {b} tokens but TrainConfig.batch_size is {cfg.batch_size}; "
                         "make the source yield batch_size rows (e.g. iter_batches(hooks, batch_size=cfg.batch_size))")
    return b == cfg.batch_size


# --------------------------------------------------------------------------------------------
# metrics: the trainer's one accumulator (_accumulate adds a step, _window_record reads a window;
# reconstruction and sparsity go through saelib.sae.metrics, the vocabulary eval.json uses too; the
# state lives in _Run.acc / window / n_steps_window and is checkpointed with it)
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def _accumulate(run: _Run, x: Tensor, out: Any) -> None:
    # l0_tokens [B] is counted by the forward pass without an [B, d_sae] temporary
    run.window.add(x, out.x_hat, l0=out.l0_tokens)
    for k, v in out._asdict().items():  # every scalar *loss of the output
        if k.endswith("loss") and isinstance(v, Tensor) and v.numel() == 1:
            run.add(k, v)
    run.n_steps_window += 1
    run.since_fired += x.shape[0]
    run.since_fired[out.fired] = 0
    run.tokens_seen += x.shape[0]


WINDOW_METRICS = ("nmse", "fvu", "l0", "l0_p10", "l0_p50", "l0_p90", "l0_min", "l0_max")
"""The :class:`~saelib.sae.metrics.ReconstructionMetrics` names each training record carries (over
the window's tokens); ``dead``/``dead_frac`` are the trainer's own (over ``dead_window_tokens``)."""


def _window_record(run: _Run, cfg: TrainConfig, step: int, tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    keys = list(run.acc)
    vals = torch.stack([run.acc[k] for k in keys]).cpu().tolist() if keys else []
    n = max(run.n_steps_window, 1)
    rec: dict[str, Any] = {"step": step, "tokens": tokens}
    rec.update({k: v / n for k, v in zip(keys, vals)})
    window = run.window.result()
    rec.update({k: window[k] for k in WINDOW_METRICS if k in window})
    dead = int((run.since_fired >= cfg.dead_window_tokens).sum()) if run.tokens_seen >= cfg.dead_window_tokens else None
    rec["dead"], rec["dead_frac"] = dead, None if dead is None else dead / run.d_sae
    rec.update(extra)
    bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:  # never written as null: a non-finite metric means the run diverged
        raise TrainingDivergedError(f"SAE {run.name!r}: metrics {bad} are non-finite at step {step}; " + _DIVERGED_ADVICE)
    return rec


def _log_all(runs: list[_Run], cfg: TrainConfig, out_dir: Path | None, step: int, tokens: int, lr: float,
             tokens_per_s: float, wb: Any, pbar: Any) -> dict[str, dict[str, Any]]:
    """One record per SAE (the window since the last record), appended to its metrics.jsonl when
    there is an ``out_dir``; resets the windows and returns ``{name: record}``."""
    do_eps = bool(cfg.eps_every) and (step % cfg.eps_every == 0 or step == cfg.n_steps)
    records: dict[str, dict[str, Any]] = {}
    for r in runs:
        extra: dict[str, Any] = {"lr": lr, "tokens_per_s": tokens_per_s}
        if do_eps:
            eps = pair_cosines(r.sae.W_dec, block_size=cfg.eps_block)
            extra["eps_max"], extra["eps_mean"] = eps.max, eps.mean
        rec = records[r.name] = _window_record(r, cfg, step, tokens, extra)
        r.reset_window(r.since_fired.device)
        if out_dir is not None:
            append_jsonl(out_dir / r.name / METRICS, rec)
    if wb is not None:
        wb.log({f"{n}/{k}": v for n, rec in records.items() for k, v in rec.items() if v is not None}, step=step)
    if pbar is not None and len(runs) == 1:
        (rec,) = records.values()
        pbar.set_postfix(loss=f"{rec.get('loss', float('nan')):.3g}", l0=f"{rec.get('l0', 0):.1f}")
    return records


# --------------------------------------------------------------------------------------------
# hooks
# --------------------------------------------------------------------------------------------
class EarlyStopping:
    """A training hook: stop once ``metric`` has stopped improving, for every SAE it watches.

    At each record it compares the mean of the last ``window`` records of ``metric`` with the mean
    of the ``window`` records before; an improvement (a decrease, or an increase with
    ``higher_is_better``) below ``min_improvement`` -- relative to the earlier mean when
    ``relative``, absolute otherwise -- is a stall. Training stops at the ``patience``-th stall in
    a row of every watched SAE (``names``; None = all), never before ``min_step``. ``converged``
    and ``stopped_at`` tell what happened."""

    def __init__(self, metric: str = "fvu", *, min_improvement: float = 1e-3, relative: bool = True,
                 window: int = 1, patience: int = 1, min_step: int = 0, higher_is_better: bool = False,
                 names: Iterable[str] | None = None) -> None:
        for field, v, lo in (("window", window, 1), ("patience", patience, 1), ("min_step", min_step, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"EarlyStopping.{field} must be an integer >= {lo}, got {v!r}")
        if not (isinstance(min_improvement, (int, float)) and min_improvement >= 0):
            raise ValueError(f"EarlyStopping.min_improvement must be a number >= 0, got {min_improvement!r}")
        self.metric, self.min_improvement, self.relative = metric, float(min_improvement), relative
        self.window, self.patience, self.min_step = window, patience, min_step
        self.sign = 1.0 if higher_is_better else -1.0
        self.names = None if names is None else set(names)
        self.values: dict[str, list[float]] = {}
        self.stalls: dict[str, int] = {}
        self.converged, self.stopped_at = False, None

    def __call__(self, step: int, records: Mapping[str, Mapping[str, Any]]) -> bool:
        for name, rec in records.items():
            if self.names is not None and name not in self.names:
                continue
            v = rec.get(self.metric)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"EarlyStopping watches {self.metric!r}, but SAE {name!r}'s record at step {step} "
                                 f"has {v!r}; pick a logged metric (e.g. 'fvu', 'nmse', 'loss')")
            vals = self.values.setdefault(name, [])
            vals.append(float(v))
            w = self.window
            if len(vals) < 2 * w:
                continue
            before, last = sum(vals[-2 * w:-w]) / w, sum(vals[-w:]) / w
            gain = self.sign * (last - before)
            if self.relative:
                gain /= max(abs(before), 1e-12)
            self.stalls[name] = self.stalls.get(name, 0) + 1 if gain < self.min_improvement else 0
        watched = [n for n in records if self.names is None or n in self.names]
        if step >= self.min_step and watched and all(self.stalls.get(n, 0) >= self.patience for n in watched):
            self.converged, self.stopped_at = True, step
        return self.converged


# --------------------------------------------------------------------------------------------
# non-finite stop: the loss is watched every step, weights before every save
# --------------------------------------------------------------------------------------------
class TrainingDivergedError(FloatingPointError):
    """Training produced a non-finite loss, metric or weight; nothing of it was saved."""


_DIVERGED_ADVICE = ("training stopped and the diverged weights were not saved. Likely causes: a learning rate too high "
                    "for the input scale (lower TrainConfig.lr, add warmup_steps or grad_clip), inputs with a large or "
                    "uneven norm (SAEConfig.input_norm='global' or 'token'), or NaN/inf in the activations.")


def _check_finite(runs: list[_Run], cfg: TrainConfig, n_done: int, *, weights: bool) -> None:
    """Raise :class:`TrainingDivergedError` when some SAE had a non-finite loss (or weight)."""
    for r in runs:
        bad = int(r.bad_step)
        bad_w = [n for n, p in r.sae.named_parameters() if not bool(torch.isfinite(p).all())] if weights else []
        if bad >= 0:
            raise TrainingDivergedError(f"SAE {r.name!r} diverged: its loss became non-finite (NaN/inf) at step {bad} "
                                        f"(0-based, lr {cfg.lr_at(bad):.3g}); " + _DIVERGED_ADVICE)
        if bad_w:
            raise TrainingDivergedError(f"SAE {r.name!r} diverged: its weights {bad_w} are non-finite after step "
                                        f"{n_done}; " + _DIVERGED_ADVICE)


def _watch_loss(runs: list[_Run], r: _Run, cfg: TrainConfig, step: int, loss: Tensor) -> None:
    """Record ``r``'s first non-finite loss: on CPU raise at once (before the step spoils the
    weights); elsewhere without a host sync per step, read at the next check point."""
    finite = torch.isfinite(loss)
    if loss.device.type == "cpu":
        if not bool(finite):
            r.bad_step.fill_(step)
            _check_finite(runs, cfg, step, weights=False)
    else:
        r.bad_step = torch.where(~finite & (r.bad_step < 0), step, r.bad_step)


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------
def _lazy_wandb(cfg: TrainConfig, names: list[str]):
    if not cfg.wandb_project:
        return None
    try:
        import wandb  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError("TrainConfig.wandb_project is set but wandb is not installed: pip install wandb, or set it to None") from e
    return wandb.init(project=cfg.wandb_project, config={"train": cfg.to_dict(), "saes": names})


def train_saes(saes: Mapping[str, Any], batches: Iterable[Mapping[str, Tensor]], cfg: TrainConfig,
               eval_batches: Iterable[Mapping[str, Tensor]] | None = None, *,
               hooks: Iterable[Callable[[int, dict[str, dict[str, Any]]], bool]] = ()) -> dict[str, torch.nn.Module]:
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
        hooks: ``hook(step, {name: record}) -> bool`` after every record (module docstring), e.g.
            :class:`EarlyStopping`; True stops training.

    Files under ``cfg.out_dir``: ``<name>/metrics.jsonl``, ``<name>/sae.safetensors`` +
    ``cfg.json`` (``SAE.save``), ``<name>/eval.json``, ``metrics.csv`` (all SAEs, all records),
    ``train.json`` (the TrainConfig) and, while training, ``checkpoint.pt``.
    """
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
    if batches is None or not isinstance(batches, Iterable):
        raise ValueError("batches must be an iterable of dict[hook, Tensor[B, d]] (e.g. ActivationCache.iter_batches(...))")
    hooks = list(hooks)
    if not all(callable(h) for h in hooks):
        raise ValueError("hooks must be callables hook(step, records) -> bool, e.g. [EarlyStopping('fvu')]")
    if cfg.out_dir is None:
        return _train(saes, batches, cfg, eval_batches, hooks)
    with folder_lock(cfg.out_dir, "run folder"):  # one writer per run folder
        return _train(saes, batches, cfg, eval_batches, hooks)


def _train(saes, batches, cfg: TrainConfig, eval_batches, hooks: list) -> dict[str, torch.nn.Module]:
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
            step, tokens, stream = load_checkpoint(ckpt_path, runs, cfg)

    n_steps = cfg.n_steps
    hook_points = [r.hook for r in runs]
    it: Iterator = iter(batches)
    # the last training batches of each BatchTopK hook, for the final inference threshold
    calib_hooks = sorted({r.hook for r in runs if r.sae.rule.calibrates}) \
        if cfg.batchtopk_threshold == "final" else []
    recent: collections.deque = collections.deque(maxlen=cfg.threshold_batches)
    skipped = 0  # replay the stream up to where the checkpoint left it
    while skipped < step:
        try:
            b = next(it)
        except StopIteration:
            raise ValueError(f"cannot resume at step {step}: the batch stream ended after {skipped} batches; "
                             "pass the same (fresh) batch iterable as the interrupted run") from None
        if _check_batch(b, runs, cfg):
            for key, at in (("first", 0), ("last", stream.get("last_step", 0) - 1)):
                if skipped == at and stream.get(key) != batch_fingerprint(b, hook_points):
                    raise ValueError(f"cannot resume {ckpt_path} at step {step}: batch {at} of this stream differs from "
                                     "the one the checkpoint was trained on (another dataset, seed, order or dtype). Pass "
                                     "the same (fresh) batch iterable as the interrupted run, or start over with "
                                     "TrainConfig(resume=False)")
            skipped += 1
            if calib_hooks:
                recent.append({h: b[h] for h in calib_hooks})

    stop = False
    if out_dir is not None:  # written only once the checkpoint and the stream are known to belong to this run
        atomic_write_text(out_dir / "train.json", json.dumps(cfg.to_dict(), indent=2))
        replay = open_logs(out_dir, [r.name for r in runs], step)
        for s_, recs in sorted(replay.items()):  # hooks see the records of the resumed steps first
            stop = _call_hooks(hooks, s_, recs) or stop

    wb = _lazy_wandb(cfg, [r.name for r in runs])
    pbar = tqdm(total=n_steps, initial=step, desc=f"training {len(runs)} SAE(s)", unit="step") if cfg.progress else None
    logging = out_dir is not None or bool(hooks)
    t_window, tok_window = time.perf_counter(), 0
    for r in runs:
        r.sae.train()
    try:
        while step < n_steps and not stop:
            try:
                batch = next(it)
            except StopIteration:
                warnings.warn(f"the batch stream ended after {step} of {n_steps} steps ({tokens} tokens); the SAEs are "
                              "saved as they are. Pass more batches (e.g. epochs=...) to train the full n_tokens", stacklevel=2)
                break
            if not _check_batch(batch, runs, cfg):
                continue  # drop a short trailing batch
            if step == 0:
                _init_from_first_batch(runs, batch, device)
                if ckpt_path is not None:
                    stream["first"] = batch_fingerprint(batch, hook_points)
            if calib_hooks:
                recent.append({h: batch[h] for h in calib_hooks})
            lr = cfg.lr_at(step)
            for r in runs:
                x = batch[r.hook].to(device=device, dtype=r.sae.W_dec.dtype, non_blocking=True)
                for g in r.opt.param_groups:
                    g["lr"] = lr
                out = train_step(r.sae, r.opt, x, grad_clip=cfg.grad_clip, check=functools.partial(_watch_loss, runs, r, cfg, step))
                _accumulate(r, x, out)
            step += 1
            tokens += cfg.batch_size
            tok_window += cfg.batch_size

            if logging and (step % cfg.log_every == 0 or step == n_steps):
                _check_finite(runs, cfg, step, weights=True)
                recs = _log_all(runs, cfg, out_dir, step, tokens, lr,
                                tok_window / max(time.perf_counter() - t_window, 1e-9), wb, pbar)
                t_window, tok_window = time.perf_counter(), 0
                stop = _call_hooks(hooks, step, recs)
            if (ckpt_path is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                    and step < n_steps and not stop):
                _check_finite(runs, cfg, step, weights=True)  # a checkpoint never holds diverged weights
                stream.update(last=batch_fingerprint(batch, hook_points), last_step=step)
                save_checkpoint(ckpt_path, runs, cfg, step, tokens, stream)
            if pbar is not None:
                pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()
    _check_finite(runs, cfg, step, weights=True)  # non-finite weights are never saved or returned
    if logging and runs[0].n_steps_window:  # the stream ended mid-window: log the rest
        _call_hooks(hooks, step, _log_all(runs, cfg, out_dir, step, tokens, cfg.lr_at(max(step - 1, 0)),
                                          tok_window / max(time.perf_counter() - t_window, 1e-9), wb, None))

    if calib_hooks and recent:
        with torch.no_grad():
            for r in runs:
                if r.sae.rule.calibrates:
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
        write_combined_csv(out_dir)
        if ckpt_path.exists() and not cfg.keep_checkpoint:
            ckpt_path.unlink()
    if wb is not None:
        wb.finish()
    return result


def _call_hooks(hooks: list, step: int, records: dict[str, dict[str, Any]]) -> bool:
    """Run every hook (all of them, even after one asks to stop); True when one asks to stop."""
    return any([bool(h(step, records)) for h in hooks])
