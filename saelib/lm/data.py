"""Text corpora and fixed-length token rows for harvesting activations.

* :func:`load_texts` iterates over a corpus's documents: ``"embedded"`` (the English corpus that
  ``scripts/prepare_corpus.py`` builds from registry packages, see ``data/README.md``),
  ``"openwebtext"`` (``datasets`` streaming, needs the hub), ``"openwebtext-standin"`` (its small
  local stand-in, read the same way) or a local ``.txt`` / ``.jsonl`` / ``.parquet`` file.
* :func:`token_rows` cuts a split's token stream (EOS after every document) into rows of BOS +
  ``seq_len - 1`` tokens, cached on disk and returned in a seeded order, so any ``n_tokens`` is a
  prefix of the same shuffled rows; :func:`iter_token_rows` streams them unshuffled.

Train and held-out splits are disjoint by document: a document is held out when a hash of its
text falls in the lowest :data:`HELDOUT_FRACTION` of the hash range. The rule depends on the
text only, so it is the same on every machine and for every tokenizer, and duplicated documents
always land in the same split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelib.io import atomic_path, atomic_write_json, file_sha256
from saelib.runs import data_dir, hub_offline

__all__ = ["HELDOUT_FRACTION", "SPLITS", "corpus_checksum", "corpus_path", "document_split", "iter_token_rows",
           "load_texts", "prepare_standin_corpus", "resolve_tokenizer", "token_rows", "tokenizer_fingerprint"]

HELDOUT_FRACTION = 0.05
"""Fraction of documents (by text hash) in the ``"heldout"`` split."""
SPLITS = ("train", "heldout", "all")
NAMED_CORPORA = ("embedded", "openwebtext", "openwebtext-standin")
STREAM_CORPORA = ("openwebtext", "openwebtext-standin")
"""Corpora read as a stream (``datasets`` streaming): ``token_rows`` needs ``n_tokens`` and reads
only as many documents as it needs."""
OPENWEBTEXT = "Skylion007/openwebtext"
STANDIN_DOCS = 400
"""Documents in the OpenWebText stand-in."""
STANDIN_MAX_CHARS = 12_000
"""Each stand-in document is cut to at most this many characters (web pages are short)."""
_HASH_RANGE = 1 << 64


# ---------------------------------------------------------------------------------------------
# Locations


def corpus_path(name: str = "embedded") -> Path:
    """Path of a prepared corpus (``data/corpus/<name>.jsonl``); raises if it is missing."""
    path = data_dir() / "corpus" / f"{name}.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"The {name!r} corpus is not prepared: {path} does not exist. Build it with "
            "`python scripts/prepare_corpus.py` (downloads a few registry packages, ~30 s), "
            "or pass a path to a .txt/.jsonl/.parquet file as `corpus`."
        )
    return path


# ---------------------------------------------------------------------------------------------
# Documents


def document_split(text: str) -> str:
    """``"heldout"`` or ``"train"`` for one document, from a hash of its text."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
    return "heldout" if h < HELDOUT_FRACTION * _HASH_RANGE else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_online() -> None:
    if hub_offline():
        raise RuntimeError(
            "The 'openwebtext' corpus streams from the Hugging Face hub, but the hub is disabled "
            "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set). Use corpus='embedded' (prepared "
            "offline by `python scripts/prepare_corpus.py`) or a local .txt/.jsonl/.parquet file."
        )


def standin_corpus_path() -> Path:
    """Path of the OpenWebText stand-in, ``data/corpus/openwebtext-standin.parquet``."""
    return data_dir() / "corpus" / "openwebtext-standin.parquet"


def prepare_standin_corpus(*, force: bool = False) -> Path:
    """Build (once) the small local stand-in for OpenWebText and return its path.

    It runs the ``openwebtext`` code path (``datasets`` streaming, stream-keyed token caches,
    ``n_tokens``-limited reads) offline, in tests and the ``smoke`` profile: a parquet file with a
    ``"text"`` column like the hub's, holding :data:`STANDIN_DOCS` documents of the embedded corpus
    (every k-th, so every source is represented), each cut to :data:`STANDIN_MAX_CHARS` characters
    at a paragraph break, ordered by a hash of the text (OpenWebText has no topical order).
    Deterministic. It is *not* web text; only the code path is OpenWebText's.
    """
    import pyarrow as pa  # optional heavy imports: only the parquet corpora need them
    import pyarrow.parquet as pq

    target = standin_corpus_path()
    if target.exists() and not force:
        return target
    docs = list(_jsonl_docs(corpus_path("embedded")))
    if not docs:
        raise ValueError(f"{corpus_path('embedded')} holds no documents; rebuild it with `python scripts/prepare_corpus.py --force`.")
    step = max(1, len(docs) // STANDIN_DOCS)
    picked = []
    for text in docs[::step][:STANDIN_DOCS]:
        if len(text) > STANDIN_MAX_CHARS:
            cut = text.rfind("\n", 0, STANDIN_MAX_CHARS)
            text = text[: cut if cut > STANDIN_MAX_CHARS // 2 else STANDIN_MAX_CHARS]
        picked.append(text)
    picked.sort(key=lambda t: hashlib.blake2b(t.encode("utf-8"), digest_size=8, person=b"owt-stand").digest())
    with atomic_path(target, suffix=".parquet.tmp") as tmp:
        pq.write_table(pa.table({"text": picked}), tmp)
    return target


def _stream_docs(kind: str) -> Iterator[str]:
    """Documents of a stream corpus through ``datasets`` streaming (the hub, or the local stand-in)."""
    import datasets  # seconds to import; only the stream corpora need it

    if kind == "openwebtext-standin":
        source = str(prepare_standin_corpus())
        # The same call and row format as the hub's auto-converted parquet branch.
        attempts = (("parquet", {"data_files": source}),)
    else:
        source = OPENWEBTEXT
        # The hub repo long held a loading script, which datasets >= 4 refuses to run; the
        # auto-converted parquet branch serves the same rows.
        attempts = ((OPENWEBTEXT, {}), (OPENWEBTEXT, {"revision": "refs/convert/parquet"}),
                    (OPENWEBTEXT, {"name": "plain_text", "revision": "refs/convert/parquet"}))
    errors = []
    for path, kwargs in attempts:
        try:
            stream = datasets.load_dataset(path, split="train", streaming=True, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - hub/network/format errors all mean "try next"
            errors.append(f"{kwargs or 'default'}: {type(e).__name__}: {e}")
    else:
        raise RuntimeError(
            f"Could not stream {source} ({'; '.join(errors)}). "
            "Without hub access use corpus='embedded' or a local .txt/.jsonl/.parquet file."
        )
    try:
        for row in stream:
            yield row["text"]
    except (OSError, ConnectionError) as e:  # connection lost mid-stream
        raise RuntimeError(
            f"Streaming {source} failed ({type(e).__name__}: {e}). "
            "Without hub access use corpus='embedded' or a local .txt/.jsonl/.parquet file."
        ) from e


def _txt_docs(path: Path) -> Iterator[str]:
    # Documents are separated by one or more blank lines.
    buf: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                buf.append(line.rstrip("\n"))
            elif buf:
                yield "\n".join(buf)
                buf = []
    if buf:
        yield "\n".join(buf)


def _jsonl_docs(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: every line of a .jsonl corpus must be a JSON object with a "
                    f'string field "text" ({type(e).__name__}: {e}).'
                ) from None
            if not isinstance(text, str):
                raise ValueError(f'{path}:{lineno}: field "text" must be a string, got {type(text).__name__}')
            yield text


def _parquet_docs(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq  # optional heavy import: only parquet corpora need it

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(
            f'{path} has no column "text" (columns: {pf.schema_arrow.names}); '
            "a .parquet corpus needs a string column named text."
        )
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def _corpus_source(corpus: str | os.PathLike) -> tuple[str, Path | None]:
    """(kind, path): kind is a named corpus, "txt", "jsonl" or "parquet"."""
    if isinstance(corpus, str) and corpus in NAMED_CORPORA:
        return (corpus, corpus_path(corpus) if corpus == "embedded" else None)
    path = Path(corpus)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".parquet"):
        raise ValueError(
            f"Unknown corpus {str(corpus)!r}: use one of {NAMED_CORPORA} or a path to a "
            ".txt (documents separated by blank lines), .jsonl (field \"text\") or .parquet "
            '(column "text") file.'
        )
    if not path.exists():
        raise FileNotFoundError(f"Corpus file {path} does not exist; check the path.")
    return suffix[1:], path


def load_texts(corpus: str | os.PathLike = "embedded", *, split: str = "train") -> Iterator[str]:
    """Iterate over the documents of ``corpus`` that belong to ``split``.

    ``corpus``: a named corpus (module docstring) or a path to a ``.txt`` (documents separated by
    blank lines), ``.jsonl`` (a ``"text"`` field per line) or ``.parquet`` (a ``"text"`` column)
    file. ``split``: ``"train"``, ``"heldout"`` (:data:`HELDOUT_FRACTION` of the documents, by
    text hash) or ``"all"``.
    """
    # Validate eagerly (bad names, missing files, offline hub) so errors surface at the call.
    _check_split(split)
    kind, path = _corpus_source(corpus)
    if kind in STREAM_CORPORA:
        if kind == "openwebtext":
            _check_online()
        docs = _stream_docs(kind)
    else:
        reader = {"embedded": _jsonl_docs, "jsonl": _jsonl_docs, "txt": _txt_docs, "parquet": _parquet_docs}
        docs = reader[kind](path)
    return (text for text in docs if text and (split == "all" or document_split(text) == split))


_CHECKSUMS: dict[tuple, str] = {}


def corpus_checksum(corpus: str | os.PathLike = "embedded") -> str:
    """sha256 of a corpus file (the manifest's value for ``"embedded"``), memoised per process."""
    kind, path = _corpus_source(corpus)
    if kind == "openwebtext":
        return "openwebtext"
    if kind == "openwebtext-standin":
        path = prepare_standin_corpus()
    if kind == "embedded":
        manifest = path.with_name(path.name.replace(".jsonl", ".manifest.json"))
        if manifest.exists():
            try:
                return str(json.loads(manifest.read_text())["sha256"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{manifest} is unreadable or lacks field 'sha256' ({type(e).__name__}: {e}); rebuild the "
                    "corpus with `python scripts/prepare_corpus.py`"
                ) from None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = file_sha256(path)
    return _CHECKSUMS[key]


# ---------------------------------------------------------------------------------------------
# Tokenizers

_PROBE = "The quick brown fox, naïve café — 1234 tokens.\n  def f(x): return x**2  # ünïcode 日本"


def resolve_tokenizer(model_or_tokenizer: Any) -> tuple[Any, int, int]:
    """(tokenizer, bos_id, eos_id) from a tokenizer or a model holding one in ``.tokenizer``.

    A tokenizer is any object with ``encode`` (or ``__call__``), ``bos_token_id`` and
    ``eos_token_id``; a missing BOS falls back to EOS and vice versa (GPT-2 has one token for both).
    """
    tok = model_or_tokenizer
    if not _is_hf(tok) and not hasattr(tok, "encode"):
        # A model (TransformerBridge, HookedTransformer, ...) carrying its tokenizer.
        tok = getattr(model_or_tokenizer, "tokenizer", None)
        if tok is None or not hasattr(tok, "encode"):
            raise TypeError(
                f"{type(model_or_tokenizer).__name__} is neither a tokenizer (encode, bos_token_id, "
                "eos_token_id) nor a model with a .tokenizer; pass the model from "
                "saelib.lm.models.load_model or its tokenizer."
            )
    bos, eos = getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None)
    if bos is None and eos is None:
        raise ValueError(
            f"Tokenizer {getattr(tok, 'name_or_path', type(tok).__name__)!r} has neither a BOS nor "
            "an EOS token id; set tokenizer.bos_token / eos_token before building token rows."
        )
    bos = eos if bos is None else bos
    eos = bos if eos is None else eos
    return tok, int(bos), int(eos)


def _is_hf(tok: Any) -> bool:
    from transformers import PreTrainedTokenizerBase  # slow to import; needed only for HF tokenizers

    return isinstance(tok, PreTrainedTokenizerBase)


def _encode_batch(tok: Any, texts: list[str]) -> list[list[int]]:
    if _is_hf(tok):
        # Batched call of the fast (Rust) tokenizer; no special tokens, no length warning.
        return tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
    out = []
    for text in texts:
        try:
            ids = tok.encode(text, add_special_tokens=False)
        except TypeError:
            ids = tok.encode(text)
        out.append(list(ids))
    return out


def tokenizer_fingerprint(model_or_tokenizer: Any) -> str:
    """Stable id of a tokenizer's behaviour, used to key token caches (``tok-<hash>``).

    Hashes the vocabulary (when the tokenizer exposes ``get_vocab``), the special token ids and
    the encoding of a probe string, not the name or path: the same tokenizer loaded from a GGUF
    file, a hub name or a local folder shares one cache.
    """
    tok, bos, eos = resolve_tokenizer(model_or_tokenizer)
    h = hashlib.sha256()
    get_vocab = getattr(tok, "get_vocab", None)
    if callable(get_vocab):
        h.update(json.dumps(sorted(get_vocab().items()), ensure_ascii=False).encode("utf-8"))
    h.update(json.dumps([bos, eos, _encode_batch(tok, [_PROBE])[0]]).encode())
    return f"tok-{h.hexdigest()[:12]}"


# ---------------------------------------------------------------------------------------------
# Token rows


def _batched(it: Iterable[str], n: int) -> Iterator[list[str]]:
    buf: list[str] = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2 (BOS plus at least one token), got {seq_len!r}")


def iter_token_rows(
    model_or_tokenizer: Any,
    corpus: str | os.PathLike = "openwebtext",
    *,
    split: str = "train",
    seq_len: int = 128,
    batch_size: int = 64,
    docs_per_batch: int = 64,
) -> Iterator[torch.Tensor]:
    """Stream rows as ``LongTensor[<= batch_size, seq_len]`` without materialising the corpus.

    Rows are built exactly as in :func:`token_rows` (EOS after every document, BOS then
    ``seq_len - 1`` stream tokens per row) but come in corpus order, unshuffled; the trailing
    partial row is dropped. Suited to ``"openwebtext"`` (itself in random order) and its stand-in.
    """
    _check_seq_len(seq_len)
    tok, bos, eos = resolve_tokenizer(model_or_tokenizer)
    body = seq_len - 1
    carry: list[int] = []
    rows: list[list[int]] = []
    for texts in _batched(load_texts(corpus, split=split), docs_per_batch):
        for ids in _encode_batch(tok, texts):
            carry.extend(ids)
            carry.append(eos)
        n_full = len(carry) // body
        for r in range(n_full):
            rows.append([bos] + carry[r * body : (r + 1) * body])
        carry = carry[n_full * body :]
        while len(rows) >= batch_size:
            yield torch.tensor(rows[:batch_size], dtype=torch.long)
            rows = rows[batch_size:]
    if rows:
        yield torch.tensor(rows, dtype=torch.long)


def _build_rows(tok: Any, bos: int, eos: int, corpus, split: str, seq_len: int,
                max_rows: int | None, progress: bool) -> tuple[np.ndarray, int]:
    """Unshuffled rows ``int32[n_rows, seq_len]`` of a split and the stream length in tokens."""
    body = seq_len - 1
    chunks: list[np.ndarray] = []
    n_stream = 0
    bar = tqdm(desc=f"tokenizing {Path(str(corpus)).name}/{split}", unit=" docs", disable=not progress)
    for texts in _batched(load_texts(corpus, split=split), 256):
        for ids in _encode_batch(tok, texts):
            arr = np.empty(len(ids) + 1, dtype=np.int32)
            arr[:-1] = ids
            arr[-1] = eos
            chunks.append(arr)
            n_stream += arr.size
        bar.update(len(texts))
        if max_rows is not None and n_stream >= max_rows * body:
            break
    bar.close()
    stream = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    n_rows = stream.size // body
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    rows = np.empty((n_rows, seq_len), dtype=np.int32)
    rows[:, 0] = bos
    rows[:, 1:] = stream[: n_rows * body].reshape(n_rows, body)
    return rows, int(stream.size)


def _atomic_save(path: Path, arr: np.ndarray, meta: dict) -> None:
    """Write ``meta`` (``.json``) then ``arr`` (``.npy``) atomically; the ``.npy`` marks completion."""
    atomic_write_json(path.with_suffix(".json"), meta)
    with atomic_path(path, suffix=".npy.tmp") as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def token_rows(
    model_or_tokenizer: Any,
    corpus: str | os.PathLike = "embedded",
    *,
    split: str = "train",
    n_tokens: int | None = None,
    seq_len: int = 128,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = "default",
    progress: bool = True,
) -> torch.Tensor:
    """Token rows ``LongTensor[n_rows, seq_len]`` of a corpus split, shuffled by ``seed``.

    Every row is BOS followed by ``seq_len - 1`` consecutive tokens of the split's token stream
    (each document's tokens followed by EOS, documents in corpus order). Rows never overlap and
    only the trailing partial row of the stream is dropped.

    Args:
        model_or_tokenizer: see :func:`resolve_tokenizer` (fast Hugging Face tokenizers are batched).
        corpus, split: see :func:`load_texts`.
        n_tokens: total tokens wanted, BOS included: returns ``ceil(n_tokens / seq_len)`` rows,
            the first ones of the seeded order (so a larger ``n_tokens`` extends a smaller one).
            ``None`` returns every row (not allowed for the streamed ``"openwebtext"`` and its stand-in).
        seq_len: row length, BOS included.
        seed: seed of the row order.
        cache_dir: folder of the on-disk row cache; ``"default"`` is ``data/tokens``, ``None``
            disables caching. Caches hold all rows of a split, unshuffled.
        progress: show a tqdm bar while tokenizing.

    Raises:
        ValueError: the split holds fewer tokens than requested (the message gives both counts).
    """
    _check_split(split)
    _check_seq_len(seq_len)
    if n_tokens is not None and (not isinstance(n_tokens, int) or n_tokens < 1):
        raise ValueError(f"n_tokens must be a positive int or None, got {n_tokens!r}")
    tok, bos, eos = resolve_tokenizer(model_or_tokenizer)
    kind, path = _corpus_source(corpus)
    n_wanted = None if n_tokens is None else -(-n_tokens // seq_len)
    if kind in STREAM_CORPORA and n_wanted is None:
        raise ValueError(f"corpus={kind!r} is a stream: pass n_tokens, or use iter_token_rows().")

    tag = kind if kind in NAMED_CORPORA else re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem)[:40]
    key = f"{tag}-{corpus_checksum(corpus)[:12]}-L{seq_len}-{split}"
    if kind in STREAM_CORPORA:
        key += f"-n{n_wanted}"  # a stream has no end: the cache holds exactly what was read
    cache = None
    if cache_dir is not None:
        base = data_dir() / "tokens" if cache_dir == "default" else Path(cache_dir)
        cache = base / tokenizer_fingerprint(tok) / f"{key}.npy"

    rows = None
    if cache is not None and cache.exists():
        try:  # a cache is derived data: an unreadable one is rebuilt (never unpickled: allow_pickle=False)
            rows = np.load(cache, mmap_mode="r", allow_pickle=False)
            if rows.ndim != 2 or rows.shape[1] != seq_len or not np.issubdtype(rows.dtype, np.integer):
                raise ValueError(f"holds {rows.dtype} {rows.shape}, expected integer rows of {seq_len}")
            meta_path = cache.with_suffix(".json")
            n_stream = int(json.loads(meta_path.read_text())["n_stream_tokens"]) if meta_path.exists() else None
        except (ValueError, OSError, KeyError, TypeError, EOFError) as e:
            warnings.warn(f"The token cache {cache} is unreadable ({e}); rebuilding it.", stacklevel=2)
            rows = None
    if rows is None:
        max_rows = n_wanted if kind in STREAM_CORPORA else None
        rows, n_stream = _build_rows(tok, bos, eos, corpus, split, seq_len, max_rows, progress)
        if cache is not None and len(rows):
            try:
                _atomic_save(cache, rows, {
                    "corpus": str(corpus), "split": split, "seq_len": seq_len,
                    "tokenizer": str(getattr(tok, "name_or_path", type(tok).__name__)),
                    "bos": bos, "eos": eos, "n_rows": int(len(rows)), "n_stream_tokens": n_stream,
                })
            except OSError as e:  # read-only or full disk: the rows are still right, only not cached
                warnings.warn(f"Could not write the token cache {cache} ({e}); continuing without it. "
                              "Pass cache_dir= a writable folder (or None) to silence this.", stacklevel=2)

    n_rows = len(rows)
    need = n_wanted if n_wanted is not None else 1
    if n_rows < need:
        found = f"{n_stream} tokens" if n_stream is not None else f"{n_rows * (seq_len - 1)} tokens"
        asked = f"{n_tokens} tokens ({need} rows of {seq_len})" if n_tokens else f"at least {seq_len - 1} tokens (one row)"
        raise ValueError(
            f"Corpus {str(corpus)!r} split {split!r} is too short: found {found} "
            f"({n_rows} rows of BOS + {seq_len - 1}), needed {asked}. Use a smaller n_tokens or "
            "seq_len, split='all', or a larger corpus."
        )
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_rows, generator=g)[:need if n_wanted is not None else n_rows].numpy()
    # Read the needed rows in file order (fast on a memmap), then put them in the seeded order.
    sorted_idx = np.sort(order)
    picked = np.asarray(rows[sorted_idx])
    picked = picked[np.searchsorted(sorted_idx, order)]
    return torch.from_numpy(picked.astype(np.int64))
