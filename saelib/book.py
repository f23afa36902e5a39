"""Run the book: execute chapters with a papermill profile, export offline HTML, build the MyST site.

Command line (the Makefile calls these)::

    python -m saelib.book run --profile embedded          # execute every chapter in place
    python -m saelib.book run --profile ci --only 01_residual_stream
    python -m saelib.book prepare --profile ci --out _build/ci-notebooks   # for nbval
    python -m saelib.book site                             # offline `myst build --site`

Chapters are the MyST-markdown notebooks listed in ``myst.yml``; their ``.ipynb`` twins are
generated (Jupytext) and, after ``run``, hold the executed outputs that MyST and JupyterLab show.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from saelib.io import atomic_write_text

PROFILES = ("ci", "embedded", "gpt2", "smoke", "gpu")

# `myst build --site` asks the network for the book theme's metadata. Offline, a stub theme is
# placed where mystmd caches downloaded themes, and removed afterwards so that an online
# `myst build --html` or `myst start` still downloads the real theme.
_STUB_THEME = """myst: v1
kind: site
title: Offline content build
description: Stand-in used only while building the site content offline
version: 0.0.0
"""


def repo_root() -> Path:
    """The repository root (the folder that holds ``saelib/`` and ``notebooks/``)."""
    return Path(__file__).resolve().parent.parent


def runs_dir(runs: str | Path) -> Path:
    """Resolve a chapter's ``runs_dir`` parameter: relative paths are taken from the repo root.

    Chapters run with the notebook folder as working directory, so a bare relative path would
    land in ``notebooks/``; resolving against the root keeps every profile's runs in one place.
    """
    path = Path(runs)
    if not path.is_absolute():
        path = repo_root() / path
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def profile_parameters(profile: str | Path, stem: str) -> dict:
    """Parameters for one chapter: ``profiles/<profile>/<stem>.yaml``, or a folder given by path."""
    folder = Path(profile)
    if not folder.is_dir():
        if str(profile) not in PROFILES:
            raise ValueError(
                f"Unknown profile {profile!r}: use one of {', '.join(PROFILES)} "
                "or a folder of <chapter>.yaml parameter files."
            )
        folder = repo_root() / "profiles" / str(profile)
    path = folder / f"{stem}.yaml"
    if not path.exists():
        return {}
    params = yaml.safe_load(path.read_text()) or {}
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a mapping of parameter names to values.")
    return params


def sync_notebook(stem: str) -> Path:
    """Write ``notebooks/<stem>.ipynb`` from its MyST-markdown source, keeping existing outputs."""
    import jupytext

    src = repo_root() / "notebooks" / f"{stem}.md"
    if not src.exists():
        raise FileNotFoundError(f"Chapter source {src} is missing (listed in myst.yml).")
    ipynb = src.with_suffix(".ipynb")
    nb = jupytext.read(src)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    if ipynb.exists():
        # Keep outputs of unchanged cells, as `jupytext --sync` does.
        old = jupytext.read(ipynb)
        nb = jupytext.combine.combine_inputs_with_outputs(nb, old)
    atomic_write_text(ipynb, jupytext.writes(nb, fmt="ipynb"))
    return ipynb


def prepare(profile: str, out: Path, only: list[str] | None = None) -> list[Path]:
    """Write parameter-injected, unexecuted notebooks to ``out`` (nbval then executes them)."""
    import papermill

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem in only or chapters():
        ipynb = sync_notebook(stem)
        target = out / f"{stem}.ipynb"
        papermill.execute_notebook(
            str(ipynb), str(target), parameters=profile_parameters(profile, stem),
            prepare_only=True, kernel_name="python3", progress_bar=False,
        )
        written.append(target)
    return written


def run(profile: str, only: list[str] | None = None, html: bool = True) -> dict[str, float]:
    """Execute chapters in place with ``profile``; export offline HTML; return wall seconds each."""
    import papermill

    timings: dict[str, float] = {}
    html_dir = repo_root() / "_build" / "html-offline"
    stems = only or chapters()
    for i, stem in enumerate(stems, 1):
        ipynb = sync_notebook(stem)
        params = profile_parameters(profile, stem)
        print(f"[{i}/{len(stems)}] {stem}  (profile {profile})", flush=True)
        start = time.perf_counter()
        fd, tmp = tempfile.mkstemp(dir=ipynb.parent, prefix=f".{stem}.", suffix=".ipynb")
        os.close(fd)
        try:
            papermill.execute_notebook(
                str(ipynb), tmp, parameters=params, kernel_name="python3",
                cwd=str(ipynb.parent), progress_bar=True, log_output=False,
            )
            os.replace(tmp, ipynb)
        except Exception:
            failed = repo_root() / "_build" / "failed" / f"{stem}.ipynb"
            failed.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tmp, failed)
            print(f"Chapter {stem} failed; the partly executed notebook is {failed}", file=sys.stderr)
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        timings[stem] = time.perf_counter() - start
        print(f"    done in {timings[stem]:.0f} s", flush=True)
        if html:
            export_html(ipynb, html_dir)
    if html:
        _write_html_index(html_dir)
    _record_timings(profile, timings)
    return timings


def export_html(ipynb: Path, html_dir: Path) -> Path:
    """Offline HTML of an executed chapter (nbconvert), readable without the MyST theme."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_filename(str(ipynb))
    target = html_dir / f"{ipynb.stem}.html"
    atomic_write_text(target, body)
    return target


def _write_html_index(html_dir: Path) -> None:
    items = "\n".join(
        f'<li><a href="{stem}.html">{stem.replace("_", " ")}</a></li>'
        for stem in chapters() if (html_dir / f"{stem}.html").exists()
    )
    atomic_write_text(
        html_dir / "index.html",
        f"<!doctype html><html><head><meta charset='utf-8'><title>saelib book</title></head>"
        f"<body><h1>saelib: the book (offline HTML)</h1><ol>{items}</ol></body></html>\n",
    )


def _record_timings(profile: str, timings: dict[str, float]) -> None:
    path = repo_root() / "_build" / f"timings-{profile}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update({k: round(v, 1) for k, v in timings.items()})
    atomic_write_text(path, json.dumps(old, indent=2) + "\n")
    total = sum(timings.values())
    print(f"Executed {len(timings)} chapter(s) in {total / 60:.1f} min: " +
          ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))


def build_site() -> None:
    """``myst build --site`` offline: the site content (JSON) for every chapter in ``myst.yml``."""
    myst = shutil.which("myst", path=str(Path(sys.executable).parent)) or shutil.which("myst")
    if myst is None:
        raise FileNotFoundError("The `myst` command is missing: run `make setup` (it installs mystmd).")
    missing = [s for s in chapters() if not (repo_root() / "notebooks" / f"{s}.ipynb").exists()]
    for stem in missing:  # unexecuted chapters still get a page
        sync_notebook(stem)
    theme = repo_root() / "_build" / "templates" / "site" / "myst" / "book-theme"
    seeded = not (theme / "template.yml").exists()
    if seeded:
        theme.mkdir(parents=True, exist_ok=True)
        (theme / "template.yml").write_text(_STUB_THEME)
    try:
        subprocess.run([myst, "build", "--site"], cwd=repo_root(), check=True)
    finally:
        if seeded:
            shutil.rmtree(theme, ignore_errors=True)
    print(f"MyST site content in {repo_root() / '_build' / 'site'}; offline HTML in "
          f"{repo_root() / '_build' / 'html-offline' / 'index.html'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m saelib.book", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="execute chapters in place with a profile")
    p_run.add_argument("--profile", default="embedded")
    p_run.add_argument("--only", nargs="*", help="chapter stems (default: all, in toc order)")
    p_run.add_argument("--no-html", action="store_true")
    p_prep = sub.add_parser("prepare", help="parameter-injected notebooks for nbval")
    p_prep.add_argument("--profile", default="ci")
    p_prep.add_argument("--out", type=Path, default=repo_root() / "_build" / "ci-notebooks")
    p_prep.add_argument("--only", nargs="*")
    sub.add_parser("site", help="offline `myst build --site`")
    sub.add_parser("list", help="print the chapters in order")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run(args.profile, args.only, html=not args.no_html)
    elif args.cmd == "prepare":
        for path in prepare(args.profile, args.out, args.only):
            print(path)
    elif args.cmd == "site":
        build_site()
    else:
        print("\n".join(chapters()))


if __name__ == "__main__":
    main()
