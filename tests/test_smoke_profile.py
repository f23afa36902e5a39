"""Every branch of the `gpt2` and `gpu` profiles runs in the tests.

* The `smoke` profile executes every chapter down the `gpt2` profile's code paths with offline
  stand-ins (a random-weight GPT-2, a local OpenWebText stand-in, random-weight SAELens releases
  written by sae_lens), at test size. A chapter that raises (a NameError in a branch no other
  profile takes, say) fails its test, and the partly executed notebook is kept under
  ``_build/smoke/`` for reading.
* The `gpu` profile's chapters 3-6 run on CPU with only their size knobs shrunk (``GPU_SHRINK``),
  so its code path (streamed activations over many passes, the gpu width family, the paper's
  meta-SAE ratio) is exercised without a GPU.
* Key checks keep the profiles from drifting: every key `gpt2` sets is set by `smoke`, with a value
  of the same kind, and branch-selecting values that match.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import jupytext
import pytest
import yaml

from saelib import book

ROOT = book.repo_root()
GPT2, SMOKE, GPU = ROOT / "profiles" / "gpt2", ROOT / "profiles" / "smoke", ROOT / "profiles" / "gpu"

# Keys whose value picks a code path: `smoke` must take the same path as `gpt2` (same value), or
# the documented stand-in for it.
STANDINS = {
    "model_name": {"gpt2": "tiny-gpt2-small"},
    "corpus": {"openwebtext": "openwebtext-standin"},
    "release": {r: f"standin:{r}" for r in ("gpt2-small-res-jb-feature-splitting",)},
    "pretrained_release": {r: f"standin:{r}" for r in ("gpt2-small-res-jb",)},
    "device": {"cuda": "cpu"},
    "runs_dir": {"runs/gpt2": "runs/smoke"},
}
SAME_VALUE = ("activation_source", "processing", "input_norm", "sweep", "base_arch", "layers",
              "pretrained_center_input", "aux_detach_residual", "seeds", "seq_len", "meta_k")

# The gpu profile on CPU: only sizes change (tokens, rows, widths, steps, device). Everything
# else, the code path included (activation_source: store, several passes over the rows, an inline
# width family, meta width at the paper's ratio), is the gpu profile's own.
GPU_SHRINK = {
    "03_training": dict(device="cpu", train_rows=6, heldout_rows=2, train_tokens=1536, batch_size=256, d_sae=64,
                        topk_ks=[8, 64], batchtopk_ks=[8, 64], afa_coeffs=[0.0078125, 0.0625], log_every=2,
                        eps_every=4, dead_window_tokens=512, checkpoint_every=4, harvest_batch_size=2,
                        progress=False),
    "04_evaluation": dict(device="cpu", train_rows=6, heldout_rows=2, harvest_batch_size=2, d_sae=64,
                          train_tokens=1536, train_batch_size=256, afa_coeffs=[0.0078125], high_ks=[64], low_ks=[],
                          ce_rows=1, eval_batch_size=1),
    "05_stitching": dict(device="cpu", eval_tokens=256, n_points=4),
    "06_meta_saes": dict(device="cpu", eval_tokens=256, meta_max_steps=10, meta_min_steps=10, meta_window=5,
                         context_tokens=512, n_boot=20, compare_max_steps=5),
}
# The width family (chapters 5 and 6 share it): widths d·{1, 2} instead of the paper's ratios,
# a few thousand tokens instead of tens of millions.
GPU_FAMILY_SHRINK = dict(n_tokens=2048, train_tokens=2048, batch_size=256)
GPU_FAMILY_MULTIPLIERS = {"relu": [1, 2], "topk": [1], "batchtopk": [1], "topafa": [1]}


def load(folder: Path, stem: str) -> dict:
    path = folder / f"{stem}.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def kind(v) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, list):
        return "list"
    return type(v).__name__


# ---------------------------------------------------------------------------------------------
# Keys: smoke mirrors gpt2, gpu is complete


@pytest.mark.parametrize("stem", book.chapters())
def test_smoke_sets_every_gpt2_key_with_the_same_kind_and_branch(stem):
    gpt2, smoke = load(GPT2, stem), load(SMOKE, stem)
    missing = sorted(set(gpt2) - set(smoke))
    assert not missing, f"profiles/smoke/{stem}.yaml lacks {missing}, which profiles/gpt2 sets: the branch they select is untested"
    for key, value in gpt2.items():
        assert kind(smoke[key]) == kind(value), f"{stem}: {key} is a {kind(value)} in gpt2, a {kind(smoke[key])} in smoke"
        if key in STANDINS:
            assert smoke[key] == STANDINS[key].get(value, value), f"{stem}: {key}={smoke[key]!r} is not the stand-in for {value!r}"
        elif key in SAME_VALUE:
            assert smoke[key] == value, f"{stem}: {key} selects a code path; smoke has {smoke[key]!r}, gpt2 {value!r}"
        if isinstance(value, bool) or isinstance(value, str) and key not in STANDINS:
            assert smoke[key] == value, f"{stem}: {key}={smoke[key]!r} differs from gpt2's {value!r}"


def test_smoke_exercises_every_value_where_gpt2_differs_from_embedded():
    for stem in book.chapters():
        gpt2, smoke, embedded = load(GPT2, stem), load(SMOKE, stem), load(ROOT / "profiles" / "embedded", stem)
        for key in gpt2:
            if embedded.get(key) != gpt2[key]:
                assert key in smoke, f"{stem}: gpt2 differs from embedded on {key}, smoke must set it"


def test_stand_ins_exist_and_stay_offline():
    from saelib import interop
    from saelib.lm import models

    assert "tiny-gpt2-small" in models.TINY_MODELS and models.TINY_SHAPES["tiny-gpt2-small"][0] == 12
    for release in ("gpt2-small-res-jb", "gpt2-small-res-jb-feature-splitting"):
        assert release in interop.STANDIN_LAYOUTS


def test_gpu_profile_is_complete_and_at_the_papers_scale():
    for stem in book.chapters():
        assert (GPU / f"{stem}.yaml").exists(), stem
    ch3, ch4 = load(GPU, "03_training"), load(GPU, "04_evaluation")
    ch5, ch6 = load(GPU, "05_stitching"), load(GPU, "06_meta_saes")
    assert ch3["model_name"] == "embedded" and ch3["device"] == "cuda" and ch3["activation_source"] == "store"
    assert ch3["d_sae"] == 16 * 576 == 9216 and ch3["train_tokens"] >= 80_000_000
    assert ch3["topk_ks"] == ch3["batchtopk_ks"] == [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
    assert ch3["afa_coeffs"] == [1 / 128, 1 / 64, 1 / 32, 1 / 24, 1 / 16]
    assert len(ch3["layers"]) == 3 and len(ch4["seeds"]) == 3
    # chapter 4 reuses chapter 3's seed-0 SAEs: same recipe and stream
    for k3, k4 in (("train_tokens", "train_tokens"), ("batch_size", "train_batch_size"), ("lr", "lr"),
                   ("d_sae", "d_sae"), ("layers", "layers"), ("train_rows", "train_rows"), ("seed", "seed"),
                   ("activation_source", "activation_source"), ("harvest_batch_size", "harvest_batch_size")):
        assert ch3[k3] == ch4[k4], f"chapter 4's {k4} must equal chapter 3's {k3} so its seed-0 SAEs are reused"
    # epochs over the embedded corpus are stated, and match the arithmetic
    rows_tokens = ch3["train_rows"] * (ch3["seq_len"] - 1)
    assert math.ceil(ch3["train_tokens"] / rows_tokens) >= 13
    # width family: the paper's widths d·2^n (ReLU up to 64·d) and meta-SAE ratio 2304/49152 = 3/64
    assert ch5["family_preset"] == ch6["family_preset"], "chapters 5 and 6 must share one family"
    from saelib.pipeline import width_family_preset

    fam = width_family_preset(ch5["family_preset"])
    relu = list(fam["architectures"]["relu"])
    assert relu == [1, 2, 4, 8, 16, 32, 64]
    assert ch6["meta_d_meta"] * 64 == 3 * 576 * max(relu) and ch6["meta_k"] == 4
    assert fam["train_tokens"] >= 80_000_000


# ---------------------------------------------------------------------------------------------
# Running the chapters


def execute(stem: str, params: dict, out_dir: Path) -> None:
    """Execute one chapter with papermill (parameters injected as `saelib.book` does) into out_dir."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f".{stem}.input.ipynb"
    nb = jupytext.read(ROOT / "notebooks" / f"{stem}.md")
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    jupytext.write(nb, src, fmt="ipynb")
    try:
        papermill.execute_notebook(str(src), str(out_dir / f"{stem}.ipynb"), parameters=params,
                                   kernel_name="python3", cwd=str(ROOT / "notebooks"), progress_bar=False,
                                   log_output=False)
    finally:
        src.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("smoke-runs")
    yield runs
    shutil.rmtree(runs, ignore_errors=True)


@pytest.mark.parametrize("stem", book.chapters())
def test_smoke_profile_runs_every_chapter(stem, smoke_runs):
    params = book.profile_parameters("smoke", stem)
    params["runs_dir"] = str(smoke_runs)  # chapters run in order and share it (chapter 4 reuses 3)
    execute(stem, params, ROOT / "_build" / "smoke")


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("gpu-runs")
    yield runs
    shutil.rmtree(runs, ignore_errors=True)


def gpu_shrunk(stem: str, runs: Path) -> dict:
    params = {**book.profile_parameters("gpu", stem), **GPU_SHRINK[stem], "runs_dir": str(runs)}
    if stem in ("04_evaluation", "06_meta_saes"):  # SAEs of a few steps: assert the invariants only
        params["strict_checks"] = False
    if "family_preset" in params:
        params["family_overrides"] = {**GPU_FAMILY_SHRINK, "architectures": GPU_FAMILY_MULTIPLIERS}
        if "meta_d_meta" in params:  # the paper's ratio, at the shrunk widest width
            params["meta_d_meta"] = params["meta_d_meta"] * max(GPU_FAMILY_MULTIPLIERS["relu"]) // 64
    return params


def test_gpu_shrink_touches_only_size_knobs():
    size_words = ("tokens", "rows", "d_sae", "steps", "batch", "device", "ks", "coeffs", "every", "points", "boot",
                  "window", "progress", "family_preset", "meta_d_meta")
    for stem, over in GPU_SHRINK.items():
        gpu = book.profile_parameters("gpu", stem)
        for key in over:
            assert key in gpu or key in ("high_ks", "low_ks"), f"{stem}: shrink sets {key}, which the gpu profile does not"
            assert any(w in key for w in size_words), f"{stem}: {key} is not a size knob"


@pytest.mark.parametrize("stem", list(GPU_SHRINK))
def test_gpu_profile_runs_shrunk_on_cpu(stem, gpu_runs):
    execute(stem, gpu_shrunk(stem, gpu_runs), ROOT / "_build" / "gpu-smoke")


# ---------------------------------------------------------------------------------------------
# The stand-ins themselves (fast)


def test_standin_release_is_written_by_sae_lens_and_loads_like_a_local_release(tmp_path):
    import torch
    from sae_lens import SAE as LensSAE

    from saelib import interop

    folder = interop.write_standin_release("gpt2-small-res-jb-feature-splitting", tmp_path / "fs")
    ids = interop.release_sae_ids(folder)
    assert sorted(ids, key=lambda i: int(i.rsplit("_", 1)[1])) == [f"blocks.8.hook_resid_pre_{64 * 2 ** n}" for n in range(8)]
    lens = interop.load_release_sae(folder, "blocks.8.hook_resid_pre_128")
    assert isinstance(lens, LensSAE) and (lens.cfg.d_in, lens.cfg.d_sae) == (64, 128)
    assert interop.expects_centred_input(folder)
    x = torch.randn(32, 64)
    ours = interop.from_saelens(lens)
    assert torch.allclose(ours.decode(ours.encode(x)), lens.decode(lens.encode(x)), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="no SAE 'blocks.8.hook_resid_pre_96'"):
        interop.load_release_sae(folder, "blocks.8.hook_resid_pre_96")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interop.release_dir(str(tmp_path / "missing" / "release"))
    with pytest.raises(ValueError, match="no stand-in layout"):
        interop.write_standin_release("gpt2-small-res-nope", tmp_path / "x")


def test_released_family_from_a_local_folder(tmp_path):
    from saelib import interop
    from saelib.pipeline import ensure_width_family

    folder = interop.write_standin_release("gpt2-small-res-jb-feature-splitting", tmp_path / "fs")
    fam = ensure_width_family(tmp_path / "runs", release=str(folder), multipliers=[1, 4])
    assert fam.hook == "blocks.8.hook_resid_pre" and fam.widths == (64, 256)
    assert [s.cfg.d_sae for s in fam.chain("relu")] == [64, 256]
    with pytest.raises(ValueError, match="multipliers"):
        ensure_width_family(tmp_path / "runs", release=str(folder), multipliers=[3])
    layers = interop.write_standin_release("gpt2-small-res-jb", tmp_path / "jb")
    with pytest.raises(ValueError, match="not a width family"):
        ensure_width_family(tmp_path / "runs", release=str(layers), multipliers=[1])


def test_openwebtext_standin_is_a_stream_corpus(monkeypatch):
    from saelib.lm import data

    assert data.prepare_standin_corpus().exists()
    tok = __import__("saelib.lm.models", fromlist=["_embedded_tokenizer"])._embedded_tokenizer(None)
    with pytest.raises(ValueError, match="is a stream: pass n_tokens"):
        data.token_rows(tok, "openwebtext-standin", cache_dir=None)
    rows = data.token_rows(tok, "openwebtext-standin", n_tokens=4 * 32, seq_len=32, cache_dir=None, progress=False)
    assert rows.shape == (4, 32) and (rows[:, 0] == tok.bos_token_id).all()
    # offline flags do not matter: the stand-in is local
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert next(iter(data.load_texts("openwebtext-standin", split="heldout")))


def test_width_family_overrides_are_checked():
    from saelib.pipeline import width_family_preset

    assert width_family_preset("gpu", {"n_tokens": 2048})["n_tokens"] == 2048
    assert width_family_preset("gpu")["n_tokens"] == 4_194_304  # the preset itself is untouched
    with pytest.raises(ValueError, match=r"\['n_token'\] are not ensure_width_family arguments"):
        width_family_preset("ci", {"n_token": 4096})
    with pytest.raises(ValueError, match="unknown width-family preset"):
        width_family_preset("nope")
