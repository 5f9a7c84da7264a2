"""The import graph of imet/: no cycle, and no import against the layer order of docs/architecture.md.

Every `import` and `from ... import` in a module counts, wherever it is written: at the top, inside a
function (a lazy import) or under `if TYPE_CHECKING:`. The layers are read from the table under "## Layers"
in docs/architecture.md (the one place they are written): a module may import modules of its own layer
and of the layers listed before it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package is named by its __init__.py)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of `package` it imports (`from a import b` imports a, and a.b where that is a module)."""
    mods = modules(package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*here[:len(here) - node.level + 1], *filter(None, [node.module])]) if node.level \
                    else node.module
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, modules and edges in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def read_layers(doc: Path) -> list[list[str]]:
    """The module names of each layer, in order, from the table under "## Layers" (a package holds its modules)."""
    text = doc.read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if re.match(r"\|\s*\d+\s*\|", line)]
    return [re.findall(r"`([\w/]+)`", row[2]) for row in rows]


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The layer holding `module`: named itself, or a package above it (`heads/` holds imet.heads.base)."""
    rel = module.split(".", 1)[1] if "." in module else "__init__"
    for k, names in enumerate(layers):
        if any((rel + ".").startswith(n.rstrip("/").replace("/", ".") + ".") for n in names):
            return k
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT / "imet"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_import_follows_the_layers_of_docs_architecture():
    layers = read_layers(ROOT / "docs" / "architecture.md")
    assert len(layers) >= 5 and all(layers), layers
    graph = import_graph(ROOT / "imet")
    unplaced = sorted(m for m in graph if layer_of(m, layers) is None)
    assert not unplaced, f"modules in no layer of docs/architecture.md: {', '.join(unplaced)}"
    upward = [f"{m} (layer {layer_of(m, layers) + 1}) imports {n} (layer {layer_of(n, layers) + 1})"
              for m in sorted(graph) for n in sorted(graph[m]) if layer_of(n, layers) > layer_of(m, layers)]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_checks_see_a_lazy_cycle_and_an_upward_import(tmp_path):
    """The walker on a planted package: a cycle closed by an import inside a function, and a relative import."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "low.py").write_text("import os\n\ndef f():\n    from pkg.sub import high\n    return high\n")
    (pkg / "sub" / "high.py").write_text("from .. import low\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.sub": set(), "pkg.low": {"pkg.sub", "pkg.sub.high"},
                     "pkg.sub.high": {"pkg", "pkg.low"}}
    assert find_cycle(graph) == ["pkg.low", "pkg.sub.high", "pkg.low"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    layers = [["__init__", "low"], ["sub/"]]
    placed = [layer_of(m, layers) for m in ("pkg", "pkg.low", "pkg.sub", "pkg.sub.high", "pkg.lower")]
    assert placed == [0, 0, 1, 1, None]
