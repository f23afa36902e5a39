"""Evaluate any SAE on held-out tokens: reconstruction, sparsity, spliced-in CE/KL and ZF statistics.

Reconstruction and sparsity metrics are those of :mod:`saelib.sae.metrics` (``nmse``, ``fvu``,
``mse``, ``cosine``, ``l2_ratio``, ``l0``, ``dead``, ...), streamed batch by batch and exact for
any batch split. Every non-BOS token of every evaluation row counts (not one token per sequence
as in the paper's ZF notebook). This module adds (``z`` = the dense hook activation of a token):

- CE loss: next-token cross-entropy with the hook activation replaced (at every non-BOS
  position) by the SAE's reconstruction (``ce_sae``), by zeros (``ce_zero_abl``) or by the mean
  activation (``ce_mean_abl``), and without intervention (``ce_clean``).
  ``ce_recovered_{zero,mean} = (CE_abl − CE_sae) / (CE_abl − CE_clean)``.
- KL: per-token ``KL(p_clean ‖ p_spliced)``; ``kl_score = (KL_zero_abl − KL_sae) / KL_zero_abl``.
- ZF statistics (``saelib.analysis.afa.zf_stats``): per token ``‖z‖``, ``‖f̃‖``, their ratio and
  εLBO; ``zf_ratio_median``, ``zf_frac_over``, ``eps_lbo_median``.

CE and KL come in two conventions (``convention=``): ours ("saelib": BOS never spliced or
ablated, CE/KL over the predictions from positions 1..S−2) and SAELens'/SAEBench's ("saelens":
every position spliced or ablated, CE over positions 0..S−2, KL over every position). They differ
for the same SAE; say which one a table uses.

Across seeds and in the paper's table formats: :mod:`saelib.analysis.tables`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from saelib.analysis.afa import to_decoder_space, zf_stats
from saelib.interop import from_saelens
from saelib.io import atomic_write_text
from saelib.lm.activations import harvest
from saelib.lm.models import check_hook, model_device
from saelib.sae.metrics import ReconstructionMetrics

__all__ = [
    "EvalResult",
    "evaluate_sae",
    "evaluate_saes",
    "massive_tokens",
    "massive_summary",
    "MassiveTokens",
    "CONVENTIONS",
    "mean_activation",
    "reconstruction_metrics",
    "results_frame",
    "sae_hook_name",
]


# --------------------------------------------------------------------------------------------
# SAE adapter: saelib SAEs and SAELens SAEs expose the same encode/decode/W_dec/b_dec surface.
# --------------------------------------------------------------------------------------------


def _cfg_get(sae: Any, name: str, default: Any = None) -> Any:
    cfg = getattr(sae, "cfg", None)
    if cfg is None:
        return default
    value = getattr(cfg, name, None)
    if value is None and hasattr(cfg, "metadata"):
        # SAELens >= 6 keeps hook_name / model_name in cfg.metadata.
        value = getattr(cfg.metadata, name, None)
    if value is None and isinstance(cfg, Mapping):
        value = cfg.get(name)
    return default if value is None else value


def sae_hook_name(sae: Any) -> str | None:
    """The hook an SAE was trained on (saelib ``cfg.hook_name`` or SAELens ``cfg.metadata.hook_name``)."""
    return _cfg_get(sae, "hook_name")


def _as_sae(sae: Any) -> Any:
    """Accept a saelib SAE, a SAELens SAE, or anything with ``encode``/``decode``/``W_dec``."""
    if type(sae).__module__.startswith("sae_lens"):
        # The interop converter keeps SAELens preprocessing (normalisation, b_dec on input, decoder-norm
        # rescaling) by folding it into an equivalent saelib SAE.
        return from_saelens(sae, device=str(sae.W_dec.device))
    for attr in ("encode", "decode", "W_dec", "b_dec"):
        if not hasattr(sae, attr):
            raise ValueError(
                f"{type(sae).__name__} has no `{attr}`: evaluate a saelib SAE, a SAELens SAE, or an "
                "nn.Module with encode(x) -> acts, decode(acts) -> x_hat, W_dec [d_sae, d_in], b_dec [d_in]."
            )
    return sae


@contextmanager
def _eval_mode(module: Any):
    """Put an SAE in eval mode (BatchTopK uses its inference threshold there), then restore."""
    was = getattr(module, "training", False)
    if hasattr(module, "eval"):
        module.eval()
    try:
        yield module
    finally:
        if was and hasattr(module, "train"):
            module.train()


def _d_in(sae: Any) -> int:
    return int(sae.W_dec.shape[-1])


def _d_sae(sae: Any) -> int:
    return int(sae.W_dec.shape[0])


@torch.no_grad()
def _encode_decode(sae: Any, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [N, d_sae] and x_hat [N, d_in] in the activation space of ``z``."""
    zs = z.to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)
    acts = sae.encode(zs)
    try:  # saelib SAEs with per-token input standardisation need x to undo it
        x_hat = sae.decode(acts, x=zs)
    except TypeError:
        x_hat = sae.decode(acts)
    return acts, x_hat


# --------------------------------------------------------------------------------------------
# ZF statistics (saelib.analysis.afa.zf_stats), normalised to a dict of per-token numpy arrays.
# --------------------------------------------------------------------------------------------




def _zf_batch(sae: Any, z: torch.Tensor, acts: torch.Tensor) -> dict[str, np.ndarray]:
    zd = to_decoder_space(sae, z.to(acts.device))
    stats = zf_stats(zd.float(), acts.float(), sae.W_dec.detach(), sae.b_dec.detach())
    out = {}
    for key, value in stats._asdict().items():
        if isinstance(value, torch.Tensor) and value.ndim == 1:
            out[key] = value.detach().float().cpu().numpy()
    return out


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Everything one evaluation produced: scalar metrics and per-token arrays.

    Per-token arrays cover the ``n_tokens`` evaluated (non-BOS) tokens in row-major order; the
    per-token CE/KL arrays cover next-token predictions made from those positions that have a
    next token, so they are ``n_rows`` shorter.
    """

    name: str
    """A label (the SAE's sweep name, or the class name)."""
    hook: str | None
    """The hook the SAE read from and (for CE/KL) was spliced into."""
    n_tokens: int
    """Number of evaluated tokens; also the window of ``dead``, in tokens."""
    d_in: int
    """Input width of the SAE (= the hook's d_model)."""
    d_sae: int
    """Dictionary size h."""
    metrics: dict[str, float]
    """Scalar metrics (names: saelib.sae.metrics and the module docstring)."""
    l0: np.ndarray
    """int32 [n_tokens]: active latents per token."""
    nmse: np.ndarray
    """float32 [n_tokens]: ‖z − ẑ‖² / ‖z‖² per token."""
    latent_freq: np.ndarray
    """float32 [d_sae]: fraction of evaluated tokens on which each latent is active."""
    zf: dict[str, np.ndarray] = field(default_factory=dict)
    """Per-token ZF statistics from saelib.analysis.afa.zf_stats (e.g. norm_z, norm_f, ratio, eps_lbo)."""
    kl: np.ndarray | None = None
    """float32 [n_predictions]: KL(clean ‖ SAE-spliced) per predicted token, when CE was run."""
    ce_delta: np.ndarray | None = None
    """float32 [n_predictions]: CE_sae − CE_clean per predicted token, when CE was run."""
    info: dict[str, Any] = field(default_factory=dict)
    """The SAE's configuration fields worth tabulating (activation, k, afa_coeff, seed, layer...)."""
    l0_hist: list[int] = field(default_factory=list)
    """Tokens per L0 value, trimmed after the largest L0."""

    def record(self) -> dict[str, Any]:
        """What ``eval.json`` holds: the scalar metrics and ``l0_hist``."""
        return {**{k: v.item() if isinstance(v, np.generic) else v for k, v in self.metrics.items()},
                "l0_hist": list(self.l0_hist)}

    def summary(self) -> dict[str, Any]:
        """One flat dict (a DataFrame row): identity, SAE configuration, scalar metrics."""
        row: dict[str, Any] = {"name": self.name, "hook": self.hook, "n_tokens": self.n_tokens,
                               "d_in": self.d_in, "d_sae": self.d_sae}
        row.update(self.info)
        row.update(self.metrics)
        return row

    def to_frame(self) -> pd.DataFrame:
        """The summary as a one-row DataFrame."""
        return pd.DataFrame([self.summary()])

    def per_token_frame(self) -> pd.DataFrame:
        """Per-token arrays (L0, NMSE and the ZF statistics) as a DataFrame with n_tokens rows."""
        cols = {"l0": self.l0, "nmse": self.nmse}
        cols.update({k: v for k, v in self.zf.items() if len(v) == self.n_tokens})
        return pd.DataFrame(cols)


def results_frame(results: Iterable[EvalResult]) -> pd.DataFrame:
    """Stack the summaries of many results into one DataFrame (one row per SAE)."""
    return pd.DataFrame([r.summary() for r in results])


def _sae_info(sae: Any, hook: str | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for key in ("activation", "k", "afa_coeff", "l1_coeff", "seed", "input_norm", "model_name"):
        value = _cfg_get(sae, key)
        if value is not None and not isinstance(value, (dict, list)):
            info[key] = value
    if "activation" not in info:
        arch = _cfg_get(sae, "architecture")
        if callable(arch):
            arch = arch()
        if arch is not None:
            info["activation"] = str(arch)
    if hook is not None:
        try:
            info["layer"] = int(hook.split(".")[1])
        except (IndexError, ValueError):
            pass
    return info


# --------------------------------------------------------------------------------------------
# Streamed accumulation: saelib.sae.metrics.ReconstructionMetrics plus ZF and CE/KL sums
# --------------------------------------------------------------------------------------------


class _Accumulator:
    """One SAE's evaluation: reconstruction metrics, per-token ZF statistics and CE/KL sums."""

    def __init__(self, d_sae: int, zf: bool, dense_threshold: float):
        self.zf = zf
        self.rec = ReconstructionMetrics(d_sae, keep_tokens=True, dense_threshold=dense_threshold)
        self.zf_parts: list[dict[str, np.ndarray]] = []
        self.ce: dict[str, float] = {}
        self.n_pred = 0
        self.n_kl = 0
        self.kl_parts: list[np.ndarray] = []
        self.ce_delta_parts: list[np.ndarray] = []

    def add(self, sae: Any, z: torch.Tensor, acts: torch.Tensor, x_hat: torch.Tensor) -> None:
        """z, x_hat [n, d_in]; acts [n, d_sae]."""
        if z.shape[0] == 0:
            return
        self.rec.add(z.to(acts.device), x_hat, acts)
        if self.zf:
            self.zf_parts.append(_zf_batch(sae, z, acts))

    def add_ce(self, ce: dict[str, torch.Tensor], kl: dict[str, torch.Tensor]) -> None:
        """ce[name], kl[name]: per-prediction tensors [m] for clean / sae / zero_abl / mean_abl."""
        self.n_pred += int(ce["clean"].numel())
        self.n_kl += int(kl["sae"].numel())
        for prefix, parts in (("ce", ce), ("kl", kl)):
            for key, value in parts.items():
                self.ce[f"{prefix}_{key}"] = self.ce.get(f"{prefix}_{key}", 0.0) + float(value.double().sum())
        self.kl_parts.append(kl["sae"].float().cpu().numpy())
        self.ce_delta_parts.append((ce["sae"] - ce["clean"]).float().cpu().numpy())

    def result(self, name: str, hook: str | None, d_in: int, d_sae: int, info: dict) -> EvalResult:
        if self.rec.n == 0:
            raise ValueError("No tokens were evaluated: pass at least one row with a non-BOS token.")
        metrics: dict[str, Any] = self.rec.result()
        tok = self.rec.tokens()
        zf: dict[str, np.ndarray] = {}
        if self.zf_parts:
            zf = {key: np.concatenate([p[key] for p in self.zf_parts]) for key in self.zf_parts[0]}
            if "ratio" not in zf and "norm_f" in zf and "norm_z" in zf:
                zf["ratio"] = (zf["norm_f"] / np.maximum(zf["norm_z"], 1e-30)).astype(np.float32)
            if "ratio" in zf:
                metrics["zf_ratio_median"] = float(np.median(zf["ratio"]))
                metrics["zf_frac_over"] = float((zf["ratio"] > 1).mean())
            if "eps_lbo" in zf:
                metrics["eps_lbo_median"] = float(np.median(zf["eps_lbo"]))
        kl_arr = ce_delta = None
        if self.n_pred:
            for key, total in self.ce.items():
                metrics[key] = total / (self.n_kl if key.startswith("kl_") else self.n_pred)
            clean, sae_ce = metrics["ce_clean"], metrics["ce_sae"]
            for abl in ("zero", "mean"):
                ab = metrics.get(f"ce_{abl}_abl")
                if ab is not None:
                    metrics[f"ce_recovered_{abl}"] = (ab - sae_ce) / (ab - clean) if ab != clean else float("nan")
            kz = metrics.get("kl_zero_abl")
            metrics["kl_score"] = (kz - metrics["kl_sae"]) / kz if kz else float("nan")
            kl_arr, ce_delta = np.concatenate(self.kl_parts), np.concatenate(self.ce_delta_parts)
        return EvalResult(name=name, hook=hook, n_tokens=int(self.rec.n), d_in=d_in, d_sae=d_sae,
                          metrics=metrics, l0=tok["l0"], nmse=tok["nmse"],
                          latent_freq=self.rec.latent_freq.float().numpy(), zf=zf, kl=kl_arr,
                          ce_delta=ce_delta, info=info, l0_hist=self.rec.l0_hist())


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _act_batches(acts: Any, chunk: int) -> Iterable[Mapping[str | None, torch.Tensor]]:
    """``Tensor[N, d]``, ``{hook: Tensor}`` or an iterable of either, as ``{hook: Tensor}``
    batches of at most ``chunk`` tokens (a bare tensor gets the key None)."""
    for b in [acts] if isinstance(acts, (torch.Tensor, Mapping)) else acts:
        b = {None: b} if isinstance(b, torch.Tensor) else b
        for h, v in b.items():
            if not isinstance(v, torch.Tensor) or v.ndim != 2:
                raise ValueError(f"activations must be [n_tokens, d_in] tensors; {h!r} is "
                                 f"{tuple(getattr(v, 'shape', ()))}")
        n = next(iter(b.values())).shape[0]
        for i in range(0, n, chunk):
            yield {h: v[i : i + chunk] for h, v in b.items()}


def _pick(batch: Mapping[str | None, torch.Tensor], hook: str | None, name: str) -> torch.Tensor:
    """The activations an SAE reads: its hook's, or the batch's only ones."""
    if hook in batch:
        return batch[hook]
    if len(batch) == 1:
        return next(iter(batch.values()))
    raise ValueError(f"the activation batch holds hooks {sorted(map(str, batch))} but not {hook!r}, "
                     f"which SAE {name!r} reads; pass hook= naming one of them.")


def reconstruction_metrics(sae: Any, acts: Any, *, hook: str | None = None, batch_size: int = 4096,
                           zf: bool = True, dense_threshold: float = 0.1, name: str | None = None,
                           progress: bool = False) -> EvalResult:
    """Reconstruction, sparsity and ZF metrics of one SAE on activations, without a language model
    (:func:`evaluate_saes` with activations; ``batch_size`` tokens per SAE call)."""
    label = name or type(sae).__name__
    return evaluate_saes({label: sae}, acts, hook=hook, batch_size=batch_size, zf=zf,
                         dense_threshold=dense_threshold, progress=progress)[label]


def _harvest_batch(model: Any, toks: torch.Tensor, hook: str, exclude_bos: bool) -> torch.Tensor:
    """Hook activations [B·S', d] of one batch; the forward stops at the hook (saelib.lm.activations.harvest)."""
    return harvest(model, toks, [hook], batch_size=toks.shape[0], exclude_bos=exclude_bos,
                   progress=False, device=model_device(model))[hook]


@torch.no_grad()
def mean_activation(model: Any, tokens: torch.Tensor, hook: str, *, batch_size: int = 16,
                    exclude_bos: bool = True) -> torch.Tensor:
    """Mean hook activation [d_model] over the (non-BOS) tokens of ``tokens``, streamed."""
    total, count = None, 0
    for i in range(0, tokens.shape[0], batch_size):
        z = _harvest_batch(model, tokens[i : i + batch_size], hook, exclude_bos)
        s = z.double().sum(0)
        total = s if total is None else total + s
        count += z.shape[0]
    return (total / max(count, 1)).float()


def evaluate_sae(sae: Any, model: Any, tokens: torch.Tensor, *, name: str | None = None,
                 **kwargs: Any) -> EvalResult:
    """:func:`evaluate_saes` for one SAE (every pass holds the clean, two ablated and the spliced copy)."""
    label = name or type(sae).__name__
    return evaluate_saes({label: sae}, model, tokens, copies_per_pass=4, **kwargs)[label]


def evaluate_saes(
    saes: Mapping[str, Any],
    source: Any,
    tokens: torch.Tensor | None = None,
    *,
    hook: str | None = None,
    batch_size: int | None = None,
    exclude_bos: bool = True,
    ce: bool = True,
    zf: bool = True,
    mean_act: torch.Tensor | None = None,
    dense_threshold: float = 0.1,
    copies_per_pass: int = 4,
    progress: bool = True,
    convention: str = "saelib",
    out_dir: str | Path | None = None,
) -> dict[str, EvalResult]:
    """Evaluate SAEs on held-out data; returns ``{name: EvalResult}`` (metrics in the module docstring).

    Args:
        saes: ``{name: SAE}``: saelib SAEs, SAELens SAEs (converted with saelib.interop), or
            modules with encode/decode/W_dec/b_dec. All run in eval mode (BatchTopK uses its
            inference threshold).
        source: either a language model (``saelib.lm.models.load_model``) with ``tokens``
            (LongTensor [n_rows, seq_len], BOS at position 0): every SAE reads and is spliced into
            the same hook, and CE/KL are measured; or activations: ``Tensor[N, d_in]``,
            ``{hook: Tensor}`` or an iterable of such batches (read once; each SAE reads its own
            hook): reconstruction, sparsity and ZF only.
        hook: the hook to read (and splice); defaults to each SAE's own hook.
        batch_size: rows per forward pass with a model (default 8); tokens per SAE call with
            activations (default 4096).
        exclude_bos: leave position 0 out of every metric and never splice it (its residual norm
            is two orders of magnitude larger); predictions made *from* BOS then also leave CE/KL.
        ce: run the spliced and ablated copies (CE, CE recovered, KL); with ``False`` the
            forward stops at the hook.
        zf: per-token ZF statistics (saelib.analysis.afa.zf_stats).
        mean_act: [d_model] activation for mean ablation; default the mean over ``tokens``.
        dense_threshold: fraction of tokens above which a latent counts as dense.
        copies_per_pass: with a model, per batch of rows the model sees ``3 + len(saes)``
            copies (clean, zero-ablated, mean-ablated, one spliced copy per SAE) in passes of at
            most this many copies. Every pass's hook sees the clean activations (interventions
            start there), so each SAE encodes the clean ``z``. Peak memory ≈
            ``copies_per_pass · batch_size · seq_len · vocab`` floats.
        convention: ``"saelib"``: with ``exclude_bos`` BOS is never spliced or ablated; CE and KL
            over the predictions from positions 1..S−2. ``"saelens"``: SAELens' ``get_recons_loss``
            (also SAEBench's): every position including BOS is replaced, CE over positions
            0..S−2 and KL over all positions 0..S−1; zero-ablating BOS hurts the model much more,
            so CE recovered is higher. Reconstruction metrics use the non-BOS tokens under both.
        out_dir: also write each result's :meth:`EvalResult.record` to ``<out_dir>/<name>/eval.json``.
    """
    if not saes:
        raise ValueError("evaluate_saes needs at least one SAE: pass {name: sae}.")
    saes = {n: _as_sae(s) for n, s in saes.items()}
    accs = {n: _Accumulator(_d_sae(s), zf, dense_threshold) for n, s in saes.items()}
    with ExitStack() as stack:
        for s in saes.values():
            stack.enter_context(_eval_mode(s))
        if tokens is None:  # activations
            hooks = {n: hook or sae_hook_name(s) for n, s in saes.items()}
            for batch in tqdm(_act_batches(source, batch_size or 4096), disable=not progress, desc="eval"):
                for n, s in saes.items():
                    z = _pick(batch, hooks[n], n)
                    _check_width(z, _d_in(s), str(hooks[n]))
                    acts, x_hat = _encode_decode(s, z)
                    accs[n].add(s, z.to(acts.device), acts, x_hat)
        else:
            hooks = _lm_eval(saes, source, tokens, accs, hook=hook, batch_size=batch_size or 8,
                             exclude_bos=exclude_bos, ce=ce, mean_act=mean_act, copies_per_pass=copies_per_pass,
                             progress=progress, convention=convention)
    out = {n: accs[n].result(n, hooks[n], _d_in(s), _d_sae(s), _sae_info(s, hooks[n])) for n, s in saes.items()}
    if out_dir is not None:
        for n, r in out.items():
            atomic_write_text(Path(out_dir) / n / "eval.json", json.dumps(r.record(), indent=2))
    return out


def _lm_eval(saes: Mapping[str, Any], model: Any, tokens: torch.Tensor, accs: Mapping[str, _Accumulator], *,
             hook: str | None, batch_size: int, exclude_bos: bool, ce: bool, mean_act: torch.Tensor | None,
             copies_per_pass: int, progress: bool, convention: str) -> dict[str, str]:
    """The language-model half of :func:`evaluate_saes`; returns the hook of every SAE."""
    if copies_per_pass < 1:
        raise ValueError(f"copies_per_pass must be >= 1, got {copies_per_pass}")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    hooks = {n: hook or sae_hook_name(s) for n, s in saes.items()}
    if any(h is None for h in hooks.values()):
        raise ValueError("An SAE records no hook name: pass hook='blocks.L.hook_resid_pre'.")
    if len(set(hooks.values())) > 1:
        raise ValueError(f"evaluate_saes evaluates SAEs of one hook at a time; got {sorted(set(hooks.values()))}. "
                         "Group the SAEs by hook and call it once per hook.")
    the_hook = check_hook(model, next(iter(hooks.values()))) or next(iter(hooks.values()))
    d_model = int(model.cfg.d_model)
    for n, s in saes.items():
        if _d_in(s) != d_model and the_hook.split(".")[-1].startswith("hook_resid"):
            raise ValueError(
                f"SAE {n!r} has width d_in={_d_in(s)} but the model's d_model={d_model} at {the_hook}: "
                "this SAE was trained on a different model; load the matching model or SAE."
            )
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ValueError("tokens must be a LongTensor [n_rows, seq_len] (see saelib.lm.data.token_rows).")
    start = 1 if exclude_bos else 0
    if tokens.shape[1] - start < 1 + int(ce):
        raise ValueError(f"seq_len={tokens.shape[1]} is too short to evaluate; use rows of >= 3 tokens.")
    device = model_device(model)
    if ce and mean_act is None:
        mean_act = mean_activation(model, tokens, the_hook, batch_size=batch_size, exclude_bos=exclude_bos)
    for i in tqdm(range(0, tokens.shape[0], batch_size), total=math.ceil(tokens.shape[0] / batch_size),
                  disable=not progress, desc=f"eval {len(saes)} SAE(s) at {the_hook}"):
        toks = tokens[i : i + batch_size].to(device)
        if ce:
            _ce_batch(model, saes, toks, the_hook, mean_act, start, accs, copies_per_pass, convention)
        else:
            z = _harvest_batch(model, toks, the_hook, exclude_bos)
            for n, s in saes.items():
                _check_width(z, _d_in(s), the_hook)
                acts, x_hat = _encode_decode(s, z)
                accs[n].add(s, z.to(acts.device), acts, x_hat)
    return {n: the_hook for n in saes}


CONVENTIONS = ("saelib", "saelens")
"""Evaluation conventions of :func:`evaluate_saes` (which positions CE/KL intervene on and score)."""


def _check_width(z: torch.Tensor, d_in: int, hook: str) -> None:
    if z.shape[-1] != d_in:
        raise ValueError(
            f"The hook {hook} carries width {z.shape[-1]} but the SAE expects d_in={d_in}: "
            "evaluate the SAE on the hook/model it was trained on."
        )


@torch.no_grad()
def _ce_batch(model: Any, saes: Mapping[str, Any], toks: torch.Tensor, hook: str,
              mean_act: torch.Tensor, start: int, accs: Mapping[str, _Accumulator],
              copies_per_pass: int, convention: str = "saelib") -> None:
    """All copies (clean, zero_abl, mean_abl, one per SAE) of one batch; CE and KL per copy.

    ``start``: first position of the reconstruction metrics. ``convention`` (see
    :func:`evaluate_sae`): "saelib" intervenes on and scores positions from ``start``; "saelens"
    intervenes on every position, scores CE from position 0 and KL on every position."""
    b, s = toks.shape
    copies = ["clean", "zero_abl", "mean_abl"] + [("sae", n) for n in saes]
    lens = convention == "saelens"
    ip = 0 if lens else start  # first intervened position
    targets = toks[:, ip + 1 :]  # predictions from positions ip..s-2
    logp_clean: torch.Tensor | None = None
    ce_shared: dict[str, torch.Tensor] = {}
    kl_shared: dict[str, torch.Tensor] = {}
    ce_sae: dict[str, torch.Tensor] = {}
    kl_sae: dict[str, torch.Tensor] = {}
    for c0 in range(0, len(copies), copies_per_pass):
        chunk = copies[c0 : c0 + copies_per_pass]

        def splice(act: torch.Tensor, hook: Any = None, chunk=chunk) -> torch.Tensor:
            z = act[:b, ip:].reshape(-1, act.shape[-1])
            out = act.clone()
            for j, kind in enumerate(chunk):
                rows = slice(j * b, (j + 1) * b)
                if kind == "clean":
                    continue
                if kind == "zero_abl":
                    out[rows, ip:] = 0.0
                elif kind == "mean_abl":
                    out[rows, ip:] = mean_act.to(device=act.device, dtype=act.dtype)
                else:
                    sae = saes[kind[1]]
                    _check_width(act, _d_in(sae), str(getattr(hook, "name", hook)))
                    acts, x_hat = _encode_decode(sae, z)
                    # reconstruction metrics on positions start.. only (BOS stays out of them)
                    keep = slice(None) if start == ip else (
                        torch.arange(z.shape[0], device=z.device) % (s - ip) >= start - ip)
                    accs[kind[1]].add(sae, z[keep].to(acts.device), acts[keep], x_hat[keep])
                    out[rows, ip:] = x_hat.to(act.dtype).reshape(b, s - ip, -1)
            return out

        logits = model.run_with_hooks(toks.repeat(len(chunk), 1), fwd_hooks=[(hook, splice)],
                                      return_type="logits")
        for j, kind in enumerate(chunk):
            # saelib: positions ip..s-2 for CE and KL; saelens: ip..s-1 (KL includes the last position)
            logp = torch.log_softmax(logits[j * b : (j + 1) * b, ip:(None if lens else -1)].float(), dim=-1)
            logp_ce = logp[:, :-1] if lens else logp
            ce_tok = -logp_ce.gather(-1, targets.unsqueeze(-1)).squeeze(-1).reshape(-1).cpu()
            if kind == "clean":
                logp_clean = logp
                ce_shared["clean"] = ce_tok
                continue
            assert logp_clean is not None  # copy 0 of the first pass is always the clean one
            kl = (logp_clean.exp() * (logp_clean - logp)).sum(-1).clamp_min(0.0).reshape(-1).cpu()
            if isinstance(kind, tuple):
                ce_sae[kind[1]], kl_sae[kind[1]] = ce_tok, kl
            else:
                ce_shared[kind], kl_shared[kind] = ce_tok, kl
            del logp
        del logits
    for n in saes:
        accs[n].add_ce({**ce_shared, "sae": ce_sae[n]}, {**kl_shared, "sae": kl_sae[n]})


# --------------------------------------------------------------------------------------------
# Massive-activation tokens
# --------------------------------------------------------------------------------------------


class MassiveTokens(NamedTuple):
    """Tokens whose residual norm is many times the median (attention-sink / "massive activation"
    tokens, typically the first token after BOS and some delimiters)."""

    mask: np.ndarray
    """[N] bool: ‖z_t‖ > factor · median ‖z‖."""
    norms: np.ndarray
    """[N] ‖z_t‖."""
    median_norm: float
    threshold: float
    n_tokens: int
    n_massive: int
    var_share: float
    """Share of the total variance Σ_t ‖z_t − z̄‖² (z̄ over all tokens) carried by the massive
    tokens: FVU over all tokens weighs each token by exactly this term, so a share near 1 means
    FVU (and MSE) mostly measure these few tokens."""
    position_counts: dict
    """{position in the row: number of massive tokens there} (empty without ``positions``)."""


def massive_tokens(z: torch.Tensor, *, factor: float = 5.0, positions: Any = None) -> MassiveTokens:
    """Find the massive-norm tokens of activations ``z [N, d]`` (``positions [N]``: optional
    position of each token in its row, for the position histogram).

    A token is "massive" when ‖z_t‖ > ``factor`` × median ‖z‖. The default 5 sits far above the
    bulk of a residual stream's norm distribution (whose spread is a few tens of percent) and far
    below the 10–20× of attention-sink tokens; the share of variance they carry is what matters.
    """
    if factor <= 1 or not math.isfinite(factor):
        raise ValueError(f"factor must be a finite number > 1, got {factor}")
    z = torch.as_tensor(z)
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"z must be [N, d] with N > 0, got shape {tuple(z.shape)}")
    zd = z.double()
    norms = zd.norm(dim=1)
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("z has non-finite entries; massive_tokens needs finite activations")
    med = float(norms.median())
    thr = factor * med
    mask = (norms > thr).cpu().numpy()
    dev2 = (zd - zd.mean(0)).pow(2).sum(1)
    total = float(dev2.sum())
    share = float(dev2[torch.as_tensor(mask)].sum()) / total if total > 0 else float("nan")
    counts: dict = {}
    if positions is not None:
        pos = np.asarray(positions)
        if pos.shape != (z.shape[0],):
            raise ValueError(f"positions must have one entry per token ({z.shape[0]}), got shape {pos.shape}")
        vals, cnt = np.unique(pos[mask], return_counts=True)
        counts = {int(v): int(c) for v, c in zip(vals, cnt)}
    return MassiveTokens(mask, norms.float().cpu().numpy(), med, thr, int(z.shape[0]), int(mask.sum()), share, counts)


def massive_summary(acts: Mapping[str, torch.Tensor], *, factor: float = 5.0, positions: Any = None) -> pd.DataFrame:
    """One row per hook of :func:`massive_tokens`: tokens, massive tokens, their share of the
    variance, median and max norm, and the positions where they occur."""
    rows = []
    for h, z in acts.items():
        m = massive_tokens(z, factor=factor, positions=positions)
        rows.append({"hook": h, "tokens": m.n_tokens, "massive": m.n_massive,
                     "massive_pct": 100.0 * m.n_massive / m.n_tokens, "var_share": m.var_share,
                     "median_norm": m.median_norm, "max_norm": float(m.norms.max()),
                     "positions": ", ".join(f"{p}: {c}" for p, c in sorted(m.position_counts.items(),
                                                                           key=lambda t: -t[1])[:4])})
    return pd.DataFrame(rows).set_index("hook")
