"""The kernels ``attnopt kernels build`` compiles, found by running attnopt's own launchers.

A :class:`Scenario` is one call of a family's forward and backward launchers (``triton_impl.forward`` /
``backward``; sparse through ``sparse.ops``, which reorders tiled masks first) on ``meta`` tensors of a
typical training shape (:data:`SHAPE`). :func:`capture` runs scenarios with each family's kernel loader
replaced by a recorder, so nothing is compiled or launched: it returns every :class:`Launch` the launchers
made, with the spec they asked for and the exact keyword arguments they passed. The build then specializes
those arguments as Triton's JIT would (meta tensors count as 16-byte aligned, as CUDA allocations are) and
compiles each kernel for the target GPU, with the tiles :func:`arch_spec` says the launcher picks there.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable
from unittest import mock

import torch

from attnopt.codegen import tuning
from attnopt.kernels.dynamic import estimate_render
from attnopt.kernels.dynamic import estimate_triton as estimators
from attnopt.kernels.dynamic import render as dynamic_render
from attnopt.kernels.dynamic import triton_impl as dynamic
from attnopt.kernels.exact import render as exact_render
from attnopt.kernels.exact import triton_impl as exact
from attnopt.kernels.linear import render as linear_render
from attnopt.kernels.linear import triton_impl as linear
from attnopt.kernels.sigmoid import render as sigmoid_render
from attnopt.kernels.sigmoid import triton_impl as sigmoid
from attnopt.kernels.sparse import ops as sparse_ops
from attnopt.kernels.sparse import render as sparse_render
from attnopt.kernels.sparse import triton_impl as sparse
from attnopt.masks import Neighborhood, SlidingWindow

# (batch, query heads, sequence): B4 H16 with 4096 tokens; the tiles do not depend on them, the
# specialization only on their divisibility by 16.
SHAPE = (4, 16, 4096)
FAMILIES = ("exact", "sparse", "linear", "sigmoid", "dynamic", "estimate")

# family -> (launcher module, the loader name it calls, the real loader)
_LOADERS = {
    "exact": (exact, "load_kernel", exact_render.load_kernel),
    "sparse": (sparse, "load_kernel", sparse_render.load_kernel),
    "linear": (linear, "load", linear_render.load),
    "sigmoid": (sigmoid, "load", sigmoid_render.load),
    "dynamic": (dynamic, "load", dynamic_render.load),
    "estimate": (estimators, "load", estimate_render.load),
}


@dataclass(frozen=True)
class Scenario:
    """One forward and backward call of a family's launchers."""

    name: str  # e.g. "exact_d128_causal"
    family: str
    head_dim: int
    causal: bool
    dtype: str
    run: Callable[[], None]


@dataclass(frozen=True)
class Launch:
    """One kernel launch a scenario made: its spec (with the launcher's CPU tiles) and keyword arguments."""

    scenario: Scenario
    spec: object
    args: dict

    @property
    def kernel(self) -> str:
        """The kernel's role in its family: ``fwd``, ``bwd_dq``, ``dkdv``, ``state``, ``state_reverse``, ``grad`` ..."""
        role = getattr(self.spec, getattr(self.spec, "ROLE", "direction"))
        return f"{role}_reverse" if getattr(self.spec, "reverse", False) else role

    @property
    def name(self) -> str:
        return f"{self.scenario.name}.{self.kernel}"


def arch_spec(family: str, spec, capability: int):
    """The spec the family's launcher runs on a GPU of compute ``capability`` (e.g. 90): the exact kernels'
    tiles from :func:`attnopt.codegen.tuning.default` for the GPU's generation (what ``tuning.select`` picks
    without a tuning-cache entry), the other families' from their launcher's ``arch_spec``."""
    if family == "exact":
        return tuning.default(spec, tuning.generation(divmod(capability, 10)))
    return _LOADERS[family][0].arch_spec(spec, divmod(capability, 10))


def load(family: str, spec):
    """The ``@triton.jit`` kernel of ``spec`` (rendered into attnopt's kernel cache and imported)."""
    return _LOADERS[family][2](spec)


class _Recorder:
    """Stands in for a loaded kernel: ``recorder[grid](**args)`` records the launch instead of running it."""

    def __init__(self, spec, scenario: Scenario, launches: list[Launch]):
        self.spec, self.scenario, self.launches = spec, scenario, launches

    def __getitem__(self, grid):
        def launch(**args):
            args = {k: v for k, v in args.items() if k not in ("num_warps", "num_stages")}
            if all(other.spec != self.spec for other in self.launches if other.scenario is self.scenario):
                self.launches.append(Launch(self.scenario, self.spec, args))

        return launch


def capture(scenarios: list[Scenario]) -> list[Launch]:
    """Every distinct kernel launch of ``scenarios``, in launch order (see the module docstring)."""
    launches: list[Launch] = []
    for scenario in scenarios:
        with contextlib.ExitStack() as stack:
            for module, name, _ in _LOADERS.values():
                recorder = (lambda spec, s=scenario: _Recorder(spec, s, launches))
                stack.enter_context(mock.patch.object(module, name, recorder))
            scenario.run()
    return launches


def _t(*shape, dtype=torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _qkv(d: int, group: int = 1):
    b, h, s = SHAPE
    return _t(b, h, s, d), _t(b, h // group, s, d), _t(b, h // group, s, d)


def _exact(d: int, causal: bool, group: int = 1, features: bool = False) -> Callable[[], None]:
    def run():
        q, k, v = _qkv(d, group)
        b, h, s = SHAPE
        extra = {}
        if features:  # bool mask, ALiBi, softcap, dropout and key lengths at once
            extra = dict(attn_mask=_t(b, 1, s, s, dtype=torch.bool), alibi_slopes=_t(h, dtype=torch.float32),
                         softcap=30.0, dropout_p=0.1, seed=0, kv_lens=_t(b, dtype=torch.int32))  # fmt: skip
        mode = 2 if causal else 0  # bottom-right aligned, as masks.causal()
        out, lse = exact.forward(q, k, v, causal=mode, **extra)
        exact.backward(out, q, k, v, out, lse, causal=mode, **extra)

    return run


def _sparse(d: int, mask) -> Callable[[], None]:
    def run():
        q, k, v = _qkv(d)
        out, lse = sparse_ops.forward(sparse, q, k, v, mask)
        sparse_ops.backward(sparse, out, q, k, v, out, lse, mask)

    return run


def _linear(d: int, causal: bool) -> Callable[[], None]:
    def run():
        q, k, v = _qkv(d)
        out, den, _, _ = linear.forward(q, k, v, causal=causal, normalize=True)
        linear.backward(out, q, k, v, out, den, causal=causal, normalize=True)

    return run


def _sigmoid(d: int, causal: bool) -> Callable[[], None]:
    def run():
        q, k, v = _qkv(d)
        out = sigmoid.forward(q, k, v, causal=2 if causal else 0)
        sigmoid.backward(out, q, k, v, causal=2 if causal else 0)

    return run


def _dynamic(d: int, block: int, valid: bool) -> Callable[[], None]:
    """Block lists of a quarter of the key blocks (their number and indices are run-time data to the kernels)."""
    def run():
        q, k, v = _qkv(d, group=2)
        b, h, s = SHAPE
        n = s // block
        num, idx = _t(b, h, n, dtype=torch.int32), _t(b, h, n, n // 4, dtype=torch.int32)
        valid_keys = _t(b, s, dtype=torch.bool) if valid else None
        out, lse = dynamic.forward(q, k, v, num, idx, block, block, 2, valid_keys)
        dynamic.backward(out, q, k, v, out, lse, num, idx, block, block, 2, valid_keys)

    return run


def _estimate(d: int, block: int, stride: int) -> Callable[[], None]:
    """The Triton estimators (GQA, causal) as the dynamic ops call them: ``pooled``, then ``antidiagonal``."""
    def run():
        q, k, _ = _qkv(d, group=2)
        estimators.estimate("pooled", q, k, block, block, 0)
        estimators.estimate("antidiagonal", q, k, block, block, 0, stride=stride)

    return run


def scenarios() -> list[Scenario]:
    """Every family and direction: exact at D64, D128, D256 causal and not, GQA and a feature-heavy call;
    sparse for a sliding window and a 2-D neighborhood; linear at D64 and D128; sigmoid; dynamic (block lists, GQA)
    at D64 and D128 with key padding; its estimators (pooled, antidiagonal with stride 16) at D64 and D128."""
    side = math.isqrt(SHAPE[2])
    out = [Scenario(f"exact_d{d}{'_causal' if c else ''}", "exact", d, c, "bfloat16", _exact(d, c))
           for d in (64, 128, 256) for c in (False, True)]  # fmt: skip
    out += [
        Scenario("exact_d128_gqa4", "exact", 128, False, "bfloat16", _exact(128, False, group=4)),
        Scenario("exact_d128_features", "exact", 128, False, "bfloat16", _exact(128, False, features=True)),
        Scenario("sparse_window_d128", "sparse", 128, True, "bfloat16", _sparse(128, SlidingWindow(512, 0))),
        Scenario("sparse_neighborhood_d64", "sparse", 64, False, "bfloat16",
                 _sparse(64, Neighborhood(kernel_size=7, grid=(side, side)))),
    ]
    out += [Scenario(f"linear_d{d}", "linear", d, True, "bfloat16", _linear(d, True)) for d in (64, 128)]
    out += [Scenario(f"sigmoid_d{d}", "sigmoid", d, False, "bfloat16", _sigmoid(d, False)) for d in (64, 128)]
    out += [Scenario("dynamic_d64_b64", "dynamic", 64, True, "bfloat16", _dynamic(64, 64, False)),
            Scenario("dynamic_d128_b64_padding", "dynamic", 128, True, "bfloat16", _dynamic(128, 64, True))]
    out += [Scenario(f"estimate_d{d}_b64", "estimate", d, True, "bfloat16", _estimate(d, 64, 16)) for d in (64, 128)]
    return out
