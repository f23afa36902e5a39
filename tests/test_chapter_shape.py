"""Chapters call the library: no code cell longer than MAX_CODE_LINES lines of code, and no
function or class defined in a chapter (helpers belong in saelib, with tests).

The parameters cell is exempt from the length limit (one line per parameter is its purpose).
Lines of code: non-blank lines that are not only a comment.
"""

from __future__ import annotations

import ast

import jupytext
import pytest

from saelib import book

MAX_CODE_LINES = 25

# Cells still to move into the library, with where they go; remove a chapter once it passes
# (the xfail is strict, so a chapter that passes while listed here fails the suite).
PENDING: dict[str, str] = {}


def code_cells(stem: str) -> list[tuple[int, str, bool]]:
    """(cell index, source, is the parameters cell) of every code cell of a chapter."""
    nb = jupytext.read(book.repo_root() / "notebooks" / f"{stem}.md")
    return [(i, c.source, "parameters" in c.metadata.get("tags", [])) for i, c in enumerate(nb.cells)
            if c.cell_type == "code"]


def problems(source: str, is_parameters: bool = False) -> list[str]:
    """What breaks the rule in one cell's source (empty: the cell is fine)."""
    lines = [line for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]
    out = []
    if not is_parameters and len(lines) > MAX_CODE_LINES:
        out.append(f"{len(lines)} lines of code (at most {MAX_CODE_LINES}): move the work into saelib or split the cell")
    python = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    for node in ast.walk(ast.parse(python)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(f"defines {node.name!r} (line {node.lineno}): helpers belong in saelib, with tests")
        # a lambda with parameters bound to a name is a function too; zero-argument lambdas are lazy
        # values handed to the library (ensure_sweep's batches=) and stay
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda) and node.value.args.args:
            out.append(f"defines a function with a lambda (line {node.lineno}): helpers belong in saelib, with tests")
    return out


def test_the_checker_catches_long_cells_and_definitions():
    assert problems("x = 1\n\n# note\ny = 2") == []
    assert problems("\n".join(f"x{i} = {i}" for i in range(MAX_CODE_LINES + 1)))[0].startswith("26 lines")
    assert problems("\n".join(f"x{i} = {i}" for i in range(40)), is_parameters=True) == []
    assert "defines 'f'" in problems("if True:\n    def f():\n        return 1\n")[0]
    assert "defines 'C'" in problems("class C:\n    pass\n")[0]
    assert "lambda" in problems("f = lambda s: s.cfg\n")[0]
    assert problems("batches = lambda: iter(())\n") == []


@pytest.mark.parametrize("stem", [pytest.param(s, marks=pytest.mark.xfail(reason=PENDING[s], strict=True))
                                  if s in PENDING else s for s in book.chapters()])
def test_chapter_cells_are_short_and_define_nothing(stem):
    bad = [f"cell {i}: {p}" for i, src, par in code_cells(stem) for p in problems(src, par)]
    assert not bad, f"{stem}:\n" + "\n".join(bad)
