"""Trainer: learning, many SAEs per pass, metrics files, exact resume, config errors."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from saelib.sae.core import SAE, SAEConfig
from saelib.pipeline import ensure_sweep, load_metrics, load_saes, sweep_configs, sweep_table
from saelib.sae.geometry import max_cosine, pair_cosines
from saelib.sae.train import EarlyStopping, TrainConfig, train_saes

D, H = 16, 48
HOOK_A, HOOK_B = "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"


def sparse_data(n: int, d: int = D, h: int = H, active: float = 3.0, seed: int = 0) -> torch.Tensor:
    """x = codes @ dictionary: ~`active` non-negative features per token out of h unit directions."""
    g = torch.Generator().manual_seed(seed)
    dic = torch.randn(h, d, generator=g)
    dic = dic / dic.norm(dim=-1, keepdim=True)
    on = torch.rand(n, h, generator=g) < active / h
    on[torch.arange(n), torch.randint(0, h, (n,), generator=g)] = True  # no all-zero tokens
    codes = on * (0.5 + torch.rand(n, h, generator=g))
    return codes @ dic


def stream(acts: dict[str, torch.Tensor], batch_size: int, *, epochs: int = 100, seed: int = 0, fail_after: int | None = None):
    """Deterministic shuffled batches of in-memory activations (a stand-in for tensor_batches)."""
    n = next(iter(acts.values())).shape[0]
    count = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + ep))
        for i in range(0, n - batch_size + 1, batch_size):
            if fail_after is not None and count == fail_after:
                raise RuntimeError("simulated interruption")
            idx = perm[i : i + batch_size]
            count += 1
            yield {k: v[idx] for k, v in acts.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data():
    return {HOOK_A: sparse_data(2048, seed=1), HOOK_B: sparse_data(2048, seed=2)}


def small_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(batch_size=64, n_tokens=64 * 40, lr=3e-3, log_every=10, progress=False, out_dir=tmp_path, dead_window_tokens=640)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases(tmp_path, data):
    cfg = small_cfg(tmp_path, n_tokens=64 * 150, log_every=5)
    saes = {"topk": SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK_A, seed=0)}
    train_saes(saes, stream(data, 64), cfg)
    recs = load_metrics(tmp_path, as_frame=False)["topk"]
    assert [r["step"] for r in recs] == list(range(5, 151, 5))
    first, last = recs[0], recs[-1]
    assert last["loss"] < 0.65 * first["loss"], (first["loss"], last["loss"])
    assert last["nmse"] < 0.65 * first["nmse"]
    assert 0 < last["fvu"] < first["fvu"]
    assert last["l0"] == pytest.approx(4.0)


def test_many_saes_one_pass_and_files(tmp_path, data):
    consumed = []

    def counting(it):
        for b in it:
            consumed.append(1)
            yield b

    saes = sweep_configs([HOOK_A, HOOK_B], D, H, topk_ks=(4,), batchtopk_ks=(4,), afa_coeffs=(1 / 16,), aux_k=8)
    assert len(saes) == 6
    cfg = small_cfg(tmp_path, eps_every=20)
    out = train_saes(saes, counting(stream(data, 64)), cfg, eval_batches=stream(data, 256, epochs=1, seed=99))
    assert len(consumed) == cfg.n_steps  # one stream pass feeds every SAE
    assert set(out) == set(saes)
    for name, sae in out.items():
        folder = tmp_path / name
        recs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == [10, 20, 30, 40]
        for key in ("tokens", "loss", "mse_loss", "afa_loss", "aux_loss", "nmse", "fvu", "l0", "l0_p50", "l0_max", "dead", "tokens_per_s"):
            assert key in recs[-1], key
        assert recs[-1]["tokens"] == 40 * 64
        assert "eps_max" in recs[1] and "eps_max" not in recs[0]
        assert 0 < recs[1]["eps_mean"] <= recs[1]["eps_max"] <= 1
        ev = json.loads((folder / "eval.json").read_text())
        assert ev["n_tokens"] == 2048 and sum(ev["l0_hist"]) == 2048
        assert ev["l0_min"] <= ev["l0_p50"] <= ev["l0_max"]
        assert (folder / "sae.safetensors").exists() and (folder / "cfg.json").exists()
    assert not (tmp_path / "checkpoint.pt").exists()
    # BatchTopK and top-AFA choose a varying number of latents per token, TopK does not
    evs = {n: json.loads((tmp_path / n / "eval.json").read_text()) for n in saes}
    topk = next(n for n in saes if "-topk-" in n)
    afa = next(n for n in saes if "-topafa-" in n)
    assert evs[topk]["l0_min"] == evs[topk]["l0_max"] == 4
    assert evs[afa]["l0_max"] > evs[afa]["l0_min"]
    csv = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv) == 1 + 6 * 4
    loaded = load_saes(tmp_path)
    assert set(loaded) == set(saes)
    for name in saes:
        assert torch.equal(loaded[name].W_dec, out[name].W_dec)
    table = sweep_table(tmp_path)
    assert set(table["activation"]) == {"topk", "batchtopk", "topafa"} and len(table) == 6


def _state(saes):
    return {n: {k: v.clone() for k, v in s.state_dict().items()} for n, s in saes.items()}


def test_checkpoint_resume_is_exact(tmp_path, data):
    configs = {
        "topk": SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK_A, aux_k=8, dead_after_tokens=128),
        "btk": SAEConfig(d_in=D, d_sae=H, activation="batchtopk", k=4, hook_name=HOOK_B),
        "afa": SAEConfig(d_in=D, d_sae=H, activation="topafa", afa_coeff=1 / 32, hook_name=HOOK_A, input_norm="token"),
    }
    kw = dict(n_tokens=64 * 23, log_every=4, warmup_steps=3, decay_steps=5, grad_clip=1.0)
    full = train_saes(configs, stream(data, 64), small_cfg(tmp_path / "full", **kw))

    part_cfg = small_cfg(tmp_path / "part", checkpoint_every=5, **kw)
    with pytest.raises(RuntimeError, match="simulated"):
        train_saes(configs, stream(data, 64, fail_after=13), part_cfg)
    ck = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 10
    resumed = train_saes(configs, stream(data, 64), part_cfg)

    a, b = _state(full), _state(resumed)
    for name in configs:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]) or (
                a[name][key].isnan().all() and b[name][key].isnan().all()
            ), (name, key)
    ma = load_metrics(tmp_path / "full").drop(columns=["tokens_per_s"])
    mb = load_metrics(tmp_path / "part").drop(columns=["tokens_per_s"])
    assert ma.equals(mb)
    # a checkpoint of another sweep is refused with a clear message
    other = {"topk": SAEConfig(d_in=D, d_sae=H, activation="topk", k=8, hook_name=HOOK_A)}
    with pytest.raises(RuntimeError):
        train_saes(other, stream(data, 64, fail_after=12), part_cfg)
    with pytest.raises(ValueError, match="different run"):
        train_saes(configs, stream(data, 64), part_cfg)


def test_resume_from_checkpoint_before_first_record(tmp_path, data):
    """A checkpoint written before any metrics record (checkpoint_every < log_every) resumes exactly."""
    configs = {"topk": SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK_A)}
    full = train_saes(configs, stream(data, 64), small_cfg(tmp_path / "full", n_tokens=64 * 12))
    part_cfg = small_cfg(tmp_path / "part", n_tokens=64 * 12, checkpoint_every=3)
    with pytest.raises(RuntimeError, match="simulated"):
        train_saes(configs, stream(data, 64, fail_after=7), part_cfg)
    assert not (tmp_path / "part" / "topk" / "metrics.jsonl").exists()
    resumed = train_saes(configs, stream(data, 64), part_cfg)
    for k, v in _state(full)["topk"].items():  # bitwise (topk's unused threshold is NaN in both)
        torch.testing.assert_close(_state(resumed)["topk"][k], v, rtol=0, atol=0, equal_nan=True)
    ma, mb = (load_metrics(tmp_path / p).drop(columns=["tokens_per_s"]) for p in ("full", "part"))
    assert ma.equals(mb) and list(mb["step"]) == [10, 12]


def test_decoder_rows_unit_norm(tmp_path, data):
    cfg = small_cfg(tmp_path, n_tokens=64 * 20, lr=3e-2)
    out = train_saes({"r": SAEConfig(d_in=D, d_sae=H, activation="relu", l1_coeff=1e-3, hook_name=HOOK_A)}, stream(data, 64), cfg)
    norms = out["r"].W_dec.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert not torch.equal(out["r"].W_dec, SAE(out["r"].cfg).W_dec)  # it did train


def test_bad_configs_fail_fast(tmp_path, data):
    for kw, msg in [
        (dict(batch_size=0), "batch_size"),
        (dict(n_tokens=10, batch_size=64), "smaller than batch_size"),
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.5)), "betas"),
        (dict(log_every=10, eps_every=15), "multiple of log_every"),
        (dict(checkpoint_every=5, out_dir=None), "out_dir"),
        (dict(warmup_steps=30, decay_steps=30, n_tokens=64 * 40), "exceeds"),
        (dict(grad_clip=0.0), "grad_clip"),
    ]:
        base = dict(batch_size=64, n_tokens=64 * 40, progress=False, out_dir=tmp_path)
        base.update(kw)
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**base)
    cfg = small_cfg(tmp_path)
    good = SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK_A)
    with pytest.raises(ValueError, match="non-empty"):
        train_saes({}, stream(data, 64), cfg)
    with pytest.raises(ValueError, match="folder name"):
        train_saes({"a/b": good}, stream(data, 64), cfg)
    with pytest.raises(ValueError, match="SAEConfig or SAE"):
        train_saes({"x": {"d_in": D}}, stream(data, 64), cfg)
    missing = SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name="blocks.9.hook_resid_pre")
    with pytest.raises(ValueError, match="blocks.9.hook_resid_pre"):
        train_saes({"x": missing}, stream(data, 64), cfg)
    wide = SAEConfig(d_in=D + 1, d_sae=H, activation="topk", k=4, hook_name=HOOK_A)
    with pytest.raises(ValueError, match="expects"):
        train_saes({"x": wide}, stream(data, 64), cfg)
    with pytest.raises(ValueError, match="batch_size"):
        train_saes({"x": good}, stream(data, 128), cfg)
    with pytest.raises(ValueError, match="outside"):
        sweep_configs([HOOK_A], D, H, topk_ks=(H + 1,))
    with pytest.raises(ValueError, match="empty grid"):
        sweep_configs([HOOK_A], D, H)


def test_short_stream_warns_and_resume_needs_stream(tmp_path, data):
    cfg = small_cfg(tmp_path, n_tokens=64 * 40)
    good = SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK_A)
    small = {k: v[:640] for k, v in data.items()}
    with pytest.warns(UserWarning, match="ended after 10 of 40"):
        out = train_saes({"x": good}, stream(small, 64, epochs=1), cfg)
    assert (tmp_path / "x" / "sae.safetensors").exists() and out["x"].training is False
    recs = load_metrics(tmp_path, as_frame=False)["x"]
    assert [r["step"] for r in recs] == [10]  # the partial last window is still logged
    # resuming needs the same stream: a checkpoint at step 5 cannot resume from 2 batches
    ck_cfg = small_cfg(tmp_path / "ck", checkpoint_every=5)
    with pytest.raises(RuntimeError):
        train_saes({"x": good}, stream(small, 64, fail_after=7), ck_cfg)
    with pytest.raises(ValueError, match="stream ended after 2 batches"):
        train_saes({"x": good}, itertools.islice(stream(small, 64, epochs=1), 2), ck_cfg)


def test_ensure_sweep_trains_only_missing(tmp_path, data):
    cfg = small_cfg(tmp_path, n_tokens=64 * 10)
    configs = sweep_configs([HOOK_A], D, H, topk_ks=(2, 4))
    calls = []

    def batches():
        calls.append(1)
        return stream(data, 64)

    first = ensure_sweep(configs, batches, cfg, eval_batches=lambda: stream(data, 256, epochs=1))
    assert len(calls) == 1 and set(first) == set(configs)
    again = ensure_sweep(configs, batches, cfg, eval_batches=lambda: stream(data, 256, epochs=1))
    assert len(calls) == 1  # nothing retrained
    for n in configs:
        assert torch.equal(first[n].W_enc, again[n].W_enc)
    more = {**configs, **sweep_configs([HOOK_A], D, H, afa_coeffs=(1 / 16,))}
    ensure_sweep(more, batches, cfg, eval_batches=lambda: stream(data, 256, epochs=1))
    assert len(calls) == 2
    assert len(load_metrics(tmp_path, as_frame=False)) == 3
    # other data (or training settings) -> the sweep is retrained, not silently reused
    with pytest.warns(UserWarning, match="retraining"):
        ensure_sweep(more, batches, cfg, eval_batches=lambda: stream(data, 256, epochs=1), data="other-rows")
    assert len(calls) == 3
    ensure_sweep(more, batches, cfg, eval_batches=lambda: stream(data, 256, epochs=1), data="other-rows")
    assert len(calls) == 3


def test_pair_cosines_and_max_cosine_match_dense():
    W = torch.randn(50, 8)
    eps = pair_cosines(W, block_size=7)
    U = W / W.norm(dim=-1, keepdim=True)
    G = U @ U.T
    G.fill_diagonal_(0)
    assert eps.max == pytest.approx(float(G.abs().max()), abs=1e-6)
    assert eps.mean == pytest.approx(float(G.abs().sum() / (50 * 49)), abs=1e-6)
    assert eps.mean_signed == pytest.approx(float(G.sum() / (50 * 49)), abs=1e-6)
    i, j = eps.argmax
    assert i < j and abs(float(G[i, j])) == pytest.approx(eps.max, abs=1e-6)
    assert eps.n_pairs == 50 * 49 // 2
    with pytest.raises(ValueError, match="non-finite"):
        pair_cosines(torch.full((4, 3), float("nan")))
    A, B = torch.randn(13, 8), torch.randn(21, 8)
    vals, idx = max_cosine(A, B, block_size=4)[:2]
    C = torch.nn.functional.normalize(A, dim=1) @ torch.nn.functional.normalize(B, dim=1).T
    assert torch.allclose(vals, C.max(1).values, atol=1e-6) and torch.equal(idx, C.argmax(1))


def test_early_stopping_rule():
    recs = lambda v: {"a": {"fvu": v}, "b": {"fvu": 0.5}}  # noqa: E731
    es = EarlyStopping("fvu", min_improvement=0.1, relative=True, window=1, patience=2, names=["a"])
    # 1.0 -> 0.5 (-50%), -> 0.48 (-4%: stall 1), -> 0.47 (stall 2): stop
    assert [es(s, recs(v)) for s, v in enumerate([1.0, 0.5, 0.48, 0.47])] == [False, False, False, True]
    assert es.converged and es.stopped_at == 3
    # absolute rule over windows of 2 records, never before min_step; higher is better
    es = EarlyStopping("fve", min_improvement=0.05, relative=False, window=2, min_step=6, higher_is_better=True)
    seq = [0.1, 0.2, 0.5, 0.6, 0.62, 0.63, 0.64, 0.65]
    stops = [es(s, {"x": {"fve": v}}) for s, v in enumerate(seq)]
    assert stops.index(True) == 6  # gains: 0.4 (3), 0.27 (4), 0.07 (5: > 0.05), 0.03 (6)
    # every watched SAE must stall
    es = EarlyStopping("fvu", min_improvement=0.1)
    assert not es(1, {"a": {"fvu": 1.0}, "b": {"fvu": 1.0}}) and not es(2, {"a": {"fvu": 1.0}, "b": {"fvu": 0.5}})
    with pytest.raises(ValueError, match="window"):
        EarlyStopping(window=0)
    with pytest.raises(ValueError, match="'nope'"):
        EarlyStopping("nope")(1, {"a": {"fvu": 1.0}})


def test_hooks_stop_training_and_resume_exactly(tmp_path, data):
    configs = {"topk": SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK_A, aux_k=8, dead_after_tokens=128),
               "btk": SAEConfig(d_in=D, d_sae=H, activation="batchtopk", k=4, hook_name=HOOK_B)}
    seen = []

    def stop_at_12(step, records):
        seen.append((step, sorted(records), records["topk"]["step"]))
        return step >= 12

    # in memory (no out_dir): the hooks still get every record, and True stops the run there
    out = train_saes(configs, stream(data, 64), small_cfg(None, log_every=4), hooks=[stop_at_12])
    assert seen == [(4, ["btk", "topk"], 4), (8, ["btk", "topk"], 8), (12, ["btk", "topk"], 12)]
    assert int(out["btk"].tokens_since_fired.max()) <= 12 * 64 and out["btk"].threshold.isfinite()
    with pytest.raises(ValueError, match="callables"):
        train_saes(configs, stream(data, 64), small_cfg(None), hooks=[3])

    # EarlyStopping: an interrupted run resumed from its checkpoint stops where the full run stopped
    def es():
        return EarlyStopping("fvu", min_improvement=0.2, window=2, names=["topk"])

    kw = dict(n_tokens=64 * 200, log_every=2)
    full_es = es()
    full = train_saes(configs, stream(data, 64), small_cfg(tmp_path / "full", **kw), hooks=[full_es])
    assert full_es.converged and 8 <= full_es.stopped_at < 200
    part_cfg = small_cfg(tmp_path / "part", checkpoint_every=3, **kw)
    fail = full_es.stopped_at - 1
    with pytest.raises(RuntimeError, match="simulated"):
        train_saes(configs, stream(data, 64, fail_after=fail), part_cfg, hooks=[es()])
    part_es = es()
    resumed = train_saes(configs, stream(data, 64), part_cfg, hooks=[part_es])
    assert part_es.stopped_at == full_es.stopped_at
    a, b = _state(full), _state(resumed)
    for name in configs:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]) or key == "threshold" and a[name][key].isnan(), (name, key)
    ma = load_metrics(tmp_path / "full").drop(columns=["tokens_per_s"])
    assert ma.equals(load_metrics(tmp_path / "part").drop(columns=["tokens_per_s"]))
    assert ma["step"].max() == full_es.stopped_at
