"""Meta-SAE training speed on a GPT-2-sized decoder (49152 x 768 -> 2304 meta-latents, k = 4).

Two measurements in one run:

1. Time per optimiser step, side by side: :func:`saelib.analysis.meta.train_meta_sae` (the shared
   trainer, ``train_saes``, with the SAE's sparse kernels) against a bare loop of the same step
   (``SAE.forward`` with activation "batchtopk" + backward + Adam: the trainer's overhead) and
   against that loop in plain autograd (``SAE.sparse_kernels = False``: what the kernels buy).
2. A full training run to convergence (FVE criterion of :class:`saelib.analysis.meta.MetaSAEConfig`):
   wall time, steps, and FVE in batch and threshold mode.

The decoder is "random-like": unit rows that are sparse non-negative mixtures of hidden directions
plus isotropic noise (``--noise``); ``--kind random`` uses pure random unit rows.

    python benchmarks/meta.py                       # the paper's sizes
    python benchmarks/meta.py --rows 8192 --d 256   # quick
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from saelib.analysis import meta as M
from saelib.sae.core import SAE, SAEConfig
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


def bare_step_time(W: torch.Tensor, cfg: M.MetaSAEConfig, n_steps: int, sparse_kernels: bool) -> float:
    """Seconds per step of a bare loop: SAE.forward (BatchTopK) + backward + Adam, no trainer."""
    N, d = W.shape
    B = min(cfg.batch_size, N)
    sae = SAE(SAEConfig(d_in=d, d_sae=cfg.width_for(N), activation="batchtopk", k=cfg.k, aux_k=cfg.aux_k,
                        aux_coeff=cfg.aux_coeff, dead_after_tokens=cfg.n_batches_to_dead * B, seed=cfg.seed))
    sae.sparse_kernels = sparse_kernels
    sae.train()
    opt = make_adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(n_steps + 1):  # first step is warm-up
        x = W[torch.randperm(N, generator=g)[:B]]
        t = time.perf_counter()
        train_step(sae, opt, x)
        times.append(time.perf_counter() - t)
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

    if args.compare_steps > 0:
        n = args.compare_steps
        sparse_cfg = M.MetaSAEConfig(**{**cfg.__dict__, "max_steps": n + 1, "min_steps": n + 1, "progress": False,
                                        "log_every": 1})
        t_meta = M.train_meta_sae(W, sparse_cfg).s_per_step  # first (warm-up) step excluded, as below
        t_bare = bare_step_time(W, cfg, n, sparse_kernels=True)
        t_plain = bare_step_time(W, cfg, n, sparse_kernels=False)
        print(f"time per step: train_meta_sae {t_meta:.3f} s | bare SAE.forward loop {t_bare:.3f} s "
              f"(trainer overhead {t_meta / t_bare:.2f}x) | plain autograd {t_plain:.3f} s "
              f"(sparse kernels' speed-up {t_plain / t_meta:.2f}x)")

    run = M.train_meta_sae(W, cfg)
    fb, ft = M.fve(run.sae, W, "batch"), M.fve(run.sae, W, "threshold")
    print(f"trained: {run.n_steps} steps in {run.wall_s:.1f} s ({run.s_per_step:.3f} s/step), "
          f"converged={run.converged}")
    print(f"FVE batch {fb.fve:.4f} (L0 {fb.l0:.2f}); threshold {ft.fve:.4f} (L0 {ft.l0:.2f}, "
          f"threshold {float(run.sae.threshold):.4f}); dead meta-latents {fb.dead_fraction:.1%}")


if __name__ == "__main__":
    main()
