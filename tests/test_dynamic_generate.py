"""attnopt.generate / optimized.generate on a model rewritten by Sparse(Dynamic(..., decode_top_k=K)): transformers'
own generate through the sites' paged KV caches (the prompt once through the dynamic prefill, then each token alone
through Quest's page selection), checked against the original model's generate; and the refusals."""

import pytest
import torch
import transformers

import attnopt
from attnopt import generation, zoo
from attnopt import masks as M
from attnopt.policy import parse_variant

PROMPT = 90
NEW = 6


def _llama(attention: str = "eager") -> torch.nn.Module:
    cfg = zoo.config("llama", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attention).eval()


def _prompt(batch=2) -> torch.Tensor:
    return torch.randint(3, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(0))


def _optimized(decode_top_k: int, attention: str = "eager") -> attnopt.api.OptimizedModule:
    """Every prefill block kept (top_k=64 of 6), so the prompt is exact; ``decode_top_k`` pages of 8 per step."""
    policy = attnopt.Sparse(M.Dynamic("pooled", block=16, top_k=64, decode_top_k=decode_top_k, page=8))
    return attnopt.optimize(_llama(attention), policy, kwargs=dict(input_ids=_prompt(), use_cache=False))


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes under the name this transformers expects
def test_every_page_kept_generates_the_original_models_greedy_tokens():
    opt, ids = _optimized(decode_top_k=64), _prompt()
    sites = sorted(s.name for s in attnopt.report(opt).sites)
    assert len(sites) == 2 and all(s.decision == "sparse" for s in attnopt.report(opt).sites)
    out = opt.generate(ids, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = opt.module.generate(ids, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(want.logits, 1), atol=1e-4, rtol=1e-4)
    session = out[generation.cache_keyword(opt.module)]
    assert isinstance(session, generation.PagedCache) and sorted(session.caches) == sites
    assert session.length == PROMPT + NEW - 1  # the prompt once, then each token but the last fed alone
    assert all(session.selected[s] == (12, 12) for s in sites)  # 95 tokens in 12 pages of 8: all attended


def test_a_left_padded_batch_keeps_its_padded_keys_out_of_the_pages():
    # SDPA: its boolean mask is causal plus key padding even on the rows that see no key; eager's additive mask
    # is not recognized there (the dynamic prefill's limit), so its sites would be rolled back
    opt, ids = _optimized(decode_top_k=64, attention="sdpa"), _prompt()
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # the second prompt is left-padded: 37 keys, more than 4 pages of 8, are padding
    out = opt.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        want = opt.module.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True,
                                   output_logits=True)  # fmt: skip
    assert torch.equal(out.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(out.logits, 1), torch.stack(want.logits, 1), atol=1e-4, rtol=1e-4)
    cache = out[generation.cache_keyword(opt.module)].caches["model.layers.0.self_attn"]
    assert cache.valid is not None and int(cache.valid[1, :cache.length].sum()) == PROMPT + NEW - 1 - 37


def test_fewer_pages_run_through_the_selection():
    opt, ids = _optimized(decode_top_k=1), _prompt()
    out = attnopt.generate(opt, ids, max_new_tokens=NEW, return_dict_in_generate=True, output_logits=True)
    session = out[generation.cache_keyword(opt.module)]
    assert out.sequences.shape == (2, PROMPT + NEW)
    # top-1 page, the sink block's 2 pages and the last block's 2 pages, of 12
    assert all(session.selected[s] == (5, 12) for s in session.sites)
    exact = attnopt.generate(_optimized(decode_top_k=64), ids, max_new_tokens=NEW, return_dict_in_generate=True,
                             output_logits=True)  # fmt: skip
    assert torch.equal(out.logits[0], exact.logits[0])  # the first token comes from the prompt: same
    assert (out.logits[1] - exact.logits[1]).abs().max() > 1e-4  # the first decode step attended to 5 pages only


def test_decode_params_are_validated_and_read_from_policy_strings():
    with pytest.raises(ValueError, match=r"Dynamic.decode_top_k must be an int >= 0"):
        M.Dynamic(decode_top_k=-1)
    with pytest.raises(ValueError, match=r"Dynamic.page must be an int >= 1"):
        M.Dynamic(decode_top_k=4, page=0)
    with pytest.raises(ValueError, match=r"page=32 sizes the pages of the decode selection, which is off; give "
                                         "decode_top_k"):  # fmt: skip
        M.Dynamic(page=32)
    with pytest.raises(ValueError, match="decode_top_k must be an int"):
        parse_variant("dynamic:pooled,decode_top_k=many")
    mask = parse_variant("dynamic:pooled,decode_top_k=8,page=32").mask
    assert (mask.decode_top_k, mask.page) == (8, 32) and mask.decode_pages() == (8, 2, 2)
    assert attnopt.Sparse(mask).to_string() == "dynamic:pooled,decode_top_k=8,page=32"
    assert "decode top_k=8 pages of 32" in str(mask) and attnopt.Sparse(mask).generation == "paged"
    assert attnopt.Sparse(M.Dynamic()).generation == "kv-cache"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_beams=2), "num_beams=2 is not supported: beam search reorders the cache"),
        (dict(past_key_values=None), "do not pass past_key_values"),
    ],
)
def test_options_the_paged_caches_cannot_serve_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _optimized(decode_top_k=2).generate(_prompt(), max_new_tokens=2, **kwargs)


def test_a_dynamic_site_without_decode_selection_is_refused_by_name():
    opt = attnopt.optimize(_llama(), attnopt.Sparse(M.Dynamic(block=16)), kwargs=dict(input_ids=_prompt(),
                                                                                       use_cache=False))  # fmt: skip
    with pytest.raises(ValueError, match=r"must be causal linear attention or dynamic sparse attention with a decode "
                                         r"selection; these would need a KV cache: model\.layers\.0\.self_attn "
                                         r"\(sparse"):  # fmt: skip
        attnopt.generate(opt, _prompt(), max_new_tokens=2)
