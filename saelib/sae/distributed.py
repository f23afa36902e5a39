"""Sweeps over several processes with torch.distributed (launched by ``torchrun``).

Two kinds of work are spread over the ranks, as in sparsify's ``distribute_modules``
(EleutherAI, ``sparsify/trainer.py``: each rank runs the model on its share of the batch,
``all_gather_into_tensor`` gives every rank the whole batch, and each rank trains only its own
SAEs):

* **The SAEs.** :func:`plan_saes` assigns every SAE of a sweep to one rank (largest first, to the
  least loaded rank); each rank trains its share with :func:`saelib.sae.train.train_saes`, so each
  SAE has one copy, one optimiser and one checkpoint, on one rank.
* **The language-model work.** :class:`DistributedActivationStore` is an
  :class:`~saelib.lm.activations.ActivationStore` whose every buffer fill gives each rank a share
  of the forward chunks; the activations are exchanged with ``all_gather`` so that every rank
  holds the whole fill and serves the whole stream: every SAE sees every token, as in one
  process. (An :class:`~saelib.lm.cache.ActivationCache` needs no exchange: every rank reads
  the same files.)

Equality with one process: each chunk of ``model_batch_size`` rows is forwarded exactly as the
single-process store forwards it (same rows, same shapes), the buffer shuffles use the same
seeded generator, and SAEs train independently of each other, so a distributed sweep gives the
same weights as ``train_saes`` over all SAEs in one process, bit for bit on CPU
(``tests/test_distributed.py``). On GPUs, NCCL moves bytes without arithmetic, so the stream is
still exact; the SAE arithmetic itself is what CUDA makes of it in one process too.

Files: rank ``r`` of ``w`` trains into ``<out_dir>/ranks/rank<r>-of<w>/`` (its own
``checkpoint.pt``, ``train.json``, logs), so checkpoints and resume work per rank: rerun the
same command after an interruption and every rank resumes from its own checkpoint (ranks may
stop at different steps; each replays the shared stream up to its own step). When all ranks
are done each SAE folder is moved to ``<out_dir>/<name>/`` and rank 0 writes
``<out_dir>/metrics.csv`` and ``<out_dir>/distributed.json`` (the plan), so the sweep folder
reads like a single-process one (:func:`saelib.pipeline.load_saes`).

Launch::

    torchrun --standalone --nproc-per-node 2 my_sweep.py   # CPU: gloo; GPUs: nccl, one per rank

where ``my_sweep.py`` calls :func:`init` and then :func:`train_sweep`.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saelib.lm.activations import ActivationStore
from saelib.io import atomic_write_text
from saelib.sae.train import train_saes
from saelib.sae.train_files import write_combined_csv
from saelib.sae.rules import rule_attr

__all__ = ["DistributedActivationStore", "init", "plan_saes", "rank_dir", "train_sweep", "world"]

PLAN_FILE = "distributed.json"


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init(backend: str | None = None) -> tuple[int, int]:
    """Initialise the process group from ``torchrun``'s environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...) if it is not yet initialised; returns (rank, world size).

    ``backend`` None: "nccl" when CUDA is available (and the rank's GPU, LOCAL_RANK, is made the
    current device), else "gloo". Without torchrun's variables this is a one-process run."""
    if dist.is_available() and dist.is_initialized():
        return world()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # not launched by torchrun
        return 0, 1
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return world()


def _cost(cfg: Any) -> float:
    """Relative training cost of one SAE: its encoder size, x3 for top-AFA (its L0 and its
    selection make a step ~2-5x a TopK step; see benchmarks/README.md)."""
    c = float(cfg.d_in * cfg.d_sae)
    return c * rule_attr(getattr(cfg, "activation", None), "cost", 1.0)


def plan_saes(configs: Mapping[str, Any], n_ranks: int) -> list[list[str]]:
    """Assign each SAE to one rank: largest estimated cost first, each to the least loaded rank
    (ties: the lower rank). Deterministic; every rank computes the same plan. Names keep the
    sweep's order within a rank."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    names = list(configs)
    load = [0.0] * n_ranks
    owner: dict[str, int] = {}
    for i in sorted(range(len(names)), key=lambda i: (-_cost(_cfg_of(configs[names[i]])), i)):
        r = min(range(n_ranks), key=lambda r: (load[r], r))
        owner[names[i]] = r
        load[r] += _cost(_cfg_of(configs[names[i]]))
    return [[n for n in names if owner[n] == r] for r in range(n_ranks)]


def _cfg_of(obj: Any) -> Any:
    return getattr(obj, "cfg", obj)  # an SAE or an SAEConfig


def rank_dir(out_dir: str | Path, rank: int, n_ranks: int) -> Path:
    """Folder where rank ``rank`` of ``n_ranks`` trains (checkpoint, logs) before the SAEs move up."""
    return Path(out_dir) / "ranks" / f"rank{rank}-of{n_ranks}"


class DistributedActivationStore(ActivationStore):
    """:class:`~saelib.lm.activations.ActivationStore` whose model work is split over the ranks.

    Same arguments and the same stream as the single-process store (bit for bit): each buffer
    fill's forward chunks are dealt round-robin (chunk j to rank j mod world), each rank runs
    its chunks, and one ``all_gather`` per round of ``world`` chunks (per hook) gives every rank
    all of them, in order. Every rank must iterate the store in step (the training loop does:
    every rank consumes the same batches). With one process it is the plain store."""

    def _capture_chunks(self, chunks: list[Tensor]) -> Iterator[dict[str, Tensor]]:
        rank, n_ranks = world()
        if n_ranks == 1:
            yield from super()._capture_chunks(chunks)
            return
        for r0 in range(0, len(chunks), n_ranks):
            group = chunks[r0:r0 + n_ranks]
            sizes = [len(c) * self.per_row for c in group]
            mine = super()._capture_chunks([group[rank]]) if rank < len(group) else iter(())
            acts = next(mine, None)
            if acts is not None and not hasattr(self, "_widths"):
                self._widths = {h: a.shape[-1] for h, a in acts.items()}
            out: list[dict[str, Tensor]] = [{} for _ in group]
            for h in self.hooks:
                d = acts[h].shape[-1] if acts is not None else self._width(h)
                send = torch.zeros(max(sizes), d, dtype=self.dtype, device=self.device)
                if acts is not None:
                    send[: acts[h].shape[0]] = acts[h]
                recv = [torch.empty_like(send) for _ in range(n_ranks)]
                dist.all_gather(recv, send)
                for j, n in enumerate(sizes):
                    out[j][h] = recv[j][:n]
            yield from out

    def _width(self, hook: str) -> int:
        """d of ``hook`` on a rank that runs no chunk this round (the last, short round): known
        from an earlier round, else from a one-row forward pass."""
        if not hasattr(self, "_widths"):
            acts = next(super()._capture_chunks([torch.arange(1)]))
            self._widths = {h: a.shape[-1] for h, a in acts.items()}
        return self._widths[hook]


def _drain(batches: Iterable, n: int) -> None:
    """Consume ``n`` batches (a rank with no SAE still takes part in the stream's collectives)."""
    it = iter(batches)
    for _ in range(n):
        if next(it, None) is None:
            return


def train_sweep(
    configs: Mapping[str, Any],
    batches: Iterable[Mapping[str, Tensor]],
    cfg: Any,
    *,
    eval_batches: Iterable[Mapping[str, Tensor]] | None = None,
    hooks: Sequence[Any] = (),
) -> dict[str, torch.nn.Module]:
    """Train a sweep with its SAEs spread over the ranks; returns this rank's trained SAEs.

    Args:
        configs: ``{name: SAEConfig | SAE}`` of the whole sweep (the same on every rank).
        batches: the stream, the same on every rank: a
            :class:`DistributedActivationStore`, or an ``ActivationCache.iter_batches(...)``.
        cfg: the :class:`saelib.sae.train.TrainConfig` (``out_dir`` required with more than one rank).
        eval_batches: held-out batches, the same on every rank (as for ``train_saes``).
        hooks: ``train_saes`` hooks (early stopping); one process only: a rank that stopped early
            would leave the others waiting in the shared stream's collectives.

    Every rank calls this with the same arguments. With one process it is ``train_saes``.
    """
    rank, n_ranks = world()
    if n_ranks == 1:
        return train_saes(configs, batches, cfg, eval_batches=eval_batches, hooks=hooks)
    if hooks:
        raise ValueError(f"train_sweep got {len(hooks)} training hook(s) on {n_ranks} ranks; hooks such as "
                         "EarlyStopping may stop one rank while the others wait in the shared activation "
                         "stream. Train with early stopping in one process (torchrun --nproc_per_node 1)")
    if cfg.out_dir is None:
        raise ValueError("train_sweep over several ranks needs TrainConfig.out_dir (per-rank checkpoints live there)")
    out_dir = Path(cfg.out_dir)
    plan = plan_saes(configs, n_ranks)
    local = {n: configs[n] for n in plan[rank]}
    rcfg = replace(cfg, out_dir=rank_dir(out_dir, rank, n_ranks))
    if local:
        result = train_saes(local, batches, rcfg, eval_batches=eval_batches)
    else:  # more ranks than SAEs: keep the stream's collectives in step
        _drain(batches, cfg.n_steps)
        if eval_batches is not None:
            _drain(eval_batches, 1 << 62)
        result = {}
    dist.barrier()
    for name in local:  # every rank publishes its own SAEs
        src, dst = rcfg.out_dir / name, out_dir / name
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(src, dst)
    dist.barrier()
    if rank == 0:
        write_combined_csv(out_dir)
        atomic_write_text(out_dir / "train.json", json.dumps(cfg.to_dict(), indent=2))
        atomic_write_text(out_dir / PLAN_FILE, json.dumps({"world_size": n_ranks, "plan": plan}, indent=2))
    dist.barrier()
    return result
