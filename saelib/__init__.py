"""saelib: sparse autoencoders on language-model activations.

Top-AFA, TopK, BatchTopK and ReLU SAEs, the AFA theory of quasi-orthogonality, SAE stitching
and meta-SAEs, with the research book in ``notebooks/``. Sub-packages by layer: ``saelib.lm``
(models, data, activations), ``saelib.sae`` (core, rules, topafa, train, metrics),
``saelib.analysis`` (afa, evaluate, stitching, meta, ...), ``saelib.runs`` (run folders), and
``saelib.plots``; see the README's layout section.

The most used names are importable from the top level (``from saelib import SAE, load_model``);
they are imported on first use, so ``import saelib`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "saelib.runs": ["runs_dir", "data_dir", "repo_root"],
    "saelib.lm.models": ["load_model", "hook_name", "check_hook", "hook_layer"],
    "saelib.lm.data": ["load_texts", "token_rows", "iter_token_rows"],
    "saelib.lm.activations": ["harvest", "ActivationStore", "tensor_batches"],
    "saelib.lm.cache": ["ActivationCache"],
    "saelib.sae.core": ["SAE", "SAEConfig", "SAEOutput", "load_sae"],
    "saelib.sae.topafa": ["topafa_select", "topafa_select_reference"],
    "saelib.sae.rules": ["get_rule"],
    "saelib.sae.train": ["TrainConfig", "train_saes", "EarlyStopping"],
    "saelib.sae.metrics": ["ReconstructionMetrics"],
    "saelib.pipeline": [
        "activation_cache", "activation_cache_path", "sweep_configs", "ensure_sweep", "load_saes", "ensure_width_family",
    ],
    "saelib.interop": ["to_saelens", "from_saelens"],
    "saelib.analysis.afa": [
        "epsilon", "welch_bound", "bound_slopes", "f_tilde", "zf_stats", "zf_summary", "ZFStats",
        "eps_lbo", "mdl_bits",
    ],
    "saelib.analysis.concentration": ["concentration_band"],
    "saelib.analysis.evaluate": ["evaluate_sae", "evaluate_saes", "reconstruction_metrics", "EvalResult"],
    "saelib.analysis.stitching": [
        "decoder_cosine", "insertion_delta_mse", "classify_latents",
        "build_families", "stitch", "interpolation_curve",
    ],
    "saelib.analysis.meta": ["MetaSAEConfig", "train_meta_sae", "fve", "decompose", "split_recovery"],
    "saelib.analysis.inspect": ["top_activating_contexts", "top_logits", "latent_view"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'saelib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
