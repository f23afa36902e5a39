"""The files of a training run folder (:func:`saelib.sae.train.train_saes`): ``checkpoint.pt``
for exact resume, each SAE's ``<name>/metrics.jsonl`` and the combined ``metrics.csv``. (A
trained SAE's own files are :mod:`saelib.sae.checkpoint`'s.)

Exact resume: ``<out_dir>/checkpoint.pt`` (written atomically every ``checkpoint_every`` steps)
holds every SAE's weights and buffers (dead counters, BatchTopK threshold), its optimiser state,
the trainer's dead-latent counters and metric accumulators, the step count and the RNG states.
Re-running ``train_saes`` with the same configs, the same ``out_dir`` and a *fresh* batch
iterable that yields the same sequence as before (same source, same seed) resumes: the trainer
skips the ``step`` batches it already consumed and continues. The result is bit-identical to an
uninterrupted run (tested); the learning-rate schedule is a pure function of the step.
The checkpoint holds tensors and plain data only (``torch.load(weights_only=True)``); it records
fingerprints of the first batch and of the last batch before it, so resuming on another stream
is an error. ``metrics.jsonl`` holds one JSON record per line; on resume a torn last line (a kill
during an append) and the records past the checkpoint are dropped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import pickle
import random
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saelib.io import atomic_path, atomic_write_text

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 3  # 2: no pickled objects (weights_only load), batch-stream fingerprint; 3: metrics window state
METRICS = "metrics.jsonl"


def cfg_dict(cfg: Any) -> dict[str, Any]:
    """An SAE config as plain data (a non-finite float as None), e.g. for comparing configs."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in dataclasses.asdict(cfg).items()}


def natural_key(s: str) -> list:
    """Sort key putting ``k8`` before ``k16``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------------------------
# metrics.jsonl and metrics.csv
# --------------------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """``(line, record)`` pairs of a metrics file. A torn last line (a kill during an append) is
    dropped with a warning; an unreadable line elsewhere is an error naming the file and line."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a torn last line (an interrupted append): {line[:60]!r}", stacklevel=3)
                break
            raise ValueError(f"{path}:{i + 1} is not a JSON record ({e}); the metrics file is damaged: delete that "
                             "line (or the file, losing the training curve) and run again") from None
        out.append((line, rec))
    return out


def append_jsonl(path: Path, rec: dict[str, Any]) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    except OSError as e:
        raise OSError(e.errno, f"could not append to {path} ({e.strerror or e}); free disk space (or fix the "
                               "folder's permissions) and run again: training resumes from the last checkpoint "
                               "and a torn last line is dropped") from None


def open_logs(out_dir: Path, names: Iterable[str], step: int) -> dict[int, dict[str, dict[str, Any]]]:
    """Ready ``<out_dir>/<name>/metrics.jsonl`` for a run starting at ``step``: a fresh run (0)
    deletes an old log; a resumed one drops the records past ``step`` (written after its
    checkpoint) and a torn last line. Returns the kept records as ``{step: {name: record}}``."""
    kept: dict[int, dict[str, dict[str, Any]]] = {}
    for name in names:
        path = out_dir / name / METRICS
        if step and path.exists():
            lines = [(line, rec) for line, rec in read_jsonl(path) if rec.get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line, _ in lines))
            for _, rec in lines:
                kept.setdefault(int(rec["step"]), {})[name] = rec
        elif not step and path.exists():
            path.unlink()
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    return kept


def write_combined_csv(out_dir: Path) -> Path | None:
    """``<out_dir>/metrics.csv``: every record of every ``*/metrics.jsonl``, with a ``name`` column."""
    rows = []
    for p in sorted(out_dir.glob(f"*/{METRICS}"), key=lambda p: natural_key(p.parent.name)):
        rows += [{"name": p.parent.name, **r} for _, r in read_jsonl(p)]
    if not rows:
        return None
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    path = out_dir / "metrics.csv"
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


# --------------------------------------------------------------------------------------------
# checkpoint.pt
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors, numbers and lists (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def _set_rng_state(st: Mapping[str, Any]) -> None:
    torch.set_rng_state(st["torch"].cpu())
    n = st["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = st["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in st["cuda"]])


def batch_fingerprint(batch: Mapping[str, Tensor], hooks: Iterable[str]) -> str:
    """sha256 of the hooks' tensors of one batch (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for k in sorted(set(hooks)):
        t = batch[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_identity(runs: Iterable[Any], cfg: Any) -> dict[str, Any]:
    """What must match for a checkpoint to be resumable: the TrainConfig without its bookkeeping
    fields and every SAE's config (``runs``: the trainer's per-SAE states, with ``name`` and ``sae``)."""
    tc = cfg.to_dict()
    for k in ("progress", "out_dir", "wandb_project", "checkpoint_every", "keep_checkpoint", "resume", "device", "log_every", "eps_every", "eps_block"):
        tc.pop(k, None)
    return {"train": tc, "saes": {r.name: cfg_dict(r.sae.cfg) for r in runs}}


def save_checkpoint(path: Path, runs: list, cfg: Any, step: int, tokens: int, stream: dict[str, Any]) -> None:
    """Write the checkpoint atomically (``runs``: per-SAE states with ``state()``); on a write error
    the previous checkpoint is kept."""
    ck = {"format": CHECKPOINT_FORMAT, "step": step, "tokens": tokens, "identity": run_identity(runs, cfg),
          "stream": stream, "runs": {r.name: r.state() for r in runs}, "rng": _rng_state()}
    try:
        with atomic_path(path) as tmp:
            torch.save(ck, tmp)
    except OSError as e:
        raise OSError(e.errno, f"could not write {path} ({e.strerror or e}); the previous checkpoint (if any) is kept. "
                               "Free disk space and run again to resume from it") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)``: tensors and plain data only, never unpickled objects."""
    fix = f"delete {path} to start over (the SAEs restart from step 0), or pass TrainConfig(resume=False)"
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (a crash while it was written?): {fix}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        with open(path, "rb") as f:
            head = f.read(4)
        if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # a torch archive or a pickle stream
            raise ValueError(f"{path} is not a saelib checkpoint: it holds pickled objects, which saelib never loads "
                             f"(they could run code). ({str(e).splitlines()[0][:200]}) Remove that file: {fix}") from None
        raise ValueError(f"{path} is not a checkpoint (unrecognised bytes); it is corrupt: {fix}") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as e:
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else 'truncated'}); it is truncated or corrupt: {fix}") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        got = ck.get("format") if isinstance(ck, dict) else type(ck).__name__
        raise ValueError(f"{path} has checkpoint format {got!r}, this saelib reads format {CHECKPOINT_FORMAT}: {fix}")
    missing = [k for k in ("step", "tokens", "identity", "stream", "runs", "rng") if k not in ck]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is damaged: {fix}")
    return ck


def load_checkpoint(path: Path, runs: list, cfg: Any) -> tuple[int, int, dict[str, Any]]:
    """Restore every run (``load_state``) and the RNGs from ``path``; returns ``(step, tokens,
    stream fingerprints)``. A checkpoint of other configs or SAE names is an error."""
    ck = read_checkpoint(path)
    want = run_identity(runs, cfg)
    if ck.get("identity") != want:
        have = ck.get("identity", {})
        diff = sorted(set(have.get("saes", {})) ^ set(want["saes"]))
        what = f"SAE names differ ({diff})" if diff else "SAE or training configs differ"
        raise ValueError(f"{path} belongs to a different run: {what}. Use another out_dir, delete the checkpoint, "
                         "or pass TrainConfig(resume=False) to start over")
    for r in runs:
        r.load_state(ck["runs"][r.name])
    _set_rng_state(ck["rng"])
    return int(ck["step"]), int(ck["tokens"]), dict(ck["stream"])
