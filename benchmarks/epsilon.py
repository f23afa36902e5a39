"""Benchmark: decoder ε (max/mean |cos|) blockwise vs a dense h×h Gram, side by side.

What is measured:
* time: wall clock of one call (after one small warm-up call), best of ``--repeats``.
* peak extra memory: a background thread samples the process RSS (``/proc`` via psutil) every
  ~1 ms during the call; "extra" = peak RSS − RSS just before the call. Torch's CPU allocator
  hands large blocks straight back to the OS, so RSS follows live tensors; tracemalloc would
  miss them. Sampling can miss very short peaks, so the script also prints the allocation
  predicted from block arithmetic, and the sampled figure should not exceed it by much.
* on CUDA (``--device cuda``) peak memory comes from ``torch.cuda.max_memory_allocated``.

Usage: python benchmarks/epsilon.py [--h 12288] [--d 768] [--block-size 2048] [--no-dense]
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch

from saelib.analysis.afa import epsilon, epsilon_dense, epsilon_sampled
from saelib.analysis.concentration import random_unit_dictionary

MiB = 2**20


class PeakRSS:
    """Context manager sampling this process's RSS in a thread; ``.extra`` = peak − start (bytes)."""

    def __init__(self, interval: float = 0.002):
        self.proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.start = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.start


def measure(fn, W, repeats: int, device: str):
    best_t, peak = float("inf"), 0
    out = None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out = fn(W)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            with PeakRSS() as m:
                t0 = time.perf_counter()
                out = fn(W)
                dt = time.perf_counter() - t0
            peak = max(peak, m.extra)
        best_t = min(best_t, dt)
    return out, best_t, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--h", type=int, default=12288, help="dictionary size (decoder rows)")
    p.add_argument("--d", type=int, default=768, help="model width (decoder columns)")
    p.add_argument("--block-size", type=int, default=2048, help="tile edge for the blockwise pass")
    p.add_argument("--n-pairs", type=int, default=2_000_000, help="pairs for the sampled estimate")
    p.add_argument("--repeats", type=int, default=1, help="best-of repeats per method")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--no-dense", action="store_true", help="skip the dense Gram (needs h²·4 bytes)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    W = random_unit_dictionary(a.h, a.d, seed=a.seed).to(a.device)
    epsilon(W[:256], block_size=64)  # warm-up (allocator, BLAS threads)

    b = min(a.block_size, a.h)
    pred_block = (a.h * a.d * 4 + b * b * 5) / MiB  # unit-row copy + float32 tile + bool mask
    pred_dense = (a.h * a.d * 4 + a.h * a.h * 4) / MiB  # unit-row copy + Gram
    print(f"decoder [h={a.h}, d={a.d}] float32 on {a.device}, {torch.get_num_threads()} threads; "
          f"memory = {'torch.cuda.max_memory_allocated' if a.device == 'cuda' else 'sampled peak RSS'} − baseline")

    rows = []
    res_b, t_b, m_b = measure(lambda w: epsilon(w, block_size=a.block_size), W, a.repeats, a.device)
    rows.append(("blockwise (exact)", res_b, t_b, m_b, pred_block))
    res_s, t_s, m_s = measure(lambda w: epsilon_sampled(w, a.n_pairs, seed=a.seed), W, a.repeats, a.device)
    rows.append((f"sampled ({a.n_pairs:.0e} pairs)", res_s, t_s, m_s, float("nan")))
    if not a.no_dense:
        res_d, t_d, m_d = measure(epsilon_dense, W, a.repeats, a.device)
        rows.append(("dense Gram (exact)", res_d, t_d, m_d, pred_dense))

    print(f"{'method':<26}{'time s':>9}{'extra MiB':>11}{'predicted':>11}{'max|cos|':>10}{'mean|cos|':>11}{'rms cos':>9}")
    for name, r, t, m, pred in rows:
        print(f"{name:<26}{t:>9.2f}{m / MiB:>11.1f}{pred:>11.1f}{r.max:>10.4f}{r.mean:>11.5f}{r.rms:>9.5f}")
    if not a.no_dense:
        print(f"blockwise vs dense: time ratio {t_b / t_d:.2f}x, memory ratio {m_b / max(m_d, 1):.3f}x; "
              f"|Δmax| = {abs(res_b.max - res_d.max):.2e}, |Δmean| = {abs(res_b.mean - res_d.mean):.2e}")
    verdict = "OK" if m_b / MiB <= 256 else "OVER"
    print(f"blockwise extra memory {m_b / MiB:.1f} MiB vs target 256 MiB: {verdict}")


if __name__ == "__main__":
    main()
