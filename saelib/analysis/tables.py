"""Results across seeds and in the top-AFA paper's table formats.

Seeds: :func:`aggregate_seeds` (mean and a t-distribution 95% CI) and :func:`welch_ttest` (as in the
paper's rebuttal). Tables: :func:`comparison_table` (the per-layer sweep table), :func:`mdl_table`
(description lengths), :func:`format_table` (markdown or LaTeX). Inputs are
:class:`~saelib.analysis.evaluate.EvalResult` summaries or frames with the same columns
(names of :mod:`saelib.sae.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from saelib.analysis.afa import mdl_bits
from saelib.analysis.evaluate import EvalResult
from saelib.sae.rules import RULES, rule_attr

__all__ = ["MeanCI", "WelchResult", "aggregate_seeds", "comparison_table", "format_table", "mdl_table",
           "mean_ci", "welch_ttest"]


# --------------------------------------------------------------------------------------------
# Across seeds: mean ± t-CI, Welch's t-test
# --------------------------------------------------------------------------------------------


class MeanCI(NamedTuple):
    """Mean of n values with a two-sided t-distribution confidence interval."""

    mean: float
    std: float
    """Sample standard deviation (ddof=1)."""
    n: int
    low: float
    high: float
    half_width: float


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> MeanCI:
    """Mean and ``confidence`` CI, ``mean ± t_{(1+c)/2, n−1} · s / √n`` (NaN width for n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return MeanCI(float("nan"), float("nan"), 0, float("nan"), float("nan"), float("nan"))
    m = float(x.mean())
    if n < 2:
        return MeanCI(m, float("nan"), n, float("nan"), float("nan"), float("nan"))
    s = float(x.std(ddof=1))
    hw = float(stats.t.ppf((1 + confidence) / 2, n - 1) * s / math.sqrt(n))
    return MeanCI(m, s, n, m - hw, m + hw, hw)


def aggregate_seeds(
    results: Sequence[EvalResult | Mapping[str, Any]] | pd.DataFrame,
    *,
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Mean, sample std and t-distribution CI of each metric across seeds (one row per metric).

    ``results``: EvalResults, summary dicts, or a DataFrame whose rows are seeds of one
    configuration. ``metrics`` defaults to every numeric column except identity fields.
    """
    if isinstance(results, pd.DataFrame):
        frame = results
    else:
        frame = pd.DataFrame([r.summary() if isinstance(r, EvalResult) else dict(r) for r in results])
    if frame.empty:
        raise ValueError("aggregate_seeds needs at least one result.")
    skip = {"seed", "n_tokens", "d_in", "d_sae", "k", "afa_coeff", "l1_coeff", "layer"}
    if metrics is None:
        metrics = [c for c in frame.columns if c not in skip and pd.api.types.is_numeric_dtype(frame[c])]
    rows = []
    for m in metrics:
        if m not in frame.columns:
            raise ValueError(f"metric {m!r} not in results; available: {sorted(frame.columns)}")
        r = mean_ci(frame[m].to_numpy(dtype=float), confidence)
        rows.append({"metric": m, "mean": r.mean, "std": r.std, "n": r.n, "ci_low": r.low,
                     "ci_high": r.high, "ci_half": r.half_width})
    return pd.DataFrame(rows).set_index("metric")


class WelchResult(NamedTuple):
    """Welch's unequal-variance t-test of mean(a) vs mean(b)."""

    t: float
    p: float
    """Two-sided p-value."""
    df: float
    """Welch–Satterthwaite degrees of freedom."""
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int


def welch_ttest(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> WelchResult:
    """Welch's t-test (``scipy.stats.ttest_ind(a, b, equal_var=False)``), as in the paper's rebuttal.

    t < 0 means mean(a) < mean(b). Needs at least two values on each side.
    """
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.size < 2 or xb.size < 2:
        raise ValueError(f"Welch's t-test needs >= 2 values per group; got {xa.size} and {xb.size} "
                         "(train more seeds).")
    r = stats.ttest_ind(xa, xb, equal_var=False)
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    denom = va**2 / (xa.size - 1) + vb**2 / (xb.size - 1)
    df = float((va + vb) ** 2 / denom) if denom > 0 else float("nan")
    return WelchResult(float(r.statistic), float(r.pvalue), df, float(xa.mean()), float(xb.mean()),
                       int(xa.size), int(xb.size))


# --------------------------------------------------------------------------------------------
# Tables in the paper's format
# --------------------------------------------------------------------------------------------


def _frac(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    f = Fraction(float(x)).limit_denominator(4096)
    if f.numerator == 1 and abs(float(f) - float(x)) < 1e-9:
        return f"1/{f.denominator}"
    return f"{float(x):.4g}"


def comparison_table(frame: pd.DataFrame, *, metric: str = "nmse", l0: str = "l0",
                     ci: str | None = None) -> pd.DataFrame:
    """The paper's per-layer table: Layer, Activation, k, λ_AFA, Sparsity (L0), Normalized MSE.

    ``frame`` has one row per SAE (or per configuration averaged over seeds) with columns
    ``layer``, ``activation``, ``k``, ``afa_coeff``, ``l0`` and ``metric`` (EvalResult summaries
    work directly). k is shown only for TopK/BatchTopK and λ_AFA only for top-AFA, as in the paper.
    The column ``best`` marks the layer's minimum of ``metric``; ``ci`` optionally names a column
    of CI half-widths shown as ± after the metric.
    """
    need = {"layer", "activation", metric, l0}
    missing = need - set(frame.columns)
    if missing:
        raise ValueError(f"comparison_table needs columns {sorted(missing)}; got {sorted(frame.columns)}.")
    rows = []
    for _, r in frame.iterrows():
        act = str(r["activation"])
        k = r.get("k")
        rows.append({
            "Layer": int(r["layer"]),
            "Activation": rule_attr(act, "paper_label", act),
            "k": int(k) if rule_attr(act, "knob") == "k" and k is not None and not pd.isna(k) else "-",
            "λ_AFA": _frac(r.get("afa_coeff")) if rule_attr(act, "knob") == "afa_coeff" else "-",
            "L0": float(r[l0]),
            "NMSE": float(r[metric]),
            "±": float(r[ci]) if ci is not None and ci in frame.columns else float("nan"),
        })
    out = pd.DataFrame(rows)
    if ci is None:
        out = out.drop(columns="±")
    out["best"] = out.groupby("Layer")["NMSE"].transform("min") == out["NMSE"]
    order = {r.paper_label: i for i, r in enumerate(RULES.values())}
    out["_o"] = out["Activation"].map(order).fillna(99)
    return out.sort_values(["Layer", "_o", "L0"]).drop(columns="_o").reset_index(drop=True)


def format_table(table: pd.DataFrame, *, fmt: str = "markdown", mark: str = "best") -> str:
    """Render a table as markdown (minimum in bold with ★) or LaTeX (bold + underline, as in the paper)."""
    if fmt not in ("markdown", "latex"):
        raise ValueError("fmt must be 'markdown' or 'latex'.")
    cols = [c for c in table.columns if c != mark]

    def cell(c: str, v: Any, best: bool) -> str:
        if isinstance(v, float):
            if "L0" in c:
                s = f"{v:.1f}"
            elif "bits" in c:
                s = f"{v:,.1f}"
            else:
                s = f"{v:.3e}" if v != 0 and abs(v) < 1e-3 else f"{v:.4g}"
        else:
            s = str(v)
        if best and c in ("NMSE", "MDL (bits)"):
            s = f"\\underline{{\\textbf{{{s}}}}}" if fmt == "latex" else f"**{s}** ★"
        return s

    lines = []
    if fmt == "markdown":
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
    else:
        lines.append("\\begin{tabular}{" + "l" * len(cols) + "}\n\\toprule")
        lines.append(" & ".join(cols) + " \\\\\n\\midrule")
    for _, r in table.iterrows():
        best = bool(r[mark]) if mark in table.columns else False
        cells = [cell(c, r[c], best) for c in cols]
        lines.append("| " + " | ".join(cells) + " |" if fmt == "markdown" else " & ".join(cells) + " \\\\")
    if fmt == "latex":
        lines.append("\\bottomrule\n\\end{tabular}")
    return "\n".join(lines)


def mdl_table(frame: pd.DataFrame, *, metric: str = "nmse", l0: str = "l0",
              bits_per_float: float = 7.0, best_only: bool = True, tolerance: Any = None,
              rel_band: float = 0.10) -> pd.DataFrame:
    """The paper's MDL table: layer, method, tolerance (= NMSE), L0, description length in bits.

    ``DL = L0 · (B + log2 D)`` (Ayonrinde et al. 2024) via ``saelib.analysis.afa.mdl_bits``, with
    ``B = bits_per_float`` and ``D = d_sae``.

    Description lengths compare only at a common reconstruction tolerance (MDL asks for the
    shortest code *that reconstructs to a given error*). Two modes:

    * ``tolerance=None`` (the paper's table): with ``best_only`` the minimum-NMSE run of each
      (layer, method). In the paper these runs sit at nearly the same NMSE (1.6–2.0e-4), so the
      comparison is at matched tolerance there; on other grids it need not be.
    * ``tolerance="matched"`` or a number: per layer a common tolerance τ (``"matched"``: the
      largest of the methods' minimum NMSEs, the tightest error every method reaches); each
      method contributes its **lowest-L0 run with NMSE ≤ τ**. Grids are discrete, so a method's
      chosen run can sit well below τ (its DL is then an over-estimate); a layer's ``comparable``
      column is True only when every chosen run's NMSE is within ``rel_band`` (relative) of τ, and
      ``best`` (the minimum DL) is marked only in comparable layers.

    Returned columns: layer, method, tolerance (NMSE) (the run's own NMSE), L0, MDL (bits), best,
    and with a tolerance also tau, comparable.
    """
    need = {"layer", "activation", "d_sae", metric, l0}
    missing = need - set(frame.columns)
    if missing:
        raise ValueError(f"mdl_table needs columns {sorted(missing)}; got {sorted(frame.columns)}.")
    if rel_band < 0:
        raise ValueError(f"rel_band must be >= 0, got {rel_band}")
    df = frame
    tau_of: dict[Any, float] = {}
    if tolerance is not None:
        if not (tolerance == "matched" or (isinstance(tolerance, (int, float)) and tolerance > 0)):
            raise ValueError(f"tolerance must be None, 'matched' or a positive NMSE, got {tolerance!r}")
        picks = []
        for layer, g in df.groupby("layer"):
            tau = float(g.groupby("activation")[metric].min().max()) if tolerance == "matched" else float(tolerance)
            tau_of[layer] = tau
            ok = g[g[metric] <= tau * (1 + 1e-12)]
            if len(ok):
                picks.append(ok.loc[ok.groupby("activation")[l0].idxmin()])
        df = pd.concat(picks) if picks else df.iloc[:0]
    elif best_only:
        df = df.loc[df.groupby(["layer", "activation"])[metric].idxmin()]
    rows = []
    for _, r in df.iterrows():
        act = str(r["activation"])
        knob = {"k": f" (k={int(r['k'])})" if not pd.isna(r.get("k")) else "",
                "afa_coeff": f" ({_frac(r.get('afa_coeff'))})"}.get(rule_attr(act, "knob"), "")
        rows.append({
            "layer": int(r["layer"]),
            "method": rule_attr(act, "paper_label", act) + knob,
            "tolerance (NMSE)": float(r[metric]),
            "L0": float(r[l0]),
            "MDL (bits)": float(mdl_bits(float(r[l0]), bits_per_value=bits_per_float, dict_size=int(r["d_sae"]))),
        })
    out = pd.DataFrame(rows, columns=["layer", "method", "tolerance (NMSE)", "L0", "MDL (bits)"])
    out = out.sort_values(["layer", "method"]).reset_index(drop=True)
    out["best"] = out.groupby("layer")["MDL (bits)"].transform("min") == out["MDL (bits)"]
    if tolerance is not None:
        out["tau"] = out["layer"].map(tau_of)
        within = out["tolerance (NMSE)"] >= out["tau"] / (1 + rel_band)
        methods = frame.groupby("layer")["activation"].nunique()
        comp = within.groupby(out["layer"]).transform("all") & (
            out.groupby("layer")["method"].transform("count") == out["layer"].map(methods))
        out["comparable"] = comp
        out["best"] = out["best"] & out["comparable"]
    return out
