"""The package's import graph as Python reads it: every `import` and `from … import` by name, function-level and
`TYPE_CHECKING` imports included, mapped to the layers the architecture allows.

Why by import name and not by folder: the stage folders are installed under `persona_lora` through setuptools'
`package-dir` (`train/` is `persona_lora.train`), so the file tree alone does not say who imports whom. The map
from import names to files is read from pyproject.toml, as setuptools reads it.

Layers: the shared base (`persona_lora.*` outside the stages), the CLI roof (`persona_lora.cli`,
`persona_lora.__main__`) and the five stages (`train`, `model_cards`, `hub_tools`, `demo`, `evaluation`).
`check(root)` returns every violation as a sentence naming the module, the line and the rule; `test_architecture`
runs it on the repository and on small planted trees.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

STAGES = ("train", "model_cards", "hub_tools", "demo", "evaluation")
ROOF = ("persona_lora.cli", "persona_lora.__main__")

# The stage-to-stage imports the architecture allows, each with the reason it exists. Any other edge between
# stages fails the test; so does any import of a stage from the shared base.
DECLARED_EDGES = {
    ("train", "model_cards"): "a finished run writes its adapter's card (train.trainer, train.preference_train)",
    ("hub_tools", "model_cards"): "merge and upgrade-adapter write the card of the folder they produce or change",
    ("hub_tools", "demo"): "a Space runs the demo's own app, engine and decoding (hub_tools.space.app, .gpu)",
    ("model_cards", "evaluation"): "`card --eval` puts the eval report's summary table into the card",
}


@dataclass
class Graph:
    modules: dict[str, Path]  # import name -> file
    edges: dict[str, dict[str, int]] = field(default_factory=dict)  # importer -> imported -> first line
    private: list[str] = field(default_factory=list)  # "module:line imports other._name"

    def layer(self, name: str) -> str:
        return layer_of(name)


def layer_of(name: str) -> str:
    """'roof', one of STAGES, or 'base'."""
    if name in ROOF:
        return "roof"
    parts = name.split(".")
    if len(parts) > 1 and parts[1] in STAGES:
        return parts[1]
    return "base"


def package_dirs(root: Path) -> dict[str, Path]:
    """pyproject's `[tool.setuptools.package-dir]`: import name prefix -> folder."""
    text = (root / "pyproject.toml").read_text(encoding="utf-8")
    table = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]  # tomllib needs Python 3.11
    mapping = re.findall(r'^"?([\w.]+)"?\s*=\s*"([\w./-]+)"\s*$', table, re.M)
    return {name: root / folder for name, folder in mapping}


def module_files(root: Path) -> dict[str, Path]:
    """Every module's import name and file (the Space's `templates/app.py` included: it runs our code too)."""
    modules: dict[str, Path] = {}
    for prefix, folder in package_dirs(root).items():
        for f in sorted(folder.rglob("*.py")) if folder.is_dir() else []:
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([prefix, *parts])] = f
    return modules


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def read_graph(root: Path) -> Graph:
    graph = Graph(module_files(root))
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[tuple[str, str | None]] = []
            if isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.append((full if full in graph.modules else base, alias.name))
            for target, imported in targets:
                resolved = _resolve(target, graph.modules)
                if resolved is None or resolved == name:
                    continue
                graph.edges.setdefault(name, {}).setdefault(resolved, node.lineno)
                if imported and imported.startswith("_") and not imported.startswith("__"):
                    graph.private.append(f"{name}:{node.lineno} imports {resolved}.{imported}")
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph.modules):
        if v not in index:
            visit(v)
    return found


def floors(graph: Graph) -> int:
    """The longest chain of imports (modules on it), on the graph with each cycle counted as one module."""
    component = {m: m for m in graph.modules}
    for c in cycles(graph):
        for m in c:
            component[m] = c[0]
    depth: dict[str, int] = {}

    def height(v: str, seen: frozenset) -> int:
        if v in depth:
            return depth[v]
        below = [height(component[w], seen | {v}) for w in graph.edges.get(v, {})
                 if component[w] != v and component[w] not in seen]
        depth[v] = 1 + max(below, default=0)
        return depth[v]

    return max((height(component[m], frozenset()) for m in graph.modules), default=0)


def stage_edges(graph: Graph) -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported stage) -> the imports that make the edge, as "module:line -> module"."""
    out: dict[tuple[str, str], list[str]] = {}
    for a, targets in graph.edges.items():
        for b, line in targets.items():
            la, lb = layer_of(a), layer_of(b)
            if la != lb and lb in STAGES and la != "roof":
                out.setdefault((la, lb), []).append(f"{a}:{line} -> {b}")
    return out


def back_edges(graph: Graph) -> list[str]:
    """Imports that point up the layers: the shared base importing a stage or the roof, a stage importing the roof."""
    found = []
    for a, targets in graph.edges.items():
        for b, line in targets.items():
            la, lb = layer_of(a), layer_of(b)
            if (la == "base" and lb != "base") or (la in STAGES and lb == "roof"):
                found.append(f"{a}:{line} imports {b} (the {'shared base' if la == 'base' else la + ' stage'} "
                             f"may not import {'a stage' if lb in STAGES else 'the CLI roof'})")
    return sorted(found)


def roof_reach_ins(graph: Graph) -> list[str]:
    """The roof maps commands to the stages' command modules (`cli`) and uses the shared base; nothing else."""
    found = []
    for a in ROOF:
        for b, line in graph.edges.get(a, {}).items():
            if layer_of(b) in STAGES and not b.endswith(".cli"):
                found.append(f"{a}:{line} imports {b}: the roof imports only a stage's command module (…cli)")
    return found


def check(root: Path) -> list[str]:
    """Every violation of the architecture in the tree at `root`, as sentences naming module and line."""
    graph = read_graph(root)
    problems = back_edges(graph) + roof_reach_ins(graph)
    for (a, b), places in sorted(stage_edges(graph).items()):
        if (a, b) not in DECLARED_EDGES:
            problems.append(f"undeclared stage edge {a} -> {b}: {'; '.join(sorted(places)[:5])} (import the shared "
                            "base instead, move the service into persona_lora/, or declare the edge with its "
                            "reason in tests/import_graph.py and docs/ARCHITECTURE.md)")
    for c in cycles(graph):
        lines = [f"{a}:{graph.edges[a][b]} -> {b}" for a in c for b in graph.edges.get(a, {}) if b in c]
        problems.append(f"import cycle between {', '.join(c)}: {'; '.join(lines)}")
    problems += [f"{p}: another module's private name (make it public, or give the module a public function)"
                 for p in graph.private]
    return problems


def summary(graph: Graph) -> str:
    edges = sorted(stage_edges(graph))
    return (f"modules {len(graph.modules)}; floors {floors(graph)}; back edges {len(back_edges(graph))}; "
            f"cycles {len(cycles(graph))}; stage edges {len(edges)} "
            f"({', '.join(f'{a}->{b}' for a, b in edges)}); private imports {len(graph.private)}")


def layer_picture() -> str:
    """The ASCII picture of the layers for docs/ARCHITECTURE.md, drawn from STAGES, ROOF and DECLARED_EDGES."""
    lines = ["    roof     persona_lora.cli  (one table of commands → each stage's cli module)",
             "                 │",
             "    stages   " + "   ".join(STAGES),
             "                 │  declared stage → stage edges:"]
    lines += [f"                 │    {a} → {b}: {why}" for (a, b), why in DECLARED_EDGES.items()]
    lines += ["                 ▼",
              "    base     persona_lora.*  (artifact, chat_format, presets, model_loading, engines, votes, resident,",
              "             dataset/, hubs/, peft_compat, expert_lora, row_routing, …): imports no stage, no roof"]
    return "\n".join(lines)


LAYERS_START, LAYERS_END = "<!-- layers:start (drawn by tests/import_graph.py) -->", "<!-- layers:end -->"


def with_layer_picture(doc: str) -> str:
    pattern = re.compile(re.escape(LAYERS_START) + r".*?" + re.escape(LAYERS_END), re.S)
    return pattern.sub(lambda _: f"{LAYERS_START}\n```\n{layer_picture()}\n```\n{LAYERS_END}", doc)


def long_modules(root: Path, limit: int) -> dict[str, int]:
    """Modules over `limit` lines (path relative to `root` -> lines): reported, since a module split only to stay
    under a cap tends to become two modules that import each other."""
    sizes = {str(f.relative_to(root)): len(f.read_text(encoding="utf-8").splitlines())
             for f in module_files(root).values()}
    return {path: n for path, n in sorted(sizes.items()) if n > limit}


SIZES_START, SIZES_END = "<!-- long-modules:start (listed by tests/import_graph.py) -->", "<!-- long-modules:end -->"


def with_size_report(doc: str, long: dict[str, int]) -> str:
    body = "\n".join(f"- `{path}`: {n} lines" for path, n in long.items()) or "- none"
    pattern = re.compile(re.escape(SIZES_START) + r".*?" + re.escape(SIZES_END), re.S)
    return pattern.sub(lambda _: f"{SIZES_START}\n{body}\n{SIZES_END}", doc)


def write_docs(root: Path, limit: int = 500) -> None:
    """Redraw the layer picture and the long-module list in docs/ARCHITECTURE.md (`make arch-docs`)."""
    path = root / "docs" / "ARCHITECTURE.md"
    doc = path.read_text(encoding="utf-8")
    path.write_text(with_size_report(with_layer_picture(doc), long_modules(root, limit)), encoding="utf-8")
