"""Run the book: execute chapters with a papermill profile, build the MyST site and the offline HTML.

Command line (the Makefile calls these)::

    python -m saelib.book run --profile embedded          # execute every chapter, build the book
    python -m saelib.book run --profile ci --only 01_residual_stream --no-html
    python -m saelib.book run --profile ci --set seed=1    # a parameter for every chapter that has it
    python -m saelib.book prepare --profile ci --out DIR   # parameter-injected, unexecuted notebooks
    python -m saelib.book site --profile embedded          # rebuild the book from executed chapters
    python -m saelib.book screenshots --profile embedded   # open every page in headless Chromium

Chapters are the MyST-markdown notebooks ``notebooks/*.md`` listed in ``myst.yml``: the only
tracked sources. A run never writes into ``notebooks/``: each chapter is executed into
``_build/book/<profile>/executed/<stem>.ipynb``; ``myst build --site`` reads those, and the
offline HTML (``_build/book/<profile>/html/``) is rendered from MyST's site content (numbered
headings, figures, cross-references, admonitions, KaTeX maths) with KaTeX's stylesheet and fonts
vendored from npm (``node_modules/katex``). JupyterLab opens the ``.md`` sources, so a run never
makes a Jupytext pair inconsistent.

Parameters: every profile value and ``--set`` value is checked against the chapter's
``parameters`` cell (names and types) before any chapter runs, and is injected as a Python
literal. A direct ``papermill`` run is checked by the chapter's second code cell, which calls
:func:`check_parameters` right after papermill's injected cell.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from saelib.bookhtml import render_site
from saelib.io import atomic_write_text, load_yaml
from saelib.runs import (  # noqa: F401 - PROGRESS_ENV, check_parameters, runs_dir: the runner's API
    PROFILES,
    PROGRESS_ENV,
    ParameterError,
    chapter_source,
    chapters,
    check_parameters,
    parameter_defaults,
    parameters_cell,
    rel,
    repo_root,
    runs_dir,
    validate_parameters,
)


# `myst build --site` asks the network for the book theme's metadata. Offline, a stub theme is
# placed where mystmd caches downloaded themes, inside the generated project folder.
_STUB_THEME = """myst: v1
kind: site
title: Offline content build
description: Stand-in used only while building the site content offline
version: 0.0.0
"""


def profile_name(profile: str | Path) -> str:
    """A folder-safe name for a profile (its name, or the name of a parameter folder)."""
    return Path(profile).name if Path(profile).is_dir() else str(profile)


def profile_file(profile: str | Path, stem: str) -> Path:
    folder = Path(profile)
    if not folder.is_dir():
        if str(profile) not in PROFILES:
            raise ValueError(
                f"Unknown profile {profile!r}: use one of {', '.join(PROFILES)} "
                "or a folder of <chapter>.yaml parameter files."
            )
        folder = repo_root() / "profiles" / str(profile)
    return folder / f"{stem}.yaml"


def profile_parameters(profile: str | Path, stem: str) -> dict:
    """Parameters for one chapter: ``profiles/<profile>/<stem>.yaml``, or a folder given by path."""
    path = profile_file(profile, stem)
    if not path.exists():
        return {}
    params = load_yaml(path) or {}  # a syntax error names this file, line and column
    if not isinstance(params, dict):
        raise ValueError(f"{rel(path)} must hold a mapping of parameter names to values.")
    return params


# ---------------------------------------------------------------------------------------------
# Parameters: literal injection


def _literal(value) -> str:
    """Python source of a checked YAML value; round-trips through ``ast.literal_eval``."""
    src = repr(value)
    if ast.literal_eval(src) != value:  # pragma: no cover - repr of plain literals round-trips
        raise ParameterError(f"cannot write {value!r} as a Python literal")
    return src


def injected_notebook(stem: str, params: dict, where: str):
    """The chapter as a notebook with ``params`` checked and injected as literals after its parameters cell."""
    import jupytext
    import nbformat

    validate_parameters(stem, params, where)
    src = chapter_source(stem)
    nb = jupytext.read(src)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata.pop("jupytext", None)  # the executed copy is not a Jupytext pair
    nb.metadata["papermill"] = {"parameters": params}
    i = parameters_cell(nb, rel(src))
    if params:
        lines = [f"# Parameters from {where}"] + [f"{k} = {_literal(v)}" for k, v in params.items()]
        cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
        nb.cells.insert(i + 1, cell)
    return nb


def parse_overrides(items: list[str] | None) -> dict:
    """``--set name=value`` pairs; values are read as YAML (numbers, booleans, lists, strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ParameterError(f"--set {item!r}: write NAME=VALUE, e.g. --set seed=1")
        name, value = item.split("=", 1)
        try:
            out[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ParameterError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
    return out


def chapter_parameters(profile: str | Path, stem: str, overrides: dict | None = None) -> tuple[dict, str]:
    """Checked parameters of one chapter: its profile file, then ``--set`` values it accepts."""
    path = profile_file(profile, stem)
    params = profile_parameters(profile, stem)
    validate_parameters(stem, params, rel(path))
    where = rel(path)
    if overrides:
        defaults = parameter_defaults(stem)
        mine = {k: v for k, v in overrides.items() if k in defaults}
        validate_parameters(stem, mine, "--set", defaults)
        params = {**params, **mine}
        where += " and --set" if mine else ""
    return params, where


def _check_run(profile, stems, overrides) -> dict[str, tuple[dict, str]]:
    """Every chapter's parameters, checked before the first chapter starts."""
    plan = {stem: chapter_parameters(profile, stem, overrides) for stem in stems}
    if overrides:
        known = set().union(*(parameter_defaults(s) for s in stems))
        unknown = set(overrides) - known
        if unknown:
            name = sorted(unknown)[0]
            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise ParameterError(
                f"--set: {name!r} is not a parameter of any chapter in this run"
                + (f". Did you mean {close[0]!r}?" if close else ".")
            )
    return plan


# ---------------------------------------------------------------------------------------------
# Running chapters


def book_dir(profile: str | Path) -> Path:
    """Where a profile's executed chapters, site content, HTML and screenshots go."""
    return repo_root() / "_build" / "book" / profile_name(profile)


def prepare(profile: str, out: Path, only: list[str] | None = None, overrides: dict | None = None) -> list[Path]:
    """Write parameter-injected, unexecuted notebooks to ``out``."""
    import nbformat

    stems = only or chapters()
    plan = _check_run(profile, stems, overrides)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in stems:
        params, where = plan[stem]
        target = out / f"{stem}.ipynb"
        atomic_write_text(target, nbformat.writes(injected_notebook(stem, params, where)))
        written.append(target)
    return written


def run(profile: str, only: list[str] | None = None, html: bool = True,
        overrides: dict | None = None) -> dict[str, float]:
    """Execute chapters with ``profile`` into ``_build/book/<profile>/executed``; build the book."""
    import nbformat
    import papermill

    stems = only or chapters()
    plan = _check_run(profile, stems, overrides)  # every parameter checked before anything runs
    out = book_dir(profile) / "executed"
    out.mkdir(parents=True, exist_ok=True)
    os.environ[PROGRESS_ENV] = "1"
    timings: dict[str, float] = {}
    t0 = time.time()
    previous = _previous_timings(profile)
    for i, stem in enumerate(stems, 1):
        params, where = plan[stem]
        left = [previous.get(s) for s in stems[i - 1:]]
        eta = f"; about {sum(left) / 60:.0f} min left (last run)" if all(left) else ""
        print(f"[{i}/{len(stems)}] {stem}  (profile {profile_name(profile)}{eta})", flush=True)
        start = time.perf_counter()
        target = out / f"{stem}.ipynb"
        tmp = out / f".{stem}.running.ipynb"
        atomic_write_text(tmp, nbformat.writes(injected_notebook(stem, params, where)))
        try:
            papermill.execute_notebook(
                str(tmp), str(tmp), kernel_name="python3", cwd=str(repo_root() / "notebooks"),
                progress_bar=False, log_output=False,
                # the kernel's fd 2 stays the runner's stderr: library progress bars go there
                extra_arguments=["--IPKernelApp.capture_fd_output=False", "--IPKernelApp.log_level=CRITICAL"],
            )
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except Exception:
            failed = repo_root() / "_build" / "failed" / f"{stem}.ipynb"
            failed.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.move(tmp, failed)
            print(f"Chapter {stem} failed; the partly executed notebook is {rel(failed)}", file=sys.stderr)
            raise
        timings[stem] = time.perf_counter() - start
        print(f"    done in {timings[stem]:.0f} s; {count_figures(target)} figures", flush=True)
    _record_timings(profile, timings, started=t0)
    if html:
        build_site(profile)
    return timings


def _previous_timings(profile) -> dict[str, float]:
    path = book_dir(profile) / "timings.json"
    try:
        return {k: float(v) for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    except (OSError, ValueError, AttributeError):
        return {}


def count_figures(ipynb: Path) -> int:
    """Image outputs in an executed notebook."""
    import nbformat

    nb = nbformat.read(ipynb, as_version=4)
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def _record_timings(profile, timings: dict[str, float], started: float) -> None:
    path = book_dir(profile) / "timings.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update({k: round(v, 1) for k, v in timings.items()})
    old["_last_run_started"] = started
    atomic_write_text(path, json.dumps(old, indent=2) + "\n")
    total = sum(timings.values())
    print(f"Executed {len(timings)} chapter(s) in {total / 60:.1f} min: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


# ---------------------------------------------------------------------------------------------
# MyST site content and the offline HTML


def _myst_project(profile) -> Path:
    """A MyST project over the executed chapters: the root ``myst.yml`` with its toc re-pointed."""
    root_cfg = yaml.safe_load((repo_root() / "myst.yml").read_text())
    folder = book_dir(profile)

    def repoint(entries):
        kept = []
        for entry in entries:
            if "file" in entry:
                entry["file"] = f"executed/{Path(entry['file']).stem}.ipynb"
                if not (folder / entry["file"]).exists():
                    continue
            if "children" in entry:
                entry["children"] = repoint(entry["children"])
                if not entry["children"] and "file" not in entry:
                    continue
            kept.append(entry)
        return kept

    project = root_cfg["project"]
    project["toc"] = repoint(project["toc"])
    project.pop("exclude", None)
    project["exclude"] = ["_build/**", "html/**"]
    cfg = {"version": 1, "project": project, "site": root_cfg.get("site", {"template": "book-theme"})}
    atomic_write_text(folder / "myst.yml", yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return folder


def build_site(profile: str = "embedded") -> Path:
    """``myst build --site`` offline over the executed chapters, then the offline HTML book."""
    myst = shutil.which("myst", path=str(Path(sys.executable).parent)) or shutil.which("myst")
    if myst is None:
        raise FileNotFoundError("The `myst` command is missing: run `make setup` (it installs mystmd).")
    folder = book_dir(profile)
    missing = [s for s in chapters() if not (folder / "executed" / f"{s}.ipynb").exists()]
    if len(missing) == len(chapters()):
        raise FileNotFoundError(
            f"No chapter has been executed for profile {profile_name(profile)}: "
            f"run `python -m saelib.book run --profile {profile_name(profile)}` first."
        )
    if missing:
        print(f"The book leaves out chapters not executed for this profile: {', '.join(missing)}")
    _myst_project(profile)
    theme = folder / "_build" / "templates" / "site" / "myst" / "book-theme"
    theme.mkdir(parents=True, exist_ok=True)
    (theme / "template.yml").write_text(_STUB_THEME)
    shutil.rmtree(folder / "_build" / "site", ignore_errors=True)
    env = {**os.environ, "NO_UPDATE_NOTIFIER": "1", "CI": "1"}
    proc = subprocess.run([myst, "build", "--site"], cwd=folder, env=env, capture_output=True, text=True)
    noise = re.compile(r"building myst-cli session|Update available|pip install -U mystmd|Follow @mystmd|bsky\.app|^[\s│╭╮╰╯─]*$")
    for line in (proc.stdout + proc.stderr).splitlines():
        if not noise.search(line):
            print(line)
    if proc.returncode:
        raise RuntimeError(f"`myst build --site` failed in {rel(folder)} (exit {proc.returncode}).")
    html_dir = render_html(folder)
    print(f"MyST site content in {rel(folder / '_build' / 'site')}; offline HTML in {rel(html_dir / 'index.html')}")
    return html_dir


def render_html(folder: Path) -> Path:
    """Render MyST's site content (``_build/site``) as a static, offline HTML book."""
    return render_site(folder / "_build" / "site", folder / "html", repo_root() / "node_modules" / "katex" / "dist")


def screenshots(profile: str = "embedded", out: Path | None = None) -> dict:
    """Open every page of the HTML book in headless Chromium; screenshots and a JSON report."""
    html_dir = book_dir(profile) / "html"
    out = out or repo_root() / "_build" / "screenshots" / profile_name(profile)
    script = repo_root() / "scripts" / "browse_book.js"
    if not (repo_root() / "node_modules" / "puppeteer-core").exists():
        raise FileNotFoundError("node_modules/puppeteer-core is missing: run `make setup` (npm ci).")
    proc = subprocess.run(["node", str(script), str(html_dir), str(out)], capture_output=True, text=True,
                          cwd=repo_root(), timeout=600)
    if proc.returncode:
        raise RuntimeError(f"browser run failed: {proc.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    for page in report["pages"]:
        print(f"  {page['file']:<24} images {page['images']:>3}  problems {len(page['problems'])}")
    return report


def pdf(profile: str = "embedded") -> Path:
    """The whole book as one PDF, printed by headless Chromium from the offline HTML (maths, figures)."""
    html_dir = book_dir(profile) / "html"
    if not (html_dir / "print.html").exists():
        raise FileNotFoundError(f"{rel(html_dir / 'print.html')} is missing: build the book first (`make book`).")
    target = book_dir(profile) / "book.pdf"
    subprocess.run(["node", str(repo_root() / "scripts" / "browse_book.js"), "--pdf", str(html_dir / "print.html"),
                    str(target)], check=True, cwd=repo_root(), timeout=600)
    print(f"PDF: {rel(target)} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saelib.book", description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="execute chapters with a profile, then build the book", allow_abbrev=False)
    p_run.add_argument("--profile", default="embedded")
    p_run.add_argument("--only", nargs="*", help="chapter stems (default: all, in toc order)")
    p_run.add_argument("--set", action="append", metavar="NAME=VALUE", help="a parameter for every chapter that has it")
    p_run.add_argument("--no-html", action="store_true", help="skip the MyST site and the offline HTML")
    p_prep = sub.add_parser("prepare", help="parameter-injected notebooks", allow_abbrev=False)
    p_prep.add_argument("--profile", default="ci")
    p_prep.add_argument("--out", type=Path, default=repo_root() / "_build" / "ci-notebooks")
    p_prep.add_argument("--only", nargs="*")
    p_prep.add_argument("--set", action="append", metavar="NAME=VALUE")
    p_site = sub.add_parser("site", help="offline `myst build --site` and HTML of executed chapters", allow_abbrev=False)
    p_site.add_argument("--profile", default="embedded")
    p_shot = sub.add_parser("screenshots", help="open every page in headless Chromium", allow_abbrev=False)
    p_shot.add_argument("--profile", default="embedded")
    p_pdf = sub.add_parser("pdf", help="the book as one PDF (headless Chromium)", allow_abbrev=False)
    p_pdf.add_argument("--profile", default="embedded")
    sub.add_parser("list", help="print the chapters in order")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            if args.only:
                unknown = [s for s in args.only if s not in chapters()]
                if unknown:
                    parser.error(f"--only: unknown chapter {unknown[0]!r}; chapters: {', '.join(chapters())}")
            run(args.profile, args.only, html=not args.no_html, overrides=parse_overrides(args.set))
        elif args.cmd == "prepare":
            for path in prepare(args.profile, args.out, args.only, parse_overrides(args.set)):
                print(rel(path))
        elif args.cmd == "site":
            build_site(args.profile)
        elif args.cmd == "pdf":
            pdf(args.profile)
        elif args.cmd == "screenshots":
            report = screenshots(args.profile)
            if any(p["problems"] for p in report["pages"]):
                sys.exit("the browser found problems; see the report above")
        else:
            print("\n".join(chapters()))
    except ParameterError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
