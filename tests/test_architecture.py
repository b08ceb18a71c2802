"""The package's shape, checked from its source: no import cycles, the layering rules of the README's Architecture
section, one public API, and private names of other libraries reached only through ``surgery/_compat.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lightning_lora
import lightning_lora.surgery

PACKAGE = Path(lightning_lora.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> set[str]:
    """Every module of the package that ``module`` imports, at top level or inside functions."""
    path = MODULES[module]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node, path.name == "__init__.py")
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A cycle through ``start`` whose other modules all sort after it (so each cycle is reported once), or None."""
    stack, on_path = [(start, iter(sorted(graph[start])))], [start]
    while stack:
        _, children = stack[-1]
        child = next(children, None)
        if child is None:
            stack.pop()
            on_path.pop()
        elif child == start:
            return [*on_path, start]
        elif child not in on_path and child > start:
            stack.append((child, iter(sorted(graph[child]))))
            on_path.append(child)
    return None


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph, "a") == ["a", "b", "c", "a"]
    assert find_cycle(graph, "d") is None


def test_import_graph_is_read() -> None:
    assert "lightning_lora.surgery.lora.config" in GRAPH["lightning_lora.surgery.lora.apply"]
    assert "lightning_lora.surgery.quant.merge_bases" in GRAPH["lightning_lora.surgery.quant"]


def test_no_import_cycles_counting_imports_inside_functions() -> None:
    cycles = [c for m in sorted(GRAPH) if (c := find_cycle(GRAPH, m))]
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


SURGERY = "lightning_lora.surgery"
# Which sub-packages of surgery/ each one may import (besides itself and the leaf modules in LEAVES).
ALLOWED = {
    "lora": set(),
    "quant": {"lora"},
    "methods": {"lora"},
    "io": {"lora", "methods"},
    "multi": {"lora"},
    "training": {"lora", "quant", "io", "multi", "methods"},
    "diagnostics": {"lora", "quant", "io", "multi", "methods", "training"},
}
LEAVES = {f"{SURGERY}.errors", f"{SURGERY}._deps", f"{SURGERY}._compat"}


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 3 and parts[:2] == ["lightning_lora", "surgery"] else None


@pytest.mark.parametrize("subpackage", sorted(ALLOWED))
def test_surgery_subpackages_import_only_what_the_layering_allows(subpackage: str) -> None:
    bad = []
    for module, imports in GRAPH.items():
        if _subpackage(module) != subpackage and module != f"{SURGERY}.{subpackage}":
            continue
        for target in imports:
            other = _subpackage(target) or (target.rsplit(".", 1)[-1] if target.count(".") == 2 else None)
            if not target.startswith(SURGERY) or target == SURGERY:
                bad.append(f"{module} -> {target} (surgery never imports the layers above it)")
            elif target in LEAVES:
                continue
            elif other != subpackage and other not in ALLOWED[subpackage]:
                bad.append(f"{module} -> {target}")
    assert bad == []


def test_surgery_never_imports_lightning() -> None:
    offenders = []
    for module, path in MODULES.items():
        if not module.startswith(SURGERY):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{module}: {n}" for n in names if n.split(".")[0] in {"lightning", "pytorch_lightning"}]
    assert offenders == []


def test_nothing_below_the_command_line_imports_it() -> None:
    # cli -> serve, callbacks, modules, data -> surgery; nothing points back up.
    bad = [f"{m} -> {t}" for m, imports in GRAPH.items() for t in imports
           if t.startswith("lightning_lora.cli") and not m.startswith("lightning_lora.cli")]
    assert bad == []


def test_both_init_files_export_the_same_public_names() -> None:
    assert set(lightning_lora.__all__) - {"__version__"} == set(lightning_lora.surgery.__all__)
    for name in lightning_lora.surgery.__all__:
        assert getattr(lightning_lora, name) is getattr(lightning_lora.surgery, name), name


def test_private_names_of_other_libraries_only_in_compat() -> None:
    offenders = []
    for module, path in MODULES.items():
        if module == f"{SURGERY}._compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and not (node.module or "").startswith("lightning_lora"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                in_path = [p for p in (node.module or "").split(".") if p.startswith("_") and not p.startswith("__")]
                if private or in_path:
                    offenders.append(f"{module}: from {node.module} import {[a.name for a in node.names]}")
    assert offenders == []


def test_compat_names_still_exist_in_the_installed_libraries() -> None:
    """Fails loudly, naming the name, when a torch or bitsandbytes upgrade moves a private name we rely on."""
    from lightning_lora.surgery import _compat

    assert isinstance(_compat.global_forward_hooks(), dict)
    pytest.importorskip("bitsandbytes")
    assert callable(_compat.bnb_unpack_cpu_weight())
