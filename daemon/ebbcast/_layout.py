"""The package's shape, checked: arrows point down only, no import cycle, and no
module or class grown past the size where it should be split.

The package has four wings and a few modules above and below them::

    cli, __main__, client, configdoc, exits   the command line (may import anything)
    process/   serving/                       never import each other
    backplane/
    core/
    config, values                            import no wing

A module may import a module of a lower rank, or of its own wing (or, above the
wings, another top-level module); never one above it, and ``process`` and
``serving`` never each other. Every import counts: those under ``TYPE_CHECKING``
and those inside functions too, and a cycle between any modules is refused.

``python -m ebbcast._layout`` prints what breaks the shape and exits 1, or
prints the wings and exits 0; ``tests/test_layout.py`` runs the same check.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "ebbcast"
#: Sizes past which a module or a class is split (the configuration schema, one
#: table of every key, is the exception).
MAX_MODULE_LINES, MAX_CLASS_LINES = 500, 350
LONG_MODULES_ALLOWED = {"ebbcast.config"}
#: A wing's rank: a module imports only lower ranks, or its own wing.
#: The modules below every wing besides the package itself: config and what it parses with.
CONFIG_MODULES = {"ebbcast.config", "ebbcast.values"}
RANKS = {"config": 0, "core": 1, "backplane": 2, "serving": 3, "process": 3, "top": 4}


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. "ebbcast.serving.wire"
    path: Path

    @property
    def wing(self) -> str:
        """``core``, ``backplane``, ``serving``, ``process``, ``config`` or ``top``."""
        parts = self.name.split(".")
        if len(parts) > 2 and parts[1] in RANKS:
            return parts[1]
        if len(parts) == 2 and parts[1] in RANKS:  # a wing's __init__, or config
            return parts[1]
        return "config" if parts == [PACKAGE] or self.name in CONFIG_MODULES else "top"


def modules(root: Path) -> dict[str, Module]:
    """Every module of the package whose directory is ``root``, by dotted name."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join([PACKAGE, *parts])
        found[name] = Module(name, path)
    return found


def imports(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, int]]:
    """The package's modules that ``module`` imports, with the line of each import."""
    package = module.name if module.path.name == "__init__.py" else \
        module.name.rpartition(".")[0]
    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield _nearest(alias.name, known), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                dotted = f"{base}.{alias.name}"
                yield (dotted if dotted in known else _nearest(base, known)), node.lineno


def _nearest(dotted: str, known: dict[str, Module]) -> str:
    while dotted not in known and "." in dotted:
        dotted = dotted.rpartition(".")[0]
    return dotted


def problems(root: Path) -> list[str]:
    """What breaks the shape, one line each (empty: none)."""
    known = modules(root)
    found: list[str] = []
    graph: dict[str, set[str]] = {name: set() for name in known}
    for module in known.values():
        for target, line in imports(module, known):
            if target == module.name or target not in known:
                continue
            graph[module.name].add(target)
            arrow = _arrow_problem(module, known[target])
            if arrow:
                found.append(f"{module.path.relative_to(root.parent)}:{line}: {arrow}")
    found.extend(f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph))
    for module in known.values():
        found.extend(size_problems(module, root))
    return found


def size_problems(module: Module, root: Path) -> Iterator[str]:
    """A module over MAX_MODULE_LINES lines, a class over MAX_CLASS_LINES."""
    text = module.path.read_text()
    where = module.path.relative_to(root.parent)
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES and module.name not in LONG_MODULES_ALLOWED:
        yield f"{where}: {lines} lines (at most {MAX_MODULE_LINES})"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_CLASS_LINES:
                yield (f"{where}:{node.lineno}: class {node.name} has {length} lines "
                       f"(at most {MAX_CLASS_LINES})")


def _arrow_problem(source: Module, target: Module) -> str | None:
    if target.name == PACKAGE:  # the package itself: its version, nothing else
        return None
    if source.wing == target.wing:
        return None
    if RANKS[target.wing] < RANKS[source.wing]:
        return None
    return (f"{source.name} ({source.wing}) imports {target.name} ({target.wing}): "
            f"{'a wing beside it' if RANKS[target.wing] == RANKS[source.wing] else 'upward'}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle for each strongly connected group of modules (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(_cycle_through(sorted(group), graph))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _cycle_through(group: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A path from the group's first module back to it, within the group."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node] & members):
            if target == start:
                return paths[node] + [start]
            if target not in paths:
                paths[target] = paths[node] + [target]
                queue.append(target)
    return group  # unreachable for a strongly connected group


def main() -> int:
    root = Path(__file__).resolve().parent
    found = problems(root)
    for line in found:
        print(line)
    if found:
        return 1
    wings: dict[str, list[str]] = {}
    for module in modules(root).values():
        wings.setdefault(module.wing, []).append(module.name)
    for wing in sorted(wings, key=lambda w: -RANKS[w]):
        print(f"{wing}: {len(wings[wing])} modules")
    print("no upward arrow, no cycle, no module or class too long")
    return 0


if __name__ == "__main__":
    sys.exit(main())
