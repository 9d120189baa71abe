"""The import direction: impl at the bottom, golden above it, tests and benchmarks on top; nothing imports upward.

Read from the source with `ast`, not from sys.modules after an import: an import inside a function (the lazy
kind the CLIs use to keep `--help` fast) counts as much as one at the top of a module, and so does
`importlib.import_module("...")` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the packages it must never import
FORBIDDEN = {
    "impl": {"golden", "tests", "benchmarks"},
    "golden": {"tests", "benchmarks"},
}


def imported_modules(source: str, module: str) -> set[str]:
    """Every module that `source` (the text of `module`, dotted) imports, at any depth of nesting."""
    package = module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..golden import y`
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _is_dynamic_import(node.func)):
            found.add(node.args[0].value)
    return found


def _is_dynamic_import(func: ast.expr) -> bool:
    """importlib.import_module(...), import_module(...) or __import__(...)."""
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    return name in ("import_module", "__import__")


def imports_of_package(package: str) -> dict[str, set[str]]:
    """module path (relative to the repository) -> the top-level packages it imports."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[str(path.relative_to(ROOT))] = {m.split(".")[0] for m in imported_modules(path.read_text(), module)}
    return out


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_package_imports_no_layer_above_it(package):
    offenders = {path: sorted(tops & FORBIDDEN[package])
                 for path, tops in imports_of_package(package).items() if tops & FORBIDDEN[package]}
    assert not offenders, f"{package} must not import {sorted(FORBIDDEN[package])}: {offenders}"


def test_package_scan_reads_every_module():
    assert {"impl/model.py", "impl/stages.py", "impl/cli.py"} <= set(imports_of_package("impl"))
    assert {"golden/check.py", "golden/record.py"} <= set(imports_of_package("golden"))


def test_import_scan_sees_lazy_relative_and_dynamic_imports():
    source = '''
import torch
def run():
    from golden import compare
    if True:
        import tests.conftest
    return importlib.import_module("benchmarks.cases")
class C:
    def m(self):
        from . import stages
        from ..examples import my_llama
'''
    found = imported_modules(source, "impl.sub.mod")
    assert {"torch", "golden", "tests.conftest", "benchmarks.cases", "impl.sub", "impl.examples"} <= found, found
