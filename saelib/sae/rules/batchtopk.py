"""BatchTopK SAE (Bussmann et al. 2024): in training keep the k·B largest ReLU pre-activations
of the batch; in eval mode one learned threshold θ replaces the batch rule (``pre > θ``).

θ (the SAE's ``threshold`` buffer, NaN until the first training step) follows an EMA of the
smallest kept activation, rate ``threshold_lr`` (SAELens' ``topk_threshold_lr``;
dictionary_learning uses an EMA too). The paper's code applies the batch rule at evaluation too.
After training the trainer re-estimates θ with the final weights over the last training batches
(:meth:`calibrate`, ``TrainConfig.batchtopk_threshold="final"``): in a few hundred steps the EMA
still lags the weights and remembers the first batch.

Training selection: :func:`saelib.sae.kernels.batch_topk_select`, exact (the same set as a flat
top-(k·N), ties at the cut to the lowest row-major index) from per-row candidates, with the
previous batch's cut as a hint (speed only: the set does not depend on it). Option
``sae.select_dtype = "bfloat16"`` (off by default; not saved) computes the selection's product in
bfloat16 and re-scores in float32 every entry that a rounding bound cannot exclude
(:func:`saelib.sae.kernels.batch_topk_select_lowp`): the set is the top-(k·N) of float32 values
(summed in another order than the dense product: equal up to float32 rounding), the kept values
and the dead latents' columns are float32; the step's other ``pre_acts`` entries are bfloat16-rounded.

SAELens export: ``jumprelu`` with every threshold = θ (metadata ``saelib_architecture`` brings
it back as BatchTopK when the thresholds are equal); SAELens' training-time ``batchtopk`` loads too."""
from __future__ import annotations

import torch

from saelib.sae.kernels import batch_topk_select, batch_topk_select_lowp
from saelib.sae.rules.base import Rule, kept_min


class BatchTopK(Rule):
    name, label, color, linestyle = "batchtopk", "BatchTopK", "#ff7f0e", "--"
    paper_label = "Batch Top-k"
    knob, knob_tag = "k", "k"
    calibrates = True
    stitched_as = "jumprelu"  # stitched latents keep their own SAE's θ: per-latent thresholds
    saelens_name = "jumprelu"
    saelens_loads = ("batchtopk",)

    def init_state(self, sae):
        sae._batchtopk_hint = None  # 0.9 x the previous batch's cut (speed only)
        sae._batchtopk_picked = None  # the bfloat16 selection's (rows, cols), for sparse_select
        sae.select_dtype = "float32"

    def select(self, sae, pre):
        """(rows, cols) of the batch rule's kept positive entries, row-major."""
        rows, cols = batch_topk_select(pre, sae.cfg.k * pre.shape[0], sae._batchtopk_hint)
        sae._batchtopk_hint = 0.9 * float(pre[rows, cols].min()) if rows.numel() else None
        return rows, cols

    def selection_pre_acts(self, sae, x_n):
        if sae.select_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"select_dtype must be 'float32' or 'bfloat16', got {sae.select_dtype!r}")
        if sae.select_dtype == "float32" or not (sae.training or torch.isnan(sae.threshold)):
            return sae._pre_acts_n(x_n)
        cfg, W = sae.cfg, sae.W_enc
        b = sae.b_enc if cfg.use_b_enc else None
        xc = x_n - sae.b_dec
        p = (xc.bfloat16() @ W.bfloat16()).float()
        if b is not None:
            p += b
        got = batch_topk_select_lowp(p.relu_(), xc, W, b, cfg.k * p.shape[0], sae._batchtopk_hint)
        if got is None:
            return sae._pre_acts_n(x_n)
        rows, cols, vals = got
        if cfg.aux_k > 0 and cfg.aux_coeff > 0:  # latents that may be dead after this batch: float32 columns
            maybe = (sae.tokens_since_fired + p.shape[0] >= cfg.dead_after_tokens).nonzero().squeeze(1)
            if maybe.numel():
                p[:, maybe] = (xc @ W[:, maybe] + (0 if b is None else b[maybe])).relu_()
        p[rows, cols] = vals
        sae._batchtopk_hint = 0.9 * float(vals.min()) if vals.numel() else None
        sae._batchtopk_picked = rows, cols
        return p

    def mask(self, sae, pre, x_n, *, training, key_buffer=None):
        if training or torch.isnan(sae.threshold):
            rows, cols = self.select(sae, pre)
            return torch.zeros_like(pre, dtype=torch.bool).index_put_((rows, cols), torch.ones((), dtype=torch.bool))
        return pre > sae.threshold

    def sparse_ok(self, sae) -> bool:
        return sae.cfg.k <= sae.sparse_max_density * sae.cfg.d_sae

    def sparse_select(self, sae, pre):
        picked, sae._batchtopk_picked = sae._batchtopk_picked, None
        if picked is not None:
            return picked
        return self.select(sae, pre) if sae.training or torch.isnan(sae.threshold) else None

    @torch.no_grad()
    def after_step(self, sae, kept):
        m = kept_min(kept)
        if m is None:
            return
        m = m.to(sae.threshold.dtype)
        if torch.isnan(sae.threshold):
            sae.threshold.copy_(m)
        else:
            sae.threshold.lerp_(m, sae.cfg.threshold_lr)

    @torch.no_grad()
    def calibrate(self, sae, batches):
        """θ = mean over ``batches`` (model-space training batches) of the smallest activation the
        batch rule keeps, with the *current* weights: the EMA's quantity without its lag."""
        if not batches:
            raise ValueError("calibrate_threshold needs at least one batch")
        mins = []
        for x in batches:
            x_n, _ = sae.normalize(sae._flatten(sae._check_input(x))[0])
            pre = sae._pre_acts_n(x_n)
            m = kept_min(pre[self.select(sae, pre)])
            if m is not None:
                mins.append(m.double())
        if not mins:
            raise ValueError("calibrate_threshold: no positive activation in any batch (a dead SAE?)")
        theta = float(torch.stack(mins).mean())
        sae.threshold.fill_(theta)
        return theta

    def latent_state(self, sae):
        if torch.isnan(sae.threshold):
            raise ValueError("this BatchTopK SAE has no inference threshold yet (threshold is NaN); train it "
                             "(the trainer's EMA sets it) before stitching")
        return {"jump_threshold": torch.full((sae.cfg.d_sae,), float(sae.threshold), device=sae.device)}

    def to_saelens(self, sae, w):
        if torch.isnan(sae.threshold):
            raise ValueError("This BatchTopK SAE has no inference threshold yet (it is estimated during "
                             "training); train it for at least one step before exporting to SAELens")
        w["threshold"] = torch.full((sae.cfg.d_sae,), float(sae.threshold), dtype=w["W_enc"].dtype)
        return {}

    def accepts_saelens(self, arch, lsae):
        if arch == "batchtopk":
            return True
        th = getattr(lsae, "threshold", None)
        return arch == "jumprelu" and th is not None and bool((th == th.flatten()[0]).all())

    def from_saelens(self, lsae, lcfg, meta):
        if hasattr(lsae, "topk_threshold"):  # SAELens' training-time BatchTopK
            if float(lcfg.k) != int(lcfg.k):
                raise ValueError(f"BatchTopK with fractional k={lcfg.k} is not supported; round k")
            k, th = int(lcfg.k), lsae.topk_threshold
        else:
            k, th = int((meta.get("saelib_cfg") or {}).get("k") or 1), lsae.threshold
        return {"k": k}, {"threshold": th.detach().float().cpu().flatten()[0]}


RULE = BatchTopK()
