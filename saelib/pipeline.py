"""Pipelines that build stored results: activation caches, SAE sweeps and width families.

Every stored result lives under a chapter's ``runs_dir`` and is reused only when its stamp is
fresh (:func:`saelib.runs.make_stamp` / :func:`~saelib.runs.is_fresh`: a hash of the config, the
recipe with a fingerprint of the code, and the data); otherwise it is rebuilt, with a warning.

* :func:`activation_cache` (named by :func:`activation_cache_path`): build or reuse one cache of
  residual-stream activations, ``<runs_dir>/activations/<model>/<corpus>/<split>/...``.
* :func:`store_stream`: the same training stream without a cache (paper scale does not fit on disk).
* Sweeps (:func:`sweep_configs`, :func:`ensure_sweep`, :func:`from_sweep`, :func:`train_or_reuse`,
  :func:`load_saes`, :func:`sweep_table`): grids of SAEs trained in one pass, ``<runs_dir>/sae/<name>``.
* Width families (:func:`ensure_width_family`, :data:`WIDTH_FAMILY_PRESETS`): SAEs of several
  widths on one hook, the material of the stitching and meta-SAE chapters.

This module sits above ``saelib.lm`` and ``saelib.sae`` (it trains SAEs on model activations),
which is why it is not part of :mod:`saelib.runs`, which they import.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import Tensor, nn

from saelib import interop
from saelib.io import ACTIVATION_CODE, TRAINING_CODE, FolderInUseError, folder_lock, model_fingerprint
from saelib.lm.activations import ActivationStore
from saelib.lm.cache import MANIFEST, STAMP, ActivationCache
from saelib.lm.data import token_rows
from saelib.lm.models import load_model
from saelib.runs import is_fresh, make_stamp, read_stamp, rel, write_stamp
from saelib.runs import runs_dir as resolve_runs
from saelib.sae.core import SAE, SAEConfig
from saelib.sae.rules import RULES, get_rule
from saelib.sae.train import TrainConfig, train_saes
from saelib.sae.train_files import cfg_dict, natural_key, read_jsonl, run_identity

__all__ = sorted(("activation_cache_path", "activation_cache", "cache_request", "sweep_data", "store_stream", "sweep_name",
    "sweep_configs", "ensure_sweep", "from_sweep", "train_or_reuse", "load_saes", "load_metrics", "load_evals",
    "sweep_table", "train_settings", "DEFAULT_LAYERS", "SAELENS_RELEASE", "WidthFamily", "member_name", "family_name",
    "family_eval_activations", "ensure_width_family", "WIDTH_FAMILY_PRESETS", "width_family_preset",
    "load_saelens_family",
))

SWEEP_STAMP = "sweep.json"


# ============================================================================================
# Activation caches
# ============================================================================================
def _safe(x: Any) -> str:
    """A folder name: a local file or folder by its name, anything else (hub ids) with ``/`` -> ``--``."""
    p = Path(str(x))
    return p.name if p.is_absolute() or p.exists() else str(x).replace("/", "--")


def cache_request(model_name: str, corpus: str, split: str, n_tokens: int, seq_len: int, seed: int) -> dict[str, Any]:
    """What a cache's tokens are made of (the ``data`` of its stamp, and of a sweep trained on it)."""
    return {"model": str(model_name), "corpus": str(corpus), "split": str(split), "n_tokens": int(n_tokens),
            "seq_len": int(seq_len), "seed": int(seed)}


def sweep_data(model_name: str, corpus: str, *, n_tokens: int, seq_len: int, seed: int, source: str = "cache",
               eval_tokens: int | None = None) -> dict[str, Any]:
    """The ``data`` of a sweep trained on ``n_tokens`` training tokens served from a cache or
    streamed from the model (``source``: "cache" or "store"), evaluated on ``eval_tokens``
    held-out tokens: ``{"train": ..., "eval": ...}`` (:func:`from_sweep` compares ``"train"``)."""
    data = {"train": {**cache_request(model_name, corpus, "train", n_tokens, seq_len, seed), "source": source}}
    if eval_tokens is not None:
        data["eval"] = cache_request(model_name, corpus, "heldout", eval_tokens, seq_len, seed)
    return data


def activation_cache_path(runs_dir: str | Path, *, model_name: str, corpus: str, split: str, hooks: Sequence[str],
                          n_tokens: int, seq_len: int, seed: int, dtype: torch.dtype = torch.float32) -> Path:
    """The one name of a cache: ``<runs_dir>/activations/<model>/<corpus>/<split>/<n_tokens>t<seq_len>-s<seed>-<hash>``.

    The hash (12 hex digits) covers the hooks and the dtype, so requests for other hooks never
    share a folder; two chapters asking for the same activations share one cache. A corpus given
    as a file path is named by its file name.
    """
    key = json.dumps([list(hooks), str(dtype).removeprefix("torch.")])
    h = hashlib.sha256(key.encode()).hexdigest()[:12]
    return (Path(runs_dir) / "activations" / _safe(model_name) / _safe(corpus) / split
            / f"{int(n_tokens)}t{int(seq_len)}-s{int(seed)}-{h}")


def activation_cache(runs_dir: str | Path, model: nn.Module | Callable[[], nn.Module], *, model_name: str | None = None,
                     corpus: str, split: str, hooks: str | Sequence[str], n_tokens: int, seq_len: int, seed: int,
                     dtype: torch.dtype = torch.float32, batch_size: int = 32, progress: bool = True) -> ActivationCache:
    """Build or reuse the cache of ``hooks`` over ``n_tokens`` tokens of ``corpus``/``split``
    (``saelib.lm.data.token_rows`` rows of ``seq_len``, shuffled by ``seed``; BOS dropped).

    Reused, without loading the model, when its ``stamp.json`` is fresh: the same request
    (:func:`cache_request`), hooks and dtype, the same activation and data code, and the same
    model weights (their fingerprint, when ``model`` is a loaded model; a model given as a
    zero-argument loader trusts the weights the cache was built with). A stale cache is rebuilt;
    an interrupted one resumes (``ActivationCache.build`` keeps its manifest, checksums and
    resumable shards). The stamp is written after the cache is complete.
    """
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    name = model_name or getattr(model, "saelib_name", None)
    if name is None:
        raise ValueError("activation_cache needs model_name= when the model has no saelib_name")
    path = activation_cache_path(runs_dir, model_name=name, corpus=corpus, split=split, hooks=hooks,
                                 n_tokens=n_tokens, seq_len=seq_len, seed=seed, dtype=dtype)
    have = read_stamp(path / STAMP)
    loaded = isinstance(model, nn.Module)
    weights = model_fingerprint(model) if loaded else (have or {}).get("data", {}).get("weights")

    def stamp(w):
        return make_stamp({"hooks": hooks, "dtype": str(dtype)}, {}, {**cache_request(name, corpus, split, n_tokens,
                          seq_len, seed), "weights": w}, code=(*ACTIVATION_CODE, "saelib.lm.data"))

    if is_fresh(path / STAMP, stamp(weights)) and (path / MANIFEST).is_file():
        return ActivationCache(path)
    if have is not None:  # made from other inputs or code: start over (the build removes its old shards)
        warnings.warn(f"the activation cache {rel(path)} was made by other saelib code, weights or settings; rebuilding it",
                      stacklevel=2)
        (path / MANIFEST).unlink(missing_ok=True)
        (path / STAMP).unlink(missing_ok=True)
    m = model if loaded else model()
    toks = token_rows(m, corpus, split=split, n_tokens=n_tokens, seq_len=seq_len, seed=seed, progress=progress)
    cache = ActivationCache.build(path, m, toks, hooks, dtype=dtype, batch_size=batch_size, progress=progress)
    write_stamp(path / STAMP, stamp(model_fingerprint(m)))
    return cache


def store_stream(model: nn.Module, rows: Tensor, hooks: str | Sequence[str], *, batch_size: int, n_tokens: int,
                 seed: int, model_batch_size: int = 32, progress: bool = False) -> Iterator[dict[str, Tensor]]:
    """Activations streamed from the model (no cache): ``ceil(n_tokens / per_pass)`` passes over
    ``rows``, the first in order, each later one in a new order drawn from ``seed + pass``;
    ``per_pass`` is the whole batches one pass yields. The stream chapter 3 trains on when
    ``activation_source="store"``, so other chapters can replay it exactly."""
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    per_pass = max(batch_size, len(rows) * (rows.shape[1] - 1) // batch_size * batch_size)
    for e in range(math.ceil(n_tokens / per_pass)):
        order = rows if e == 0 else rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + e))]
        yield from ActivationStore(model, order, hooks, batch_size=batch_size, seed=seed + e,
                                   model_batch_size=model_batch_size, progress=progress)


# ============================================================================================
# Sweeps
# ============================================================================================
def sweep_name(hook: str, activation: str, *, seed: int = 0, **knob: Any) -> str:
    """Folder name of one sweep member, e.g. ``blocks.15.hook_resid_pre-topk-k32-s0``: the rule's
    knob tag and value (``k=32`` -> ``k32``, ``afa_coeff=0.0625`` -> ``afa0.0625``)."""
    rule = get_rule(activation)
    v = knob.get(rule.knob)
    return f"{hook}-{activation}-{rule.knob_tag}{v if isinstance(v, int) else f'{v:g}'}-s{seed}"


def sweep_configs(hooks: Iterable[str], d_in: int, d_sae: int, *, topk_ks: Iterable[int] = (),
                  batchtopk_ks: Iterable[int] = (), afa_coeffs: Iterable[float] = (),
                  relu_l1_coeffs: Iterable[float] = (), knobs: Mapping[str, Iterable[float]] | None = None,
                  seeds: Iterable[int] = (0,), **common: Any) -> dict[str, SAEConfig]:
    """The grid hooks x {TopK over ``topk_ks``, BatchTopK over ``batchtopk_ks``, top-AFA over
    ``afa_coeffs``, ReLU+L1 over ``relu_l1_coeffs``, any rule over ``knobs[rule]`` (values of its
    knob, e.g. ``{"jumprelu": [1e-3]}``)} x seeds, as ``{name: SAEConfig}``.

    ``common`` goes to every ``SAEConfig`` (e.g. ``input_norm="token"``, ``model_name=...``).
    The paper's grid: ``topk_ks = batchtopk_ks = (32, ..., 8192)``, ``afa_coeffs = (1/128, 1/64,
    1/32, 1/24, 1/16)``. Names come from :func:`sweep_name`; ``seeds`` set ``SAEConfig.seed``
    (the initialisation), so seed replicates differ only in their init.
    """
    hooks, seeds = list(hooks), list(seeds)
    if not hooks:
        raise ValueError("sweep_configs needs at least one hook name, e.g. ['blocks.6.hook_resid_pre']")
    values = {"topk": topk_ks, "batchtopk": batchtopk_ks, "topafa": afa_coeffs, "relu": relu_l1_coeffs, **(knobs or {})}
    grid: list[tuple[str, dict[str, Any]]] = []
    for act, vals in values.items():
        rule = get_rule(act)
        cast = int if rule.knob == "k" else float
        grid += [(act, {rule.knob: cast(v)}) for v in vals]
    if not grid:
        raise ValueError("sweep_configs got an empty grid: give topk_ks, batchtopk_ks, afa_coeffs, relu_l1_coeffs or knobs")
    for act, knob in grid:
        if "k" in knob and not 1 <= knob["k"] <= d_sae:
            raise ValueError(f"{act} k={knob['k']} is outside [1, d_sae={d_sae}]; fix the k grid or d_sae")
    return {sweep_name(hook, act, seed=seed, **knob): SAEConfig(d_in=d_in, d_sae=d_sae, activation=act, hook_name=hook,
                                                               seed=seed, **{**common, **knob})
            for hook, (act, knob), seed in itertools.product(hooks, grid, seeds)}


def load_saes(out_dir: str | Path, names: Iterable[str] | None = None, *, device: str | None = None) -> dict[str, SAE]:
    """Load the final SAEs of a sweep folder (every ``<out_dir>/<name>/`` with ``cfg.json``), in eval
    mode (BatchTopK then uses its inference threshold)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder {out_dir}; train it first (train_saes / ensure_sweep)")
    found = sorted((p.parent.name for p in out_dir.glob("*/cfg.json")), key=natural_key)
    if names is not None:
        names = list(names)
        missing = [n for n in names if n not in found]
        if missing:
            raise FileNotFoundError(f"{out_dir} has no trained SAE(s) {missing}; available: {found}")
        found = names
    saes = {}
    for n in found:
        sae = SAE.load(out_dir / n)
        saes[n] = (sae.to(device) if device is not None else sae).eval()
    return saes


def load_metrics(out_dir: str | Path, *, as_frame: bool = True):
    """Training records of every SAE in ``out_dir``: a pandas DataFrame (column ``name``) or a dict."""
    res = {p.parent.name: [rec for _, rec in read_jsonl(p)]
           for p in sorted(Path(out_dir).glob("*/metrics.jsonl"), key=lambda p: natural_key(p.parent.name))}
    if not as_frame:
        return res
    return pd.DataFrame([{"name": n, **r} for n, recs in res.items() for r in recs])


def load_evals(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """``{name: eval.json contents}`` for every evaluated SAE of a sweep folder."""
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted(Path(out_dir).glob("*/eval.json"), key=lambda p: natural_key(p.parent.name))}


def sweep_table(out_dir: str | Path):
    """One row per evaluated SAE: config (hook, activation, k, afa_coeff, seed, d_sae) + eval metrics."""
    out_dir = Path(out_dir)
    rows = []
    for name, ev in load_evals(out_dir).items():
        cfg = json.loads((out_dir / name / "cfg.json").read_text())
        cfg = cfg.get("cfg", cfg)
        act = cfg.get("activation")
        rows.append({
            "name": name, "hook": cfg.get("hook_name"), "activation": act,
            **{f: cfg.get(f) if get_rule(act).knob == f else None for f in ("k", "afa_coeff", "l1_coeff", "l0_coeff")},
            "seed": cfg.get("seed"), "d_sae": cfg.get("d_sae"),
            **{k: v for k, v in ev.items() if k != "l0_hist"},
        })
    return pd.DataFrame(rows)


LOG_ONLY = ("dead_window_tokens",)
"""TrainConfig fields that change the training logs but not the trained weights."""


def train_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The TrainConfig fields that decide the trained weights (a sweep stamp's ``config``):
    everything but bookkeeping (folders, logging, checkpoints, device) and :data:`LOG_ONLY`."""
    return {k: v for k, v in run_identity([], cfg)["train"].items() if k not in LOG_ONLY}


def _is_finished(folder: Path, cfg: SAEConfig, need_eval: bool) -> bool:
    """A member is finished when its saved SAE has exactly this config and its weights load
    (checksum matches, all finite: a diverged SAE is never reused), with ``eval.json`` if asked."""
    if not (folder / "cfg.json").exists() or not any(folder.glob("*.safetensors")):
        return False
    if need_eval and not (folder / "eval.json").exists():
        return False
    try:  # compare configs without loading the weights
        doc = json.loads((folder / "cfg.json").read_text())
        if cfg_dict(SAEConfig.from_dict(doc.get("cfg", doc))) != cfg_dict(cfg):
            return False
    except Exception:  # noqa: BLE001 - an unreadable folder is simply "not finished"
        return False
    try:
        SAE.load(folder)
    except (ValueError, OSError) as e:
        warnings.warn(f"{rel(folder)} holds an unusable SAE ({e}); retraining it", stacklevel=3)
        return False
    return True


Batches = Callable[[], Iterable[Mapping[str, Tensor]]] | Iterable[Mapping[str, Tensor]]


def ensure_sweep(configs: Mapping[str, SAEConfig], batches: Batches, cfg: TrainConfig, *,
                 eval_batches: Batches | None = None, data: Any = None,
                 init: Callable[[dict[str, SAEConfig]], dict[str, SAE]] | None = None,
                 code: Sequence[Any] = ()) -> dict[str, SAE]:
    """Load a finished sweep from ``cfg.out_dir``, training (in one pass) only what is missing.

    The folder's ``sweep.json`` is its stamp (:func:`saelib.runs.make_stamp`): config =
    :func:`train_settings`, recipe = the code of saelib's SAE, top-AFA, trainer, activation and
    model modules (plus ``code``), data = ``data`` (the activation source, e.g. a
    :func:`cache_request`; None = not checked, e.g. when a later chapter reuses a sweep it did
    not build). When the stamp is stale the whole sweep is retrained, with a warning; when it is
    fresh, only members that are not finished (:func:`_is_finished`; and without ``eval.json``
    when ``eval_batches`` is given) are trained, so a grid can grow. ``batches`` /
    ``eval_batches`` may be zero-argument callables so that no activations are produced when
    nothing needs training. ``init`` turns the missing configs into initialised SAEs (default:
    ``SAE(cfg)``). The stamp is written after the SAEs. Returns ``{name: SAE}`` for ``configs``.
    """
    if cfg.out_dir is None:
        raise ValueError("ensure_sweep needs TrainConfig.out_dir (the sweep folder to load from / train into)")
    try:
        lock = folder_lock(cfg.out_dir, "sweep folder")
        lock.__enter__()
    except FolderInUseError:
        raise
    except OSError as e:  # a read-only folder: fine as long as nothing needs training
        return _ensure_sweep(configs, batches, cfg, eval_batches, data, init, code, cannot_write=e)
    try:
        return _ensure_sweep(configs, batches, cfg, eval_batches, data, init, code)
    finally:
        lock.__exit__(None, None, None)


def _ensure_sweep(configs, batches, cfg, eval_batches, data, init, code, cannot_write=None) -> dict[str, SAE]:
    out_dir = Path(cfg.out_dir)
    path = out_dir / SWEEP_STAMP
    want = make_stamp(train_settings(cfg), {}, data, code=(*TRAINING_CODE, *code))
    if is_fresh(path, want):
        missing = {n: c for n, c in configs.items() if not _is_finished(out_dir / n, c, eval_batches is not None)}
    else:
        if any(_is_finished(out_dir / n, c, False) for n, c in configs.items()):
            warnings.warn(f"{rel(out_dir)} holds SAEs trained with other settings, data or saelib code (sweep.json differs); "
                          "retraining the sweep", stacklevel=3)
        missing = dict(configs)
    if missing and cannot_write is not None:
        raise cannot_write
    if missing:
        b = batches() if callable(batches) else batches
        e = eval_batches() if callable(eval_batches) else eval_batches
        train_saes(init(missing) if init is not None else missing, b, cfg, eval_batches=e)
        if data is None:  # keep the data a previous caller recorded
            want = make_stamp(want["config"], want["recipe"], (read_stamp(path) or {}).get("data"))
        write_stamp(path, want)
    return load_saes(out_dir, list(configs))


def from_sweep(src: str | Path, configs: Mapping[str, SAEConfig], cfg: TrainConfig, data: Any) -> dict[str, SAE]:
    """The members of the sweep folder ``src`` that ``ensure_sweep(configs, ..., cfg, data=data)``
    would have trained identically: same code, same :func:`train_settings`, the same training
    data (``data["train"]`` when both are mappings with a ``"train"`` entry, else all of it) and
    the same SAE config. Empty when ``src`` has no stamp."""
    have = read_stamp(Path(src) / SWEEP_STAMP)
    if have is None:
        return {}
    want = make_stamp(train_settings(cfg), {}, data, code=TRAINING_CODE)
    train_of = lambda d: d.get("train") if isinstance(d, Mapping) and "train" in d else d  # noqa: E731
    if have["recipe"] != want["recipe"] or have["config"] != want["config"] or train_of(have["data"]) != train_of(want["data"]):
        return {}
    same = [n for n, c in configs.items() if _is_finished(Path(src) / n, c, False)]
    return load_saes(src, same) if same else {}


def train_or_reuse(configs: Mapping[str, SAEConfig], batches: Batches, cfg: TrainConfig, *, data: Any,
                   reuse_from: str | Path | None = None) -> tuple[dict[str, SAE], list[str]]:
    """``ensure_sweep`` for the members that the sweep ``reuse_from`` does not already hold
    (:func:`from_sweep`). Returns ``({name: SAE} for every config, names taken from reuse_from)``."""
    reused = from_sweep(reuse_from, configs, cfg, data) if reuse_from is not None else {}
    todo = {n: c for n, c in configs.items() if n not in reused}
    trained = ensure_sweep(todo, batches, cfg, data=data) if todo else {}
    return {n: (reused | trained)[n] for n in configs}, list(reused)


# ============================================================================================
# The width family: SAEs of several widths on one hook, trained in one pass
# ============================================================================================
DEFAULT_LAYERS = {"embedded": 10, "smollm2-135m": 10, "gpt2": 8, "gpt2-small": 8, "tiny-gpt2": 1, "tiny-llama": 1}
"""Hook layer per model. GPT-2: block 8, the paper's. SmolLM2-135M (30 layers): block 10, an
intermediate layer past the early token-level layers; the paper's relative depth (8/12) would be
block 20, which doubles the cost of every harvest on CPU (forwards stop at the hook)."""

SAELENS_RELEASE = "gpt2-small-res-jb-feature-splitting"


class WidthFamily(NamedTuple):
    """SAEs of several widths on one hook: ``saes[arch][width]``."""

    name: str
    """Folder name under ``<runs_dir>/sae/``."""
    path: Path | None
    """``<runs_dir>/sae/<name>`` (None for a released family loaded from SAELens)."""
    hook: str
    """Hook the SAEs read, e.g. ``blocks.10.hook_resid_pre``."""
    widths: tuple[int, ...]
    """Widths in increasing order."""
    saes: dict[str, dict[int, Any]]
    """``{architecture: {width: SAE}}``."""

    def chain(self, arch: str) -> list[Any]:
        """The SAEs of one architecture, smallest first."""
        if arch not in self.saes:
            raise KeyError(f"no {arch!r} SAEs in family {self.name!r}; it has {sorted(self.saes)}")
        return [self.saes[arch][w] for w in sorted(self.saes[arch])]


def member_name(arch: str, width: int) -> str:
    """Folder name of one family member, e.g. ``relu-2304``."""
    return f"{arch}-{width}"


def family_name(model_name: str, hook: str) -> str:
    """Default family folder name, e.g. ``widths-embedded-blocks.10.hook_resid_pre``."""
    return f"widths-{model_name}-{hook}"


def _family_hook(model_name: str, layer: int | None) -> str:
    return f"blocks.{DEFAULT_LAYERS.get(model_name, 6) if layer is None else layer}.hook_resid_pre"


def family_eval_activations(runs_dir: str | Path, *, model_name: str = "embedded", corpus: str = "embedded",
                            hook: str | None = None, layer: int | None = None, n_tokens: int = 16_384,
                            seq_len: int = 128, seed: int = 1, model: Any = None, progress: bool = True) -> Tensor:
    """Held-out activations [N, d] (BOS excluded) at the family's hook, cached under
    ``<runs_dir>/activations/`` (:func:`activation_cache`); the stitching eval set."""
    cache = activation_cache(resolve_runs(runs_dir), model if model is not None else (lambda: load_model(model_name)),
                             model_name=model_name, corpus=corpus, split="heldout",
                             hooks=[hook or _family_hook(model_name, layer)], n_tokens=n_tokens, seq_len=seq_len,
                             seed=seed, progress=progress)
    return cache.load(cache.hooks[0]).float()


def ensure_width_family(
    runs_dir: str | Path, *, model_name: str = "embedded", corpus: str = "embedded", layer: int | None = None,
    multipliers: Sequence[int] = (1, 2, 4, 8), architectures: Sequence[str] | Mapping[str, Sequence[int]] = ("relu", "topk", "batchtopk", "topafa"),
    n_tokens: int = 131_072, batch_size: int = 1024, lr: float = 1e-3, k: int = 32, l1_coeff: float = 3e-3,
    afa_coeff: float = 1 / 16, afa_target: str = "consistent", input_norm: str = "global",
    train_tokens: int | None = None, seq_len: int = 128, seed: int = 0, name: str | None = None,
    device: str | None = None, progress: bool = True, model: Any = None, release: str | None = None,
) -> WidthFamily:
    """Load the width family from ``<runs_dir>/sae/<name>/``, training (in one pass) what is missing.

    Widths are ``d_model × multipliers`` (the default d·{1, 2, 4, 8}); every architecture gets
    every width (or, when ``architectures`` maps architecture → multipliers, its own widths), all
    trained together by :func:`ensure_sweep` off one cached activation stream (same tokens, same
    order, same optimiser settings, so width and architecture are the only variables). TopK and
    BatchTopK use ``k`` at every width; ReLU ``l1_coeff``; top-AFA ``afa_coeff`` and
    ``afa_target``. ``input_norm="global"`` keeps the SAEs affine in model space (stitching folds
    the scale). ``n_tokens`` activations are cached; ``train_tokens`` (default ``n_tokens``) are
    served from that cache, cycling epochs, so a short CPU run can take several passes over a
    cache that is cheap to harvest.

    Two defaults matter on a short budget. ``afa_target="consistent"``: b_dec starts at the data
    mean, so ||x_n − b_dec|| (what the top-AFA selection matches) is much smaller than ||x_n||
    (what the paper's AFA loss matches); the paper's loss then inflates every activation until
    one or two latents exceed the selection target and the SAE collapses (L0 ≈ 1.5, FVU > 1).
    The consistent target uses ||x_n − b_dec|| in both places. ``l1_coeff`` is weighed against a
    *per-element* MSE (mean over d_in), so it must be about 1/d_in of the usual sum-of-squares
    value: 0.2 kills every ReLU latent (L0 < 1, FVU ≈ 1), 3e-3 gives L0 of tens.

    Freshness is the sweep's (``sweep.json``: training settings, the training code plus this
    function, and the cache request as data): a family made by other code or settings is
    retrained; members whose weights do not load (checksum, non-finite) are retrained.

    ``release="gpt2-small-res-jb-feature-splitting"`` instead loads Bloom's GPT-2 feature-splitting
    family (widths 768–98304, ReLU) through SAE Lens (needs the Hugging Face Hub; a local folder or
    ``"standin:<release>"`` works offline, see :func:`load_saelens_family`); ``multipliers`` then
    selects widths 768·m.
    """
    if release is not None:
        return load_saelens_family(release, multipliers=multipliers, device=device, model_name=model_name)
    if not isinstance(architectures, Mapping):
        architectures = {a: tuple(multipliers) for a in architectures}
    bad = [a for a in architectures if a not in RULES]
    if bad:
        raise ValueError(f"unknown architectures {bad}; choose from {', '.join(RULES)}")
    for a, mults in architectures.items():
        if not mults or any(int(m) <= 0 for m in mults):
            raise ValueError(f"multipliers for {a} must be positive ints (width = d_model × m), got {tuple(mults)}")
    hook = _family_hook(model_name, layer)
    runs = resolve_runs(runs_dir)
    name = name or family_name(model_name, hook)
    out = runs / "sae" / name
    loaded: dict[str, Any] = {}

    def get_model():
        if "m" not in loaded:
            loaded["m"] = model if model is not None else load_model(model_name)
        return loaded["m"]

    d_model = _family_d_model(out, get_model)
    widths_of = {a: tuple(sorted({int(d_model * int(m)) for m in mults})) for a, mults in architectures.items()}
    configs = {}
    for arch in architectures:
        for w in widths_of[arch]:
            kw: dict[str, Any] = dict(d_in=d_model, d_sae=w, activation=arch, hook_name=hook, model_name=model_name,
                                      input_norm=input_norm, seed=seed)
            knob = get_rule(arch).knob  # its sparsity knob; a rule not listed here keeps its default
            kw.update({"k": {"k": min(k, w)}, "afa_coeff": {"afa_coeff": afa_coeff, "afa_target": afa_target},
                       "l1_coeff": {"l1_coeff": l1_coeff}}.get(knob, {}))
            configs[member_name(arch, w)] = SAEConfig(**kw)
    train_tokens = n_tokens if train_tokens is None else int(train_tokens)
    if train_tokens < batch_size:
        raise ValueError(f"train_tokens={train_tokens} is less than one batch ({batch_size}); raise train_tokens")
    tcfg = TrainConfig(batch_size=batch_size, n_tokens=train_tokens, lr=lr, out_dir=out, progress=progress,
                       device=device, seed=seed, log_every=max(1, (train_tokens // batch_size) // 20))
    cache: list[ActivationCache] = []

    def batches():
        cache.append(activation_cache(runs, model if isinstance(model, nn.Module) else get_model, model_name=model_name,
                                      corpus=corpus, split="train", hooks=[hook], n_tokens=n_tokens, seq_len=seq_len,
                                      seed=seed, progress=progress))
        return cache[0].iter_batches([hook], batch_size, seed=seed, n_tokens=train_tokens)

    def init(missing: dict[str, SAEConfig]) -> dict[str, SAE]:
        sample = next(cache[0].iter_batches([hook], min(8192, cache[0].n_tokens), seed=seed + 1))[hook].float()
        saes = {}
        for n, c in missing.items():
            sae = SAE(c)
            # start b_dec at the data mean (the paper's SAEs start at the geometric median): with a
            # short CPU budget, learning the large mean of the residual stream wastes most steps
            scale = sae.fit_input_norm(sample) if c.input_norm == "global" else 1.0
            with torch.no_grad():
                sae.b_dec.copy_(sample.mean(0) * scale)
            saes[n] = sae
        return saes

    data = {**cache_request(model_name, corpus, "train", n_tokens, seq_len, seed), "hook": hook}
    saes = ensure_sweep(configs, batches, tcfg, data=data, init=init, code=(ensure_width_family,))
    fam = {a: {w: saes[member_name(a, w)].eval() for w in widths_of[a]} for a in architectures}
    return WidthFamily(name, out, hook, tuple(sorted({w for ws in widths_of.values() for w in ws})), fam)


def _family_d_model(out: Path, get_model: Callable[[], Any]) -> int:
    """d_model from an existing member's cfg.json (no model load), else from the model."""
    for p in sorted(out.glob("*/cfg.json")):
        try:
            doc = json.loads(p.read_text())
            return int(doc.get("cfg", doc)["d_in"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return int(get_model().cfg.d_model)


WIDTH_FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # seconds: a toy family for CI (the chapter's code path, not its conclusions)
    "ci": dict(architectures={"relu": (1, 2, 4), "topk": (1, 2), "batchtopk": (1, 2), "topafa": (1, 2)},
               n_tokens=4096, batch_size=256, lr=2e-3),
    # the book's main job on 2 CPU cores: ReLU at d·{1,2,4,8} (the paper's setting), the
    # beyond-the-paper architectures at d·{1,2,4}
    # 64k cached tokens (one LM pass), 4 epochs in 512 steps of 512 (about 4.5 minutes with the
    # harvest). l1_coeff: see ensure_width_family (per-element MSE); 3e-3 gives ReLU L0 ≈ 31-38
    # at every width, held-out FVU ≈ 0.23-0.25. A 5x shorter run (49k tokens) left the decoders
    # so close to their initialisations that 96-99% of the wider ReLU latents came out novel;
    # this one gives 80-88% (measured on the held-out eval tokens of the stitching chapter).
    "embedded": dict(architectures={"relu": (1, 2, 4, 8), "topk": (1, 2, 4), "batchtopk": (1, 2, 4),
                                    "topafa": (1, 2, 4)},
                     n_tokens=65_536, train_tokens=262_144, batch_size=512, lr=2e-3, l1_coeff=3e-3),
    # the papers' ratios on one GPU (profiles/gpu): ReLU at d·2^n, n = 0..6 (Bloom's GPT-2 family is
    # 768·2^n), the other rules at d·{1..16}; 81,924,096 tokens per SAE (20,001 steps of 4096)
    # cycling a 4.19 M-token cache; lr 4e-4 and batch 4096 are Bloom's, l1_coeff 3e-3 is ours
    "gpu": dict(architectures={"relu": (1, 2, 4, 8, 16, 32, 64), "topk": (1, 2, 4, 8, 16),
                               "batchtopk": (1, 2, 4, 8, 16), "topafa": (1, 2, 4, 8, 16)},
                n_tokens=4_194_304, train_tokens=81_924_096, batch_size=4096, lr=4e-4, l1_coeff=3e-3, k=32),
}
"""Named width-family settings shared by the stitching and meta-SAE chapters (the same preset
gives the same folder and configs, so the family is trained once)."""

_NOT_PRESET = {"runs_dir", "model_name", "corpus", "layer", "seed", "name", "device", "progress", "model", "release"}


def width_family_preset(name: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of :func:`ensure_width_family` for a named preset ("ci", "embedded",
    "gpu"), with ``overrides`` (a mapping of the same arguments, checked) laid over it."""
    if name not in WIDTH_FAMILY_PRESETS:
        raise ValueError(f"unknown width-family preset {name!r}; choose one of {sorted(WIDTH_FAMILY_PRESETS)}")
    overrides = dict(overrides or {})
    allowed = set(inspect.signature(ensure_width_family).parameters) - _NOT_PRESET
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"width-family settings {bad} are not ensure_width_family arguments; allowed: {sorted(allowed)}")
    return {**WIDTH_FAMILY_PRESETS[name], **overrides}


def load_saelens_family(release: str = SAELENS_RELEASE, *, multipliers: Sequence[int] = (1, 2, 4, 8),
                        device: str | None = None, model_name: str = "tiny-gpt2-small") -> WidthFamily:
    """A released width family of SAELens SAEs, e.g. Bloom's GPT-2 layer-8 feature-splitting SAEs
    (widths 768·2^n), converted with ``saelib.interop``.

    ``release`` is an SAELens release name (needs the Hugging Face Hub), a local folder of it (one
    sub-folder per sae id), or ``"standin:<release>"`` (random-weight stand-in for ``model_name``,
    see :func:`saelib.interop.write_standin_release`). Its sae ids must read ``<hook>_<width>`` on
    one hook; the smallest width is the base (d_model), and ``multipliers`` select widths base·m."""
    try:
        import sae_lens  # noqa: F401
    except ImportError as e:
        raise ImportError("loading a released SAE family needs sae-lens: pip install sae-lens") from e
    ids = interop.release_sae_ids(release, model_name=model_name)
    parsed = {}
    for sae_id in ids:
        m = re.fullmatch(r"(blocks\.\d+\.hook_resid_pre)_(\d+)", sae_id)
        if m:
            parsed[int(m.group(2))] = (m.group(1), sae_id)
    hooks = {h for h, _ in parsed.values()}
    if len(hooks) != 1:
        raise ValueError(f"release {release!r} is not a width family (sae ids '<hook>_<width>' on one hook); its ids: {ids}")
    base = min(parsed)
    widths = tuple(sorted(base * int(m) for m in multipliers))
    if not set(widths) <= set(parsed):
        raise ValueError(f"the release has widths {sorted(parsed)}; multipliers {tuple(multipliers)} give {widths}")
    saes = {w: interop.from_saelens(interop.load_release_sae(release, parsed[w][1], device=device,
                                                             model_name=model_name)).eval()
            for w in widths}
    return WidthFamily(str(release), None, hooks.pop(), widths, {"relu": saes})
