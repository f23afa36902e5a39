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
    python benchmarks/train_step.py --device cuda                # wall time, synchronised

Every row also prints its achieved TFLOP/s (FLOPs of its matrix products / time) against the
dense matmul roofline measured in the same run, and each top-AFA row is followed by a TopK run
with k = that row's L0, for the matched-L0 ratio. The FLOP floor of a sparse step is taken as
2·d·h + 10·d·L0 per token (top-AFA) against 2·d·h + 10·d·k (TopK); the script prints the time
ratio divided by that floor ratio.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from saelib.sae.core import SAE, SAEConfig
from saelib.sae.train import make_adam, train_step


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


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def time_step(step, repeats: int, cpu_time: bool) -> float:
    clock = time.process_time if cpu_time else time.perf_counter
    step()  # warm-up (also allocates Adam state)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = clock()
        step()
        _sync()
        best = min(best, clock() - t0)
    return best


def peak_step_bytes_cuda(step) -> int:
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    _sync()
    return torch.cuda.max_memory_allocated() - base


def step_flops(step) -> float:
    """FLOPs of one step's matrix products (torch.profiler's count for mm/addmm/bmm/matmul);
    gathers, sorts and element-wise work are not counted."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, with_flops=True) as prof:
        step()
        _sync()
    return float(sum(e.flops for e in prof.key_averages() if e.flops))


def matmul_roofline(n: int, d: int, h: int, device: str, dtype: torch.dtype, repeats: int, cpu_time: bool) -> float:
    """Dense matmul roofline of this device in this run: FLOP/s of [n, d] @ [d, h] (best of repeats)."""
    a = torch.randn(n, d, device=device, dtype=dtype)
    b = torch.randn(d, h, device=device, dtype=dtype)
    t = time_step(lambda: a @ b, repeats, cpu_time)
    return 2 * n * d * h / t


def floor_flops(n: int, d: int, h: int, l0: float) -> float:
    """FLOP floor of a sparse training step, per the benchmark's definition: 2·d·h (the dense
    encoder forward) + 10·d·L0 (sparse decode, its backward and the sparse encoder backward) per token."""
    return n * (2 * d * h + 10 * d * l0)


def ours_step(sae: SAE, x: torch.Tensor):
    opt = make_adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99))  # as saelib.sae.train does
    info = {}

    def step():
        info["l0"] = float(train_step(sae, opt, x).l0)
    return step, info


def saelens_step(d_in: int, d_sae: int, k: int, norm: str, x: torch.Tensor, device: str = "cpu"):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device=device,
                                                normalize_activations={"none": "none", "token": "layer_norm"}[norm]))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.99))
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)
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
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1 → CPU-time measurement (CPU only)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: wall time, synchronised")
    ap.add_argument("--no-saelens", action="store_true", help="skip the SAELens comparison")
    ap.add_argument("--no-matched", action="store_true", help="skip the TopK runs at each top-AFA row's L0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    dev = args.device
    torch.set_num_threads(args.threads)
    cpu_time = args.threads == 1 and dev == "cpu"
    g = torch.Generator().manual_seed(args.seed)
    x = (torch.randn(args.n, args.d_in, generator=g) * 3 + 0.5).to(dev)
    common = dict(d_in=args.d_in, d_sae=args.d_sae, input_norm=args.input_norm, dead_after_tokens=10**9)
    n, d, h = args.n, args.d_in, args.d_sae

    roof = {"float32": matmul_roofline(n, d, h, dev, torch.float32, args.repeats, cpu_time)}
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        roof["tf32"] = matmul_roofline(n, d, h, dev, torch.float32, args.repeats, False)
        torch.backends.cuda.matmul.allow_tf32 = False
        roof["bfloat16"] = matmul_roofline(n, d, h, dev, torch.bfloat16, args.repeats, False)
    rows = []

    def run(name, step, info):
        t = time_step(step, args.repeats, cpu_time)
        mem = peak_step_bytes_cuda(step) if dev == "cuda" else peak_step_bytes(step)
        fl = step_flops(step)
        l0 = info.get("l0", float("nan"))
        rows.append(dict(name=name, t=t, mem=mem, l0=l0, flops=fl))
        print(f"{name:<34} {t * 1e3:>9.0f} ms {mem / 2**20:>8.0f} MiB   L0 {l0:8.1f}   "
              f"{fl / t / 1e12:6.3f} TFLOP/s = {fl / t / roof['float32']:5.1%} of the fp32 matmul roofline", flush=True)
        return rows[-1]

    clock = "CPU" if cpu_time else "wall"
    print(f"training step, N={n} d_in={d} d_sae={h} k={args.k} input_norm={args.input_norm} float32, device {dev}, "
          f"threads={torch.get_num_threads()} ({clock} time)")
    print("dense matmul roofline measured in this run ([N, d_in] @ [d_in, d_sae]): "
          + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in roof.items()))
    print("TFLOP/s below = FLOPs of the step's matrix products (profiler count) / step time")
    topk = SAE(SAEConfig(activation="topk", k=args.k, **common)).to(dev)
    base = run(f"ours TopK k={args.k} (sparse path)", *ours_step(topk, x))
    dense = SAE(SAEConfig(activation="topk", k=args.k, **common)).to(dev)
    dense.sparse_kernels = False
    auto = run(f"ours TopK k={args.k} (plain autograd)", *ours_step(dense, x))
    afa_rows = []
    for s in [float(v) for v in args.afa_scales.split(",")]:
        afa = SAE(SAEConfig(activation="topafa", **common)).to(dev)
        with torch.no_grad():
            afa.W_enc.mul_(s)
        r = run(f"ours top-AFA (encoder x{s:g})", *ours_step(afa, x))
        matched = None
        if not args.no_matched:
            km = max(1, min(h, round(r["l0"])))
            matched = run(f"  ours TopK k={km} (top-AFA's L0)", *ours_step(SAE(SAEConfig(activation="topk", k=km, **common)).to(dev), x))
        afa_rows.append((s, r, matched))
    lens = None
    if not args.no_saelens:
        lens = run(f"SAELens TopKTrainingSAE k={args.k}", *saelens_step(d, h, args.k, args.input_norm, x, dev))

    print("\nratios (side by side, this run):")
    print(f"  ours TopK plain autograd / sparse path: time {auto['t'] / base['t']:.2f}x, "
          f"peak memory {auto['mem'] / max(base['mem'], 1):.2f}x")
    if lens is not None:
        print(f"  SAELens TopK / ours TopK sparse: time {lens['t'] / base['t']:.2f}x (ours is {lens['t'] / base['t']:.2f}x "
              f"faster), peak memory {lens['mem'] / max(base['mem'], 1):.2f}x")
    for s, r, m in afa_rows:
        print(f"  top-AFA x{s:g} (L0 {r['l0']:.0f}) / ours TopK k={args.k}: time {r['t'] / base['t']:.2f}x, "
              f"peak memory {r['mem'] / max(base['mem'], 1):.2f}x; / TopK autograd: {r['t'] / auto['t']:.2f}x")
        if m is not None:
            print(f"    at matched L0: top-AFA / TopK k={round(r['l0'])}: {r['t'] / m['t']:.2f}x (goal <= 1.2)")
        floor = floor_flops(n, d, h, r["l0"]) / floor_flops(n, d, h, args.k)
        print(f"    FLOP floor ratio (2dh + 10dL0) / (2dh + 10dk) = {floor:.2f}; time ratio / floor ratio = "
              f"{r['t'] / base['t'] / floor:.2f} (goal <= 1.2 at the paper's L0: the encoder x1 row)")
    print(f"  dense TopK (plain autograd) step: {auto['flops'] / auto['t'] / 1e12:.3f} TFLOP/s = "
          f"{auto['flops'] / auto['t'] / roof['float32']:.1%} of the fp32 matmul roofline"
          + (f", {auto['flops'] / auto['t'] / roof['tf32']:.1%} of TF32" if 'tf32' in roof else "")
          + " (GPU goal: >= 40% of the TF32/BF16 roofline)")


if __name__ == "__main__":
    main()
