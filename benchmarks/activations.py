"""Throughput of saelib's activation pipeline, measured side by side with the bare alternatives.

1. ``harvest`` vs a bare ``run_with_cache(names_filter=hook, stop_at_layer=layer + 1)`` loop on
   the same model, tokens, layer and batch size (target: ratio >= 0.9).
2. ``ActivationStore`` (shuffled mixing buffer) vs the same bare loop.
3. Replaying an ``ActivationCache`` (shuffled batches from memory maps) vs recomputing the
   activations with the model (target: >= 20x).

    python benchmarks/activations.py                      # embedded model, defaults
    python benchmarks/activations.py --model tiny-llama --rows 64
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from saelib.lm.activations import ActivationStore, harvest
from saelib.lm.cache import ActivationCache
from saelib.lm.models import hook_name, load_model


def bare_loop(model, tokens, hook: str, layer: int, batch_size: int) -> torch.Tensor:
    """What one writes without saelib: run_with_cache per batch, drop BOS, stack on CPU."""
    outs = []
    with torch.inference_mode():
        for r0 in range(0, tokens.shape[0], batch_size):
            _, cache = model.run_with_cache(
                tokens[r0 : r0 + batch_size], names_filter=hook, stop_at_layer=layer + 1
            )
            a = cache[hook][:, 1:]
            outs.append(a.reshape(-1, a.shape[-1]).cpu())
    return torch.cat(outs)


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def get_tokens(model, corpus: str, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    try:
        from saelib.lm.data import token_rows

        return token_rows(model, corpus, n_tokens=rows * seq_len, seq_len=seq_len, seed=seed, progress=False)
    except (ImportError, FileNotFoundError, ValueError) as e:
        print(f"(corpus unavailable: {e}; using random token ids)")
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(3, len(model.tokenizer), (rows, seq_len), generator=g)
        toks[:, 0] = model.tokenizer.bos_token_id
        return toks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--corpus", default="embedded")
    p.add_argument("--layer", type=int, default=None, help="resid_pre layer (default: n_layers // 2)")
    p.add_argument("--rows", type=int, default=32, help="token rows")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--sae-batch", type=int, default=1024, help="activations per served batch")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--replay-epochs", type=int, default=5)
    p.add_argument("--cache-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = load_model(args.model, device=args.device, seed=args.seed)
    layer = args.layer if args.layer is not None else model.cfg.n_layers // 2
    hook = hook_name(layer)
    tokens = get_tokens(model, args.corpus, args.rows, args.seq_len, args.seed)
    n_act = tokens.shape[0] * (tokens.shape[1] - 1)
    print(f"model {model.saelib_name} ({model.cfg.n_layers} layers), hook {hook}, tokens {tuple(tokens.shape)}, "
          f"{n_act} activations, torch threads {torch.get_num_threads()}")

    # Warm-up (first-call allocations, hook alias maps).
    bare_loop(model, tokens[: args.batch_size], hook, layer, args.batch_size)
    harvest(model, tokens[: args.batch_size], hook, batch_size=args.batch_size, progress=False)

    def run_store():
        store = ActivationStore(model, tokens, hook, batch_size=args.sae_batch,
                                buffer_tokens=max(4 * args.sae_batch, 2 * args.batch_size * args.seq_len),
                                model_batch_size=args.batch_size, seed=args.seed)
        return sum(b[hook].shape[0] for b in store)

    # Interleave the contenders and keep each one's best time, so load drift on a shared machine
    # hits all of them alike.
    t_bare = t_ours = t_store = float("inf")
    for _ in range(args.repeats):
        t, ref = timed(lambda: bare_loop(model, tokens, hook, layer, args.batch_size), 1)
        t_bare = min(t_bare, t)
        t, acts = timed(lambda: harvest(model, tokens, hook, batch_size=args.batch_size, progress=False)[hook], 1)
        t_ours = min(t_ours, t)
        t, n_store = timed(run_store, 1)
        t_store = min(t_store, t)
    assert torch.allclose(acts, ref, atol=1e-5), "harvest and run_with_cache disagree"

    tmp = Path(tempfile.mkdtemp(prefix="saelib-bench-"))
    try:
        dtype = getattr(torch, args.cache_dtype)
        t0 = time.perf_counter()
        cache = ActivationCache.build(tmp / "c", model, tokens, hook, dtype=dtype, shard_tokens=n_act // 4 + 1,
                                      batch_size=args.batch_size, progress=False)
        t_build = time.perf_counter() - t0

        def replay():
            n = 0
            for b in cache.iter_batches(hook, args.sae_batch, seed=args.seed, epochs=args.replay_epochs):
                n += b[hook].shape[0]
            return n

        replay()  # first pass verifies checksums and warms the page cache
        t_replay, n_replay = timed(replay, args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rate = lambda n, t: n / t  # noqa: E731
    r_bare, r_ours = rate(n_act, t_bare), rate(n_act, t_ours)
    r_store, r_replay, r_build = rate(n_store, t_store), rate(n_replay, t_replay), rate(n_act, t_build)
    print(f"{'pipeline':<44} {'tokens/s':>12} {'vs bare':>8}")
    print(f"{'bare run_with_cache(stop_at_layer) loop':<44} {r_bare:>12.0f} {1.0:>8.2f}")
    print(f"{'saelib harvest':<44} {r_ours:>12.0f} {r_ours / r_bare:>8.2f}")
    print(f"{'saelib ActivationStore (shuffled batches)':<44} {r_store:>12.0f} {r_store / r_bare:>8.2f}")
    print(f"{'ActivationCache.build (' + args.cache_dtype + ')':<44} {r_build:>12.0f} {r_build / r_bare:>8.2f}")
    print(f"{'ActivationCache replay (shuffled)':<44} {r_replay:>12.0f} {r_replay / r_bare:>8.2f}")
    print(f"\nharvest / bare loop: {r_ours / r_bare:.2f}x (target >= 0.9)")
    print(f"cache replay / recompute (harvest): {r_replay / r_ours:.1f}x (target >= 20)")


if __name__ == "__main__":
    main()
