"""Safe files: atomic writes, one writer per folder, and fingerprints of what made a result.

* :func:`atomic_path` / :func:`atomic_write_text` / :func:`atomic_write_json`: a reader never
  sees a half-written checkpoint, cache shard or figure; everything written is world-readable.
* :func:`folder_lock`: an advisory lock so two processes never write one run folder or cache.
* :func:`code_fingerprint`, :func:`model_fingerprint`, :func:`file_sha256`: the identity records
  of activation caches, sweeps and width families hold these, so a result made by other code or
  other weights is never reused, and a damaged file is detected.
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import shutil
import tempfile
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml


@contextmanager
def atomic_path(dest: str | Path, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` in one rename.

    The temporary file lives in the same folder (so ``os.replace`` is atomic) and is made
    world-readable (``mkstemp`` creates owner-only files; results are meant to be shared). If the
    body raises, ``dest`` is untouched and the temporary file is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_folder(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest`` as a whole.

    The folder and every file in it are made world-readable (``mkdtemp`` makes an owner-only
    folder, some writers owner-only files). An existing ``dest`` is moved aside, the new folder
    renamed into place, then the old one deleted, so ``dest`` is never a mix of old and new files
    (between the two renames it is briefly absent). If the body raises, ``dest`` is untouched and
    the temporary folder is removed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for p in tmp.rglob("*"):
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(dest: str | Path, text: str) -> Path:
    """Write ``text`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def atomic_write_json(dest: str | Path, obj: object, *, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``dest`` atomically."""
    return atomic_write_text(dest, json.dumps(obj, indent=indent) + "\n")


# --------------------------------------------------------------------------------------------
# One writer per folder
# --------------------------------------------------------------------------------------------
LOCK_FILE = ".saelib.lock"
_HELD: dict[str, list] = {}  # folder -> [open lock file, depth]: re-entrant within one process


class FolderInUseError(RuntimeError):
    """Another process is writing into the folder (it holds the folder's advisory lock)."""


@contextmanager
def folder_lock(folder: str | Path, what: str = "folder") -> Iterator[Path]:
    """Hold an exclusive advisory lock (``fcntl.flock`` on ``<folder>/.saelib.lock``) while writing.

    A second process asking for the same folder gets :class:`FolderInUseError` at once, naming
    the holder's pid, instead of interleaving its writes with the first one's. The lock is
    re-entrant within a process and disappears with the process (a crash never leaves a stale
    lock: the kernel releases it). ``what`` names the folder's role in messages.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the {what} {folder} ({e.strerror}); choose a writable location") from None
    key = str(folder.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield folder
        finally:
            _HELD[key][1] -= 1
        return
    lock_path = folder / LOCK_FILE
    try:
        fh = open(lock_path, "a+")
    except OSError as e:
        raise OSError(e.errno, f"cannot write into the {what} {folder} ({e.strerror}): it must be writable "
                               "(choose another location or fix its permissions)") from None
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        pid = fh.read().strip() or "?"
        fh.close()
        raise FolderInUseError(
            f"The {what} {folder} is in use by pid {pid} (it holds {lock_path}). Wait for that process "
            "to finish (or stop it), or use another folder; two writers would corrupt each other's files."
        ) from None
    try:
        os.chmod(lock_path, 0o644)
    except OSError:
        pass
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    _HELD[key] = [fh, 1]
    try:
        yield folder
    finally:
        del _HELD[key]
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


# --------------------------------------------------------------------------------------------
# Fingerprints: what made a cached result (code, weights, files)
# --------------------------------------------------------------------------------------------
ACTIVATION_CODE = ("saelib.lm.activations", "saelib.lm.cache", "saelib.lm.models")
"""Modules whose code decides the values in an activation cache."""
TRAINING_CODE = ("saelib.sae.core", "saelib.sae.topafa", "saelib.sae.kernels", "saelib.sae.geometry",
                 "saelib.sae.checkpoint", "saelib.sae.rules", "saelib.sae.rules.base", "saelib.sae.rules.topk",
                 "saelib.sae.rules.batchtopk", "saelib.sae.rules.topafa", "saelib.sae.rules.relu",
                 "saelib.sae.rules.jumprelu", "saelib.sae.train", "saelib.sae.train_files",
                 "saelib.sae.metrics", *ACTIVATION_CODE)
"""Modules whose code decides a trained SAE (its rule, losses, trainer and the activations it saw)."""


def _strip_docstrings(tree):
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


_CODE_FP: dict[tuple, str] = {}


def code_fingerprint(*parts) -> str:
    """Hash of the code of modules (dotted names or module objects) and functions.

    The source is parsed and its syntax tree hashed without docstrings, so comments, docstrings
    and formatting do not count but any change to what the code computes does. Cached results
    (activation caches, sweeps, width families) record this and are reused only when it matches,
    so results left over from older code are never mistaken for current ones.
    """
    mods = tuple(importlib.import_module(p) if isinstance(p, str) else p for p in parts)
    names = [m.__name__ if inspect.ismodule(m) else f"{m.__module__}.{m.__qualname__}" for m in mods]
    key = tuple(names)
    if key not in _CODE_FP:
        h = hashlib.sha256()
        for name, m in zip(names, mods):
            src = inspect.getsource(m)
            if not inspect.ismodule(m):
                src = textwrap.dedent(src)
            h.update(name.encode() + b"\0")
            h.update(ast.dump(_strip_docstrings(ast.parse(src))).encode())
        _CODE_FP[key] = h.hexdigest()[:16]
    return _CODE_FP[key]


def model_fingerprint(model) -> str:
    """sha256 (first 16 hex digits) of every parameter and buffer of ``model`` (names, dtypes,
    shapes and values), so two models of one name with other weights never share a cache.

    Memoised on the model and recomputed when any tensor is modified in place (tensor version
    counters) or replaced.
    """
    tensors = [(n, t) for n, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]
    key = tuple((n, t.data_ptr(), t._version) for n, t in tensors)
    memo = getattr(model, "_saelib_fingerprint", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    h = hashlib.sha256()
    for n, t in tensors:
        t = t.detach()
        h.update(f"{n}|{t.dtype}|{tuple(t.shape)}\0".encode())
        t = t.to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(memoryview(t.numpy()).cast("B") if t.numel() else b"")
    fp = h.hexdigest()[:16]
    try:
        object.__setattr__(model, "_saelib_fingerprint", (key, fp))
    except (AttributeError, TypeError):
        pass
    return fp


def file_sha256(path: str | Path) -> str:
    """sha256 hex digest of a file (``hashlib.file_digest``: read in chunks, never whole)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_yaml(path: str | Path):
    """Parse a YAML file; a syntax error names the file, line and column and says how to fix it."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ValueError(f"{where}: YAML syntax error ({problem}); fix that line of {path.name} "
                         "(a mapping of parameter names to values, e.g. 'n_tokens: 4096')") from None
