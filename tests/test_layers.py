"""The library's modules form layers without cycles: the import graph of ``velora_fx/`` and ``passes/``, every import
included (function-level ones too), is acyclic, each module imports only from its own layer or below, and the passes
read the codec interface, never the runtime, the state, the estimators or the config (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
import pathlib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: the layers, lowest first; docs/design.md draws the same diagram
LAYERS = [
    {"_torch_internals", "settings", "config", "records"},  # vocabulary: no velora_fx imports but each other's
    {"codec", "ops", "projection", "steps"},  # the codec interface, the math, one projection's state
    {"passes.sites", "passes.direction_op", "passes.contract", "passes.graph_writer", "passes.joint_plan",
     "passes.joint_rewrite", "passes.joint_graph", "passes.dynamo_graph", "passes.fx_linear",  # the graph rewrites
     "checkpoint", "quantized", "projection_graph", "estimators"},  # the codecs, the checkpoint format
    {"state"},  # where projections live
    {"lifecycle", "dynamo_graph", "partition_summary", "plan_store"},
    {"runtime", "fx"},  # what runs at training time, per route
    {"report", "compile_backend", "calibration"},  # the public entry points
    {"__init__"},
]  # fmt: skip

#: everything a pass may import: the contract, the site tables, the codec interface, the record vocabulary and the
#: private torch APIs (and the passes' own modules)
PASSES_MAY_IMPORT = {"codec", "records", "_torch_internals"}


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "velora_fx":
        parts = parts[1:]
    return ".".join(parts) or "__init__"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute name (relative to the package ``velora_fx``) that ``from ... import`` reads from."""
    if node.level == 0:
        name = node.module or ""
        return name.removeprefix("velora_fx").lstrip(".") if name.startswith("velora_fx") else ""
    package = module.split(".")[:-1] if module != "__init__" else []
    package = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join([*package, *([node.module] if node.module else [])])


def import_graph(root: pathlib.Path = ROOT) -> nx.DiGraph:
    files = sorted((root / "velora_fx").glob("*.py")) + sorted((root / "passes").glob("*.py"))
    modules = {_module_name(f, root) for f in files} - {"passes.__init__"}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for f in files:
        source = _module_name(f, root)
        if source == "passes.__init__":
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):  # every import, at any depth
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name.removeprefix("velora_fx").lstrip(".") for a in node.names if a.name.startswith("velora_fx")]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(source, node)
                if node.level == 0 and not (node.module or "").startswith("velora_fx"):
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}".lstrip(".") in modules else base for a in node.names]
            for target in targets:
                target = target.lstrip(".") or "__init__"
                if target in modules and target != source:
                    graph.add_edge(source, target)
    return graph


GRAPH = import_graph()
LAYER_OF = {m: i for i, layer in enumerate(LAYERS) for m in layer}


def test_every_module_has_a_layer():
    assert set(GRAPH) == set(LAYER_OF), "a module was added or removed: give it a layer here and in docs/design.md"


def test_the_import_graph_is_acyclic():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("module", sorted(LAYER_OF))
def test_imports_go_down(module):
    up = [t for t in GRAPH.successors(module) if LAYER_OF[t] > LAYER_OF[module]]
    assert not up, f"{module} (layer {LAYER_OF[module]}) imports from higher layers: {up}"


def test_passes_read_only_the_contract_sites_codec_and_torch_internals():
    for module in (m for m in GRAPH if m.startswith("passes.")):
        outside = {t for t in GRAPH.successors(module) if not t.startswith("passes.")} - PASSES_MAY_IMPORT
        assert not outside, f"{module} imports {sorted(outside)}"


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """A cycle hidden by a function-level import is found, in either spelling (relative and absolute)."""
    (tmp_path / "velora_fx").mkdir()
    (tmp_path / "passes").mkdir()
    (tmp_path / "velora_fx" / "a.py").write_text("from .b import x\n")
    (tmp_path / "velora_fx" / "b.py").write_text("def f():\n    from velora_fx import a\n")
    (tmp_path / "passes" / "p.py").write_text("def g():\n    from velora_fx.passes import q\n    from . import q\n")
    (tmp_path / "passes" / "q.py").write_text("import torch\n")
    graph = import_graph(tmp_path)
    assert set(graph.edges) == {("a", "b"), ("b", "a"), ("passes.p", "passes.q")}
    assert list(nx.simple_cycles(graph))
