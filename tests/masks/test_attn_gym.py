"""The mask_mods of the attention-gym collection through ``attnopt.attention``, against FlexAttention.

Forward: against ``torch.compile(flex_attention)`` on CPU, with the mask_mod itself and with its ``BlockMask``.
Backward: FlexAttention has no CPU backward ("FlexAttention does not support backward on CPU"), so gradients are
compared with eager attention under the dense mask FlexAttention's ``create_mask`` builds from the same mask_mod.
All in fp32, within 1e-5.
"""

import functools

import pytest
import torch
from attn_gym.masks import (causal_mask, generate_dilated_sliding_window, generate_doc_mask_mod,
                            generate_global_sliding_window, generate_morton_natten, generate_natten,
                            generate_packed_causal_doc_mask_mod, generate_prefix_lm_mask, generate_sliding_window,
                            generate_sta_mask_mod_2d, generate_tiled_natten, generate_vision_cross_attention_mask_mod)  # fmt: skip
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask, flex_attention

import attnopt
from attnopt.masks.general import closure_device

S, B, H, D = 64, 2, 2, 16
OFFSETS = torch.tensor([0, 10, 30, 64])
IS_GLOBAL = torch.zeros(S, dtype=torch.bool)
IS_GLOBAL[[0, 33]] = True
INTERVALS = torch.tensor([[4, 20], [20, 50], [24, 50], [50, 64]])  # Flamingo: the text span of each of 4 images

# name: (mask_mod, Sq, Sk)
MASK_MODS = {
    "causal": (causal_mask, S, S),
    "sliding_window": (generate_sliding_window(8), S, S),
    "prefix_lm": (generate_prefix_lm_mask(16), S, S),
    "document_causal": (generate_doc_mask_mod(causal_mask, OFFSETS), S, S),
    "packed_causal_document": (generate_packed_causal_doc_mask_mod(OFFSETS), S, S),
    "dilated_sliding_window": (generate_dilated_sliding_window(8, 2), S, S),
    "global_sliding_window": (generate_global_sliding_window(4, IS_GLOBAL), S, S),
    "natten": (generate_natten(8, 8, 3, 3), S, S),
    "tiled_natten": (generate_tiled_natten(8, 8, 3, 3, 4, 4), S, S),
    "morton_natten": (generate_morton_natten(8, 8, 3, 3), S, S),
    "sta_2d": (generate_sta_mask_mod_2d((8, 8), (6, 6), (2, 2)), S, S),
    "vision_cross_attention": (generate_vision_cross_attention_mask_mod(INTERVALS, 8), S, 32),
    "causal_cross": (causal_mask, S // 2, S),  # Sq != Sk: FlexAttention's causal is top-left
}
# Compiled FlexAttention on CPU fails on these ("index out of bounds" in the generated C++); the dense reference
# (FlexAttention's own create_mask) still checks them.
FLEX_FAILS = {"vision_cross_attention"}


def _qkv(sq, sk, seed=0, batch=B):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, H, sq, D, generator=g, requires_grad=True)
    k = torch.randn(batch, H, sk, D, generator=g, requires_grad=True)
    v = torch.randn(batch, H, sk, D, generator=g, requires_grad=True)
    return q, k, v


def _flex(q, k, v, block_mask):
    torch._dynamo.reset()  # each mask compiles its own kernel; the recompile limit would fall back to eager
    with torch.no_grad():
        return torch.compile(flex_attention)(q, k, v, block_mask=block_mask)


def _dense_reference(q, k, v, mask_mod, sq, sk):
    """Eager attention under the dense mask of ``mask_mod`` (FlexAttention's create_mask); rows that see no key
    give 0, as FlexAttention's do."""
    mask = create_mask(mask_mod, B, H, sq, sk, device="cpu")
    scores = (q @ k.transpose(-2, -1)) * D**-0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v


def _grads(out, q, k, v, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("name", sorted(MASK_MODS))
def test_mask_mod_matches_compiled_flex_attention(name):
    mask_mod, sq, sk = MASK_MODS[name]
    q, k, v = _qkv(sq, sk)
    block_mask = create_block_mask(mask_mod, None, None, sq, sk, device="cpu", BLOCK_SIZE=16)
    by_mask_mod = attnopt.attention(q, k, v, mask=mask_mod)
    by_block_mask = attnopt.attention(q, k, v, mask=block_mask)
    if name not in FLEX_FAILS:
        want = _flex(q.detach(), k.detach(), v.detach(), block_mask)
        torch.testing.assert_close(by_mask_mod, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(by_block_mask, want, atol=1e-5, rtol=1e-5)

    reference = _dense_reference(q, k, v, mask_mod, sq, sk)
    torch.testing.assert_close(by_mask_mod, reference, atol=1e-5, rtol=1e-5)
    expected = _grads(reference, q, k, v)
    for got in (_grads(by_mask_mod, q, k, v), _grads(by_block_mask, q, k, v)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_block_mask_full_blocks_skip_the_mask_mod_as_in_flex_attention():
    """A hand-built BlockMask: its full blocks are visible whole (FlexAttention never calls the mask_mod there),
    its partial blocks follow the mask_mod, every other block is skipped."""
    q, k, v = _qkv(S, S, batch=1)  # (compiled FlexAttention reads this one-row BlockMask out of bounds for B > 1)
    nb = S // 16
    kv_num = torch.tensor([[[1, 1, 1, 0]]], dtype=torch.int32)  # partial: block (r, r) for rows 0-2
    # row r lists block r first (its one partial block)
    kv_idx = ((torch.arange(nb)[None, :] + torch.arange(nb)[:, None]) % nb).to(torch.int32)[None, None]
    full_num = torch.tensor([[[0, 1, 1, 1]]], dtype=torch.int32)  # full: block (r, 0) for rows 1-3
    full_idx = torch.zeros(1, 1, nb, nb, dtype=torch.int32)
    block_mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=16, mask_mod=causal_mask,
                                          seq_lengths=(S, S))  # fmt: skip
    want = _flex(q.detach(), k.detach(), v.detach(), block_mask)
    got = attnopt.attention(q, k, v, mask=block_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    row = torch.arange(S)[:, None]
    col = torch.arange(S)[None, :]
    dense = ((row // 16 == col // 16) & (row >= col) & (row < 48)) | ((col < 16) & (row >= 16))
    reference = attnopt.attention(q, k, v, mask=dense)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)


def test_block_mask_of_other_lengths_is_refused():
    q, k, v = _qkv(S, S)
    block_mask = create_block_mask(causal_mask, None, None, 2 * S, 2 * S, device="cpu")
    with pytest.raises(ValueError, match=r"BlockMask.*128.*64"):
        attnopt.attention(q, k, v, mask=block_mask)


def test_mask_mods_closing_over_device_tensors_are_evaluated_on_that_device():
    """FlexAttention evaluates a mask_mod on its inputs' device; attnopt finds the device of the tensors a mask_mod
    closes over (through nested closures and partials) and evaluates it there ("meta" stands in for a GPU)."""
    doc_ids = torch.zeros(S, dtype=torch.long, device="meta")

    def same_doc(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    def by_argument(b, h, q_idx, kv_idx, ids):
        return ids[q_idx] == ids[kv_idx]

    assert closure_device(same_doc) == torch.device("meta")
    assert closure_device(generate_doc_mask_mod(same_doc, OFFSETS)) == torch.device("meta")
    assert closure_device(functools.partial(by_argument, ids=doc_ids)) == torch.device("meta")
    assert closure_device(generate_doc_mask_mod(causal_mask, OFFSETS)) is None  # CPU tensors: evaluated in place
    assert closure_device(causal_mask) is None
