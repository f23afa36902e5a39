"""One SAE training step, side by side: top-AFA vs TopK(k), and our TopK vs SAELens' TopK.

A step = forward with losses + backward + decoder-gradient projection + Adam step + decoder
re-normalisation (ours) / forward + backward + grad clip + Adam step (SAELens' ``SAETrainer``
step for ``TopKTrainingSAE``, built in memory). Same shapes, float32, same random batch.

Time: best of ``--repeats`` steps after one warm-up step, measured as process CPU time with
``--threads 1`` (default; the honest measure on a shared machine) or wall time otherwise.
Memory: peak bytes allocated by PyTorch's CPU allocator during one step, above what was
allocated when the step started (parameters, Adam state and the batch are excluded), from the
``torch.profiler`` memory events (allocations are placed at the start of the op that makes them).

top-AFA's cost depends on its L0. ``--afa-scales`` multiplies the encoder to emulate trained
encoders (scale 1 = the paper's init, L0 ≈ 40% of d_sae; larger scales → lower L0); the printed
L0 says which regime each row is.

    python benchmarks/train_step.py                            # d_in 768, d_sae 12288, batch 4096, k 64
    python benchmarks/train_step.py --n 1024 --d-sae 4096
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from saelib.sae import SAE, SAEConfig
from saelib.train import make_adam


def peak_step_bytes(step) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    rec = []
    for e in prof.events():
        m = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if m:
            rec.append((e.time_range.start, m))
    cur = peak = 0
    for _, m in sorted(rec):
        cur += m
        peak = max(peak, cur)
    return peak


def time_step(step, repeats: int, cpu_time: bool) -> float:
    clock = time.process_time if cpu_time else time.perf_counter
    step()  # warm-up (also allocates Adam state)
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        step()
        best = min(best, clock() - t0)
    return best


def ours_step(sae: SAE, x: torch.Tensor):
    opt = make_adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99))  # as saelib.train does
    info = {}

    def step():
        out = sae(x)
        out.loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        opt.zero_grad(set_to_none=True)
        info["l0"] = float(out.l0)
    return step, info


def saelens_step(d_in: int, d_sae: int, k: int, norm: str, x: torch.Tensor):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu",
                                                normalize_activations={"none": "none", "token": "layer_norm"}[norm]))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99))
    dead = torch.zeros(d_sae, dtype=torch.bool)
    info = {}

    def step():
        sae.train()
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                        n_training_steps=0, is_logging_step=False))
        with torch.no_grad():  # the trainer's firing bookkeeping
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        info["l0"] = float((out.feature_acts > 0).sum(-1).float().mean()) + 0 * did_fire.sum().item()
    return step, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096, help="tokens per batch")
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=12288)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--input-norm", choices=["none", "token"], default="none")
    ap.add_argument("--afa-scales", type=str, default="1,1.5,2,4", help="encoder scales for top-AFA (1 = paper init)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 → CPU-time measurement")
    ap.add_argument("--no-saelens", action="store_true", help="skip the SAELens comparison")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu_time = args.threads == 1
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n, args.d_in, generator=g) * 3 + 0.5
    common = dict(d_in=args.d_in, d_sae=args.d_sae, input_norm=args.input_norm, dead_after_tokens=10**9)

    rows = []

    def run(name, step, info):
        t = time_step(step, args.repeats, cpu_time)
        mem = peak_step_bytes(step)
        rows.append((name, t, mem, info.get("l0", float("nan"))))
        print(f"{name:<34} {t * 1e3:>10.0f} ms {mem / 2**20:>10.0f} MiB   L0 {info.get('l0', float('nan')):8.1f}", flush=True)

    print(f"training step, N={args.n} d_in={args.d_in} d_sae={args.d_sae} k={args.k} input_norm={args.input_norm} "
          f"float32, threads={torch.get_num_threads()} ({'CPU' if cpu_time else 'wall'} time)")
    topk = SAE(SAEConfig(activation="topk", k=args.k, **common))
    run(f"ours TopK k={args.k} (sparse path)", *ours_step(topk, x))
    dense = SAE(SAEConfig(activation="topk", k=args.k, **common))
    dense.sparse_kernels = False
    run(f"ours TopK k={args.k} (plain autograd)", *ours_step(dense, x))
    for s in [float(v) for v in args.afa_scales.split(",")]:
        afa = SAE(SAEConfig(activation="topafa", **common))
        with torch.no_grad():
            afa.W_enc.mul_(s)
        run(f"ours top-AFA (encoder x{s:g})", *ours_step(afa, x))
    if not args.no_saelens:
        run(f"SAELens TopKTrainingSAE k={args.k}", *saelens_step(args.d_in, args.d_sae, args.k, args.input_norm, x))

    base = rows[0]
    print("\nratios (side by side, this run):")
    for name, t, mem, l0 in rows[1:]:
        if name.startswith("ours top-AFA"):
            print(f"  {name} / ours TopK sparse: time {t / base[1]:.2f}x, peak memory {mem / max(base[2], 1):.2f}x (L0 {l0:.0f})")
            print(f"  {name} / ours TopK autograd: time {t / rows[1][1]:.2f}x, peak memory {mem / max(rows[1][2], 1):.2f}x")
        elif name.startswith("SAELens"):
            print(f"  SAELens TopK / ours TopK sparse: time {t / base[1]:.2f}x (ours is {t / base[1]:.2f}x faster), "
                  f"peak memory {mem / max(base[2], 1):.2f}x")
        else:
            print(f"  {name} / ours TopK sparse: time {t / base[1]:.2f}x, peak memory {mem / max(base[2], 1):.2f}x")


if __name__ == "__main__":
    main()
