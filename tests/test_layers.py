"""The package's layers, read from its imports (every ``import`` statement, at module level or inside a
function): the core imports nothing above it, no two modules import each other in a loop, and no
module takes another module's private name. ``docs/architecture.md`` draws the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastavatar_nb"
CORE = {"fastavatar_nb._checks", "fastavatar_nb._io", "fastavatar_nb._live", "fastavatar_nb.loop", "fastavatar_nb._openmp", "fastavatar_nb.cameras",
        "fastavatar_nb.comm", "fastavatar_nb.gaussians", "fastavatar_nb.metrics", "fastavatar_nb.ply",
        "fastavatar_nb.threads", "fastavatar_nb.render"}
"""Tensors in, tensors out: Gaussians, cameras, the renderers, metrics, files, threads, progress displays,
the communicator.
A module is core when its name is one of these or lies under one (``fastavatar_nb.render.sh``)."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path], source: str | None = None) -> list[tuple[int, str, str | None]]:
    """``(line, imported module, name or None)`` for every import of a package module in ``path`` (its
    text, or ``source`` in its place); a name that is itself a module (``from . import _numba_kernels``)
    counts as that module."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "fastavatar_nb"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "fastavatar_nb":
                target = node.module
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub, None) if sub in modules else (node.lineno, target, a.name))
    return out


def _is_core(module: str) -> bool:
    return any(module == c or module.startswith(c + ".") for c in CORE)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for _, t, _ in _imports(p, modules) if t != m} for m, p in modules.items()}


def test_the_core_imports_no_stage_or_application_module():
    modules = _modules()
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: {m} imports {t}"
           for m, p in modules.items() if _is_core(m)
           for line, t, _ in _imports(p, modules) if not _is_core(t) and t != "fastavatar_nb"]
    assert not bad, "the core (" + ", ".join(sorted(CORE)) + ") must not import a stage or application module:\n" + \
        "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    cycles, state = [], dict.fromkeys(graph, 0)  # 0 unseen, 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if t not in graph:
                continue
            if state[t] == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]))
            elif state[t] == 0:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if state[m] == 0:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_another_modules_private_name():
    modules = _modules()
    bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: from {t} import {name}"
           for m, p in modules.items() for line, t, name in _imports(p, modules)
           if name is not None and name.startswith("_") and not name.startswith("__") and t != m]
    assert not bad, "private names are the module's own; make the name public (and documented) or move it:\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("source, expected", [
    ("from .faces import _embed_boxes\n", [("fastavatar_nb.faces", "_embed_boxes")]),
    ("def f():\n    import fastavatar_nb.faces\n    from fastavatar_nb.ply import _y\n", [("fastavatar_nb.ply", "_y")]),
    ("def f():\n    from .render import _numba_kernels, torch_rasterizer\n", []),
])
def test_the_checks_read_lazy_imports_and_tell_modules_from_names(source, expected):
    # photo.py's imports as the checks read them, with ``source`` in place of its text
    modules = _modules()
    found = [(t, n) for _, t, n in _imports(PACKAGE / "photo.py", modules, source) if n is not None and n.startswith("_")]
    assert found == expected


def test_the_architecture_picture_places_every_module(tmp_path, capsys):
    """scripts/draw_architecture.py (docs/architecture.png) puts every module in a layer, and no import runs up
    its layers; a module it does not place fails, naming it."""
    from repo_scripts import load_script

    draw = load_script("scripts/draw_architecture.py")
    assert draw.main(["--check"]) == 0
    layers = [(name, [m for m in modules if m != "loop"]) for name, modules in draw.LAYERS]
    original, draw.LAYERS = draw.LAYERS, layers
    try:
        assert draw.main(["--check"]) == 1
    finally:
        draw.LAYERS = original
    assert "modules without a layer ['loop']" in capsys.readouterr().err
    assert draw.main(["--out", str(tmp_path / "a.png")]) == 0 and (tmp_path / "a.png").stat().st_size > 10_000
