"""Never slower than the user's baseline: attnopt's kernel or an SDPA backend, measured once per shape bucket.

For an exact attention site that ``F.scaled_dot_product_attention`` can also run, :func:`choose` times
attnopt's generated kernel and every SDPA backend that accepts the site (flash, cuDNN, memory-efficient)
on the call's own tensors, once per *dispatch key* (the site's features, its shape buckets, the GPU
and the torch and Triton versions), and persists the winner in ``<cache root>/dispatch/``. Later calls
with the same key read the decision without measuring. The :class:`Decision` says which backend runs
and by how much it beat the best other one, for the report.

The CUDA implementation of ``torch.ops.attnopt.attention`` consults :func:`choose` on every call (a
dictionary lookup after the first call of a bucket) and, when an SDPA backend wins, runs it through
:func:`sdpa_forward`: the aten op of that backend that also returns the log-sum-exp, normalized to
attnopt's ``lse`` (``[B, Hq, Sq]`` fp32, natural log, ``-inf`` and zero output on fully masked rows),
so that attnopt's backward, which recomputes the probabilities from ``lse``, stays exact.

SDPA can run a site when it has no softcap, no dropout (the backward could not replay an SDPA
backend's random mask), no GQA (the aten ops take equal head counts), its causality is none or
top-left (SDPA's ``is_causal``; bottom-right only with Sq == Sk, where the two coincide), and, for a
mask, any floating or boolean mask tensor (not with the flash backend, which takes none). A backend
that still refuses the tensors at run time (alignment, head dim) is skipped when measuring, and the
attnopt kernel runs instead.

On CPU nothing is measured: rules decide (:func:`cpu_refusal`). SDPA's CPU flash kernel (``SDPA_CPU``, what
``F.scaled_dot_product_attention`` runs on CPU) takes every call it can compute exactly, GQA and every causal
alignment included (:mod:`attnopt.kernels.exact.cpu` adapts them); attnopt's blockwise kernel (``BLOCKWISE``)
runs the rest. ``benchmarks/cpu.py`` backs the rule: on the calls both can run, SDPA's C++ kernel is the
faster. Dispatch is off (attnopt's kernel, or the blockwise kernel on CPU, always runs) with
``ATTNOPT_SDPA_DISPATCH=0`` or inside :func:`disabled`.
:func:`record` collects the decisions made while it is active, for the report.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from attnopt.codegen.cache import cache_root, key_digest, read_keyed, write_keyed
from attnopt.codegen.spec import CAUSAL_NONE, dtype_name, mask_kind
from attnopt.codegen.tuning import bucket

ATTNOPT = "attnopt"
REFERENCE = "reference"
SDPA_CPU = "sdpa-flash-cpu"  # aten._scaled_dot_product_flash_attention_for_cpu, SDPA's own CPU kernel
BLOCKWISE = "blockwise"  # attnopt's CPU kernel in torch ops (kernels.exact.cpu_blockwise)
SDPA_BACKENDS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
ENV_VAR = "ATTNOPT_SDPA_DISPATCH"  # "0" turns dispatch off: the attnopt kernel always runs


@dataclass(frozen=True)
class Decision:
    """Which implementation runs a site, and how it compared.

    ``speedup`` is the runner-up's time over the winner's (>= 1) and ``versus`` names the runner-up;
    ``timings_ms`` holds every measured candidate (a backend that refused the site is absent).
    ``note`` says why nothing was measured (dispatch off, a site SDPA cannot run).
    """

    backend: str
    speedup: float = 1.0
    versus: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    note: str = ""

    def describe(self) -> str:
        """One line for the report, e.g. ``attnopt kernel, 1.31x vs sdpa-flash``."""
        if self.backend == REFERENCE:
            return "reference (CPU)"
        if self.backend == SDPA_CPU:
            return "sdpa-flash (CPU)"
        if self.backend == BLOCKWISE:
            return f"blockwise (CPU: {self.note})" if self.note else "blockwise (CPU)"
        if self.backend == ATTNOPT:
            if self.versus is None:
                return f"attnopt kernel ({self.note})" if self.note else "attnopt kernel"
            return f"attnopt kernel, {self.speedup:.2f}x vs {self.versus}"
        if ATTNOPT in self.timings_ms:
            ratio = self.timings_ms[ATTNOPT] / self.timings_ms[self.backend]
            return f"{self.backend}, {ratio:.2f}x faster than the attnopt kernel"
        return f"{self.backend}, {self.speedup:.2f}x vs {self.versus}"


@dataclass(frozen=True)
class Site:
    """What a dispatch decision depends on, besides the device: the site's features and shape buckets."""

    dtype: str
    head_dim: int
    head_dim_v: int
    group: int
    causal: int
    mask: str  # "none", "bool" or "additive"
    mask_dims: str  # which of [B, H, Sq, Sk] the mask varies along, e.g. "b__n" for a key-padding mask
    same_length: bool  # Sq == Sk: bottom-right and top-left causal coincide
    dropout: bool
    backward: bool  # whether forward + backward is what runs (training) or the forward alone
    seq_q_bucket: int
    seq_k_bucket: int
    batch_heads_bucket: int

    @classmethod
    def of(cls, q, k, v, attn_mask, causal: int, dropout_p: float, backward: bool) -> Site:
        b, hq, sq, _ = q.shape
        sk = k.shape[2]
        dims = "none"
        if attn_mask is not None:
            shape = (1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)
            dims = "".join(name if n > 1 else "_" for name, n in zip("bhmn", shape))
        return cls(dtype=dtype_name(q.dtype), head_dim=q.shape[3], head_dim_v=v.shape[3], group=hq // k.shape[1],
                   causal=causal, mask=mask_kind(attn_mask), mask_dims=dims, same_length=sq == sk,
                   dropout=dropout_p > 0.0,
                   backward=backward, seq_q_bucket=bucket(sq), seq_k_bucket=bucket(sk),
                   batch_heads_bucket=bucket(b * hq))

    def sdpa_backends(self) -> tuple[str, ...]:
        """The SDPA backends that can compute this site exactly (before asking them at run time)."""
        if self.sdpa_refusal():
            return ()
        if self.mask != "none":
            return tuple(b for b in SDPA_BACKENDS if b != "sdpa-flash")
        return SDPA_BACKENDS

    def sdpa_refusal(self) -> str:
        """Why no SDPA backend can run this site in attnopt's place, or "" when some can."""
        if self.causal != CAUSAL_NONE and not self.same_length:
            # the aten ops' is_causal is bottom-right for flash (FlashAttention-2's convention) but top-left for
            # the efficient kernel: only square causal attention, where both coincide, is unambiguous
            return "causal with Sq != Sk: the SDPA backends' aten ops disagree on its alignment"
        if self.dropout:
            return "dropout: the backward replays attnopt's own dropout mask"
        if self.group > 1:
            return "GQA: SDPA's kernels would need k and v repeated"
        return ""


@dataclass(frozen=True)
class Environment:
    """The device-side part of a dispatch key."""

    gpu: str
    torch: str
    triton: str


def dispatch_key(site: Site, env: Environment) -> dict:
    return dict(site=asdict(site), env=asdict(env))


def _path(key: dict) -> Path:
    return cache_root() / "dispatch" / f"{key_digest(key)}.json"


_MEMO: dict[tuple[Site, Environment], Decision] = {}
_LOCK = threading.Lock()


def decide(site: Site, env: Environment, measure: Callable[[str], float | None]) -> Decision:
    """The cached decision for ``(site, env)``, or a new one: ``measure(name)`` returns milliseconds for
    ``"attnopt"`` and each of ``site.sdpa_backends()``, or None for a backend that cannot run the site."""
    decision = cached(site, env)
    if decision is None:
        decision = _measure(site, measure)
        key = dispatch_key(site, env)
        _write(_path(key), key, decision)
        with _LOCK:
            _MEMO[site, env] = decision
    return decision


def cached(site: Site, env: Environment) -> Decision | None:
    """The decision already taken for ``(site, env)`` in this process or on disk, else None (nothing is measured)."""
    with _LOCK:
        if (site, env) in _MEMO:
            return _MEMO[site, env]  # the per-call path: no hashing of the key, no file access
    key = dispatch_key(site, env)
    decision = _read(_path(key), key)
    if decision is not None:
        with _LOCK:
            _MEMO[site, env] = decision
    return decision


def _measure(site: Site, measure: Callable[[str], float | None]) -> Decision:
    timings = {}
    for name in (ATTNOPT, *site.sdpa_backends()):
        ms = measure(name)
        if ms is not None:
            timings[name] = float(ms)
    if not timings:
        raise RuntimeError("no attention implementation ran the site")
    ranked = sorted(timings, key=lambda name: (timings[name], name != ATTNOPT))  # ties go to attnopt
    if len(ranked) == 1:
        return Decision(ranked[0], 1.0, None, timings)
    return Decision(ranked[0], timings[ranked[1]] / timings[ranked[0]], ranked[1], timings)


def _read(path: Path, key: dict) -> Decision | None:
    record = read_keyed(path, key)
    return None if record is None else Decision(**record["decision"])


def _write(path: Path, key: dict, decision: Decision) -> None:
    write_keyed(path, dict(key=key, decision=asdict(decision)))


def clear_memo() -> None:
    """Forgets the decisions read in this process (the files stay)."""
    with _LOCK:
        _MEMO.clear()


_DISABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("attnopt_dispatch_disabled", default=False)
_RECORDING: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnopt_dispatch_record", default=None)


def enabled() -> bool:
    """Whether SDPA dispatch is on: not inside :func:`disabled` and ``ATTNOPT_SDPA_DISPATCH`` is not "0"."""
    return not _DISABLED.get() and os.environ.get(ENV_VAR, "1") != "0"


@contextlib.contextmanager
def disabled():
    """Within this block attnopt's kernel runs without consulting the dispatch."""
    token = _DISABLED.set(True)
    try:
        yield
    finally:
        _DISABLED.reset(token)


@contextlib.contextmanager
def record():
    """Yields a list that collects every :class:`Decision` taken (by :func:`choose` or :func:`note`) in this block."""
    decisions: list[Decision] = []
    token = _RECORDING.set(decisions)
    try:
        yield decisions
    finally:
        _RECORDING.reset(token)


def note(decision: Decision) -> Decision:
    """Hands ``decision`` to the active :func:`record` block, if any; returns it."""
    decisions = _RECORDING.get()
    if decisions is not None:
        decisions.append(decision)
    return decision


@functools.lru_cache(maxsize=None)
def current_environment(device: torch.device) -> Environment:
    """The environment of ``device`` (asked once per device: every CUDA forward needs it)."""
    import triton

    return Environment(gpu=torch.cuda.get_device_name(device), torch=torch.__version__, triton=triton.__version__)


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           causal: int = CAUSAL_NONE, scale: float | None = None, dropout_p: float = 0.0, softcap: float = 0.0,
           backward: bool = False, timer: Callable[[Callable[[], object]], float] | None = None,
           env: Environment | None = None) -> Decision:
    """The implementation to run for this call: see the module docstring.

    Sites SDPA cannot run (softcap, dropout, GQA, ...) go to attnopt without measuring, with the reason
    in :attr:`Decision.note`; CPU tensors follow :func:`cpu_refusal` unless ``env`` is given. ``timer``
    (default ``triton.testing.do_bench``) times a callable in milliseconds; ``env`` (default: the
    tensors' GPU) names the device in the dispatch key. Passing both runs the decision on any device.
    """
    off = "SDPA dispatch off" if _DISABLED.get() else f"{ENV_VAR}=0"
    if not q.is_cuda and env is None:
        refusal = cpu_refusal(q, k, v, attn_mask, dropout_p, softcap) if enabled() else off
        return note(Decision(BLOCKWISE, note=refusal) if refusal else Decision(SDPA_CPU))
    if not enabled():
        return note(Decision(ATTNOPT, note=off))
    site = Site.of(q, k, v, attn_mask, causal, dropout_p, backward)
    refusal = "softcap: SDPA has none" if softcap > 0.0 else site.sdpa_refusal()
    if refusal:
        return note(Decision(ATTNOPT, note=f"no SDPA backend: {refusal}"))
    env = current_environment(q.device) if env is None else env
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        # timing would launch kernels into the graph being captured: only an earlier decision applies
        return note(cached(site, env) or Decision(ATTNOPT, note="not measured inside CUDA graph capture"))
    if timer is None:
        from triton.testing import do_bench

        timer = do_bench
    return note(decide(site, env, lambda name: _time(name, q, k, v, attn_mask, causal, scale, backward, timer)))


def cpu_refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float, softcap: float) -> str:
    """Why SDPA's CPU flash kernel cannot compute this call exactly (the blockwise kernel runs it), or ""."""
    if softcap > 0.0:
        return "softcap: SDPA has none"
    if dropout_p > 0.0:
        return "dropout: SDPA cannot replay attnopt's seeded mask"
    if v.shape[-1] != q.shape[-1]:
        return "value head dim differs from the query's: SDPA's CPU kernel needs them equal"
    if q.numel() == 0 or k.shape[2] == 0:
        return "empty sequence"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype}"
    if attn_mask is not None and attn_mask.is_floating_point() and attn_mask.dtype != q.dtype:
        return f"a {attn_mask.dtype} additive mask with {q.dtype} inputs: SDPA would round it to {q.dtype}"
    return ""


def normalize_lse(lse: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """An SDPA backend's log-sum-exp as attnopt's ``lse``: ``shape = (B, Hq, Sq)``, fp32, contiguous.

    The memory-efficient backend pads its ``lse`` along Sq (to a multiple of 32) and cuDNN's may carry a
    trailing dim of 1; both are natural-log like attnopt's.
    """
    b, hq, sq = shape
    if lse.dim() == 4 and lse.shape[3] == 1:
        lse = lse[..., 0]
    if lse.dim() != 3 or tuple(lse.shape[:2]) != (b, hq) or lse.shape[2] < sq:
        raise ValueError(f"an SDPA log-sum-exp of shape {tuple(lse.shape)} does not cover [B, Hq, Sq] = {shape}")
    return lse[:, :, :sq].to(torch.float32).contiguous()


def zero_dead_rows(out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """attnopt's convention for rows without a visible key: zero output, ``lse = -inf`` (SDPA may give NaN)."""
    dead = lse.isnan() | (lse == float("-inf"))  # [B, Hq, Sq]
    return out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, float("-inf"))


def sdpa_forward(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                 causal: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of one SDPA backend through its aten op, in attnopt's conventions.

    For a site :meth:`Site.sdpa_backends` accepts; raises RuntimeError when the backend refuses the tensors.
    """
    aten = torch.ops.aten
    is_causal = causal != CAUSAL_NONE
    b, hq, sq, _ = q.shape
    if backend == "sdpa-flash":
        if attn_mask is not None:
            raise ValueError("the flash backend takes no attention mask")
        out, lse = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
    else:
        bias = None
        if attn_mask is not None:
            bias = attn_mask
            if attn_mask.dtype == torch.bool:  # True = attend -> 0, False -> -inf, on the mask's own shape
                bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask,
                                                                                                float("-inf"))
            bias = bias.to(q.dtype).expand(b, hq, sq, k.shape[2])  # [B, Hq, Sq, Sk] view
        if backend == "sdpa-efficient":
            out, lse = aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, is_causal,
                                                                    scale=scale)[:2]
        elif backend == "sdpa-cudnn":
            out, lse = aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, is_causal, False,
                                                                scale=scale)[:2]
        else:
            raise ValueError(f"unknown SDPA backend {backend!r}; expected one of {SDPA_BACKENDS}")
    return zero_dead_rows(out, normalize_lse(lse, (b, hq, sq)))


def sdpa_runner(backend: str) -> Callable:
    """``fn(q, k, v, attn_mask, causal, scale, dropout_p) -> out`` running SDPA restricted to ``backend``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
             "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v, attn_mask=None, causal=CAUSAL_NONE, scale=None, dropout_p=0.0):
        with sdpa_kernel(which):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal != CAUSAL_NONE, scale=scale,
                enable_gqa=q.shape[1] != k.shape[1])

    return run


def _time(name, q, k, v, attn_mask, causal, scale, backward, timer) -> float | None:
    """Milliseconds of one implementation on the call's tensors (forward, or forward + backward), or None
    when it refuses them (an SDPA backend raises for inputs it does not support).

    The forward is timed as the op runs it: attnopt's kernel, or the backend's aten op with its lse.
    attnopt's own kernel is never refused: its errors propagate.
    """
    if name == ATTNOPT:
        op_scale = q.shape[3] ** -0.5 if scale is None else scale

        def fn(q, k, v):
            with disabled():  # the op's CUDA path would consult this dispatch again
                return torch.ops.attnopt.attention(q, k, v, attn_mask, 0.0, causal, op_scale, None)[0]
    elif backward:
        sdpa = sdpa_runner(name)

        def fn(q, k, v):
            return sdpa(q, k, v, attn_mask, causal, scale)
    else:
        def fn(q, k, v):
            return sdpa_forward(name, q, k, v, attn_mask, causal, scale)[0]
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        dout = torch.randn(q.shape[:3] + v.shape[3:], dtype=q.dtype, device=q.device)

        def step():
            q.grad = k.grad = v.grad = None
            fn(q, k, v).backward(dout)
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v)
    if name == ATTNOPT:
        step()
        return timer(step)
    try:
        step()
        return timer(step)
    except (RuntimeError, ValueError):
        return None
