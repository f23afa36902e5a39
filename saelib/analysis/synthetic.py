"""Synthetic superposition data with a known dictionary, and how well SAEs recover it.

The generative model (all choices fixed by :class:`SyntheticSpec`, never tuned per rule):

* **Dictionary.** ``n_features`` random unit vectors ``W [n, d]`` (Gaussian, normalised), so
  superposition is ``n_features / d`` features per dimension and the quasi-orthogonality
  constant ε = max_{i≠j} |cos(w_i, w_j)| grows with it.
* **Which features fire (correlated).** A Gaussian copula: features come in groups of
  ``group_size``; feature i fires on a token when
  ``sqrt(rho)·g_group(i) + sqrt(1 - rho)·e_i > Φ⁻¹(1 - p_i)`` with independent standard normals
  g (one per group and token) and e (one per feature and token). So each feature fires with
  probability p_i, and features of one group co-fire (latent correlation ``rho``).
* **How often (varied).** p_i ∝ (i + 1)^(-freq_decay), scaled so that Σ p_i = ``l0`` (the expected
  number of active features per token: the *true L0*), capped at ``p_max``.
* **How strongly (varied).** An active feature has magnitude s_i·u with a per-feature scale
  s_i = exp(``mag_sigma``·N(0,1)) and u ~ Uniform(0.5, 1.5) per token; inactive ones are 0.
* **Data.** x = f W, with f ≥ 0 the true code (no noise, no bias). A token with no active
  feature gets the one of largest p_i·(draw) instead, so no token is the zero vector.

Metrics (``recovery``, ``afa_diagnostics``):

* recovery = mean over true features of max_j cos(w_i, W_dec[j]) (1 = every true direction
  has a decoder row pointing its way); ``frac_recovered`` = share with max cos > 0.9.
* AFA view of the *true* dictionary: its ε, the paper's worst-case bound factor ε(h−1), the
  tight factor ε(k−1) at the true L0 k, and the per-token ratio ‖f‖/‖x‖ of the true code (the
  AFA bound says it lies in [1/√(1+ε(k−1)), 1/√(1−ε(k−1))] when ε(k−1) < 1).
* "Oracle" top-AFA: the top-AFA rule applied with the true dictionary as both encoder and
  decoder (pre-activations relu(x Wᵀ), unit decoder norms, target ‖x‖). It separates what
  the norm-matching rule does from what training does: with a perfect dictionary, how many
  latents does the rule keep compared with the true L0?
* ``random_decoder_recovery``: the recovery score of a random Gaussian decoder with one row per
  true feature (the floor a trained SAE has to beat).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.analysis.afa import epsilon
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.geometry import max_cosine
from saelib.sae.topafa import topafa_select
from saelib.sae.metrics import held_out_metrics
from saelib.sae.train import TrainConfig, train_saes

__all__ = ["SyntheticSpec", "SyntheticData", "recovery", "afa_diagnostics", "synthetic_rules", "run_synthetic",
           "summarize", "paired_difference"]

HOOK = "synthetic"


@dataclass
class SyntheticSpec:
    """One synthetic superposition problem (see the module docstring)."""

    d: int = 32
    """Dimension of the data."""
    n_features: int = 128
    """Number of true features (dictionary rows); superposition = n_features / d."""
    l0: float = 4.0
    """Expected number of active features per token (the true L0)."""
    freq_decay: float = 0.5
    """Firing probabilities p_i ∝ (i+1)^-freq_decay (0 = all equal)."""
    p_max: float = 0.5
    """Cap on any feature's firing probability."""
    group_size: int = 4
    """Features per correlated group (1 = independent features)."""
    rho: float = 0.5
    """Correlation of the latent Gaussians within a group (0 = independent)."""
    mag_sigma: float = 0.5
    """Per-feature magnitude scales s_i = exp(mag_sigma·N(0,1)) (0 = equal scales)."""
    seed: int = 0
    """Seed of the dictionary, probabilities and scales."""

    def __post_init__(self) -> None:
        for name in ("d", "n_features", "group_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"SyntheticSpec.{name} must be a positive int, got {v!r}")
        if not (0 < self.l0 <= self.p_max * self.n_features):
            raise ValueError(f"SyntheticSpec.l0 must be in (0, p_max·n_features = {self.p_max * self.n_features}], "
                             f"got {self.l0!r}; lower l0 or add features")
        if not 0 < self.p_max <= 1:
            raise ValueError(f"SyntheticSpec.p_max must be in (0, 1], got {self.p_max!r}")
        if not 0 <= self.rho < 1:
            raise ValueError(f"SyntheticSpec.rho must be in [0, 1), got {self.rho!r}")
        if self.freq_decay < 0 or self.mag_sigma < 0:
            raise ValueError("SyntheticSpec.freq_decay and mag_sigma must be >= 0")

    @property
    def superposition(self) -> float:
        return self.n_features / self.d


def _firing_probs(n: int, l0: float, decay: float, p_max: float) -> Tensor:
    """p_i ∝ (i+1)^-decay with Σp = l0 and p ≤ p_max (water-filling the cap)."""
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-decay)
    p = torch.zeros(n, dtype=torch.float64)
    free = torch.ones(n, dtype=torch.bool)
    budget = l0
    for _ in range(n):
        p[free] = w[free] * budget / w[free].sum()
        over = free & (p > p_max)
        if not over.any():
            break
        p[over] = p_max
        free &= ~over
        budget = l0 - p_max * float((~free).sum())
    return p


class SyntheticData:
    """Sampler for one :class:`SyntheticSpec`: ``W`` [n, d] (unit rows), ``probs`` [n],
    ``scales`` [n]."""

    def __init__(self, spec: SyntheticSpec):
        if not isinstance(spec, SyntheticSpec):
            raise TypeError(f"SyntheticData expects a SyntheticSpec, got {type(spec).__name__}")
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        W = torch.randn(spec.n_features, spec.d, generator=g, dtype=torch.float64)
        self.W = (W / W.norm(dim=-1, keepdim=True)).float()
        self.probs = _firing_probs(spec.n_features, spec.l0, spec.freq_decay, spec.p_max)
        self.scales = torch.exp(spec.mag_sigma * torch.randn(spec.n_features, generator=g, dtype=torch.float64)).float()
        self._cut = torch.special.ndtri(1 - self.probs).float()  # fire when latent > cut
        self.group = torch.arange(spec.n_features) // spec.group_size
        self.n_groups = int(self.group.max()) + 1

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """n tokens: (x [n, d], true codes f [n, n_features]), x = f W."""
        s = self.spec
        g = torch.randn(n, self.n_groups, generator=gen)
        e = torch.randn(n, s.n_features, generator=gen)
        z = math.sqrt(s.rho) * g[:, self.group] + math.sqrt(1 - s.rho) * e
        on = z > self._cut
        empty = ~on.any(-1)
        if empty.any():  # the feature closest to firing fires instead
            r = empty.nonzero().squeeze(1)
            on[r, (z[r] - self._cut).argmax(-1)] = True
        u = 0.5 + torch.rand(n, s.n_features, generator=gen)
        f = on * self.scales * u
        return f @ self.W, f

    def batches(self, batch_size: int, seed: int, hook: str = HOOK) -> Iterator[dict[str, Tensor]]:
        """Endless stream of training batches ``{hook: x [batch_size, d]}`` (the trainer's format)."""
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield {hook: self.sample(batch_size, gen)[0]}


def recovery(W_true: Tensor, W_dec: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """Mean over true directions of the max cosine to any decoder row, and the share of true
    directions whose max cosine exceeds ``threshold``."""
    best = max_cosine(W_true, W_dec)[0]
    return {"recovery": float(best.mean()), "frac_recovered": float((best > threshold).float().mean())}


@torch.no_grad()
def afa_diagnostics(data: SyntheticData, n: int = 4096, seed: int = 12345) -> dict[str, float]:
    """The AFA view of the true dictionary on n sampled tokens (see module docstring)."""
    _, f = data.sample(n, torch.Generator().manual_seed(seed))
    W = data.W.double()  # float64: float32 rounding would give inactive features ~1e-7 pre-activations
    f = f.double()
    x = f @ W
    eps = epsilon(data.W)
    k_true = (f > 0).sum(-1).float()
    ratio = f.norm(dim=-1) / x.norm(dim=-1)
    h = data.spec.n_features
    pre = (x @ W.T).relu()
    sel = topafa_select(pre, torch.ones(h, dtype=torch.float64), x.norm(dim=-1))
    oracle_l0 = sel.sum(-1).float()
    positive = (pre > 0).sum(-1).float()
    q = torch.quantile(ratio.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    rand = torch.randn(h, data.spec.d, generator=torch.Generator().manual_seed(seed))
    return {
        "eps_max": float(eps.max),
        "eps_mean": float(eps.mean),
        "eps_h": float(eps.max) * (h - 1),
        "eps_k": float(eps.max) * (float(k_true.mean()) - 1),
        "true_l0": float(k_true.mean()),
        "ratio_p05": float(q[0]),
        "ratio_median": float(q[1]),
        "ratio_p95": float(q[2]),
        "oracle_afa_l0": float(oracle_l0.mean()),
        "positive_matched_filter": float(positive.mean()),
        "random_decoder_recovery": recovery(data.W, rand)["recovery"],
    }


def synthetic_rules(d_in: int, d_sae: int, k: int, *, l1_coeff: float, afa_coeff: float, seed: int,
                    b_dec_init: str = "zeros", hook: str = HOOK, rules: Sequence[str] | None = None,
                    l0_coeff: float | None = None) -> dict:
    """``{name: SAEConfig}`` for every trainable rule: ReLU-L1, TopK and BatchTopK at ``k``,
    top-AFA with the paper's and the consistent target, and JumpReLU when ``l0_coeff`` is given.
    Model space (``input_norm="none"``)."""
    common = dict(d_in=d_in, d_sae=d_sae, hook_name=hook, seed=seed, b_dec_init=b_dec_init)
    out = {
        "relu": dict(activation="relu", l1_coeff=l1_coeff),
        "topk": dict(activation="topk", k=k),
        "batchtopk": dict(activation="batchtopk", k=k),
        "topafa-paper": dict(activation="topafa", afa_coeff=afa_coeff, afa_target="paper"),
        "topafa-consistent": dict(activation="topafa", afa_coeff=afa_coeff, afa_target="consistent"),
    }
    if l0_coeff is not None:
        out["jumprelu"] = dict(activation="jumprelu", l0_coeff=l0_coeff)
    if rules is not None:
        unknown = sorted(set(rules) - set(out))
        if unknown:
            raise ValueError(f"unknown synthetic rules {unknown}; choose from {sorted(out)}")
        out = {r: out[r] for r in rules}
    return {name: SAEConfig(**common, **kw) for name, kw in out.items()}


def run_synthetic(
    conditions: Sequence[Mapping[str, Any]],
    seeds: Sequence[int],
    *,
    base: Mapping[str, Any] | None = None,
    rules: Sequence[str] | None = None,
    steps: int = 400,
    batch_size: int = 256,
    lr: float = 3e-3,
    l1_coeff: float = 0.03,
    afa_coeff: float = 1 / 16,
    dict_ratio: float = 1.0,
    b_dec_inits: Sequence[str] = ("zeros",),
    eval_tokens: int = 4096,
    truth_init: Sequence[str] = (),
    progress: bool = False,
) -> Any:
    """Train every rule on every (condition, seed, b_dec_init) and evaluate on held-out tokens.

    ``conditions``: dicts of :class:`SyntheticSpec` fields (e.g. ``{"n_features": 256, "l0": 4}``)
    over ``base``. TopK/BatchTopK get k = round(true L0) (the oracle k: an advantage top-AFA
    and ReLU do not get); every SAE has ``dict_ratio · n_features`` latents. One
    :func:`saelib.sae.train.train_saes` pass trains all rules of a (condition, seed) on one stream.
    Recipe: Adam at ``lr``, linear warm-up over 5% and decay to 0 over the last 30% of steps.
    ``truth_init``: rules trained a second time (named ``<rule>+truth``) starting *at the answer*
    (W_dec = W_true, W_enc = W_trueᵀ; needs ``dict_ratio = 1``): a control that tells a rule whose
    optimum is the true dictionary from one that leaves it.

    Returns a pandas DataFrame, one row per SAE: the condition, seed, rule, held-out ``fvu``,
    ``l0`` (SAE), ``true_l0``, ``l0_ratio`` = l0 / true_l0, ``recovery``, ``frac_recovered``,
    the true dictionary's AFA diagnostics and the wall time.
    """
    rows = []
    for cond in conditions:
        for seed in seeds:
            spec = SyntheticSpec(**{**dict(base or {}), **dict(cond), "seed": int(seed)})
            data = SyntheticData(spec)
            diag = afa_diagnostics(data)
            k = max(1, int(round(diag["true_l0"])))
            d_sae = max(1, int(round(dict_ratio * spec.n_features)))
            x_eval, _ = data.sample(eval_tokens, torch.Generator().manual_seed(10_000 + int(seed)))
            for init in b_dec_inits:
                cfgs: dict[str, Any] = synthetic_rules(spec.d, d_sae, k, l1_coeff=l1_coeff, afa_coeff=afa_coeff,
                                                       seed=int(seed), b_dec_init=init, rules=rules)
                if truth_init:
                    if d_sae != spec.n_features:
                        raise ValueError("truth_init needs dict_ratio = 1 (one latent per true feature)")
                    for name, c in synthetic_rules(spec.d, d_sae, k, l1_coeff=l1_coeff, afa_coeff=afa_coeff,
                                                   seed=int(seed), b_dec_init=init, rules=truth_init).items():
                        sae = SAE(c)
                        with torch.no_grad():
                            sae.W_dec.copy_(data.W)
                            sae.W_enc.copy_(data.W.T)
                        cfgs[f"{name}+truth"] = sae
                tc = TrainConfig(batch_size=batch_size, n_tokens=batch_size * steps, lr=lr,
                                 warmup_steps=max(1, steps // 20), decay_steps=max(1, (3 * steps) // 10),
                                 progress=progress, seed=int(seed), log_every=max(1, steps),
                                 dead_window_tokens=batch_size * steps)
                t0 = time.perf_counter()
                saes = train_saes(cfgs, data.batches(batch_size, seed=1000 + int(seed)), tc)
                wall = time.perf_counter() - t0
                evals = held_out_metrics(saes, [{HOOK: x_eval}])
                for name, sae in saes.items():
                    ev = evals[name]
                    start = name.partition("+")[2]
                    rows.append({
                        **{f: getattr(spec, f) for f in ("d", "n_features", "l0", "rho", "group_size", "mag_sigma")},
                        "superposition": spec.superposition, "seed": int(seed), "rule": name,
                        "start": start or "random", "b_dec_init": init, "d_sae": d_sae,
                        "k": sae.cfg.k,
                        "fvu": float(ev["fvu"]), "sae_l0": float(ev["l0"]),
                        "l0_ratio": float(ev["l0"]) / diag["true_l0"],
                        **recovery(data.W, sae.W_dec), **diag, "train_s": wall / len(saes),
                    })
    return pd.DataFrame(rows)


def summarize(df: Any, by: Sequence[str] = ("superposition", "l0", "rule"),
              cols: Sequence[str] = ("recovery", "sae_l0", "true_l0", "l0_ratio", "fvu")) -> Any:
    """Mean and standard deviation over seeds of ``cols``, grouped by ``by`` (columns like
    ``recovery_mean``, ``recovery_sd``) plus the number of seeds ``n``."""
    g = df.groupby(list(by), sort=True)
    out = g[list(cols)].agg(["mean", "std"])
    out.columns = [f"{c}_{'sd' if s == 'std' else s}" for c, s in out.columns]
    out["n"] = g.size()
    return out.reset_index()


def paired_difference(df: Any, metric: str, a: str, b: str) -> Any:
    """Per condition (``superposition, l0``): mean over seeds of ``metric(a) - metric(b)`` (rules
    ``a``, ``b`` on the same seed), its standard error, the seed count and a verdict: ``"lower"`` /
    ``"higher"`` when the mean difference is more than 2 standard errors from 0."""
    piv = df.pivot_table(index=["superposition", "l0", "seed"], columns="rule", values=metric)
    diff = (piv[a] - piv[b]).groupby(level=[0, 1])
    out = pd.DataFrame({"mean_diff": diff.mean(), "se": diff.std() / np.sqrt(diff.count()), "n": diff.count()})
    out["verdict"] = np.where(out["mean_diff"] + 2 * out["se"] < 0, "lower",
                              np.where(out["mean_diff"] - 2 * out["se"] > 0, "higher", "no difference at this n"))
    return out
