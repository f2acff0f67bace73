"""No import cycle between the project's modules (lowrank_optim, its kernels in triton_kernels/, benchmarks).

Edges come from every import statement, at module level and inside functions, read with ``ast``.  The kernels are
one package under two names (``triton_kernels`` folder, installed as ``lowrank_optim.kernels``), as are the
benchmarks (``benchmarks`` / ``lowrank_optim.benchmarks``); both names map to one node.  Importing a module
``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, but those are not counted as edges: a package's
``__init__`` importing its own submodules is not a cycle."""

import ast
import os
from typing import Dict, List, Optional, Set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# folder -> module name of that folder
PACKAGES = {"lowrank_optim": "lowrank_optim", "triton_kernels": "lowrank_optim.kernels", "benchmarks": "benchmarks"}
ALIASES = {"triton_kernels": "lowrank_optim.kernels", "lowrank_optim.benchmarks": "benchmarks"}


def _canonical(name: str) -> str:
    for alias, real in ALIASES.items():
        if name == alias or name.startswith(alias + "."):
            return real + name[len(alias) :]
    return name


def find_modules(root: str, packages: Dict[str, str]) -> Dict[str, str]:
    """module name -> file, walking each package folder (symbolic links are not followed)."""
    modules = {}
    for folder, base in packages.items():
        top = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)) and d != "__pycache__"]
            rel = os.path.relpath(dirpath, top)
            prefix = base if rel == "." else base + "." + rel.replace(os.sep, ".")
            for f in filenames:
                if f.endswith(".py"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    modules[name] = os.path.join(dirpath, f)
    return modules


def _resolve(target: str, modules: Dict[str, str]) -> Optional[str]:
    """The longest prefix of ``target`` that is a project module."""
    target = _canonical(target)
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in modules:
            return name
    return None


def import_edges(modules: Dict[str, str]) -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):  # module level and inside functions alike
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module
                # `from pkg import sub` imports the submodule pkg.sub when there is one
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                dep = _resolve(target, modules)
                if dep is not None and dep != name:
                    edges[name].add(dep)
    return edges


def find_cycle(edges: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One cycle as a list of modules (first == last), or None."""
    state: Dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: List[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_project_has_no_import_cycle():
    modules = find_modules(ROOT, PACKAGES)
    edges = import_edges(modules)
    # the walker sees function-level imports and both names of the kernels package
    assert "lowrank_optim.kernels.selfcheck" in edges["lowrank_optim.quant.dispatch"]  # inside a function
    assert "lowrank_optim.quant.format" in edges["lowrank_optim.kernels.quant8"]
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_walker_finds_a_function_level_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n    return g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    from .a import b\n")
    edges = import_edges(find_modules(str(tmp_path), {"pkg": "pkg"}))
    assert edges["pkg.a"] == {"pkg.b"} and edges["pkg.b"] == {"pkg.c"} and edges["pkg.c"] == {"pkg.a"}
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("import os\n")
    assert find_cycle(import_edges(find_modules(str(tmp_path), {"pkg": "pkg"}))) is None
