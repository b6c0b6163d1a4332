"""Triton source text shared by every generated-kernel family (exact, sparse, linear, sigmoid).

The constants the kernels write into their text (``TL_DTYPES``, ``LOG2E``, ``LN2``), small expression
builders (``tl.dot`` in IEEE fp32 for fp32 inputs, casts, ``&`` chains, load masks) and the opening of a
generated module (:func:`module_head`: the do-not-edit banner, the spec's JSON, the triton imports and
the ``tl.constexpr`` constants).

This module imports neither torch nor triton.
"""

from __future__ import annotations

TL_DTYPES = {"float16": "tl.float16", "bfloat16": "tl.bfloat16", "float32": "tl.float32"}

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def and_(*terms: str) -> str:
    return " & ".join(t for t in terms if t)


def paren(term: str) -> str:
    """``term`` parenthesized when it is a comparison (``&`` binds tighter than ``<=``, ``<``, ``!=``)."""
    return f"({term})" if any(op in term for op in ("<", "!=")) else term


def tile_loop(var: str, lo: str, hi: str, block: str) -> str:
    """``for`` header over the tiles of ``block`` rows that start in ``[lo, hi)``, ``lo`` a multiple of ``block``.

    It loops over the unit-step tile index ``{var}`` (``range(lo // block, cdiv(hi, block))``), never over
    ``range(lo, hi, block)``: on sm_90 Triton pipelines the tensor-core ops of a loop across its iterations
    (wgmma in flight while the next tile's scores are computed), and with a strided induction variable
    the last wgmma of the loop pairs with one still in flight across the loop's exit, so ptxas serializes
    every wgmma of the loop (advisory C7515: each HGMMA followed by a WARPGROUP.DEPBAR). A unit-step loop
    keeps them back to back. Its callers derive the tile's first row as ``{var} * block``.
    """
    first = "0" if lo == "0" else f"{lo} // {block}"
    return f"for {var} in range({first}, tl.cdiv({hi}, {block})):"


def mask_kw(mask: str) -> str:
    return f", mask={mask}, other=0.0" if mask else ""


def dot(spec, a: str, b: str) -> str:
    """``tl.dot(a, b)``, in IEEE fp32 for fp32 inputs (no TF32)."""
    ieee = ', input_precision="ieee"' if spec.dtype == "float32" else ""
    return f"tl.dot({a}, {b}{ieee})"


def cast(spec, name: str) -> str:
    """``name`` cast to the input dtype for a ``tl.dot`` operand (no cast for fp32)."""
    return name if spec.dtype == "float32" else f"{name}.to({TL_DTYPES[spec.dtype]})"


def module_head(spec, renderer: str, summary: list[str], constants: dict) -> list[str]:
    """The opening of a generated kernel module: the do-not-edit banner naming the ``renderer`` module
    that writes it, the spec's JSON, the ``summary`` comment lines, the triton imports, and one
    ``NAME = tl.constexpr(value)`` line per ``constants`` item (ints and floats, written by ``repr``)."""
    return [
        f"# attnopt generated kernel: do not edit, it is rewritten from its spec by {renderer}.",
        f"# spec: {spec.to_json()}",
        "#",
        *(f"# {line}" for line in summary),
        "",
        "import triton",
        "import triton.language as tl",
        "",
        *(f"{name} = tl.constexpr({value!r})" for name, value in constants.items()),
        "",
        "",
    ]


def jit_def(name: str, pointers: list[str], strides: list[str], scalars: list[str]) -> list[str]:
    """``@triton.jit`` and the ``def`` of kernel ``name`` up to ``):``: the pointers on one line, the strides four
    to a line, then the scalars."""
    lines = ["@triton.jit", f"def {name}(", "    " + ", ".join(pointers) + ","]
    lines += ["    " + ", ".join(strides[i:i + 4]) + "," for i in range(0, len(strides), 4)]
    return lines + ["    " + ", ".join(scalars) + ",", "):"]


def dim_constants(spec) -> dict:
    """The head dims and their padded widths: ``HEAD_DIM``, ``BLOCK_D``, ``HEAD_DIM_V``, ``BLOCK_DV``."""
    return {"HEAD_DIM": spec.head_dim, "BLOCK_D": spec.block_d, "HEAD_DIM_V": spec.head_dim_v,
            "BLOCK_DV": spec.block_dv}  # fmt: skip


def tile_constants(spec) -> dict:
    """``BLOCK_M`` and ``BLOCK_N`` (the query and key tile) and :func:`dim_constants`."""
    return {"BLOCK_M": spec.block_m, "BLOCK_N": spec.block_n, **dim_constants(spec)}
