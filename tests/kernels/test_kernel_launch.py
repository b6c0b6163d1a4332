"""The launch fallback shared by the sparse, linear and sigmoid launchers: a tile configuration the compiler
rejects falls back to the next one and stays demoted in the process; each launcher goes through it."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from attnopt import masks
from attnopt.kernels import launch
from attnopt.kernels.linear import triton_impl as linear_impl
from attnopt.kernels.sigmoid import triton_impl as sigmoid_impl
from attnopt.kernels.sparse import triton_impl as sparse_impl


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNOPT_CACHE_DIR", str(tmp_path))
    launch.forget()
    yield
    launch.forget()


def test_a_rejected_config_falls_back_and_is_remembered():
    tried = []

    def run(spec):
        tried.append(spec)
        if spec == "big":
            raise OutOfResources(262144, 232448, "shared memory")

    assert launch.launch_first(["big", "small"], run, "cuda:0") == "small"
    assert launch.launch_first(["big", "small"], run, "cuda:0") == "small"  # not retried
    assert tried == ["big", "small", "small"] and launch.failed("cuda:0") == ["big"]
    assert launch.launch_first(["big", "small"], run, "cuda:1") == "small" and tried[-2:] == ["big", "small"]


def test_other_errors_and_the_last_rejection_propagate():
    def broken(spec):
        raise ValueError("a bug, not a tile problem")

    with pytest.raises(ValueError, match="a bug"):
        launch.launch_first(["big", "small"], broken, "cuda:0")
    assert launch.failed("cuda:0") == []

    def rejects_all(spec):
        raise OutOfResources(1, 0, "shared memory")

    with pytest.raises(OutOfResources):
        launch.launch_first(["big", "small"], rejects_all, "cuda:0")


def _reject_first(monkeypatch, module, attr):
    """Makes ``module.attr`` (the family's kernel loader) reject the first spec it is asked for."""
    original, seen = getattr(module, attr), []

    def load(spec):
        if not seen:
            seen.append(spec)
            raise OutOfResources(262144, 232448, "shared memory")
        return original(spec)

    monkeypatch.setattr(module, attr, load)
    return seen


def _qkv(d=32, s=20):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(1, 2, s, d, generator=g) for _ in range(3)]


def test_every_launcher_falls_back(monkeypatch):
    q, k, v = _qkv()
    want = linear_impl.forward(q, k, v)
    seen = _reject_first(monkeypatch, linear_impl, "load")
    got = linear_impl.forward(q, k, v)
    assert seen and launch.failed("cpu") == seen
    torch.testing.assert_close(got[0], want[0])

    want = sigmoid_impl.forward(q, k, v)
    seen = _reject_first(monkeypatch, sigmoid_impl, "load")
    torch.testing.assert_close(sigmoid_impl.forward(q, k, v), want)
    assert seen[0] in launch.failed("cpu")

    mask = masks.SlidingWindow(5, 0)
    want = sparse_impl.forward(q, k, v, mask)
    seen = _reject_first(monkeypatch, sparse_impl, "load_kernel")
    torch.testing.assert_close(sparse_impl.forward(q, k, v, mask)[0], want[0])
    assert seen[0] in launch.failed("cpu") and seen[0].block_m * seen[0].block_n > 16 * 16


def test_arch_spec_gives_each_generation_its_table_row():
    """``arch_spec`` (what ``attnopt kernels build`` compiles per target) maps a launch's spec to the tiles the
    launcher picks on that GPU."""
    from attnopt.kernels.linear.spec import specs as linear_specs
    from attnopt.kernels.sigmoid.render import specs as sigmoid_specs
    from attnopt.kernels.sparse.render import SparseKernelSpec
    from attnopt.kernels.sparse.tiles import configs

    grad = linear_specs("grad", 128, 128, "bfloat16", True, True, False)[0]
    for cap in ((8, 0), (9, 0)):
        assert linear_impl.arch_spec(grad, cap) == linear_specs("grad", 128, 128, "bfloat16", True, True, False,
                                                                capability=cap)[0]  # fmt: skip
    assert linear_impl.arch_spec(grad, (8, 0)).block_dt < linear_impl.arch_spec(grad, (9, 0)).block_dt
    bwd = sigmoid_specs("bwd_q", 64, 64, "bfloat16", 0, "none")[0]
    assert sigmoid_impl.arch_spec(bwd, (8, 0)).num_warps == 8 and sigmoid_impl.arch_spec(bwd, (9, 0)).num_warps == 4
    dq = SparseKernelSpec(direction="dq", head_dim=64, head_dim_v=64, dtype="bfloat16", block_m=64, block_n=64,
                          predicate="(cols2 >= 0)", mask="x")  # fmt: skip
    for cap in ((8, 0), (9, 0)):
        got = sparse_impl.arch_spec(dq, cap)
        assert (got.block_m, got.block_n, got.num_warps, got.num_stages) == configs("dq", "bfloat16", 64, 64, cap)[0]
