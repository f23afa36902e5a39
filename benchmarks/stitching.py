"""Batched insertion ΔMSE vs a per-latent loop (re-encode S + j for each latent j).

Default: every latent of an 8×-wide SAE against a 4×-wide one (d = 576), random weights, 100k
tokens. The batched pass computes all latents; the loop runs on a sample of latents and its
per-latent time is extrapolated to all of them. Prints both times and their ratio (goal ≥ 20×).

    .venv/bin/python benchmarks/stitching.py                       # the issue's sizes
    .venv/bin/python benchmarks/stitching.py --tokens 8192 --arch topk --loop-latents 4
"""
from __future__ import annotations

import argparse
import time

import torch

from saelib.analysis import stitching as st
from saelib.sae.core import SAE, SAEConfig


def random_sae(d: int, m: int, act: str, k: int, seed: int) -> SAE:
    kw = {"k": k} if act in ("topk", "batchtopk") else {}
    sae = SAE(SAEConfig(d_in=d, d_sae=m, activation=act, seed=seed, **kw))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
        if act == "batchtopk":
            sae.threshold.fill_(0.05)
    return sae.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=576, help="d_in (576 SmolLM2-135M, 768 GPT-2)")
    ap.add_argument("--small", type=int, default=4, help="width of S as a multiple of d")
    ap.add_argument("--large", type=int, default=8, help="width of L as a multiple of d")
    ap.add_argument("--tokens", type=int, default=100_000, help="eval tokens")
    ap.add_argument("--arch", default="relu", choices=["relu", "batchtopk", "topk", "topafa"])
    ap.add_argument("--k", type=int, default=32, help="k for topk/batchtopk")
    ap.add_argument("--loop-latents", type=int, default=8, help="latents timed in the per-latent loop")
    ap.add_argument("--chunk", type=int, default=1024, help="tokens per chunk of the batched pass")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    d, mS, mL = args.d, args.d * args.small, args.d * args.large
    S = random_sae(d, mS, args.arch, args.k, 1)
    L = random_sae(d, mL, args.arch, args.k, 2)
    x = torch.randn(args.tokens, d, generator=torch.Generator().manual_seed(0))
    if args.device:
        S, L, x = S.to(args.device), L.to(args.device), x.to(args.device)
    print(f"{args.arch}: S {mS} latents, L {mL} latents, d={d}, {args.tokens} tokens, "
          f"{torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    res = st.insertion_delta_mse(S, L, x, chunk_tokens=args.chunk, device=args.device)
    t_batched = time.perf_counter() - t0

    lat = torch.randperm(mL, generator=torch.Generator().manual_seed(0))[: args.loop_latents]
    t0 = time.perf_counter()
    bf = st.insertion_delta_mse_bruteforce(S.cpu(), L.cpu(), x.cpu(), lat, chunk_tokens=8192)
    t_loop = (time.perf_counter() - t0) / len(lat) * mL
    err = float((res.delta_mse[lat] - bf).abs().max() / bf.abs().max().clamp_min(1e-30))
    print(f"batched, all {mL} latents: {t_batched:9.2f} s")
    print(f"per-latent loop, {len(lat)} latents timed, extrapolated to {mL}: {t_loop:9.2f} s")
    print(f"speed-up: {t_loop / t_batched:.1f}x (goal >= 20x); max relative difference on the sample {err:.2e}")


if __name__ == "__main__":
    main()
