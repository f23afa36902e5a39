"""Harvesting, the shuffled store and the on-disk cache (offline, tiny random-weight models)."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from saelib.lm import cache as cache_mod
from saelib.lm.activations import ActivationStore, harvest, tensor_batches
from saelib.lm.cache import ActivationCache
from saelib.lm.models import hook_name, load_model

HOOKS = ["blocks.1.hook_resid_pre", "blocks.3.hook_resid_post", "blocks.0.hook_resid_pre"]
SHARD = 64  # activations per shard: 4 rows of 16 (BOS dropped), so 12 rows make 3 shards


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def tokens(model):
    g = torch.Generator().manual_seed(0)
    toks = torch.randint(3, 2000, (12, 17), generator=g)
    toks[:, 0] = model.tokenizer.bos_token_id  # token_rows puts BOS at position 0
    return toks


@pytest.fixture(scope="module")
def ref(model, tokens):
    """harvest() of HOOKS over all tokens, computed once for the module."""
    return harvest(model, tokens, HOOKS, progress=False)


@pytest.fixture(scope="module")
def reference(model, tokens):
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    return {h: cache[h] for h in HOOKS}  # [R, S, d]


# -- harvest -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_harvest_matches_run_with_cache(name, tokens, request):
    m = request.getfixturevalue("model") if name == "tiny-llama" else load_model(name, device="cpu")
    hooks = [hook_name(2), hook_name(0, "resid_post"), hook_name(1, "mlp_out")]
    acts = harvest(m, tokens, hooks, batch_size=5, progress=False)
    with torch.inference_mode():
        _, cache = m.run_with_cache(tokens, names_filter=hooks)
    for h in hooks:
        expected = cache[h][:, 1:].reshape(-1, m.cfg.d_model)
        assert acts[h].shape == (12 * 16, 64)
        torch.testing.assert_close(acts[h], expected, rtol=0, atol=1e-6)


def test_bos_exclusion(model, tokens, reference):
    h = HOOKS[0]
    kept = harvest(model, tokens, h, progress=False)[h]
    full = harvest(model, tokens, h, exclude_bos=False, progress=False)[h]
    assert full.shape[0] == 12 * 17 and kept.shape[0] == 12 * 16
    full_RSd = full.view(12, 17, -1)
    torch.testing.assert_close(full_RSd, reference[h], rtol=0, atol=1e-6)
    torch.testing.assert_close(kept.view(12, 16, -1), full_RSd[:, 1:], rtol=0, atol=0)


def test_multi_hook_single_pass_stops_early(model, tokens):
    """All hooks come from one forward per batch, which stops at the deepest hook needed."""
    embed_calls, late_calls = [], []
    model.hook_dict["hook_embed"].add_hook(lambda a, hook: embed_calls.append(1), level=99)
    model.hook_dict["blocks.2.hook_resid_post"].add_hook(lambda a, hook: late_calls.append(1), level=99)
    try:
        harvest(model, tokens, ["blocks.0.hook_resid_pre", "blocks.2.hook_resid_pre"], batch_size=4, progress=False)
    finally:
        model.hook_dict["hook_embed"].remove_hooks(level=99)
        model.hook_dict["blocks.2.hook_resid_post"].remove_hooks(level=99)
    assert len(embed_calls) == 3  # 12 rows / batch 4: one forward each
    assert late_calls == []  # never ran past blocks.2.hook_resid_pre
    # hooks are removed afterwards: a normal forward runs to the end again
    with torch.inference_mode():
        assert model(tokens[:1]).shape[-1] == len(model.tokenizer)


def test_harvest_dtype_and_bad_inputs(model, tokens):
    a = harvest(model, tokens, HOOKS[0], dtype=torch.bfloat16, progress=False)[HOOKS[0]]
    assert a.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="Closest"):
        harvest(model, tokens, "blocks.1.hook_resid_pree", progress=False)
    with pytest.raises(ValueError, match="0..3"):
        harvest(model, tokens, "blocks.9.hook_resid_pre", progress=False)
    with pytest.raises(ValueError, match="2-D"):
        harvest(model, tokens[0], HOOKS[0], progress=False)


# -- in-memory batches and the store -----------------------------------------------------------


def test_tensor_batches_alignment_epochs_and_n_tokens():
    x = torch.arange(100.0).unsqueeze(1)
    acts = {"a": x, "b": -x}
    batches = list(tensor_batches(acts, 10, seed=0, epochs=2))
    assert len(batches) == 20
    for b in batches:
        assert torch.equal(b["a"], -b["b"])
    first = torch.cat([b["a"] for b in batches[:10]]).flatten().sort().values
    assert torch.equal(first, x.flatten())  # each epoch is a permutation of all rows
    assert not torch.equal(torch.cat([b["a"] for b in batches[:10]]).flatten(), x.flatten())
    assert len(list(tensor_batches(x, 32, n_tokens=250))) == 7
    plain = list(tensor_batches(x, 25, shuffle=False))
    assert torch.equal(plain[1], x[25:50])
    with pytest.raises(ValueError, match="same number of rows"):
        next(tensor_batches({"a": x, "b": x[:5]}, 4))


def _rows_as_set(t):
    return {tuple(r.tolist()) for r in t}


def test_store_shapes_shuffling_and_determinism(model, tokens):
    hooks = HOOKS[:2]
    store = ActivationStore(model, tokens, hooks, batch_size=16, buffer_tokens=96, model_batch_size=3, seed=0)
    batches = list(store)
    n = 12 * 16
    assert len(batches) == len(store) == n // 16
    assert store.n_tokens_seen == len(batches) * 16
    assert all(b[h].shape == (16, 64) for b in batches for h in hooks)
    ref = harvest(model, tokens, hooks, progress=False)
    # Every served vector is a real activation, served at most once, and aligned across hooks.
    served = torch.cat([b[hooks[0]] for b in batches])
    assert len(_rows_as_set(served)) == served.shape[0]
    assert _rows_as_set(served) <= _rows_as_set(ref[hooks[0]])
    index = {tuple(r.tolist()): i for i, r in enumerate(ref[hooks[0]])}
    pos = torch.tensor([index[tuple(r.tolist())] for r in served])
    torch.testing.assert_close(torch.cat([b[hooks[1]] for b in batches]), ref[hooks[1]][pos], rtol=0, atol=0)
    # The first batch mixes tokens from several rows (16 positions per row).
    assert len(set((pos[:16] // 16).tolist())) > 2
    again = list(ActivationStore(model, tokens, hooks, batch_size=16, buffer_tokens=96, model_batch_size=3, seed=0))
    other = list(ActivationStore(model, tokens, hooks, batch_size=16, buffer_tokens=96, model_batch_size=3, seed=1))
    assert all(torch.equal(a[hooks[0]], b[hooks[0]]) for a, b in zip(batches, again))
    assert not torch.equal(batches[0][hooks[0]], other[0][hooks[0]])


def test_store_validates_buffer(model, tokens):
    with pytest.raises(ValueError, match="2 \\* batch_size"):
        ActivationStore(model, tokens, HOOKS[0], batch_size=64, buffer_tokens=100)
    with pytest.raises(ValueError, match="model_batch_size"):
        ActivationStore(model, tokens, HOOKS[0], batch_size=8, buffer_tokens=32, model_batch_size=4)


# -- on-disk cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cache_round_trip_is_bit_exact(tmp_path, model, tokens, ref, dtype):
    cache = ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, dtype=dtype, shard_tokens=SHARD, progress=False)
    assert cache.n_tokens == 12 * 16 and cache.d_model == 64 and cache.hooks == HOOKS
    assert len(cache.shard_sizes) == 3
    for h in HOOKS:
        loaded = cache.load(h)
        assert loaded.dtype == dtype
        assert torch.equal(loaded, ref[h].to(dtype))
    reopened = ActivationCache(tmp_path / "c")
    batches = list(reopened.iter_batches(HOOKS[:2], 32, seed=3, dtype=None))
    assert len(batches) == 6
    got = torch.cat([b[HOOKS[0]] for b in batches]).float()
    assert _rows_as_set(got) == _rows_as_set(ref[HOOKS[0]].to(dtype).float())
    seq = list(reopened.iter_batches(HOOKS[0], 50, shuffle=False, dtype=None))
    assert torch.equal(torch.cat([b[HOOKS[0]] for b in seq]), ref[HOOKS[0]].to(dtype)[:150])
    # A complete cache is reused, not rebuilt.
    assert ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, dtype=dtype, shard_tokens=SHARD,
                                 progress=False).n_tokens == cache.n_tokens


def test_cache_iter_batches_aligned_across_hooks(tmp_path, model, tokens, ref):
    cache = ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, shard_tokens=SHARD, progress=False)
    index = {tuple(r.tolist()): i for i, r in enumerate(ref[HOOKS[0]])}
    for b in cache.iter_batches(HOOKS, 24, seed=0, n_tokens=400):
        pos = torch.tensor([index[tuple(r.tolist())] for r in b[HOOKS[0]]])
        assert torch.equal(b[HOOKS[2]], ref[HOOKS[2]][pos])
    assert len(list(cache.iter_batches(HOOKS[0], 24, n_tokens=400))) == 16


def test_cache_resumes_after_interrupted_build(tmp_path, model, tokens, ref, monkeypatch):
    real_write, real_harvest = cache_mod._write_bytes, cache_mod.harvest
    writes = []

    def interrupting_write(path, data):
        writes.append(path)
        if len(writes) == 2 * 3 + 1:  # first file of the 3rd shard
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(cache_mod, "_write_bytes", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, shard_tokens=SHARD, progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        ActivationCache(tmp_path / "c")

    harvested_rows = []

    def counting_harvest(m, rows, *a, **k):
        harvested_rows.append(rows.shape[0])
        return real_harvest(m, rows, *a, **k)

    monkeypatch.setattr(cache_mod, "_write_bytes", real_write)
    monkeypatch.setattr(cache_mod, "harvest", counting_harvest)
    cache = ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, shard_tokens=SHARD, progress=False)
    assert sum(harvested_rows) == 12 - 2 * 4  # only the missing shard was computed
    for h in HOOKS:
        assert torch.equal(cache.load(h), ref[h])
    assert not list((tmp_path / "c").glob(".*.tmp"))


def test_cache_rejects_other_inputs(tmp_path, model, tokens):
    ActivationCache.build(tmp_path / "c", model, tokens, HOOKS[:1], shard_tokens=SHARD, progress=False)
    with pytest.raises(ValueError, match="tokens_sha256"):
        ActivationCache.build(tmp_path / "c", model, tokens.flip(0), HOOKS[:1], shard_tokens=SHARD, progress=False)
    with pytest.raises(FileNotFoundError, match="build"):
        ActivationCache(tmp_path / "nowhere")


def test_corrupted_and_truncated_shards_are_reported(tmp_path, model, tokens):
    ActivationCache.build(tmp_path / "c", model, tokens, HOOKS[:1], shard_tokens=SHARD, progress=False)
    f = tmp_path / "c" / f"shard_00002.{HOOKS[0]}.bin"
    raw = bytearray(f.read_bytes())
    raw[7] ^= 0x40
    f.write_bytes(bytes(raw))
    cache = ActivationCache(tmp_path / "c")  # sizes are fine, so opening works
    with pytest.raises(ValueError, match="shard 2.*checksum.*rebuild"):
        cache.load(HOOKS[0])
    f.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ValueError, match="shard 2.*truncated.*build again"):
        ActivationCache(tmp_path / "c")


def test_disk_full_leaves_no_partial_shard(tmp_path, model, tokens, ref, monkeypatch):
    real_write = cache_mod._write_bytes
    writes = []

    def full_disk(path, data):
        writes.append(path)
        if len(writes) == 1 * 3 + 2:  # mid-shard: second file of the 2nd shard
            with open(path, "wb") as fh:
                fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(cache_mod, "_write_bytes", full_disk)
    with pytest.raises(OSError, match="Disk full.*shard 1.*1 of 3 shards.*resume") as e:
        ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, shard_tokens=SHARD, progress=False)
    assert e.value.errno == errno.ENOSPC
    files = sorted(p.name for p in (tmp_path / "c").iterdir() if p.name != ".saelib.lock")
    assert files == ["manifest.json"] + sorted(f"shard_00000.{h}.bin" for h in HOOKS)
    monkeypatch.setattr(cache_mod, "_write_bytes", real_write)
    cache = ActivationCache.build(tmp_path / "c", model, tokens, HOOKS, shard_tokens=SHARD, progress=False)
    assert all(torch.equal(cache.load(h), ref[h]) for h in HOOKS)
