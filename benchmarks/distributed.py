"""A sweep on 2 processes against 1 (torch.distributed through torchrun), same SAEs, same stream.

The sweep: ``--n-saes`` TopK/BatchTopK SAEs (576 -> 2304 on the embedded model's layer 6)
trained on activations streamed from the model (:class:`saelib.sae.distributed.DistributedActivationStore`),
so both kinds of distributed work are measured: the SAEs split over the ranks and the model
forwards split over the ranks (then all-gathered). Each configuration runs as its own
``torchrun`` job; the time is the wall time of ``train_sweep`` on rank 0 (after a barrier; model
loading and start-up excluded), and the job also checks that every SAE equals the one-process
run's bit for bit (CPU).

Each process uses ``--threads`` threads (default 1: 2 processes then use the 2 cores a
one-process run with one thread leaves idle; ``--single-threads 2`` gives the one-process run
both cores instead). On a shared machine the ratio is only meaningful when both jobs saw the
same load: the script prints the load average beside it.

    python benchmarks/distributed.py                 # CPU, gloo
    python benchmarks/distributed.py --device cuda   # one GPU per rank, NCCL (needs 2 GPUs)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    import torch.distributed as dist

    from saelib.sae import distributed
    from saelib.lm.data import token_rows
    from saelib.sae.distributed import DistributedActivationStore, train_sweep
    from saelib.lm.models import hook_name, load_model
    from saelib.pipeline import sweep_configs
    from saelib.sae.train import TrainConfig

    rank, n_ranks = distributed.init()
    torch.set_num_threads(args.threads)
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    model = load_model(args.model, device=device)
    hook = hook_name(args.layer)
    tokens = token_rows(model, args.corpus, n_tokens=args.rows * args.seq_len, seq_len=args.seq_len, seed=0,
                        progress=False)
    ks = [32, 64, 128, 256][: (args.n_saes + 1) // 2]
    configs = sweep_configs([hook], model.cfg.d_model, args.d_sae, topk_ks=ks, batchtopk_ks=ks[: args.n_saes // 2],
                            dead_after_tokens=20_480)
    n_tokens = args.rows * (args.seq_len - 1) // args.batch * args.batch
    cfg = TrainConfig(batch_size=args.batch, n_tokens=n_tokens, out_dir=args.out, progress=False, device=device,
                      log_every=max(1, n_tokens // args.batch))
    store = DistributedActivationStore(model, tokens, [hook], batch_size=args.batch, buffer_tokens=8 * args.batch,
                                       model_batch_size=args.model_batch, seed=0, device=device)
    if n_ranks > 1:
        dist.barrier()
    t0 = time.perf_counter()
    train_sweep(configs, store, cfg)
    if n_ranks > 1:
        dist.barrier()
    wall = time.perf_counter() - t0
    if rank == 0:
        Path(args.out, "bench.json").write_text(json.dumps({"wall": wall, "world": n_ranks, "saes": list(configs),
                                                             "steps": cfg.n_steps, "load": os.getloadavg()}))
    if n_ranks > 1:
        dist.destroy_process_group()


def launch(args, nproc: int, threads: int, out: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           __file__, "--worker", "--out", out, "--threads", str(threads)]
    for k in ("device", "model", "corpus", "layer", "rows", "seq_len", "d_sae", "n_saes", "batch", "model_batch"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return json.loads(Path(out, "bench.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--corpus", default="embedded")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--rows", type=int, default=256, help="token rows streamed (each SAE sees them once)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--n-saes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--model-batch", type=int, default=8, help="rows per forward chunk")
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--single-threads", type=int, default=None, help="threads of the one-process run (default --threads)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        ap.error(f"--device cuda with {args.nproc} processes needs {args.nproc} GPUs (one per rank); "
                 f"{torch.cuda.device_count()} visible")
    single = args.single_threads or args.threads
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(args, 1, single, os.path.join(tmp, "one"))
        many = launch(args, args.nproc, args.threads, os.path.join(tmp, "many"))
        from saelib.pipeline import load_saes

        a, b = load_saes(os.path.join(tmp, "one")), load_saes(os.path.join(tmp, "many"))
        same = all(torch.equal(x, y) or (x.isnan().all() and y.isnan().all())
                   for n in a for x, y in zip(a[n].state_dict().values(), b[n].state_dict().values()))
    print(f"sweep: {len(one['saes'])} SAEs ({', '.join(one['saes'])}), {one['steps']} steps of {args.batch} tokens "
          f"streamed from {args.model} layer {args.layer}; device {args.device}")
    print(f"1 process x {single} thread(s):  {one['wall']:7.1f} s   (load average then {one['load'][0]:.1f})")
    print(f"{args.nproc} processes x {args.threads} thread(s): {many['wall']:7.1f} s   (load average then {many['load'][0]:.1f})")
    print(f"ratio {args.nproc} processes / 1: {many['wall'] / one['wall']:.2f}  (goal <= 0.6 on 2 idle cores); "
          f"SAEs equal to the one-process run bit for bit: {same}")


if __name__ == "__main__":
    main()
