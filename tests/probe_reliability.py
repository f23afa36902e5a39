"""Try saelib as a hostile user would and tally what happens (run: ``python tests/probe_reliability.py``).

Every probe feeds a bad input or a fault to a public entry point -- bad API arguments, damaged
files, kill -9 during training and cache building then resume, a full disk, a read-only folder,
two writers at once -- and records one outcome:

* ``clear``     an exception whose message names the problem (the probe checks the words);
* ``recovered`` no exception, and the result is verified correct (e.g. a resume after kill -9 is
                bitwise equal to an uninterrupted run, a stale cache is rebuilt);
* ``bare``      an exception without the expected path/field/fix (a bare traceback);
* ``silent``    accepted without error, with a wrong or unchecked result;
* ``lost``      a user's file was deleted or overwritten;
* ``executed``  a planted payload ran.

Not collected by pytest (its name does not match ``test_*.py``); takes about a minute on CPU.
``-v`` prints every probe's message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
warnings.simplefilter("ignore")

from saelib import io as sio

from saelib.lm import activations

from saelib.analysis import afa

from saelib.sae import geometry  # noqa: E402
from saelib.lm.activations import harvest, tensor_batches  # noqa: E402
from saelib.lm.cache import ActivationCache  # noqa: E402
from saelib.interop import from_saelens, to_saelens  # noqa: E402
from saelib.lm.models import load_model  # noqa: E402
from saelib.sae.core import SAE, SAEConfig  # noqa: E402
from saelib.pipeline import ensure_sweep, load_metrics, sweep_configs  # noqa: E402
from saelib.sae.train import TrainConfig, train_saes  # noqa: E402

VERBOSE = "-v" in sys.argv
D, H, HOOK = 16, 48, "blocks.1.hook_resid_pre"
BARE_TYPES = {"IndexError", "KeyError", "AttributeError", "JSONDecodeError", "EOFError", "SafetensorError",
              "UnpicklingError", "ZeroDivisionError", "StopIteration", "NameError", "UnboundLocalError"}
RESULTS: list[tuple[str, str, str, str]] = []  # (category, name, outcome, message)
ROOT = Path(tempfile.mkdtemp(prefix="saelib-probe-"))


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def err(call, *needles: str) -> tuple[str, str]:
    """Run ``call``; ``clear`` when it raises a non-bare exception whose message holds every needle."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - classifying is the point
        msg = f"{type(e).__name__}: {e}"
        low = msg.lower()
        if type(e).__name__ in BARE_TYPES or len(str(e)) < 25 or any(n.lower() not in low for n in needles):
            return "bare", msg
        return "clear", msg
    return "silent", "no error"


def probe(cat: str, name: str):
    def deco(fn):
        try:
            res = fn()
            outcome, msg = res if isinstance(res, tuple) else (res, "")
        except Exception as e:  # noqa: BLE001 - a probe that itself crashed is a bare traceback
            outcome, msg = "bare", f"{type(e).__name__}: {e} | {traceback.format_exc(limit=2).splitlines()[-1]}"
        RESULTS.append((cat, name, outcome, msg))
        if VERBOSE or outcome not in ("clear", "recovered"):
            print(f"[{outcome:9s}] {cat:10s} {name}: {msg[:220]}", flush=True)
        return fn
    return deco


def fresh(name: str) -> Path:
    p = ROOT / name
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    return p


def data(n: int = 1024, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dic = torch.nn.functional.normalize(torch.randn(H, D, generator=g), dim=-1)
    on = torch.rand(n, H, generator=g) < 3 / H
    on[torch.arange(n), torch.randint(0, H, (n,), generator=g)] = True
    return (on * (0.5 + torch.rand(n, H, generator=g))) @ dic


X = data()


def stream(seed: int = 0, bs: int = 64):
    for ep in range(100):
        perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed + ep))
        for i in range(0, len(X) - bs + 1, bs):
            yield {HOOK: X[perm[i : i + bs]]}


def tcfg(out, **kw) -> TrainConfig:
    base = dict(batch_size=64, n_tokens=64 * 20, lr=3e-3, log_every=2, progress=False, out_dir=out)
    base.update(kw)
    return TrainConfig(**base)


def topk(**kw) -> SAEConfig:
    return SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK, **kw)


def saved_sae(name: str) -> Path:
    p = fresh(name)
    SAE(topk()).save(p / "s")
    return p / "s"


def same_state(a: SAE, b: SAE) -> bool:
    return all(torch.equal(x, y) or (x.isnan().all() and y.isnan().all())
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def hold_lock(folder: Path) -> subprocess.Popen:
    ready = folder.parent / f".{folder.name}.ready"
    ready.unlink(missing_ok=True)
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path\n"
            f"from saelib.io import folder_lock\nwith folder_lock({str(folder)!r}):\n"
            f"    Path({str(ready)!r}).write_text('1'); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(400):
        if ready.exists():
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("lock holder did not start")


@contextlib.contextmanager
def locked(folder: Path):
    proc = hold_lock(folder)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


print(f"probing saelib in {ROOT} ...", flush=True)
T0 = time.perf_counter()
MODEL = load_model("tiny-gpt2", device="cpu")
TOK = torch.randint(3, 2000, (6, 9), generator=torch.Generator().manual_seed(0))
TOK[:, 0] = MODEL.tokenizer.bos_token_id
REF = harvest(MODEL, TOK, HOOK, progress=False)[HOOK]

# ---------------------------------------------------------------------------------------------
# bad API inputs
# ---------------------------------------------------------------------------------------------
API = [
    ("SAEConfig d_in=0", lambda: SAEConfig(d_in=0, d_sae=4), ["d_in"]),
    ("SAEConfig unknown activation", lambda: SAEConfig(d_in=4, d_sae=4, activation="gelu"), ["gelu", "choose"]),
    ("SAEConfig topk without k", lambda: SAEConfig(d_in=4, d_sae=4, activation="topk"), ["k"]),
    ("SAEConfig k > d_sae", lambda: SAEConfig(d_in=4, d_sae=4, activation="topk", k=9), ["d_sae"]),
    ("SAEConfig afa_coeff=nan", lambda: SAEConfig(d_in=4, d_sae=4, afa_coeff=float("nan"), activation="relu"), ["afa_coeff"]),
    ("SAEConfig dtype int8", lambda: SAEConfig(d_in=4, d_sae=4, activation="relu", dtype="int8"), ["dtype"]),
    ("SAE.encode numpy", lambda: SAE(topk()).encode(np.zeros((2, D))), ["torch.Tensor"]),
    ("SAE.encode wrong width", lambda: SAE(topk()).encode(torch.zeros(2, D + 1)), ["d_in"]),
    ("SAE.encode NaN input", lambda: SAE(topk()).encode(torch.full((2, D), float("nan"))), ["NaN"]),
    ("SAE.decode numpy", lambda: SAE(topk()).decode(np.zeros((2, H), dtype=np.float32)), ["torch.Tensor"]),
    ("SAE.decode wrong width", lambda: SAE(topk()).decode(torch.zeros(2, H + 1)), ["d_sae"]),
    ("TrainConfig lr=-1", lambda: TrainConfig(lr=-1), ["lr"]),
    ("TrainConfig lr=nan", lambda: TrainConfig(lr=float("nan")), ["lr"]),
    ("TrainConfig batch_size=0", lambda: TrainConfig(batch_size=0), ["batch_size"]),
    ("TrainConfig n_tokens<batch", lambda: TrainConfig(batch_size=64, n_tokens=10), ["n_tokens"]),
    ("TrainConfig betas out of range", lambda: TrainConfig(betas=(1.5, 0.9)), ["betas"]),
    ("TrainConfig bad device", lambda: TrainConfig(device="gpu0"), ["device"]),
    ("train_saes empty dict", lambda: train_saes({}, stream(), tcfg(None)), ["non-empty"]),
    ("train_saes name '../x'", lambda: train_saes({"../x": topk()}, stream(), tcfg(None)), ["folder name"]),
    ("train_saes batch lacks hook", lambda: train_saes({"a": topk()}, ({"other": X[:64]} for _ in range(30)), tcfg(None)),
     ["hook", "blocks.1.hook_resid_pre"]),
    ("train_saes batch wrong width", lambda: train_saes({"a": topk()}, ({HOOK: X[:64, :8]} for _ in range(30)), tcfg(None)),
     ["shape"]),
    ("train_saes batches=None", lambda: train_saes({"a": topk()}, None, tcfg(None)), ["iterable"]),
    ("harvest id >= vocab", lambda: harvest(MODEL, TOK.clamp_max(0) + MODEL.cfg.d_vocab, HOOK, progress=False),
     ["vocabulary", "tokenizer"]),
    ("harvest negative id", lambda: harvest(MODEL, TOK - 10_000, HOOK, progress=False), ["vocabulary"]),
    ("harvest float tokens", lambda: harvest(MODEL, TOK.float(), HOOK, progress=False), ["integer"]),
    ("harvest 1-D tokens", lambda: harvest(MODEL, TOK[0], HOOK, progress=False), ["2-D"]),
    ("harvest numpy tokens", lambda: harvest(MODEL, TOK.numpy(), HOOK, progress=False), ["numpy", "LongTensor"]),
    ("harvest unknown hook", lambda: harvest(MODEL, TOK, "blocks.1.hook_rezid_pre", progress=False), ["hook"]),
    ("harvest layer out of range", lambda: harvest(MODEL, TOK, "blocks.40.hook_resid_pre", progress=False), ["layers"]),
    ("ActivationCache(missing)", lambda: ActivationCache(ROOT / "nowhere"), ["build"]),
    ("tensor_batches batch_size=0", lambda: next(tensor_batches(X, 0)), ["batch_size"]),
    ("ActivationStore tiny buffer", lambda: activations.ActivationStore(MODEL, TOK, HOOK, batch_size=64, buffer_tokens=10),
     ["buffer_tokens"]),
    ("epsilon NaN decoder", lambda: afa.epsilon(torch.full((8, 4), float("nan"))), ["non-finite"]),
    ("pair_cosines NaN", lambda: geometry.pair_cosines(torch.full((8, 4), float("nan"))), ["non-finite"]),
    ("epsilon one row", lambda: afa.epsilon(torch.ones(1, 4)), ["2 decoder rows"]),
    ("to_saelens top-AFA", lambda: to_saelens(SAE(SAEConfig(d_in=D, d_sae=H, activation="topafa")).eval(),
                                              ROOT / "lens-afa"), ["ReLU", "allow_lossy"]),
    ("to_saelens untrained BatchTopK", lambda: to_saelens(SAE(SAEConfig(d_in=D, d_sae=H, activation="batchtopk", k=3)),
                                                          ROOT / "lens-btk"), ["threshold"]),
    ("to_saelens not an SAE", lambda: to_saelens(object(), ROOT / "lens-x"), ["saelib.SAE"]),
    ("from_saelens saelib folder", lambda: from_saelens(saved_sae("fs")), ["SAE.load"]),
    ("SAE.load missing folder", lambda: SAE.load(ROOT / "none"), ["cfg.json"]),
    ("load_model unknown name", lambda: load_model("gpt-9"), ["Unknown model"]),
    ("token_rows bad split", lambda: __import__("saelib.lm.data").lm.data.token_rows(MODEL, split="test"), ["split"]),
    ("token_rows seq_len=1", lambda: __import__("saelib.lm.data").lm.data.token_rows(MODEL, seq_len=1), ["seq_len"]),
    ("token_rows unknown corpus", lambda: __import__("saelib.lm.data").lm.data.token_rows(MODEL, "foo.csv"), [".jsonl"]),
    ("token_rows missing file", lambda: __import__("saelib.lm.data").lm.data.token_rows(MODEL, str(ROOT / "x.txt")),
     ["does not exist"]),
]
for name, call, needles in API:
    probe("api", name)(lambda call=call, needles=needles: err(call, *needles))


@probe("api", "load_model hub offline message filled in")
def _():
    out, msg = err(lambda: load_model("gpt2"), "HF_HUB_OFFLINE", "embedded")
    return ("bare", msg) if "{" in msg else (out, msg)


@probe("api", "corpus .jsonl with a bad line")
def _():
    from saelib.lm.data import load_texts

    p = fresh("corpus") / "c.jsonl"
    p.write_text('{"text": "a"}\n{"txt": 1}\n')
    return err(lambda: list(load_texts(p, split="all")), "c.jsonl:2", "text")


@probe("api", "profile YAML syntax error")
def _():
    p = fresh("yaml") / "03_training.yaml"
    p.write_text("n_tokens: 4096\nlr: [1e-3\n")
    return err(lambda: sio.load_yaml(p), "03_training.yaml:", "syntax")


# ---------------------------------------------------------------------------------------------
# damaged files
# ---------------------------------------------------------------------------------------------
def damaged_sae(name: str, mutate, *needles):
    @probe("files", name)
    def _():
        p = saved_sae("dmg")
        mutate(p)
        return err(lambda: SAE.load(p), *needles)


def _cfg_edit(f):
    def m(p):
        doc = json.loads((p / "cfg.json").read_text())
        f(doc)
        (p / "cfg.json").write_text(json.dumps(doc))
    return m


def _flip(p, at=-5):
    raw = bytearray((p / "sae.safetensors").read_bytes())
    raw[at] ^= 0x20
    (p / "sae.safetensors").write_bytes(bytes(raw))


def _nan_weights(p):
    from safetensors.torch import load_file, save_file

    t = load_file(str(p / "sae.safetensors"))
    t["W_enc"][0, 0] = float("nan")
    save_file(t, str(p / "sae.safetensors"))
    _cfg_edit(lambda d: d["saelib"].update(weights_sha256=sio.file_sha256(p / "sae.safetensors")))(p)


def _swap_weights(p):
    other = fresh("other")
    SAE(topk(seed=3)).save(other)
    os.replace(other / "sae.safetensors", p / "sae.safetensors")


damaged_sae("cfg.json not JSON", lambda p: (p / "cfg.json").write_text("{oops"), "cfg.json", "JSON")
damaged_sae("cfg.json missing d_in", _cfg_edit(lambda d: d["cfg"].pop("d_in")), "cfg.json", "d_in")
damaged_sae("cfg.json missing 'cfg'", _cfg_edit(lambda d: d.pop("cfg")), "cfg.json", "cfg")
damaged_sae("cfg.json bad activation", _cfg_edit(lambda d: d["cfg"].update(activation="gelu")), "cfg.json", "gelu")
damaged_sae("cfg.json of another library", lambda p: (p / "cfg.json").write_text('{"d_in": 4}'), "cfg.json", "from_saelens")
damaged_sae("safetensors truncated", lambda p: (p / "sae.safetensors").write_bytes(
    (p / "sae.safetensors").read_bytes()[:-50]), "sae.safetensors")
damaged_sae("safetensors bit flip (data)", _flip, "sae.safetensors", "checksum")
damaged_sae("safetensors bit flip (header)", lambda p: _flip(p, 20), "sae.safetensors")
damaged_sae("safetensors empty", lambda p: (p / "sae.safetensors").write_bytes(b""), "sae.safetensors")
damaged_sae("weights/cfg pair mismatched (crash between renames)", _swap_weights, "sae.safetensors", "checksum")
damaged_sae("NaN weights with a valid checksum", _nan_weights, "non-finite")
damaged_sae("truncated, no checksum recorded (old file)", lambda p: (
    _cfg_edit(lambda d: d["saelib"].pop("weights_sha256"))(p),
    (p / "sae.safetensors").write_bytes((p / "sae.safetensors").read_bytes()[:64])), "sae.safetensors", "corrupt")


def cache_copy(name: str) -> Path:
    src = ROOT / "cache-src"
    if not (src / "manifest.json").exists():
        ActivationCache.build(src, MODEL, TOK, HOOK, progress=False, shard_tokens=16)
    dst = ROOT / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def damaged_cache(name: str, mutate, *needles, op="open"):
    @probe("files", name)
    def _():
        p = cache_copy("dmg-cache")
        mutate(p)
        if op == "open":
            return err(lambda: ActivationCache(p), *needles)
        return err(lambda: ActivationCache(p).load(HOOK), *needles)


def _manifest_edit(f):
    def m(p):
        doc = json.loads((p / "manifest.json").read_text())
        f(doc)
        (p / "manifest.json").write_text(json.dumps(doc))
    return m


SHARD0 = f"shard_00000.{HOOK}.bin"
damaged_cache("manifest not JSON", lambda p: (p / "manifest.json").write_text("[1,"), "manifest.json", "rebuild")
damaged_cache("manifest missing dims", _manifest_edit(lambda d: d.pop("dims")), "manifest.json", "dims")
damaged_cache("manifest missing shards", _manifest_edit(lambda d: d.pop("shards")), "manifest.json", "shards")
damaged_cache("manifest shard lacks sha256", _manifest_edit(lambda d: d["shards"][0]["files"][HOOK].pop("sha256")),
              "manifest.json", "sha256")
damaged_cache("manifest is a list", lambda p: (p / "manifest.json").write_text("[]"), "manifest.json")
damaged_cache("shard truncated", lambda p: (p / SHARD0).write_bytes((p / SHARD0).read_bytes()[:-8]), "truncated")
damaged_cache("shard missing", lambda p: (p / SHARD0).unlink(), "missing")
damaged_cache("shard bit flip", lambda p: (p / SHARD0).write_bytes(bytes([(p / SHARD0).read_bytes()[0] ^ 1]) +
                                                                      (p / SHARD0).read_bytes()[1:]),
              "checksum", op="load")


def ckpt_probe(name: str, plant, *needles, marker: Path | None = None):
    @probe("files", name)
    def _():
        out = fresh("ck")
        plant(out / "checkpoint.pt")
        out_, msg = err(lambda: train_saes({"a": topk()}, stream(), tcfg(out, checkpoint_every=5)), *needles)
        if marker is not None and marker.exists():
            return "executed", msg
        return out_, msg


MARK = ROOT / "PAYLOAD-RAN"


def _real_ckpt(path: Path):
    with contextlib.suppress(RuntimeError):
        train_saes({"a": topk()}, _failing(stream(), 7), tcfg(path.parent, checkpoint_every=5))
    return path.read_bytes()


def _failing(it, n):
    for i, b in enumerate(it):
        if i == n:
            raise RuntimeError("simulated interruption")
        yield b


ckpt_probe("checkpoint: torch.save'd pickle payload", lambda p: torch.save({"x": Payload(MARK)}, p), "pickled",
           marker=MARK)
ckpt_probe("checkpoint: raw pickle payload", lambda p: p.write_bytes(pickle.dumps({"x": Payload(MARK)})), "pickled",
           marker=MARK)
ckpt_probe("checkpoint: truncated", lambda p: p.write_bytes(_real_ckpt(p)[:3000]), "checkpoint.pt", "truncated")
ckpt_probe("checkpoint: empty", lambda p: p.write_bytes(b""), "checkpoint.pt", "empty")
ckpt_probe("checkpoint: random bytes", lambda p: p.write_bytes(os.urandom(4096)), "checkpoint.pt", "corrupt")
ckpt_probe("checkpoint: plain tensor, not a dict", lambda p: torch.save(torch.zeros(3), p), "checkpoint.pt", "format")


@probe("files", "checkpoint: resume on another stream")
def _():
    out = fresh("ck2")
    with contextlib.suppress(RuntimeError):
        train_saes({"a": topk()}, _failing(stream(), 7), tcfg(out, checkpoint_every=5))
    return err(lambda: train_saes({"a": topk()}, stream(seed=9), tcfg(out, checkpoint_every=5)), "stream differs")


@probe("files", "metrics.jsonl torn last line, resume")
def _():
    full = train_saes({"a": topk()}, stream(), tcfg(fresh("tornref")))
    out = fresh("torn")
    with contextlib.suppress(RuntimeError):
        train_saes({"a": topk()}, _failing(stream(), 13), tcfg(out, checkpoint_every=5))
    with open(out / "a" / "metrics.jsonl", "a") as f:
        f.write('{"step": 12, "nm')
    res = train_saes({"a": topk()}, stream(), tcfg(out, checkpoint_every=5))
    ok = same_state(res["a"], full["a"]) and load_metrics(out).drop(columns="tokens_per_s").equals(
        load_metrics(ROOT / "tornref").drop(columns="tokens_per_s"))
    return ("recovered", "resumed bitwise equal") if ok else ("silent", "resumed but differs")


@probe("files", "metrics.jsonl damaged middle line")
def _():
    out = fresh("midbad")
    train_saes({"a": topk()}, stream(), tcfg(out, n_tokens=64 * 6))
    lines = (out / "a" / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (out / "a" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return err(lambda: load_metrics(out), "metrics.jsonl:2")



def _retrains(configs, cfg, silent_detail: str):
    """ensure_sweep must train again (read its batch stream) rather than reuse what is there."""
    calls = []
    ensure_sweep(configs, lambda: (calls.append(1), stream())[1], cfg)
    return ("recovered", "retrained") if calls else ("silent", silent_detail)

@probe("files", "sweep.json garbage: retrained, not trusted")
def _():
    out = fresh("sweepjunk")
    cfg = tcfg(out, n_tokens=64 * 4)
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    ensure_sweep(configs, stream, cfg)
    (out / "sweep.json").write_text("{nope")
    return _retrains(configs, cfg, "reused a sweep with an unreadable sweep.json")


@probe("files", "token-row cache corrupted: rebuilt")
def _():
    from saelib.lm.data import token_rows

    d = fresh("tokcache")
    corpus = d / "c.txt"
    corpus.write_text("\n\n".join(f"document number {i} " * 20 for i in range(30)))
    a = token_rows(MODEL, corpus, split="all", seq_len=16, cache_dir=d / "tok", progress=False)
    (npy,) = (d / "tok").rglob("*.npy")
    npy.write_bytes(npy.read_bytes()[:100])
    b = token_rows(MODEL, corpus, split="all", seq_len=16, cache_dir=d / "tok", progress=False)
    return ("recovered", "rebuilt") if torch.equal(a, b) else ("silent", "wrong rows")


# ---------------------------------------------------------------------------------------------
# divergence and stale results
# ---------------------------------------------------------------------------------------------
@probe("nonfinite/stale", "training diverges (lr=1e38)")
def _():
    out = fresh("div")
    o, msg = err(lambda: train_saes({"hot": topk()}, stream(), tcfg(out, lr=1e38)), "'hot'", "step", "learning rate")
    if (out / "hot" / "sae.safetensors").exists():
        return "silent", "a diverged SAE was saved"
    text = (out / "hot" / "metrics.jsonl").read_text() if (out / "hot" / "metrics.jsonl").exists() else ""
    if "NaN" in text or '"loss": null' in text:
        return "silent", "NaN metrics written"
    return o, msg


@probe("nonfinite/stale", "input with inf values")
def _():
    bad = X[:64].clone()
    bad[3, 2] = float("inf")
    return err(lambda: train_saes({"a": topk()}, ({HOOK: bad} for _ in range(40)), tcfg(None)), "inf")


@probe("nonfinite/stale", "SAE.save of NaN weights")
def _():
    s = SAE(topk())
    with torch.no_grad():
        s.W_dec[0, 0] = float("nan")
    return err(lambda: s.save(fresh("nansave") / "s"), "non-finite")


@probe("nonfinite/stale", "ensure_sweep with a NaN member")
def _():
    out = fresh("nansweep")
    cfg = tcfg(out, n_tokens=64 * 4)
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    ensure_sweep(configs, stream, cfg)
    (name,) = configs
    _nan_weights(out / name)
    res = ensure_sweep(configs, stream, cfg)
    return ("recovered", "retrained") if torch.isfinite(res[name].W_enc).all() else ("silent", "NaN SAE reused")


@probe("nonfinite/stale", "cache of other weights at the same folder")
def _():
    other = load_model("tiny-gpt2", device="cpu", seed=1)
    p = cache_copy("otherw")
    return err(lambda: ActivationCache.build(p, other, TOK, HOOK, progress=False, shard_tokens=16), "model weights")


@probe("nonfinite/stale", "cache made by other code")
def _():
    p = cache_copy("othercode")
    m = json.loads((p / "manifest.json").read_text())
    m["code"] = "0" * 16
    (p / "manifest.json").write_text(json.dumps(m))
    c = ActivationCache.build(p, MODEL, TOK, HOOK, progress=False, shard_tokens=16)
    return ("recovered", "rebuilt") if c.manifest["code"] != "0" * 16 and torch.equal(c.load(HOOK), REF) else \
        ("silent", "stale cache reused")


@probe("nonfinite/stale", "sweep made by other code")
def _():
    out = fresh("codesweep")
    cfg = tcfg(out, n_tokens=64 * 4)
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    ensure_sweep(configs, stream, cfg)
    stamp = json.loads((out / "sweep.json").read_text())
    stamp["recipe"]["code"] = "0" * 16
    (out / "sweep.json").write_text(json.dumps(stamp))
    return _retrains(configs, cfg, "old code's sweep reused")


@probe("nonfinite/stale", "to_saelens top-AFA with allow_lossy records it")
def _():
    import sae_lens

    p = fresh("lossy")
    to_saelens(SAE(SAEConfig(d_in=D, d_sae=H, activation="topafa")).eval(), p, allow_lossy=True)
    meta = sae_lens.SAE.load_from_disk(str(p)).cfg.metadata
    return ("recovered", "recorded") if "ReLU" in getattr(meta, "saelib_lossy_export", "") else ("silent", "not recorded")


# ---------------------------------------------------------------------------------------------
# data loss
# ---------------------------------------------------------------------------------------------
def build_into_user_folder(name: str, make):
    @probe("loss", name)
    def _():
        d = fresh("user-" + name.split()[0])
        files = make(d)
        before = {f: f.read_bytes() for f in files}
        o, msg = err(lambda: ActivationCache.build(d, MODEL, TOK, HOOK, progress=False, shard_tokens=16), str(d),
                     "not an activation cache")
        if any(not f.exists() or f.read_bytes() != b for f, b in before.items()):
            return "lost", msg
        return o, msg


def _runs_like(d):
    (d / "sweep" / "sae").mkdir(parents=True)
    (d / "sweep" / "sae" / "sae.safetensors").write_bytes(b"trained for hours")
    (d / "notes.md").write_text("mine")
    return [d / "sweep" / "sae" / "sae.safetensors", d / "notes.md"]


def _cache_plus_file(d):
    shutil.rmtree(d)
    shutil.copytree(cache_copy("plusfile-src"), d)
    m = json.loads((d / "manifest.json").read_text())
    m["complete"], m["shards"] = False, m["shards"][:1]
    (d / "manifest.json").write_text(json.dumps(m))
    (d / "analysis.csv").write_text("1,2")
    return [d / "analysis.csv"]


build_into_user_folder("runs/-like folder", _runs_like)
build_into_user_folder("interrupted cache plus a user file", _cache_plus_file)
def _dotfile(d):
    (d / ".env").write_text("KEY=value")
    return [d / ".env"]


build_into_user_folder("folder with a dotfile", _dotfile)


@probe("loss", "ActivationCache.build on a file path")
def _():
    f = fresh("afile") / "data.bin"
    f.write_bytes(b"precious")
    o, msg = err(lambda: ActivationCache.build(f, MODEL, TOK, HOOK, progress=False), "file")
    return ("lost", msg) if f.read_bytes() != b"precious" else (o, msg)


@probe("loss", "rejected run keeps train.json")
def _():
    out = fresh("keepjson")
    with contextlib.suppress(RuntimeError):
        train_saes({"a": topk()}, _failing(stream(), 7), tcfg(out, checkpoint_every=5))
    before = (out / "train.json").read_text()
    o, msg = err(lambda: train_saes({"a": topk()}, stream(), tcfg(out, checkpoint_every=5, lr=1e-2)), "different run")
    return ("lost", msg) if (out / "train.json").read_text() != before else (o, msg)


# ---------------------------------------------------------------------------------------------
# full disk
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_tmpfs(size: str):
    """A real tiny filesystem when mounting is allowed; None otherwise (probes then simulate)."""
    d = Path(tempfile.mkdtemp(prefix="saelib-tmpfs-"))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)],
                        capture_output=True).returncode == 0
    try:
        yield d if ok else None
    finally:
        if ok:
            subprocess.run(["umount", str(d)], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@probe("disk", "activation cache on a full disk, then resume")
def _():
    with tiny_tmpfs("12k") as mnt:
        if mnt is None:
            return "bare", "cannot mount a tmpfs here"
        p = mnt / "cache"
        o, msg = err(lambda: ActivationCache.build(p, MODEL, TOK, HOOK, progress=False, shard_tokens=8),
                     "Disk full", "resume")
        if o != "clear":
            return o, msg
        done = json.loads((p / "manifest.json").read_text())["shards"]
        dst = fresh("fullresume")
        shutil.copytree(p, dst / "cache")
    c = ActivationCache.build(dst / "cache", MODEL, TOK, HOOK, progress=False, shard_tokens=8)
    return ("clear", msg + f" | {len(done)} shards kept, resumed bitwise") if torch.equal(c.load(HOOK), REF) else \
        ("silent", "resumed cache differs")


@probe("disk", "SAE.save on a full disk keeps the old SAE")
def _():
    with tiny_tmpfs("64k") as mnt:
        if mnt is None:
            return "bare", "cannot mount a tmpfs here"
        small = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=2))
        small.save(mnt / "s")
        old = (mnt / "s" / "sae.safetensors").read_bytes()
        big = SAE(SAEConfig(d_in=64, d_sae=512, activation="topk", k=2))
        o, msg = err(lambda: big.save(mnt / "s"), "sae.safetensors", "space")
        intact = (mnt / "s" / "sae.safetensors").read_bytes() == old and SAE.load(mnt / "s") is not None
        return (o, msg) if intact else ("lost", msg)


@probe("disk", "checkpoint write on a full disk keeps the previous checkpoint")
def _():
    out = fresh("ckfull")
    real = torch.save
    n = {"calls": 0}

    def failing_save(obj, f, *a, **k):
        n["calls"] += 1
        if n["calls"] == 2:
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    torch.save = failing_save
    try:
        o, msg = err(lambda: train_saes({"a": topk()}, stream(), tcfg(out, checkpoint_every=3)), "checkpoint.pt",
                     "previous checkpoint")
    finally:
        torch.save = real
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    return (o, msg + f" | previous checkpoint (step {ck['step']}) intact") if ck["step"] == 3 else ("lost", msg)


@probe("disk", "metrics append on a full disk")
def _():
    out = fresh("mfull")
    real_open = open
    import builtins

    def bad_open(f, mode="r", *a, **k):
        if str(f).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(f, mode, *a, **k)

    builtins.open = bad_open
    try:
        return err(lambda: train_saes({"a": topk()}, stream(), tcfg(out)), "metrics.jsonl", "resumes")
    finally:
        builtins.open = real_open


# ---------------------------------------------------------------------------------------------
# read-only folders
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def read_only(prepare):
    """A folder prepared by ``prepare(path)`` and then made read-only (a remounted tmpfs as root,
    chmod otherwise)."""
    d = Path(tempfile.mkdtemp(prefix="saelib-ro-"))
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(d)],
                                                   capture_output=True).returncode == 0
    try:
        prepare(d)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(d)], check=True, capture_output=True)
        else:
            for p in [d, *d.rglob("*")]:
                if p.is_dir():
                    os.chmod(p, 0o555)
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", str(d)], capture_output=True)
        else:
            for p in [d, *d.rglob("*")]:
                if p.is_dir():
                    os.chmod(p, 0o755)
        shutil.rmtree(d, ignore_errors=True)


@probe("readonly", "train_saes into a read-only folder")
def _():
    with read_only(lambda d: None) as d:
        return err(lambda: train_saes({"a": topk()}, stream(), tcfg(d / "run")), str(d))


@probe("readonly", "train_saes into a read-only existing run folder")
def _():
    with read_only(lambda d: (d / "run").mkdir()) as d:
        return err(lambda: train_saes({"a": topk()}, stream(), tcfg(d / "run")), "run", "writable")


@probe("readonly", "read a complete cache from a read-only folder")
def _():
    with read_only(lambda d: shutil.copytree(cache_copy("ro-src"), d / "c")) as d:
        c = ActivationCache.build(d / "c", MODEL, TOK, HOOK, progress=False, shard_tokens=16)
        return ("recovered", "read") if torch.equal(c.load(HOOK), REF) else ("silent", "wrong values")


@probe("readonly", "build a new cache in a read-only folder")
def _():
    with read_only(lambda d: None) as d:
        return err(lambda: ActivationCache.build(d / "c", MODEL, TOK, HOOK, progress=False), str(d))


@probe("readonly", "load an SAE from a read-only folder")
def _():
    with read_only(lambda d: SAE(topk()).save(d / "s")) as d:
        return ("recovered", "loaded") if SAE.load(d / "s") is not None else ("silent", "")


@probe("readonly", "ensure_sweep loads a finished sweep from a read-only folder")
def _():
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    with read_only(lambda d: ensure_sweep(configs, stream, tcfg(d / "sw", n_tokens=64 * 4))) as d:
        calls = []
        res = ensure_sweep(configs, lambda: (calls.append(1), stream())[1], tcfg(d / "sw", n_tokens=64 * 4))
        return ("recovered", "loaded without writing") if not calls and len(res) == 1 else ("silent", "")


@probe("readonly", "ensure_sweep must train in a read-only folder")
def _():
    configs = sweep_configs([HOOK], D, H, topk_ks=(4,))
    with read_only(lambda d: (d / "sw").mkdir()) as d:
        return err(lambda: ensure_sweep(configs, stream, tcfg(d / "sw", n_tokens=64 * 4)), "sw", "writable")


@probe("readonly", "SAE.save into a read-only folder")
def _():
    with read_only(lambda d: None) as d:
        return err(lambda: SAE(topk()).save(d / "s"), "s")


@probe("readonly", "token_rows with a read-only cache folder")
def _():
    from saelib.lm.data import token_rows

    src = fresh("rotok") / "c.txt"
    src.write_text("\n\n".join(f"doc {i} " * 30 for i in range(20)))
    with read_only(lambda d: None) as d:
        rows = token_rows(MODEL, src, split="all", seq_len=16, cache_dir=d / "tok", progress=False)
    ref = token_rows(MODEL, src, split="all", seq_len=16, cache_dir=None, progress=False)
    return ("recovered", "rows returned uncached") if torch.equal(rows, ref) else ("silent", "wrong rows")


# ---------------------------------------------------------------------------------------------
# two writers
# ---------------------------------------------------------------------------------------------
@probe("writers", "train_saes while another process trains there")
def _():
    out = fresh("w1")
    with locked(out) as proc:
        o, msg = err(lambda: train_saes({"a": topk()}, stream(), tcfg(out)), f"in use by pid {proc.pid}")
    return ("lost", msg) if (out / "train.json").exists() else (o, msg)


@probe("writers", "ActivationCache.build while another process builds there")
def _():
    d = fresh("w2")
    with locked(d) as proc:
        return err(lambda: ActivationCache.build(d, MODEL, TOK, HOOK, progress=False), f"in use by pid {proc.pid}")


@probe("writers", "ensure_sweep while another process trains there")
def _():
    d = fresh("w3")
    with locked(d) as proc:
        return err(lambda: ensure_sweep(sweep_configs([HOOK], D, H, topk_ks=(4,)), stream, tcfg(d)),
                   f"in use by pid {proc.pid}")


@probe("writers", "lock of a killed writer does not block")
def _():
    d = fresh("w4")
    proc = hold_lock(d)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    train_saes({"a": topk()}, stream(), tcfg(d, n_tokens=64 * 3))
    return "recovered", "trained after the holder was killed"


# ---------------------------------------------------------------------------------------------
# kill -9, then resume
# ---------------------------------------------------------------------------------------------
CONFIGS_SRC = """
from saelib.sae.core import SAEConfig
CONFIGS = {
    "topk": SAEConfig(d_in=D, d_sae=H, activation="topk", k=4, hook_name=HOOK, aux_k=8, dead_after_tokens=128),
    "btk": SAEConfig(d_in=D, d_sae=H, activation="batchtopk", k=4, hook_name=HOOK),
    "afa": SAEConfig(d_in=D, d_sae=H, activation="topafa", hook_name=HOOK, input_norm="token"),
}
"""
exec(CONFIGS_SRC)
CHILD_HEAD = textwrap.dedent(f"""
    import sys, time, torch
    sys.path.insert(0, {str(REPO)!r})
    torch.set_num_threads(1)
    from saelib.sae.train import TrainConfig, train_saes
    D, H, HOOK = {D}, {H}, {HOOK!r}
""") + "\n".join(textwrap.dedent(__import__("inspect").getsource(f)) for f in (data, stream, tcfg)) \
    + "\nX = data()\n" + CONFIGS_SRC


def kill_then_resume(kill_at: int):
    @probe("kill-9", f"training killed at batch {kill_at}, resumed")
    def _():
        full = train_saes(CONFIGS, stream(), tcfg(fresh(f"k9ref{kill_at}"), n_tokens=64 * 16))
        out = fresh(f"k9-{kill_at}")
        ready = out.parent / f".k9-{kill_at}.ready"
        ready.unlink(missing_ok=True)
        code = CHILD_HEAD + textwrap.dedent(f"""
            def gen():
                for i, b in enumerate(stream()):
                    if i == {kill_at}:
                        open({str(ready)!r}, "w").write("1")
                        time.sleep(300)
                    yield b
            train_saes(CONFIGS, gen(), tcfg({str(out)!r}, checkpoint_every=3, n_tokens=64 * 16))
        """)
        child = subprocess.Popen([sys.executable, "-c", code])
        for _ in range(1200):
            if ready.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if not ready.exists():
            return "bare", "child did not reach the kill point"
        res = train_saes(CONFIGS, stream(), tcfg(out, checkpoint_every=3, n_tokens=64 * 16))
        ok = all(same_state(res[n], full[n]) for n in CONFIGS) and load_metrics(out).drop(columns="tokens_per_s").equals(
            load_metrics(ROOT / f"k9ref{kill_at}").drop(columns="tokens_per_s"))
        return ("recovered", "resumed bitwise equal") if ok else ("silent", "resumed run differs")


for k in (0, 2, 7, 11):
    kill_then_resume(k)


def cache_kill_children(points: dict[str, int]) -> dict[str, tuple[Path, Path, subprocess.Popen]]:
    """One child per kill point, started together (each loads the model once): the child builds a
    cache and stops for good (kill -9) in the middle of its n-th file write."""
    kids = {}
    for label, nth in points.items():
        d, ready = fresh(f"k9cache-{nth}"), ROOT / f".k9cache-{nth}.ready"
        code = textwrap.dedent(f"""
            import sys, time, torch
            sys.path.insert(0, {str(REPO)!r})
            torch.set_num_threads(1)
            from saelib.lm import cache
            from saelib.lm.models import load_model
            m = load_model("tiny-gpt2", device="cpu")
            toks = torch.tensor({TOK.tolist()!r})
            real, n = cache._write_bytes, [0]
            def slow(path, data):
                n[0] += 1
                if n[0] == {nth}:
                    with open(path, "wb") as f:
                        f.write(data[: len(data) // 2])
                    open({str(ready)!r}, "w").write("1")
                    time.sleep(300)
                real(path, data)
            cache._write_bytes = slow
            cache.ActivationCache.build({str(d / 'c')!r}, m, toks, {HOOK!r}, progress=False, shard_tokens=16)
        """)
        kids[label] = (d, ready, subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL))
    return kids


KIDS = cache_kill_children({"in the first shard": 1, "mid-build (third shard)": 3})
for label, (d, ready, child) in KIDS.items():
    @probe("kill-9", f"cache build killed {label}, rebuilt")
    def _(d=d, ready=ready, child=child):
        for _ in range(2400):
            if ready.exists() or child.poll() is not None:
                break
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        if not ready.exists():
            return "bare", "child did not reach the kill point"
        c = ActivationCache.build(d / "c", MODEL, TOK, HOOK, progress=False, shard_tokens=16)
        return ("recovered", "rebuilt bitwise equal") if torch.equal(c.load(HOOK), REF) else ("silent", "differs")


# ---------------------------------------------------------------------------------------------
# tally
# ---------------------------------------------------------------------------------------------
shutil.rmtree(ROOT, ignore_errors=True)
counts = {k: sum(r[2] == k for r in RESULTS) for k in ("clear", "recovered", "bare", "silent", "lost", "executed")}
cats = sorted({r[0] for r in RESULTS})
print(f"\nper category: " + ", ".join(f"{c} {sum(r[0] == c for r in RESULTS)}" for c in cats))
print(f"tried {len(RESULTS)} | clear error {counts['clear']} | recovered correctly {counts['recovered']} | "
      f"bare traceback {counts['bare']} | silent {counts['silent']} | data lost {counts['lost']} | "
      f"code executed {counts['executed']}   ({time.perf_counter() - T0:.0f} s)")
sys.exit(0 if counts["bare"] + counts["silent"] + counts["lost"] + counts["executed"] == 0 else 1)
