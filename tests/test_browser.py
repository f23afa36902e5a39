"""A real browser reads the ci book: headless Chromium (npm @sparticuz/chromium + puppeteer-core).

Every page of the offline HTML book built from the ci run is opened; the test fails on a console
error, a request that fails or leaves the machine, an image that does not load, raw TeX left in the
text, or a link between pages that does not resolve. One screenshot per page is kept under
``_build/screenshots/ci/``.
"""

import json

import nbformat
from PIL import Image

from saelib import book
from tests.book_helpers import ci_book


def test_every_page_reads_in_a_real_browser():
    folder = ci_book()
    if not (folder / "html" / "index.html").exists():
        book.build_site("ci")
    report = book.screenshots("ci")
    pages = {p["file"]: p for p in report["pages"]}
    expected = {f"{s}.html" for s in book.chapters()} | {"index.html"}
    assert expected <= set(pages), f"pages missing: {expected - set(pages)}"
    problems = {f: p["problems"] for f, p in pages.items() if p["problems"]}
    assert not problems, json.dumps(problems, indent=1)[:4000]
    index_links = set(pages["index.html"]["links"])
    for stem in book.chapters():
        page = pages[f"{stem}.html"]
        assert f"{stem}.html" in index_links, f"the index does not link {stem}"
        nb = nbformat.read(folder / "executed" / f"{stem}.ipynb", as_version=4)
        n_png = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        assert page["images"] >= n_png, f"{stem}: {page['images']} images on the page, {n_png} in the notebook"
        assert "index.html" in page["links"], f"{stem} has no link back to the contents"
        assert (book.repo_root() / "_build" / "screenshots" / "ci" / f"{stem}.png").stat().st_size > 10_000
        # a tall page is captured in segments that together cover it (one capture would repeat its top)
        heights = [Image.open(p).size[1] for p in page["screenshots"]]
        assert max(heights) <= 4000 and sum(heights) == page["height"], (heights, page["height"])
    # previous / next links chain the chapters in toc order
    for a, b in zip(book.chapters(), book.chapters()[1:]):
        assert f"{b}.html" in pages[f"{a}.html"]["links"] and f"{a}.html" in pages[f"{b}.html"]["links"]
