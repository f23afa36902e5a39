"""The files of a saved SAE: ``sae.safetensors`` (weights, no pickle) and ``cfg.json`` (config,
format and the weights' sha256), written and checked for :meth:`saelib.sae.core.SAE.save` /
:meth:`~saelib.sae.core.SAE.load`.

Each file is replaced by one rename; ``cfg.json`` (written second) records the weights' sha256,
which loading checks, so a crash between the two renames, a truncated or a bit-flipped file is
an error, never a silently wrong SAE. Non-finite weights are refused both ways."""
from __future__ import annotations

import errno
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelib.io import atomic_path, atomic_write_text, file_sha256

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"
FORMAT_NAME = "saelib.sae.core"
FORMAT_VERSION = 1


def non_finite(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of floating-point tensors holding NaN/inf (BatchTopK's ``threshold`` is NaN until it
    is first estimated, which is allowed; inf is not)."""
    bad = []
    for k, v in tensors.items():
        if v.is_floating_point() and not bool((~torch.isinf(v) if k == "threshold" else torch.isfinite(v)).all()):
            bad.append(k)
    return bad


def save_files(path: Path, tensors: dict[str, Tensor], cfg: dict, *, folded: float | None,
               metadata: dict | None, check: Mapping[str, Tensor]) -> Path:
    """Write the two files (``check``: the live state, refused when non-finite)."""
    from safetensors.torch import save_file

    bad = non_finite(check)
    if bad:
        raise ValueError(f"refusing to save an SAE with non-finite (NaN/inf) weights {bad} to {path}: it diverged; "
                         "retrain it (lower the learning rate or normalise the inputs)")
    path.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "folded_input_scale": folded}
    if metadata:
        meta["metadata"] = metadata
    with atomic_path(path / WEIGHTS_FILE) as tmp:
        try:
            save_file(tensors, str(tmp), metadata={"format": FORMAT_NAME})
        except Exception as e:  # noqa: BLE001 - safetensors reports I/O errors as SafetensorError
            code = errno.ENOSPC if "os error 28" in str(e) else errno.EIO
            raise OSError(code, f"could not write {path / WEIGHTS_FILE} ({e}); the files already there are kept. "
                                "Free disk space or save to another folder") from None
        meta["weights_sha256"] = file_sha256(tmp)
    # written second and naming the weights' checksum: a crash between the two renames leaves
    # a pair that load reports as mismatched, never one it silently uses
    atomic_write_text(path / CFG_FILE, json.dumps({"saelib": meta, "cfg": cfg}, indent=2))
    return path


def load_files(path: Path) -> tuple[dict[str, Any], Callable[[Mapping[str, Tensor], str], dict[str, Tensor]]]:
    """(the checked ``cfg.json`` document, ``read(own_state, activation)`` -> the weights checked
    for finiteness and against the new SAE's own state: names and shapes)."""
    from safetensors.torch import load_file

    cfg_path, w_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_path.exists() or not w_path.exists():
        raise FileNotFoundError(f"No saelib SAE at {path}: expected {CFG_FILE} and {WEIGHTS_FILE}. "
                                f"For an SAELens folder use saelib.interop.from_saelens(path)")
    try:
        doc = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the checkpoint is corrupt, re-save it") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("saelib"), dict) or doc["saelib"].get("format") != FORMAT_NAME:
        raise ValueError(f"{cfg_path} was not written by saelib.SAE.save (it looks like another library's "
                         f"checkpoint, e.g. SAELens: use saelib.interop.from_saelens({str(path)!r}))")
    if not isinstance(doc.get("cfg"), dict):
        raise ValueError(f"{cfg_path} lacks its 'cfg' field (the SAEConfig); the file is damaged: re-save the SAE")
    want_sha = doc["saelib"].get("weights_sha256")
    if want_sha is not None and file_sha256(w_path) != want_sha:
        raise ValueError(f"{w_path} does not match the checksum recorded in {cfg_path} (truncated, corrupted, or "
                         "an interrupted save left a mismatched pair): re-save or retrain this SAE")

    def read(own: Mapping[str, Tensor], activation: str) -> dict[str, Tensor]:
        try:
            tensors = load_file(str(w_path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for bad files
            raise ValueError(f"{w_path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated "
                             "or corrupt: re-save or retrain this SAE") from None
        bad = non_finite(tensors)
        if bad:
            raise ValueError(f"{w_path} holds non-finite (NaN/inf) values in {bad}: this SAE diverged in training; "
                             "retrain it (lower the learning rate or normalise the inputs)")
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        if missing or extra:
            raise ValueError(f"Checkpoint at {path} does not fit a {activation!r} SAE: missing {missing}, "
                             f"unexpected {extra}; it was saved by another architecture or version")
        for k, v in tensors.items():
            if v.shape != own[k].shape:
                raise ValueError(f"Checkpoint tensor {k!r} has shape {tuple(v.shape)} but cfg.json implies "
                                 f"{tuple(own[k].shape)}; cfg.json and sae.safetensors do not belong together")
        return tensors

    return doc, read
