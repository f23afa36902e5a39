"""The offline HTML book, rendered from MyST's site content (``myst build --site``).

MyST parses the chapters, numbers headings, figures and equations, resolves cross-references and
renders every maths span with KaTeX at build time (``node.html``). This module only turns that
tree (mdast JSON under ``_build/site/content``) into static pages with previous / next / index
links, copies the figures MyST extracted (``_build/site/public``), and vendors KaTeX's stylesheet
and fonts from ``node_modules/katex/dist`` (npm), so nothing is loaded from a CDN.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

from bs4 import BeautifulSoup
from markdown_it import MarkdownIt

from saelib.io import atomic_write_text

esc = html.escape
MAX_TABLE_COLUMNS = 12  # wider DataFrame tables keep their first and last columns, as pandas does

_CSS = """
body { font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d2330;
       max-width: 980px; margin: 0 auto; padding: 0 24px 48px; }
nav.bar { display: flex; justify-content: space-between; gap: 12px; padding: 10px 0;
          border-bottom: 1px solid #dde; font-size: 14px; }
nav.bar.bottom { border-top: 1px solid #dde; border-bottom: 0; margin-top: 32px; }
nav.bar a { color: #2457a6; text-decoration: none; }
h1 { font-size: 1.9em; margin-top: .6em; } h2 { margin-top: 1.6em; } .enum { color: #667; margin-right: .35em; }
a { color: #2457a6; }
pre { background: #f6f7f9; padding: 8px 10px; overflow-x: auto; font-size: 13px; line-height: 1.4;
      border-radius: 4px; }
pre.code { border-left: 3px solid #9ab; }
pre.stream, pre.text { background: #fff; border: 1px solid #eee; }
pre.error { background: #fff0f0; }
code { font-size: 0.92em; }
.output img { max-width: min(100%, 860px); height: auto; display: block; margin: 6px 0; }
.output .html { overflow-x: auto; }
.output table, .md-table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
.output th, .output td, .md-table th, .md-table td { border: 1px solid #dde; padding: 2px 6px; text-align: right; }
.table-wrap { overflow-x: auto; }
.note-cut { font-size: 12px; color: #667; }
.admonition { border-left: 4px solid #2457a6; background: #f3f6fc; padding: 4px 14px; margin: 14px 0; border-radius: 3px; }
.admonition.warning, .admonition.caution, .admonition.attention { border-color: #c77700; background: #fff8ec; }
.admonition.important, .admonition.danger, .admonition.error { border-color: #b42318; background: #fff1f0; }
.admonition.tip, .admonition.hint, .admonition.seealso { border-color: #2e7d32; background: #f1f8f2; }
.admonition-title { font-weight: 600; margin: 6px 0; }
figure { margin: 18px 0; } figure img { max-width: 100%; } figcaption { font-size: 14px; color: #333; }
.caption-number { font-weight: 600; margin-right: .3em; }
.katex-display { overflow-x: auto; overflow-y: hidden; padding: 2px 0; }
ul.toc { list-style: none; padding-left: 0; } ul.toc li { margin: 6px 0; }
ul.toc li.part { font-weight: 600; margin-top: 16px; color: #445; }
blockquote { border-left: 3px solid #ccd; margin-left: 0; padding-left: 12px; color: #444; }
"""


# MyST node types rendered as a fixed tag around their children, and those rendered as a constant
_WRAP = {
    "paragraph": ("<p>", "</p>\n"),
    "emphasis": ("<em>", "</em>"),
    "strong": ("<strong>", "</strong>"),
    "delete": ("<del>", "</del>"),
    "subscript": ("<sub>", "</sub>"),
    "superscript": ("<sup>", "</sup>"),
    "blockquote": ("<blockquote>", "</blockquote>\n"),
    "listItem": ("<li>", "</li>\n"),
    "table": ('<div class="table-wrap"><table class="md-table">', "</table></div>\n"),
    "tableRow": ("<tr>", "</tr>"),
    "admonitionTitle": ('<p class="admonition-title">', "</p>\n"),
    "caption": ("<figcaption>", "</figcaption>"),
    "legend": ('<div class="legend">', "</div>"),
    "captionNumber": ('<span class="caption-number">', "</span>"),
}
_CONST = {"break": "<br>", "thematicBreak": "<hr>\n", "comment": "", "mystTarget": ""}


class _Renderer:
    def __init__(self, slug_to_file: dict[str, str], public_prefix: str = "public/"):
        self.slug_to_file = slug_to_file
        self.public = public_prefix
        self.footnotes: list[str] = []
        self.chapter: int | None = None  # sections are numbered <chapter>.<MyST's section number>
        self.figures = 0  # figure outputs so far on this page: Figure <chapter>.<n>

    # --- helpers --------------------------------------------------------------------------
    def children(self, node) -> str:
        return "".join(self.node(c) for c in node.get("children", []))

    def url(self, url: str) -> str:
        if not url:
            return "#"
        if re.match(r"^[a-z]+:", url) or url.startswith("#"):
            return url
        if url.startswith("/"):
            path, _, frag = url[1:].partition("#")
            if path in self.slug_to_file:
                return self.slug_to_file[path] + (f"#{frag}" if frag else "")
            if "." in path:  # a file MyST copied to public/
                return self.public + path + (f"#{frag}" if frag else "")
        return url

    # --- nodes ----------------------------------------------------------------------------
    def node(self, n) -> str:
        t = str(n.get("type"))
        if t in _WRAP:
            return _WRAP[t][0] + self.children(n) + _WRAP[t][1]
        if t in _CONST:
            return _CONST[t]
        fn = getattr(self, "n_" + t, None)
        if fn is not None:
            return fn(n)
        if "children" in n:
            return self.children(n)
        return esc(str(n.get("value", "")))

    def n_text(self, n):
        return esc(n.get("value", ""))

    def n_heading(self, n):
        d = n.get("depth", 2)
        number = f"{self.chapter}.{n.get('enumerator')}" if self.chapter is not None else n.get("enumerator")
        enum = f'<span class="enum">{esc(number)}</span>' if n.get("enumerator") and n.get("enumerated", True) else ""
        hid = esc(n.get("html_id", n.get("identifier", "")))
        return f'<h{d} id="{hid}">{enum}{self.children(n)}</h{d}>\n'

    def n_inlineCode(self, n):
        return f"<code>{esc(n.get('value', ''))}</code>"

    def n_html(self, n):
        return n.get("value", "")

    def n_code(self, n):
        cls = "code" if n.get("executable") else "code listing"
        return f'<pre class="{cls}"><code>{esc(n.get("value", ""))}</code></pre>\n'

    def n_link(self, n):
        return f'<a href="{esc(self.url(n.get("url", "")))}">{self.children(n)}</a>'

    def n_crossReference(self, n):
        target = f"#{n.get('html_id') or n.get('identifier', '')}"
        if n.get("remote") and n.get("url"):
            target = self.url(n["url"]) + target
        return f'<a class="xref" href="{esc(target)}">{self.children(n)}</a>'

    def n_list(self, n):
        tag = "ol" if n.get("ordered") else "ul"
        start = f' start="{n["start"]}"' if n.get("ordered") and n.get("start") not in (None, 1) else ""
        return f"<{tag}{start}>{self.children(n)}</{tag}>\n"

    def n_tableCell(self, n):
        tag = "th" if n.get("header") else "td"
        align = f' style="text-align:{n["align"]}"' if n.get("align") else ""
        return f"<{tag}{align}>{self.children(n)}</{tag}>"

    def n_math(self, n):
        hid = f' id="{esc(n["html_id"])}"' if n.get("html_id") else ""
        body = n.get("html") or f"<pre>{esc(n.get('value', ''))}</pre>"
        num = f'<span class="eq-number">({esc(n["enumerator"])})</span>' if n.get("enumerator") and n.get("label") else ""
        return f'<div class="math"{hid}>{body}{num}</div>\n'

    def n_inlineMath(self, n):
        return n.get("html") or f"<code>{esc(n.get('value', ''))}</code>"

    def n_admonition(self, n):
        kind = esc(n.get("kind", "note"))
        return f'<aside class="admonition {kind}">{self.children(n)}</aside>\n'

    def n_container(self, n):
        hid = f' id="{esc(n["html_id"])}"' if n.get("html_id") else ""
        return f'<figure class="{esc(n.get("kind", "figure"))}"{hid}>{self.children(n)}</figure>\n'

    def n_image(self, n):
        return f'<img src="{esc(self.url(n.get("url", "")))}" alt="{esc(n.get("alt", "") or "")}">'

    def n_footnoteReference(self, n):
        ident = esc(n.get("identifier", ""))
        return f'<sup><a href="#fn-{ident}">{esc(str(n.get("enumerator", ident)))}</a></sup>'

    def n_footnoteDefinition(self, n):
        ident = esc(n.get("identifier", ""))
        self.footnotes.append(f'<li id="fn-{ident}">{self.children(n)}</li>')
        return ""

    def n_cite(self, n):
        return f"<span class=\"cite\">{self.children(n) or esc(n.get('label', ''))}</span>"

    def n_abbreviation(self, n):
        return f'<abbr title="{esc(n.get("title", ""))}">{self.children(n)}</abbr>'

    def n_block(self, n):
        return f'<div class="block {esc(n.get("kind", ""))}">{self.children(n)}</div>\n'

    def figure(self, url: str, caption: str) -> str:
        """An image output as a numbered figure: Figure <chapter>.<n> and its caption."""
        self.figures += 1
        number = f"{self.chapter}.{self.figures}" if self.chapter is not None else str(self.figures)
        return (f'<figure class="output" id="figure-{esc(number)}"><img src="{esc(url)}" alt="Figure {esc(number)}">'
                f'<figcaption><span class="caption-number">Figure {esc(number)}</span>{esc(caption)}</figcaption>'
                "</figure>\n")

    def n_outputs(self, n):
        # consecutive prints to one stream arrive as separate outputs: show them as one block
        merged = []
        for c in n.get("children", []):
            if c.get("type") != "output":
                continue
            data = c.get("jupyter_data") or {}
            prev = merged[-1].get("jupyter_data", {}) if merged else {}
            if (data.get("output_type") == "stream" and prev.get("output_type") == "stream"
                    and prev.get("name") == data.get("name")):
                text = data.get("text", "")
                prev["text"] = _text(prev.get("text", "")) + _text(text)
                continue
            merged.append({**c, "jupyter_data": dict(data)})
        return "".join(self.n_output(c) for c in merged)

    def n_output(self, n):
        data = n.get("jupyter_data") or {}
        kind = data.get("output_type")
        if kind == "stream":
            text = data.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            return f'<div class="output"><pre class="stream {esc(data.get("name", ""))}">{esc(_strip_ansi(text))}</pre></div>\n'
        if kind == "error":
            tb = _strip_ansi("\n".join(data.get("traceback", [])))
            return f'<div class="output"><pre class="error">{esc(tb)}</pre></div>\n'
        bundle = data.get("data", {})
        for mime in ("image/png", "image/jpeg", "image/svg+xml", "image/gif"):
            if mime in bundle:
                path = bundle[mime].get("path")
                if path:
                    return self.figure(self.url(path), (data.get("metadata") or {}).get("saelib", {}).get("caption", ""))
        if "text/html" in bundle:
            content = bundle["text/html"].get("content", "")
            if "application/vnd.jupyter.widget-view+json" in bundle or "<script" in content:
                content = ""  # widgets and scripts need a live kernel
            if content:
                return f'<div class="output"><div class="html">{cut_wide_tables(content)}</div></div>\n'
        if "text/markdown" in bundle:
            md = MarkdownIt("commonmark", {"html": False}).enable("table")
            body = md.render(bundle["text/markdown"].get("content", "")).replace("<table>", '<table class="md-table">')
            return f'<div class="output"><div class="markdown">{body}</div></div>\n'
        if "text/plain" in bundle:
            return f'<div class="output"><pre class="text">{esc(_strip_ansi(bundle["text/plain"].get("content", "")))}</pre></div>\n'
        return ""


def _text(text) -> str:
    return "".join(text) if isinstance(text, list) else str(text)


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


def cut_wide_tables(content: str, max_cols: int = MAX_TABLE_COLUMNS) -> str:
    """Cut HTML tables wider than ``max_cols`` to their first and last columns (an ellipsis between)."""
    if "<table" not in content:
        return content
    soup = BeautifulSoup(content, "html.parser")
    changed = False
    for table in soup.find_all("table"):
        rows = table.find_all("tr")
        width = max((len(r.find_all(["td", "th"], recursive=False)) for r in rows), default=0)
        if width <= max_cols:
            continue
        keep_head, keep_tail = max_cols // 2 + 1, max_cols // 2 - 1  # the index column counts in the head
        for r in rows:
            cells = r.find_all(["td", "th"], recursive=False)
            if len(cells) != width:
                continue
            for c in cells[keep_head:width - keep_tail]:
                c.decompose()
            gap = soup.new_tag(cells[0].name)
            gap.string = "…"
            cells[keep_head - 1].insert_after(gap)
        note = soup.new_tag("p", attrs={"class": "note-cut"})
        note.string = f"{width - keep_head - keep_tail} of {width} columns not shown; the notebook has them all."
        table.insert_after(note)
        changed = True
    return str(soup) if changed else content


def _page(title: str, body: str, nav: str, book_title: str) -> str:
    bottom = nav.replace('class="bar"', 'class="bar bottom"')
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{esc(title)} · {esc(book_title)}</title>"
        "<link rel=\"stylesheet\" href=\"katex/katex.min.css\"><link rel=\"stylesheet\" href=\"book.css\">"
        f"</head><body>{nav}<main>{body}</main>{bottom}</body></html>\n"
    )


def render_site(site: Path, out: Path, katex_dist: Path) -> Path:
    """Write ``out/index.html`` and one page per chapter from MyST site content at ``site``."""
    config = json.loads((site / "config.json").read_text())
    project = config["projects"][0]
    book_title = project.get("title", "Book")
    content = {p.stem: json.loads(p.read_text()) for p in (site / "content").glob("*.json")}
    # page order: the project's index page, then the pages list (MyST's toc order)
    order = [project.get("index", "index")] + [p["slug"] for p in project.get("pages", []) if p.get("slug")]
    order = [s for s in order if s in content]
    files = {slug: Path(content[slug].get("location", slug)).stem + ".html" for slug in order}
    if (out / "public").exists():
        shutil.rmtree(out / "public")
    out.mkdir(parents=True, exist_ok=True)
    if (site / "public").exists():
        shutil.copytree(site / "public", out / "public")
    if not (katex_dist / "katex.min.css").exists():
        raise FileNotFoundError(f"{katex_dist}/katex.min.css is missing: run `make setup` (npm ci installs KaTeX).")
    shutil.rmtree(out / "katex", ignore_errors=True)
    (out / "katex").mkdir()
    shutil.copy2(katex_dist / "katex.min.css", out / "katex" / "katex.min.css")
    shutil.copytree(katex_dist / "fonts", out / "katex" / "fonts")
    atomic_write_text(out / "book.css", _CSS)
    renderer = _Renderer({slug: files[slug] for slug in order} | {"": files[order[0]]} if order else {})
    bodies = []
    for i, slug in enumerate(order):
        page = content[slug]
        fm = page.get("frontmatter", {})
        title = fm.get("title", slug)
        renderer.footnotes = []
        num = re.match(r"\d+", files[slug])  # chapter number = the file's number, as on the contents page
        renderer.chapter = int(num.group()) if num else None
        renderer.figures = 0
        body = renderer.node(page["mdast"])
        if renderer.footnotes:
            body += "<hr><ol class=\"footnotes\">" + "".join(renderer.footnotes) + "</ol>"
        prev = f'<a rel="prev" href="{files[order[i - 1]]}">← {esc(content[order[i - 1]]["frontmatter"].get("title", ""))}</a>' if i else "<span></span>"
        nxt = f'<a rel="next" href="{files[order[i + 1]]}">{esc(content[order[i + 1]]["frontmatter"].get("title", ""))} →</a>' if i + 1 < len(order) else "<span></span>"
        nav = f'<nav class="bar">{prev}<a href="index.html">Contents</a>{nxt}</nav>'
        h1 = (f'<span class="enum">{int(num.group())}</span>' if num else "") + esc(title)
        atomic_write_text(out / files[slug], _page(title, f"<h1>{h1}</h1>\n{body}", nav, book_title))
        bodies.append(f'<section class="chapter"><h1>{esc(title)}</h1>\n{body}</section>')
    nav = '<nav class="bar"><span></span><span>Contents</span>' + (
        f'<a rel="next" href="{files[order[0]]}">Start reading →</a>' if order else "<span></span>") + "</nav>"
    desc = esc(project.get("description", "") or "")
    items = []
    parts = [project.get("index", "index")] + [p.get("slug") or {"part": p.get("title", "")}
                                                for p in project.get("pages", [])]
    for entry in parts:
        if isinstance(entry, dict):
            items.append(f'<li class="part">{esc(entry["part"])}</li>')
        elif entry in files:
            num = re.match(r"\d+", files[entry])  # chapter number = the file's number (00_…, 01_…)
            label = f'<span class="enum">{int(num.group())}</span>' if num else ""
            title = content[entry].get("frontmatter", {}).get("title", entry)
            items.append(f'<li>{label}<a href="{files[entry]}">{esc(title)}</a></li>')
    index = f"<h1>{esc(book_title)}</h1>\n<p>{desc}</p>\n<ul class=\"toc\">{''.join(items)}</ul>"
    atomic_write_text(out / "index.html", _page("Contents", index, nav, book_title))
    # every chapter on one page: what the PDF export prints (one chapter per printed page run)
    atomic_write_text(out / "print.html", _page(book_title, index + "".join(bodies), "", book_title).replace(
        "</head>", "<style>section.chapter { break-before: page; } pre { white-space: pre-wrap; }</style></head>"))
    return out
