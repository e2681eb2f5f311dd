"""The library's import graph (gsa_jax/ and pallas_kernels/, read with ast, imports inside functions included): no
circle between modules, and no arrow from the library into code that is not installed with it (tests/,
benchmarks/, configs/, examples/, train.py). benchmarks/ does not import tests/ either."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = ("gsa_jax", "pallas_kernels")
NOT_INSTALLED = ("tests", "benchmarks", "configs", "examples", "train")

# Import circles known when this test was written, each a set of modules; the test fails on any other circle, and on
# an entry here that is no longer a circle (so the list cannot go stale).
# Empty since gsa_jax.run_dir took over the run directory from train.restore (which train.config imported back).
ALLOWED_CIRCLES = []


def module_files(root: str, packages) -> dict[str, str]:
  """Dotted module name -> source path, for every .py file under root/<package> (a package is its __init__)."""
  files = {}
  for package in packages:
    for folder, _, names in os.walk(os.path.join(root, package)):
      for name in names:
        if name.endswith(".py"):
          parts = os.path.relpath(os.path.join(folder, name), root)[:-3].split(os.sep)
          files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, name)
  return files


def imports_of(module: str, path: str, modules) -> set[str]:
  """The modules `module` imports anywhere in its source (top level or inside functions), as dotted names:
  `from a.b import c` names a.b.c when that is a module, else a.b; relative imports are resolved."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
      out.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
  return out


def import_graph(root: str, packages) -> dict[str, set[str]]:
  """Module -> the modules it imports (all of them, inside the packages or not)."""
  modules = module_files(root, packages)
  return {module: imports_of(module, path, modules) for module, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
  """The strongly connected components of more than one module (or a module importing itself): Tarjan's algorithm."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for succ in graph.get(node, ()):
      if succ not in graph:
        continue
      if succ not in index:
        visit(succ)
        low[node] = min(low[node], low[succ])
      elif succ in on_stack:
        low[node] = min(low[node], index[succ])
    if low[node] == index[node]:
      component = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1 or node in graph[node]:
        found.append(component)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def test_library_has_no_import_circle_beyond_the_allowed_ones():
  found = circles(import_graph(ROOT, LIBRARY))
  new = [sorted(c) for c in found if c not in ALLOWED_CIRCLES]
  assert not new, f"import circles between library modules: {new}"
  gone = [sorted(c) for c in ALLOWED_CIRCLES if c not in found]
  assert not gone, f"no longer circles: remove them from ALLOWED_CIRCLES: {gone}"


def test_library_imports_nothing_that_is_not_installed():
  graph = import_graph(ROOT, LIBRARY)
  bad = sorted((module, imported) for module, imports in graph.items() for imported in imports
               if imported.split(".")[0] in NOT_INSTALLED)
  assert not bad, f"library modules importing code that is not installed with the package: {bad}"


def test_only_the_check_command_imports_the_testing_helpers():
  """gsa_jax.ops.testing is for tests, benchmarks and `python -m gsa_jax.ops.check`, not for the library's code."""
  graph = import_graph(ROOT, LIBRARY)
  assert {module for module, imports in graph.items() if "gsa_jax.ops.testing" in imports} == {"gsa_jax.ops.check"}


def test_benchmarks_do_not_import_tests():
  modules = module_files(ROOT, ("benchmarks",))
  bad = sorted((module, imported) for module, path in modules.items() for imported in imports_of(module, path, modules)
               if imported.split(".")[0] == "tests")
  assert not bad, f"benchmarks importing test code (shared helpers belong in gsa_jax.ops.testing): {bad}"


def test_the_walk_finds_a_planted_circle_and_resolves_relative_imports(tmp_path):
  files = {
      "lib/__init__.py": "from lib.a import f\n",
      "lib/a.py": "def f():\n  from .sub import b  # inside a function: still an arrow\n  return b\n",
      "lib/sub/__init__.py": "",
      "lib/sub/b.py": "from .. import c\nimport numpy\n",
      "lib/c.py": "from lib import a\nfrom tests.helpers import x\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  graph = import_graph(str(tmp_path), ("lib",))
  assert graph["lib.a"] == {"lib.sub.b"} and graph["lib.sub.b"] == {"lib.c", "numpy"}
  assert graph["lib.c"] == {"lib.a", "tests.helpers"}
  assert circles(graph) == [{"lib.a", "lib.sub.b", "lib.c"}]
