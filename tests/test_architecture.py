"""The package's import graph keeps the layer order of docs/ARCHITECTURE.md: no import cycle between modules,
no arrow from a lower layer to a higher one, and every module and path that page names exists.

The order is written down once, in the page's fenced `layers` block (low -> high, one layer a line: a name,
then the files and packages it holds, relative to src/), which this test reads. Every import of a module
under src/lorakit counts, at the top of a module or inside a function, so a late import cannot hide a
cycle; imports under `if TYPE_CHECKING:` never run and do not count. The one arrow up to the tools
(lorakit_bench) is the `bench` command in lorakit/cli.py.
"""

from __future__ import annotations

import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PAGE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("lorakit", "lorakit_bench")
BENCH_COMMAND = ("lorakit.cli", "cmd_bench")  # `lorakit bench`: the library's one way up to lorakit_bench


@dataclass(frozen=True)
class Arrow:
    """One import: module `source` imports module `target` (at `line`, inside function `function` or None)."""

    source: str
    target: str
    line: int
    function: str | None

    def __str__(self) -> str:
        where = f" in {self.function}()" if self.function else ""
        return f"{self.source} -> {self.target} ({module_path(self.source)}:{self.line}{where})"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    """Every module of both packages, by dotted name."""
    return {module_name(p): p for package in PACKAGES for p in sorted((SRC / package).rglob("*.py"))}


MODULES = all_modules()


def module_path(name: str) -> str:
    return str(MODULES[name].relative_to(ROOT))


def owner(name: str) -> str | None:
    """The module a dotted import name lands in: the name itself, else its longest module prefix
    (`from lorakit.kernels import FactorCache` lands in lorakit.kernels, `... import dequant` in
    lorakit.kernels.dequant); None outside the two packages."""
    if name.split(".")[0] not in PACKAGES:
        return None
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def arrows_of(name: str, text: str | None = None) -> list[Arrow]:
    """The imports of module `name` (its file, or source `text` read as that module) that land in lorakit
    or lorakit_bench."""
    path = MODULES[name]
    found: list[Arrow] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:  # the `if` body is for type checkers only
                    visit_one(sub, function)
            else:
                visit_one(child, function)

    def visit_one(node: ast.AST, function: str | None) -> None:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, name, path)
            targets = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
        else:
            inner = node.name if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
            visit(node, function if function is not None or inner is None else inner)
            return
        for target in sorted({owner(t) for t in targets} - {None}):
            found.append(Arrow(name, target, node.lineno, function))

    visit(ast.parse(path.read_text() if text is None else text, str(path)), None)
    return found


def absolute(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The absolute module of a `from X import ...` (relative ones resolved against `name`)."""
    if not node.level:
        return node.module or ""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = package[: len(package) - node.level + 1]
    return ".".join(package + ([node.module] if node.module else []))


LIBRARY = sorted(m for m in MODULES if m.split(".")[0] == "lorakit")
ARROWS = [a for m in LIBRARY for a in arrows_of(m)]
EVERY_ARROW = [a for m in MODULES for a in arrows_of(m)]  # the library's and the tools'


# ---------------------------------------------------------------------------------------------
# The layer block of docs/ARCHITECTURE.md
# ---------------------------------------------------------------------------------------------


def read_layers(text: str) -> list[tuple[str, list[str]]]:
    """(layer name, its entries) low -> high from the page's ```layers block; an entry is a file (`.py`) or a
    package folder (ending in /) under src/. `#` starts a comment."""
    blocks = re.findall(r"^```layers[ \t]*\n(.*?)^```", text, re.S | re.M)
    if len(blocks) != 1:
        raise ValueError(f"{PAGE.name} must hold exactly one ```layers block, found {len(blocks)}")
    layers = []
    for line in blocks[0].splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            layer, _, entries = line.partition(":")
            layers.append((layer.strip(), entries.split()))
    return layers


def covers(entry: str, name: str) -> bool:
    """Whether a layer entry holds module `name` (a file: that module; a folder: the package and below)."""
    path = MODULES[name].relative_to(SRC).as_posix()
    return path.startswith(entry) if entry.endswith("/") else path == entry


def layer_index(layers: list[tuple[str, list[str]]]) -> dict[str, int]:
    """Each module's layer (0 = lowest); a module no entry holds, or two do, is an error."""
    index = {}
    for name in MODULES:
        found = [i for i, (_, entries) in enumerate(layers) for e in entries if covers(e, name)]
        if len(found) != 1:
            raise ValueError(f"{module_path(name)} is in {len(found)} entries of the layers block; it needs one")
        index[name] = found[0]
    return index


LAYERS = read_layers(PAGE.read_text())


def test_the_layer_block_holds_every_module_once_and_names_only_what_exists():
    entries = [e for _, es in LAYERS for e in es]
    assert len(entries) == len(set(entries))
    for entry in entries:
        assert (SRC / entry).is_dir() if entry.endswith("/") else (SRC / entry).is_file(), f"{entry} does not exist"
    index = layer_index(LAYERS)  # raises naming a module held by no entry, or by two
    assert index["lorakit.kernels.dequant"] < index["lorakit.quant.linear4bit"] < index["lorakit.cli"]
    assert max(index.values()) == index["lorakit_bench.run"]  # the tools sit above the whole library


def test_no_import_cycle():
    """No module of the library or the tools reaches itself through imports, counting function-level ones."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a in EVERY_ARROW:
        if a.target in graph and a.target != a.source:
            graph[a.source].add(a.target)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    described = []
    for members in cycles:
        path = cycle_through(graph, members)
        steps = [next(a for a in EVERY_ARROW if a.source == s and a.target == t) for s, t in itertools.pairwise(path)]
        described.append("\n    ".join(str(s) for s in steps))
    assert not cycles, "import cycles:\n  " + "\n  ".join(described)


def test_no_arrow_from_a_lower_layer_to_a_higher_one():
    index = layer_index(LAYERS)
    names = [name for name, _ in LAYERS]
    upward = [a for a in ARROWS if index[a.target] > index[a.source] and not bench_command(a)]
    assert not upward, "imports from a lower layer up to a higher one:\n  " + "\n  ".join(
        f"{a}: {names[index[a.source]]} -> {names[index[a.target]]}" for a in upward)


def test_only_the_bench_command_imports_the_tools():
    """lorakit_bench is a tool above the library: the library reaches it from `lorakit bench` only."""
    into_tools = [a for a in ARROWS if a.target.split(".")[0] == "lorakit_bench"]
    assert into_tools and all(bench_command(a) for a in into_tools), "\n".join(map(str, into_tools))


def bench_command(arrow: Arrow) -> bool:
    return (arrow.source, arrow.function) == BENCH_COMMAND and arrow.target.split(".")[0] == "lorakit_bench"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` (node -> successors)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def cycle_through(graph: dict[str, set[str]], members: list[str]) -> list[str]:
    """One cycle inside a strongly connected component, as a path that ends where it starts."""
    start, inside = members[0], set(members)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first: the shortest way back to start
        v = todo.pop(0)
        for w in sorted(graph[v] & inside):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle through {start}")


def test_the_checks_catch_a_cycle_and_an_upward_arrow():
    """The checks above can fail: a made-up graph with a cycle, and a layer block read from text."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]
    assert cycle_through(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    layers = read_layers("```layers\n# low\nlow: lorakit/kernels/  # leaves\nhigh: lorakit/quant/ lorakit/x.py\n```\n")
    assert layers == [("low", ["lorakit/kernels/"]), ("high", ["lorakit/quant/", "lorakit/x.py"])]
    assert covers("lorakit/kernels/", "lorakit.kernels.dequant") and not covers("lorakit/kernels/", "lorakit.cli")
    with pytest.raises(ValueError, match="is in 0 entries"):
        layer_index(layers)
    source = ("from typing import TYPE_CHECKING\nimport torch\nimport lorakit.models\nfrom lorakit import kernels\n"
              "from lorakit.kernels import FactorCache\nif TYPE_CHECKING:\n    from lorakit.train.fit import fit\n"
              "def f():\n    from lorakit.config import TrainConfig\n")
    found = {(a.target, a.function) for a in arrows_of("lorakit.devices", source)}
    assert found == {("lorakit.models", None), ("lorakit.kernels", None), ("lorakit.config", "f")}


# ---------------------------------------------------------------------------------------------
# What the page names
# ---------------------------------------------------------------------------------------------

CODE = re.compile(r"`([^`\s]+)`")


def named_paths(text: str) -> list[str]:
    """Paths the page names in backticks: a token with a slash or a .py/.md file name."""
    return [t for t in CODE.findall(text) if re.fullmatch(r"[\w./-]+", t) and ("/" in t or t.endswith((".py", ".md")))]


def named_modules(text: str) -> list[str]:
    """Dotted names the page gives in backticks from the packages (`lorakit.models.load`)."""
    return [t for t in CODE.findall(text) if re.fullmatch(r"lorakit(_bench)?(\.\w+)+", t)]


def test_every_path_and_module_the_page_names_exists():
    text = PAGE.read_text()
    assert len(named_paths(text)) > 20
    assert not missing_names(text), f"{PAGE.name} names what does not exist: {missing_names(text)}"


def test_a_name_that_does_not_exist_is_caught():
    text = ("`kernels/dequant.py` `src/lorakit/kernels/` `tests/test_fastpath.py` `lorakit.models.load` "
            "`lorakit.LoraSpec` `kernels/nope.py` `lorakit.models.nope` `lorakit.nope` `load(base)` `a -> b`")
    assert missing_names(text) == ["kernels/nope.py", "lorakit.models.nope", "lorakit.nope"]


def missing_names(text: str) -> list[str]:
    """The paths and dotted module names a page gives in backticks that do not exist."""
    bases = (ROOT, SRC, SRC / "lorakit")  # a path is written from the repository, src/ or the package
    missing = [p for p in named_paths(text) if not any((b / p).exists() for b in bases)]
    for name in named_modules(text):
        module = owner(name)  # the module part; the rest must be something it defines (`lorakit.models.load`)
        attribute = name[len(module) + 1:].split(".")[0] if module else None
        if module is None or (attribute and attribute not in top_level_names(module)):
            missing.append(name)
    return missing


def top_level_names(module: str) -> set[str]:
    """What a module defines or imports at its top level."""
    names = set()
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names
