"""The import graph: the library never imports the experiments, the kernels never the library.

Read from the source (AST), so function-local imports, relative imports and
`importlib.import_module("...")` with a literal name count too.
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {"research": ("experiments",), "kernels": ("experiments", "research")}


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
  """(line, absolute module name) of every import in the file at `path`."""
  parts = list(path.relative_to(root).with_suffix("").parts)
  package = parts[:-1]  # of a module, and of a package's __init__ alike
  found = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(node.lineno, alias.name) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package[:len(package) - (node.level - 1)] if node.level - 1 <= len(package) else []
        module = ".".join(base + ([node.module] if node.module else []))
        # `from . import x` may import a submodule x.
        found += [(node.lineno, f"{module}.{a.name}" if module else a.name) for a in node.names]
      else:
        found.append((node.lineno, node.module))
        found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
      fn = node.func
      name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
      if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
        found.append((node.lineno, node.args[0].value))
  return found


def _violations(package: str) -> list[str]:
  bad = []
  for path in sorted((REPO / package).rglob("*.py")):
    for line, module in imported_modules(path):
      top = module.split(".")[0]
      if top in FORBIDDEN[package]:
        bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
  return bad


@pytest.mark.parametrize("package", list(FORBIDDEN))
def test_package_does_not_import_what_sits_above_it(package):
  assert (REPO / package).is_dir()
  assert _violations(package) == []


def test_the_checker_sees_local_relative_and_dynamic_imports(tmp_path):
  module = tmp_path / "research" / "sub" / "mod.py"
  module.parent.mkdir(parents=True)
  module.write_text("def f():\n  import experiments.x\n"
                    "def g():\n  from ... import experiments\n"
                    "def h():\n  import importlib\n  importlib.import_module('experiments')\n"
                    "from .sibling import thing\n")
  names = {m for _, m in imported_modules(module, root=tmp_path)}
  assert {"experiments.x", "experiments", "research.sub.sibling.thing"} <= names
