"""attnopt.generate: transformers' own generate on a model rewritten by attnopt.Linear, through the recurrent
states (the prompt once, then one token per step, no KV cache), checked against one chunked forward over
the generated sequence (teacher forcing); and the refusals."""

import pytest
import torch
import transformers

import attnopt
from attnopt import generation, zoo
from attnopt.kernels import session as kernel_session
from attnopt.kernels.linear import decode

from conftest import rel_err

HEADS = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}
LINEAR = attnopt.Linear(causal=True, decay="lightning", num_layers=2)
PROMPT = 9


def _lm(name: str) -> torch.nn.Module:
    """Zoo model ``name`` with its language-modeling head (special tokens inside the small vocabulary)."""
    cfg = zoo.config(name, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return getattr(transformers, HEADS[name])._from_config(cfg, attn_implementation="eager").eval()


def _prompt(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 256, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, PROMPT, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # the second prompt is left-padded to the length of the first
    return ids, mask


def _teacher_forced(opt, sequences: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, new, V] of one chunked forward over the generated sequence, at the positions that chose tokens."""
    seq = sequences[:, :-1]
    full = torch.cat([mask, mask.new_ones(seq.shape[0], seq.shape[1] - PROMPT)], dim=1)
    pos = (full.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return opt(input_ids=seq, attention_mask=full, position_ids=pos, use_cache=False).logits[:, PROMPT - 1:]


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes under the name this transformers expects
@pytest.mark.parametrize("name, sample", [("llama", False), ("gpt2", True)])
def test_generate_runs_through_the_recurrent_states_and_equals_the_chunked_path(name, sample):
    ids, mask = _prompt(padded=sample)  # sampling runs on a left-padded batch: padded keys stay out of the states
    opt = attnopt.optimize(_lm(name), LINEAR, kwargs=dict(input_ids=ids, attention_mask=mask, use_cache=False))
    sites = [s.name for s in attnopt.report(opt).sites]

    torch.manual_seed(1)
    options = dict(do_sample=True, top_k=20) if sample else {}
    out = attnopt.generate(opt, ids, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True,
                           output_logits=True, **options)  # fmt: skip
    assert out.sequences.shape == (2, PROMPT + 6)
    session = out[generation.cache_keyword(opt.module)]
    assert isinstance(session, generation.RecurrentCache) and sorted(session.states) == sorted(sites)
    assert session.length == PROMPT + 5  # the prompt once, then each token but the last fed alone
    state, norm = session.states[sites[0]]
    assert state.shape == (2, 4, 16, 16) and norm.shape == (2, 4, 16)  # O(D²) per head, whatever the length
    want = _teacher_forced(opt, out.sequences, mask)
    assert rel_err(torch.stack(out.logits, dim=1), want) < 1e-5
    if not sample:
        assert torch.equal(out.sequences[:, PROMPT:], want.argmax(-1))  # greedy: the chunked path's tokens


def test_a_softmax_site_that_would_need_a_kv_cache_is_refused_by_name():
    ids = _prompt(padded=False)[0]
    policy = attnopt.Policy(default="exact", overrides={"transformer.h.1.*": LINEAR})
    opt = attnopt.optimize(_lm("gpt2"), policy, kwargs=dict(input_ids=ids, use_cache=False))
    with pytest.raises(ValueError, match=r"need a KV cache: transformer\.h\.0\.attn \(exact.*attnopt\.Linear\(causal"):
        attnopt.generate(opt, ids, max_new_tokens=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_beams=2), "num_beams=2 is not supported: beam search reorders the cache"),
        (dict(use_cache=False), "do not pass use_cache"),
        (dict(past_key_values=decode.RecurrentSession()), "do not pass past_key_values"),
        (dict(max_new_tokens=2), "no attention site yet; optimize it with example inputs"),
    ],
)
def test_generate_options_the_states_cannot_serve_are_refused(kwargs, match):
    opt = attnopt.optimize(_lm("gpt2"), LINEAR)  # not captured yet: no example inputs
    with pytest.raises(ValueError, match=match):
        attnopt.generate(opt, _prompt(padded=False)[0], **kwargs)


def test_generate_needs_an_optimized_language_model():
    with pytest.raises(TypeError, match="takes the module attnopt.optimize returned"):
        attnopt.generate(_lm("gpt2"), _prompt(padded=False)[0])
    with pytest.raises(TypeError, match="GPT2Model has no generate"):
        attnopt.generate(attnopt.optimize(zoo.build("gpt2").model, LINEAR), _prompt(padded=False)[0])


def _site(session, q, key="site"):
    """One causal linear site of a forward call, as the rewritten graph calls it."""
    with decode.recurrent(session):
        return decode.site_attention(q, q, q, None, True, True, 0.25, 1e-6, key)


def test_sites_run_statelessly_while_attnopt_compiles_and_advance_checks_every_site_ran_once():
    q = torch.rand(1, 2, 5, 4)
    session = decode.RecurrentSession()

    def compiling_call():
        """Like a first call at a new shape: the backend validates the site with the session suspended, then the
        call runs it."""
        with kernel_session.suspended():
            assert torch.equal(decode.site_attention(q, q, q, None, True, True, 0.25, 1e-6, "site"),
                               _site(decode.RecurrentSession(), q))  # fmt: skip
        return decode.site_attention(q, q, q, None, True, True, 0.25, 1e-6, "site")

    out = session.advance(compiling_call, 5, ["site"])
    want = decode.RecurrentSession()
    assert torch.equal(out, _site(want, q)) and torch.equal(session.states["site"][0], want.states["site"][0])
    assert session.length == 5
    with pytest.raises(RuntimeError, match=r"\['other'\] did not run through the recurrent state"):
        session.advance(lambda: _site(session, q[:, :, :1]), 1, ["site", "other"])
    with pytest.raises(RuntimeError, match=r"ran \{'site': 2\} times"):
        session.advance(lambda: (_site(session, q), _site(session, q)), 5, ["site"])


def test_the_recurrent_cache_answers_what_generate_and_the_mask_builders_ask_of_a_cache():
    cache = generation.RecurrentCache(["b", "a"])
    assert isinstance(cache, transformers.cache_utils.Cache) and isinstance(cache, decode.RecurrentSession)
    assert (cache.batch_size, cache.is_initialized, cache.get_seq_length()) == (-1, False, 0)
    q = torch.rand(3, 2, 5, 4)
    cache.advance(lambda: (_site(cache, q, "a"), _site(cache, q, "b")), 5, ["a", "b"])
    assert (cache.get_seq_length(1), cache.get_query_offset(1), cache.batch_size) == (5, 5, 3) and cache.is_initialized
    assert cache.get_mask_sizes(2, 0) == (7, 0) and cache.get_mask_sizes(torch.arange(5, 7), 0) == (7, 0)  # 5.x, 4.x
    assert cache.is_linear == [True, True] and cache.is_sliding == [False, False] and cache.get_max_length() == -1
    assert not cache.is_compileable and not cache.is_croppable
    with pytest.raises(ValueError, match="the recurrent state cannot be cropped"):
        cache.crop(2)

    state = cache.states["a"][0]
    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(cache.states["a"][0], state[[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.states["a"][0], state[[0, 0]]) and cache.states["b"][1].shape == (2, 2, 4)
    cache.reset()
    assert (cache.states, cache.get_seq_length()) == ({}, 0)
