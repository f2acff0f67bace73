"""The kernels and the benchmarks are the package's own subpackages (lowrank_optim.kernels / .benchmarks): links in
a source checkout, mapped folders in setup.py; the package never imports them by their folder names."""

import ast
import os

import lowrank_optim.kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_subpackages_are_the_top_level_folders():
    for name, folder in (("kernels", "triton_kernels"), ("benchmarks", "benchmarks")):
        link = os.path.join(ROOT, "lowrank_optim", name)
        assert os.path.islink(link) and os.path.realpath(link) == os.path.realpath(os.path.join(ROOT, folder))
    assert os.path.realpath(lowrank_optim.kernels.__file__) == os.path.realpath(
        os.path.join(ROOT, "triton_kernels", "__init__.py")
    )


def test_package_code_imports_kernels_by_the_package_name():
    offenders = []
    for folder in ("lowrank_optim", "triton_kernels"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
            for f in filenames:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
                for node in ast.walk(tree):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    if isinstance(node, ast.ImportFrom) and not node.level:
                        names = [node.module]
                    offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("triton_kernels", "benchmarks")]
    assert offenders == []


def test_setup_maps_the_folders_under_the_package_name():
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    mapped = next(n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "MAPPED")
    assert ast.literal_eval(mapped) == {
        "lowrank_optim.kernels": "triton_kernels",
        "lowrank_optim.benchmarks": "benchmarks",
    }
