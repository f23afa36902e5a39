"""Figures of the synthetic-superposition chapter: recovery, L0 against the true L0, FVU."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from saelib.plots.style import figure_legend_below, legend_outside
from saelib.sae.rules import RULES

__all__ = ["RULE_STYLES", "plot_synthetic_grid", "plot_oracle_l0", "plot_factor_effects"]

# (colour, line style, label) per synthetic rule name
RULE_STYLES = {
    **{n: (r.color, r.linestyle, r.label + (" (k = true L0)" if r.knob == "k" else "")) for n, r in RULES.items()},
    "topafa-paper": (RULES["topafa"].color, RULES["topafa"].linestyle, "top-AFA, paper target"),
    "topafa-consistent": ("#0b5d1e", "-", "top-AFA, consistent target"),
}


def _style(rule: str) -> tuple[str, str, str]:
    return RULE_STYLES.get(rule, ("#000000", "-", rule))


def plot_synthetic_grid(summary: Any, *, metrics: Sequence[tuple[str, str, bool]] = (
        ("recovery", "recovery (mean max cos)", False),
        ("l0_ratio", "SAE L0 / true L0", True),
        ("fvu", "held-out FVU", True)), x: str = "superposition", col: str = "l0") -> plt.Figure:
    """One row per metric, one column per value of ``col`` (the true L0 setting); x is the
    superposition (features per dimension); one line per rule with ±1 sd over seeds.
    ``summary`` is :func:`saelib.analysis.synthetic.summarize` output (``<metric>_mean``/``_sd``)."""
    cols = sorted(summary[col].unique())
    fig, axes = plt.subplots(len(metrics), len(cols), figsize=(3.4 * len(cols) + 0.6, 2.5 * len(metrics)),
                             squeeze=False, sharex=True)
    for j, cv in enumerate(cols):
        sub = summary[summary[col] == cv]
        for i, (m, label, logy) in enumerate(metrics):
            ax = axes[i][j]
            for rule, g in sub.groupby("rule", sort=False):
                g = g.sort_values(x)
                c, ls, lab = _style(rule)
                sd = g[f"{m}_sd"].fillna(0).to_numpy()
                ax.errorbar(g[x], g[f"{m}_mean"], yerr=sd, color=c, ls=ls, marker="o", ms=3, capsize=2, label=lab)
            if m == "l0_ratio":
                ax.axhline(1.0, color="k", lw=0.8, alpha=0.6)
            if logy:
                ax.set_yscale("log")
            ax.set_xscale("log", base=2)
            xs = sorted(sub[x].unique())
            ax.set_xticks(xs)
            ax.set_xticklabels([f"{v:g}" for v in xs])
            if i == 0:
                ax.set_title(f"true L0 setting = {cv:g}")
            if j == 0:
                ax.set_ylabel(label)
            if i == len(metrics) - 1:
                ax.set_xlabel("features per dimension")
    figure_legend_below(fig, axes.flat, ncol=3, fontsize=8)  # below the panels, off the data
    return fig


def plot_oracle_l0(diag: Any, trained: Any, truth: Any = None) -> plt.Figure:
    """Top-AFA's L0 / true L0: the rule applied to the true dictionary ("oracle") against the
    trained top-AFA SAEs, per (superposition, true L0); dots = seeds. ``truth``: runs started at
    the true dictionary (rule names without the "+truth" suffix), drawn as open circles."""
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    keys = sorted({(float(s), float(l)) for s, l in zip(diag["superposition"], diag["l0"])})
    pos = {k: i for i, k in enumerate(keys)}
    xo = np.array([pos[(float(s), float(l))] for s, l in zip(diag["superposition"], diag["l0"])])
    ax.scatter(xo - 0.15, diag["oracle_afa_l0"] / diag["true_l0"], color="k", marker="s", s=14,
               label="rule on the true dictionary")
    for off, rule in ((0.0, "topafa-paper"), (0.15, "topafa-consistent")):
        t = trained[trained["rule"] == rule]
        xt = np.array([pos[(float(s), float(l))] for s, l in zip(t["superposition"], t["l0"])])
        c, _, lab = _style(rule)
        ax.scatter(xt + off, t["l0_ratio"], color=c, s=14, label=f"trained: {lab}")
        if truth is not None and (truth["rule"] == rule).any():
            u = truth[truth["rule"] == rule]
            xu = np.array([pos[(float(s), float(l))] for s, l in zip(u["superposition"], u["l0"])])
            ax.scatter(xu + off + 0.05, u["l0_ratio"], facecolors="none", edgecolors=c, s=22,
                       label=f"trained from the truth: {lab}")
    ax.axhline(1.0, color="k", lw=0.8, alpha=0.6)
    ax.set_yscale("log")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{s:g}x, L0 {l:g}" for s, l in keys], fontsize=8)
    ax.set_ylabel("L0 / true L0")
    legend_outside(ax, fontsize=7)
    fig.tight_layout()
    return fig


def plot_factor_effects(effects: Any, metrics: Sequence[str] = ("l0", "fvu")) -> plt.Figure:
    """Main effect of each two-level factor (``saelib.analysis.ablations.factor_effects`` output) on each
    metric: bars of level_b − level_a with ±2 standard errors, one panel per metric."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 2.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        e = effects[effects["metric"] == m].reset_index(drop=True)
        y = np.arange(len(e))
        ax.barh(y, e["diff"], xerr=2 * e["se"].fillna(0), color="#2ca02c", alpha=0.8, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{r.factor}: {r.level_a} → {r.level_b}" for r in e.itertuples()], fontsize=8)
        ax.set_xlabel(f"change in held-out {m}")
    fig.tight_layout()
    return fig
