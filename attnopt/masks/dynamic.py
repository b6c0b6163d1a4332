"""``Dynamic``: a content-based block mask, chosen at run time from q and k by a training-free estimator.

    attnopt.Sparse(attnopt.masks.Dynamic("pooled", block=64, threshold=0.9))
    attnopt.Sparse(attnopt.masks.Dynamic("vertical_slash", top_k=8, sink=1, local=2))

Per (batch row, query head, query block) the estimator scores every key block on pooled, strided or sampled
views of q and k (never an ``[Sq, Sk]`` matrix) and the kernel attends to the ``top_k`` most probable key
blocks, or the smallest set whose estimated mass reaches ``threshold``, plus the ``sink`` first key blocks and
the ``local`` key blocks on the diagonal, within the site's own mask (causal, padding). ``per_head=False``
shares one selection across the heads (the heads' probabilities averaged). ``options`` passes estimator
parameters as ``(name, value)`` pairs (``(("stride", 16),)`` for ``antidiagonal``; see
:mod:`attnopt.kernels.dynamic.estimate`).

``decode_top_k`` adds a decode-time KV selection for :func:`attnopt.generate` (Quest): the site keeps its keys
and values in pages of ``page`` tokens with per-page key summaries, and each one-token decode step attends
exactly to the ``decode_top_k`` best-scoring pages plus the pages holding the ``sink`` first and the ``local``
last key blocks (:mod:`attnopt.kernels.dynamic.session`). None (the default): the site has no decode
selection and generates through transformers' own KV cache.

The mask has no element predicate (it depends on the inputs): it runs only through the dynamic kernels
(:mod:`attnopt.kernels.dynamic`), which write the block lists at each call.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnopt.masks.base import Mask, block_pair, check_int, register_type

ESTIMATORS = ("pooled", "antidiagonal", "vertical_slash", "lowbit", "lsh")
DEFAULT_THRESHOLD = 0.9
# The density (share of the blocks the site's mask allows) the cost model assumes for a threshold, whose
# achieved density depends on the inputs.
ASSUMED_DENSITY = 0.1
DEFAULT_PAGE = 16  # tokens per page of the decode selection's cache (Quest's page size)


@register_type
@dataclass(frozen=True)
class Dynamic(Mask):
    estimator: str = "pooled"
    block: int | tuple = 64
    top_k: int | None = None
    threshold: float | None = None
    sink: int = 1
    local: int = 1
    per_head: bool = True
    options: tuple = ()
    decode_top_k: int | None = None
    page: int = DEFAULT_PAGE

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"Dynamic: unknown estimator {self.estimator!r}; known: {', '.join(ESTIMATORS)}")
        object.__setattr__(self, "block", block_pair("Dynamic", self.block))
        if self.top_k is not None and self.threshold is not None:
            raise ValueError("Dynamic takes top_k or threshold, not both")
        if self.top_k is None and self.threshold is None:
            object.__setattr__(self, "threshold", DEFAULT_THRESHOLD)
        check_int("Dynamic", "top_k", self.top_k, 0, allow_none=True)
        number = isinstance(self.threshold, (int, float)) and not isinstance(self.threshold, bool)
        if self.threshold is not None and not (number and 0.0 < self.threshold <= 1.0):
            raise ValueError(f"Dynamic.threshold is a probability mass in (0, 1]; got {self.threshold!r}")
        check_int("Dynamic", "sink", self.sink, 0)
        check_int("Dynamic", "local", self.local, 0)
        if not isinstance(self.per_head, bool):
            raise ValueError(f"Dynamic.per_head must be a bool; got {self.per_head!r}")
        check_int("Dynamic", "decode_top_k", self.decode_top_k, 0, allow_none=True)
        check_int("Dynamic", "page", self.page, 1)
        if self.decode_top_k is None and self.page != DEFAULT_PAGE:
            raise ValueError(f"Dynamic.page={self.page} sizes the pages of the decode selection, which is off; give "
                             "decode_top_k (the pages each decode step attends to) or leave page out")  # fmt: skip
        opts = tuple((str(k), v) for k, v in (self.options.items() if isinstance(self.options, dict) else self.options))
        object.__setattr__(self, "options", opts)

    @property
    def block_m(self) -> int:
        return self.block[0]

    @property
    def block_n(self) -> int:
        return self.block[1]

    def predicate(self, q, k, h, sq, sk, ops):
        raise TypeError(f"{self} depends on the inputs: it has no element predicate; run it through "
                        "attnopt.Sparse(...) or attnopt.kernels.dynamic")  # fmt: skip

    def expected_blocks(self, allowed: float) -> float:
        """Key blocks per query block the kernel is expected to visit when ``allowed`` blocks are allowed:
        ``top_k`` plus the kept blocks, or :data:`ASSUMED_DENSITY` of the allowed ones for a threshold."""
        if self.top_k is not None:
            return min(allowed, self.top_k + self.sink + self.local)
        return min(allowed, max(ASSUMED_DENSITY * allowed, self.sink + self.local))

    def decode_pages(self) -> tuple[int, int, int]:
        """``(top_k, sink, recent)`` pages of a decode step: ``decode_top_k`` and the pages covering the ``sink``
        first and the ``local`` last key blocks (the same tokens the prefill selection always keeps)."""
        if self.decode_top_k is None:
            raise ValueError(f"{self} has no decode selection; give it decode_top_k")
        per_block = -(-self.block_n // self.page)
        return self.decode_top_k, self.sink * per_block, self.local * per_block

    def __str__(self) -> str:
        rule = f"top_k={self.top_k}" if self.top_k is not None else f"threshold={self.threshold}"
        opts = "".join(f", {k}={v}" for k, v in self.options)
        shared = "" if self.per_head else ", shared across heads"
        decode = "" if self.decode_top_k is None else f", decode top_k={self.decode_top_k} pages of {self.page}"
        return (f"Dynamic({self.estimator}, block={self.block_m}x{self.block_n}, {rule}, sink={self.sink}, "
                f"local={self.local}{shared}{opts}{decode})")  # fmt: skip
