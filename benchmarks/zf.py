"""ZF statistics for every token of a batch of sequences: batched pipeline vs the reference pattern.

The reference notebook (SewoongLee/top-afa-sae, visualization/zf-plot.ipynb) loops over
sequences one at a time, re-loads the SAE from disk for every sequence and runs a full
``run_with_cache`` (every hook of the model) to read one hook. Here the reference loop is given
the same tokens as the batched path (every non-BOS token of every row, not only the last one),
so both produce identical per-token numbers; we check that, then print the time ratio.

    .venv/bin/python benchmarks/zf.py                       # embedded model, 32 rows x 128 tokens
    .venv/bin/python benchmarks/zf.py --model tiny-llama --rows 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def _tokens(model, rows: int, seq_len: int, seed: int) -> torch.Tensor:
    try:
        from saelib.lm.data import token_rows

        return token_rows(model, "embedded", split="heldout", n_tokens=rows * seq_len, seq_len=seq_len,
                          seed=seed, progress=False)[:rows]
    except Exception as exc:  # no prepared corpus: random tokens time the same
        print(f"(corpus unavailable: {exc}; using random tokens)")
        g = torch.Generator().manual_seed(seed)
        toks = torch.randint(3, min(int(model.cfg.d_vocab), 30000), (rows, seq_len), generator=g)
        toks[:, 0] = model.tokenizer.bos_token_id
        return toks


def z_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reference_pattern(model, tokens: torch.Tensor, sae_dir: str, hook: str) -> dict[str, np.ndarray]:
    """One sequence at a time; SAE re-loaded from disk per sequence; full run_with_cache."""
    from saelib.analysis.afa import zf_stats_sae
    from saelib.sae.core import SAE

    parts = []
    for i in range(tokens.shape[0]):
        sae = SAE.load(sae_dir, device=z_device(model))
        _, cache = model.run_with_cache(tokens[i : i + 1])
        z = cache[hook][0, 1:]  # every non-BOS token (the notebook keeps only the last)
        parts.append(zf_stats_sae(sae, z))
        del cache
    return {k: torch.cat([getattr(p, k) for p in parts]).cpu().numpy() for k in ("norm_z", "norm_f", "eps_lbo")}


def batched_pattern(model, tokens: torch.Tensor, sae, hook: str, batch_size: int):
    from saelib.analysis.evaluate import evaluate_sae

    return evaluate_sae(sae, model, tokens, hook=hook, batch_size=batch_size, ce=False, zf=True,
                        progress=False)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help='"embedded" (SmolLM2-135M) or "tiny-llama" / "tiny-gpt2"')
    p.add_argument("--layer", type=int, default=None,
                   help="hook blocks.LAYER.hook_resid_pre (default 6, or the last layer of smaller models)")
    p.add_argument("--rows", type=int, default=32, help="sequences in the sample")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward in the batched path")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion * d_model")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave the default)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from saelib.lm.models import hook_name, load_model
    from saelib.sae.core import SAE, SAEConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    model = load_model(args.model, device=args.device)
    layer = min(6, int(model.cfg.n_layers) - 1) if args.layer is None else args.layer
    hook = hook_name(layer)
    d = int(model.cfg.d_model)
    sae = SAE(SAEConfig(d_in=d, d_sae=args.expansion * d, activation="topk", k=args.k, hook_name=hook,
                        seed=args.seed)).eval().to(args.device)
    tokens = _tokens(model, args.rows, args.seq_len, args.seed)
    n_tok = tokens.shape[0] * (tokens.shape[1] - 1)
    print(f"model={args.model} hook={hook} d={d} h={sae.cfg.d_sae} rows={tokens.shape[0]} "
          f"seq_len={tokens.shape[1]} tokens={n_tok} threads={torch.get_num_threads()}")

    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = os.path.join(tmp, "sae")
        sae.save(sae_dir)
        sae = SAE.load(sae_dir, device=args.device).eval()
        batched_pattern(model, tokens[:2], sae, hook, args.batch_size)  # warm-up both paths once
        reference_pattern(model, tokens[:1], sae_dir, hook)

        t0 = time.perf_counter()
        ref = reference_pattern(model, tokens, sae_dir, hook)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = batched_pattern(model, tokens, sae, hook, args.batch_size)
        t_fast = time.perf_counter() - t0

    for key in ("norm_z", "norm_f", "eps_lbo"):
        np.testing.assert_allclose(fast.zf[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    print(f"same {n_tok} per-token ZF values (norm_z, norm_f, eps_lbo) from both paths: OK")
    print(f"reference (per sequence, reload, full cache): {t_ref:8.2f} s  {n_tok / t_ref:9.0f} tok/s")
    print(f"batched  (saelib.analysis.evaluate, stop at layer):     {t_fast:8.2f} s  {n_tok / t_fast:9.0f} tok/s")
    print(f"speed-up: {t_ref / t_fast:.1f}x (target >= 10x); the batched path also returns NMSE, L0, "
          "FVU and latent densities for the same tokens")


if __name__ == "__main__":
    main()
