"""The package's architecture as its import graph has it (issue 20): no import cycle anywhere in fluxrecipe.

The layers (the command layer over the sweep package over the engine) and Hydra's place (only the command
layer, the sweep package and the recipe loader import hydra or omegaconf) are import-linter's contracts in
pyproject.toml, checked by `lint-imports` in .ci/run; a cycle is caught here, whatever the layers say.
"""

from __future__ import annotations

import grimp


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every group of modules that import each other in a circle (directly or through others), each sorted:
    the strongly connected components of more than one module, and a module that imports itself."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph.modules):
        if root in order:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        order[root] = low[root] = len(order)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, imported = work[-1]
            step = next(imported, None)
            if step is not None:
                if step not in order:
                    order[step] = low[step] = len(order)
                    stack.append(step)
                    on_stack.add(step)
                    work.append((step, iter(sorted(graph.find_modules_directly_imported_by(step)))))
                elif step in on_stack:
                    low[module] = min(low[module], order[step])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[module])
            if low[module] == order[module]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == module:
                        break
                if len(component) > 1 or graph.direct_import_exists(importer=module, imported=module):
                    cycles.append(sorted(component))
    return sorted(cycles)


def test_the_cycle_finder_finds_circles_and_only_them():
    graph = grimp.ImportGraph()
    for importer, imported in [("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e"), ("p.f", "p.f")]:
        graph.add_import(importer=importer, imported=imported)
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"], ["p.f"]]


def test_no_import_cycle_in_the_package():
    """Imports inside functions and under TYPE_CHECKING count: a circle is a circle wherever it is written."""
    graph = grimp.build_graph("fluxrecipe", exclude_type_checking_imports=False, cache_dir=None)
    assert import_cycles(graph) == []
