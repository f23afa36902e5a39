"""The on-disk activation cache: activations harvested once into sharded files, replayed many times.

:class:`ActivationCache` serves sweeps that train many SAEs on the same tokens
(``saelib.pipeline.activation_cache`` names, builds and reuses them under ``<runs_dir>/activations``).
A folder holds ``manifest.json`` and one raw file per (shard, hook). The manifest records the
cache's identity (tokens, hooks, dtype, BOS handling, the model's weights fingerprint, the code
fingerprint of ``saelib.io.ACTIVATION_CODE``) and, for each complete shard, every file's size and
sha256. Files and manifest are written to temp names and renamed, and a shard exists only once
the manifest lists it, so an interrupted or disk-full build resumes after its last complete
shard; the build refuses a folder holding files it did not write.
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

from saelib.io import (ACTIVATION_CODE, LOCK_FILE, atomic_write_json, code_fingerprint, file_sha256, folder_lock,
                       model_fingerprint)
from saelib.lm.activations import _as_hooks, _check_tokens, _index_batches, _progress, harvest
from saelib.runs import rel

__all__ = ["MANIFEST", "STAMP", "ActivationCache"]

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


def _model_id(model) -> str:
    """Name of the model as used in cache identities (``+tl`` marks TransformerLens processing)."""
    name = getattr(model, "saelib_name", None) or str(model.cfg.model_name)
    return name + ("+tl" if getattr(model, "saelib_processing", "raw") == "transformerlens" else "")


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

    ``path`` is a folder written by :meth:`build`: ``manifest.json`` and one raw ``[n, d]`` file per
    (shard, hook), e.g. ``shard_00000.blocks.3.hook_resid_pre.bin`` (module docstring). Sizes are
    checked on open; with ``verify`` each file's sha256 is checked the first time it is read.
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
                warnings.warn(f"The activation cache at {rel(path)} was made by other saelib code; rebuilding it.",
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

