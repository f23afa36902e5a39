"""One vocabulary of reconstruction metrics and one streaming accumulator for all of saelib.

Training logs, held-out evaluation (``eval.json``, ``EvalResult``), stitching and meta-SAEs all
report through :class:`ReconstructionMetrics`, so a name means one thing everywhere.
``x`` is an input row (an activation, or a decoder row for meta-SAEs), ``x̂`` its reconstruction,
``N`` the number of rows, ``d`` their width, ``x̄`` the per-dimension mean over all ``N`` rows.

- ``nmse``: mean over rows of ``‖x − x̂‖² / ‖x‖²`` ("Normalized MSE" of the top-AFA paper's
  ZF table and violin plots, E1/E2: ``recon_loss = l_recon / norm_z**2``). ``nmse_median`` with
  ``keep_tokens``. The paper's E3 sweep table's "Normalized MSE" is the logged training loss, the
  per-element MSE in the per-token-standardised space: that is ``mse_loss`` below (for
  ``input_norm="token"``, ``‖x‖² = d − 1``, so it is ≈ ``nmse``).
- ``fvu``: ``Σ‖x − x̂‖² / Σ‖x − x̄‖²`` (fraction of variance unexplained; numerator and
  denominator each summed over the whole set). ``explained_variance`` = ``1 − fvu`` (the
  meta-SAE paper's "FVE" of decoder rows).
- ``mse``: ``Σ‖x − x̂‖² / (N d)``. ``mse_loss``: mean of the SAE's own reconstruction loss (when
  given to :meth:`~ReconstructionMetrics.add`).
- ``cosine``: mean ``cos(x, x̂)``; ``l2_ratio``: mean ``‖x̂‖ / ‖x‖`` (shrinkage);
  ``relative_reconstruction_bias``: ``Σ‖x̂‖² / Σ⟨x, x̂⟩`` (1 = unbiased, < 1 = shrunk).
- ``l0``: mean number of active latents per row; ``l0_std``, ``l0_median``, ``l0_p10/p50/p90``
  (inverse CDF: the smallest L0 with at least that share of rows at or below it),
  ``l0_min``, ``l0_max``, from an exact histogram.
- ``dead``: latents active on none of the ``n_tokens`` rows seen; ``dead_frac`` = ``dead / d_sae``;
  ``dense``: latents active on more than ``dense_threshold`` of the rows (needs the codes).

Per-row quantities (‖x − x̂‖², ‖x‖², ⟨x, x̂⟩, ‖x − x̄_batch‖²) are reduced in the inputs' precision,
every sum over rows is float64, and the set's mean is combined across batches with Chan et al.'s
parallel update, so how the rows were split into batches changes a result only by float32
rounding (relative 1e-7; tested). Sums stay on the
device of the first batch until :meth:`~ReconstructionMetrics.result` (no host sync per batch
unless ``keep_tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["ReconstructionMetrics", "L0_QUANTILES", "held_out_metrics"]

L0_QUANTILES = (0.1, 0.5, 0.9)


class ReconstructionMetrics:
    """Streaming, batch-split-exact reconstruction and sparsity metrics (see the module docstring).

    ``add(x, x_hat, acts=...)`` per batch, then ``result()``. Sparsity comes from ``acts``
    (dense codes ``[n, d_sae]``, active = non-zero) or, without a dense temporary, from ``l0``
    (per-row active counts ``[n]``) and ``fired`` (bool ``[d_sae]``: active on some row).
    ``keep_tokens`` also keeps the per-row arrays (:meth:`tokens`) and adds ``nmse_median``.
    ``shape=False`` skips ``cosine``, ``l2_ratio`` and ``relative_reconstruction_bias`` (the
    trainer's per-step window, which logs error and sparsity only: half the work per batch).
    """

    def __init__(self, d_sae: int | None = None, *, keep_tokens: bool = False, dense_threshold: float = 0.1,
                 shape: bool = True):
        if not 0 <= dense_threshold <= 1:
            raise ValueError(f"dense_threshold must be a fraction in [0, 1], got {dense_threshold}")
        if keep_tokens and not shape:
            raise ValueError("keep_tokens keeps per-row cosines: use shape=True with it")
        self.d_sae, self.keep_tokens, self.dense_threshold = d_sae, keep_tokens, dense_threshold
        self.shape = shape
        self.n = 0
        self.d_in: int | None = None
        self._s: dict[str, Tensor] = {}  # float64 scalar sums
        self._mean: Tensor | None = None  # running per-dim mean of x
        self._hist: Tensor | None = None  # [d_sae + 1] rows per L0 value
        self._count: Tensor | None = None  # [d_sae] rows on which each latent is active
        self._fired: Tensor | None = None  # [d_sae] bool
        self._tok: dict[str, list[np.ndarray]] = {"nmse": [], "l0": [], "cosine": [], "l2_ratio": []}

    def _add(self, key: str, value: Tensor) -> None:
        self._s[key] = self._s[key] + value if key in self._s else value

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, acts: Tensor | None = None, *, l0: Tensor | None = None,
            fired: Tensor | None = None, loss: Tensor | float | None = None) -> None:
        """Add one batch: ``x``, ``x_hat`` ``[n, d]``; sparsity from ``acts`` or ``l0``/``fired``;
        ``loss``: the batch's mean reconstruction loss (reported as ``mse_loss``)."""
        if x.shape != x_hat.shape or x.ndim != 2:
            raise ValueError(f"x and x_hat must both be [n, d]; got {tuple(x.shape)} and {tuple(x_hat.shape)}")
        n = x.shape[0]
        if n == 0:
            return
        if self.d_in is None:
            self.d_in = x.shape[1]
        elif x.shape[1] != self.d_in:
            raise ValueError(f"batch width {x.shape[1]} differs from the first batch's {self.d_in}")
        # per-row reductions in the inputs' precision (this runs every training step, so no float64
        # copies of the [n, d] tensors), then float64 for everything summed over rows
        x, x_hat = x.detach(), x_hat.detach().to(device=x.device, dtype=x.dtype)
        def rowdot(a: Tensor, b: Tensor) -> Tensor:  # einsum is ~2x faster on large batches, ~8x slower on small
            return (torch.einsum("nd,nd->n", a, b) if a.numel() > 1 << 20 else torch.linalg.vecdot(a, b)).double()

        diff = x - x_hat
        err, xsq = rowdot(diff, diff), rowdot(x, x)
        nmse = err / xsq.clamp_min(1e-30)
        self._add("sse", err.sum())
        self._add("nmse", nmse.sum())
        if self.shape:
            hsq, dot = rowdot(x_hat, x_hat), rowdot(x, x_hat)
            cos = dot / (xsq.sqrt() * hsq.sqrt()).clamp_min(1e-30)
            l2r = hsq.sqrt() / xsq.sqrt().clamp_min(1e-30)
            for key, v in (("dot", dot), ("sq_hat", hsq), ("cosine", cos), ("l2_ratio", l2r)):
                self._add(key, v.sum())
        if loss is not None:
            self._add("loss", torch.as_tensor(loss, device=x.device).detach().double() * n)
        # Chan et al.: combine (n_a, mean_a, M2_a) with this batch's (n_b, mean_b, M2_b).
        c = x.mean(0)
        xc = x - c
        b_mean, b_m2 = c.double(), rowdot(xc, xc).sum()
        if self._mean is None:
            self._mean, self._s["m2"] = b_mean, b_m2
        else:
            delta = b_mean - self._mean
            tot = self.n + n
            self._s["m2"] = self._s["m2"] + b_m2 + delta.pow(2).sum() * (self.n * n / tot)
            self._mean = self._mean + delta * (n / tot)
        self.n += n
        if acts is not None:
            active = acts.detach() != 0
            l0 = active.sum(-1)
            self._sparsity(l0, active.sum(0).to(torch.float64))
        elif l0 is not None:
            self._sparsity(l0.detach(), None)
        if fired is not None:
            self._or_fired(fired.detach().bool())
        if self.keep_tokens:
            for key, v in (("nmse", nmse), ("cosine", cos), ("l2_ratio", l2r)):
                self._tok[key].append(v.cpu().numpy())
            if l0 is not None:
                self._tok["l0"].append(l0.to(torch.int32).cpu().numpy())

    def _sparsity(self, l0: Tensor, count: Tensor | None) -> None:
        m = self.d_sae if self.d_sae is not None else (count.numel() if count is not None else None)
        if m is None:
            raise ValueError("pass d_sae= to ReconstructionMetrics (or the dense codes acts=) to count L0")
        self.d_sae = m
        h = torch.bincount(l0.long().flatten(), minlength=m + 1)
        if h.numel() > m + 1:
            raise ValueError(f"an L0 above d_sae={m}: the codes do not belong to this dictionary")
        self._hist = h if self._hist is None else self._hist + h.to(self._hist.device)
        if count is not None:
            self._count = count if self._count is None else self._count + count.to(self._count.device)
            self._or_fired(count > 0)

    def _or_fired(self, fired: Tensor) -> None:
        self.d_sae = self.d_sae or fired.numel()
        self._fired = fired if self._fired is None else self._fired | fired.to(self._fired.device)

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`result` needs, as tensors and ints (for a trainer's checkpoint)."""
        if self.keep_tokens:
            raise ValueError("per-row arrays are not checkpointed: use keep_tokens=False")
        return {"n": self.n, "d_in": self.d_in, "d_sae": self.d_sae, "sums": dict(self._s), "mean": self._mean,
                "hist": self._hist, "count": self._count, "fired": self._fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; adding the same later batches then gives bit-identical results."""
        self.n, self.d_in, self.d_sae, self._s = state["n"], state["d_in"], state["d_sae"], dict(state["sums"])
        self._mean, self._hist, self._count, self._fired = state["mean"], state["hist"], state["count"], state["fired"]

    @property
    def latent_freq(self) -> Tensor | None:
        """float64 [d_sae]: share of the rows on which each latent was active (needs ``acts``)."""
        return None if self._count is None else (self._count / max(self.n, 1)).cpu()

    def l0_hist(self) -> list[int]:
        """Rows per L0 value, trimmed after the largest L0 seen."""
        if self._hist is None:
            return []
        nz = torch.nonzero(self._hist).flatten()
        return self._hist[: int(nz[-1]) + 1 if len(nz) else 1].cpu().tolist()

    def tokens(self) -> dict[str, np.ndarray]:
        """Per-row arrays ``nmse``, ``cosine``, ``l2_ratio`` (float32) and ``l0`` (int32), in order."""
        if not self.keep_tokens:
            raise ValueError("per-row arrays need ReconstructionMetrics(keep_tokens=True)")
        return {k: (np.concatenate(v) if v else np.zeros(0)).astype(np.int32 if k == "l0" else np.float32)
                for k, v in self._tok.items()}

    def result(self) -> dict[str, Any]:
        """The metrics of everything added so far (names in the module docstring)."""
        if self.n == 0:
            raise ValueError("no rows were added: evaluate on at least one token")
        s = {k: float(v) for k, v in self._s.items()}
        if not all(math.isfinite(s[k]) for k in ("sse", "nmse", "m2")):
            raise ValueError("the reconstruction or its input is non-finite (a diverged SAE or broken "
                             "activations): check the weights with SAE.load, which verifies finiteness")
        n, d = self.n, self.d_in
        fvu = s["sse"] / s["m2"] if s["m2"] > 0 else float("nan")
        out: dict[str, Any] = {
            "n_tokens": n, "nmse": s["nmse"] / n, "fvu": fvu, "explained_variance": 1.0 - fvu,
            "mse": s["sse"] / (n * d),
        }
        if self.shape:
            out.update({"cosine": s["cosine"] / n, "l2_ratio": s["l2_ratio"] / n,
                        "relative_reconstruction_bias": s["sq_hat"] / s["dot"] if s["dot"] != 0 else float("nan")})
        if "loss" in s:
            out["mse_loss"] = s["loss"] / n
        if self.keep_tokens:
            out["nmse_median"] = float(np.median(np.concatenate(self._tok["nmse"])))
        if self._hist is not None:
            out.update(_hist_stats(self._hist.double().cpu()))
        if self._fired is not None:
            dead = int((~self._fired).sum())
            out["dead"], out["dead_frac"] = dead, dead / self.d_sae
        if self._count is not None:
            out["dense"] = int((self._count / n > self.dense_threshold).sum())
        return out


def _hist_stats(h: Tensor) -> dict[str, float]:
    """Mean, std, median, quantiles, min and max of the L0 histogram ``h`` [d_sae + 1]."""
    n = float(h.sum())
    v = torch.arange(h.numel(), dtype=torch.float64)
    mean = float((h * v).sum() / n)
    cdf = h.cumsum(0)
    order = lambda i: int(torch.searchsorted(cdf, torch.tensor(i + 1.0, dtype=torch.float64)))  # noqa: E731
    nz = torch.nonzero(h).flatten()
    res = {"l0": mean, "l0_std": math.sqrt(max(float((h * (v - mean) ** 2).sum() / n), 0.0)),
           "l0_median": (order((int(n) - 1) // 2) + order(int(n) // 2)) / 2}
    res.update({f"l0_p{int(q * 100)}": int(torch.searchsorted(cdf / n, torch.tensor(q, dtype=torch.float64)))
                for q in L0_QUANTILES})
    res["l0_min"], res["l0_max"] = int(nz[0]), int(nz[-1])
    return res


@torch.no_grad()
def held_out_metrics(saes: Mapping[str, Any], batches: Iterable[Mapping[str, Tensor]], *,
                     device: str | torch.device | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """The trainer's held-out evaluation (``eval.json``): every saelib SAE over *all* tokens of
    ``batches`` (``{hook: Tensor[n, d_in]}``, read once), in eval mode (BatchTopK uses its inference
    threshold). Per SAE: :meth:`ReconstructionMetrics.result` with ``mse_loss`` (the SAE's own loss
    in its normalised space: the top-AFA paper's E3 "Normalized MSE") and ``l0_hist``.
    ``saelib.analysis.evaluate.evaluate_saes`` adds CE/KL and ZF statistics and takes any SAE."""
    accs = {n: ReconstructionMetrics(int(s.cfg.d_sae)) for n, s in saes.items()}
    for s in saes.values():
        s.eval()
    for batch in tqdm(batches, desc="held-out eval", unit="batch", disable=not progress):
        for name, sae in saes.items():
            hook = sae.cfg.hook_name
            if hook not in batch:
                raise ValueError(f"eval batch lacks hook {hook!r} needed by SAE {name!r}; it has {sorted(batch)}")
            x = batch[hook].to(device=device or sae.W_dec.device, dtype=sae.W_dec.dtype)
            out = sae(x)
            accs[name].add(x, out.x_hat, l0=out.l0_tokens, fired=out.fired, loss=out.mse_loss)
    if any(a.n == 0 for a in accs.values()):
        raise ValueError("eval_batches yielded no tokens; pass a held-out batch iterable with at least one batch")
    return {n: {**a.result(), "l0_hist": a.l0_hist()} for n, a in accs.items()}
