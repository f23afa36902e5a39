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
import html as _html
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from saelib.io import atomic_write_text, load_yaml
from saelib.runs import repo_root, runs_dir

PROFILES = ("ci", "embedded", "gpt2", "smoke", "gpu")

# `myst build --site` asks the network for the book theme's metadata. Offline, a stub theme is
# placed where mystmd caches downloaded themes, inside the generated project folder.
_STUB_THEME = """myst: v1
kind: site
title: Offline content build
description: Stand-in used only while building the site content offline
version: 0.0.0
"""

# Environment variable set by the runner for its kernels: library progress bars then go to the
# runner's terminal (stderr), never into the executed pages.
PROGRESS_ENV = "SAELIB_TERMINAL_PROGRESS"


class ParameterError(ValueError):
    """A profile, command-line or papermill parameter that the chapter does not accept."""


def rel(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it (for printing)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def chapters() -> list[str]:
    """Chapter stems in table-of-contents order, read from ``myst.yml``."""
    toc = yaml.safe_load((repo_root() / "myst.yml").read_text())["project"]["toc"]
    stems = []

    def walk(entries):
        for entry in entries:
            if "file" in entry and entry["file"].startswith("notebooks/"):
                stems.append(Path(entry["file"]).stem)
            walk(entry.get("children", []))

    walk(toc)
    return stems


def chapter_source(stem: str) -> Path:
    src = repo_root() / "notebooks" / f"{stem}.md"
    if not src.exists():
        raise FileNotFoundError(f"Chapter source {rel(src)} is missing (listed in myst.yml).")
    return src


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
# Parameters: defaults from the chapter's parameters cell, checks, literal injection


def _parameters_cell(nb, where: str):
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{where} needs exactly one code cell tagged 'parameters' (found {len(tagged)}).")
    return tagged[0]


def parameter_defaults(stem: str) -> dict:
    """Names and default values of a chapter's ``parameters`` cell (plain literal assignments)."""
    import jupytext

    src = chapter_source(stem)
    nb = jupytext.read(src)
    cell = nb.cells[_parameters_cell(nb, rel(src))]
    defaults = {}
    for node in ast.parse(cell.source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)):
            raise ValueError(f"The parameters cell of {rel(src)} may hold only `name = literal` lines.")
        try:
            defaults[node.targets[0].id] = _constant(node.value)
        except ValueError:
            raise ValueError(f"{rel(src)}: parameter {node.targets[0].id} must default to a literal.") from None
    return defaults


_ARITH = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
          ast.Div: lambda a, b: a / b, ast.Pow: lambda a, b: a ** b, ast.FloorDiv: lambda a, b: a // b}


def _constant(node):
    """A literal, allowing constant arithmetic such as ``1 / 32`` (nothing is executed)."""
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_constant(node.left), _constant(node.right))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _constant(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_constant(e) for e in node.elts] if isinstance(node, ast.List) else tuple(_constant(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_constant(k): _constant(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


_LITERAL_TYPES = (str, int, float, bool, type(None), list, tuple, dict)


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def _check_literal(name: str, value, where: str) -> None:
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        raise ParameterError(f"{where}: parameter {name} = {value!r} is not a finite number.")
    if not isinstance(value, _LITERAL_TYPES):
        raise ParameterError(
            f"{where}: parameter {name} has a value of type {type(value).__name__}; only strings, numbers, "
            "booleans, null, lists and mappings of these can be passed (quote dates and other values)."
        )
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_literal(name, v, where)
    if isinstance(value, dict):
        for k, v in value.items():
            _check_literal(name, k, where)
            _check_literal(name, v, where)


def _compatible(value, default) -> bool:
    if default is None or value is None:
        return True  # None defaults mean "off" or "chosen by the chapter": any literal may replace them
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def validate_parameters(stem: str, params: dict, where: str, defaults: dict | None = None) -> dict:
    """Check ``params`` against the chapter's parameters cell: known names, matching types.

    ``where`` names the file (or command-line option) the values came from; it starts every error.
    Returns the parameters unchanged.
    """
    defaults = parameter_defaults(stem) if defaults is None else defaults
    src = f"notebooks/{stem}.md"
    for name, value in params.items():
        if not isinstance(name, str) or name not in defaults:
            close = difflib.get_close_matches(str(name), list(defaults), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParameterError(
                f"{where}: {name!r} is not a parameter of {src}.{hint} "
                f"Its parameters are: {', '.join(defaults)}."
            )
        _check_literal(name, value, where)
        if not _compatible(value, defaults[name]):
            raise ParameterError(
                f"{where}: parameter {name} must be {_a(_type_name(defaults[name]))} like its default "
                f"{defaults[name]!r} in {src}, got {value!r} ({_type_name(value)})."
            )
    return params


_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def check_parameters(stem: str, namespace: dict) -> None:
    """The check a chapter runs right after its parameters (and papermill's injected cell).

    Rejects a global the parameters cell does not define (a misspelt ``-p`` name) and a value of
    the wrong type, naming the chapter and the parameter, before anything heavy runs. Inside a
    run of ``python -m saelib.book`` it also sends library progress bars to the runner's terminal.
    """
    defaults = parameter_defaults(stem)
    history = namespace.get("In")
    fresh = not isinstance(history, list) or len(history) <= 4  # parameters, injected cell, this cell
    given = {k: v for k, v in namespace.items()
             if not k.startswith("_") and k not in _KERNEL_NAMES and not callable(v)
             and type(v).__name__ != "module" and (fresh or k in defaults)}
    validate_parameters(stem, given, f"parameters of {stem}", defaults)
    if os.environ.get(PROGRESS_ENV):
        _progress_to_terminal(stem)
    try:  # wide tables: show the first and last columns, not a clipped row of 19
        import pandas as pd

        pd.set_option("display.max_columns", 10)  # + index + the "…" column: 12 cells
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass


def _progress_to_terminal(stem: str) -> None:
    """Route every tqdm bar created from now on to the runner's stderr (counts, rate, ETA).

    The runner starts kernels without file-descriptor capture, so fd 2 of the kernel is the
    terminal of ``make book``; the executed notebook receives none of it. ``progress=False`` in
    a chapter keeps bars out of the page; here they are shown in the terminal regardless.
    """
    import tqdm
    import tqdm.auto
    import tqdm.std

    stream = os.fdopen(os.dup(2), "w", buffering=1)

    class TerminalTqdm(tqdm.std.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(file=stream, disable=False, dynamic_ncols=False, ncols=110)
            kwargs.setdefault("mininterval", 2.0)
            kwargs["desc"] = f"  {stem}: {kwargs.get('desc') or ''}".rstrip(": ")
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = TerminalTqdm
    tqdm.tqdm = TerminalTqdm
    for name, mod in list(sys.modules.items()):  # saelib modules that imported tqdm by name already
        bar = getattr(mod, "tqdm", None)
        if name.startswith("saelib") and isinstance(bar, type) and issubclass(bar, tqdm.std.tqdm):
            mod.tqdm = TerminalTqdm


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
    i = _parameters_cell(nb, rel(src))
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
    from saelib.bookhtml import render_site

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
