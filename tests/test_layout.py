"""The README's floor map is the code's: every module of qkvtune is on a floor, and imports only modules on its
floor or below, and no modules import each other in a circle (lazy imports inside functions included)."""

import ast
import os
import re

from conftest import REPO

PACKAGE = os.path.join(REPO, "qkvtune")


def readme_floors() -> dict[str, int]:
    """{path as the README names it ('cli.py', 'bench/', 'plan/'): floor}, from the map's code block."""
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = text.split("## Architecture", 1)[1].split("```", 2)[1]
    floors, floor = {}, None
    for line in block.splitlines():
        m = re.match(r"^(?:floor (\d))?\s+(\S+)", line)
        if not m:
            continue
        floor = int(m.group(1)) if m.group(1) else floor
        token = m.group(2)
        if token.endswith((".py", "/")):
            floors[token] = floor
    return floors


def modules() -> dict[str, str]:
    """{dotted name relative to qkvtune ('data.spec', 'bench'): file path}."""
    out = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__").removesuffix("__init__")] = path
    return out


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    """The most specific entry of the map that names ``module`` (a file, else its package folder)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        stem = "/".join(parts[:i])
        for key in (stem + ".py", stem + "/"):
            if key in floors:
                return floors[key]
    return None


def imports(module: str, path: str, known: set[str]) -> set[str]:
    """The qkvtune modules ``module`` imports, anywhere in the file (relative or absolute)."""
    package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "qkvtune":
                base = node.module.split(".")[1:]
            else:
                continue
            name = ".".join(base)
            subs = {f"{name}.{a.name}".strip(".") for a in node.names}
            # "from . import scores" imports the submodule scores; the package itself only for names that are
            # not submodules (its own definitions)
            out |= (subs & known) | ({name} & known if subs - known else set())
        elif isinstance(node, ast.Import):
            out |= {a.name[len("qkvtune."):] for a in node.names if a.name.startswith("qkvtune.")} & known
    return out - {module}


def test_every_module_is_on_the_map_and_imports_only_its_floor_or_below():
    floors, mods = readme_floors(), modules()
    mods.pop("", None)  # the package's face (qkvtune/__init__.py) re-exports the API from any floor
    mods.pop("__main__", None)
    unplaced = sorted(m for m in mods if floor_of(m, floors) is None)
    assert not unplaced, f"modules the README's map does not place: {unplaced}"
    upward = []
    for m, path in mods.items():
        for target in imports(m, path, set(mods)):
            if target and floor_of(target, floors) > floor_of(m, floors):
                upward.append(f"{m} (floor {floor_of(m, floors)}) imports {target} (floor {floor_of(target, floors)})")
    assert not upward, "\n".join(upward)


def test_the_map_reader_sees_the_floors():
    floors = readme_floors()
    assert floors["cli.py"] == 4 and floors["analyze.py"] == 4 and floors["analysis/"] == 2 and floors["plan/"] == 3
    assert floors["data/"] == 0 and floor_of("data.spec", floors) == 0 and floor_of("data.families.glue", floors) == 0
    assert floors["packing.py"] == 1 and floor_of("chunked_loss", floors) == 1
    assert floor_of("bench.runner", floors) == 4 and floor_of("deltas.lora", floors) == 0


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import circle."""
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def test_no_module_imports_another_in_a_circle():
    mods = modules()
    mods.pop("", None)
    mods.pop("__main__", None)
    graph = {m: imports(m, path, set(mods)) - {""} for m, path in mods.items()}
    assert import_circles(graph) == []
    # the check sees a circle where there is one, lazy or not
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_over_600_lines():
    """A module that grows past this is doing more than one job: split it by job (as plan/ is)."""
    long = {m: n for m, path in modules().items() if (n := sum(1 for _ in open(path, encoding="utf-8"))) > 600}
    assert not long, long
