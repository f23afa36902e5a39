"""Shared by the tests that read the book built from the ci run (`make test` builds it first)."""

import os
from pathlib import Path

import nbformat
import pytest

from saelib import book


def ci_book() -> Path:
    """The ci book's folder; skips when it was not built, fails when `make test` said it must exist."""
    folder = book.book_dir("ci")
    missing = [s for s in book.chapters() if not (folder / "executed" / f"{s}.ipynb").exists()]
    if missing:
        msg = (f"chapters {', '.join(missing)} were not executed on the ci profile: "
               "run `python -m saelib.book run --profile ci` (make test does)")
        if os.environ.get("SAELIB_REQUIRE_BOOK"):
            pytest.fail(msg)
        pytest.skip(msg)
    return folder


def executed(stem: str):
    return nbformat.read(ci_book() / "executed" / f"{stem}.ipynb", as_version=4)
