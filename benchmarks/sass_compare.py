"""SASS of attnopt's exact forward beside Triton's fused-attention tutorial forward at the same tile, without a GPU.

Compiles attnopt's exact forward (D128 bf16 non-causal, the tiles attnopt picks on the target: see
``attnopt kernels build``) and :func:`tutorial_fwd` with the same BLOCK_M, BLOCK_N, warps and stages for the
target, and prints the interior loop of each (instructions, HGMMA/HMMA, warpgroup operations), the ratio of
instruction counts, and issue 14's criterion: at most the tutorial's warpgroup ops and at most 1.05x its
instructions.

    python benchmarks/sass_compare.py [--arch sm_90a] [--head-dim 128] [--out sass_compare.json]

Needs Triton's compiler (it unsets TRITON_INTERPRET), not a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from _common import write_json  # noqa: E402
from attnopt.kernels import aot, sass  # noqa: E402


# The forward of Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py, the non-causal
# stage): same loop structure and softmax arithmetic (max of the raw scores, scale and log2(e) folded into one
# multiply-subtract, exp2, the accumulator rescaled before the second dot), with plain pointer loads of
# contiguous [B, H, S, D] tensors instead of its tensor descriptors, and no masking (S a multiple of the tiles).
@triton.jit
def tutorial_fwd(Q, K, V, Out, M, sm_scale, seq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):  # fmt: skip
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    base = off_hz.to(tl.int64) * seq * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/log(2)
    q = tl.load(Q + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :])
    for start_n in range(0, seq, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = tl.load(K + base + (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])
        qk = tl.dot(q, k.T)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
        p = tl.math.exp2(qk)
        alpha = tl.math.exp2(m_i - m_ij)
        l_ij = tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + base + (start_n + offs_n)[:, None] * HEAD_DIM + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        l_i = l_i * alpha + l_ij
        m_i = m_ij
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    tl.store(M + off_hz * seq + offs_m, m_i)
    tl.store(Out + base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty))


def tutorial_loop(arch: str, head_dim: int, tiles: dict) -> dict:
    """The tutorial forward compiled for ``arch`` at ``tiles``: its registers and interior loop."""
    b, h, s = 4, 16, 4096
    qkv = torch.empty(b, h, s, head_dim, dtype=torch.bfloat16, device="meta")
    args = dict(Q=qkv, K=qkv, V=qkv, Out=qkv, M=torch.empty(b, h, s, dtype=torch.float32, device="meta"),
                sm_scale=head_dim ** -0.5, seq=s, HEAD_DIM=head_dim, BLOCK_M=tiles["BLOCK_M"],
                BLOCK_N=tiles["BLOCK_N"])  # fmt: skip
    capability = aot.ARCHS[arch]
    compiled = aot.compile_kernel(tutorial_fwd, args, capability, tiles["num_warps"], tiles["num_stages"])
    info = sass.run_ptxas(compiled.asm["ptx"], arch, capability)
    instructions = sass.parse_sass(sass.disassemble(compiled.asm["cubin"]))
    return dict(tiles=tiles, registers=info.registers, spill_bytes=info.spill_bytes,
                shared_bytes=compiled.metadata.shared, advisories=list(info.advisories),
                interior_loop=sass.interior_loop(instructions))  # fmt: skip


def compare(arch: str, head_dim: int) -> dict:
    name = f"exact_d{head_dim}.fwd"
    built = aot.build([arch], None, select=lambda n: n == name)
    ours = built.records[0]
    if ours.get("error"):
        raise SystemExit(f"attnopt's {name} did not compile for {arch}: {ours['error']}")
    theirs = tutorial_loop(arch, head_dim, ours["tiles"])
    mine, ref = ours["interior_loop"] or {}, theirs["interior_loop"] or {}
    ratio = mine.get("instructions", 0) / ref["instructions"] if ref.get("instructions") else None
    keep = ("tiles", "registers", "spill_bytes", "shared_bytes", "advisories", "interior_loop")
    return dict(arch=arch, head_dim=head_dim, dtype="bfloat16", causal=False,
                attnopt={k: ours[k] for k in keep}, tutorial=theirs, instruction_ratio=ratio,
                criterion=dict(max_warpgroup_ops=ref.get("warpgroup_ops"), max_instructions=(
                    round(1.05 * ref["instructions"]) if ref.get("instructions") else None),
                    met=bool(ratio is not None and ratio <= 1.05
                             and mine.get("warpgroup_ops", 0) <= ref.get("warpgroup_ops", 0))))  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90a", choices=list(aot.ARCHS))
    parser.add_argument("--head-dim", type=int, default=128, choices=[64, 128, 256])
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    write_json(compare(args.arch, args.head_dim), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
