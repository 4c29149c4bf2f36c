"""The module import graph of `tpcomp_megatron`, from its `import` / `from` statements.

    python tools/import_graph.py                                # every edge, one per line
    python tools/import_graph.py --cycles                       # cycles anywhere in the package
    python tools/import_graph.py --cycles tpcomp_megatron.models  # cycles among models/ only
    python tools/import_graph.py --cycles --root /tmp/head      # another tree (a `git archive`)

Every import statement counts, module-level or inside a function (a deferred import still ties
the two modules together), `if TYPE_CHECKING:` ones included; imports of modules outside the
package are left out. `from pkg import name` is an edge to `pkg.name` when that is a module of
the package, else to `pkg` (its `__init__`). The implicit import of a module's parent packages is
not an edge (it would make every package whose `__init__` re-exports its modules a cycle).

`--cycles [PREFIX]` keeps the modules named PREFIX or under it, prints each strongly connected
component of two or more modules (or a module importing itself) with the shortest cycle through
each of its modules, and exits 1 if there is any, 0 if none.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tpcomp_megatron"

Graph = dict[str, set[str]]


def module_files(package_dir: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every .py under `package_dir` (a package's name is its __init__)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest module of the package that `name` (a dotted module path) is or lies inside."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    here = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _resolve(alias.name, modules)) is not None:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if sub in modules else _resolve(base, modules)
                if target is not None:
                    out.add(target)
    return out


def import_graph(package: str = PACKAGE, root: Path = ROOT) -> Graph:
    """Module -> the package's modules it imports."""
    modules = module_files(root / package.replace(".", "/"), package)
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def restrict(graph: Graph, prefix: str) -> Graph:
    """The subgraph of modules named `prefix` or under it."""
    def inside(m: str) -> bool:
        return m == prefix or m.startswith(prefix + ".")

    return {m: {t for t in ts if inside(t)} for m, ts in graph.items() if inside(m)}


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's components (iterative), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                out.append(sorted(component))
    return sorted(out)


def shortest_cycle(graph: Graph, start: str) -> list[str] | None:
    """The shortest import chain from `start` back to itself (breadth first), or None."""
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if child not in seen:
                seen.add(child)
                parent[child] = node
                queue.append(child)
    return None


def cycles(graph: Graph) -> list[tuple[list[str], list[list[str]]]]:
    """(component, its distinct shortest cycles) for every component that holds a cycle."""
    out = []
    for component in strongly_connected(graph):
        if len(component) == 1 and component[0] not in graph.get(component[0], ()):
            continue
        sub = restrict_to(graph, set(component))
        found: list[list[str]] = []
        keys = set()
        for module in component:
            cycle = shortest_cycle(sub, module)
            if cycle is None:
                continue
            body = cycle[:-1]
            turn = body.index(min(body))
            key = tuple(body[turn:] + body[:turn])
            if key not in keys:
                keys.add(key)
                found.append([*key, key[0]])
        out.append((component, found))
    return out


def restrict_to(graph: Graph, members: set[str]) -> Graph:
    return {m: graph[m] & members for m in members}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", nargs="?", const=PACKAGE, metavar="PREFIX",
                    help=f"print import cycles among modules under PREFIX (default {PACKAGE}); exit 1 if any")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="the folder holding the package (default: this checkout), e.g. a `git archive` of a commit")
    args = ap.parse_args(argv)
    graph = import_graph(root=args.root)
    if args.cycles is None:
        for module in sorted(graph):
            for target in sorted(graph[module]):
                print(f"{module} -> {target}")
        return 0
    sub = restrict(graph, args.cycles)
    if not sub:
        print(f"no module named {args.cycles} or under it", file=sys.stderr)
        return 2
    found = cycles(sub)
    for component, chains in found:
        print(f"cycle among {len(component)} modules: {', '.join(component)}")
        for chain in chains:
            print("    " + " -> ".join(chain))
    print(f"{len(found)} import cycle(s) among {len(sub)} modules under {args.cycles}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
