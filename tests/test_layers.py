"""The package's layers, read from the source (docs/architecture.md describes them).

The import graph of ``attnopt/`` is built with ``ast`` (module-level and function-level imports, absolute and
relative) and checked: no cycle, no import of a higher layer, no private name taken from another module, and a
function-level import only where it defers a heavy optional dependency. An import under ``if TYPE_CHECKING:``
is for annotations only (never run) and is no edge.

Each ``KNOWN_*`` list below is what still breaks a rule: the test compares it exactly, so a new violation fails and
a fixed one must be removed from the list. The lists only shrink.
"""

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "attnopt"

# Lowest first; a module may import its own layer or a lower one. A module belongs to the layer of the longest
# prefix listed (the package itself, ``attnopt``, is the front door: layer 4).
LAYERS = {
    # 0, primitives: tensors in, tensors out; nothing here knows a graph, a policy or a model.
    "attnopt.errors": 0, "attnopt.version": 0, "attnopt.timing": 0, "attnopt.kernels": 0, "attnopt.codegen": 0, "attnopt.masks": 0,
    # 1, detection: an FX graph in, an AttentionMatch (what the attention computes) out; knows no variant.
    "attnopt.patterns": 1,
    # 2, variants: what to run instead (the variant configs and handlers, the policy that maps sites to them,
    # their cost model), built on a match and the primitives.
    "attnopt.variants": 2, "attnopt.policy": 2, "attnopt.cost": 2,
    # 3, compile pipeline: capture, passes, backend, the report, naming of sites, calibration (auto).
    "attnopt.capture": 3, "attnopt.passes": 3, "attnopt.backend": 3, "attnopt.breaks": 3, "attnopt.report": 3,
    "attnopt.naming": 3, "attnopt.auto": 3,
    # 4, front: the API, io (convert, artifact, export, inputs, targets), integrations (hf, generation), cli.
    "attnopt": 4, "attnopt.api": 4, "attnopt.functional": 4, "attnopt.natten": 4, "attnopt.generation": 4,
    "attnopt.hf": 4, "attnopt.convert": 4,
    "attnopt.convert_source": 4, "attnopt.convert_write": 4, "attnopt.convert_check": 4,
    "attnopt.artifact": 4, "attnopt.export": 4, "attnopt.export_dims": 4, "attnopt.onnx_functions": 4,
    "attnopt.inputs": 4, "attnopt.targets": 4, "attnopt.zoo": 4, "attnopt.cli": 4, "attnopt.cli_errors": 4,
    "attnopt.distributed": 4,
}

# Third-party packages that may be imported inside a function: optional (triton, transformers, onnx*, matplotlib,
# safetensors, yaml) or slow to import (sympy, rich, torch's compiler and exporter), so importing attnopt does not
# pay for them (or need them installed). Anything else is imported at module level.
HEAVY = {"triton", "transformers", "onnx", "onnx_ir", "onnxscript", "onnxruntime", "matplotlib", "safetensors",
         "yaml", "sympy", "rich", "torch._inductor", "torch.export", "torch.nn.attention", "torch.fx._pytree",
         "torch._dynamo.eval_frame"}  # fmt: skip

# A function-level import of an attnopt module is allowed only to defer a heavy dependency that the imported
# module pulls in at module level and the importer does not: (importer, imported) -> that dependency (checked).
DEFERS = {
    ("attnopt.api", "attnopt.generation"): "transformers",
    ("attnopt.artifact", "attnopt.hf"): "transformers",
    ("attnopt.export", "attnopt.onnx_functions"): "onnx",
    ("attnopt.kernels.exact.triton_impl", "attnopt.kernels.exact.dropout"): "triton",
}

# What still breaks a rule (see the module docstring: these lists only shrink).
KNOWN_FUNCTION_LEVEL = []
KNOWN_CYCLES = []
KNOWN_UPWARD = []
KNOWN_PRIVATE = []
KNOWN_LIGHT_DEFERRED = [
    ("attnopt.codegen.tuning", "torch"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _owner(name: str) -> str:
    """The attnopt module that ``name`` (a module or a module.attribute) lives in."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _layer(module: str) -> int:
    prefix = module
    while prefix not in LAYERS:
        prefix = prefix.rpartition(".")[0]
        assert prefix, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return LAYERS[prefix]


def _imports(module: str):
    """(imported name, attribute or None, at function level) for every import statement in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # an import for annotations only: never run, so no edge
            if isinstance(child, ast.Import):
                found.extend((alias.name, None, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # from .x import y: relative to the importing package
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found.extend((base, alias.name, in_function) for alias in child.names)
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return found


def _edges():
    """(importer, imported module, attribute or None, at function level) for imports of attnopt modules."""
    edges = []
    for module in MODULES:
        for name, attribute, in_function in _imports(module):
            if name.split(".")[0] != "attnopt":
                continue
            full = f"{name}.{attribute}" if attribute else name
            target = full if full in MODULES else _owner(name)
            edges.append((module, target, attribute if full not in MODULES else None, in_function))
    return edges


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_cycle_even_through_function_level_imports():
    graph = nx.DiGraph((a, b) for a, b, _, _ in _edges() if a != b)
    cycles = sorted(tuple(sorted(c)) for c in nx.strongly_connected_components(graph) if len(c) > 1)
    assert cycles == KNOWN_CYCLES


def test_no_module_imports_a_higher_layer():
    upward = sorted({(a, b) for a, b, _, _ in _edges() if _layer(b) > _layer(a)})
    assert upward == KNOWN_UPWARD


def test_no_private_name_crosses_a_module_boundary():
    private = sorted({(a, b, attr) for a, b, attr, _ in _edges()
                      if attr and attr.startswith("_") and not attr.endswith("__") and a != b})  # (dunders are public)
    assert private == KNOWN_PRIVATE


def test_function_level_imports_of_attnopt_modules_are_on_the_allow_list():
    deferred = {(a, b) for a, b, _, in_function in _edges() if in_function and a != b}
    assert sorted(deferred - set(DEFERS)) == KNOWN_FUNCTION_LEVEL


def test_function_level_third_party_imports_defer_a_heavy_dependency():
    light = set()
    for module in MODULES:
        for name, _, in_function in _imports(module):
            heavy = any(name == h or name.startswith(h + ".") for h in HEAVY)
            if in_function and name.split(".")[0] != "attnopt" and not heavy:
                light.add((module, name))
    assert sorted(light) == KNOWN_LIGHT_DEFERRED


def _heavy_closure(module: str, graph: nx.DiGraph) -> set[str]:
    """The heavy dependencies that importing ``module`` loads through module-level imports."""
    found = set()
    for reached in nx.descendants(graph, module) | {module}:
        for name, _, in_function in _imports(reached):
            found |= {h for h in HEAVY if not in_function and (name == h or name.startswith(h + "."))}
    return found


def test_each_allowed_function_level_import_defers_the_dependency_it_names():
    graph = nx.DiGraph()
    graph.add_nodes_from(MODULES)
    graph.add_edges_from((a, b) for a, b, _, in_function in _edges() if not in_function and a != b)
    deferred = {(a, b) for a, b, _, in_function in _edges() if in_function and a != b}
    for (importer, imported), dependency in DEFERS.items():
        assert (importer, imported) in deferred, f"{importer} no longer defers {imported}: drop it from DEFERS"
        saved = _heavy_closure(imported, graph) - _heavy_closure(importer, graph)
        assert dependency in saved, f"{importer} -> {imported} defers {sorted(saved)}, not {dependency}"
