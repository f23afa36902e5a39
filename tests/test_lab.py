"""JupyterLab after a run: every chapter opens through Jupytext's contents manager, as Lab does it."""

import json

import pytest

from saelib import book
from tests.book_helpers import ci_book


def _contents_manager():
    from jupytext.contentsmanager import build_jupytext_contents_manager_class
    from jupyter_server.services.contents.largefilemanager import LargeFileManager

    cls = build_jupytext_contents_manager_class(LargeFileManager)
    return cls(root_dir=str(book.repo_root()))


@pytest.mark.parametrize("stem", book.chapters())
def test_every_chapter_opens_in_lab_after_a_run(stem):
    folder = ci_book()
    cm = _contents_manager()
    model = cm.get(f"notebooks/{stem}.md", content=True)
    assert model["type"] == "notebook"
    cells = model["content"]["cells"]
    assert not any("injected-parameters" in c["metadata"].get("tags", []) for c in cells), stem
    assert not any(c["metadata"].get("tags") == [] for c in cells), stem
    # the run wrote nothing next to the sources: no .ipynb newer than the last run's start
    started = json.loads((folder / "timings.json").read_text())["_last_run_started"]
    twin = book.repo_root() / "notebooks" / f"{stem}.ipynb"
    assert not twin.exists() or twin.stat().st_mtime < started, f"the run wrote {twin}"
    # the executed copy opens too (it is not a Jupytext pair)
    executed = cm.get(str((folder / "executed" / f"{stem}.ipynb").relative_to(book.repo_root())))
    assert executed["type"] == "notebook"
