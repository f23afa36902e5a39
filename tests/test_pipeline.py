"""The pipeline: the freshness rule, cache naming and reuse, sweeps reused across chapters, width families."""

from __future__ import annotations

import json

import pytest
import torch

from saelib import pipeline, runs
from saelib.lm.models import load_model
from saelib.pipeline import (
    activation_cache,
    activation_cache_path,
    ensure_sweep,
    from_sweep,
    store_stream,
    sweep_configs,
    train_or_reuse,
)
from saelib.sae.train import TrainConfig

D, H = 16, 48
HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", device="cpu")


def batches(x, bs=64, epochs=50):
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - bs + 1, bs):
            yield {HOOK: x[perm[i : i + bs]]}


@pytest.fixture(scope="module")
def x():
    g = torch.Generator().manual_seed(0)
    return torch.relu(torch.randn(512, H, generator=g)) @ torch.randn(H, D, generator=g) / 4


def tcfg(out, **kw):
    return TrainConfig(**{**dict(batch_size=64, n_tokens=64 * 6, lr=3e-3, log_every=3, progress=False, out_dir=out), **kw})


def test_pipeline_exports_exist():
    assert all(callable(getattr(pipeline, n)) or n.isupper() for n in pipeline.__all__)


def test_stamp_hash_parts_and_fresh(tmp_path):
    s = runs.make_stamp({"lr": 1e-3}, {"n": 4}, {"model": "m"}, code=("saelib.runs",))
    assert set(s) == {"config", "recipe", "data", "hash"} and s["recipe"]["code"]
    assert runs.make_stamp({"lr": 1e-3}, {"n": (4,)[0]}, {"model": "m"}, code=("saelib.runs",)) == s
    assert not runs.is_fresh(tmp_path / "s.json", s)  # missing
    (tmp_path / "s.json").write_text("{nope")
    assert not runs.is_fresh(tmp_path / "s.json", s) and runs.read_stamp(tmp_path / "s.json") is None
    runs.write_stamp(tmp_path / "s.json", s)
    assert runs.is_fresh(tmp_path / "s.json", s)
    assert not runs.is_fresh(tmp_path / "s.json", runs.make_stamp({"lr": 2e-3}, {"n": 4}, {"model": "m"}))
    assert not runs.is_fresh(tmp_path / "s.json", {**s, "data": {"model": "other"}})
    assert runs.is_fresh(tmp_path / "s.json", {**s, "data": None})  # data not named: not compared
    (tmp_path / "s.json").write_text(json.dumps({**s, "recipe": {"code": "0"}}))  # edited: the hash is not trusted
    assert not runs.is_fresh(tmp_path / "s.json", s)  # data not named: not compared


def test_activation_cache_path_is_keyed_by_request(tmp_path):
    kw = dict(model_name="tiny-llama", corpus="embedded", split="train", hooks=[HOOK], n_tokens=256, seq_len=17, seed=0)
    p = activation_cache_path(tmp_path, **kw)
    assert p.parent == tmp_path / "activations" / "tiny-llama" / "embedded" / "train"
    assert p.name.startswith("256t17-s0-")
    assert p == activation_cache_path(tmp_path, **{**kw, "hooks": (HOOK,)})
    for change in ({"hooks": [HOOK, "blocks.0.hook_resid_pre"]}, {"dtype": torch.float16}, {"seed": 1},
                   {"n_tokens": 512}, {"split": "heldout"}):
        assert p != activation_cache_path(tmp_path, **{**kw, **change}), change
    assert activation_cache_path(tmp_path, **{**kw, "model_name": "org/model"}).parts[-4] == "org--model"


def test_activation_cache_is_reused_without_the_model_and_rebuilt_when_stale(tmp_path, model, monkeypatch):
    kw = dict(model_name="tiny-llama", corpus="embedded", split="heldout", hooks=[HOOK], n_tokens=128, seq_len=17,
              seed=0, progress=False)
    a = activation_cache(tmp_path, model, **kw)
    assert (a.path / "stamp.json").is_file() and a.n_tokens == 128
    b = activation_cache(tmp_path, lambda: pytest.fail("loaded the model"), **kw)
    assert b.path == a.path and torch.equal(a.load(HOOK), b.load(HOOK))
    monkeypatch.setattr(runs, "code_fingerprint", lambda *p: "other-code")
    with pytest.warns(UserWarning, match="rebuilding"):
        c = activation_cache(tmp_path, model, **kw)
    assert torch.equal(c.load(HOOK), a.load(HOOK))
    assert json.loads((c.path / "stamp.json").read_text())["recipe"]["code"] == "other-code"


def test_store_stream_replays_passes(model):
    rows = torch.randint(3, 100, (6, 9), generator=torch.Generator().manual_seed(0))
    rows[:, 0] = model.tokenizer.bos_token_id
    a = list(store_stream(model, rows, HOOK, batch_size=8, n_tokens=96, seed=0, model_batch_size=2))
    b = list(store_stream(model, rows, [HOOK], batch_size=8, n_tokens=96, seed=0, model_batch_size=2))
    assert len(a) == 2 * (6 * 8 // 8) and all(torch.equal(p[HOOK], q[HOOK]) for p, q in zip(a, b))


def test_from_sweep_and_train_or_reuse(tmp_path, x):
    data = {"train": {"rows": 512}, "eval": {"rows": 64}}
    src = sweep_configs([HOOK], D, H, topk_ks=(4, 8))
    ensure_sweep(src, lambda: batches(x), tcfg(tmp_path / "ch3", log_every=2), data=data)
    want = sweep_configs([HOOK], D, H, topk_ks=(4,), afa_coeffs=(1 / 16,))
    # the same training data (another eval set) and weight-relevant settings: members are reused
    got = from_sweep(tmp_path / "ch3", want, tcfg(tmp_path / "x"), {"train": {"rows": 512}})
    assert list(got) == [n for n in want if "topk" in n]
    assert from_sweep(tmp_path / "ch3", want, tcfg(tmp_path / "x", lr=1e-3), {"train": {"rows": 512}}) == {}
    assert from_sweep(tmp_path / "ch3", want, tcfg(tmp_path / "x"), {"train": {"rows": 256}}) == {}
    assert from_sweep(tmp_path / "nothing", want, tcfg(tmp_path / "x"), data) == {}
    calls = []
    saes, reused = train_or_reuse(want, lambda: (calls.append(1), batches(x))[1], tcfg(tmp_path / "ch4"),
                                  data={"train": {"rows": 512}}, reuse_from=tmp_path / "ch3")
    assert list(saes) == list(want) and reused == list(got) and len(calls) == 1
    assert not (tmp_path / "ch4" / reused[0]).exists()  # reused, not trained again
    assert torch.equal(saes[reused[0]].W_dec, got[reused[0]].W_dec)


def test_width_family_retrains_when_its_recipe_changes(tmp_path, model):
    kw = dict(model_name="tiny-llama", corpus="embedded", layer=1, architectures={"relu": (1, 2)}, n_tokens=512,
              batch_size=128, seq_len=64, progress=False, model=model)
    fam = pipeline.ensure_width_family(tmp_path, lr=1e-3, **kw)
    weights = fam.path / pipeline.member_name("relu", fam.widths[0]) / "sae.safetensors"
    first, mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    assert json.loads((fam.path / "sweep.json").read_text())["config"]["lr"] == 1e-3
    pipeline.ensure_width_family(tmp_path, lr=1e-3, **kw)  # same recipe: loaded, not retrained
    assert weights.stat().st_mtime_ns == mtime
    kw["model"] = None  # reloading needs no model (d_model from cfg.json, the cache from its stamp)
    pipeline.ensure_width_family(tmp_path, lr=1e-3, **kw)
    assert weights.stat().st_mtime_ns == mtime
    with pytest.warns(UserWarning, match="retraining"):
        pipeline.ensure_width_family(tmp_path, lr=3e-3, **kw)  # another learning rate: every member retrained
    assert weights.stat().st_mtime_ns != mtime and weights.read_bytes() != first
    assert json.loads((fam.path / "sweep.json").read_text())["config"]["lr"] == 3e-3


def test_width_family_preset_checks_overrides():
    assert pipeline.width_family_preset("gpu", {"n_tokens": 2048})["n_tokens"] == 2048
    with pytest.raises(ValueError, match="not ensure_width_family arguments"):
        pipeline.width_family_preset("ci", {"n_token": 4096})


def test_chapter_warnings_name_files_relative_to_the_repo():
    """check_parameters installs this format: a page never shows the machine's paths."""
    where = runs.repo_root() / "saelib" / "pipeline.py"
    text = runs._relative_warning("retraining", UserWarning, str(where), 12)
    assert text == "saelib/pipeline.py:12: UserWarning: retraining\n"
    assert runs._relative_warning("x", UserWarning, "/elsewhere/m.py", 1).startswith("/elsewhere/m.py:1:")
