"""Policies: dict, YAML/JSON and string forms that round-trip exactly; every validation error names its key."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import attnopt
from attnopt import masks
from attnopt.policy import (ApproximateVariant, Auto, Exact, Keep, Linear, Policy, Sigmoid, Sparse, as_policy,
                            parse_variant, variant_from_dict, variant_to_dict)  # fmt: skip


def _constructible(make):
    try:
        return [make()]
    except NotImplementedError:
        return []


# The approximate variants join once their issues make them constructible.
APPROXIMATE = [v for text in ("sparse", "sliding_window:64", "sliding_window:8,8", "linear:relu", "sigmoid")
               for v in _constructible(lambda: parse_variant(text))]  # fmt: skip
simple = st.sampled_from([Exact(), Keep(), *APPROXIMATE])
candidates = st.lists(st.sampled_from([Exact(), *APPROXIMATE]), max_size=2)
auto = st.builds(Auto, allow_linear=st.booleans(), candidates=candidates)
variants = st.one_of(simple, auto)
globs = st.text(alphabet="abh.*?[]0123456789_", min_size=1, max_size=12)
numbers = st.one_of(st.just(0.0), st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False))


@st.composite
def policies(draw):
    default = draw(variants)
    overrides = draw(st.dictionaries(globs, variants, max_size=4))
    needs_budget = isinstance(default, Auto) or any(isinstance(v, Auto) for v in overrides.values())
    max_error = draw(numbers if needs_budget else st.one_of(st.none(), numbers))
    seq_len = draw(st.one_of(st.none(), st.integers(min_value=1, max_value=2**40)))
    return Policy(default, overrides, max_error=max_error, seq_len=seq_len)


@settings(max_examples=150, deadline=None)
@given(policies())
def test_dict_json_and_yaml_round_trip_exactly(policy):
    assert Policy.from_dict(policy.to_dict()) == policy
    assert Policy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert Policy.from_yaml(policy.to_yaml()) == policy


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_and_load_by_extension(tmp_path, suffix):
    policy = Policy.auto(1e-3, seq_len=32768, allow_linear=True, overrides={"layers.0.*": "keep", "h.?.attn": Exact()})
    path = tmp_path / f"policy{suffix}"
    policy.save(path)
    assert Policy.load(path) == policy and Policy.load(str(path)) == policy
    assert Policy.from_string(str(path)) == policy and as_policy(str(path)) == policy
    if suffix == ".json":
        assert json.loads(path.read_text())["default"] == {"variant": "auto", "allow_linear": True, "candidates": []}


def test_dict_form():
    policy = Policy(Keep(), {"h.0.*": "exact"}, max_error=0, seq_len=1024)
    assert policy.to_dict() == {"default": {"variant": "keep"}, "overrides": {"h.0.*": {"variant": "exact"}},
                                "max_error": 0.0, "seq_len": 1024}  # fmt: skip
    assert Policy.from_dict({}) == Policy()
    shorthand = {"default": "keep", "overrides": {"h.0.*": {"variant": "exact"}}}
    assert Policy.from_dict(shorthand) == Policy(Keep(), {"h.0.*": Exact()})
    assert as_policy({"default": "keep"}) == Policy(Keep()) and as_policy({"variant": "keep"}) == Policy(Keep())


def test_hand_written_yaml_reads_exponents_as_numbers():
    text = "default: auto\noverrides:\n  'h.0.*': keep\nmax_error: 1e-2\nseq_len: 4096\n"
    assert Policy.from_yaml(text) == Policy.auto(1e-2, seq_len=4096, overrides={"h.0.*": "keep"})


def test_overrides_keep_their_order():
    policy = Policy.from_yaml("overrides:\n  'h.0.*': keep\n  'h.*': exact\n")
    assert [g for g, _ in policy.overrides] == ["h.0.*", "h.*"]
    assert policy.for_site("h.0.attn") == Keep() and policy.for_site("h.1.attn") == Exact()


@pytest.mark.parametrize("text,policy", [
    ("exact", Policy()), (" Keep ", Policy(Keep())), ("auto", Policy.auto(1e-2)), ("auto:1e-3", Policy.auto(1e-3)),
    ("auto:0", Policy.auto(0)), ("AUTO: 0.05", Policy.auto(0.05)),
])  # fmt: skip
def test_string_forms(text, policy):
    assert Policy.from_string(text) == policy and as_policy(text) == policy


def test_auto_policy():
    policy = Policy.auto(max_error=1e-2, seq_len=8192)
    assert policy.is_auto and not Policy().is_auto and Policy(overrides={"h.*": "auto"}, max_error=0).is_auto
    assert policy.default == Auto() and policy.max_error == 1e-2 and policy.seq_len == 8192


def test_variant_classes_plug_into_the_string_and_dict_forms(monkeypatch):
    """A variant class's own from_string / to_dict / from_dict take over when it defines them."""
    monkeypatch.setattr(Sparse, "from_string", classmethod(lambda cls, text: ("parsed", text)), raising=False)
    assert parse_variant("sliding_window:1024") == ("parsed", "sliding_window:1024")
    assert parse_variant("sparse:blocked:64") == ("parsed", "sparse:blocked:64")

    class Window(ApproximateVariant):
        name = "sigmoid"  # stands in for a landed variant class with a mask object as its field

        def __init__(self, size):
            self.size = size

        def __eq__(self, other):
            return isinstance(other, Window) and other.size == self.size

        def to_dict(self):
            return {"mask": {"window": self.size}}

    monkeypatch.setattr(Sigmoid, "from_dict", classmethod(lambda cls, d: Window(d["mask"]["window"])), raising=False)
    assert variant_to_dict(Window(64)) == {"variant": "sigmoid", "mask": {"window": 64}}
    policy = Policy(overrides={"h.*": Window(64)})
    assert Policy.from_dict(policy.to_dict()) == policy and Policy.from_yaml(policy.to_yaml()) == policy


def test_string_forms_of_the_variant_classes():
    assert Policy.from_string("sliding_window:1024") == Policy(Sparse(masks.SlidingWindow(1023, 0)))
    assert parse_variant("sparse") == Sparse("auto") and parse_variant("linear") == Linear()
    assert parse_variant("Sigmoid") == Sigmoid() and parse_variant("linear:relu") == Linear("relu")


# Every validation error, and the key or site it must name.
@pytest.mark.parametrize("build,error,names", [
    (lambda: Policy.from_dict({"defualt": "exact"}), ValueError, "unknown key 'defualt'"),
    (lambda: Policy.from_dict(["exact"]), TypeError, "policy: expected a mapping"),
    (lambda: Policy.from_dict({"overrides": [["h.*", "keep"]]}), TypeError, "Policy.overrides: expected a mapping"),
    (lambda: Policy.from_dict({"overrides": {1: "keep"}}), TypeError, "got entry \\(1, 'keep'\\)"),
    (lambda: Policy.from_dict({"overrides": {"": "keep"}}), ValueError, "a glob is empty"),
    (lambda: Policy(overrides=(("h.*", "keep"), ("h.*", "exact"))), ValueError, "glob 'h.\\*' appears twice"),
    (lambda: Policy(overrides="h.*"), TypeError, "Policy.overrides: expected a mapping"),
    (lambda: Policy(overrides=[("h.*",)]), TypeError, "got entry \\('h.\\*',\\)"),
    (lambda: Policy(default=3), TypeError, "Policy.default: expected a variant"),
    (lambda: Policy.from_dict({"overrides": {"h.*": {"kind": "exact"}}}), ValueError,
     "Policy.overrides\\['h.\\*'\\]: missing key 'variant'"),
    (lambda: Policy.from_dict({"overrides": {"h.*": {"variant": "fastest"}}}), ValueError,
     "Policy.overrides\\['h.\\*'\\].variant: unknown variant 'fastest'"),
    (lambda: Policy.from_dict({"default": {"variant": "exact", "fast": True}}), ValueError,
     "Policy.default: unknown key 'fast' for variant 'exact'"),
    (lambda: Policy.from_dict({"default": {"variant": "auto", "allow_linear": "yes"}}), TypeError,
     "Policy.default: Auto.allow_linear must be a bool"),
    (lambda: Policy.from_dict({"default": {"variant": "auto", "candidates": ["keep"]}, "max_error": 0}), ValueError,
     "Auto.candidates\\[0\\]: 'keep' cannot be a candidate"),
    (lambda: Policy.from_dict({"default": {"variant": "auto", "candidates": "exact"}, "max_error": 0}), TypeError,
     "Auto.candidates must be a list"),
    (lambda: Policy.from_dict({"default": {"variant": "auto", "candidates": [{"variant": "nope"}]}, "max_error": 0}),
     ValueError, "Auto.candidates\\[0\\].variant: unknown variant 'nope'"),
    (lambda: Policy(default="auto"), ValueError, "Policy.max_error is required with an auto variant"),
    (lambda: Policy.from_dict({"max_error": -1}), ValueError, "Policy.max_error must be a finite number >= 0, got -1"),
    (lambda: Policy.from_dict({"max_error": "1e-2"}), ValueError, "Policy.max_error .* got '1e-2'"),
    (lambda: Policy(max_error=True), ValueError, "Policy.max_error .* got True"),
    (lambda: Policy(max_error=math.nan), ValueError, "Policy.max_error .* got nan"),
    (lambda: Policy(max_error=math.inf), ValueError, "Policy.max_error .* got inf"),
    (lambda: Policy.from_dict({"seq_len": 0}), ValueError, "Policy.seq_len must be a positive int, got 0"),
    (lambda: Policy(seq_len=1.5), ValueError, "Policy.seq_len .* got 1.5"),
    (lambda: Policy(seq_len=True), ValueError, "Policy.seq_len .* got True"),
    (lambda: Policy.from_yaml("default: [exact"), ValueError, "policy: not valid YAML"),
    (lambda: Policy.from_yaml("exact"), TypeError, "policy: expected a mapping"),
    (lambda: Policy.from_string("fastest"), ValueError, "unknown policy 'fastest'"),
    (lambda: Policy.from_string(""), ValueError, "unknown policy ''"),
    (lambda: Policy.from_string("auto:abc"), ValueError, "the budget 'abc' is not a number"),
    (lambda: Policy.from_string("auto:-1"), ValueError, "the budget '-1' must be a finite number >= 0"),
    (lambda: Policy.from_string("auto:nan"), ValueError, "the budget 'nan' must be a finite number"),
    (lambda: Policy.from_string("exact:3"), ValueError, "policy 'exact:3': 'exact' takes no argument"),
    (lambda: Policy(overrides={"h.*": "auto:1e-2"}), ValueError, "a budget belongs to the whole policy"),
    (lambda: Policy.from_string(3), TypeError, "a policy string was expected, got int"),
    (lambda: Policy().save("policy.txt"), ValueError, "unknown extension '.txt'"),
    (lambda: Policy.load("policy.toml"), ValueError, "unknown extension '.toml'"),
    (lambda: Policy.from_string("missing/policy.yaml"), FileNotFoundError, "missing/policy.yaml"),
    (lambda: Policy(overrides={"h.*": ApproximateVariant()}).to_dict(), TypeError, "has no dict form"),
    (lambda: variant_from_dict("exact", "where"), TypeError, "where: expected a variant"),
])  # fmt: skip
def test_validation_errors_name_the_offending_key(build, error, names):
    with pytest.raises(error, match=names):
        build()


class TwoSites(nn.Module):
    def forward(self, x):
        return F.scaled_dot_product_attention(x, x, x) + F.scaled_dot_product_attention(x, x, x, is_causal=True)


@pytest.mark.parametrize("entry", ["optimize", "inspect"])
def test_glob_matching_no_site_names_it_and_the_sites(entry):
    x = torch.randn(1, 2, 8, 16)
    policy = Policy(overrides={"<top>#1": "keep", "decoder.*": "keep"})
    names = r"\['decoder\.\*'\] match no attention site; sites are \['<top>#1', '<top>#2'\]"
    with pytest.raises(ValueError, match=names):
        getattr(attnopt, entry)(TwoSites(), args=(x,), policy=policy)


# ------------------------------------------------------------------ bare policy strings and their display

class _MaskedAttention(nn.Module):
    """An attention module taking an additive mask, as a Hugging Face eager attention does."""

    def forward(self, q, k, v, mask):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25 + mask, dim=-1) @ v


def _masked_args(mask_kind: str):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=g) for _ in range(3))
    hidden = torch.zeros(2, 1, 12, 12, dtype=torch.bool)
    hidden[1, ..., 9:] = True  # the second sequence is padded after 9 tokens
    if mask_kind == "causal":
        hidden |= torch.ones(12, 12, dtype=torch.bool).triu(1)
    return q, k, v, torch.zeros(hidden.shape).masked_fill(hidden, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("mask_kind, causal", [("causal", True), ("padding", False)])
def test_bare_linear_infers_causal_from_the_sites_mask(mask_kind, causal):
    args = _masked_args(mask_kind)
    opt = attnopt.optimize(_MaskedAttention(), "linear", args)
    (site,) = attnopt.report(opt).sites
    assert site.decision == "linear", site.reason
    assert ("non-causal" in site.reason) == (not causal) and "causal" in site.reason
    explicit = attnopt.optimize(_MaskedAttention(), Linear(causal=causal), args)
    torch.testing.assert_close(opt(*args), explicit(*args))


@pytest.mark.parametrize("text, decision", [("sigmoid", "sigmoid"), ("sparse", "exact-sparse")])
def test_bare_sigmoid_and_sparse_rewrite_a_masked_site(text, decision):
    opt = attnopt.optimize(_MaskedAttention(), text, _masked_args("causal"))
    (site,) = attnopt.report(opt).sites
    assert site.decision == decision, site.reason


def test_mask_causality():
    from attnopt.variants.linear import mask_causality

    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    keep = torch.tensor([True, True, True, False, False])
    assert mask_causality(tril) is True and mask_causality(tril & keep) is True
    assert mask_causality(keep.expand(5, 5)) is False and mask_causality(torch.zeros(3, 7)) is False
    assert mask_causality(tril.T) is None and mask_causality(torch.ones(1, 1, dtype=torch.bool)) is True


@pytest.mark.parametrize("text", ["sparse", "sparse:causal", "sliding_window:4", "sliding_window:3,2",
                                  "sparse:blocked:8", "linear:relu,causal=true"])
def test_display_reads_back_as_written(text):
    v = parse_variant(text)
    assert v.to_string() == text and parse_variant(v.to_string()) == v
    if text.startswith("sliding_window"):
        assert text in v.describe() and "SlidingWindow(" not in v.describe()
