"""Meta-SAE training speed on a GPT-2-sized decoder (49152 x 768 -> 2304 meta-latents, k = 4).

Measurements in one run:

1. BatchTopK's training selection on the pre-activations of one batch: the flat top-(k·N) over
   all N·m entries against :func:`saelib.sae.kernels.batch_topk_select` (per-row candidates),
   without and with the previous cut as a hint; the selected sets are asserted equal.
2. Time per optimiser step, side by side: :func:`saelib.analysis.meta.train_meta_sae` (the shared
   trainer, ``train_saes``, with the SAE's sparse kernels) with the flat selection (before) and
   the candidate selection (after); a bare loop of the same step (``SAE.forward`` with activation
   "batchtopk" + backward + Adam: the trainer's overhead) and that loop in plain autograd
   (``SAE.sparse_kernels = False``: what the kernels buy); also ``select_dtype="bfloat16"``.
   ``--old REV`` adds the removed meta-only loop (``saelib/analysis/meta.py`` at git revision
   REV, e.g. c4468ee, loaded from git) with its float32 and bfloat16 selection matmuls.
   Times are process CPU seconds (one thread: other jobs' load stays out).
3. A full training run to convergence (FVE criterion of :class:`saelib.analysis.meta.MetaSAEConfig`):
   wall time, steps, and FVE in batch and threshold mode.

The decoder is "random-like": unit rows that are sparse non-negative mixtures of hidden directions
plus isotropic noise (``--noise``); ``--kind random`` uses pure random unit rows.

    python benchmarks/meta.py                       # the paper's sizes
    python benchmarks/meta.py --rows 8192 --d 256   # quick
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F

from saelib.analysis import meta as M
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.kernels import batch_topk_select
from saelib.sae.rules import batchtopk as btk
from saelib.sae.train import make_adam, train_step


def make_decoder(kind: str, rows: int, d: int, n_hidden: int, k_hidden: int, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return F.normalize(torch.randn(rows, d, generator=g), dim=1)
    hidden = F.normalize(torch.randn(n_hidden, d, generator=g), dim=1)
    idx = torch.randint(0, n_hidden, (rows, k_hidden), generator=g)
    w = torch.rand(rows, k_hidden, generator=g)
    W = (w[:, :, None] * hidden[idx]).sum(1)
    W = F.normalize(W, dim=1) + noise / d ** 0.5 * torch.randn(rows, d, generator=g)
    return F.normalize(W, dim=1)


def flat_select(pre: torch.Tensor, n: int, hint: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The former BatchTopK selection: one flat top-n over all N·m entries (positive ones kept)."""
    flat = pre.reshape(-1)
    idx = flat.topk(min(n, flat.numel()), sorted=False).indices
    idx = idx[flat[idx] > 0].sort().values
    return idx // pre.shape[1], idx % pre.shape[1]


@contextlib.contextmanager
def selection(fn):
    """Run the BatchTopK rule with selection function ``fn`` (the trainer's step before/after)."""
    old, btk.batch_topk_select = btk.batch_topk_select, fn
    try:
        yield
    finally:
        btk.batch_topk_select = old


def best_time(f, reps: int) -> float:
    """Best process CPU time of ``reps`` calls (one thread: the machine's load stays out)."""
    f()
    ts = []
    for _ in range(reps):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return min(ts)


def cpu_per_step(train, n: int) -> float:
    """Process CPU seconds per step of ``train(steps)``: a run of n + 1 steps minus a run of 1, so
    the setup and the warm-up step cancel (after one untimed run: lazy imports and allocations)."""
    train(1)
    t = time.process_time()
    train(1)
    t1 = time.process_time() - t
    t = time.process_time()
    train(n + 1)
    return (time.process_time() - t - t1) / n


def selection_times(W: torch.Tensor, cfg: M.MetaSAEConfig, reps: int) -> tuple[float, float, float]:
    """CPU seconds for the flat selection, the candidate selection, and it with a hint (0.9 x the cut)."""
    N = W.shape[0]
    B = min(cfg.batch_size, N)
    sae = SAE(SAEConfig(d_in=W.shape[1], d_sae=cfg.width_for(N), activation="batchtopk", k=cfg.k, seed=cfg.seed))
    with torch.no_grad():
        pre = sae.pre_acts(W[torch.randperm(N, generator=torch.Generator().manual_seed(0))[:B]].to(sae.device))
    n = cfg.k * B
    ref, new = flat_select(pre, n), batch_topk_select(pre, n)
    hint = 0.9 * float(pre[new].min())
    # ties at the cut may go either way in the flat top-n: compare the values of the kept sets
    assert torch.equal(pre[ref].sort().values, pre[new].sort().values), "selections differ"
    return (best_time(lambda: flat_select(pre, n), reps), best_time(lambda: batch_topk_select(pre, n), reps),
            best_time(lambda: batch_topk_select(pre, n, hint), reps))


def old_meta_module(rev: str) -> types.ModuleType:
    """``saelib/analysis/meta.py`` at git revision ``rev`` (the removed meta-only training loop)."""
    src = subprocess.run(["git", "show", f"{rev}:saelib/analysis/meta.py"], check=True, capture_output=True,
                         text=True).stdout
    mod = types.ModuleType("old_meta")
    sys.modules["old_meta"] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:saelib/analysis/meta.py", "exec"), mod.__dict__)
    return mod


def bare_step_time(W: torch.Tensor, cfg: M.MetaSAEConfig, n_steps: int, sparse_kernels: bool,
                   select_dtype: str = "float32") -> float:
    """Process CPU seconds per step of a bare loop: SAE.forward (BatchTopK) + backward + Adam, no trainer."""
    N, d = W.shape
    B = min(cfg.batch_size, N)
    sae = SAE(SAEConfig(d_in=d, d_sae=cfg.width_for(N), activation="batchtopk", k=cfg.k, aux_k=cfg.aux_k,
                        aux_coeff=cfg.aux_coeff, dead_after_tokens=cfg.n_batches_to_dead * B, seed=cfg.seed))
    sae.sparse_kernels, sae.select_dtype = sparse_kernels, select_dtype
    sae.train()
    opt = make_adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(n_steps + 1):  # first step is warm-up
        x = W[torch.randperm(N, generator=g)[:B]]
        t = time.process_time()
        train_step(sae, opt, x)
        times.append(time.process_time() - t)
    return sum(times[1:]) / n_steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=49152, help="decoder rows (base SAE width)")
    p.add_argument("--d", type=int, default=768, help="d_model")
    p.add_argument("--d-meta", type=int, default=2304, help="meta-latents")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16384)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--min-steps", type=int, default=200)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--kind", choices=["mixture", "random"], default="mixture")
    p.add_argument("--n-hidden", type=int, default=4096, help="hidden directions of the mixture decoder")
    p.add_argument("--k-hidden", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--compare-steps", type=int, default=3, help="steps timed for the side-by-side (0: skip)")
    p.add_argument("--select-reps", type=int, default=3, help="timed repeats of the selection (best kept; 0: skip)")
    p.add_argument("--old", metavar="REV", default=None,
                   help="also time the removed meta-only loop of saelib/analysis/meta.py at git revision REV")
    p.add_argument("--no-train", action="store_true", help="skip the full training run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=49)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    W = make_decoder(args.kind, args.rows, args.d, args.n_hidden, args.k_hidden, args.noise, 0)
    if args.device:
        W = W.to(args.device)
    cfg = M.MetaSAEConfig(d_meta=args.d_meta, k=args.k, lr=args.lr, batch_size=args.batch_size,
                          max_steps=args.max_steps, min_steps=args.min_steps, window=args.window, tol=args.tol,
                          seed=args.seed)
    print(f"decoder {tuple(W.shape)} ({args.kind}), {args.d_meta} meta-latents, k={args.k}, "
          f"batch {min(args.batch_size, args.rows)}, threads {torch.get_num_threads()}")

    if args.select_reps > 0:
        t_flat, t_cand, t_hint = selection_times(W, cfg, args.select_reps)
        print(f"selection of one batch: flat top-(k·N) {t_flat:.3f} s | per-row candidates {t_cand:.3f} s "
              f"({t_flat / t_cand:.2f}x) | with the previous cut as hint {t_hint:.3f} s ({t_flat / t_hint:.2f}x)")

    if args.compare_steps > 0:
        n = args.compare_steps
        sparse_cfg = M.MetaSAEConfig(**{**cfg.__dict__, "progress": False, "log_every": 1})

        def meta(**kw):
            return lambda steps: M.train_meta_sae(
                W, dataclasses.replace(sparse_cfg, max_steps=steps, min_steps=steps, **kw))

        with selection(flat_select):
            t_before = cpu_per_step(meta(), n)
        t_meta = cpu_per_step(meta(), n)
        t_bf = cpu_per_step(meta(select_dtype="bfloat16"), n)
        print(f"train_meta_sae CPU s per step: flat selection (before) {t_before:.3f} s | candidate selection (after) "
              f"{t_meta:.3f} s (speed-up {t_before / t_meta:.2f}x) | after, select_dtype='bfloat16' {t_bf:.3f} s "
              f"(speed-up {t_before / t_bf:.2f}x)")
        if args.old:
            old = old_meta_module(args.old)
            t_old = {}
            for dt in ("float32", "bfloat16"):
                base = {f: v for f, v in sparse_cfg.__dict__.items()
                        if f in old.MetaSAEConfig.__dataclass_fields__ and f != "select_dtype"}
                t_old[dt] = cpu_per_step(lambda steps: old.train_meta_sae(W, old.MetaSAEConfig(
                    **{**base, "max_steps": steps, "min_steps": steps}, select_dtype=dt)), n)
            print(f"removed meta-only loop ({args.old}) CPU s per step: float32 selection {t_old['float32']:.3f} s, "
                  f"bfloat16 selection {t_old['bfloat16']:.3f} s | old loop as fast as train_meta_sae: "
                  f"{t_meta / t_old['float32']:.2f}x (float32), {t_meta / t_old['bfloat16']:.2f}x (bfloat16); "
                  f"both in bfloat16: {t_bf / t_old['bfloat16']:.2f}x")
        t_bare = bare_step_time(W, cfg, n, sparse_kernels=True)
        t_plain = bare_step_time(W, cfg, n, sparse_kernels=False)
        print(f"CPU s per step: train_meta_sae {t_meta:.3f} s | bare SAE.forward loop {t_bare:.3f} s "
              f"(trainer overhead {t_meta / t_bare:.2f}x) | plain autograd {t_plain:.3f} s "
              f"(sparse kernels' speed-up {t_plain / t_meta:.2f}x)")
        if args.old:
            t_bare_bf = bare_step_time(W, cfg, n, sparse_kernels=True, select_dtype="bfloat16")
            print(f"old loop as fast as the bare SAE.forward loop: {t_bare / t_old['float32']:.2f}x (float32), "
                  f"{t_bare_bf / t_old['bfloat16']:.2f}x (bfloat16: bare loop {t_bare_bf:.3f} s)")

    if args.no_train:
        return
    run = M.train_meta_sae(W, cfg)
    fb, ft = M.fve(run.sae, W, "batch"), M.fve(run.sae, W, "threshold")
    print(f"trained: {run.n_steps} steps in {run.wall_s:.1f} s ({run.s_per_step:.3f} s/step), "
          f"converged={run.converged}")
    print(f"FVE batch {fb.fve:.4f} (L0 {fb.l0:.2f}); threshold {ft.fve:.4f} (L0 {ft.l0:.2f}, "
          f"threshold {float(run.sae.threshold):.4f}); dead meta-latents {fb.dead_fraction:.1%}")


if __name__ == "__main__":
    main()
