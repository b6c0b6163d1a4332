"""attnopt.na1d / na2d / na3d against a dense reference built from NATTEN's documented semantics, forward and
backward: odd and even kernels, dilation, stride, per-axis causal, windows at the borders, additional keys."""

import itertools
import math

import pytest
import torch

import attnopt
from attnopt.natten import spatial_tile


def _axis_keys(x: int, n: int, kernel: int, dilation: int, stride: int, causal: bool) -> set:
    """The key coordinates query coordinate ``x`` sees along one axis of ``n`` (NATTEN's semantics).

    Dilation d: the axis splits into the d groups ``range(g, n, d)``; a query attends within its own group, where it
    stands at position p. Stride s: groups of s consecutive positions share one window, that of their leader (the
    centre, right of centre for even s; the last when causal), a leader past the group's end being its last
    position. Non-causal: the ``kernel`` positions around the leader, the window shifted (not clipped) to stay
    inside the group. Causal: positions up to p itself and within ``kernel`` of the leader.
    """
    group = list(range(x % dilation, n, dilation))
    p = group.index(x)
    first = (p // stride) * stride
    if causal:
        leader = min(first + stride - 1, len(group) - 1)
        return set(group[max(0, leader - kernel + 1):p + 1])
    leader = min(first + stride // 2, len(group) - 1)
    start = min(max(leader - kernel // 2, 0), len(group) - kernel)
    return set(group[start:start + kernel])


def _reference(q, k, v, kernel, stride, dilation, causal, extra_k=None, extra_v=None):
    """Dense attention over the token grid under the neighborhood mask, the additional keys visible to all (fp64)."""
    b, *spatial, hq, d = q.shape
    ndim = len(spatial)
    per_axis = lambda x: tuple(x) if isinstance(x, tuple) else (x,) * ndim  # noqa: E731
    kernel, stride, dilation, causal = map(per_axis, (kernel, stride, dilation, causal))
    coords = list(itertools.product(*(range(n) for n in spatial)))
    index = {c: i for i, c in enumerate(coords)}
    allowed = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for qi, c in enumerate(coords):
        axes = [_axis_keys(x, n, *args) for x, n, args in zip(c, spatial, zip(kernel, dilation, stride, causal))]
        for key in itertools.product(*axes):
            allowed[qi, index[key]] = True
    flat = lambda t: t.reshape(b, -1, t.shape[-2], t.shape[-1]).transpose(1, 2).double()  # noqa: E731
    qf, kf, vf = flat(q), flat(k), flat(v)
    if extra_k is not None:
        kf = torch.cat([extra_k.transpose(1, 2).double(), kf], dim=2)
        vf = torch.cat([extra_v.transpose(1, 2).double(), vf], dim=2)
        allowed = torch.cat([torch.ones(len(coords), extra_k.shape[1], dtype=torch.bool), allowed], dim=1)
    kf, vf = kf.repeat_interleave(hq // kf.shape[1], dim=1), vf.repeat_interleave(hq // vf.shape[1], dim=1)
    scores = (qf @ kf.transpose(-2, -1)) / math.sqrt(d)
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vf
    return out.transpose(1, 2).reshape(b, *spatial, hq, v.shape[-1]).to(q.dtype)


CASES = {
    # name: (function, spatial, kernel, stride, dilation, causal, additional keys, (Hq, Hkv))
    "1d_even_dilated": (attnopt.na1d, (13,), 4, 1, 2, False, 0, (2, 2)),
    "1d_causal_strided": (attnopt.na1d, (14,), 5, 2, 1, True, 3, (2, 1)),
    "2d_odd_border": (attnopt.na2d, (8, 8), 5, 1, 1, False, 0, (2, 2)),
    "2d_mixed": (attnopt.na2d, (7, 9), (3, 4), (1, 2), (2, 1), (False, True), 3, (4, 2)),
    "2d_stride_dilation": (attnopt.na2d, (9, 10), (3, 5), (3, 2), (3, 2), False, 2, (2, 2)),
    "3d_odd": (attnopt.na3d, (4, 5, 6), 3, 1, 1, False, 0, (2, 2)),
    "3d_mixed": (attnopt.na3d, (4, 5, 6), (3, 2, 5), (2, 1, 1), (1, 2, 1), (True, False, False), 2, (2, 1)),
    "3d_even_causal_all": (attnopt.na3d, (5, 4, 6), (2, 4, 3), (1, 2, 3), 1, True, 1, (2, 2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_dense_reference(name):
    fn, spatial, kernel, stride, dilation, causal, extra, (hq, hkv) = CASES[name]
    g = torch.Generator().manual_seed(0)
    mk = lambda *shape: torch.randn(*shape, generator=g).requires_grad_(True)  # noqa: E731
    q, k, v = mk(2, *spatial, hq, 8), mk(2, *spatial, hkv, 8), mk(2, *spatial, hkv, 8)
    extra_k, extra_v = (mk(2, extra, hkv, 8), mk(2, extra, hkv, 8)) if extra else (None, None)
    inputs = [t for t in (q, k, v, extra_k, extra_v) if t is not None]
    got = fn(q, k, v, kernel, stride=stride, dilation=dilation, is_causal=causal, additional_keys=extra_k,
             additional_values=extra_v)  # fmt: skip
    want = _reference(q, k, v, kernel, stride, dilation, causal, extra_k, extra_v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    dout = torch.randn(got.shape, generator=g)
    for a, b in zip(torch.autograd.grad(got, inputs, dout), torch.autograd.grad(want, inputs, dout)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grids_run_in_spatial_tiles_where_they_divide():
    """(The cases above run both ways: (8, 8), (9, 10), (4, 5, 6) and (5, 4, 6) in tiles, (7, 9) row-major.)"""
    assert spatial_tile((8, 8)) == (8, 8)
    assert spatial_tile((32, 32)) == (8, 8)
    assert spatial_tile((16, 64)) == (8, 8)
    assert spatial_tile((9, 10)) == (1, 2)
    assert spatial_tile((4, 5, 6)) == (4, 1, 2)
    assert spatial_tile((7, 9)) is None
    assert spatial_tile((13,)) is None


def test_reference_semantics_on_a_line():
    """The reference's windows, spelled out: shifted at the borders, dilation groups, strided leaders, causal."""
    assert _axis_keys(0, 10, 3, 1, 1, False) == {0, 1, 2}  # shifted right at the left border, not clipped
    assert _axis_keys(9, 10, 4, 1, 1, False) == {6, 7, 8, 9}
    assert _axis_keys(5, 10, 4, 1, 1, False) == {3, 4, 5, 6}  # even kernel: one more key left of the query
    assert _axis_keys(3, 10, 3, 2, 1, False) == {1, 3, 5}  # group of odd positions
    assert _axis_keys(0, 10, 3, 1, 3, False) == {0, 1, 2}  # leader 1 (centre of 0..2)
    assert _axis_keys(4, 10, 3, 1, 2, True) == {3, 4}  # leader 5: keys 3..5 up to the query
    assert _axis_keys(9, 10, 2, 1, 4, False) == {8, 9}  # leader 10 is past the end: the last position


def test_compiles_with_no_graph_break_and_checks_its_inputs():
    x = torch.randn(1, 6, 6, 2, 8)

    def f(x):
        return attnopt.na2d(x, x, x, 3, dilation=2, additional_keys=x[:, 0], additional_values=x[:, 1])

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    for grid in ((6, 8), (8, 10)):  # new sizes recompile with symbolic shapes: the grid is made static
        y = torch.randn(1, *grid, 2, 8)
        torch.testing.assert_close(compiled(y), f(y))

    def g(x, kernel_size):
        return attnopt.na2d(x, x, x, kernel_size)

    compiled = torch.compile(g, fullgraph=True, backend="aot_eager")
    for kernel_size in (3, 5, (3, 5)):  # a changed int argument recompiles as a symbol: made static too
        torch.testing.assert_close(compiled(x, kernel_size), g(x, kernel_size))
    with pytest.raises(ValueError, match=r"na2d takes q, k, v \[B, X, Y, heads, D\]"):
        attnopt.na2d(x[0], x[0], x[0], 3)
    with pytest.raises(ValueError, match="kernel_size x dilation = 4 x 2 exceeds"):
        attnopt.na2d(x, x, x, 4, dilation=2)
    with pytest.raises(ValueError, match="together"):
        attnopt.na2d(x, x, x, 3, additional_keys=x[:, 0])
    with pytest.raises(ValueError, match=r"\[B, N_add, heads_kv, D\]"):
        attnopt.na2d(x, x, x, 3, additional_keys=x, additional_values=x)
