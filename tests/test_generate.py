"""``OptimizedModule.generate``: a Hugging Face decoder optimized by attnopt generates through the rewritten
graphs (the decode steps' graphs are captured and rewritten too), with the same tokens as the original model;
a model rewritten by attnopt.Linear generates through the recurrent states."""

import pytest
import torch
import transformers
from torch.profiler import profile

import attnopt
from attnopt import generation, zoo

PROMPT, NEW = 7, 5


def _llama() -> torch.nn.Module:
    cfg = zoo.config("llama", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _attnopt_calls(fn) -> int:
    with profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "attnopt::attention")


def test_exact_generate_keeps_the_kv_cache_and_runs_attnopt_in_every_step():
    model = _llama()
    ids = torch.randint(3, 256, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the decode steps carry a padding mask
    opt = attnopt.optimize(model, "exact", kwargs=dict(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    opt.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)  # captures the step graphs

    got = []
    calls = _attnopt_calls(lambda: got.append(opt.generate(ids, attention_mask=mask, max_new_tokens=NEW,
                                                            do_sample=False)))  # fmt: skip
    assert torch.equal(got[0], want)
    layers = model.config.num_hidden_layers
    assert calls == layers * NEW  # the prompt and every decode step, each layer once
    decode_sites = [s for s in attnopt.report(opt).sites if s.seq[0] == 1]
    assert decode_sites and all(s.decision == "exact" for s in decode_sites)  # one query token, keys from the cache


def test_linear_generate_goes_through_the_recurrent_states():
    model = _llama()
    ids = torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    opt = attnopt.optimize(model, attnopt.Linear(causal=True), kwargs=dict(input_ids=ids, use_cache=False))
    out = opt.generate(ids, max_new_tokens=NEW, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(out.sequences, attnopt.generate(opt, ids, max_new_tokens=NEW, do_sample=False))
    assert type(out[generation.cache_keyword(model)]).__name__ == "RecurrentCache"  # no KV cache was built


def test_generate_on_a_model_without_one_names_the_fix():
    vit = zoo.build("vit")
    opt = attnopt.optimize(vit.model, "exact", args=vit.args, kwargs=vit.kwargs)
    with pytest.raises(AttributeError, match="ViTModel has no generate"):
        opt.generate()
