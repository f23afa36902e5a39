"""Figures of chapter 1: the size of the residual stream by layer and by position."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from saelib.plots.style import apply_style, legend_outside

GPT2_SMALL_MEDIAN_NORMS = (4.6, 49.7, 56.2, 60.4, 65.8, 70.9, 78.0, 86.9, 100.1, 118.9, 150.4, 216.7)
"""Median ``||z||`` of GPT-2 small ``blocks.{0..11}.hook_resid_pre`` reported with the top-AFA
paper's ZF analysis (last token of 1000 OpenWebText2 rows of 128 tokens, TransformerLens
``HookedTransformer`` with its default weight processing). These are the paper's numbers, not ours."""

GPT2_SMALL_D_MODEL = 768


def layer_summary(norms_LN: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Per-layer quartiles of token norms ``[n_layers, n_tokens]`` → ``{"q25", "median", "q75"}``."""
    x = np.asarray(norms_LN, dtype=np.float64)
    q25, med, q75 = np.quantile(x, [0.25, 0.5, 0.75], axis=1)
    return {"q25": q25, "median": med, "q75": q75}


def relative_depth(n_layers: int) -> np.ndarray:
    """``resid_pre`` of block ``L`` sits after ``L`` of ``n_layers`` blocks: depth ``L / n_layers``."""
    return np.arange(n_layers) / n_layers


def plot_norms_by_layer(
    norms_LN: torch.Tensor | np.ndarray,
    d_model: int,
    *,
    label: str = "ours",
    reference: Sequence[float] | None = GPT2_SMALL_MEDIAN_NORMS,
    reference_d_model: int = GPT2_SMALL_D_MODEL,
    reference_label: str = "GPT-2 small (paper's medians)",
) -> plt.Figure:
    """Median and IQR of ``||x||`` per layer against relative depth, next to a reference model.

    Left: ``||x||`` on a log scale. Right: ``||x|| / sqrt(d_model)`` (root-mean-square per
    coordinate), which removes the width difference between models.
    """
    apply_style()
    s = layer_summary(norms_LN)
    depth = relative_depth(len(s["median"]))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, scale in zip(axes, (1.0, 1.0 / np.sqrt(d_model))):
        ax.fill_between(depth, s["q25"] * scale, s["q75"] * scale, alpha=0.25, color="C0", label=f"{label}: IQR")
        ax.plot(depth, s["median"] * scale, "o-", ms=3, color="C0", label=f"{label}: median")
        if reference is not None:
            ref = np.asarray(reference, dtype=np.float64)
            ref_scale = 1.0 if scale == 1.0 else 1.0 / np.sqrt(reference_d_model)
            ax.plot(relative_depth(len(ref)), ref * ref_scale, "s--", ms=4, color="C3", label=reference_label)
        ax.set_yscale("log")
        ax.set_xlabel("relative depth (block index / number of blocks)")
    axes[0].set_ylabel(r"$\|x\|_2$ at resid_pre")
    axes[1].set_ylabel(r"$\|x\|_2/\sqrt{d_{model}}$")
    axes[0].set_title("Residual norm by layer (BOS excluded)")
    axes[1].set_title("Per-coordinate scale")
    legend_outside(axes[1])
    fig.tight_layout()
    return fig


def plot_norms_by_position(
    norms_LRS: torch.Tensor | np.ndarray,
    layers: Sequence[int],
    *,
    max_position: int | None = None,
) -> plt.Figure:
    """Median ``||x||`` over rows at each position (BOS = position 0) for a few layers, log scale."""
    apply_style()
    x = np.asarray(norms_LRS, dtype=np.float64)
    med = np.median(x, axis=1)  # [L, S]
    if max_position is not None:
        med = med[:, : max_position + 1]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, layer in enumerate(layers):
        ax.plot(np.arange(med.shape[1]), med[layer], lw=1.2, color=cmap(i / max(1, len(layers) - 1)),
                label=f"blocks.{layer}")
    ax.set_yscale("log")
    ax.set_xlabel("position in row (0 = BOS)")
    ax.set_ylabel(r"median $\|x\|_2$ at resid_pre")
    ax.set_title("Residual norm by position")
    legend_outside(ax, fontsize=8)
    fig.tight_layout()
    return fig
