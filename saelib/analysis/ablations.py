"""Design ablations: top-AFA's choices and the decoder-bias initialisation, at a matched recipe.

* :func:`topafa_design_configs` - the full factorial of top-AFA's three design choices, every
  other setting equal: the AFA target ("paper": the loss compares the unscaled ‖f‖ with ‖x_n‖;
  "consistent": selection and loss both use ‖x_n − b_dec‖ with decoder-scaled activations),
  the input normalisation ("token": the paper's per-token standardisation; "global": one
  scalar so that mean ‖x_n‖ = √d) and the selection rule ("nearest": the prefix whose
  cumulative norm is nearest to the target, the paper's code; "first_crossing": the shortest
  prefix that reaches it).
* :func:`b_dec_init_configs` - every rule at every ``b_dec_init`` ("zeros", the paper;
  "mean", sparsify; "geometric_median", dictionary_learning).
* :func:`l0_correlates` - does top-AFA's per-token L0 track something measurable? Spearman rank
  correlations of the per-token L0 with covariates (input norm, position, token frequency),
  with a 95% interval from Fisher's z (n − 3 degrees of freedom; tokens within a row are not
  independent, so the interval is optimistic).
* :func:`factor_effects` - mean difference between the two levels of each factor, over all
  other factors and seeds (a main effect), with a paired standard error over the matched cells.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.sae.core import SAEConfig

__all__ = [
    "TOPAFA_FACTORS",
    "topafa_design_configs",
    "b_dec_init_configs",
    "per_token_l0",
    "l0_correlates",
    "factor_effects",
]

TOPAFA_FACTORS = {
    "afa_target": ("paper", "consistent"),
    "input_norm": ("token", "global"),
    "afa_rule": ("nearest", "first_crossing"),
}


def topafa_design_configs(d_in: int, d_sae: int, hook_name: str, seeds: Sequence[int], *, afa_coeff: float,
                          factors: Mapping[str, Sequence[str]] | None = None, **common: Any) -> dict[str, SAEConfig]:
    """``{name: SAEConfig}`` for every combination of ``factors`` (default :data:`TOPAFA_FACTORS`)
    and seed; names like ``topafa_target=paper_norm=token_rule=nearest_seed0``. ``common``:
    further SAEConfig fields shared by all (e.g. ``dead_after_tokens``)."""
    factors = dict(TOPAFA_FACTORS if factors is None else factors)
    unknown = sorted(set(factors) - set(TOPAFA_FACTORS))
    if unknown:
        raise ValueError(f"unknown top-AFA factors {unknown}; choose from {sorted(TOPAFA_FACTORS)}")
    short = {"afa_target": "target", "input_norm": "norm", "afa_rule": "rule"}
    out = {}
    keys = list(factors)
    for combo in itertools.product(*(factors[k] for k in keys)):
        for s in seeds:
            kw = dict(zip(keys, combo))
            name = "topafa_" + "_".join(f"{short[k]}={v}" for k, v in kw.items()) + f"_seed{s}"
            out[name] = SAEConfig(d_in=d_in, d_sae=d_sae, activation="topafa", afa_coeff=afa_coeff,
                                  hook_name=hook_name, seed=int(s), **kw, **common)
    return out


def b_dec_init_configs(d_in: int, d_sae: int, hook_name: str, seeds: Sequence[int],
                       rules: Mapping[str, Mapping[str, Any]],
                       inits: Sequence[str] = ("zeros", "mean", "geometric_median"), **common: Any) -> dict[str, SAEConfig]:
    """``{name: SAEConfig}`` for every rule (``{label: SAEConfig fields}``, e.g.
    ``{"topk": {"activation": "topk", "k": 32}}``), ``b_dec_init`` and seed; names like
    ``topk_bdec=mean_seed1``."""
    out = {}
    for label, kw in rules.items():
        for init in inits:
            for s in seeds:
                out[f"{label}_bdec={init}_seed{s}"] = SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook_name,
                                                                seed=int(s), b_dec_init=init, **{**common, **kw})
    return out


@torch.no_grad()
def per_token_l0(sae: torch.nn.Module, x: Tensor, batch_size: int = 2048) -> Tensor:
    """Eval-mode number of active latents of every token of x [N, d_in] (long [N])."""
    was = sae.training
    sae.eval()
    try:
        out = [(sae.encode(x[i:i + batch_size]) > 0).sum(-1) for i in range(0, x.shape[0], batch_size)]
    finally:
        sae.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _rank(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata."""
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.arange(len(a), dtype=np.float64)
    sa = a[order]
    # average over tie groups
    starts = np.r_[0, np.flatnonzero(sa[1:] != sa[:-1]) + 1]
    ends = np.r_[starts[1:], len(a)]
    for s, e in zip(starts, ends):
        if e - s > 1:
            ranks[order[s:e]] = (s + e - 1) / 2
    return ranks


def l0_correlates(l0: Any, covariates: Mapping[str, Any]) -> Any:
    """Spearman correlation of per-token L0 with each covariate; returns a DataFrame with
    ``covariate, spearman, ci_low, ci_high, n``. A constant L0 or covariate gives NaN."""
    y = np.asarray(l0, dtype=np.float64)
    rows = []
    for name, c in covariates.items():
        v = np.asarray(c, dtype=np.float64)
        if v.shape != y.shape:
            raise ValueError(f"covariate {name!r} has shape {v.shape}, per-token L0 has {y.shape}; one value per token")
        ok = np.isfinite(v) & np.isfinite(y)
        n = int(ok.sum())
        ry, rv = _rank(y[ok]), _rank(v[ok])
        if n < 4 or ry.std() == 0 or rv.std() == 0:
            rho, lo, hi = float("nan"), float("nan"), float("nan")
        else:
            rho = float(np.corrcoef(ry, rv)[0, 1])
            z, se = math.atanh(max(min(rho, 0.999999), -0.999999)), 1 / math.sqrt(n - 3)
            lo, hi = math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)
        rows.append({"covariate": name, "spearman": rho, "ci_low": lo, "ci_high": hi, "n": n})
    return pd.DataFrame(rows)


def factor_effects(df: Any, factors: Mapping[str, Sequence[str]], metrics: Sequence[str], *,
                   unit: Sequence[str] = ("seed",)) -> Any:
    """Main effect of each two-level factor on each metric: mean over matched cells of
    metric(level 2) − metric(level 1), where a cell fixes every other factor and the ``unit``
    columns (the seed); the standard error is over those paired differences. Returns a DataFrame
    ``factor, level_a, level_b, metric, mean_a, mean_b, diff, se, n``."""
    rows = []
    for f, levels in factors.items():
        if len(levels) != 2:
            raise ValueError(f"factor {f!r} needs exactly two levels, got {levels}")
        a, b = levels
        others = [g for g in factors if g != f] + list(unit)
        for m in metrics:
            piv = df.pivot_table(index=others, columns=f, values=m) if others else df.groupby(f)[m].mean().to_frame().T
            if a not in piv or b not in piv:
                continue
            d = (piv[b] - piv[a]).dropna()
            rows.append({"factor": f, "level_a": a, "level_b": b, "metric": m, "mean_a": float(piv[a].mean()),
                         "mean_b": float(piv[b].mean()), "diff": float(d.mean()),
                         "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan"), "n": int(len(d))})
    return pd.DataFrame(rows)
