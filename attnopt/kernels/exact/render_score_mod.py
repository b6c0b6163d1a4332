"""The score_mod's part of a generated exact-attention kernel: from the tile's dot products to its scores.

A spec with a ``score_mod`` (the canonical text of a traced :class:`~attnopt.codegen.score_expr.ScoreExpr`)
scores each element as ``s = log2(e) * score_mod(scale * q·k, b, h, i, j)`` before the mask; its backward
kernels also compute ``dmod = d score_mod / d score`` and chain the score gradient through it
(``ds = ds * dmod`` where ``P > 0``: elements with ``P = 0`` contribute nothing, even where ``dmod`` is not
finite). The statements are written by :func:`attnopt.codegen.score_triton.triton_lines`.
"""

from __future__ import annotations

from attnopt.codegen.score_expr import parse
from attnopt.codegen.score_triton import triton_lines
from attnopt.codegen.spec import KernelSpec


def score_mod_lines(spec: KernelSpec, tile, ind: str, ld_ok: str) -> list[str]:
    """``s``, the base-2 scores of a ``tile`` (a ``render_common.Tile``) from the score_mod of the natural scores
    ``sm_score = scale * qk``; the backward kernels also compute ``dmod``, its derivative
    (:meth:`attnopt.codegen.score_expr.ScoreExpr.gradient`). ``ld_ok`` is the tile's in-range test for loads."""
    expr = parse(spec.score_mod)
    env = dict(score="sm_score", b="off_b.to(tl.int32)", h="off_h.to(tl.int32)", q_idx=f"rows{tile.r}",
               kv_idx=f"cols{tile.c}")
    backward = spec.direction != "fwd"
    full = expr.gradient() if backward else expr
    outputs = (expr.output, full.output) if backward else (expr.output,)
    body, srcs = triton_lines(full, ind, env, ld_ok, outputs)
    varying = full.varying()
    tiled = [src if isinstance(out, str) and out in varying else f"(tl.zeros({tile.shape}, tl.float32) + {src})"
             for out, src in zip(outputs, srcs)]
    lines = [f"{ind}sm_score = qk * scale  # {tile.shape} natural scores, the score_mod's input", *body,
             f"{ind}s = {tiled[0]} * LOG2E  # {tile.shape} base-2 scores after the score_mod"]
    if backward:
        lines.append(f"{ind}dmod = {tiled[1]}  # {tile.shape} d score_mod / d score")
    return lines
