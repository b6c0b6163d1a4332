"""Token grids inferred from vision models: a grid mask without ``grid`` runs on the patch embedding's output grid,
the extra leading tokens (CLS, registers) as global tokens; a mismatch is an error naming the fix."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnopt
from attnopt import masks as M
from attnopt import zoo
from attnopt.patterns import detect
from attnopt.policy import Policy
from attnopt.variants.sparse import resolve


class PatchAttention(nn.Module):
    """Conv patch embedding ([B, C, *grid] -> tokens), ``extra`` learned leading tokens, one SDPA attention.

    ``attn_mask`` (None by default) is a dense mask given to SDPA: the reference for a sparse rewrite.
    """

    def __init__(self, conv_dim: int, extra: int, dim: int = 16, heads: int = 2):
        super().__init__()
        conv = nn.Conv2d if conv_dim == 2 else nn.Conv3d
        self.patch = conv(3, dim, kernel_size=2, stride=2)
        self.extra = nn.Parameter(torch.randn(1, extra, dim))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.heads = heads
        self.attn_mask = None

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # [B, grid tokens, dim]
        t = torch.cat([self.extra.expand(t.shape[0], -1, -1), t], dim=1)  # [B, S, dim]
        b, s, d = t.shape
        q, k, v = self.qkv(t).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attn_mask)
        return o.transpose(1, 2).reshape(b, s, d)


def _matches(model, args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=backend)(*args)
    return [d.match for gm in graphs for d in detect(gm) if d.match is not None]


def test_vit_grid_and_cls_token_come_from_the_patch_embedding():
    z = zoo.build("vit")  # 32x32 images, patch 8: a 4x4 grid after one CLS token
    matches = _matches(z.model, z.args)
    assert len(matches) == 2
    for m in matches:
        mask, source = resolve(M.Neighborhood(3), m)
        assert mask == M.Neighborhood(3, grid=(4, 4), global_tokens=1)
        assert "grid 4x4 inferred from the patch embedding" in source and "1 leading extra token" in source
        assert "grid=4x4, global_tokens=1" in attnopt.Sparse(M.Neighborhood(3)).describe(m)
    opt = attnopt.optimize(z.model, Policy(default=attnopt.Sparse(M.Neighborhood(3))), z.args, z.kwargs)
    sites = attnopt.report(opt).sites
    assert [s.decision for s in sites] == ["sparse", "sparse"]
    assert all("grid 4x4 inferred from the patch embedding" in s.reason for s in sites)  # the report says where


@pytest.mark.parametrize("conv_dim, image, grid, extra", [(2, (10, 6), (5, 3), 2), (3, (6, 6, 8), (3, 3, 4), 1)])
def test_hand_written_patch_model_matches_the_dense_mask_reference(conv_dim, image, grid, extra):
    torch.manual_seed(0)
    model = PatchAttention(conv_dim, extra).eval()
    x = torch.randn(2, 3, *image)
    (m,) = _matches(model, (x,))
    want_mask = M.Neighborhood(3, grid=grid, global_tokens=extra)
    assert resolve(M.Neighborhood(3), m)[0] == want_mask
    assert resolve(M.Blocked(2) | M.Neighborhood(3), m)[0] == M.Blocked(2, grid=grid, global_tokens=extra) | want_mask
    opt = attnopt.optimize(model, Policy(default=attnopt.Sparse(M.Neighborhood(3))), (x,))
    with torch.no_grad():
        got = opt(x)
        s = extra + math.prod(grid)
        model.attn_mask = want_mask.dense(s, s)[0]  # [S, S] bool
        want = model(x)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_a_grid_that_does_not_fit_the_site_is_an_error_naming_the_fix():
    model = PatchAttention(2, extra=2).eval()
    (m,) = _matches(model, (torch.randn(1, 3, 10, 6),))
    with pytest.raises(ValueError, match=r"do not match the 5x3 token grid.*pass the token grid in the policy"):
        resolve(M.Neighborhood(3, global_tokens=1), m)  # the model has 2 extra tokens, not 1
    with pytest.raises(ValueError, match=r"does not fit the 5x3 token grid.*kernel_size x dilation = 5 x 1"):
        resolve(M.Neighborhood(5), m)
    z = zoo.build("swin")  # windowed attention: 16 tokens per window on a 16x16 patch grid
    with pytest.raises(Exception, match=r"16 tokens, which do not match the 16x16 token grid.*grid=\(H, W\)"):
        attnopt.optimize(z.model, Policy(default=attnopt.Sparse(M.Neighborhood(3))), z.args, z.kwargs)


def test_given_grids_and_sequences_without_a_patch_embedding_are_left_alone():
    model = PatchAttention(2, extra=1).eval()
    (m,) = _matches(model, (torch.randn(1, 3, 4, 4),))
    given = M.Blocked(1, grid=(2, 2), global_tokens=1)
    assert resolve(given, m) == (given, "")
    z = zoo.build("llama")
    for m in _matches(z.model, (z.kwargs["input_ids"],)):
        assert resolve(M.Neighborhood(3), m) == (M.Neighborhood(3), "")
