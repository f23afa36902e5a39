"""End-to-end TopK SAE training against the peer libraries, side by side on the same activations.

Every library trains the same SAE (TopK, d_in -> d_sae, k) on the same cached residual-stream
activations of the embedded model, in the same batch order, with its own trainer, its own
optimiser defaults and its own aux-k (dead-latent) loss switched on:

* saelib      ``saelib.sae.train.train_saes`` (Adam 1e-3 after a 5% warm-up as in the book's
               chapter 3, aux 1/32 over 512 latents, dead after
               20,480 tokens: the top-AFA paper's settings);
* sparsify    ``sparsify.Trainer.fit`` (PyPI ``eai-sparsify``; its defaults: signum optimiser,
               dead after 10 M tokens; ``auxk_alpha`` 1/32 because its default is 0). Its trainer
               reads a model, so a replay module serves the cached activations at the hookpoint;
* dictionary_learning  ``TopKTrainer.update`` (PyPI ``dictionary-learning``: Adam at its
               auto learning rate, aux 1/32, dead after 10 M tokens);
* SAELens     ``SAETrainer.fit`` with ``TopKTrainingSAE`` (already a runtime dependency; dead after
               1,000 batches).

Each library's own dead-latent window is kept (printed in the table): a peer whose window is
longer than the run never runs its aux loss. ``--dead-tokens N`` gives all four the same window.

Printed per library: seconds per 1 M training tokens (process CPU time with one thread, the
honest clock on a shared machine; wall time beside it), ratio to saelib, and held-out FVU =
sum ||x - x_hat||^2 / sum ||x - mean||^2 over the held-out activations, computed the same way for all.

The peers are not dependencies of saelib. Install them on demand (``make bench-peers`` does it)::

    pip install --target .bench-peers --no-deps eai-sparsify==1.3.3 dictionary-learning==0.1.0 \\
        natsort==8.4.0 schedulefree==1.4.1

``--no-deps`` keeps the shared environment's torch; ``.bench-peers`` is put on ``sys.path`` by
this script. dictionary_learning's package ``__init__`` imports nnsight for its LM buffer, which
this benchmark does not use, so its trainer modules are imported without running that file.

    python benchmarks/peers.py                       # 1 M tokens per library (slow on CPU)
    python benchmarks/peers.py --tokens 262144       # a reduced run
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / ".bench-peers"
INSTALL_HINT = ("pip install --target .bench-peers --no-deps eai-sparsify==1.3.3 dictionary-learning==0.1.0 "
                "natsort==8.4.0 schedulefree==1.4.1   (or: make bench-peers)")


def activations(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(train [N, d], held-out [M, d], hook) from saelib's activation cache of the embedded model."""
    from saelib.lm.cache import ActivationCache
    from saelib.lm.data import token_rows
    from saelib.lm.models import hook_name, load_model

    hook = hook_name(args.layer)
    model = load_model(args.model, device=args.device)
    root = ROOT / "runs" / "bench" / "activations" / args.model
    per_row = args.seq_len - 1
    out = []
    for split, n in (("train", args.cache_tokens), ("heldout", args.heldout_tokens)):
        rows = token_rows(model, args.corpus, split=split, n_tokens=math.ceil(n / per_row) * args.seq_len,
                          seq_len=args.seq_len, seed=0, progress=False)
        cache = ActivationCache.build(root / f"{split}-L{args.layer}-r{len(rows)}-s{args.seq_len}", model, rows, hook,
                                      progress=False)
        out.append(cache.load(hook).float())
    del model
    return out[0], out[1], hook


def batch_order(n: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches: a fresh permutation of the cached tokens per epoch, whole batches only."""
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def fvu(reconstruct, x: torch.Tensor, chunk: int = 8192) -> float:
    err = 0.0
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xb = x[i:i + chunk]
            err += float((xb - reconstruct(xb)).double().pow(2).sum())
    return err / float((x - x.mean(0)).double().pow(2).sum())


@contextlib.contextmanager
def quiet():
    """Peers print progress bars and banners; keep the table readable."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def timed(fn):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


# ------------------------------------------------------------------------------------ saelib
def run_saelib(X, H, hook, order, args):
    from saelib.sae.core import SAEConfig
    from saelib.sae.train import TrainConfig, train_saes

    dead = args.dead_tokens or 20_480
    cfg = SAEConfig(d_in=X.shape[1], d_sae=args.d_sae, activation="topk", k=args.k, hook_name=hook, dead_after_tokens=dead)
    tc = TrainConfig(batch_size=args.batch, n_tokens=len(order) * args.batch, lr=1e-3, warmup_steps=len(order) // 20,
                     progress=False, device=args.device, log_every=max(1, len(order)))
    batches = ({hook: X[idx].to(args.device)} for idx in order)
    saes, cpu, wall = timed(lambda: train_saes({"topk": cfg}, batches, tc))
    sae = saes["topk"].eval()
    return dict(cpu=cpu, wall=wall, fvu=fvu(lambda b: sae.reconstruct(b.to(args.device)).cpu(), H), dead=dead)


# ------------------------------------------------------------------------------------ sparsify
class _Replay(torch.nn.Module):
    """Hookpoint whose output is the cached activation of each 'token id' (an index into X)."""

    def __init__(self, X: torch.Tensor):
        super().__init__()
        self.register_buffer("X", X, persistent=False)

    def forward(self, ids):
        return self.X[ids]


class _ReplayModel(torch.nn.Module):
    """The parts of a ``transformers.PreTrainedModel`` sparsify's trainer reads: ``config``,
    ``base_model``, ``device``, ``dummy_inputs`` and a list of layers whose outputs it hooks."""

    def __init__(self, X: torch.Tensor):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Replay(X)])
        self.config = types.SimpleNamespace(num_hidden_layers=1)

    @property
    def base_model(self):
        return self

    @property
    def device(self):
        return self.layers[0].X.device

    @property
    def dummy_inputs(self):
        return {"input_ids": torch.zeros(1, 2, dtype=torch.long)}

    def forward(self, input_ids, **_):
        return self.layers[0](input_ids)


class _IndexDataset(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.rows[i]}


def run_sparsify(X, H, hook, order, args):
    with quiet():  # it announces the missing Triton on import
        from sparsify import SaeConfig, Trainer, TrainConfig

    seq = 64  # a 'row' of 64 cached tokens; the batch is batch / 64 rows
    rows = torch.cat(order).view(-1, seq)
    dead = args.dead_tokens or 10_000_000
    with tempfile.TemporaryDirectory() as tmp, quiet():
        cfg = TrainConfig(SaeConfig(num_latents=args.d_sae, k=args.k), batch_size=args.batch // seq,
                          auxk_alpha=1 / 32, dead_feature_threshold=dead, hookpoints=["layers.0"],
                          log_to_wandb=False, save_dir=tmp, save_every=10**9)
        model = _ReplayModel(X.to(args.device))
        trainer = Trainer(cfg, _IndexDataset(rows), model)
        _, cpu, wall = timed(trainer.fit)
        sae = trainer.saes["layers.0"]
    with torch.no_grad():
        rec = lambda b: sae(b.to(args.device)).sae_out.cpu()  # noqa: E731
        return dict(cpu=cpu, wall=wall, fvu=fvu(rec, H), dead=dead)


# ------------------------------------------------------------------------------------ dictionary_learning
def _import_dictionary_learning():
    """Import dictionary_learning's trainer modules without its package ``__init__`` (which
    imports nnsight for the LM activation buffer this benchmark does not use)."""
    if "dictionary_learning" not in sys.modules:
        spec = importlib.util.find_spec("dictionary_learning")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("dictionary_learning")
        pkg = types.ModuleType("dictionary_learning")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = pkg
    return importlib.import_module("dictionary_learning.trainers.top_k")


def run_dictionary_learning(X, H, hook, order, args):
    top_k = _import_dictionary_learning()
    dead = args.dead_tokens or 10_000_000
    steps = len(order)

    def train():
        tr = top_k.TopKTrainer(steps=steps, activation_dim=X.shape[1], dict_size=args.d_sae, k=args.k, layer=args.layer,
                               lm_name=args.model, auxk_alpha=1 / 32, warmup_steps=min(1000, steps // 10),
                               seed=0, device=args.device)
        tr.dead_feature_threshold = dead
        for step, idx in enumerate(order):
            tr.update(step, X[idx].to(args.device))
        return tr

    tr, cpu, wall = timed(train)
    ae = tr.ae.eval()
    return dict(cpu=cpu, wall=wall, fvu=fvu(lambda b: ae(b.to(args.device)).cpu(), H), dead=dead)


# ------------------------------------------------------------------------------------ SAELens
def run_saelens(X, H, hook, order, args):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    window = math.ceil(args.dead_tokens / args.batch) if args.dead_tokens else 1000  # in batches
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=X.shape[1], d_sae=args.d_sae, k=args.k, dtype="float32",
                                                device=args.device))
    tc = SAETrainerConfig(total_training_samples=len(order) * args.batch, train_batch_size_samples=args.batch,
                          lr_end=3e-5, device=args.device, dead_feature_window=window)
    provider = (X[idx].to(args.device) for idx in order)
    with quiet():
        trainer = SAETrainer(cfg=tc, sae=sae, data_provider=provider)
        _, cpu, wall = timed(trainer.fit)
    sae.eval()
    with torch.no_grad():
        rec = lambda b: sae.decode(sae.encode(b.to(args.device))).cpu()  # noqa: E731
        return dict(cpu=cpu, wall=wall, fvu=fvu(rec, H), dead=window * args.batch)


LIBS = {"saelib": run_saelib, "sparsify": run_sparsify, "dictionary_learning": run_dictionary_learning,
        "saelens": run_saelens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per library")
    ap.add_argument("--cache-tokens", type=int, default=131_072, help="cached training activations (cycled)")
    ap.add_argument("--heldout-tokens", type=int, default=16_384)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--corpus", default="embedded")
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=2304)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--dead-tokens", type=int, default=0, help="one dead-latent window for all (0: each library's own)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--libs", default=",".join(LIBS), help="comma-separated subset of " + ",".join(LIBS))
    args = ap.parse_args()
    if args.batch % 64:
        ap.error("--batch must be a multiple of 64 (sparsify reads rows of 64 cached tokens)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is visible")
    torch.set_num_threads(args.threads)
    if PEERS_DIR.is_dir():
        sys.path.insert(0, str(PEERS_DIR))
    os.environ.setdefault("WANDB_MODE", "disabled")

    X, H, hook = activations(args)
    steps = args.tokens // args.batch
    order = batch_order(X.shape[0], args.batch, steps, seed=0)
    n_tok = steps * args.batch
    clock = "process CPU time" if args.threads == 1 and args.device == "cpu" else "wall time"
    print(f"TopK {X.shape[1]} -> {args.d_sae}, k={args.k}, batch {args.batch}, {steps} steps = {n_tok:,} tokens per "
          f"library ({X.shape[0]:,} cached activations of {hook}, cycled), held-out {H.shape[0]:,} tokens; "
          f"device {args.device}, {torch.get_num_threads()} thread(s); s per 1M tokens from {clock}")
    res = {}
    for name in args.libs.split(","):
        try:
            r = LIBS[name](X, H, hook, order, args)
        except ImportError as e:
            print(f"{name:<20} skipped: not installed ({e.name}); install the peers with\n    {INSTALL_HINT}")
            continue
        t = r["cpu"] if clock.startswith("process") else r["wall"]
        r["s_per_m"] = t / n_tok * 1e6
        r["wall_per_m"] = r["wall"] / n_tok * 1e6
        res[name] = r
        print(f"{name:<20} {r['s_per_m']:8.1f} s/1M tok  (wall {r['wall_per_m']:7.1f})  held-out FVU {r['fvu']:.4f}  "
              f"dead window {r['dead']:,} tokens", flush=True)
    if "saelib" in res:
        base = res["saelib"]
        print("\nratios (peer time / saelib time; > 1 means saelib is faster), held-out FVU difference:")
        for name, r in res.items():
            if name != "saelib":
                print(f"  {name:<20} {r['s_per_m'] / base['s_per_m']:5.2f}x   FVU {r['fvu']:.4f} vs saelib {base['fvu']:.4f}"
                      f" ({'saelib equal or better' if base['fvu'] <= r['fvu'] else 'saelib worse'})")
        peers = {n: r for n, r in res.items() if n != "saelib"}
        if peers:
            fastest = min(peers, key=lambda n: peers[n]["s_per_m"])
            ratio = peers[fastest]["s_per_m"] / base["s_per_m"]
            ok = ratio >= 1.3 and base["fvu"] <= peers[fastest]["fvu"]
            print(f"goal: >= 1.3x faster than the fastest peer ({fastest}) at equal or better FVU: {ratio:.2f}x, "
                  f"FVU {base['fvu']:.4f} vs {peers[fastest]['fvu']:.4f} -> {'met' if ok else 'not met'}")


if __name__ == "__main__":
    main()
