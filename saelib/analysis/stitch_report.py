"""Tables that chapters 5 and 6 build from a width family and its analysed pairs.

Everything here reads the objects of :mod:`saelib.analysis.stitching` (a ``WidthFamily``, the
``PairAnalysis`` of :func:`~saelib.analysis.stitching.analyze_pair` per ``(arch, small, large)``
key) and returns a DataFrame or tensors; nothing is trained or cached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from saelib.analysis import stitching as st

__all__ = ["alive_decoder", "alive_latents", "family_table", "novel_fraction_on", "pair_label", "pair_summary",
           "path_table"]

Results = Mapping[tuple[str, int, int], Any]
"""``{(arch, small width, large width): PairAnalysis}``."""


def pair_label(a: int, b: int) -> str:
    """``"512→1024"``: the label of a (smaller, larger) width pair."""
    return f"{a}→{b}"


def family_table(family: Any, x: Tensor, *, device: str | None = None, init_cos: bool = True) -> pd.DataFrame:
    """One row per SAE of the family: per-element MSE, NMSE, L0 and alive fraction on ``x``, and
    the median cosine of its decoder rows to their initialisation (``init_cos=False``: NaN, for
    released SAEs, which have no seeded initialisation)."""
    rows = []
    for arch, by_w in family.saes.items():
        for w, sae in sorted(by_w.items()):
            s = st.reconstruction_stats(sae, x, device=device)
            rows.append({"arch": arch, "width": w, "mse": s["mse"], "fvu": s["fvu"], "l0": s["l0"],
                         "alive_frac": float((st.firing_frequency(sae, x, device=device) > 0).float().mean()),
                         "cos_to_init": float(st.cos_to_init(sae).median()) if init_cos else float("nan")})
    return pd.DataFrame(rows)


def pair_summary(results: Results, theta: float) -> pd.DataFrame:
    """One row per analysed pair: novel fractions (rule ΔMSE, threshold ΔMSE, cosine proxy at
    ``theta``), the proxy's accuracy and AUROC, class means of ΔMSE and the share of improving swaps."""
    rows = []
    for (arch, a, b), r in results.items():
        lab, dm = r.cls.label, r.insertion.delta_mse.numpy()
        prox = r.cls.proxy.set_index("theta")
        rows.append({
            "arch": arch, "pair": pair_label(a, b), "small": a, "large": b,
            "alive_large": r.cls.n_alive, "frac_novel": r.cls.frac_novel, "frac_novel_thr": r.cls_threshold.frac_novel,
            "consecutive": b == 2 * a,
            "frac_novel_proxy": float(prox.loc[theta, "frac_novel_proxy"]),
            "proxy_acc@θ": float(prox.loc[theta, "accuracy"]), "auroc": r.cls.auroc, "best_θ": r.cls.best_theta,
            "best_acc": float(prox["accuracy"].max()),
            "mean_ΔMSE_novel": float(dm[lab == "novel"].mean()) if (lab == "novel").any() else np.nan,
            "mean_ΔMSE_recon": float(dm[lab == "reconstruction"].mean()) if (lab == "reconstruction").any() else np.nan,
            "swaps_improving": r.swap_frac_improving,
        })
    return pd.DataFrame(rows)


def path_table(results: Results, trained: pd.DataFrame) -> pd.DataFrame:
    """One row per pair with stitched paths: where the path starts and ends against S and L, its
    largest relative rise, and the share of its inner points whose L0 exceeds the trained SAEs'
    (log-interpolated at the same latent count). ``trained``: :func:`family_table` (``mse_S_all_eval``
    is S's MSE on all its eval tokens)."""
    by = trained.set_index(["arch", "width"])
    rows = []
    for (arch, a, b), v in results.items():
        if v.curve_monotone is None:
            continue
        cm, ca, ins = v.curve_monotone, v.curve_all, v.insertion
        tr = trained[trained.arch == arch]
        inner = (cm.n_latents > a) & (cm.n_latents < b)
        l0_trained = st.log_interp(cm.n_latents[inner], tr.width, tr.l0)
        rows.append({
            "arch": arch, "pair": pair_label(a, b), "ops_improving": len(cm.order), "ops_all": len(ca.order),
            "tokens": ins.n_tokens,  # TopK/top-AFA pairs are analysed on a prefix of the eval tokens
            "start_mse": cm.mse[0], "mse_S": ins.mse_small, "mse_S_all_eval": by.loc[(arch, a), "mse"],
            "monotone_max_rise_rel": float(np.max(np.diff(cm.mse) / cm.mse[0], initial=0.0)),
            "end_mse_monotone": cm.mse[-1], "end_mse_all": ca.mse[-1], "mse_L": ins.mse_large,
            "end_gap_rel": (ca.mse[-1] - ins.mse_large) / ins.mse_large, "end_latents": int(ca.n_latents[-1]),
            "frac_path_l0_above_trained": float(np.mean(cm.l0[inner] > l0_trained)) if inner.any() else np.nan,
            "bias_gap": v.bias_gap,
        })
    return pd.DataFrame(rows)


def novel_fraction_on(results: Results, family: Any, x: Tensor, keep: np.ndarray | Tensor, key: tuple[str, int, int],
                      *, device: str | None = None) -> float:
    """Threshold-measure novel fraction of one pair recomputed on the pair's own tokens (the first
    ``insertion.n_tokens`` of ``x``) restricted to ``keep`` (bool per token of ``x``), with the
    pair's decoder cosines."""
    arch, a, b = key
    r = results[key]
    n = r.insertion.n_tokens
    mask = torch.as_tensor(np.asarray(keep)[:n], device=x.device)
    ins = st.insertion_delta_mse(family.saes[arch][a], family.saes[arch][b], x[:n][mask], device=device,
                                 mode="threshold")
    return st.classify_latents(ins.delta_mse, ins.freq_large, r.match.max_cos).frac_novel


@torch.no_grad()
def alive_latents(sae: Any, x: Tensor, chunk: int = 2048) -> Tensor:
    """Bool [d_sae]: the latent fires (``sae.encode(x) > 0``) on at least one token of ``x``."""
    fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool)
    for s in range(0, x.shape[0], chunk):
        fired |= (sae.encode(x[s:s + chunk]) > 0).any(0).cpu()
    return fired


def alive_decoder(sae: Any, x: Tensor | None) -> tuple[Tensor, Tensor]:
    """(float32 CPU decoder rows [d_sae, d], bool alive mask [d_sae]); ``x=None`` counts every latent alive."""
    W = sae.W_dec.detach().float().cpu()
    return W, (alive_latents(sae, x) if x is not None else torch.ones(W.shape[0], dtype=torch.bool))
