"""The target graph: selection, cycles, topological order."""

from __future__ import annotations

from tunemake.errors import located
from tunemake.tunefile import Project


def check_acyclic(project: Project) -> None:
    """Raise a one-line error that prints the cycle, e.g. `a -> b -> a`."""
    done: set[str] = set()
    for root in project.targets:
        if root in done:
            continue
        path: list[str] = [root]  # the current DFS path (grey nodes)
        on_path = {root}
        iters = [iter(project.targets[root].target_deps)]
        while iters:
            dep = next(iters[-1], None)
            if dep is None:
                finished = path.pop()
                done.add(finished)
                on_path.discard(finished)
                iters.pop()
                continue
            if dep in on_path:
                cycle = path[path.index(dep):] + [dep]
                target = project.targets[path[-1]]
                raise located(project.file.name, target.line, path[-1], None,
                              "dependency cycle: " + " -> ".join(cycle))
            if dep not in done:
                path.append(dep)
                on_path.add(dep)
                iters.append(iter(project.targets[dep].target_deps))


def closure(project: Project, roots: list[str]) -> list[str]:
    """The roots and everything they depend on, dependencies first (a stable topological order)."""
    order: list[str] = []
    seen: set[str] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(project.targets[root].target_deps))]
        while stack:
            name, deps = stack[-1]
            dep = next(deps, None)
            if dep is None:
                order.append(name)
                stack.pop()
            elif dep not in seen:
                seen.add(dep)
                stack.append((dep, iter(project.targets[dep].target_deps)))
    return order


def dependents(project: Project) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {name: [] for name in project.targets}
    for name, target in project.targets.items():
        for dep in target.target_deps:
            out[dep].append(name)
    return out
