"""Atomic file writes: a reader never sees a half-written checkpoint, cache shard or figure."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def atomic_write_text(dest: str | Path, text: str) -> Path:
    """Write ``text`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def atomic_write_json(dest: str | Path, obj: object, *, indent: int = 1) -> Path:
    """Write ``obj`` as JSON to ``dest`` atomically."""
    return atomic_write_text(dest, json.dumps(obj, indent=indent) + "\n")
