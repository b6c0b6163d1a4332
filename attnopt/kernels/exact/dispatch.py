"""Never slower than the user's baseline: attnopt's kernel or an SDPA backend, measured once per shape bucket.

For an exact attention site that ``F.scaled_dot_product_attention`` can also run, :func:`choose` times
attnopt's generated kernel and every SDPA backend that accepts the site (flash, cuDNN, memory-efficient)
on the call's own tensors, once per *dispatch key* (the site's features, its shape buckets, the GPU
and the torch and Triton versions), and persists the winner in ``<cache root>/dispatch/``. Later calls
with the same key read the decision without measuring. The :class:`Decision` says which backend runs
and by how much it beat the best other one, for the report; :func:`sdpa_runner` gives the callable
that runs an SDPA decision.

SDPA can run a site when it has no softcap and no in-kernel score bias (ALiBi, relative position
table, key-padding lengths), its causality is none or top-left (SDPA's ``is_causal``; bottom-right
only with Sq == Sk, where the two coincide), and, for a mask, any floating or boolean mask tensor
(not with the flash backend, which takes none). Dropout sites are measured too (the backends draw
their own masks; dropout stays random, not the same draw).

Without CUDA nothing is measured: the decision is the reference (``backend="reference"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from attnopt.codegen.cache import cache_root
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT, dtype_name, mask_kind

ATTNOPT = "attnopt"
SDPA_BACKENDS = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


@dataclass(frozen=True)
class Decision:
    """Which implementation runs a site, and how it compared.

    ``speedup`` is the runner-up's time over the winner's (>= 1) and ``versus`` names the runner-up;
    ``timings_ms`` holds every measured candidate (a backend that refused the site is absent).
    """

    backend: str
    speedup: float = 1.0
    versus: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)

    def describe(self) -> str:
        if self.versus is None:
            return self.backend
        return f"{self.backend} ({self.speedup:.2f}x vs {self.versus})"


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
        from attnopt.codegen.tuning import bucket

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
        causal_ok = self.causal in (CAUSAL_NONE, CAUSAL_TOP_LEFT) or (
            self.causal == CAUSAL_BOTTOM_RIGHT and self.same_length
        )
        if not causal_ok:
            return ()
        if self.mask != "none":
            return tuple(b for b in SDPA_BACKENDS if b != "sdpa-flash")
        return SDPA_BACKENDS


@dataclass(frozen=True)
class Environment:
    """The device-side part of a dispatch key."""

    gpu: str
    torch: str
    triton: str


def dispatch_key(site: Site, env: Environment) -> dict:
    return dict(site=asdict(site), env=asdict(env))


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    return cache_root() / "dispatch" / f"{digest}.json"


_MEMO: dict[str, Decision] = {}
_LOCK = threading.Lock()


def decide(site: Site, env: Environment, measure: Callable[[str], float | None]) -> Decision:
    """The cached decision for ``(site, env)``, or a new one: ``measure(name)`` returns milliseconds for
    ``"attnopt"`` and each of ``site.sdpa_backends()``, or None for a backend that cannot run the site."""
    key = dispatch_key(site, env)
    path = _path(key)
    with _LOCK:
        if str(path) in _MEMO:
            return _MEMO[str(path)]
    decision = _read(path, key)
    if decision is None:
        decision = _measure(site, measure)
        _write(path, key, decision)
    with _LOCK:
        _MEMO[str(path)] = decision
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    return Decision(**data["decision"])


def _write(path: Path, key: dict, decision: Decision) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(key=key, decision=asdict(decision)), f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def clear_memo() -> None:
    """Forgets the decisions read in this process (the files stay)."""
    with _LOCK:
        _MEMO.clear()


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           causal: int = CAUSAL_NONE, scale: float | None = None, dropout_p: float = 0.0, softcap: float = 0.0,
           backward: bool = False, timer: Callable[[Callable[[], object]], float] | None = None) -> Decision:
    """The implementation to run for this call: see the module docstring.

    Sites SDPA cannot run (softcap) go to attnopt without measuring; CPU tensors to the reference.
    ``timer`` (default ``triton.testing.do_bench``) times a callable in milliseconds.
    """
    if not q.is_cuda:
        return Decision("reference")
    site = Site.of(q, k, v, attn_mask, causal, dropout_p, backward)
    if softcap > 0.0 or not site.sdpa_backends():
        return Decision(ATTNOPT)
    import triton

    if timer is None:
        from triton.testing import do_bench

        timer = do_bench
    env = Environment(gpu=torch.cuda.get_device_name(q.device), torch=torch.__version__, triton=triton.__version__)
    return decide(site, env, lambda name: _time(name, q, k, v, attn_mask, causal, scale, dropout_p, backward, timer))


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


def _time(name, q, k, v, attn_mask, causal, scale, dropout_p, backward, timer) -> float | None:
    """Milliseconds of one implementation on the call's tensors (forward, or forward + backward), or None
    when it refuses them (an SDPA backend raises for inputs it does not support)."""
    if name == ATTNOPT:
        def fn(q, k, v):
            seed = torch.zeros((), dtype=torch.int64)
            return torch.ops.attnopt.attention(q, k, v, attn_mask, dropout_p, causal, scale, seed)[0]
    else:
        sdpa = sdpa_runner(name)

        def fn(q, k, v):
            return sdpa(q, k, v, attn_mask, causal, scale, dropout_p)
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
    try:
        step()
        return timer(step)
    except (RuntimeError, ValueError):
        return None
