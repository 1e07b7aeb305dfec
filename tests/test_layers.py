"""The house shows its layers: drawn from the imports (every ``import`` in a module, in
functions and under TYPE_CHECKING too), no module or package imports itself back through
others, and no import runs from a lower layer to a higher one. ``jobs/`` holds only the
commands ``cxr`` dispatches to (and the CLI and Ray start-up they share); measurement and
release scripts live in ``experiments/``."""

import ast
from pathlib import Path

from jobs.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the first layer whose prefix it starts with (the longest
# prefixes are listed where a package spans layers).
LAYERS: list[tuple[str, ...]] = [
    # 0: data in and out, numbers, pictures: no model, no registry
    ("cxr.data", "cxr.metrics", "cxr.plots", "cxr.weights", "cxr.dicom_sr", "cxr.preprocess", "cxr.masking",
     "cxr.train.contract"),
    # 1: what a model is: settings, architectures, cards, rules on predictions
    ("cxr.config", "cxr.models", "cxr.card", "cxr.operating_point", "cxr.crossval", "cxr.tune", "cxr.lease"),
    # 2: a model at work on images, its files, the scores table
    ("cxr.qc", "cxr.explain", "cxr.component", "cxr.model_card", "cxr.package", "cxr.model_input",
     "cxr.classification", "cxr.segmentation", "cxr.gates", "cxr.scores_table", "cxr.monitoring"),
    # 3: the services a workflow composes: the registry, the screen, training loops, the pipeline
    ("cxr.tracking", "cxr.screen", "cxr.pyfunc", "cxr.evaluation", "cxr.benchmark", "cxr.scoring", "cxr.new_work",
     "cxr.report", "cxr.train"),
    # 4: what each job does
    ("cxr.workflows",),
    # 5: the Python API (cxr.load)
    ("cxr",),
    # 6: the commands, then what measures and ships them
    ("jobs",),
    ("experiments",),
]


def layer(module: str) -> int:
    best = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no layer: add it to tests/test_layers.py"
    return best[0]


def modules() -> dict[str, Path]:
    found = {}
    for top in ("cxr", "jobs", "experiments"):
        for path in (ROOT / top).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (``from a import b`` counts b where b is a module)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        edges = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in known}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                submodules = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
                if base in known and len(submodules) < len(node.names):    # a name defined in base itself
                    edges.add(base)
                edges |= submodules
        graph[name] = edges - {name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph between packages (cxr.train, cxr.workflows, cxr.data, ...) and top modules."""
    def unit(m: str) -> str:
        parts = m.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and (ROOT / Path(*parts)).is_dir()) else m

    out: dict[str, set[str]] = {}
    for m, deps in graph.items():
        out.setdefault(unit(m), set()).update(unit(d) for d in deps if unit(d) != unit(m))
    return out


def test_no_circle_between_modules_or_packages():
    graph = imports()
    assert circles(graph) == []
    assert circles(packages(graph)) == []


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = sorted(f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
                    for m, deps in imports().items() for d in deps if layer(d) > layer(m))
    assert upward == []


def test_jobs_holds_only_commands():
    commands = {module for _, module, _ in COMMANDS.values()}
    helpers = {"jobs", "jobs.cli", "jobs.runtime"}
    assert {m for m in modules() if m.startswith("jobs")} - helpers == commands
