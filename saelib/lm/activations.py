"""Residual-stream activations: harvest them, stream them shuffled, or cache them on disk.

Three ways to feed SAEs, all yielding ``dict[hook_name, Tensor[batch, d]]``:

* :func:`harvest` — run the model over token rows once and return every requested hook's
  activations in memory (small experiments, evaluation).
* :class:`ActivationStore` — on-the-fly generation into a shuffled mixing buffer (SAELens /
  dictionary_learning style): one model pass serves every hook and every SAE reading it.
* :class:`ActivationCache` — activations written once to sharded files on disk and replayed
  many times through memory maps (sweeps that train many SAEs on the same tokens);
  ``saelib.pipeline.activation_cache`` names, builds and reuses them under ``<runs_dir>/activations``.

:func:`tensor_batches` serves in-memory tensors the same way, and :func:`residual_norms` keeps
only ``||x||`` at every layer (chapter 1).

Every model forward stops as soon as the deepest requested hook has fired (a private
exception raised from that hook, as dictionary_learning does), so harvesting layer 3 of a
30-layer model costs 3 layers, not 30. Position 0 of every row (the BOS token that
``saelib.lm.data.token_rows`` puts there) is dropped by default: its residual norm is about a
hundred times the others' and would dominate any SAE loss.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelib.io import (ACTIVATION_CODE, LOCK_FILE, atomic_write_json, code_fingerprint, file_sha256, folder_lock,
                       model_fingerprint)
from saelib.lm.models import check_hook, model_device

__all__ = [
    "ActivationCache",
    "ActivationStore",
    "harvest",
    "residual_norms",
    "tensor_batches",
]

MANIFEST = "manifest.json"
STAMP = "stamp.json"  # written beside the manifest by saelib.pipeline.activation_cache (its freshness stamp)
_VERSION = 2  # 2: the identity holds the model's weights fingerprint and the code fingerprint
# The only names ActivationCache.build ever writes in its folder (it deletes nothing else).
_OWN_FILE = re.compile(
    r"^(manifest\.json|stamp\.json|shard_\d{5}\..+\.bin|\.shard_\d{5}\..+\.bin\.tmp|\.(manifest|stamp)\.json\..+\.tmp)$"
)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# numpy has no bfloat16: those shards are stored and memory-mapped as int16 and viewed back.
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


class _StopForward(Exception):
    """Raised from the last needed hook to end the forward pass early."""


# --------------------------------------------------------------------------------------------
# One forward pass
# --------------------------------------------------------------------------------------------


def _as_hooks(model, hooks: str | Sequence[str]) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(dict.fromkeys(hooks))  # keep order, drop repeats
    if not hooks:
        raise ValueError("hooks is empty: pass at least one hook name such as 'blocks.3.hook_resid_pre'.")
    for h in hooks:
        check_hook(model, h)
    return hooks


def _check_tokens(tokens: Tensor, exclude_bos: bool, model=None) -> Tensor:
    if isinstance(tokens, np.ndarray):
        raise ValueError(
            f"tokens is a numpy array {tokens.shape}; pass a torch LongTensor [n_rows, seq_len] "
            "(torch.from_numpy(tokens).long()), e.g. from saelib.lm.data.token_rows."
        )
    if not isinstance(tokens, Tensor) or tokens.ndim != 2:
        raise ValueError(
            "tokens must be a 2-D LongTensor [n_rows, seq_len] (e.g. from saelib.lm.data.token_rows), "
            f"got {type(tokens).__name__}{tuple(tokens.shape) if isinstance(tokens, Tensor) else ''}."
        )
    if tokens.is_floating_point():
        raise ValueError("tokens must hold integer token ids, got a floating-point tensor.")
    if tokens.shape[0] == 0:
        raise ValueError("tokens has no rows: nothing to run the model on.")
    if exclude_bos and tokens.shape[1] < 2:
        raise ValueError("rows need at least 2 tokens when exclude_bos=True (position 0 is dropped).")
    tokens = tokens.long()
    vocab = getattr(getattr(model, "cfg", None), "d_vocab", None)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or (vocab is not None and hi >= int(vocab)):
        bad = lo if lo < 0 else hi
        name = getattr(model, "saelib_name", None) or getattr(getattr(model, "cfg", None), "model_name", "the model")
        raise ValueError(
            f"tokens holds id {bad}, outside the vocabulary of {name} (ids 0..{int(vocab) - 1 if vocab else '?'}): "
            "tokenize with this model's tokenizer (saelib.lm.data.token_rows(model, ...)) and do not mix models."
        )
    return tokens


def _forward_capture(model, tokens_BS: Tensor, hooks: list[str], exclude_bos: bool) -> dict[str, Tensor]:
    """Activations ``{hook: Tensor[B * S', d]}`` of one batch (S' = S - 1 without BOS), on the model's device."""
    captured: dict[str, Tensor] = {}
    n_hooks = len(hooks)

    def make(name: str):
        def fn(act: Tensor, hook) -> Tensor:
            captured[name] = act
            if len(captured) == n_hooks:
                raise _StopForward  # nothing later in the network is needed
            return act

        return fn

    with torch.inference_mode(), model.hooks(fwd_hooks=[(h, make(h)) for h in hooks]):
        try:
            model(tokens_BS.to(model_device(model)))
        except _StopForward:
            pass
    missing = [h for h in hooks if h not in captured]
    if missing:
        raise RuntimeError(f"the forward pass never reached hooks {missing}; they cannot be harvested.")
    start = 1 if exclude_bos else 0
    out = {}
    for h in hooks:
        act = captured[h]
        act = act.reshape(act.shape[0], act.shape[1], -1)[:, start:]
        out[h] = act.reshape(-1, act.shape[-1])
    return out


def _model_id(model) -> str:
    """Name of the model as used in cache identities (``+tl`` marks TransformerLens processing)."""
    name = getattr(model, "saelib_name", None) or str(model.cfg.model_name)
    return name + ("+tl" if getattr(model, "saelib_processing", "raw") == "transformerlens" else "")


def _progress(total: int, desc: str, enabled: bool):
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled, smoothing=0.1)


def harvest(
    model,
    tokens: Tensor,
    hooks: str | Sequence[str],
    *,
    batch_size: int = 32,
    exclude_bos: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Run ``model`` over ``tokens`` (``LongTensor[n_rows, seq_len]``) and return ``{hook: Tensor[N, d]}``.

    Every hook is filled by the same forward passes of ``batch_size`` rows; with ``exclude_bos``
    position 0 of each row is dropped, so ``N = n_rows * (seq_len - 1)``. The result lives on
    ``device`` (CPU by default, so large harvests do not fill the GPU).
    """
    hooks = _as_hooks(model, hooks)
    tokens = _check_tokens(tokens, exclude_bos, model)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_rows, seq_len = tokens.shape
    per_row = seq_len - 1 if exclude_bos else seq_len
    out: dict[str, Tensor] = {}
    bar = _progress(n_rows * per_row, "harvest", progress)
    for r0 in range(0, n_rows, batch_size):
        acts = _forward_capture(model, tokens[r0 : r0 + batch_size], hooks, exclude_bos)
        for h, a in acts.items():
            if h not in out:  # allocate once we know d for this hook
                out[h] = torch.empty(n_rows * per_row, a.shape[-1], dtype=dtype, device=device)
            out[h][r0 * per_row : r0 * per_row + a.shape[0]] = a
        bar.update(min(batch_size, n_rows - r0) * per_row)
    bar.close()
    return out


# --------------------------------------------------------------------------------------------
# Index streams shared by the in-memory and on-disk readers
# --------------------------------------------------------------------------------------------


def _index_batches(
    n: int, batch_size: int, *, shuffle: bool, seed: int, epochs: int, n_tokens: int | None
) -> Iterator[Tensor]:
    """Batches of row indices into ``n`` items: one permutation per epoch, chained across epochs.

    Serves ``n_tokens`` items in total when given (cycling as many epochs as needed), else
    ``epochs * n``. A final batch shorter than ``batch_size`` is dropped.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < 1:
        raise ValueError("there are no activations to batch (0 tokens).")
    if n_tokens is None and epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    total = n_tokens if n_tokens is not None else epochs * n
    if total < batch_size:
        raise ValueError(
            f"only {total} tokens to serve, fewer than one batch of {batch_size}: "
            "lower batch_size or provide more tokens."
        )

    def order(epoch: int) -> Tensor:
        if not shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

    epoch, perm, pos = 0, order(0), 0
    for _ in range(total // batch_size):
        parts, need = [], batch_size
        while need:  # a batch may straddle two epochs (never more than needed: no O(n) copies)
            if pos == n:
                epoch, perm, pos = epoch + 1, order(epoch + 1), 0
            take = min(need, n - pos)
            parts.append(perm[pos : pos + take])
            pos, need = pos + take, need - take
        yield parts[0] if len(parts) == 1 else torch.cat(parts)


def tensor_batches(
    acts: dict[str, Tensor] | Tensor,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int = 1,
    shuffle: bool = True,
    n_tokens: int | None = None,
) -> Iterator[dict[str, Tensor]] | Iterator[Tensor]:
    """Shuffled batches over in-memory activations.

    ``acts`` is ``{hook: Tensor[N, d]}`` (every hook indexed by the same token order, so batches
    stay aligned across hooks) or a single ``Tensor[N, d]``; the batches have the same form.
    Serves ``epochs`` passes, or ``n_tokens`` tokens when given; a short last batch is dropped.
    """
    single = isinstance(acts, Tensor)
    d = {"_": acts} if single else dict(acts)
    if not d:
        raise ValueError("acts is empty.")
    sizes = {k: v.shape[0] for k, v in d.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all tensors need the same number of rows, got {sizes}")
    n = next(iter(sizes.values()))
    for idx in _index_batches(n, batch_size, shuffle=shuffle, seed=seed, epochs=epochs, n_tokens=n_tokens):
        idx = idx.to(next(iter(d.values())).device)
        if single:
            yield acts[idx]
        else:
            yield {k: v[idx] for k, v in d.items()}


# --------------------------------------------------------------------------------------------
# On-the-fly shuffled store
# --------------------------------------------------------------------------------------------


class ActivationStore:
    """Shuffled activation batches generated on the fly from token rows.

    A mixing buffer of ``buffer_tokens`` activations per hook is filled from the model, shuffled,
    and half of it is served in batches of ``batch_size``; the other half stays to mix with the
    next fill, so consecutive batches mix tokens from many sequences (not one document at a
    time). ``epochs`` passes over ``tokens`` (rows in the given order the first time, in a
    seeded permutation in every later pass); iterating again starts over with the same order.
    This is the source for runs whose activations would not fit on disk (the paper's 80 M tokens
    x 576 dims is 184 GB per layer in float32).

    The model runs on chunks of ``model_batch_size`` rows; :meth:`_capture_chunks` is the one
    place that runs them (``saelib.sae.distributed.DistributedActivationStore`` spreads the chunks
    of each fill over ranks and gathers them, so every rank serves the same stream). The whole
    stream is deterministic given ``seed``; ``buffer_tokens`` defaults to ``16 * batch_size``
    (at least ``2 * batch_size``); buffer and batches live on ``device`` (default: the model's).
    """

    def __init__(
        self,
        model,
        tokens: Tensor,
        hooks: str | Sequence[str],
        *,
        batch_size: int = 4096,
        buffer_tokens: int | None = None,
        model_batch_size: int = 32,
        exclude_bos: bool = True,
        seed: int = 0,
        epochs: int = 1,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.hooks = _as_hooks(model, hooks)
        self.tokens = _check_tokens(tokens, exclude_bos, model)
        self.exclude_bos = exclude_bos
        if batch_size < 1 or model_batch_size < 1:
            raise ValueError(f"batch_size and model_batch_size must be >= 1, got {batch_size}, {model_batch_size}")
        self.batch_size = batch_size
        self.buffer_tokens = buffer_tokens if buffer_tokens is not None else 16 * batch_size
        self.model_batch_size = model_batch_size
        self.per_row = self.tokens.shape[1] - (1 if exclude_bos else 0)
        if self.buffer_tokens < 2 * batch_size:
            raise ValueError(
                f"buffer_tokens={self.buffer_tokens} must be at least 2 * batch_size = {2 * batch_size} "
                "so that half the buffer can be served while the other half mixes with new data."
            )
        if model_batch_size * self.per_row > self.buffer_tokens // 2:
            raise ValueError(
                f"one forward pass ({model_batch_size} rows x {self.per_row} tokens) does not fit in half "
                f"the buffer ({self.buffer_tokens // 2} tokens): lower model_batch_size or raise buffer_tokens."
            )
        self.seed = seed
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1 (passes over the token rows), got {epochs!r}")
        self.epochs = epochs
        self.device = torch.device(device) if device is not None else model_device(model)
        self.dtype = dtype
        self.progress = progress
        self.n_tokens_seen = 0
        """Activations (per hook) served so far by the current iteration."""

    @property
    def n_tokens(self) -> int:
        """Activations per hook in one full pass over the token rows."""
        return self.tokens.shape[0] * self.per_row

    def __len__(self) -> int:
        """Batches served over all epochs (a last partial batch is dropped)."""
        return self.epochs * self.n_tokens // self.batch_size

    def _row_order(self) -> Tensor:
        """Row indices of the whole stream: epoch 0 in order, later epochs permuted (seeded)."""
        n = self.tokens.shape[0]
        parts = [torch.arange(n)]
        for e in range(1, self.epochs):
            parts.append(torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + e)))
        return torch.cat(parts)

    def _capture_chunks(self, chunks: list[Tensor]) -> Iterator[dict[str, Tensor]]:
        """Activations ``{hook: [rows * per_row, d]}`` of each chunk of token rows, in order:
        one forward pass per chunk."""
        for rows in chunks:
            yield _forward_capture(self.model, self.tokens[rows], self.hooks, self.exclude_bos)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.n_tokens_seen = 0
        gen = torch.Generator().manual_seed(self.seed)
        cap, bs = self.buffer_tokens, self.batch_size
        buf: dict[str, Tensor] = {}
        n_buf = 0
        order = self._row_order()
        n_rows = order.shape[0]
        next_row = 0
        bar = _progress(n_rows * self.per_row, "activations", self.progress)
        try:
            while True:
                # Refill up to capacity (whole forward batches only).
                chunks, n_new = [], 0
                while next_row < n_rows:
                    rows = min(self.model_batch_size, n_rows - next_row)
                    if n_buf + n_new + rows * self.per_row > cap:
                        break
                    chunks.append(order[next_row : next_row + rows])
                    n_new += rows * self.per_row
                    next_row += rows
                for acts in self._capture_chunks(chunks):
                    for h, a in acts.items():
                        if h not in buf:
                            buf[h] = torch.empty(cap, a.shape[-1], dtype=self.dtype, device=self.device)
                        buf[h][n_buf : n_buf + a.shape[0]] = a
                    n_buf += a.shape[0]
                    bar.update(a.shape[0])
                if n_buf < bs:
                    return
                perm = torch.randperm(n_buf, generator=gen).to(self.device)
                for h in buf:
                    buf[h][:n_buf] = buf[h][:n_buf][perm]
                # Serve half the buffer (all of it once the tokens are exhausted), from the tail,
                # so the kept half already sits at the front for the next fill.
                serve = n_buf // 2 if next_row < n_rows else n_buf
                n_batches = max(1, serve // bs)
                for _ in range(n_batches):
                    n_buf -= bs
                    self.n_tokens_seen += bs
                    yield {h: buf[h][n_buf : n_buf + bs].clone() for h in self.hooks}
        finally:
            bar.close()


# --------------------------------------------------------------------------------------------
# On-disk cache
# --------------------------------------------------------------------------------------------


def _write_bytes(path: Path, data: memoryview) -> None:
    """Write ``data`` to ``path`` and flush it to disk (a seam the tests use to simulate ENOSPC)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o644)  # shared results: readable whatever the umask


def _tokens_fingerprint(tokens: Tensor) -> str:
    t = tokens.detach().to("cpu", torch.int64).contiguous()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"cache dtype must be one of torch.float32, torch.float16, torch.bfloat16; got {dtype}")


def _disk_full(path: Path, shard: int, n_done: int, n_total: int) -> OSError:
    free = shutil.disk_usage(path).free if path.exists() else 0
    return OSError(
        errno.ENOSPC,
        f"Disk full while writing shard {shard} of the activation cache at {path} "
        f"({free / 2**30:.2f} GiB free). {n_done} of {n_total} shards are complete and kept; "
        "the partial shard was removed. Free space (or use dtype=torch.float16/bfloat16, fewer "
        "tokens or another path) and call ActivationCache.build again with the same arguments "
        "to resume.",
    )


def _refuse_foreign(path: Path) -> None:
    """Refuse a folder holding anything ActivationCache.build did not write (it never deletes those)."""
    if not path.is_dir():
        return
    foreign = sorted(f.name for f in path.iterdir() if f.name != LOCK_FILE and not _OWN_FILE.match(f.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"{path} is not empty and is not an activation cache: it holds {shown}. "
            "ActivationCache.build writes (and clears) only its own shard files, so it needs an empty "
            "or new folder, or an existing cache: choose another path (e.g. a new subfolder)."
        )


_MANIFEST_KEYS = {"hooks": list, "dims": dict, "dtype": str, "shards": list, "n_shards": int}
_SHARD_KEYS = ("index", "n_tokens", "files")


def _check_manifest(m, mpath: Path) -> None:
    """Raise a clear error when a manifest lacks a field or holds one of the wrong type."""
    fix = f"delete {mpath.parent} and run ActivationCache.build again to rebuild it"
    if not isinstance(m, dict):
        raise ValueError(f"{mpath} holds a {type(m).__name__}, not a cache manifest (a JSON object); {fix}.")
    for k, typ in _MANIFEST_KEYS.items():
        if not isinstance(m.get(k), typ):
            what = "is missing" if k not in m else f"is a {type(m[k]).__name__}, expected {typ.__name__}"
            raise ValueError(f"{mpath}: field {k!r} {what}; the manifest is damaged: {fix}.")
    if m.get("dtype") not in _DTYPES:
        raise ValueError(f"{mpath}: field 'dtype' is {m.get('dtype')!r}, expected one of {sorted(_DTYPES)}; {fix}.")
    for i, sh in enumerate(m["shards"]):
        miss = [k for k in _SHARD_KEYS if not isinstance(sh, dict) or k not in sh]
        if miss:
            raise ValueError(f"{mpath}: shards[{i}] lacks field(s) {miss}; the manifest is damaged: {fix}.")
        for h, info in sh["files"].items():
            if not isinstance(info, dict) or any(k not in info for k in ("file", "bytes", "sha256")):
                raise ValueError(f"{mpath}: shards[{i}].files[{h!r}] lacks 'file', 'bytes' or 'sha256'; {fix}.")
            if h not in m["dims"]:
                raise ValueError(f"{mpath}: field 'dims' has no width for hook {h!r}; {fix}.")


class ActivationCache:
    """Activations stored on disk in shards, read back through memory maps.

    Layout of ``path``: ``manifest.json`` (hooks, dims, dtype, token fingerprint, and for every
    complete shard its token count and each file's size and sha256) and one raw file per
    (shard, hook): ``shard_00000.blocks.3.hook_resid_pre.bin`` holding ``[n, d]`` values.
    A shard exists for readers only once the manifest lists it, and files and manifest are
    written to temp names and renamed, so an interrupted or disk-full build never exposes a
    half-written shard; building again resumes after the last complete shard.

    Args:
        path: cache folder written by :meth:`build`.
        verify: check each file's sha256 the first time it is read (sizes are always checked
            on open).
    """

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(
                f"No activation cache at {self.path} (no {MANIFEST}); create it with "
                "ActivationCache.build(path, model, tokens, hooks)."
            )
        try:
            self.manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{mpath} is not valid JSON ({e}); delete {self.path} and rebuild the cache.") from None
        m = self.manifest
        _check_manifest(m, mpath)
        if not m.get("complete"):
            raise ValueError(
                f"The activation cache at {self.path} is incomplete ({len(m['shards'])} of "
                f"{m['n_shards']} shards): call ActivationCache.build again with the same arguments to resume."
            )
        self.hooks: list[str] = list(m["hooks"])
        self.dims: dict[str, int] = {h: int(v) for h, v in m["dims"].items()}
        self.dtype_name: str = m["dtype"]
        self.dtype: torch.dtype = _DTYPES[self.dtype_name]
        self.shard_sizes = [int(s["n_tokens"]) for s in m["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.n_tokens: int = int(self.offsets[-1])
        self.verify = verify
        self._verified: set[str] = set()
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        itemsize = np.dtype(_NP_DTYPES[self.dtype_name]).itemsize
        for s in m["shards"]:
            for h, info in s["files"].items():
                f = self.path / info["file"]
                expected = int(s["n_tokens"]) * self.dims[h] * itemsize
                size = f.stat().st_size if f.is_file() else None
                if size != expected or info["bytes"] != expected:
                    what = "is missing" if size is None else f"has {size} bytes, expected {expected} (truncated?)"
                    raise ValueError(
                        f"Activation cache shard {s['index']} file {f} {what}. The cache is damaged: "
                        f"delete {self.path} (or just that shard's files and its manifest entry) and run "
                        "ActivationCache.build again to rebuild it."
                    )

    @property
    def d_model(self) -> int:
        """Width of the first hook's activations (all residual-stream hooks share it)."""
        return self.dims[self.hooks[0]]

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, hooks={self.hooks}, n_tokens={self.n_tokens}, "
            f"d={self.d_model}, dtype={self.dtype_name}, shards={len(self.shard_sizes)})"
        )

    # -- reading ------------------------------------------------------------------------------

    def _check_hook(self, hook: str) -> None:
        if hook not in self.dims:
            raise ValueError(f"hook {hook!r} is not in the cache at {self.path}; it holds {self.hooks}.")

    def _map(self, shard: int, hook: str) -> np.ndarray:
        key = (shard, hook)
        if key not in self._maps:
            s = self.manifest["shards"][shard]
            info = s["files"][hook]
            f = self.path / info["file"]
            if self.verify and info["file"] not in self._verified:
                if file_sha256(f) != info["sha256"]:
                    raise ValueError(
                        f"Activation cache shard {shard} file {f} does not match its checksum (corrupted). "
                        f"Delete {self.path} and run ActivationCache.build again to rebuild it."
                    )
                self._verified.add(info["file"])
            # mode "c" (copy-on-write) gives writable arrays for torch without touching the file.
            self._maps[key] = np.memmap(
                f, dtype=_NP_DTYPES[self.dtype_name], mode="c", shape=(int(s["n_tokens"]), self.dims[hook])
            )
        return self._maps[key]

    def _to_torch(self, arr: np.ndarray) -> Tensor:
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtype_name == "bfloat16" else t

    def load(self, hook: str) -> Tensor:
        """All activations of ``hook`` as ``Tensor[n_tokens, d]`` in the stored dtype.

        With a single shard this is a memory map (no copy); several shards are concatenated
        into memory.
        """
        self._check_hook(hook)
        parts = [self._to_torch(self._map(i, hook)) for i in range(len(self.shard_sizes))]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _gather(self, hook: str, idx: np.ndarray) -> Tensor:
        """Rows ``idx`` (sorted) of ``hook`` across shards."""
        if idx[-1] - idx[0] + 1 == len(idx):  # contiguous: slice, do not fancy-index
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            s0 = int(np.searchsorted(self.offsets, lo, side="right") - 1)
            parts, pos = [], lo
            while pos < hi:
                end = min(hi, int(self.offsets[s0 + 1]))
                parts.append(self._map(s0, hook)[pos - self.offsets[s0] : end - self.offsets[s0]])
                pos, s0 = end, s0 + 1
        else:
            shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
            bounds = np.searchsorted(shard_of, np.arange(len(self.shard_sizes) + 1))
            parts = [
                self._map(s, hook)[idx[bounds[s] : bounds[s + 1]] - self.offsets[s]]
                for s in range(len(self.shard_sizes))
                if bounds[s + 1] > bounds[s]
            ]
        arr = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._to_torch(np.ascontiguousarray(arr))

    def iter_batches(
        self,
        hooks: str | Sequence[str] | None = None,
        batch_size: int = 4096,
        *,
        shuffle: bool = True,
        seed: int = 0,
        n_tokens: int | None = None,
        epochs: int = 1,
        dtype: torch.dtype | None = torch.float32,
        device: str | torch.device | None = None,
    ) -> Iterator[dict[str, Tensor]]:
        """Batches ``{hook: Tensor[batch_size, d]}`` read from the memory maps.

        Shuffling draws a fresh permutation of all cached tokens each epoch (the same token
        indices for every hook, so multi-hook batches stay aligned). ``n_tokens`` caps the tokens
        served (cycling epochs as needed); otherwise ``epochs`` full passes. ``dtype=None`` keeps
        the stored dtype.
        """
        hooks = self.hooks if hooks is None else ([hooks] if isinstance(hooks, str) else list(hooks))
        for h in hooks:
            self._check_hook(h)
        for idx in _index_batches(self.n_tokens, batch_size, shuffle=shuffle, seed=seed, epochs=epochs, n_tokens=n_tokens):
            idx_np = np.sort(idx.numpy())
            out = {}
            for h in hooks:
                t = self._gather(h, idx_np)
                if dtype is not None:
                    t = t.to(dtype)
                if device is not None:
                    t = t.to(device, non_blocking=True)
                out[h] = t
            yield out

    # -- building -----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        path: str | Path,
        model,
        tokens: Tensor,
        hooks: str | Sequence[str],
        *,
        dtype: torch.dtype = torch.float32,
        shard_tokens: int = 65536,
        exclude_bos: bool = True,
        progress: bool = True,
        batch_size: int = 32,
        verify: bool = True,
    ) -> ActivationCache:
        """Harvest ``hooks`` over ``tokens`` into a sharded cache at ``path`` and open it.

        A complete cache of the same identity (tokens, hooks, dtype, BOS handling, a fingerprint
        of every model parameter) is returned as is; an interrupted build resumes after its last
        complete shard; a cache of another identity is an error (delete it or choose another
        path); one made by other saelib code (the code fingerprint differs) is rebuilt with a
        warning. The build deletes only its own files (``manifest.json``, ``shard_*.bin`` and
        their temp names) and refuses a folder holding anything else. One process builds a folder
        at a time (an advisory lock; a second one gets an error naming the first one's pid).
        ``shard_tokens`` is rounded to whole rows; ``dtype`` is float32, float16 or bfloat16;
        ``batch_size`` is rows per forward pass.
        """
        path = Path(path)
        hooks = _as_hooks(model, hooks)
        tokens = _check_tokens(tokens, exclude_bos, model)
        dname = _dtype_name(dtype)
        n_rows, seq_len = tokens.shape
        per_row = seq_len - (1 if exclude_bos else 0)
        rows_per_shard = max(1, shard_tokens // per_row)
        n_shards = -(-n_rows // rows_per_shard)
        ident = {
            "version": _VERSION,
            "model": _model_id(model),
            "model_sha256": model_fingerprint(model),
            "hooks": hooks,
            "dtype": dname,
            "exclude_bos": exclude_bos,
            "n_rows": n_rows,
            "seq_len": seq_len,
            "rows_per_shard": rows_per_shard,
            "tokens_sha256": _tokens_fingerprint(tokens),
            "code": code_fingerprint(*ACTIVATION_CODE),
        }
        if path.exists() and not path.is_dir():
            raise ValueError(f"{path} is a file, not a folder; pass a folder path for the activation cache.")
        mpath = path / MANIFEST
        # A complete matching cache is only read: no lock, works in a read-only folder.
        manifest = cls._matching_manifest(path, ident)
        if manifest is not None and manifest.get("complete"):
            return cls(path, verify=verify)
        _refuse_foreign(path)  # before the lock file is created: a wrong folder is left untouched
        with folder_lock(path, "activation cache"):
            return cls._build_locked(path, model, tokens, hooks, ident, dtype, dname, per_row, rows_per_shard,
                                     n_shards, batch_size, exclude_bos, progress, verify)

    @classmethod
    def _matching_manifest(cls, path: Path, ident: dict) -> dict | None:
        """The manifest at ``path`` when it was built from ``ident`` (None when there is none or
        it is stale code's); an error when it was built from other inputs."""
        mpath = path / MANIFEST
        if not mpath.is_file():
            return None
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{mpath} is not valid JSON: delete {path} and build again.") from None
        if not isinstance(manifest, dict):
            raise ValueError(f"{mpath} is not a cache manifest: delete {path} and build again.")
        if manifest.get("version") != ident["version"] or manifest.get("code") != ident["code"]:
            return None  # made by other saelib code: rebuilt (its own files only)
        differs = [k for k, v in ident.items() if manifest.get(k) != v]
        if differs:
            what = ", ".join("model weights (model_sha256)" if k == "model_sha256" else k for k in differs)
            raise ValueError(
                f"The activation cache at {path} was built with different {what}. "
                "Delete it or choose another path for this cache."
            )
        _check_manifest(manifest, mpath)
        return manifest

    @classmethod
    def _build_locked(cls, path, model, tokens, hooks, ident, dtype, dname, per_row, rows_per_shard, n_shards,
                      batch_size, exclude_bos, progress, verify) -> ActivationCache:
        n_rows = tokens.shape[0]
        mpath = path / MANIFEST
        _refuse_foreign(path)
        manifest = cls._matching_manifest(path, ident)  # re-read under the lock
        if manifest is not None and manifest.get("complete"):
            return cls(path, verify=verify)
        if manifest is None:
            if mpath.is_file():
                warnings.warn(f"The activation cache at {path} was made by other saelib code; rebuilding it.",
                              stacklevel=3)
                mpath.unlink()
            manifest = {**ident, "n_shards": n_shards, "dims": {}, "shards": [], "complete": False}
        # Own files the manifest does not list are debris of an interrupted shard (or stale code's).
        listed = {info["file"] for s in manifest["shards"] for info in s["files"].values()}
        for f in path.iterdir():
            if f.name not in (MANIFEST, STAMP, LOCK_FILE) and f.name not in listed and _OWN_FILE.match(f.name) and f.is_file():
                f.unlink()
        done = len(manifest["shards"])
        total_tokens = n_rows * per_row
        bar = _progress(total_tokens, f"cache {path.name}", progress)
        bar.update(done * rows_per_shard * per_row)
        try:
            for shard in range(done, n_shards):
                r0 = shard * rows_per_shard
                rows = tokens[r0 : r0 + rows_per_shard]
                acts = harvest(model, rows, hooks, batch_size=batch_size, exclude_bos=exclude_bos,
                               dtype=dtype, progress=False)
                files, tmps = {}, []
                try:
                    for h in hooks:
                        a = acts[h].contiguous()
                        raw = (a.view(torch.int16) if dname == "bfloat16" else a).numpy()
                        data = memoryview(raw).cast("B")
                        name = f"shard_{shard:05d}.{h}.bin"
                        tmp = path / f".{name}.tmp"
                        tmps.append(tmp)
                        _write_bytes(tmp, data)
                        files[h] = {"file": name, "bytes": data.nbytes, "sha256": hashlib.sha256(data).hexdigest()}
                        manifest["dims"][h] = int(a.shape[1])
                    for h in hooks:
                        os.replace(path / f".{files[h]['file']}.tmp", path / files[h]["file"])
                    entry = {"index": shard, "n_tokens": int(rows.shape[0] * per_row), "files": files}
                    shards = [*manifest["shards"], entry]
                    # The shard becomes part of the cache only when this manifest lands.
                    atomic_write_json(mpath, {**manifest, "shards": shards, "complete": len(shards) == n_shards})
                    manifest["shards"], manifest["complete"] = shards, len(shards) == n_shards
                except OSError as e:
                    for t in tmps:
                        t.unlink(missing_ok=True)
                    for info in files.values():  # renamed but never listed: not part of the cache
                        (path / info["file"]).unlink(missing_ok=True)
                    if e.errno == errno.ENOSPC:
                        raise _disk_full(path, shard, len(manifest["shards"]), n_shards) from e
                    raise
                bar.update(rows.shape[0] * per_row)
        finally:
            bar.close()
        return cls(path, verify=verify)


# --------------------------------------------------------------------------------------------
# Norm summaries (chapter 1)
# --------------------------------------------------------------------------------------------


def residual_norms(
    model,
    tokens: Tensor,
    hooks: str | Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> Tensor:
    """``||x||_2`` of every token at every hook: ``Tensor[n_hooks, n_rows, seq_len]`` (BOS kept).

    Only the norms are kept, so all layers of a model fit in memory for many tokens. Default
    hooks: ``blocks.{L}.hook_resid_pre`` for every layer, in one (full-depth) pass per batch.
    """
    if hooks is None:
        hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(int(model.cfg.n_layers))]
    hooks = _as_hooks(model, hooks)
    tokens = _check_tokens(tokens, exclude_bos=False, model=model)
    n_rows, seq_len = tokens.shape
    out = torch.empty(len(hooks), n_rows, seq_len)
    bar = _progress(n_rows * seq_len, "norms", progress)
    for r0 in range(0, n_rows, batch_size):
        acts = _forward_capture(model, tokens[r0 : r0 + batch_size], hooks, exclude_bos=False)
        for i, h in enumerate(hooks):
            a = acts[h].float()
            out[i, r0 : r0 + batch_size] = a.norm(dim=-1).view(-1, seq_len).cpu()
        bar.update(min(batch_size, n_rows - r0) * seq_len)
    bar.close()
    return out
