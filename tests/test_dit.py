import itertools
import re

import pytest
import torch

from videodit.attention import packed_attention
from videodit.dit import PRESETS, StepCache, VideoDiT
from videodit.flops import dit_paper_gmacs, flops_per_step, flops_per_token, forward_macs, param_count
from videodit.patchify import pack
from videodit.rope import RoPE3D, apply_rope, rope_real

CFG = dict(in_channels=4, hidden_size=48, depth=2, num_heads=2, text_dim=16, freq_dim=32)


def random_model(seed=0, **kw):
    """A tiny VideoDiT with every parameter random (the fresh model is the identity with zero output)."""
    torch.manual_seed(seed)
    model = VideoDiT(**{**CFG, **kw})
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def mixed_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(4, 1, 6, 6, generator=g),  # an image
               torch.randn(4, 3, 4, 8, generator=g),  # a short wide clip
               torch.randn(4, 5, 8, 4, generator=g)]  # a longer tall clip
    text = torch.randn(3, 5, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return latents, torch.tensor([0.1, 0.5, 0.9]), text, mask


def test_fresh_model_outputs_zeros():
    model = VideoDiT(**CFG)
    latents, t, text, mask = mixed_batch()
    for out, x in zip(model.forward_latents(latents, t, text, mask), latents):
        assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))


@pytest.mark.parametrize("pooled_text,local_mlp,abs_pos", [(False, False, False), (True, False, False),
                                                            (False, True, False), (False, False, True)])
def test_packed_forward_equals_separate_forwards(pooled_text, local_mlp, abs_pos):
    model = random_model(pooled_text=pooled_text, local_mlp=local_mlp, abs_pos=abs_pos)
    latents, t, text, mask = mixed_batch()
    with torch.no_grad():
        packed = model.forward_latents(latents, t, text, mask)
        for i, x in enumerate(latents):
            alone = model.forward_latents([x], t[i:i + 1], text[i:i + 1], mask[i:i + 1])[0]
            assert (packed[i] - alone).abs().max() <= 1e-5
    assert packed[0].abs().mean() > 0.1


def reference_forward(model, latent, frame_t, text, mask):
    """One sample through the block equations of videodit/dit.py's docstring, written out densely from the model's
    weights (its RoPE rotations and norms reused): per-token timesteps from its frame's, full softmax attention."""
    import torch.nn.functional as F

    packed = pack([latent], model.patch_size)
    coords, D, H = packed.coords, model.config.hidden_size, model.config.num_heads
    N, d = len(coords), D // H
    t = frame_t[coords[:, 0]]  # each token its frame's timestep (pt = 1)
    txt = text[mask]  # (L, text_dim) the prompt's real tokens
    temb = model.t_embed(t)
    if model.text_pool is not None:
        temb = temb + model.text_pool(txt.mean(0))
    mod = model.time_proj(temb).view(N, 6, D)
    rot = model.rope(coords, torch.tensor(packed.grids[0]).expand(N, 3))
    context = model.text_embed(txt)
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)  # noqa: E731

    def attend(q, k, v):  # (N, H, d), (M, H, d), (M, H, d) -> (N, D)
        w = torch.einsum("nhd,mhd->hnm", q, k).mul(d ** -0.5).softmax(-1)
        return torch.einsum("hnm,mhd->nhd", w, v).reshape(len(q), D)

    x = model.patch_embed(packed.tokens)
    for blk in model.blocks:
        m = mod + blk.modulation
        h = ln(x) * (1 + m[:, 1]) + m[:, 0]
        q, k, v = blk.attn.qkv(h).view(N, 3, H, d).unbind(1)
        q, k = apply_rope(blk.attn.q_norm(q), rot), apply_rope(blk.attn.k_norm(k), rot)
        x = x + m[:, 2] * blk.attn.proj(attend(q, k, v))
        c = blk.cross_attn
        q = c.q_norm(c.q(blk.norm2(x)).view(N, H, d))
        k, v = c.kv(context).view(len(txt), 2, H, d).unbind(1)
        x = x + c.proj(attend(q, c.k_norm(k), v))
        h = ln(x) * (1 + m[:, 4]) + m[:, 3]
        x = x + m[:, 5] * blk.mlp.fc2(F.gelu(blk.mlp.fc1(h), approximate="tanh"))
    f = temb[:, None] + model.final.modulation
    return model.final.linear(ln(x) * (1 + f[:, 1]) + f[:, 0])


@pytest.mark.parametrize("pooled_text", [False, True])
def test_the_packed_model_computes_its_documented_blocks(pooled_text):
    """Each sample of a packed batch (per-frame timesteps, padded prompts) gets what the written-out equations give."""
    model = random_model(pooled_text=pooled_text, qk_norm=True)
    latents, _, text, mask = mixed_batch()
    frame_t = [torch.rand(x.shape[1], generator=torch.Generator().manual_seed(i)) for i, x in enumerate(latents)]
    with torch.no_grad():
        packed = pack(latents, model.patch_size)
        out = model(packed, frame_t, text, mask)
        for i, (x, tok) in enumerate(zip(latents, out.split(packed.seqlens))):
            torch.testing.assert_close(tok, reference_forward(model, x, frame_t[i], text[i], mask[i]), rtol=1e-4,
                                       atol=1e-4)


def test_abs_pos_adds_each_tokens_place_in_its_clip():
    """abs_pos adds an embedding of the token's place, as fractions of its clip's grid, to the token embedding and
    changes nothing else; a place has the same features in a clip of another size and length."""
    from videodit.dit import position_features

    with_pos = random_model(abs_pos=True)
    without = VideoDiT(**CFG)
    without.load_state_dict({k: v for k, v in with_pos.state_dict().items() if not k.startswith("pos_embed")})
    latents, t, text, mask = mixed_batch()
    with torch.no_grad():
        moved = [(a - b).abs().max() for a, b in zip(with_pos.forward_latents(latents, t, text, mask),
                                                    without.forward_latents(latents, t, text, mask))]
        with_pos.pos_embed.weight.zero_(), with_pos.pos_embed.bias.zero_()
        same = [(a - b).abs().max() for a, b in zip(with_pos.forward_latents(latents, t, text, mask),
                                                   without.forward_latents(latents, t, text, mask))]
    assert min(moved) > 1e-2 and max(same) < 1e-6
    middle = position_features(torch.tensor([[1, 1, 1], [2, 3, 4]]), torch.tensor([[3, 3, 3], [5, 7, 9]]))
    assert torch.allclose(middle[0], middle[1], atol=1e-6)
    ends = position_features(torch.tensor([[0, 0, 0], [4, 6, 8]]), torch.tensor([[5, 7, 9], [5, 7, 9]]))
    assert (ends[0] - ends[1]).abs().max() > 0.5


def test_local_mlp_mixes_a_tokens_spacetime_neighbours_only():
    """The Mix-FFN's convolution reaches exactly the 3x3x3 neighbourhood of a token within its own sample; two
    samples of the same grid side by side (run as one batch) do not leak into each other."""
    from videodit.dit import LocalMix

    torch.manual_seed(0)
    mix = LocalMix(3)
    grids = [(1, 2, 3), (4, 5, 6), (4, 5, 6)]
    n = [t * h * w for t, h, w in grids]
    x = torch.randn(sum(n), 3)
    token = n[0] + n[1] + (2 * 5 + 1) * 6 + 4  # third sample, frame 2, row 1, column 4
    y = x.clone()
    y[token] += 1.0
    with torch.no_grad():
        changed = (mix(y, grids) - mix(x, grids)).abs().amax(1) > 0
    t, h, w = torch.meshgrid(torch.arange(4), torch.arange(5), torch.arange(6), indexing="ij")
    near = ((t - 2).abs() <= 1) & ((h - 1).abs() <= 1) & ((w - 4).abs() <= 1)
    expected = torch.cat([torch.zeros(n[0] + n[1], dtype=torch.bool), near.flatten()])
    assert torch.equal(changed, expected)


def test_local_mlp_on_images_equals_the_spacetime_convolution():
    """Images (one frame) take a shortcut: the time convolution's middle tap folded into the space convolution."""
    from videodit.dit import LocalMix

    torch.manual_seed(0)
    mix = LocalMix(4)
    torch.nn.init.normal_(mix.time.weight)
    torch.nn.init.normal_(mix.time.bias)
    x = torch.randn(2 * 3 * 5, 4)
    with torch.no_grad():
        space = mix.space(x.view(2, 3, 5, 4).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(2, 1, 15, 4)
        space = space.permute(0, 3, 1, 2)  # (n, C, t=1, hw): the general path's layout
        want = (space + mix.time(space)).permute(0, 2, 3, 1).reshape(30, 4)
        torch.testing.assert_close(mix(x, [(1, 3, 5)] * 2), want)


def test_local_mlp_on_clips_is_a_space_convolution_then_a_time_one_with_a_residual():
    """Written out with the weights: s = 3x3 depthwise in each frame, then s + 3-tap depthwise in time."""
    import torch.nn.functional as F

    from videodit.dit import LocalMix

    torch.manual_seed(0)
    mix = LocalMix(4)
    torch.nn.init.normal_(mix.time.weight)
    torch.nn.init.normal_(mix.time.bias)
    (t, h, w), C = (3, 4, 5), 4
    x = torch.randn(t * h * w, C)
    with torch.no_grad():
        s = F.conv2d(x.view(t, h, w, C).permute(0, 3, 1, 2), mix.space.weight, mix.space.bias, padding=1, groups=C)
        s = s.permute(2, 3, 1, 0).reshape(h * w, C, t)  # each pixel's channels over time
        s = s + F.conv1d(s, mix.time.weight[..., 0], mix.time.bias, padding=1, groups=C)
        torch.testing.assert_close(mix(x, [(t, h, w)]), s.permute(2, 0, 1).reshape(t * h * w, C))


@pytest.mark.parametrize("local_mlp", [False, True])
def test_step_cache_runs_every_block_until_the_first_settles_and_then_reuses_the_rest(local_mlp):
    """A cache that never skips gives the uncached output; on an unchanged input a skip gives the full forward's
    output; a new input whose first-block residual moves more than the threshold runs every block again."""
    model = random_model(local_mlp=local_mlp)
    latents, t, text, mask = mixed_batch()
    packed = pack(latents)
    full = model(packed, t, text, mask)
    never = StepCache(0.0)
    torch.testing.assert_close(model(packed, t, text, mask, cache=never), full)
    assert never.skipped == 0
    cache = StepCache(0.05)
    model(packed, t, text, mask, cache=cache)
    torch.testing.assert_close(model(packed, t, text, mask, cache=cache), full)  # same input: skipped
    assert (cache.steps, cache.skipped) == (2, 1)
    other = packed.with_tokens(torch.randn_like(packed.tokens))
    torch.testing.assert_close(model(other, t, text, mask, cache=cache), model(other, t, text, mask))
    assert (cache.steps, cache.skipped) == (3, 1)


def test_pooled_text_follows_each_sample_with_per_frame_timesteps():
    """Per-frame timestep rows take their own sample's pooled prompt: swapping two prompts swaps the outputs."""
    model = random_model(pooled_text=True)
    latents, _, text, mask = mixed_batch()
    frames = [torch.rand(x.shape[1]) for x in latents]
    mask = torch.ones_like(mask)
    with torch.no_grad():
        a = model.forward_latents(latents, frames, text, mask)
        alone = model.forward_latents(latents[2:], frames[2:], text[2:], mask[2:])[0]
        changed = model.forward_latents(latents, frames, torch.cat([text[:2], text[:1]]), mask)
    assert (a[2] - alone).abs().max() <= 1e-5
    assert (a[2] - changed[2]).abs().max() > 1e-3 and torch.equal(a[0], changed[0])


@pytest.mark.parametrize("pooled_text", [False, True])
def test_text_padding_does_not_change_output(pooled_text):
    model = random_model(pooled_text=pooled_text)
    latents, t, text, mask = mixed_batch()
    garbage = 100 * torch.randn(3, 4, 16)
    text_pad = torch.cat([text, garbage], dim=1)
    mask_pad = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = model(pack(latents), t, text, mask)
        b = model(pack(latents), t, text_pad, mask_pad)
    assert (a - b).abs().max() <= 1e-5


def test_empty_prompt_is_finite_and_trains():
    model = random_model()
    latents, t, text, mask = mixed_batch()
    mask[1] = False  # the empty prompt
    out = model(pack(latents), t, text, mask)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gradient_checkpointing_gives_same_gradients():
    latents, t, text, mask = mixed_batch()
    grads = []
    for ckpt in (False, True):
        model = random_model()
        if ckpt:
            model.enable_gradient_checkpointing()
            assert model.gradient_checkpointing
        model(pack(latents), t, text, mask).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_modulation_broadcast_per_run_equals_the_gather(monkeypatch):
    """Equal-shape samples broadcast each row's modulation over its run of n tokens (an int), samples of any shape
    with a timestep each over their runs (a tuple of lengths): same outputs and gradients as gathering it per
    token, for per-sample and per-frame timesteps."""
    import videodit.dit as dit

    assert dit.equal_runs(torch.tensor([0, 0, 1, 1, 2, 2]), 3) == 2
    assert torch.is_tensor(dit.equal_runs(torch.tensor([0, 0, 1, 1, 1, 2]), 3))
    g = torch.Generator().manual_seed(0)
    equal = [torch.randn(4, 3, 4, 6, generator=g) for _ in range(2)]
    mixed = mixed_batch()[0]
    text, mask = torch.randn(3, 5, 16, generator=g), torch.ones(3, 5, dtype=torch.bool)

    def run(latents, t, mode):
        model = random_model()
        if mode != "int":
            monkeypatch.setattr(dit, "equal_runs", lambda index, rows: index)
        model.dynamic_blocks = mode == "gather"  # (offsets as tensors, modulation gathered)
        out = model(pack(latents), t, text[:len(latents)], mask[:len(latents)])
        out.square().mean().backward()
        monkeypatch.undo()
        return out, [p.grad for p in model.parameters()]

    frames = lambda latents: [torch.rand(x.shape[1], generator=g) for x in latents]  # noqa: E731
    cases = [(equal, torch.tensor([0.2, 0.7]), "int"), (equal, frames(equal), "int"),
             (mixed, torch.tensor([0.2, 0.7, 0.5]), "runs")]
    for latents, t, mode in cases:
        (out_a, grad_a), (out_b, grad_b) = run(latents, t, mode), run(latents, t, "gather")
        torch.testing.assert_close(out_a, out_b)
        for a, b in zip(grad_a, grad_b):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert dit.per_token(torch.arange(3.0), (2, 0, 1)).tolist() == [0.0, 0.0, 2.0]


def test_per_token_and_per_frame_timesteps():
    model = random_model()
    latents, _, text, mask = mixed_batch()
    p = pack(latents)
    frame0 = (p.sample_idx == 1) & (p.coords[:, 0] == 0)  # the wide clip's first latent frame
    per_frame = [torch.full((1,), 0.5), torch.tensor([0.0, 0.5, 0.5]), torch.full((5,), 0.5)]
    per_token = torch.where(frame0, 0.0, 0.5)
    with torch.no_grad():
        cond = model(p, per_frame, text, mask)
        noisy = model(p, torch.full((3,), 0.5), text, mask)
        # per frame == its per-token expansion; per sample == scalar
        torch.testing.assert_close(cond, model(p, per_token, text, mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(noisy, model(p, 0.5, text, mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(noisy, model(p, [0.5, 0.5, 0.5], text, mask), rtol=1e-5, atol=1e-5)  # numbers
    t_values, t_index = model._timestep_rows(per_frame, p)
    assert torch.equal(t_values[t_index], per_token)  # only frame 0 of sample 1 is clean
    assert (cond[frame0] - noisy[frame0]).abs().max() > 1e-3  # the clean frame's output changes
    other = p.sample_idx != 1
    # other samples do not see it (equal up to rounding: their timestep rows come by another path)
    torch.testing.assert_close(cond[other], noisy[other], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="per-frame timesteps"):
        model(p, [torch.zeros(1), torch.zeros(2), torch.zeros(5)], text, mask)


def test_rope_is_relative():
    rope = RoPE3D(head_dim=24)
    g = torch.Generator().manual_seed(0)
    coords = torch.randint(0, 20, (50, 3), generator=g)
    q, k = torch.randn(50, 2, 24, generator=g), torch.randn(50, 2, 24, generator=g)

    def scores(c):
        rot = rope(c)
        return torch.einsum("nhd,mhd->hnm", apply_rope(q, rot), apply_rope(k, rot))

    shifted = coords + torch.tensor([7, -3, 11])
    torch.testing.assert_close(scores(coords), scores(shifted), rtol=1e-4, atol=1e-4)
    for axis in range(3):  # each axis rotates pairs of its own: spreading the tokens along it changes the scores
        spread = coords.clone()
        spread[:, axis] *= 2
        assert not torch.allclose(scores(coords), scores(spread), atol=1e-2), axis


def test_rope_gives_t_the_rest_of_the_head_and_each_axis_its_own_frequency_ladder():
    """As the module documents (and the shipped checkpoint was trained with): h and w rotate 2*(head_dim//6) dims
    each, t the rest, in that order; axis a's pairs turn by position * theta^(-2i/d_a), i = 0, 1, ..."""
    head_dim, theta = 16, 100.0
    rope = RoPE3D(head_dim, theta)
    assert rope.dims == (8, 4, 4)
    first = 0
    for axis, d in enumerate((8, 4, 4)):
        coords = torch.zeros(1, 3, dtype=torch.long)
        coords[0, axis] = 1  # one step along this axis alone: each pair's angle is its frequency (<= 1 rad)
        rot = rope(coords)[0]
        angle = torch.atan2(rot[:, 1], rot[:, 0])
        want = torch.zeros(head_dim // 2)
        want[first:first + d // 2] = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        torch.testing.assert_close(angle, want.float())
        first += d // 2


def test_rope_gradient_is_the_inverse_rotation():
    rope = RoPE3D(head_dim=24)
    rot = rope(torch.randint(0, 20, (30, 3)))
    x = torch.randn(30, 2, 24, requires_grad=True)
    w = torch.randn(30, 2, 24)
    (apply_rope(x, rot) * w).sum().backward()
    inverse = rot * torch.tensor([1.0, -1.0])  # cos, -sin: the rotation by minus the angle
    torch.testing.assert_close(x.grad, apply_rope(w, inverse))


def test_rope_real_form_equals_the_complex_one():
    rot = RoPE3D(head_dim=48)(torch.randint(0, 20, (30, 3)))
    x = torch.randn(30, 4, 48)
    torch.testing.assert_close(rope_real(x, rot), apply_rope(x, rot))
    torch.testing.assert_close(rope_real(x.bfloat16(), rot), apply_rope(x.bfloat16(), rot))


def test_rope_base_grid_scales_positions_to_the_training_extent():
    rope = RoPE3D(head_dim=24, base_grid=(4, 8, 8))
    coords = torch.tensor([[2, 4, 4], [4, 8, 8]])
    a = rope(coords, torch.tensor([[4, 8, 8]]).expand(2, 3))  # the base grid: unscaled
    b = rope(coords * 2, torch.tensor([[8, 16, 16]]).expand(2, 3))  # twice the grid: halved
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, rope(coords * 2, torch.tensor([[4, 8, 8]]).expand(2, 3)))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("cu_q, cu_k", [
    ([0, 1, 17, 49, 73], None),  # self-attention
    ([0, 1, 17, 49, 73], [0, 3, 3, 10, 11]),  # text with an empty segment
    ([0, 24, 48, 72], None),  # equal segments (one batched call)
    ([0, 24, 48, 72], [0, 5, 10, 15]),
    ([0, 16, 32, 48, 56, 64, 73], None),  # runs of equal segments (one batched call each)
    ([0, 16, 32, 48, 56, 64, 73], [0, 5, 10, 10, 13, 16, 19]),
    ([0, 16, 32, 48], [0, 3, 9, 12]),  # a run whose first and last prompts are equally long, the middle one not
])
def test_attention_backends_agree(cu_q, cu_k):
    g = torch.Generator().manual_seed(0)
    cu_q = torch.tensor(cu_q, dtype=torch.int32)
    q = torch.randn(cu_q[-1], 2, 8, generator=g)
    m = cu_q[-1] if cu_k is None else cu_k[-1]
    k, v = torch.randn(m, 2, 8, generator=g), torch.randn(m, 2, 8, generator=g)
    cu_k = None if cu_k is None else torch.tensor(cu_k, dtype=torch.int32)
    ref = packed_attention(q, k, v, cu_q, cu_k, backend="loop")
    torch.testing.assert_close(packed_attention(q, k, v, cu_q, cu_k, backend="mask"), ref)
    with torch.no_grad():  # flex attention has no CPU backward
        torch.testing.assert_close(packed_attention(q, k, v, cu_q, cu_k, backend="flex"), ref)
    assert torch.isfinite(ref).all()
    if cu_k is not None:
        for i in range(len(cu_k) - 1):
            if cu_k[i] == cu_k[i + 1]:  # no keys: attend to nothing
                assert torch.equal(ref[cu_q[i]:cu_q[i + 1]], torch.zeros(cu_q[i + 1] - cu_q[i], 2, 8))


@pytest.mark.parametrize("lengths,key_lengths", [
    ([1, 16, 64, 64], None),  # short: the CPU matmul path
    ([700, 5], None),  # 700: SDPA
    ([16, 16, 16, 16], [5, 0, 9, 2]),  # keys of unequal length, one empty: padded and masked, one batched call
    ([700, 700], [3, 8]),  # the same through SDPA's mask
])
def test_loop_backend_in_bf16_matches_float32(lengths, key_lengths):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    cu_k = cu if key_lengths is None else torch.tensor([0] + list(itertools.accumulate(key_lengths)), dtype=torch.int32)
    q = torch.randn(int(cu[-1]), 2, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(int(cu_k[-1]), 2, 8, generator=g, requires_grad=True) for _ in range(2))
    ref = packed_attention(q, k, v, cu, cu_k, backend="mask")
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    half = [x.detach().bfloat16().requires_grad_() for x in (q, k, v)]
    out = packed_attention(*half, cu, cu_k, backend="loop")
    grads = torch.autograd.grad(out.float().square().sum(), half)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.03, atol=0.03)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()  # sums over hundreds of queries: bf16's error relative to the whole
        assert (got.float() - want).norm() <= 0.02 * want.norm()


def test_model_backends_agree():
    model = random_model()
    latents, t, text, mask = mixed_batch()
    with torch.no_grad():
        ref = model(pack(latents), t, text, mask)
        model.attention_backend = "mask"
        torch.testing.assert_close(model(pack(latents), t, text, mask), ref, rtol=1e-5, atol=1e-5)


def test_bf16_is_close_to_fp32():
    model = random_model()
    latents, t, text, mask = mixed_batch()
    with torch.no_grad():
        ref = model(pack(latents), t, text, mask)
        out = model.to(torch.bfloat16)(pack([x.bfloat16() for x in latents]), t, text.bfloat16(), mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).norm() / ref.norm() < 0.05


def test_save_and_load(tmp_path):
    model = random_model(rope_base_grid=(3, 4, 4))
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path)
    latents, t, text, mask = mixed_batch()
    with torch.no_grad():
        assert torch.equal(model(pack(latents), t, text, mask), loaded(pack(latents), t, text, mask))


def test_bad_shapes_have_clear_errors():
    model = random_model()
    latents, t, text, mask = mixed_batch()
    with pytest.raises(ValueError, match=r"expected text \(B=3, L, 16\)"):
        model(pack(latents), t, text[:2], mask[:2])
    with pytest.raises(ValueError, match=r"expected tokens \(N, 16\)"):
        model(pack([torch.randn(3, 1, 4, 4)]), t[:1], text[:1], mask[:1])
    with pytest.raises(ValueError, match=r"pack\(latents, model.patch_size\) = \(1, 2, 2\)"):
        model(pack(latents[:1], (1, 1, 1)), t[:1], text[:1], mask[:1])
    with pytest.raises(ValueError, match=r"patch_size must be three positive integers"):
        VideoDiT(patch_size=(2, 2))


@pytest.mark.parametrize("name, depth, width, published", [("XL/2", 28, 1152, 118.6), ("B/2", 12, 768, 23.0),
                                                           ("S/2", 12, 384, 6.06)])
def test_flop_counter_matches_dit_paper(name, depth, width, published):
    assert abs(dit_paper_gmacs(depth, width, patch=2) / published - 1) < 0.01


def test_flop_counter_packing_and_step():
    cfg = PRESETS["tiny"]
    packed = forward_macs(cfg, [64, 640], [10, 20])
    assert packed < forward_macs(cfg, [704], 30)  # no attention across samples
    assert flops_per_step(cfg, [64, 640], [10, 20]) == 6 * packed
    for seq_lens, text_lens in (([100, -3], 5), ([64], [10, 20])):
        with pytest.raises(ValueError, match="token counts must be >= 0, one text length a sample"):
            forward_macs(cfg, seq_lens, text_lens)
    with pytest.raises(ValueError, match="seq_len must be a positive number of tokens"):
        flops_per_token(cfg, 0)


@pytest.mark.parametrize("name,extra", [("tiny", {}), ("S", {}), ("tiny", {"local_mlp": True, "qk_norm": False}),
                                        ("tiny", {"abs_pos": True})])
def test_analytic_params_equal_instantiated(name, extra):
    cfg = {**PRESETS[name], **extra}
    model = VideoDiT(**cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    assert param_count(model.config) == param_count(cfg)


def test_flop_counter_counts_the_local_mlp_and_abs_pos():
    """The Mix-FFN adds its 9 + 3 depthwise taps per hidden feature and token, per block."""
    cfg = PRESETS["tiny"]
    hidden = int(cfg["hidden_size"] * 4.0)
    extra = forward_macs({**cfg, "local_mlp": True}, [576], [12]) - forward_macs(cfg, [576], [12])
    assert extra == cfg["depth"] * 576 * hidden * 12
    extra = forward_macs({**cfg, "abs_pos": True}, [576], [12]) - forward_macs(cfg, [576], [12])
    assert extra == 576 * 24 * cfg["hidden_size"]  # the position embedding: 24 features a token


def test_compile_blocks_traces_attention_only_when_static(monkeypatch):
    """compile_blocks(dynamic=False) traces a whole block, attention included, as one graph (the segment offsets
    reach it as ints); dynamic=True leaves attention out of the graphs: its calls are the only graph breaks."""
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)  # tracing is what is tested
    latents, t, text, mask = mixed_batch()
    for dynamic, local_mlp in ((False, False), (True, False), (False, True), (True, True)):
        model = random_model(local_mlp=local_mlp)
        model.compile_blocks(dynamic=dynamic)
        calls = []
        model.blocks[0].register_forward_pre_hook(lambda module, args: calls.append(args))
        with torch.no_grad():
            model(pack(latents), t, text, mask)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model.blocks[0].forward)(*calls[0])
        reasons = [r.reason for r in explained.break_reasons]
        assert (explained.graph_break_count > 0) == dynamic, reasons
        assert all("torch.compiler.disable" in r for r in reasons), reasons


def test_compiled_blocks_with_a_local_mlp_serve_batches_of_any_number_of_samples(monkeypatch):
    """compile_blocks(dynamic=True) with the Mix-FFN: a batch with another number of samples compiles nothing new
    (the grids reach the blocks as a tensor; a list's length was guarded, one recompile per count, then eager)."""
    import torch._dynamo

    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager", **kw))
    torch._dynamo.reset()
    model = random_model(local_mlp=True)
    model.compile_blocks(dynamic=True)
    g = torch.Generator().manual_seed(0)

    def step(shapes):
        latents = [torch.randn(4, *s, generator=g) for s in shapes]
        mask = torch.ones(len(shapes), 5, dtype=torch.bool)
        mask[0, 3:] = False
        model(pack(latents), torch.rand(len(shapes), generator=g), torch.randn(len(shapes), 5, 16, generator=g),
              mask).square().mean().backward()
        return torch._dynamo.utils.counters["frames"]["ok"]

    for shapes in ([(3, 4, 8), (1, 6, 6)], [(5, 8, 4), (1, 6, 6), (1, 4, 4)]):  # warm up: 2 and 3 samples
        step(shapes)
    frames = step([(3, 4, 8), (1, 6, 6), (1, 4, 4), (1, 6, 6)])
    assert step([(5, 8, 4), (1, 6, 6), (1, 4, 4), (1, 6, 6), (1, 4, 8)]) == frames  # 5 samples
    assert step([(3, 8, 8), (1, 4, 4), (1, 6, 6), (1, 4, 4), (1, 6, 6), (1, 4, 8)]) == frames  # 6
    torch._dynamo.reset()


def test_bad_timesteps_and_empty_latents_are_refused_and_a_distilled_model_runs_on_latents():
    """Timesteps outside [0, 1] or NaN (on CPU, where checking costs no device sync), a latent with a zero size, and
    forward_latents of a guidance-distilled model (it takes the scale too); its parameters are counted."""
    from videodit.flops import param_count

    model = random_model()
    z, text = [torch.randn(4, 2, 4, 4)], torch.randn(1, 3, model.config.text_dim)
    for bad, words in ((1.5, "got 1.5 to 1.5"), (float("nan"), "got NaN"), (-0.1, "got -0.1")):
        with pytest.raises(ValueError, match=f"timesteps must lie in \\[0, 1\\].*{re.escape(words)}"):
            model.forward_latents(z, torch.tensor([bad]), text)
    with pytest.raises(ValueError, match=r"every size >= 1, got shape \(4, 0, 4, 4\)"):
        model.forward_latents([torch.randn(4, 0, 4, 4)], torch.tensor([0.5]), text)
    distilled = random_model(guidance_embed=True)
    assert distilled.forward_latents(z, torch.tensor([0.5]), text, guidance=torch.tensor([3.0]))[0].shape == z[0].shape
    assert param_count(dict(distilled.config)) == sum(p.numel() for p in distilled.parameters())
