import logging
import os

# Where the Triton kernels run, chosen here because pytest imports this file before any test module: @triton.jit
# reads TRITON_INTERPRET when it decorates, so triton.language's own helpers take the mode of triton's first import,
# which an earlier-collected test module may trigger (attnopt.hf does, through transformers and torch._dynamo).
# ATTNOPT_TEST_GPU=1 compiles the kernels for a CUDA GPU instead (see tests/_exact_helpers.py).
if os.environ.get("ATTNOPT_TEST_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with dynamo's caches empty, so compiled entries never leak between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def temp_kernel_cache(tmp_path_factory):
    """Generated kernels of the module's tests go to a temporary cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATTNOPT_CACHE_DIR", str(tmp_path_factory.mktemp("attnopt_cache")))
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Small models and tensors: one intra-op thread avoids OpenMP stalls on a loaded 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
