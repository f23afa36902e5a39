"""Where things live and when they are fresh: folders, chapter parameters, and one freshness rule.

* :func:`repo_root`, :func:`data_dir`, :func:`runs_dir`, :func:`rel`: the folders every chapter uses.
* :func:`hub_offline`: whether ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` disable the hub.
* :data:`PROFILES`, :func:`chapters`, :func:`check_parameters`: the chapters, their profiles and the
  check a chapter runs on its parameters (the book runner, ``saelib.book``, uses the same checks).
* :func:`make_stamp`, :func:`is_fresh`, :func:`write_stamp`: the one freshness rule of every
  stored result (sweeps, width families, activation caches; :mod:`saelib.pipeline` builds them).

This module sits at the bottom of the import graph (it imports only :mod:`saelib.io`), so models,
caches and the pipeline can all use it. The pipelines themselves (sweeps, width families, cache
building) need models and SAEs, which import this module, so they live in :mod:`saelib.pipeline`.
"""

from __future__ import annotations

import ast
import difflib
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from saelib.io import atomic_write_json, code_fingerprint

_TRUE = ("1", "true", "yes", "on")
PROFILES = ("ci", "embedded", "gpt2", "smoke", "gpu")


def repo_root() -> Path:
    """The repository root (the folder that holds ``saelib/`` and ``notebooks/``)."""
    return Path(__file__).resolve().parent.parent


def data_dir(override: str | Path | None = None) -> Path:
    """Folder for generated data: ``override``, else ``$SAELIB_DATA_DIR``, else ``<repo>/data``."""
    if override is not None:
        return Path(override)
    env = os.environ.get("SAELIB_DATA_DIR")
    return Path(env) if env else repo_root() / "data"


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


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in _TRUE for f in flags)


# ---------------------------------------------------------------------------------------------
# The freshness rule: a stored result is reused only when its stamp matches
# ---------------------------------------------------------------------------------------------
def _canonical(obj: Any) -> Any:
    """JSON round trip (tuples -> lists, Paths -> str), so a stamp compares equal to its file."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def make_stamp(config: Any, recipe: Mapping[str, Any], data: Any, *, code: Iterable[Any] = ()) -> dict[str, Any]:
    """The identity of a stored result: ``{"config", "recipe", "data", "hash"}``.

    * ``config``: the configs that are saved with the result (SAE and trainer settings);
    * ``recipe``: what changes the result but is not in those configs (data sizes, optimisation,
      seeds), plus ``"code"``: :func:`saelib.io.code_fingerprint` of ``code`` (modules or
      functions), so a result made by other code is never reused;
    * ``data``: the activation source (model name and weights fingerprint, corpus, hooks, rows),
      or None when the caller cannot name it (then :func:`is_fresh` does not compare it).

    ``hash`` is the sha256 (16 hex digits) of the three parts as canonical JSON.
    """
    recipe = dict(recipe)
    if code:
        recipe["code"] = code_fingerprint(*code)
    parts = _canonical({"config": config, "recipe": recipe, "data": data})
    parts["hash"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return parts


def read_stamp(path: str | Path) -> dict[str, Any] | None:
    """The stamp stored at ``path``; None when missing, unreadable or not a stamp (never trusted)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and {"config", "recipe", "data", "hash"} <= set(doc) else None


def is_fresh(path: str | Path, want: Mapping[str, Any]) -> bool:
    """Whether the result stamped at ``path`` was made from ``want`` (a :func:`make_stamp`).

    The same config, recipe and data (the parts are compared, not only the stored hash, so a
    hand-edited stamp is not trusted); ``want["data"] = None`` (the caller does not name its
    data, e.g. a later chapter reusing a sweep it did not build) leaves the data out.
    """
    have = read_stamp(path)
    parts = ("config", "recipe") if want["data"] is None else ("config", "recipe", "data")
    return have is not None and all(have[k] == _canonical(want[k]) for k in parts)


def write_stamp(path: str | Path, stamp: Mapping[str, Any]) -> Path:
    """Store ``stamp`` at ``path`` atomically. Call it after the artefacts it vouches for are written."""
    return atomic_write_json(path, dict(stamp))


# ---------------------------------------------------------------------------------------------
# Chapters and their parameters
# ---------------------------------------------------------------------------------------------
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
    """``notebooks/<stem>.md``; a clear error when a chapter listed in ``myst.yml`` is missing."""
    src = repo_root() / "notebooks" / f"{stem}.md"
    if not src.exists():
        raise FileNotFoundError(f"Chapter source {rel(src)} is missing (listed in myst.yml).")
    return src


def parameters_cell(nb, where: str) -> int:
    """Index of the chapter's one code cell tagged ``parameters`` (an error names ``where``)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{where} needs exactly one code cell tagged 'parameters' (found {len(tagged)}).")
    return tagged[0]


def parameter_defaults(stem: str) -> dict:
    """Names and default values of a chapter's ``parameters`` cell (plain literal assignments)."""
    import jupytext

    src = chapter_source(stem)
    nb = jupytext.read(src)
    cell = nb.cells[parameters_cell(nb, rel(src))]
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
    Warnings name files relative to the repository root, so a page never shows a machine's paths.
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
    warnings.formatwarning = _relative_warning
    try:  # wide tables: show the first and last columns, not a clipped row of 19
        import pandas as pd

        pd.set_option("display.max_columns", 10)  # + index + the "…" column: 12 cells
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass


def _relative_warning(message, category, filename, lineno, line=None) -> str:
    return f"{rel(filename)}:{lineno}: {category.__name__}: {message}\n"


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
