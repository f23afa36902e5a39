"""Sweeps over torch.distributed ranks (gloo, 2 CPU processes): the SAEs are split over the ranks,
the model work of the activation stream too, an interrupted run resumes per rank, and the result
equals a single-process run bit for bit."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelib.sae import distributed
from saelib.sae.distributed import DistributedActivationStore, plan_saes, rank_dir
from saelib.sae.train import EarlyStopping, TrainConfig
from saelib.sae.core import SAEConfig

HOOKS = ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre"]
N_ROWS, SEQ = 13, 17  # 2 epochs of 13 rows = 13 chunks of 2: the last fill round has one chunk (one rank idles)
STORE = dict(batch_size=32, buffer_tokens=128, model_batch_size=2, seed=3, epochs=2)
N_STEPS, INTERRUPT_AT = 10, 5


class Interrupted(Exception):
    pass


def _setup():
    from saelib.lm.models import load_model

    torch.set_num_threads(1)
    model = load_model("tiny-llama", device="cpu")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 2000, (N_ROWS, SEQ), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id
    d = model.cfg.d_model
    configs = {
        "topk": SAEConfig(d_in=d, d_sae=48, activation="topk", k=4, hook_name=HOOKS[0], dead_after_tokens=64),
        "topafa": SAEConfig(d_in=d, d_sae=48, activation="topafa", hook_name=HOOKS[0], dead_after_tokens=64),
        "batchtopk": SAEConfig(d_in=d, d_sae=32, activation="batchtopk", k=3, hook_name=HOOKS[1], dead_after_tokens=64),
    }
    return model, tokens, configs


def _train_cfg(out_dir):
    from saelib.sae.train import TrainConfig

    return TrainConfig(batch_size=STORE["batch_size"], n_tokens=N_STEPS * STORE["batch_size"], lr=1e-3,
                       checkpoint_every=2, log_every=2, out_dir=out_dir, progress=False, device="cpu", seed=0)


def _interrupt_after(batches, n):
    for i, b in enumerate(batches):
        if i == n:
            raise Interrupted
        yield b


def _worker(rank: int, world: int, tmp: str) -> None:
    from saelib.sae.distributed import train_sweep

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model, tokens, configs = _setup()
        cfg = _train_cfg(os.path.join(tmp, "dist"))
        store = DistributedActivationStore(model, tokens, HOOKS, **STORE)
        try:  # first run: both ranks stop before their 6th batch (checkpoints at step 4)
            train_sweep(configs, _interrupt_after(store, INTERRUPT_AT), cfg)
            raise AssertionError("the interrupted run finished")
        except Interrupted:
            pass
        ck = rank_dir(cfg.out_dir, rank, world) / "checkpoint.pt"
        assert ck.exists(), f"rank {rank} wrote no checkpoint"
        if rank == 1:  # rank 1 lost its checkpoint: it restarts while rank 0 resumes at step 4
            ck.unlink()
        dist.barrier()
        train_sweep(configs, DistributedActivationStore(model, tokens, HOOKS, **STORE), cfg)
    finally:
        dist.destroy_process_group()


def test_plan_balances_cost_and_is_deterministic():
    cfgs = {f"s{i}": SAEConfig(d_in=8, d_sae=w, activation="topk", k=2) for i, w in enumerate([64, 64, 128, 32, 32])}
    plan = plan_saes(cfgs, 2)
    assert sorted(sum(plan, [])) == sorted(cfgs) and plan == plan_saes(cfgs, 2)
    loads = [sum(cfgs[n].d_sae for n in p) for p in plan]
    assert loads == [160, 160]
    assert plan_saes(cfgs, 1) == [list(cfgs)]
    assert plan_saes(cfgs, 8)[5:] == [[], [], []]


def test_two_gloo_ranks_equal_one_process_bitwise(tmp_path):
    from saelib.lm.activations import ActivationStore
    from saelib.pipeline import load_saes
    from saelib.sae.train import train_saes

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    model, tokens, configs = _setup()
    ref = train_saes(configs, ActivationStore(model, tokens, HOOKS, **STORE), _train_cfg(tmp_path / "single"))
    got = load_saes(tmp_path / "dist")
    assert sorted(got) == sorted(configs)
    plan = json.loads((tmp_path / "dist" / "distributed.json").read_text())["plan"]
    assert all(plan) and sorted(sum(plan, [])) == sorted(configs)  # both ranks trained something
    for name, sae in ref.items():
        a, b = sae.state_dict(), got[name].state_dict()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, equal_nan=True,  # bit for bit
                                       msg=lambda m: f"{name}.{key} differs from the single-process run: {m}")
    assert (tmp_path / "dist" / "metrics.csv").exists()
    assert not any(p.name == "checkpoint.pt" for p in (tmp_path / "dist").rglob("*"))  # removed after success


@pytest.mark.parametrize("epochs", [1, 2])
def test_store_epochs(epochs):
    """The store serves ``epochs`` passes over the rows (the second in another row order)."""
    from saelib.lm.activations import ActivationStore
    from saelib.lm.models import load_model

    model = load_model("tiny-llama", device="cpu")
    tokens = torch.randint(3, 2000, (6, 9), generator=torch.Generator().manual_seed(1))
    store = ActivationStore(model, tokens, HOOKS[0], batch_size=8, buffer_tokens=32, model_batch_size=2, epochs=epochs)
    got = torch.cat([b[HOOKS[0]] for b in store])
    assert got.shape[0] == len(store) * 8 == epochs * 6 * 8
    if epochs == 2:  # every activation served twice over the two passes
        first = torch.cat([b[HOOKS[0]] for b in ActivationStore(model, tokens, HOOKS[0], batch_size=8,
                                                                buffer_tokens=32, model_batch_size=2)])
        key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
        assert key(got) == sorted(key(first) * 2)


def test_hooks_refused_on_several_ranks(monkeypatch, tmp_path):
    """Early stopping on one rank would leave the others waiting in the shared stream: refused."""
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    cfg = TrainConfig(batch_size=8, n_tokens=64, out_dir=tmp_path)
    with pytest.raises(ValueError, match="one process"):
        distributed.train_sweep({"a": SAEConfig(d_in=4, d_sae=8, activation="topk", k=2)}, [], cfg,
                                hooks=[EarlyStopping()])
