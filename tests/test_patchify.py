import pytest
import torch

from videodit.patchify import Packed, check_patchable, pack, patchify, unpack, unpatchify


@pytest.mark.parametrize("shape, patch", [
    ((4, 1, 6, 8), (1, 2, 2)),  # an image, even sizes
    ((3, 5, 7, 9), (1, 1, 1)),  # odd sizes
    ((2, 6, 10, 14), (2, 2, 2)),
    ((5, 3, 9, 15), (3, 3, 5)),  # odd patch sizes
])
def test_unpatchify_inverts_patchify(shape, patch):
    x = torch.randn(shape)
    tokens, coords = patchify(x, patch)
    grid = check_patchable(shape, patch)
    assert tokens.shape == (grid[0] * grid[1] * grid[2], shape[0] * patch[0] * patch[1] * patch[2])
    assert coords.dtype == torch.long and coords.shape == (tokens.shape[0], 3)
    assert torch.equal(unpatchify(tokens, grid, patch), x)


def test_token_carries_its_patch_at_its_coords():
    x = torch.randn(3, 4, 6, 8)
    pt, ph, pw = 2, 2, 2
    tokens, coords = patchify(x, (pt, ph, pw))
    for i in [0, 5, len(tokens) - 1]:
        t, h, w = coords[i].tolist()
        patch = x[:, t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
        assert torch.equal(tokens[i], patch.reshape(-1))


def test_pack_unpack_round_trip_mixed_shapes():
    latents = [torch.randn(4, 1, 8, 8), torch.randn(4, 3, 4, 12), torch.randn(4, 9, 12, 4)]  # image, wide, long tall
    packed = pack(latents)
    assert isinstance(packed, Packed)
    n = [1 * 4 * 4, 3 * 2 * 6, 9 * 6 * 2]
    assert packed.tokens.shape == (sum(n), 16)  # no padding
    assert packed.cu_seqlens.dtype == torch.int32 and packed.cu_seqlens.tolist() == [0, n[0], n[0] + n[1], sum(n)]
    assert packed.sample_idx.tolist() == [0] * n[0] + [1] * n[1] + [2] * n[2]
    assert packed.grids == [(1, 4, 4), (3, 2, 6), (9, 6, 2)]
    assert packed.coords[n[0]].tolist() == [0, 0, 0]  # coordinates restart in each sample
    for a, b in zip(unpack(packed.tokens, packed), latents):
        assert torch.equal(a, b)


def test_not_divisible_names_nearest_valid():
    with pytest.raises(ValueError, match=r"H=7 is not divisible by patch size 2.*nearest valid H: 6 or 8"):
        patchify(torch.randn(4, 3, 7, 8))
    with pytest.raises(ValueError, match=r"latent 1: .*W=5"):
        pack([torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 5)])
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        patchify(torch.randn(4, 8, 8))


def test_empty_latents_and_mixed_channel_counts_are_refused_by_name():
    """A zero size or latents of different channel counts fail at packing with a message saying what is wrong (not
    an empty sample in the batch, or a concatenation error far from the cause)."""
    with pytest.raises(ValueError, match=r"every size >= 1, got shape \(4, 0, 4, 4\)"):
        patchify(torch.randn(4, 0, 4, 4))
    with pytest.raises(ValueError, match=r"latent 1: .*every size >= 1"):
        pack([torch.randn(4, 1, 4, 4), torch.randn(4, 1, 0, 4)])
    with pytest.raises(ValueError, match=r"same channel count, got \[4, 8\]"):
        pack([torch.randn(4, 1, 4, 4), torch.randn(8, 1, 4, 4)])


def test_with_tokens_keeps_the_layout_and_refuses_another_token_count():
    p = pack([torch.randn(4, 1, 4, 4), torch.randn(4, 3, 2, 2)])
    v = torch.randn(p.tokens.shape[0], 7)
    q = p.with_tokens(v)
    assert q.tokens is v and q.coords is p.coords and q.grids == p.grids and torch.equal(q.cu_seqlens, p.cu_seqlens)
    with pytest.raises(ValueError, match=f"expected {p.tokens.shape[0]} tokens, got {p.tokens.shape[0] - 1}"):
        p.with_tokens(v[:-1])


def test_frame_index_names_each_tokens_first_latent_frame_with_temporal_patches():
    """With pt = 2 a token covers latent frames 2k and 2k + 1 of its sample: its index is 2k, counted after the
    frames of the samples before it."""
    p = pack([torch.randn(4, 4, 4, 4), torch.randn(4, 2, 2, 2)], (2, 2, 2))
    assert p.frame_index(2).tolist() == [0] * 4 + [2] * 4 + [4]
