"""The house rules of docs/ARCHITECTURE.md, read from the code's own imports: no import circles (a package's
``__init__`` counted as the module it is: run before any module of its package, importing what it imports), no arrow
from a lower layer to a higher one, the SDK apart from the server, no oversized server module."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Layers from the ground up (docs/ARCHITECTURE.md): a module may import its own layer or any below it.
LAYERS: list[tuple[str, ...]] = [
    ("lepton", "lepton.errors", "lepton.utils", "lepton.plots"),
    ("lepton.config", "lepton.presets", "lepton.tracking"),
    ("lepton.data", "lepton.hospital"),
    ("lepton.models", "lepton.rundir"),
    ("lepton.tasks",),
    ("lepton.runs", "lepton.cost", "lepton.tracking.compare"),
    ("lepton.train", "lepton.pretrain"),
    ("lepton.pathology",
     "lepton.evaluate", "lepton.label", "lepton.explain", "lepton.robustness", "lepton.export", "lepton.precision",
     "lepton.federated", "lepton.distill", "lepton.batch", "lepton.validation"),
    ("lepton.registry",),
    ("lepton.serve", "lepton.client", "lepton.pacs"),
    ("lepton.demo",),
    ("lepton.cli", "lepton.__main__"),
]


def modules(src: Path = SRC) -> dict[str, Path]:
    found = {}
    for path in (src / "lepton").rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def lazy_exports(path: Path) -> dict[str, str]:
    """The names a package ``__init__`` hands on lazily, each to the module it comes from (``_EXPORTS``)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Every lepton module's lepton imports, deferred ones (inside functions) included. A module also imports its
    package: Python runs the package's ``__init__`` first. ``from package import name`` points to the module the
    package hands ``name`` on from, when it does so lazily."""
    mods = modules(src)
    lazy = {name: lazy_exports(path) for name, path in mods.items() if path.name == "__init__.py"}

    def target(base: str, attr: str) -> str:
        if f"{base}.{attr}" in mods:
            return f"{base}.{attr}"
        seen = set()
        while attr in lazy.get(base, {}) and base not in seen:
            seen.add(base)
            base = lazy[base][attr]
        return base

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        if package != name and package in mods:  # (a folder without __init__.py, such as migrations, is none)
            graph[name].add(package)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    head = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(head + ([base] if base else []))
                targets = [target(base, a.name) for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def layer(module: str) -> int:
    best, rank = -1, None
    for i, names in enumerate(LAYERS):
        for prefix in names:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer: add it to LAYERS and docs/ARCHITECTURE.md"
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))


def test_the_graph_is_read_from_the_code():
    graph = import_graph()
    assert len(graph) > 60
    assert "lepton.tasks.base" in graph["lepton.runs"] and "lepton.data.base" in graph["lepton.data.readers.dicom"]
    assert "lepton.registry.bundle" in graph["lepton.registry.core"]  # a deferred import counts too
    assert "lepton.data.readers" in graph["lepton.data.readers.io"]  # a module imports its package first
    assert "lepton.data.index.dataset" in graph["lepton.train.data"]  # `from lepton.data import ImageSet`, handed on


def test_a_package_init_importing_its_modules_is_a_circle_and_a_lazy_one_is_not(tmp_path):
    pkg = tmp_path / "lepton" / "pkg"
    pkg.mkdir(parents=True)
    (tmp_path / "lepton" / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("def f():\n    return 1\n")
    (tmp_path / "lepton" / "user.py").write_text("from lepton.pkg import f\n")
    (pkg / "__init__.py").write_text("from lepton.pkg.mod import f\n")
    assert cycles(import_graph(tmp_path)) == [["lepton.pkg", "lepton.pkg.mod"]]
    (pkg / "__init__.py").write_text('_EXPORTS = {"f": "lepton.pkg.mod"}\n')
    graph = import_graph(tmp_path)
    assert cycles(graph) == [] and graph["lepton.user"] == {"lepton", "lepton.pkg.mod"}


def test_a_planted_circle_and_an_upward_arrow_are_caught():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert layer("lepton.data.readers.io") < layer("lepton.tasks.base") < layer("lepton.serve.routers.oip")
    assert upward({"lepton.data.readers.io": {"lepton.runs", "lepton.data.base"}}) == \
        ["lepton.data.readers.io -> lepton.runs"]


def test_no_import_circles():
    graph = import_graph()
    # every package's __init__ counts as a module: one importing its own modules would sit in a circle with them
    assert cycles(graph) == []


def test_data_and_models_hand_names_on_lazily():
    code = ("import sys, lepton.data, lepton.models; print(sorted(m for m in sys.modules if m.startswith("
            "('lepton.data.', 'lepton.models.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
    from lepton.data import ImageSet, load_dataset
    from lepton.data.index.dataset import ImageSet as defined
    from lepton.models import create_model, list_models

    assert ImageSet is defined and load_dataset.__module__ == "lepton.data.index.sources"
    assert create_model.__module__ == list_models.__module__ == "lepton.models.factory"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = __import__("lepton.data").data.nothing


def test_imports_only_point_to_the_same_layer_or_below():
    assert upward(import_graph()) == []


def test_formats_do_not_import_each_other_and_the_sdk_not_the_server():
    graph = import_graph()
    formats = {f"lepton.data.readers.{name}" for name in ("raster", "npy", "dicom", "nifti")}
    for name in formats:
        assert not graph[name] & (formats | {"lepton.data.readers.io"}), name
    assert not any(t.startswith("lepton.serve") for t in graph["lepton.client"])


def test_no_server_module_over_350_lines():
    big = {p.name: n for p in (SRC / "lepton" / "serve").rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 350}
    assert big == {}


@pytest.mark.parametrize("module", ["lepton.cli", "lepton.tasks", "lepton.data"])
def test_light_modules_do_not_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


#: Methods a library calls by name on a subclass; Lepton's code never names them.
OVERRIDES = {
    "_check_input_dim",  # torch's BatchNorm hook (train/distributed.py)
    "get_next",  # ONNX Runtime's CalibrationDataReader (export.py)
    "compute_anchor_matched_idxs",  # MONAI's RetinaNetDetector.compute_loss (models/detection.py)
}


def test_no_dead_code():
    """Every undecorated function, class and method under src/ is named somewhere besides its definition (src/,
    tests/, benchmarks/, docs/). Decorated ones are found through their decorator's table: CLI verbs, routes, readers,
    networks, validators."""
    root = SRC.parent
    texts = [p.read_text() for d in ("src", "tests", "benchmarks") for p in (root / d).rglob("*.py")]
    texts += [p.read_text() for p in (root / "docs").rglob("*.md")]
    words = Counter(re.findall(r"\w+", "\n".join(texts)))
    dead = [f"{path.relative_to(SRC)}:{node.lineno} {node.name}"
            for path in sorted((SRC / "lepton").rglob("*.py"))
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and not node.decorator_list
            and not node.name.startswith("__") and node.name not in OVERRIDES and words[node.name] < 2]
    assert dead == [], "defined and never used: remove them, or name their use"


def task_branches(root: Path, names: set[str]) -> list[str]:
    """``file:line`` of every place outside ``lepton/tasks/`` under ``root`` that branches on a task: ``.dense`` (read
    as grep reads it, comments too) or a comparison (``==``, ``!=``, ``in``, ``not in``, a ``case`` pattern) with a
    registered task's name, alone or in a tuple, list or set."""

    def named(node: ast.AST) -> bool:
        elts = node.elts if isinstance(node, ast.Tuple | ast.List | ast.Set) else [node]
        return any(isinstance(e, ast.Constant) and e.value in names for e in elts)

    hits = []
    for path in sorted((root / "lepton").rglob("*.py")):
        if "tasks" in path.relative_to(root / "lepton").parts[:-1]:
            continue
        where = path.relative_to(root)
        text = path.read_text()
        lines = enumerate(text.splitlines(), 1)
        hits += [f"{where}:{n}: .dense" for n, line in lines if re.search(r"\.dense\b", line)]
        for node in ast.walk(ast.parse(text, str(path))):
            compared = isinstance(node, ast.Compare) and any(named(e) for e in (node.left, *node.comparators))
            if compared or (isinstance(node, ast.MatchValue) and named(node.value)):
                hits.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return sorted(hits)


def test_a_planted_task_branch_is_caught(tmp_path):
    (tmp_path / "lepton" / "tasks").mkdir(parents=True)
    (tmp_path / "lepton" / "tasks" / "mine.py").write_text("ok = task.dense or task.name == 'segmentation'\n")
    (tmp_path / "lepton" / "evaluate.py").write_text(
        "if run.task.dense:\n    pass\nkind = {'segmentation': 1}\nx = run.task.name != 'classification'\n"
        "y = info.task in ('segmentation', 'other')\nz = key not in ('ci95', 'calibration')\n")
    assert task_branches(tmp_path, {"classification", "segmentation"}) == [
        "lepton/evaluate.py:1: .dense", "lepton/evaluate.py:4: run.task.name != 'classification'",
        "lepton/evaluate.py:5: info.task in ('segmentation', 'other')"]


def test_no_task_branch_outside_the_tasks():
    """The task seam (#32): outside ``lepton/tasks/`` nothing asks whether a task is dense or which task it is; what
    differs is a hook or a declared capability of the task (docs/ARCHITECTURE.md lists them), so a new task is one
    module and its registration."""
    from lepton.tasks import list_tasks

    hits = task_branches(SRC, set(list_tasks()))
    assert hits == [], "ask the task (a hook or a declared capability) instead:\n" + "\n".join(hits)
