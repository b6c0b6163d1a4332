"""Kernel specs, the rendered Triton source and the on-disk kernel cache."""

import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attnopt.codegen import cache
from attnopt.codegen.spec import KernelSpec, default_spec
from attnopt.kernels.exact.render import kernel_arg_names, load_kernel, render

REPO = Path(__file__).resolve().parents[2]

BASE = dict(head_dim=64, head_dim_v=64, dtype="float16", causal=0, mask="none", block_m=64, block_n=64,
            num_warps=4, num_stages=2)


def make(**changes) -> KernelSpec:
    return KernelSpec(**{**BASE, **changes})


@pytest.mark.parametrize(
    "field, value",
    [
        ("variant", "sparse"),
        ("direction", "bwd"),
        ("bias", "rope"),
        ("key_padding", 1),
        ("softcap", None),
        ("dropout", "yes"),
        ("group", 0),
        ("group", 2.0),
        ("write_ds", True),
        ("strided_kv", 1),
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


def test_spec_strided_kv_only_for_the_forward():
    with pytest.raises(ValueError, match=r"KernelSpec\.strided_kv must be False for direction 'bwd_dq'"):
        make(direction="bwd_dq", strided_kv=True)


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
    canonical = ('{"bias":"none","block_m":64,"block_n":64,"causal":0,"direction":"fwd","dropout":false,'
                 '"dtype":"float16","group":1,"head_dim":64,"head_dim_v":64,"key_padding":false,"mask":"none",'
                 '"num_stages":2,"num_warps":4,"softcap":false,"strided_kv":false,"variant":"exact","write_ds":false}')
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


DIRECTIONS = ("fwd", "bwd_pre", "bwd_dkdv", "bwd_dq")


def _kernels(src: str) -> list[ast.FunctionDef]:
    return [n for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_render_header_and_name(direction):
    spec = make(direction=direction, head_dim=24, head_dim_v=40, causal=1, mask="additive", group=2)
    src = render(spec)
    lines = src.splitlines()
    assert lines[0].startswith("# attnopt generated kernel")
    assert lines[1].startswith("# spec: ")
    assert KernelSpec.from_dict(json.loads(lines[1][len("# spec: "):])) == spec
    kernels = _kernels(src)
    assert [k.name for k in kernels] == [spec.name] and spec.name.startswith(f"attnopt_exact_{direction}_")
    assert ast.unparse(kernels[0].decorator_list[0]) == "triton.jit"
    assert tuple(a.arg for a in kernels[0].args.args) == kernel_arg_names(spec)
    assert ast.get_docstring(kernels[0])
    assert render(spec) == src


ALL_FEATURES = [
    dict(causal=c, mask=m, bias=b, key_padding=kp, softcap=sc, dropout=dr, group=g)
    for c in (0, 1, 2) for m in ("none", "bool", "additive") for b in ("none", "tensor", "alibi", "relpos")
    for kp, sc, dr, g in ((False, False, False, 1), (True, True, True, 3))
]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_render_every_feature_combination_parses(direction):
    """Every combination renders a module whose only function is the kernel, with its declared arguments."""
    for features in ALL_FEATURES:
        for write_ds in (False, True) if direction == "bwd_dq" else (False,):
            spec = make(direction=direction, head_dim=40, head_dim_v=24, write_ds=write_ds, **features)
            (kernel,) = _kernels(render(spec))
            assert tuple(a.arg for a in kernel.args.args) == kernel_arg_names(spec)


@pytest.mark.parametrize("direction", ["fwd", "bwd_dkdv", "bwd_dq"])
@pytest.mark.parametrize("causal", [0, 1, 2])
def test_render_causal_is_compile_time(direction, causal):
    src = render(make(direction=direction, causal=causal))
    assert ("causal_offset = seq_k - seq_q" in src) == (causal == 2)
    assert bool(re.search(r"<= rows\[(:, None|None, :)\] \+ causal_offset", src)) == (causal == 2)
    assert bool(re.search(r"<= rows\[(:, None|None, :)\](?! \+)", src)) == (causal == 1)
    assert "causal ==" not in src and "if causal" not in src
    if direction == "bwd_dkdv":
        assert ("diagonal query tiles" in src) == (causal != 0)
    else:
        assert ("full_end = seq_k // BLOCK_N * BLOCK_N" in src) == (causal == 0)


@pytest.mark.parametrize("direction", ["fwd", "bwd_dkdv", "bwd_dq"])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
def test_render_mask_is_compile_time(direction, mask):
    spec = make(direction=direction, mask=mask)
    src = render(spec)
    assert ("Mask" in kernel_arg_names(spec)) == (mask != "none")
    assert ("mask_ptrs" in src) == (mask != "none")
    assert ("attend != 0" in src) == (mask == "bool")
    assert ("add = tl.load(mask_ptrs" in src) == (mask == "additive")
    # the backward renormalizes its rows with additive terms (see kernels.exact.render_bwd)
    assert ("RowScale" in kernel_arg_names(spec)) == (mask == "additive" and direction != "fwd")


@pytest.mark.parametrize("direction", ["fwd", "bwd_dkdv", "bwd_dq"])
def test_render_features_are_compile_time(direction):
    plain = render(make(direction=direction)).split("\n", 2)[2]  # without the spec line
    for word in ("Bias", "Slopes", "RelTable", "KvLen", "softcap", "tl.rand", "seed", "GROUP +", "range(0, GROUP)"):
        assert word not in plain
    names = {
        "bias": ("tensor", ["Bias", "bias_ptrs"]),
        "alibi": ("alibi", ["Slopes", "alibi_slope2 * tl.abs("]),
        "relpos": ("relpos", ["RelTable", "RelBucket", "bucket * stride_rel_n"]),
    }
    for kind, words in names.values():
        src = render(make(direction=direction, bias=kind))
        assert all(w in src for w in words), kind
    assert "kv_end = " in render(make(direction=direction, key_padding=True))
    capped = render(make(direction=direction, softcap=True))
    assert "t = 1.0 - 2.0 / (e + 1.0)" in capped
    assert ("ds = ds * (1.0 - t * t)" in capped) == (direction != "fwd")
    dropped = render(make(direction=direction, dropout=True))
    assert "tl.rand(seed, drop_row" in dropped
    assert '@triton.jit(do_not_specialize=["seed", "philox_offset"])' in dropped
    grouped = render(make(direction=direction, group=4))
    assert "GROUP = tl.constexpr(4)" in grouped
    assert ("for g in range(0, GROUP)" in grouped) == (direction == "bwd_dkdv")


@pytest.mark.parametrize("direction", ["fwd", "bwd_dkdv", "bwd_dq"])
@pytest.mark.parametrize("causal", [0, 2])
def test_render_loops_step_one_tile_and_causal_runs_longest_first(direction, causal):
    """Tile loops count tile indices (a strided range serializes wgmma on sm_90, see triton_text.tile_loop);
    causal kernels holding a query tile start with the last query tile, which sees the most keys."""
    src = render(make(direction=direction, causal=causal, key_padding=True))
    assert "for tile_" in src and not re.search(r"range\([^()]*,[^()]*, BLOCK_[MN]\)", src)
    reversed_ids = "pid_m = tl.num_programs(0) - 1 - tl.program_id(0)" in src
    assert reversed_ids == (causal != 0 and direction != "bwd_dkdv")


def test_render_forward_reads_key_values_by_descriptor_unless_strided():
    assert src_count(make(), "tl.make_tensor_descriptor(") == 2
    strided = render(make(strided_kv=True))
    assert "tl.make_tensor_descriptor" not in strided and "k_tile + offs_n[None, :] * stride_kn" in strided
    # one key-tile loop: the non-causal boundary tile is a branch with descriptors (a loop with pointers)
    assert src_count(make(), "if full_end < end:") == 1 and src_count(make(causal=2), "if full_end < end:") == 0
    assert "if full_end < end:" not in strided


def test_render_forward_folds_the_scale_on_unmasked_tiles():
    """Interior tiles without masked or added terms take the max of raw q·k and exponentiate with one FFMA."""
    folded = "p = tl.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))"
    assert src_count(make(), folded) == 1  # interior loop only: the boundary loop masks its keys
    assert src_count(make(causal=2), folded) == 1
    for features in (dict(mask="bool"), dict(mask="additive"), dict(bias="alibi"), dict(softcap=True)):
        assert src_count(make(**features), folded) == 0, features


def src_count(spec, text: str) -> int:
    return render(spec).count(text)


def test_render_write_ds():
    assert "DS" not in kernel_arg_names(make(direction="bwd_dq"))
    spec = make(direction="bwd_dq", write_ds=True)
    assert "DS" in kernel_arg_names(spec)
    assert "tl.store(ds_row[:, None] + cols[None, :], ds" in render(spec)


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
    assert "dk.to(tl.bfloat16)" in render(make(direction="bwd_dkdv", dtype="bfloat16"))


def test_cache_writes_and_reuses(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    spec = make(head_dim=24, causal=2, mask="bool")
    kernel = load_kernel(spec)
    path = tmp_path / "kernels" / f"{spec.name}.py"
    assert cache.kernel_path(spec) == path
    assert path.read_text() == render(spec)
    assert kernel.fn.__name__ == spec.name
    assert load_kernel(spec) is kernel

    mtime = path.stat().st_mtime_ns
    cache.clear_loaded()
    again = load_kernel(spec)
    assert again is not kernel and again.fn.__name__ == spec.name
    assert path.stat().st_mtime_ns == mtime
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_cache_rewrites_stale_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    spec = make(dtype="float32")
    path = cache.kernel_path(spec)
    path.parent.mkdir(parents=True)
    path.write_text("# an older generator's output\n")
    load_kernel(spec)
    assert path.read_text() == render(spec)


def _compiled_helpers(monkeypatch):
    """triton.language as if first imported without TRITON_INTERPRET: its ``@triton.jit`` helpers compiled."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    monkeypatch.setattr(tl, "zeros", JITFunction(tl.zeros.fn))


def _compiled_kernel(monkeypatch):
    """TRITON_INTERPRET unset after triton's first import: the next ``@triton.jit`` compiles."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("mix", [_compiled_helpers, _compiled_kernel])
def test_cache_refuses_a_kernel_in_another_mode_than_triton_language(tmp_path, monkeypatch, mix):
    """TRITON_INTERPRET set (or unset) after triton was first imported gives a kernel and triton.language's
    helpers in different modes; the load says so instead of the launch failing inside the kernel."""
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    mix(monkeypatch)
    spec = make(head_dim=40, dtype="float32")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET changed after triton was first imported"):
        load_kernel(spec)
    assert spec.name not in sys.modules


@pytest.mark.skipif(os.environ.get("ATTNOPT_TEST_GPU") == "1", reason="the GPU run compiles the kernels")
def test_tests_choose_the_interpreter_before_triton_is_imported():
    """tests/conftest.py sets TRITON_INTERPRET before any test module imports triton (attnopt.hf does, through
    transformers and torch._dynamo), so triton.language's helpers are interpreted whichever test file runs first."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(tl.zeros, InterpretedFunction)


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("ATTNOPT_CACHE_DIR", raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "attnopt"


def test_imports_stay_light():
    code = ("import sys, attnopt.codegen, attnopt.codegen.tuning, attnopt.kernels.exact.triton_impl, "
            "attnopt.kernels.exact.dispatch, attnopt.kernels.exact.ops, attnopt.kernels.sparse.ops, "
            "attnopt.kernels.linear.ops, attnopt.kernels.sigmoid.ops; assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_optimized_path_never_imports_reference():
    exact = REPO / "attnopt" / "kernels" / "exact"
    optimized = ("triton_impl.py", "dropout.py", "dispatch.py", "offline.py", "render.py", "render_fwd.py",
                 "render_bwd.py", "render_common.py")
    for path in [*(exact / n for n in optimized),
                 *(REPO / "attnopt" / "codegen").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("reference" in n for n in names), f"{path.name} imports the reference"


# ---------------------------------------------------------------------------------------------------------------
# attnopt kernels show


def test_cli_kernels_show_prints_the_rendered_source():
    from click.testing import CliRunner

    from attnopt.cli import main

    res = CliRunner().invoke(main, ["kernels", "show", "--head-dim", "64", "--dtype", "bfloat16", "--causal",
                                    "bottom-right", "--mask", "bool"])
    assert res.exit_code == 0, res.output
    spec = KernelSpec.from_dict(json.loads(res.output.splitlines()[1][len("# spec: "):]))
    assert (spec.head_dim, spec.dtype, spec.causal, spec.mask, spec.direction) == (64, "bfloat16", 2, "bool", "fwd")
    assert res.output == render(spec)


def test_cli_kernels_show_options_and_tiles(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from attnopt.cli import main

    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    args = ["kernels", "show", "--direction", "bwd_dkdv", "--head-dim", "72", "--head-dim-v", "40", "--group", "4",
            "--bias", "alibi", "--key-padding", "--softcap", "--dropout", "--block-m", "16", "--num-stages", "3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    spec = KernelSpec.from_dict(json.loads(res.output.splitlines()[1][len("# spec: "):]))
    assert (spec.block_m, spec.num_stages, spec.group, spec.bias) == (16, 3, 4, "alibi")
    assert spec.key_padding and spec.softcap and spec.dropout
    sm90 = CliRunner().invoke(main, ["kernels", "show", "--head-dim", "128", "--gpu", "sm90"])
    assert "tiles 128x128, num_warps 8, num_stages 3." in sm90.output
    path = CliRunner().invoke(main, args + ["--path"]).output.strip()
    assert Path(path).parent == tmp_path / "kernels" and Path(path).read_text() == res.output


def test_cli_kernels_show_rejects_bad_specs():
    from click.testing import CliRunner

    from attnopt.cli import main

    res = CliRunner().invoke(main, ["kernels", "show", "--head-dim", "300"])
    assert res.exit_code != 0 and "KernelSpec.head_dim must be" in res.output
    res = CliRunner().invoke(main, ["kernels", "show", "--head-dim", "64", "--write-ds"])
    assert res.exit_code != 0 and "write_ds" in res.output


# ---------------------------------------------------------------------------------------------------------------
# Compiling for the GPU without one


_COMPILE_SCRIPT = """
import json
from attnopt.codegen import tuning
from attnopt.codegen.spec import KernelSpec
from attnopt.kernels.exact import offline

features = dict(head_dim=72, head_dim_v=40, dtype="float16", causal=2, mask="bool", bias="alibi", key_padding=True,
                softcap=True, dropout=True, group=2, num_warps=4, num_stages=2)
shared = {}
for direction, (bm, bn) in (("fwd", (64, 64)), ("bwd_dkdv", (32, 64)), ("bwd_dq", (64, 64))):
    spec = KernelSpec(direction=direction, block_m=bm, block_n=bn, **features)
    shared[direction] = offline.compile_for(spec, (9, 0))["shared"]
plain = tuning.default(KernelSpec(head_dim=128, head_dim_v=128, dtype="bfloat16", causal=0, mask="none", block_m=64,
                                  block_n=64, num_warps=4, num_stages=2), tuning.GENERATIONS["sm90"])
shared["plain"] = offline.compile_for(plain, (9, 0))["shared"]
shared["plain_model"] = tuning.resources(plain, tuning.GENERATIONS["sm90"])[0]
print(json.dumps(shared))
"""


def test_generated_kernels_compile_for_sm90(tmp_path):
    """The Triton compiler (not the interpreter) accepts every feature of the forward and backward kernels for
    sm_90a, and allocates the shared memory the tuning model predicts for the default H100 forward tile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(ATTNOPT_CACHE_DIR=str(tmp_path / "attnopt"), TRITON_CACHE_DIR=str(tmp_path / "triton"))
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    shared = json.loads(out.stdout.splitlines()[-1])
    assert all(shared[d] > 0 for d in ("fwd", "bwd_dkdv", "bwd_dq"))
    # 128x128 tiles, 3 stages, D128 bf16: Q and 3 stages of K and V (229,376 B), and the tensor descriptors'
    # barriers, which the model bounds by 1 KiB
    assert shared["plain_model"] == 230400 and 229376 < shared["plain"] <= shared["plain_model"]
