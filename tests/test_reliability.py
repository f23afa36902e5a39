"""Reliability: nothing lost, nothing executed, nothing silently wrong (one test group per fault).

Each test targets one failure mode: a build that deletes foreign files, a pickled checkpoint,
divergence, crashes mid-write, two writers, caches of other weights or other code, damaged
files, a lossy export, and bad inputs that used to end in bare tracebacks.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import saelib
from saelib.lm import activations
from saelib.lm import cache as cache_mod
from saelib.analysis import afa
from saelib.sae import geometry
from saelib import pipeline, runs
from saelib.sae import train as train_mod
from saelib.lm.cache import ActivationCache
from saelib.io import FolderInUseError, code_fingerprint, folder_lock, load_yaml
from saelib.lm.models import load_model
from saelib.sae.core import SAE, SAEConfig
from saelib.pipeline import ensure_sweep, load_metrics, sweep_configs
from saelib.sae.train import TrainConfig, TrainingDivergedError, train_saes

D, H = 16, 48
HOOK = "blocks.1.hook_resid_pre"
REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dic = torch.nn.functional.normalize(torch.randn(H, D, generator=g), dim=-1)
    on = torch.rand(n, H, generator=g) < 3 / H
    on[torch.arange(n), torch.randint(0, H, (n,), generator=g)] = True
    return (on * (0.5 + torch.rand(n, H, generator=g))) @ dic


def stream(x: torch.Tensor, bs: int = 64, *, seed: int = 0, fail_after: int | None = None, epochs: int = 50):
    count = 0
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + ep))
        for i in range(0, len(x) - bs + 1, bs):
            if fail_after is not None and count == fail_after:
                raise RuntimeError("simulated interruption")
            count += 1
            yield {HOOK: x[perm[i : i + bs]]}


@pytest.fixture(scope="module")
def x():
    return sparse_data(1024, seed=1)


def cfg_for(out, **kw) -> TrainConfig:
    base = dict(batch_size=64, n_tokens=64 * 20, lr=3e-3, log_every=5, progress=False, out_dir=out)
    base.update(kw)
    return TrainConfig(**base)


def topk(**kw) -> SAEConfig:
    return SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK, **kw)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-gpt2", device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    toks = torch.randint(3, 2000, (4, 9), generator=torch.Generator().manual_seed(0))
    toks[:, 0] = model.tokenizer.bos_token_id
    return toks


def hold_lock_in_subprocess(folder: Path):
    """Start a process that holds ``folder``'s lock; returns it once the lock is taken."""
    ready = folder.parent / f"{folder.name}.ready"
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path\n"
            f"from saelib.io import folder_lock\n"
            f"with folder_lock({str(folder)!r}):\n"
            f"    Path({str(ready)!r}).write_text('1'); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(300):
        if ready.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the lock-holding process did not start")


# -- 1. no data loss --------------------------------------------------------------------------


def test_cache_build_refuses_a_folder_with_foreign_files(tmp_path, model, tokens):
    work = tmp_path / "runs"
    (work / "sweep").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    (work / "sweep" / "sae.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=f"{work}.*not an activation cache.*notes.txt"):
        ActivationCache.build(work, model, tokens, HOOK, progress=False)
    assert (work / "notes.txt").read_text() == "keep me"
    assert (work / "sweep" / "sae.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "sweep"]  # not even a lock file
    # a foreign file inside an existing cache is kept too (and refused)
    cache_dir = tmp_path / "c"
    ActivationCache.build(cache_dir, model, tokens, HOOK, progress=False, shard_tokens=8)
    (cache_dir / "mine.csv").write_text("1,2")
    m = json.loads((cache_dir / "manifest.json").read_text())
    m["complete"], m["shards"] = False, m["shards"][:1]  # an interrupted build: resume would clean up
    (cache_dir / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="mine.csv"):
        ActivationCache.build(cache_dir, model, tokens, HOOK, progress=False, shard_tokens=8)
    assert (cache_dir / "mine.csv").exists()


# -- 2. no pickle ------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_planted_checkpoint_payload_never_runs(tmp_path, x, writer):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    out.mkdir()
    payload = {"format": 2, "step": 1, "evil": _Payload(marker)}
    if writer == "torch":
        torch.save(payload, out / "checkpoint.pt")
    else:
        with open(out / "checkpoint.pt", "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match=r"checkpoint\.pt.*pickled objects.*delete"):
        train_saes({"a": topk()}, stream(x), cfg_for(out, checkpoint_every=5))
    assert not marker.exists()


def test_checkpoints_load_without_pickle_and_no_unpickling_in_saelib(tmp_path, x):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated"):
        train_saes({"a": topk()}, stream(x, fail_after=12), cfg_for(out, checkpoint_every=5))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # plain data and tensors only
    assert ck["step"] == 10 and isinstance(ck["rng"]["python"]["state"], list)
    import re

    for f in Path(saelib.__file__).parent.rglob("*.py"):
        src = f.read_text()
        assert not re.search(r"pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False", src), f
        for call in re.findall(r"torch\.load\([^)]*\)", src):
            assert "weights_only=True" in call, (f, call)


# -- 3. divergence stops -----------------------------------------------------------------------


def test_divergence_stops_training_and_nothing_is_saved(tmp_path, x):
    out = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"'hot' diverged.*step \d+.*learning rate.*input scale"):
        train_saes({"hot": topk()}, stream(x), cfg_for(out, lr=1e38))
    assert not (out / "hot" / "sae.safetensors").exists()
    if (out / "hot" / "metrics.jsonl").exists():
        assert "null" not in (out / "hot" / "metrics.jsonl").read_text().replace('"dead": null', "").replace(
            '"dead_frac": null', "")


def test_non_finite_weights_are_never_saved_loaded_or_measured(tmp_path):
    from safetensors.torch import load_file, save_file

    sae = SAE(topk())
    sae.save(tmp_path / "good")
    with torch.no_grad():
        sae.W_dec[3, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*W_dec"):
        sae.save(tmp_path / "bad")
    # a file holding NaN (consistent checksum) is refused on load
    w = tmp_path / "good" / "sae.safetensors"
    t = load_file(str(w))
    t["W_dec"][0, 0] = float("nan")
    save_file(t, str(w))
    doc = json.loads((tmp_path / "good" / "cfg.json").read_text())
    doc["saelib"]["weights_sha256"] = saelib.io.file_sha256(w)
    (tmp_path / "good" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="non-finite.*W_dec"):
        SAE.load(tmp_path / "good")
    W = torch.randn(20, 8)
    W[5, 1] = float("nan")
    for fn in (afa.epsilon, afa.epsilon_dense, afa.epsilon_sampled, geometry.pair_cosines):
        with pytest.raises(ValueError, match="non-finite"):
            fn(W)


def test_ensure_sweep_retrains_a_broken_member(tmp_path, x):
    from safetensors.torch import load_file, save_file

    cfg = cfg_for(tmp_path, n_tokens=64 * 5)
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    (name,) = configs
    first = ensure_sweep(configs, lambda: stream(x), cfg)
    w = tmp_path / name / "sae.safetensors"
    t = load_file(str(w))
    t["W_dec"].fill_(float("nan"))
    save_file(t, str(w))
    with pytest.warns(UserWarning, match="unusable SAE"):
        again = ensure_sweep(configs, lambda: stream(x), cfg)
    assert torch.isfinite(again[name].W_dec).all()
    assert torch.equal(again[name].W_dec, first[name].W_dec)  # retrained, same seed: same result


# -- 4. resume survives real crashes -----------------------------------------------------------


def test_resume_after_torn_metrics_line_and_bad_checkpoints(tmp_path, x):
    kw = dict(n_tokens=64 * 17, checkpoint_every=5)
    full = train_saes({"a": topk()}, stream(x), cfg_for(tmp_path / "full", n_tokens=64 * 17))
    out = tmp_path / "part"
    with pytest.raises(RuntimeError, match="simulated"):
        train_saes({"a": topk()}, stream(x, fail_after=12), cfg_for(out, **kw))
    with open(out / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "tokens": 96')  # a kill in the middle of an append
    ck = (out / "checkpoint.pt").read_bytes()
    # a checkpoint from another stream: an error, not a silent mix of two datasets
    with pytest.raises(ValueError, match="batch 0 of this stream differs"):
        train_saes({"a": topk()}, stream(x, seed=7), cfg_for(out, **kw))
    with pytest.warns(UserWarning, match="torn last line"):
        resumed = train_saes({"a": topk()}, stream(x), cfg_for(out, **kw))
    assert torch.equal(resumed["a"].W_dec, full["a"].W_dec)
    a = load_metrics(tmp_path / "full").drop(columns=["tokens_per_s"])
    b = load_metrics(out).drop(columns=["tokens_per_s"])
    assert a.equals(b)
    for content, what in ((ck[: len(ck) // 2], "truncated"), (b"", "empty")):
        (out / "checkpoint.pt").write_bytes(content)
        with pytest.raises(ValueError, match=rf"checkpoint\.pt.*{what}.*delete"):
            train_saes({"a": topk()}, stream(x), cfg_for(out, **kw))


# -- 5. one writer per run folder --------------------------------------------------------------


def test_second_writer_is_refused_and_train_json_kept(tmp_path, x, model, tokens):
    out = tmp_path / "run"
    out.mkdir()
    proc = hold_lock_in_subprocess(out)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by pid {proc.pid}"):
            train_saes({"a": topk()}, stream(x), cfg_for(out))
        assert not (out / "train.json").exists() and not (out / "a").exists()
    finally:
        proc.kill()
        proc.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    proc = hold_lock_in_subprocess(cache)
    try:
        with pytest.raises(FolderInUseError, match=rf"in use by pid {proc.pid}"):
            ActivationCache.build(cache, model, tokens, HOOK, progress=False)
    finally:
        proc.kill()
        proc.wait()
    # a run refused by the identity check leaves the folder's train.json as it was
    with pytest.raises(RuntimeError, match="simulated"):
        train_saes({"a": topk()}, stream(x, fail_after=7), cfg_for(out, checkpoint_every=5))
    before = (out / "train.json").read_text()
    with pytest.raises(ValueError, match="different run"):
        train_saes({"a": topk()}, stream(x), cfg_for(out, checkpoint_every=5, lr=1e-2))
    assert (out / "train.json").read_text() == before


def test_folder_lock_is_reentrant_and_released(tmp_path):
    with folder_lock(tmp_path / "f"):
        with folder_lock(tmp_path / "f"):
            pass
    proc = hold_lock_in_subprocess(tmp_path / "f")  # released: another process can take it
    proc.kill()
    proc.wait()


# -- 6. caches know the weights ----------------------------------------------------------------


def test_cache_of_other_weights_is_an_error(tmp_path, model, tokens):
    other = load_model("tiny-gpt2", device="cpu", seed=1)
    kw = dict(model_name="tiny-gpt2", corpus="embedded", split="train", hooks=[HOOK], n_tokens=64, seq_len=16,
              seed=0, progress=False)
    first = pipeline.activation_cache(tmp_path / "runs", model, **kw)
    assert pipeline.activation_cache(tmp_path / "runs", lambda: 1 / 0, **kw).path == first.path  # reused: no model load
    with pytest.warns(UserWarning, match="weights"):  # one name, other weights: rebuilt, never reused
        second = pipeline.activation_cache(tmp_path / "runs", other, **kw)
    assert second.manifest["model_sha256"] == saelib.io.model_fingerprint(other) != first.manifest["model_sha256"]
    a = ActivationCache.build(tmp_path / "c", model, tokens, HOOK, progress=False)
    with pytest.raises(ValueError, match="model weights"):
        ActivationCache.build(tmp_path / "c", other, tokens, HOOK, progress=False)
    before = saelib.io.model_fingerprint(other)
    p = next(other.parameters())
    with torch.no_grad():  # weights changed in place are noticed too
        p.add_(1.0)
    changed = saelib.io.model_fingerprint(other)
    with torch.no_grad():
        p.sub_(1.0)
    assert changed != before
    b = ActivationCache.build(tmp_path / "d", other, tokens, HOOK, progress=False)
    assert not torch.equal(a.load(HOOK), b.load(HOOK))


# -- 7. files can be trusted -------------------------------------------------------------------


def test_damaged_sae_files_are_errors_naming_the_file(tmp_path):
    sae = SAE(topk())
    sae.save(tmp_path / "s")
    w = tmp_path / "s" / "sae.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[:-40])
    with pytest.raises(ValueError, match="sae.safetensors.*checksum"):
        SAE.load(tmp_path / "s")
    flipped = bytearray(raw)
    flipped[-5] ^= 0x10
    w.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="sae.safetensors.*checksum"):
        SAE.load(tmp_path / "s")
    # a crash between the two renames: new weights with the old cfg.json
    w.write_bytes(raw)
    SAE(topk(seed=5)).save(tmp_path / "t")
    os.replace(tmp_path / "t" / "sae.safetensors", w)
    with pytest.raises(ValueError, match="sae.safetensors.*checksum"):
        SAE.load(tmp_path / "s")
    # no checksum recorded (older files): a truncated file is still an error naming it
    doc = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del doc["saelib"]["weights_sha256"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(doc))
    w.write_bytes(raw[:100])
    with pytest.raises(ValueError, match="sae.safetensors.*truncated or corrupt"):
        SAE.load(tmp_path / "s")


def test_everything_written_is_world_readable(tmp_path, monkeypatch):
    from saelib.lm import models
    from saelib.interop import to_saelens

    old = os.umask(0o077)
    try:
        sae = SAE(topk())
        sae.save(tmp_path / "sae")
        to_saelens(sae, tmp_path / "lens")
        tok = load_model("tiny-gpt2", device="cpu").tokenizer
        hf = models._tiny_hf_model("tiny-gpt2", len(tok), tok.bos_token_id, tok.eos_token_id, 0)
        monkeypatch.setattr(models, "_load_from_gguf", lambda **kw: (hf, tok))
        models.prepare_embedded_model(tmp_path / "model", verbose=False)
    finally:
        os.umask(old)
    files = [p for d in ("sae", "lens", "model") for p in (tmp_path / d).iterdir() if not p.name.startswith(".")]
    assert any(p.name == "model.safetensors" for p in files) and any(p.name == "sae_weights.safetensors" for p in files)
    private = [p.name for p in files if p.stat().st_mode & 0o044 != 0o044]
    assert not private


# -- 8. interop says what it does --------------------------------------------------------------


def test_topafa_export_refused_unless_opted_in(tmp_path):
    import sae_lens

    from saelib.interop import to_saelens

    sae = SAE(SAEConfig(d_in=D, d_sae=H, activation="topafa", hook_name=HOOK)).eval()
    with pytest.raises(ValueError, match="top-AFA.*plain ReLU.*allow_lossy=True"):
        to_saelens(sae, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    to_saelens(sae, tmp_path / "y", allow_lossy=True)
    lsae = sae_lens.SAE.load_from_disk(str(tmp_path / "y"))
    assert "ReLU" in lsae.cfg.metadata.saelib_lossy_export


# -- 9. errors, not tracebacks -----------------------------------------------------------------


def test_bad_inputs_get_errors_naming_file_field_and_fix(tmp_path, model, tokens, monkeypatch):
    from saelib.lm import models

    for bad, val in (("too large", model.cfg.d_vocab), ("negative", -1)):
        t = tokens.clone()
        t[1, 3] = val
        with pytest.raises(ValueError, match=rf"id {val}.*vocabulary.*tokenizer"):
            activations.harvest(model, t, HOOK, progress=False)
    sae = SAE(topk())
    with pytest.raises(TypeError, match="acts must be a torch.Tensor.*ndarray"):
        sae.decode(np.zeros((2, H), dtype=np.float32))
    sae.save(tmp_path / "s")
    doc = json.loads((tmp_path / "s" / "cfg.json").read_text())
    del doc["cfg"]["d_in"]
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"cfg\.json.*'cfg'.*d_in"):
        SAE.load(tmp_path / "s")
    ActivationCache.build(tmp_path / "c", model, tokens, HOOK, progress=False)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    del m["dims"]
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"manifest\.json.*'dims'.*missing.*rebuild"):
        ActivationCache(tmp_path / "c")
    y = tmp_path / "03_training.yaml"
    y.write_text("n_tokens: 4096\nlr: [1e-3\n")
    with pytest.raises(ValueError, match=r"03_training\.yaml:\d+:\d+.*YAML syntax"):
        load_yaml(y)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.HubUnavailableError) as e:
        load_model("gpt2")
    assert "{" not in str(e.value) and "unset HF_HUB_OFFLINE" in str(e.value)


# -- issue 12 item 4: reuse keyed by code ------------------------------------------------------


def test_code_fingerprint_follows_code_not_comments(tmp_path, monkeypatch):
    import importlib
    import linecache

    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    mod = tmp_path / "fpmod_a.py"
    mod.write_text('"""doc"""\ndef f(x):\n    return x + 1\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    a = code_fingerprint("fpmod_a")
    saelib.io._CODE_FP.clear()
    mod.write_text('"""other doc"""\n# a comment\ndef f(x):\n    """says more"""\n    return x + 1  # same\n')
    sys.modules.pop("fpmod_a", None)
    linecache.clearcache()
    importlib.invalidate_caches()
    b = code_fingerprint("fpmod_a")
    saelib.io._CODE_FP.clear()
    mod.write_text('"""doc"""\ndef f(x):\n    return x + 2\n')
    sys.modules.pop("fpmod_a", None)
    linecache.clearcache()
    importlib.invalidate_caches()
    c = code_fingerprint("fpmod_a")
    saelib.io._CODE_FP.clear()
    assert a == b != c


def _bump(real):
    return lambda *parts: real(*parts) + "-changed"


def test_results_of_other_code_are_not_reused(tmp_path, x, model, tokens, monkeypatch):
    cfg = cfg_for(tmp_path / "sweep", n_tokens=64 * 5)
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    calls = []

    def batches():
        calls.append(1)
        return stream(x)

    ensure_sweep(configs, batches, cfg)
    ensure_sweep(configs, batches, cfg)
    assert len(calls) == 1
    monkeypatch.setattr(runs, "code_fingerprint", _bump(runs.code_fingerprint))
    with pytest.warns(UserWarning, match="saelib code"):
        ensure_sweep(configs, batches, cfg)
    assert len(calls) == 2
    # an activation cache made by other code is rebuilt (its own files only)
    ActivationCache.build(tmp_path / "c", model, tokens, HOOK, progress=False)
    monkeypatch.setattr(cache_mod, "code_fingerprint", _bump(cache_mod.code_fingerprint))
    with pytest.warns(UserWarning, match="other saelib code; rebuilding"):
        c = ActivationCache.build(tmp_path / "c", model, tokens, HOOK, progress=False)
    assert c.manifest["code"].endswith("-changed")


def test_width_family_retrained_when_code_changes(tmp_path, monkeypatch):
    model = load_model("tiny-llama", device="cpu")
    kw = dict(model_name="tiny-llama", corpus="embedded", layer=1, architectures={"relu": (1,)}, n_tokens=256,
              batch_size=128, seq_len=32, progress=False, model=model)
    fam = pipeline.ensure_width_family(tmp_path, **kw)
    weights = fam.path / pipeline.member_name("relu", fam.widths[0]) / "sae.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert json.loads((fam.path / "sweep.json").read_text())["recipe"]["code"]
    pipeline.ensure_width_family(tmp_path, **kw)
    assert weights.stat().st_mtime_ns == mtime
    monkeypatch.setattr(runs, "code_fingerprint", _bump(runs.code_fingerprint))
    pipeline.ensure_width_family(tmp_path, **kw)
    assert weights.stat().st_mtime_ns != mtime
