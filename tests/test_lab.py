"""JupyterLab after a run: every chapter opens through Jupytext's contents manager, as Lab does it."""

import asyncio
import json

import pytest
from jupytext import AsyncTextFileContentsManager

from saelib import book
from tests.book_helpers import ci_book


def _get(path: str) -> dict:
    """``GET /api/contents/<path>`` as JupyterLab issues it: Jupytext's async contents manager
    (the one ``jupyter lab`` uses with jupyter_server 2), rooted at the repository."""
    cm = AsyncTextFileContentsManager(root_dir=str(book.repo_root()))
    return asyncio.run(cm.get(path, content=True))


@pytest.mark.parametrize("stem", book.chapters())
def test_every_chapter_opens_in_lab_after_a_run(stem):
    folder = ci_book()
    model = _get(f"notebooks/{stem}.md")
    assert model["type"] == "notebook"
    cells = model["content"]["cells"]
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in cells), stem
    assert not any(c["metadata"].get("tags") == [] for c in cells), stem
    # the run wrote nothing next to the sources: no .ipynb newer than the last run's start
    started = json.loads((folder / "timings.json").read_text())["_last_run_started"]
    twin = book.repo_root() / "notebooks" / f"{stem}.ipynb"
    assert not twin.exists() or twin.stat().st_mtime < started, f"the run wrote {twin}"
    # the executed copy opens too (it is not a Jupytext pair)
    executed = _get(str((folder / "executed" / f"{stem}.ipynb").relative_to(book.repo_root())))
    assert executed["type"] == "notebook"
