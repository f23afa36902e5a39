"""Exchange SAEs with SAELens (``sae_lens`` 6.x): export to its on-disk format and import its SAEs.

Export (:func:`to_saelens`) writes ``cfg.json`` + ``sae_weights.safetensors`` that
``sae_lens.SAE.load_from_disk(path)`` reads back with the same reconstructions. Each rule names
its SAELens architecture (``Rule.saelens_name``) and adds what it needs (TopK's k, the
thresholds of JumpReLU and BatchTopK, which exports as "jumprelu" with every threshold = θ, as
SAELens does); see each module of :mod:`saelib.sae.rules`. A rule SAELens cannot represent
(top-AFA: ``Rule.saelens_lossy``) is refused unless ``allow_lossy=True``, then written with
``metadata.saelib_lossy_export`` saying what SAELens computes instead. ``metadata.saelib_architecture``
lets :func:`from_saelens` restore the saelib rule.

Input normalisation: "none" → "none"; "global" → folded into the weights, "none";
"token" → SAELens "layer_norm" (same maths: x_n = (x-μ)/(σ+1e-5), back with x_n·σ+μ).

Import (:func:`from_saelens`) accepts an SAELens SAE object (inference or training class) or a
folder, and returns a :class:`saelib.SAE` in eval mode whose ``encode``/``decode`` equal SAELens'
(up to float rounding): ``apply_b_dec_to_input=False`` is folded into b_enc
(b_enc + b_dec @ W_enc), ``rescale_acts_by_decoder_norm=True`` is folded into unit-norm decoder
rows, ``normalize_activations`` "layer_norm" → "token", "expected_average_only_in" → "none"
(SAELens applies no runtime scaling for it either; its factor is folded at load time when known).
No Hugging Face Hub access is ever needed: pass objects or local folders.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from saelib.io import atomic_folder
from saelib.lm.models import TINY_SHAPES
from saelib.runs import data_dir
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.rules import RULES

__all__ = ["to_saelens", "from_saelens", "SAELENS_ARCHITECTURE"]

SAELENS_ARCHITECTURE = {name: r.saelens_name for name, r in RULES.items()}


def to_saelens(sae: SAE, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
               allow_lossy: bool = False) -> Path:
    """Write ``sae`` in SAELens' on-disk format under ``path`` (files replaced atomically,
    world-readable).

    Raises ValueError for a BatchTopK SAE whose inference threshold was never estimated
    (train it first: the threshold is learned in training mode), and for an activation rule
    SAELens cannot represent (top-AFA) unless ``allow_lossy=True``; that opt-in is recorded in
    the exported metadata (``saelib_lossy_export``)."""
    if not isinstance(sae, SAE):
        raise TypeError(f"to_saelens expects a saelib.SAE, got {type(sae).__name__}")
    cfg, rule = sae.cfg, sae.rule
    act = cfg.activation
    if rule.saelens_lossy and not allow_lossy:
        raise ValueError(f"Cannot export this {act!r} SAE to SAELens faithfully. {rule.saelens_lossy}. Keep it in "
                         "saelib's format (SAE.save), or pass allow_lossy=True to export anyway (recorded in the "
                         "metadata as saelib_lossy_export).")
    if cfg.center_input:
        raise ValueError("SAELens has no per-token centring without scaling: this SAE (center_input=True) cannot be "
                         "exported; run it on centred activations in SAELens instead")
    import sae_lens
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    classes = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
               "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}
    # "token": SAELens' layer_norm applies the same standardisation at run time, so the
    # normalised-space tensors; otherwise model space ("global" folded in)
    w = dict(zip(("W_enc", "b_enc", "W_dec", "b_dec"), sae.affine(normalised=cfg.input_norm == "token")))
    norm = {"none": "none", "global": "none", "token": "layer_norm"}[cfg.input_norm]
    meta = {"hook_name": cfg.hook_name, "model_name": cfg.model_name,
            "sae_lens_version": getattr(sae_lens, "__version__", "6.0.0"),
            "saelib_architecture": act, "saelib_cfg": cfg.to_dict()}
    if rule.saelens_lossy:
        meta["saelib_lossy_export"] = rule.saelens_lossy
    if metadata:
        meta.update(metadata)
    common = dict(d_in=cfg.d_in, d_sae=cfg.d_sae, dtype=cfg.dtype, device="cpu",
                  apply_b_dec_to_input=True, normalize_activations=norm)
    lsae_cls, lcfg_cls = classes[rule.saelens_name]
    lcfg = lcfg_cls(**rule.to_saelens(sae, w), **common)
    lsae = lsae_cls(lcfg)
    for k, v in meta.items():
        lcfg.metadata[k] = v
    state = {k: v.detach().to("cpu", cfg.torch_dtype).contiguous() for k, v in w.items()}
    lsae.load_state_dict(state, strict=True)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".saelens-export-"))
    try:
        lsae.save_model(tmp)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # results are meant to be shared (the temp folder is owner-only)
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _as_saelens_object(obj: Any, device: str | None):
    if isinstance(obj, (str, os.PathLike)):
        p = Path(obj)
        if (p / "sae.safetensors").exists() and (p / "cfg.json").exists() and not (p / "sae_weights.safetensors").exists():
            raise ValueError(f"{p} holds a saelib SAE, not an SAELens one: load it with saelib.SAE.load({str(p)!r})")
        if not (p / "sae_weights.safetensors").exists() or not (p / "cfg.json").exists():
            raise FileNotFoundError(f"No SAELens SAE at {p}: expected cfg.json and sae_weights.safetensors")
        from sae_lens import SAE as LensSAE

        return LensSAE.load_from_disk(str(p), device=device or "cpu")
    return obj


@torch.no_grad()
def from_saelens(obj: Any, *, device: str | None = None, dtype: str | None = None,
                 hook_name: str | None = None, model_name: str | None = None,
                 center_input: bool = False) -> SAE:
    """Convert an SAELens SAE (object or folder) to a :class:`saelib.SAE` (eval mode).

    Supported architectures: standard (ReLU), topk, jumprelu, batchtopk (training object:
    uses its learned ``topk_threshold``), and saelib's own top-AFA exports. Others (gated,
    matryoshka, transcoders, hook_z reshaping, whitening, constant_norm_rescale) raise
    ValueError.

    ``center_input=True`` sets ``SAEConfig.center_input`` for releases trained on
    TransformerLens-centred streams (:func:`expects_centred_input`), to run them on raw-weight models."""
    lsae = _as_saelens_object(obj, device)
    if not hasattr(lsae, "cfg") or not hasattr(lsae, "W_dec"):
        raise TypeError(f"from_saelens expects an SAELens SAE or a folder, got {type(obj).__name__}")
    lcfg = lsae.cfg
    arch = lcfg.architecture() if callable(getattr(lcfg, "architecture", None)) else getattr(lcfg, "architecture", "standard")
    meta = getattr(lcfg, "metadata", None)
    meta_get = (lambda k, d=None: meta.get(k, d)) if meta is not None else (lambda k, d=None: d)
    saelib_arch = meta_get("saelib_architecture")
    if getattr(lcfg, "reshape_activations", "none") != "none":
        raise ValueError("SAEs with reshape_activations='hook_z' are not supported; flatten the heads first")
    norm = getattr(lcfg, "normalize_activations", "none")
    if norm in ("none", "expected_average_only_in"):
        input_norm = "none"
    elif norm == "layer_norm":
        input_norm = "token"
    else:
        raise ValueError(f"normalize_activations={norm!r} is not supported by saelib.SAE; "
                         f"supported: 'none', 'expected_average_only_in', 'layer_norm'")

    W_enc = lsae.W_enc.detach().float().cpu().clone()
    W_dec = lsae.W_dec.detach().float().cpu().clone()
    b_dec = lsae.b_dec.detach().float().cpu().clone()
    b_enc_p = getattr(lsae, "b_enc", None)
    b_enc = b_enc_p.detach().float().cpu().clone() if b_enc_p is not None else torch.zeros(W_enc.shape[1])
    if not getattr(lcfg, "apply_b_dec_to_input", True):
        # x @ W_enc + b_enc = (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc)
        b_enc = b_enc + b_dec @ W_enc
    if getattr(lcfg, "rescale_acts_by_decoder_norm", False):
        # selection on pre·||W_dec||, decode with acts/||W_dec||: fold into unit-norm rows
        n = W_dec.norm(dim=-1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    if saelib_arch in RULES and RULES[saelib_arch].accepts_saelens(arch, lsae):
        rule = RULES[saelib_arch]
    else:
        rule = next((r for r in RULES.values() if arch in r.saelens_loads), None)
        if rule is None:
            supported = sorted({a for r in RULES.values() for a in r.saelens_loads})
            raise ValueError(f"SAELens architecture {arch!r} is not supported; supported: {', '.join(supported)}")
    activation = rule.name
    rule_cfg, rule_state = rule.from_saelens(lsae, lcfg, dict(meta or {}))
    use_b_enc = bool(b_enc.abs().max() > 0) or rule.uses_b_enc
    # training settings of a saelib export (afa_target, afa_coeff, aux, seed, ...) come back too;
    # everything the weights determine is set from the SAELens side
    extra = {}
    saved = meta_get("saelib_cfg")
    if isinstance(saved, dict) and saelib_arch == activation:
        fixed = {"d_in", "d_sae", "activation", "k", "input_norm", "center_input", "use_b_enc", "dtype", "hook_name",
                 "model_name"}
        extra = {k2: v for k2, v in saved.items() if k2 in {f.name for f in dataclasses.fields(SAEConfig)} and k2 not in fixed}
    cfg = SAEConfig(
        d_in=int(lcfg.d_in), d_sae=int(lcfg.d_sae), activation=activation, input_norm=input_norm,
        center_input=bool(center_input), **rule_cfg,
        use_b_enc=use_b_enc, dtype=dtype or "float32",
        hook_name=hook_name or meta_get("hook_name") or "blocks.0.hook_resid_pre",
        model_name=model_name or meta_get("model_name") or "",
        **extra,
    )
    sae = SAE(cfg)
    dt = cfg.torch_dtype
    sae.W_enc.copy_(W_enc.to(dt))
    sae.W_dec.copy_(W_dec.to(dt))
    sae.b_dec.copy_(b_dec.to(dt))
    sae.b_enc.copy_(b_enc.to(dt))
    for name, v in rule_state.items():
        getattr(sae, name).copy_(v.to(dt))
    sae.eval()
    if device is not None:
        sae.to(device)
    return sae


# ============================================================================================
# Released SAEs: SAELens releases from the hub, local copies, and random-weight stand-ins
# ============================================================================================

STANDIN_PREFIX = "standin:"
"""``"standin:<release>"`` names a random-weight stand-in of an SAELens release (see
:func:`write_standin_release`); the ``smoke`` profile uses it to run the ``gpt2`` profile's
release branches offline."""

STANDIN_LAYOUTS = {
    # sae ids and widths of the real release, scaled to the stand-in model's d_model:
    # gpt2-small-res-jb: every block's resid_pre at 32 × d (24576 = 32 × 768 for GPT-2 small)
    "gpt2-small-res-jb": dict(kind="layers", width_ratio=32),
    # the feature-splitting family: block 8 of 12, widths d × 2^n for n = 0..7 (768 ... 98304)
    "gpt2-small-res-jb-feature-splitting": dict(kind="widths", layer_frac=8 / 12, n_widths=8),
}
"""Releases that have a stand-in layout."""


def standin_dir(release: str, model_name: str = "tiny-gpt2-small") -> Path:
    """Folder of the stand-in of ``release`` for ``model_name``: ``<data_dir>/releases/standin/<model>/<release>``."""
    return data_dir() / "releases" / "standin" / model_name / release


def write_standin_release(release: str, path: str | os.PathLike | None = None, *,
                          model_name: str = "tiny-gpt2-small", seed: int = 0) -> Path:
    """Write a random-weight stand-in of an SAELens release, saved by ``sae_lens`` itself.

    Same sae ids as the real release (hooks of the stand-in model, widths scaled to its d_model),
    one sub-folder per id holding what ``sae_lens.SAE.save_model`` writes (``cfg.json`` +
    ``sae_weights.safetensors``), so loading it runs ``SAE.load_from_disk`` like any local copy of
    a release. Weights are sae_lens' own StandardSAE initialisation (seeded); the metadata records
    ``center_writing_weights: true`` like the real jb releases. The folder is written to a temp
    name and renamed, so a half-written stand-in is never used. Returns its path.
    """
    from sae_lens import StandardSAE, StandardSAEConfig

    if release not in STANDIN_LAYOUTS:
        raise ValueError(f"no stand-in layout for release {release!r}; known: {sorted(STANDIN_LAYOUTS)}")
    if model_name not in TINY_SHAPES:
        raise ValueError(f"stand-in releases are for the random-weight models {sorted(TINY_SHAPES)}, got {model_name!r}")
    n_layers, d = TINY_SHAPES[model_name]
    layout = STANDIN_LAYOUTS[release]
    if layout["kind"] == "layers":
        members = {f"blocks.{layer}.hook_resid_pre": (f"blocks.{layer}.hook_resid_pre", layout["width_ratio"] * d)
                   for layer in range(n_layers)}
    else:
        hook = f"blocks.{round(layout['layer_frac'] * n_layers)}.hook_resid_pre"
        members = {f"{hook}_{d * 2 ** n}": (hook, d * 2 ** n) for n in range(layout["n_widths"])}
    target = Path(path) if path is not None else standin_dir(release, model_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(target) as tmp:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for sae_id, (hook, width) in members.items():
                cfg = StandardSAEConfig(d_in=d, d_sae=width, apply_b_dec_to_input=True)
                cfg.metadata.model_name = model_name
                cfg.metadata.hook_name = hook
                cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": True}
                cfg.metadata.saelib_standin_of = release
                StandardSAE(cfg).save_model(tmp / sae_id)
    return target


def release_dir(release: str | os.PathLike, *, model_name: str = "tiny-gpt2-small") -> Path | None:
    """The local folder of a release, or None for a hub release.

    ``"standin:<name>"`` → the stand-in folder (written on first use); an existing folder → itself
    (a local copy of a release: one sub-folder per sae id, each with ``cfg.json`` and
    ``sae_weights.safetensors``); anything else is a hub release name (None)."""
    text = str(release)
    if text.startswith(STANDIN_PREFIX):
        name = text[len(STANDIN_PREFIX):]
        folder = standin_dir(name, model_name)
        if not folder.is_dir():
            write_standin_release(name, folder, model_name=model_name)
        return folder
    path = Path(text)
    if path.is_dir():
        return path
    if os.sep in text and not path.exists():
        raise FileNotFoundError(f"SAE release folder {path} does not exist; pass an existing folder of SAELens SAEs, "
                                "a release name (hub) or 'standin:<release>'.")
    return None


def release_sae_ids(release: str | os.PathLike, *, model_name: str = "tiny-gpt2-small") -> list[str]:
    """The sae ids of a release: sub-folders of a local one, SAELens' directory for a hub one."""
    folder = release_dir(release, model_name=model_name)
    if folder is not None:
        ids = sorted(p.name for p in folder.iterdir() if (p / "cfg.json").is_file())
        if not ids:
            raise FileNotFoundError(f"{folder} holds no SAELens SAE (no sub-folder with cfg.json)")
        return ids
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    directory = get_pretrained_saes_directory()
    if str(release) not in directory:
        raise ValueError(f"{str(release)!r} is neither a folder nor an SAELens release name "
                         "(sae_lens.loading.pretrained_saes_directory lists them)")
    return list(directory[str(release)].saes_map)


def load_release_sae(release: str | os.PathLike, sae_id: str, *, device: str | None = None,
                     model_name: str = "tiny-gpt2-small"):
    """One SAELens SAE of a release, as an SAELens object (convert with :func:`from_saelens`).

    Local folders and stand-ins load with ``SAE.load_from_disk``; hub releases with
    ``SAE.from_pretrained`` (needs the Hugging Face Hub: offline, the error says what to use)."""
    from sae_lens import SAE as LensSAE

    folder = release_dir(release, model_name=model_name)
    if folder is not None:
        if not (folder / sae_id / "cfg.json").is_file():
            raise FileNotFoundError(f"release folder {folder} has no SAE {sae_id!r}; it has "
                                    f"{release_sae_ids(folder)}")
        return LensSAE.load_from_disk(str(folder / sae_id), device=device or "cpu")
    try:
        loaded = LensSAE.from_pretrained(str(release), sae_id, device=device or "cpu")
    except Exception as e:  # noqa: BLE001 - offline / hub errors
        raise RuntimeError(
            f"could not load {release}/{sae_id} from the Hugging Face Hub ({type(e).__name__}: {e}); this needs "
            "network access. Offline, pass a local folder of the release or use the embedded profile") from None
    return loaded[0] if isinstance(loaded, tuple) else loaded


def expects_centred_input(release: str | os.PathLike, *, model_name: str = "tiny-gpt2-small") -> bool:
    """Whether a release was trained on TransformerLens-centred residual streams
    (``center_writing_weights``), as the jb GPT-2 releases were: a model with raw weights must
    then centre each activation vector (subtract its mean over d_model) before the SAE sees it."""
    folder = release_dir(release, model_name=model_name)
    if folder is not None:
        first = folder / release_sae_ids(folder)[0] / "cfg.json"
        meta = json.loads(first.read_text()).get("metadata") or {}
        kwargs = meta.get("model_from_pretrained_kwargs") or {}
    else:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

        lookup = get_pretrained_saes_directory()[str(release)]
        kwargs = ((getattr(lookup, "config_overrides", None) or {}).get("model_from_pretrained_kwargs") or {})
    return bool(kwargs.get("center_writing_weights", False))
