import logging

import pytest
import torch

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
