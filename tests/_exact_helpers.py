"""Scaffolding shared by the exact-kernel tests (``tests/kernels/test_kernel_exact.py`` and
``tests/kernels/test_kernel_exact_bwd.py``).

The kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``), or with
``ATTNOPT_TEST_GPU=1`` on a CUDA machine compiled on the GPU (``ATTNOPT_TEST_GPU=1 pytest
tests/kernels/test_kernel_exact.py tests/kernels/test_kernel_exact_bwd.py``), plus the ``gpu``-marked tests.
"""

import os

import pytest
import torch

GPU = os.environ.get("ATTNOPT_TEST_GPU") == "1"
DEVICE = "cuda" if GPU else "cpu"
gpu_only = pytest.mark.skipif(not GPU, reason="set ATTNOPT_TEST_GPU=1 on a CUDA machine")
# The softcap's exp(2x) overflows to inf for large scores (tanh = 1 exactly); numpy warns in the interpreter.
ignore_exp2_overflow = pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def kernel_cache(tmp_path_factory):
    """Generated kernels go to a temporary cache, not the user's (autouse where imported)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.mktemp("attnopt_cache")))
        yield


def qkv(b=2, hq=2, hkv=None, sq=7, sk=7, d=16, dv=None, dtype=torch.float32, seed=0):
    """q [b, hq, sq, d], k [b, hkv, sk, d], v [b, hkv, sk, dv] (hkv defaults to hq, dv to d), seeded."""
    g = torch.Generator().manual_seed(seed)
    hkv = hq if hkv is None else hkv
    dv = d if dv is None else dv
    q = torch.randn(b, hq, sq, d, generator=g).to(DEVICE, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(DEVICE, dtype)
    v = torch.randn(b, hkv, sk, dv, generator=g).to(DEVICE, dtype)
    return q, k, v


def rand(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def alibi_bias(slopes, sq, sk):
    """The reference's additive equivalent of ALiBi: -slope_h * |j - i - (Sk - Sq)|, [(B,) Hq, Sq, Sk]."""
    i = torch.arange(sq, device=DEVICE)[:, None]
    j = torch.arange(sk, device=DEVICE)[None, :]
    return -slopes[..., None, None] * (j - i - (sk - sq)).abs()


def padding_keep(kv_lens, sk):
    """[B, 1, 1, Sk] bool: keys below each row's length."""
    return (torch.arange(sk, device=DEVICE) < kv_lens[:, None])[:, None, None, :]


def masked_rows(kind, fill=float("-inf")):
    """A [2, 2, 9, 17] mask with row (0, 1, 3) and rows (1, :, 8) fully masked (``fill`` for additive masks),
    and a few other keys masked with the same fill; returns ``(mask, keep)``."""
    keep = rand(2, 2, 9, 17, seed=7) > 0.2
    keep[..., 0] = True
    keep[0, 1, 3] = False
    keep[1, :, 8] = False
    if kind == "bool":
        return keep, keep
    return torch.zeros(keep.shape, device=DEVICE).masked_fill(~keep, fill), keep


def float16_case(mask_kind):
    """fp16 GQA inputs (odd sizes, Dv != D) and a mask: None, bool [Sq, Sk] or additive fp16 [B, 1, Sq, Sk]."""
    q, k, v = qkv(hq=4, hkv=2, sq=33, sk=40, d=40, dv=24, dtype=torch.float16)
    mask = None
    if mask_kind == "bool":
        mask = rand(33, 40, seed=3) > 0.3
    elif mask_kind == "additive":
        mask = randn(2, 1, 33, 40, seed=3).half()
    return q, k, v, mask
