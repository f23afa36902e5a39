"""Every result number in a chapter's prose comes from that chapter's run.

Results belong in outputs: a chapter prints them, or writes its prose with computed markdown
(``IPython.display.Markdown``), so that they change when the run changes. This test reads each
chapter's markdown cells and flags every *result-like* number in them (decimals such as 3.780,
percentages such as 87.5%, and comma-grouped numbers such as 5,088) unless it is

1. a parameter of the chapter (a literal of its parameters cell or of any profile's values),
2. an external number cited from :mod:`saelib.paper` (which names its source),
3. on the chapter's allow-list below (method constants such as a 95% interval, each with a reason), or
4. contained in an output of the chapter's executed notebook (``notebooks/<stem>.ipynb`` after
   ``python -m saelib.book run``), when one exists.

So on a fresh clone (no executed notebooks) literal results in prose fail, and after a run a
number in the prose must appear in that run's outputs. Plain integers are not checked (layer
indices, counts of seeds and cores read as words, and would drown the signal).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jupytext
import pytest
import yaml

from saelib import book, paper

NUM = re.compile(r"(?<![\w.,/-])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d+)(\s?%)?(?!\w)")

# Method constants and other non-result numbers, per chapter, with the reason they are allowed.
ALLOW: dict[str, dict[str, str]] = {
    "*": {
        "95%": "confidence level of every interval",
        "0.05": "significance level α of the t-tests",
        "10%": "tolerance on matched L0 / relative bands stated as criteria",
    },
    "02_theory": {"98%": "nominal level of the concentration band (a parameter of the figure)"},
    "07_synthetic": {"0.9": "cosine above which a true feature counts as found (a stated criterion)"},
}


def _clean(md: str) -> str:
    md = re.sub(r"```.*?```", " ", md, flags=re.S)
    md = re.sub(r"\$\$.*?\$\$", " ", md, flags=re.S)
    md = re.sub(r"\$[^$]*\$", " ", md)
    md = re.sub(r"`[^`]*`", " ", md)
    md = re.sub(r"\]\([^)]*\)", "]", md)
    md = re.sub(r"https?://\S+", " ", md)
    return re.sub(r"arXiv[: ]*\d{4}\.\d{4,5}(v\d)?", " ", md)


def result_numbers(markdown: str) -> list[str]:
    """The result-like numbers of a markdown text (see the module docstring)."""
    out = []
    for m in NUM.finditer(_clean(markdown)):
        tok, pct = m.group(1), m.group(2)
        if pct or "." in tok or "," in tok:
            out.append(tok + ("%" if pct else ""))
    return out


def _formats(v) -> set[str]:
    vals = v if isinstance(v, (tuple, list)) else (v,)
    out: set[str] = set()
    for x in vals:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            continue
        out |= {str(x), f"{x:g}", f"{x:,}"}
        if isinstance(x, float) and x < 1:
            out |= {f"{100 * x:g}%", f"{100 * x:.0f}%", f"{100 * x:.1f}%"}
        if isinstance(x, int):
            out.add(f"{x:,}")
    return out


def cited_numbers() -> set[str]:
    out: set[str] = set()
    for n in paper.NUMBERS.values():
        out |= _formats(n.value)
    return out


def parameter_numbers(stem: str) -> set[str]:
    nb = jupytext.read(book.repo_root() / "notebooks" / f"{stem}.md")
    out: set[str] = set()
    for c in nb.cells:
        if "parameters" in c.metadata.get("tags", []):
            out |= set(re.findall(r"\d[\d_]*(?:\.\d+)?(?:e-?\d+)?", c.source))
    for profile in book.PROFILES:
        for v in book.profile_parameters(profile, stem).values():
            out |= _formats(v) | {str(v)}
    return {x.replace("_", "") for x in out} | {f"{int(x.replace('_', '')):,}" for x in out if x.replace("_", "").isdigit()}


def executed_outputs(stem: str) -> str | None:
    """All text of the outputs of the main job's executed chapter (``make book``:
    ``_build/book/embedded/executed/<stem>.ipynb``), or None when it has not run. Without them (as
    in CI) every result number in the prose must be a parameter, a cited constant or allow-listed,
    so prose that states results must compute them (Markdown printed by a code cell)."""
    path = book.repo_root() / "_build" / "book" / "embedded" / "executed" / f"{stem}.ipynb"
    if not path.exists():
        return None
    nb = json.loads(path.read_text())
    parts = []
    for c in nb.get("cells", []):
        for o in c.get("outputs", []):
            if "text" in o:
                parts.append("".join(o["text"]))
            for mime in ("text/plain", "text/markdown", "text/html", "text/latex"):
                if mime in o.get("data", {}):
                    parts.append("".join(o["data"][mime]))
    return "\n".join(parts) if parts else None


def unsupported_numbers(stem: str) -> list[str]:
    nb = jupytext.read(book.repo_root() / "notebooks" / f"{stem}.md")
    allowed = set(ALLOW["*"]) | set(ALLOW.get(stem, {})) | cited_numbers() | parameter_numbers(stem)
    outputs = executed_outputs(stem)
    bad = []
    for c in nb.cells:
        if c.cell_type != "markdown":
            continue
        for tok in result_numbers(c.source):
            if tok in allowed or tok.replace(",", "") in allowed:
                continue
            bare = tok.rstrip("%")
            if outputs is not None and (bare in outputs or bare.replace(",", "") in outputs):
                continue
            bad.append(tok)
    return bad


def test_the_scanner_finds_result_numbers_and_skips_code_and_maths():
    md = "MSE 3.780 against 3.925; 87.5% of pairs; 5,088 bits; `k = 0.5`; $x = 2.5$; arXiv 2503.24277; 3 seeds"
    assert result_numbers(md) == ["3.780", "3.925", "87.5%", "5,088"]


def test_a_stated_result_without_an_output_fails(tmp_path, monkeypatch):
    nb = tmp_path / "notebooks"
    nb.mkdir()
    (nb / "99_x.md").write_text("---\njupytext:\n  text_representation:\n    format_name: myst\n---\n\n"
                                "The stitched path starts exactly at 3.925.\n\n```{code-cell} ipython3\n"
                                ":tags: [parameters]\ntheta = 0.7\n```\n")
    monkeypatch.setattr(book, "repo_root", lambda: tmp_path)
    monkeypatch.setattr(book, "profile_parameters", lambda profile, stem: {})
    assert unsupported_numbers("99_x") == ["3.925"]
    ipynb = {"cells": [{"cell_type": "code", "outputs": [{"output_type": "stream", "text": ["start 3.925\n"]}]}]}
    executed = tmp_path / "_build" / "book" / "embedded" / "executed"
    executed.mkdir(parents=True)
    (executed / "99_x.ipynb").write_text(json.dumps(ipynb))
    assert unsupported_numbers("99_x") == []


@pytest.mark.parametrize("stem", book.chapters())
def test_prose_numbers_come_from_the_run(stem):
    bad = unsupported_numbers(stem)
    assert not bad, (f"{stem}: the prose states {bad}, which is neither a parameter, a cited number of "
                     "saelib.paper, an allow-listed constant, nor in an output of the executed notebook. Print it "
                     "or write that sentence with computed markdown (IPython.display.Markdown).")
