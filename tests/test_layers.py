"""The package's layers: every import runs one way (see DESIGN.md "Layers" and docs/how_it_works.md).

``errors/_version <- _files <- core <- {multi, distributed, io} <- lora <- peft_compat <-
{testing, demo} <- __init__``; siblings never import each other; inside ``core`` each module
imports only modules of a lower rank. Parsed with ``ast``: nothing is imported to check it.
"""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "funclora")

#: top-level layer of each first name below ``funclora`` (a file or a subpackage)
LAYERS = {
    "errors": 0, "_version": 0,
    "_files": 1,
    "core": 2,
    "multi": 3, "distributed": 3, "io": 3,
    "lora": 4, "rules": 4,
    "peft_transformers": 4.5, "peft_folders": 4.6,
    "peft_compat": 5,
    "testing": 6, "demo": 6, "trainer": 6,
    "__init__": 7, "__main__": 7,
}
#: rank of each module inside core: a module imports only lower ranks
CORE = {
    "_kinds": 0,
    "lazy": 1, "pytree": 1, "shadow": 1, "dora": 1,
    "dora_forward": 2,
    "rules": 2,
    "quantized": 3,
    "registry": 4, "config_fields": 4,
    "config": 5, "default_targets": 5, "suggest": 5, "target_checks": 5,
    "targeting": 6,
    "bound": 7,
    "forward": 8, "merge": 8,
    "__init__": 9,
}
#: files allowed a relative import inside a function (deferred on purpose)
DEFERRED_OK = {"funclora.__main__"}  # `python -m funclora` loads the demo only when asked to


def _modules():
    """``{dotted module name: path}`` of every file of the package."""
    out = {}
    for folder, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3]
                out[rel.replace(os.sep, ".")] = os.path.join(folder, f)
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """The package modules a relative ``from ... import ...`` reaches."""
    is_package = MODULES[module].endswith("__init__.py")
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    if names:                      # `from . import layout`: the submodules themselves
        return names
    if target in MODULES:
        return [target]
    return [f"{target}.__init__"] if f"{target}.__init__" in MODULES else [target]


def _where(module: str) -> tuple[str, int, str | None, int | None]:
    """``(top-level group, its layer, core module or None, its rank or None)``."""
    parts = module.split(".")[1:] or ["__init__"]
    group = parts[0]
    core = (parts[1] if len(parts) > 1 else "__init__") if group == "core" else None
    return group, LAYERS[group], core, CORE[core] if core else None


def _imports(module: str):
    """``(line, target module, inside a function)`` for each relative import of ``module``."""
    with open(MODULES[module], encoding="utf-8") as f:
        tree = ast.parse(f.read())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            for target in _resolve(module, node):
                yield node.lineno, target, id(node) in in_function


def test_every_module_has_a_layer():
    unknown = sorted(m for m in MODULES if m.split(".")[1:2] and m.split(".")[1] not in LAYERS)
    assert not unknown, f"give these a layer in tests/test_layers.py and DESIGN.md: {unknown}"
    unranked = sorted(m for m in MODULES if m.startswith("funclora.core.") and m.split(".")[2] not in CORE)
    assert not unranked, f"give these a rank inside core: {unranked}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    group, layer, core, rank = _where(module)
    wrong = []
    for line, target, _ in _imports(module):
        t_group, t_layer, t_core, t_rank = _where(target.removesuffix(".__init__") if target.endswith(
            ".__init__") and target.count(".") > 1 else target)
        if t_layer > layer:
            wrong.append(f"line {line}: {target} is in a higher layer ({t_group})")
        elif t_layer == layer and t_group != group and layer not in (0, 7):
            wrong.append(f"line {line}: {target} is a sibling layer ({t_group}); siblings never import each other")
        elif core and t_core and t_core != core and t_rank >= rank:
            wrong.append(f"line {line}: core.{t_core} (rank {t_rank}) is not below core.{core} (rank {rank})")
    assert not wrong, f"{module} imports upward:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_deferred_relative_imports(module):
    """A relative import inside a function hides an import cycle; only named spots may defer."""
    deferred = [f"line {line}: {target}" for line, target, inside in _imports(module) if inside]
    if module in DEFERRED_OK:
        return
    assert not deferred, f"{module} imports inside a function (move it to the top): {deferred}"


def test_import_funclora_does_not_load_the_testing_kit():
    code = ("import sys, funclora as fl; assert fl.RuleCheckError.__module__ == 'funclora.errors'; "
            "print(sorted(m for m in sys.modules if m.startswith('funclora.testing') or m == 'hypothesis'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_file_is_over_420_lines():
    long = {}
    for module, path in MODULES.items():
        with open(path, encoding="utf-8") as f:
            n = len(f.readlines())
        if n > 420:
            long[module] = n
    assert not long, f"split these files: {long}"
