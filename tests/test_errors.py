"""Bad input gets a clear error and leaves the model untouched."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import attnopt
from attnopt import zoo


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training, type(model).forward


def _assert_untouched(model, snap):
    state, training, fwd = snap
    assert model.training == training and type(model).forward is fwd
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_unknown_policy_string():
    z = zoo.build("gpt2")
    snap = _snapshot(z.model)
    with pytest.raises(ValueError, match="unknown policy 'fastest'.*exact"):
        attnopt.optimize(z.model, "fastest", z.args, z.kwargs)
    _assert_untouched(z.model, snap)


def test_inputs_that_do_not_fit():
    z = zoo.build("bert")
    snap = _snapshot(z.model)
    with pytest.raises(attnopt.InputError, match="do not fit BertModel"):
        attnopt.optimize(z.model, "exact", (torch.randn(2, 3, 4, 5),))
    _assert_untouched(z.model, snap)


class Uncapturable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    @torch._dynamo.disable
    def forward(self, x):
        return self.lin(x)


def test_model_that_cannot_be_captured():
    model = Uncapturable()
    snap = _snapshot(model)
    with pytest.raises(attnopt.CaptureError, match="no graph of Uncapturable could be captured"):
        attnopt.optimize(model, "exact", (torch.randn(2, 4),))
    _assert_untouched(model, snap)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        attnopt.optimize(lambda x: x, "exact", (torch.randn(2),))


def test_inspect_needs_inputs():
    with pytest.raises(ValueError, match="needs example inputs"):
        attnopt.inspect(nn.Linear(2, 2))


def test_override_glob_matching_no_site():
    z = zoo.build("gpt2")
    with pytest.raises(ValueError, match=r"\['decoder\.\*'\] match no attention site"):
        attnopt.optimize(z.model, attnopt.Policy(overrides={"decoder.*": "keep"}), z.args, z.kwargs)


def test_report_of_a_plain_module():
    with pytest.raises(TypeError, match="returned by attnopt.optimize"):
        attnopt.report(nn.Linear(2, 2))


def test_import_is_light():
    code = (
        "import sys, attnopt, torch; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert not torch.cuda.is_initialized(), 'cuda initialized'; "
        "assert 'transformers' not in sys.modules, 'transformers imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wrong_dtype_at_call_time_is_an_input_error_not_a_backend_failure():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 48)

        def forward(self, x):
            q, k, v = self.proj(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
            return nn.functional.scaled_dot_product_attention(q, k, v)

    fast = attnopt.optimize(Attn().eval(), "exact")
    with pytest.raises(attnopt.InputError, match="do not fit Attn.*Double and Float.*dtype"):
        fast(torch.randn(2, 5, 16, dtype=torch.float64))


def test_attnopts_constant_result_marks_a_function_as_torchs_decorator_does():
    from attnopt.kernels.layout import assume_constant_result

    def ours():
        return 1

    def torchs():
        return 1

    assume_constant_result(ours)
    torch.compiler.assume_constant_result(torchs)
    assert {k: v for k, v in vars(ours).items()} == {k: v for k, v in vars(torchs).items()} != {}
