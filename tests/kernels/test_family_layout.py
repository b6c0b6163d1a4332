"""Every kernel family is laid out the same way, and the kernel layer (kernels, codegen) knows nothing above it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "attnopt"
FAMILIES = ("exact", "sparse", "linear", "sigmoid")
# What each family folder holds: the oracle, the custom ops, the launcher and the Triton source generator.
FAMILY_FILES = ("reference.py", "ops.py", "triton_impl.py", "render.py")
# A function-level attnopt import is allowed only to defer a heavy dependency: (module, imported, what it defers).
DEFERRED = {("kernels/exact/triton_impl.py", "attnopt.kernels.exact.dropout", "triton")}
SHARED_CONSTANTS = ("TL_DTYPES", "LOG2E", "LN2", "MAX_BATCH_HEADS", "CAUSAL_NONE", "DTYPES", "HIDDEN_BELOW")
SHARED_FUNCTIONS = ("check_qkv", "acc_dtype", "dot", "cast", "module_head")


def _modules():
    for layer in ("kernels", "codegen"):
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


def _attnopt_imports(tree):
    """``(node, module, names, at_module_level)`` for every import of an attnopt module."""
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnopt"):
            yield node, node.module, [a.name for a in node.names], id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("attnopt"):
                    yield node, alias.name, [], id(node) in top


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_the_same_files(family):
    present = {p.name for p in (PACKAGE / "kernels" / family).glob("*.py")}
    assert set(FAMILY_FILES) <= present, f"kernels/{family} lacks {sorted(set(FAMILY_FILES) - present)}"


def test_kernel_layer_imports_nothing_above_it():
    allowed = {"kernels": ("attnopt.kernels", "attnopt.codegen", "attnopt.masks"), "codegen": ("attnopt.codegen",)}
    for name, tree in _modules():
        for _, module, _, _ in _attnopt_imports(tree):
            ok = allowed[name.split("/")[0]]
            assert module.startswith(ok), f"{name} imports {module}; the {name.split('/')[0]} layer may import {ok}"


def test_no_private_names_and_no_function_level_imports_across_modules():
    for name, tree in _modules():
        for node, module, names, top in _attnopt_imports(tree):
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{name}:{node.lineno} imports private {private} from {module}"
            deferred = {(m, imported) for m, imported, _ in DEFERRED}
            assert top or (name, module) in deferred, f"{name}:{node.lineno} imports {module} inside a function"


@pytest.mark.parametrize("constant", SHARED_CONSTANTS)
def test_shared_constants_are_defined_once(constant):
    homes = [name for name, tree in _modules() for node in tree.body
             if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == constant for t in node.targets)]
    assert len(homes) == 1, f"{constant} is defined in {homes}"


@pytest.mark.parametrize("function", SHARED_FUNCTIONS)
def test_shared_helpers_are_defined_once(function):
    homes = [name for name, tree in _modules() for node in tree.body
             if isinstance(node, ast.FunctionDef) and node.name in (function, f"_{function}")]
    assert len(homes) == 1, f"{function} is defined in {homes}"


# The optimized paths of each family: they share operand helpers with the oracle, never the oracle itself.
OPTIMIZED = {
    "sparse": ("triton_impl.py", "render.py", "blockwise.py", "plan.py", "structure.py"),
    "linear": ("triton_impl.py", "render.py", "chunked.py", "operands.py"),
    "sigmoid": ("triton_impl.py", "render.py"),
}


@pytest.mark.parametrize("family", sorted(OPTIMIZED))
def test_optimized_paths_never_import_a_reference(family):
    for file in OPTIMIZED[family]:
        tree = ast.parse((PACKAGE / "kernels" / family / file).read_text(encoding="utf-8"))
        for node, module, names, _ in _attnopt_imports(tree):
            assert not any("reference" in n for n in [module, *names]), f"kernels/{family}/{file} imports {module}"
