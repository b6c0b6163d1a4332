"""Compiling a generated kernel for a GPU target without a GPU: a check of the source and of the resource model.

Triton's frontend and its NVIDIA backend run on any machine (only launching needs a GPU), so
:func:`compile_for` lowers a spec's kernel to PTX and a cubin for a chosen compute capability, as a
launch on contiguous ``[B, H, S, D]`` tensors whose sizes are multiples of 16 would specialize it
(head-dim strides 1, every pointer, stride and length divisible by 16). It returns the shared memory
Triton allocates, which :mod:`attnopt.codegen.tuning` models, and catches code that the CPU
interpreter accepts but the compiler rejects.

Needs a process without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions).
"""

from __future__ import annotations

import os

from attnopt.codegen.spec import KernelSpec
from attnopt.kernels.exact.render import kernel_arg_names, load_kernel

_TRITON_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
_INPUT_DTYPE = ("Q", "K", "V", "DOut", "Out", "DQ", "DK", "DV", "Bias", "RelTable")
_FP32 = ("Lse", "Lse2", "Delta", "DS", "Slopes", "RowScale")
_UNIT_STRIDES = ("stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dqd", "stride_dkd",
                 "stride_dvd", "stride_mask_n", "stride_bias_n")


def launch_signature(spec: KernelSpec) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of a typical launch of ``spec``'s kernel (see the module docstring)."""
    dtype = _TRITON_DTYPES[spec.dtype]
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(kernel_arg_names(spec)):
        if name in _UNIT_STRIDES:
            signature[name], constexprs[(i,)] = "constexpr", 1
            continue
        if name in _INPUT_DTYPE:
            signature[name] = f"*{dtype}"
        elif name == "Mask":
            signature[name] = "*u8" if spec.mask == "bool" else f"*{dtype}"
        elif name in _FP32:
            signature[name] = "*fp32"
        elif name in ("RelBucket", "KvLen"):
            signature[name] = "*i32"
        elif name in ("scale", "softcap", "dropout_p"):
            signature[name] = "fp32"
        elif name in ("seed", "philox_offset"):
            signature[name] = "i64"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride_") or name in ("seq_q", "seq_k", "num_heads"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_for(spec: KernelSpec, capability: tuple[int, int] = (9, 0)) -> dict:
    """Compiles ``spec``'s kernel for ``capability``; returns ``{"shared": bytes, "ptx": str}``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_for needs the Triton compiler: unset TRITON_INTERPRET")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = launch_signature(spec)
    source = ASTSource(fn=load_kernel(spec), signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)
    compiled = triton.compile(source, target=target,
                              options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    return dict(shared=compiled.metadata.shared, ptx=compiled.asm["ptx"])
