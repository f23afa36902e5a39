"""The package's shape, checked: layers import downward, the book runner is imported by nobody,
saelib's own imports sit at the top of each module (never behind ``try/except ImportError``),
every module has a docstring, and only the rules branch on a rule's name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from saelib.sae.rules import RULES

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "saelib"
MODULES = sorted(p for p in PKG.rglob("*.py"))
# a layer may import its own layer and the ones listed after it, never the ones before
LAYERS = {"book": 5, "bookhtml": 5, "checks": 4, "plots": 4, "analysis": 3, "interop": 3, "sae": 2, "lm": 1,
          "runs": 0, "io": 0, "paper": 0}
MAX_LINES = 850
MAX_RULE_BRANCHES = 3


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``): imports there exist for annotations only."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and not node.orelse and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _top_level(tree: ast.Module) -> set[int]:
    """Statements at module level, including the body of a top-level ``if TYPE_CHECKING:``."""
    top = {id(node) for node in tree.body}
    for node in tree.body:
        if _is_type_checking(node):
            top.update(id(sub) for sub in node.body)
    return top


def _saelib_imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "saelib":
            yield node, [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            mods = [a.name for a in node.names if a.name.split(".")[0] == "saelib"]
            if mods:
                yield node, mods


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_shape(path):
    src = path.read_text()
    tree = ast.parse(src)
    me = _name(path)
    problems = []  # all of them at once, so one run shows a module's owner everything to fix
    n = len(src.splitlines())
    if n > MAX_LINES:
        problems.append(f"{me} has {n} lines; split it by concept (at most {MAX_LINES})")
    top = _top_level(tree)
    mine = _layer(me)
    for node, targets in _saelib_imports(tree):
        if id(node) not in top:
            problems.append(f"{me}:{node.lineno} imports saelib inside a function or block; move it to the top")
        if me != "saelib.book" and any(t == "saelib.book" or t.startswith("saelib.book.") for t in targets):
            problems.append(f"{me}:{node.lineno} imports the book runner; take repo_root/runs_dir/check_parameters "
                            "from saelib.runs")
        for t in targets:
            theirs = _layer(t)
            if mine is not None and theirs is not None and me.split(".")[1] != t.split(".")[1] and theirs > mine:
                problems.append(f"{me}:{node.lineno} imports {t}, a higher layer")
    assert not problems, "\n".join(problems)


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    if handler.type is None:
        return True
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError", "Exception",
                                                    "BaseException") for n in names)


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_no_guarded_saelib_imports(path):
    """saelib's own modules are always there: an import of one behind ``except ImportError`` hides a bug."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers):
            for sub in node.body:
                for imp, _ in _saelib_imports(sub):
                    pytest.fail(f"{_name(path)}:{imp.lineno} imports saelib inside try/except ImportError; "
                                "import it at the top of the module, unguarded")


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_docstring(path):
    assert ast.get_docstring(ast.parse(path.read_text())), \
        f"{_name(path)} has no module docstring; say in one line which concept the module holds"


def _rule_literals(node: ast.AST) -> bool:
    def is_rule(c):
        return isinstance(c, ast.Constant) and c.value in RULES
    if is_rule(node):
        return True
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(is_rule(e) for e in node.elts)


def rule_branches() -> list[str]:
    """Comparisons with a rule's name (``x == "topk"``, ``x in ("topk", ...)``) outside saelib/sae/rules."""
    found = []
    for path in MODULES:
        if "rules" in path.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(_rule_literals(c) for c in [node.left, *node.comparators]):
                found.append(f"{_name(path)}:{node.lineno}")
    return found


def test_rules_own_their_branches():
    found = rule_branches()
    assert len(found) <= MAX_RULE_BRANCHES, f"branches on a rule's name outside saelib/sae/rules: {found}"
