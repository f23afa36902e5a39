"""Where things live: the repository root, the data folder, run folders and cache names.

One room for the pipeline's bookkeeping, so that science modules never need the book runner:

* :func:`repo_root`, :func:`data_dir`, :func:`runs_dir`: the three folders every chapter uses.
* :func:`hub_offline`: whether ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` disable the hub.
"""

from __future__ import annotations

import os
from pathlib import Path

_TRUE = ("1", "true", "yes", "on")


def repo_root() -> Path:
    """The repository root (the folder that holds ``saelib/`` and ``notebooks/``)."""
    return Path(__file__).resolve().parent.parent


def data_dir(override: str | Path | None = None) -> Path:
    """Folder for generated data: ``override``, else ``$SAELIB_DATA_DIR``, else ``<repo>/data``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("SAELIB_DATA_DIR")
    return Path(env) if env else repo_root() / "data"


def runs_dir(runs: str | Path) -> Path:
    """Resolve a chapter's ``runs_dir`` parameter: relative paths are taken from the repo root.

    Chapters run with the notebook folder as working directory, so a bare relative path would
    land in ``notebooks/``; resolving against the root keeps every profile's runs in one place.
    """
    path = Path(runs)
    if not path.is_absolute():
        path = repo_root() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in _TRUE for f in flags)
