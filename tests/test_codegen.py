"""Kernel specs, the rendered Triton source and the on-disk kernel cache."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: loaded kernels run on CPU

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from attnopt.codegen import cache
from attnopt.codegen.render import kernel_arg_names, render
from attnopt.codegen.spec import KernelSpec, default_spec

REPO = Path(__file__).resolve().parents[1]

BASE = dict(head_dim=64, head_dim_v=64, dtype="float16", causal=0, mask="none", block_m=64, block_n=64,
            num_warps=4, num_stages=2)


def make(**changes) -> KernelSpec:
    return KernelSpec(**{**BASE, **changes})


@pytest.mark.parametrize(
    "field, value",
    [
        ("variant", "sparse"),
        ("direction", "bwd"),
        ("dtype", "float64"),
        ("dtype", "torch.float16"),
        ("causal", 3),
        ("causal", True),
        ("mask", "float"),
        ("head_dim", 0),
        ("head_dim", 257),
        ("head_dim", 64.0),
        ("head_dim_v", 300),
        ("block_m", 8),
        ("block_m", 48),
        ("block_n", 512),
        ("num_warps", 3),
        ("num_stages", 0),
        ("num_stages", 9),
    ],
)
def test_spec_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"KernelSpec\.{field} must be"):
        make(**{field: value})


def test_spec_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="unknown KernelSpec fields"):
        KernelSpec.from_dict({**make().to_dict(), "block_k": 32})


def test_spec_round_trip_and_key():
    spec = make(head_dim=40, head_dim_v=72, causal=2, mask="bool")
    assert KernelSpec.from_dict(spec.to_dict()) == spec
    assert KernelSpec.from_dict(json.loads(spec.to_json())) == spec
    assert spec.key == hashlib.sha256(spec.to_json().encode()).hexdigest()[:12]
    assert spec.name == f"attnopt_exact_fwd_{spec.key}"
    assert make(head_dim=40, head_dim_v=72, causal=2, mask="bool").key == spec.key
    assert len({make(causal=c).key for c in (0, 1, 2)}) == 3


def test_spec_key_is_stable_across_processes():
    code = (
        "from attnopt.codegen.spec import KernelSpec; "
        f"print(KernelSpec(**{BASE!r}).key)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == make().key
    canonical = ('{"block_m":64,"block_n":64,"causal":0,"direction":"fwd","dtype":"float16","head_dim":64,'
                 '"head_dim_v":64,"mask":"none","num_stages":2,"num_warps":4,"variant":"exact"}')
    assert make().to_json() == canonical


class _Shaped:
    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


@pytest.mark.parametrize(
    "dtype, d, dv, expected",
    [
        ("float16", 64, 64, (64, 64, 4, 2)),
        ("bfloat16", 128, 96, (64, 64, 4, 2)),
        ("float16", 256, 64, (64, 32, 8, 2)),
        ("float32", 40, 40, (64, 32, 4, 2)),
        ("float32", 72, 72, (32, 32, 4, 2)),
        ("float32", 200, 64, (32, 32, 8, 1)),
    ],
)
def test_default_spec(dtype, d, dv, expected):
    import torch

    tdtype = getattr(torch, dtype)
    q, k, v = _Shaped((2, 4, 9, d), tdtype), _Shaped((2, 2, 9, d), tdtype), _Shaped((2, 2, 9, dv), tdtype)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    spec = default_spec(q, k, v, mask, 2)
    assert (spec.block_m, spec.block_n, spec.num_warps, spec.num_stages) == expected
    assert (spec.head_dim, spec.head_dim_v, spec.dtype, spec.causal, spec.mask) == (d, dv, dtype, 2, "bool")
    assert default_spec(q, k, v, mask.float(), 0).mask == "additive"
    assert default_spec(q, k, v, None, 0).mask == "none"
    assert default_spec(q, k, v, mask, 2) == spec


def test_render_header_and_name():
    spec = make(head_dim=24, head_dim_v=40, causal=1, mask="additive")
    src = render(spec)
    lines = src.splitlines()
    assert lines[0].startswith("# attnopt generated kernel")
    assert lines[1].startswith("# spec: ")
    assert KernelSpec.from_dict(json.loads(lines[1][len("# spec: "):])) == spec
    tree = ast.parse(src)
    kernels = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [k.name for k in kernels] == [spec.name]
    assert ast.unparse(kernels[0].decorator_list[0]) == "triton.jit"
    assert tuple(a.arg for a in kernels[0].args.args) == kernel_arg_names(spec)
    assert "# [BLOCK_M, BLOCK_N]" in src
    assert render(spec) == src


@pytest.mark.parametrize("causal", [0, 1, 2])
def test_render_causal_is_compile_time(causal):
    src = render(make(causal=causal))
    assert ("causal_offset = seq_k - seq_q" in src) == (causal == 2)
    assert ("cols[None, :] <= offs_m[:, None] + causal_offset" in src) == (causal == 2)
    assert ("cols[None, :] <= offs_m[:, None])" in src) == (causal == 1)
    assert ("full_end = seq_k // BLOCK_N * BLOCK_N" in src) == (causal == 0)
    assert "causal ==" not in src and "if causal" not in src


@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_render_mask_is_compile_time(mask):
    spec = make(mask=mask)
    src = render(spec)
    assert ("Mask" in kernel_arg_names(spec)) == (mask != "none")
    assert ("mask_ptrs" in src) == (mask != "none")
    assert ("attend != 0" in src) == (mask == "bool")
    assert ("bias.to(tl.float32) * LOG2E" in src) == (mask == "additive")


def test_render_head_dim_padding_and_dtype():
    exact = render(make(head_dim=64, head_dim_v=64))
    assert "d_ok" not in exact and "dv_ok" not in exact
    padded = render(make(head_dim=24, head_dim_v=40))
    assert "BLOCK_D = tl.constexpr(32)" in padded and "BLOCK_DV = tl.constexpr(64)" in padded
    assert "d_ok = offs_d < HEAD_DIM" in padded and "dv_ok = offs_dv < HEAD_DIM_V" in padded
    assert "BLOCK_D = tl.constexpr(16)" in render(make(head_dim=3))
    assert 'input_precision="ieee"' in render(make(dtype="float32"))
    assert 'input_precision="ieee"' not in exact
    assert "out.to(tl.bfloat16)" in render(make(dtype="bfloat16"))


def test_cache_writes_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    spec = make(head_dim=24, causal=2, mask="bool")
    kernel = cache.load_kernel(spec)
    path = tmp_path / "kernels" / f"{spec.name}.py"
    assert cache.kernel_path(spec) == path
    assert path.read_text() == render(spec)
    assert kernel.fn.__name__ == spec.name
    assert cache.load_kernel(spec) is kernel

    mtime = path.stat().st_mtime_ns
    cache.clear_loaded()
    again = cache.load_kernel(spec)
    assert again is not kernel and again.fn.__name__ == spec.name
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cache_rewrites_stale_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    spec = make(dtype="float32")
    path = cache.kernel_path(spec)
    path.parent.mkdir(parents=True)
    path.write_text("# an older generator's output\n")
    cache.load_kernel(spec)
    assert path.read_text() == render(spec)


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("ATTNOPT_CACHE_DIR", raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "attnopt"


def test_imports_stay_light():
    code = "import sys, attnopt.codegen, attnopt.kernels.exact.triton_impl; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_optimized_path_never_imports_reference():
    for path in [REPO / "attnopt" / "kernels" / "exact" / "triton_impl.py", *(REPO / "attnopt" / "codegen").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("reference" in n for n in names), f"{path.name} imports the reference"
