"""Sweep tables of chapter 3: top-AFA against the TopK/BatchTopK frontiers at matched L0, and the
paper's GPT-2 numbers beside ours.

The functions read a sweep table (``sweep_table``: one row per SAE) with a ``layer`` column and
a ``knob`` label per run (``k=64``, ``λ=1/32``; :func:`saelib.sae.rules.knob_text`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["frontier_at", "frontier_summary", "matched_l0", "paper_comparison"]

FRONTIERS = ("topk", "batchtopk")
"""The fixed-budget rules whose (L0, NMSE) points form the frontiers top-AFA is compared with."""


def frontier_at(l0: float, frontier: pd.DataFrame, y: str = "nmse") -> float:
    """``y`` of a frontier (rows with ``l0`` and ``y``) at ``l0``, interpolated linearly in log-log
    between its neighbouring points; NaN when ``l0`` lies outside its range or it has < 2 points."""
    b = frontier.sort_values("l0")
    if len(b) < 2 or not (b["l0"].min() <= l0 <= b["l0"].max()):
        return float("nan")
    return float(np.exp(np.interp(np.log(l0), np.log(b["l0"]), np.log(b[y]))))


def matched_l0(table: pd.DataFrame, rule: str = "topafa", frontiers: tuple[str, ...] = FRONTIERS) -> pd.DataFrame:
    """One row per run of ``rule``: its L0 and NMSE, each frontier's NMSE at that L0 and the run's
    relative difference ``nmse / frontier - 1`` (negative: it reconstructs better at equal L0)."""
    rows = []
    for layer, sub in table.groupby("layer"):
        for _, r in sub[sub["activation"] == rule].sort_values("l0").iterrows():
            row = {"layer": layer, "knob": r["knob"], "l0": r["l0"], "nmse": r["nmse"]}
            for act in frontiers:
                at = frontier_at(r["l0"], sub[sub["activation"] == act])
                row[f"{act}_nmse"], row[f"vs_{act}"] = at, r["nmse"] / at - 1
            rows.append(row)
    return pd.DataFrame(rows, columns=["layer", "knob", "l0", "nmse",
                                       *(c for a in frontiers for c in (f"{a}_nmse", f"vs_{a}"))])


def frontier_summary(table: pd.DataFrame) -> str:
    """Per layer: the lowest-NMSE run, then every top-AFA run against each frontier at its L0 (text)."""
    m = matched_l0(table)
    lines = []
    for layer, sub in table.groupby("layer"):
        best = sub.loc[sub["nmse"].idxmin()]
        lines.append(f"layer {layer}: lowest NMSE {best['nmse']:.4g} by {best['activation']} {best['knob']} "
                     f"at L0 {best['l0']:.0f}.")
        for _, r in m[m["layer"] == layer].iterrows():
            parts = [f"{act}: L0 {r['l0']:.0f} outside its range" if np.isnan(r[f"{act}_nmse"]) else
                     f"{act} at that L0 ≈ {r[f'{act}_nmse']:.4g} (top-AFA {100 * r[f'vs_{act}']:+.0f}%)"
                     for act in FRONTIERS]
            lines.append(f"  top-AFA {r['knob']}: L0 {r['l0']:.0f}, NMSE {r['nmse']:.4g}; " + "; ".join(parts))
    return "\n".join(lines)


def paper_comparison(table: pd.DataFrame, paper: pd.DataFrame, layer_map: dict[int, int],
                     train_nmse: pd.Series) -> pd.DataFrame:
    """The paper's L0 and NMSE beside ours at the same rule and knob.

    ``paper``: rows with ``activation, layer, k, afa_coeff, l0, nmse`` (:func:`saelib.paper.e3_results`);
    ``layer_map``: our layer -> the paper's; ``train_nmse``: our last training-window NMSE by run name.
    NaN where the paper has no such run.
    """
    rows = []
    for _, r in table.iterrows():
        pl = layer_map[r["layer"]]
        same = (paper["activation"] == r["activation"]) & (paper["layer"] == pl)
        knob = (np.isclose(paper["afa_coeff"].astype(float), r["afa_coeff"]) if r["activation"] == "topafa"
                else paper["k"] == r["k"])
        p = paper[same & knob]
        rows.append({
            "layer (paper/ours)": f"{pl}/{r['layer']}", "activation": r["activation"], "k or λ": r["knob"],
            "paper: L0": p["l0"].iloc[0] if len(p) else np.nan, "paper: NMSE": p["nmse"].iloc[0] if len(p) else np.nan,
            "ours: L0": r["l0"], "ours: NMSE": r["nmse"], "ours: mse_loss": r["mse_loss"],
            "ours: train NMSE": train_nmse[r["name"]],
        })
    return pd.DataFrame(rows).sort_values(["layer (paper/ours)", "activation", "ours: L0"])
