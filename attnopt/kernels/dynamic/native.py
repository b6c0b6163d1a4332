"""The native CPU kernel of block-list attention: fp32 flash attention over each query block's own key blocks.

The gathering path (:mod:`attnopt.kernels.dynamic.cpu`) copies every unit's key blocks before ATen's fused kernel
runs them; at S=32k and 10% density that copy moves gigabytes and costs as much as the attention itself. This
kernel (``native/block_list.cpp``) reads q, k and v where they are:

* per unit (batch row, query head, query block, in parallel over OpenMP threads) the query block is transposed
  once into a local ``[D, block_m]`` buffer, scaled by ``scale · log2(e)``;
* per selected key block ``n`` the score tile is computed transposed, ``Sᵀ [block_n, block_m] = K_n · Qᵀ``, so K's
  rows are read in place and the query index is the vector lane; the site's mask (causal offset, key padding,
  sequence ends) sets hidden scores to -inf; the online softmax (base 2) keeps per-query maxima and sums with
  elementwise vector operations; ``O += Pᵀᵀ V_n`` reads V's rows in place;
* the backward recomputes P from the forward's log-sum-exp in two parallel loops: per unit for dQ, and per key
  block (over the units that selected it: the selection inverted into CSR lists) for dK and dV, so no two
  threads write the same rows.

``2^x`` is a degree-7 polynomial after range reduction (relative error below 1e-7). The kernel takes fp32,
block sizes of 16, 32, 64 or 128 and head dims that are multiples of 16 up to 128 (:func:`refusal`); anything
else runs on the gathering path. It is compiled on first use with the system's C++ compiler (``$CXX`` or
``g++``, ``-O3 -march=native -fopenmp``) into attnopt's cache directory, keyed by the source, flags and
compiler; :func:`unavailable` says why it cannot be (no compiler, a failed build), and ``ATTNOPT_NATIVE=0``
turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from attnopt.codegen.cache import cache_root
from attnopt.kernels.dynamic.blocks import causal_offset, dense_blocks, num_blocks

SOURCES = tuple(Path(__file__).parent / "native" / name for name in ("block_list.cpp", "select.cpp"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
BLOCKS = (16, 32, 64, 128)
MAX_DIM = 128
_P = ctypes.POINTER


class _Problem(ctypes.Structure):
    """Mirror of ``struct Problem`` in block_list.cpp (same order)."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("q", "k", "v", "dout", "o", "lse", "dq", "dk", "dv", "lse2",
                                               "delta", "num", "idx", "inv_ptr", "inv_units", "valid")] + \
               [(n, ctypes.c_int64) for n in ("B", "Hq", "Hkv", "Sq", "Sk", "SkP", "D", "Dv", "bm", "bn", "NQ", "NK",
                                              "L", "Hs", "causal", "offset", "threads")] + [("scale", ctypes.c_float)]  # fmt: skip


class _Selection(ctypes.Structure):
    """Mirror of ``struct Selection`` in select.cpp."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("probs", "num", "idx")] + \
               [(n, ctypes.c_int64) for n in ("rows", "NQ", "NK", "Sq", "Sk", "bm", "bn", "causal", "offset", "top_k",
                                              "sink", "local", "threads")] + [("threshold", ctypes.c_float)]  # fmt: skip


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _build(cxx: str) -> Path:
    """The compiled library in the cache directory (built once per source, flags, compiler and machine)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    texts = [source.read_text() for source in SOURCES]
    key = hashlib.sha256("\n".join([*texts, " ".join(FLAGS), *version, platform.machine()]).encode())
    target = cache_root() / "native" / f"block_list-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([cxx, *FLAGS, *map(str, SOURCES), "-o", str(built)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        os.replace(built, target)  # atomic: concurrent builders (test workers) agree on the file
    return target


def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """``(library, None)`` or ``(None, why not)``; ``ATTNOPT_NATIVE=0`` is read at every call."""
    if os.environ.get("ATTNOPT_NATIVE", "1") == "0":
        return None, "turned off by ATTNOPT_NATIVE=0"
    return _built()


@functools.cache
def _built() -> tuple[ctypes.CDLL | None, str | None]:
    cxx = _compiler()
    if cxx is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH: install g++ or set $CXX"
    try:
        lib = ctypes.CDLL(str(_build(cxx)))
    except (OSError, RuntimeError) as exc:
        return None, f"building the native kernels (attnopt/kernels/dynamic/native/) failed: {exc}"
    for name in ("attnopt_block_list_forward", "attnopt_block_list_backward"):
        getattr(lib, name).argtypes = [_P(_Problem)]
        getattr(lib, name).restype = ctypes.c_int
    lib.attnopt_select.argtypes = [_P(_Selection)]
    lib.attnopt_select.restype = None
    return lib, None


def unavailable() -> str | None:
    """Why the native kernel cannot run on this machine, or None (builds it on the first call)."""
    return _library()[1]


def refusal(q, k, v, block_m: int, block_n: int) -> str | None:
    """Why these inputs take the gathering path, or None."""
    if q.device.type != "cpu":
        return f"the native kernel runs on CPU tensors; got {q.device}"
    if not (q.dtype == k.dtype == v.dtype == torch.float32):
        return f"the native kernel takes fp32; got {q.dtype}"
    if block_m not in BLOCKS or block_n not in BLOCKS:
        return f"the native kernel takes blocks of {BLOCKS}; got {block_m}x{block_n}"
    for name, dim in (("head dim", q.shape[-1]), ("value dim", v.shape[-1])):
        if dim % 16 or dim > MAX_DIM:
            return f"the native kernel takes {name}s that are multiples of 16 up to {MAX_DIM}; got {dim}"
    return unavailable()


def select(probs: torch.Tensor, sq: int, sk: int, block_m: int, block_n: int, offset: int | None, *,
           top_k: int | None = None, threshold: float | None = None, sink: int = 1, local: int = 1):  # fmt: skip
    """``(kv_num, kv_idx)`` int32 of CPU ``probs`` [B, H, NQ, NK]: the rule of
    :func:`attnopt.kernels.dynamic.select.select` (ties aside), without its ``[B, H, NQ, NK]`` sorts."""
    if (top_k is None) == (threshold is None):
        raise ValueError("give exactly one of top_k (key blocks per query block) or threshold (mass in (0, 1])")
    if probs.device.type != "cpu":
        raise ValueError(f"the native selection takes CPU probabilities; got {probs.device}")
    p = probs.float().contiguous()
    rows, nk = p.numel() // p.shape[-1], p.shape[-1]
    num = torch.empty(p.shape[:-1], dtype=torch.int32)
    idx = torch.empty(p.shape, dtype=torch.int32)
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the native selection is unavailable: {why}")
    lib.attnopt_select(ctypes.byref(_Selection(
        probs=p.data_ptr(), num=num.data_ptr(), idx=idx.data_ptr(), rows=rows, NQ=p.shape[2], NK=nk, Sq=sq, Sk=sk,
        bm=block_m, bn=block_n, causal=int(offset is not None), offset=offset or 0,
        top_k=-1 if top_k is None else int(top_k), sink=sink, local=local, threads=torch.get_num_threads(),
        threshold=0.0 if threshold is None else float(threshold))))  # fmt: skip
    length = max(int(num.max()) if num.numel() else 0, 1)
    return num, idx[..., :length].contiguous()


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` [B, H, S, ·] contiguous with ``rows`` rows (zeros past S: finite values for masked keys)."""
    x = x.contiguous()
    return x if x.shape[2] == rows else torch.nn.functional.pad(x, (0, 0, 0, rows - x.shape[2]))


def _problem(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale, keep: list) -> _Problem:
    """The shared fields; ``keep`` holds every tensor the pointers refer to until the call returns."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    nq, nk = num_blocks(sq, block_m), num_blocks(sk, block_n)
    offset = causal_offset(causal, sq, sk)
    num, idx = kv_num.contiguous(), kv_idx.contiguous()
    live = torch.arange(idx.shape[-1]) < num[..., None]
    if bool((live & ((idx < 0) | (idx >= nk))).any()):
        raise ValueError(f"kv_idx holds key blocks outside 0..{nk - 1} (ceil(Sk/block_n)) among its first kv_num "
                         "entries")  # fmt: skip
    tensors = dict(q=q.contiguous(), k=_padded(k, nk * block_n), v=_padded(v, nk * block_n), num=num, idx=idx,
                   valid=None if kv_valid is None else kv_valid.contiguous().view(torch.uint8))  # fmt: skip
    keep.extend(t for t in tensors.values() if t is not None)
    ptrs = {n: (t.data_ptr() if t is not None else None) for n, t in tensors.items()}
    return _Problem(**ptrs, B=b, Hq=hq, Hkv=hkv, Sq=sq, Sk=sk, SkP=nk * block_n, D=d, Dv=dv, bm=block_m, bn=block_n,
                    NQ=nq, NK=nk, L=idx.shape[-1], Hs=num.shape[1], causal=int(offset is not None),
                    offset=offset or 0, threads=torch.get_num_threads(), scale=d ** -0.5 if scale is None else scale)  # fmt: skip


def _run(name: str, problem: _Problem) -> None:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the native block-list kernel is unavailable: {why}")
    if getattr(lib, name)(ctypes.byref(problem)) != 0:
        raise ValueError("the native block-list kernel refused its shapes (see native.refusal)")


def forward(q, k, v, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(out [B, Hq, Sq, Dv], lse [B, Hq, Sq])`` fp32, as :func:`attnopt.kernels.dynamic.cpu.forward`."""
    keep: list = []
    problem = _problem(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale, keep)
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = q.new_empty(q.shape[:3])
    problem.o, problem.lse = out.data_ptr(), lse.data_ptr()
    _run("attnopt_block_list_forward", problem)
    return out, lse


def _inverse(kv_num, kv_idx, hq: int, hkv: int, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the units ``h · NQ + m`` selecting each (batch row, kv head, key block): ``(ptr, units)`` int32."""
    chosen = dense_blocks(kv_num, kv_idx, nk)  # [B, Hs, NQ, NK]
    b, _, nq, _ = chosen.shape
    chosen = chosen.expand(b, hq, nq, nk).reshape(b, hkv, hq // hkv, nq, nk).permute(0, 1, 4, 2, 3)
    at = chosen.nonzero()  # rows (b, kv head, n, g, m), ordered by group
    group = (at[:, 0] * hkv + at[:, 1]) * nk + at[:, 2]
    units = (at[:, 1] * (hq // hkv) + at[:, 3]) * nq + at[:, 4]
    ptr = torch.zeros(b * hkv * nk + 1, dtype=torch.int64)
    ptr[1:] = torch.bincount(group, minlength=b * hkv * nk).cumsum(0)
    return ptr.to(torch.int32), units.to(torch.int32).contiguous()


def backward(dout, q, k, v, out, lse, kv_num, kv_idx, block_m, block_n, causal=0, kv_valid=None, scale=None):
    """``(dq, dk, dv)`` of :func:`forward` on the same selection."""
    keep: list = []
    problem = _problem(q, k, v, kv_num, kv_idx, block_m, block_n, causal, kv_valid, scale, keep)
    b, hkv, skp = k.shape[0], k.shape[1], problem.SkP
    dout = dout.contiguous()
    lse2 = (lse.float() * math.log2(math.e)).masked_fill(lse == float("-inf"), 0.0).contiguous()
    delta = (dout * out).sum(-1).contiguous()
    ptr, units = _inverse(kv_num, kv_idx, q.shape[1], hkv, problem.NK)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk, dv = q.new_empty(b, hkv, skp, q.shape[-1]), q.new_empty(b, hkv, skp, v.shape[-1])
    keep.extend((dout, lse2, delta, ptr, units))
    for name, t in (("dout", dout), ("lse2", lse2), ("delta", delta), ("inv_ptr", ptr), ("inv_units", units),
                    ("dq", dq), ("dk", dk), ("dv", dv)):  # fmt: skip
        setattr(problem, name, t.data_ptr())
    _run("attnopt_block_list_backward", problem)
    return dq, dk[:, :, :k.shape[2]], dv[:, :, :k.shape[2]]
