"""The package's shape, checked: layers import downward, the book runner is imported by nobody,
saelib's own imports sit at the top of each module, and only the rules branch on a rule's name."""

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
    n = len(src.splitlines())
    assert n <= MAX_LINES, f"{me} has {n} lines; split it by concept (at most {MAX_LINES})"
    top = {id(node) for node in tree.body}
    for node, targets in _saelib_imports(tree):
        assert id(node) in top, f"{me}:{node.lineno} imports saelib inside a function or block; move it to the top"
        if me != "saelib.book":
            assert not any(t == "saelib.book" or t.startswith("saelib.book.") for t in targets), \
                f"{me}:{node.lineno} imports the book runner; take repo_root/runs_dir/check_parameters from saelib.runs"
        mine = _layer(me)
        for t in targets:
            theirs = _layer(t)
            if mine is not None and theirs is not None and me.split(".")[1] != t.split(".")[1]:
                assert theirs <= mine, f"{me}:{node.lineno} imports {t}, a higher layer"


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
