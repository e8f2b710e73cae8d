import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

from videodit.vae import CausalVideoVAE, PretrainedVideoVAE, compute_latent_stats, load_vae, valid_size
from videodit.vae_loss import VAELoss, foreground_weight, ms_ssim_loss

# fs = 4 (two spatial downsamplings, both also temporal) and fs = 8 (the first one spatial only)
TINY4 = dict(block_out_channels=(8, 16, 16), layers_per_block=1, latent_channels=4, spatial_factor=4,
             temporal_factor=4, mid_attention=True)
TINY8 = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, spatial_factor=8,
             temporal_factor=4, mid_attention=True)
SHORTCUT = dict(TINY8, shortcut=True)


def make_vae(cfg=TINY4, seed=0):
    torch.manual_seed(seed)
    return CausalVideoVAE(**cfg).eval()


def video(T, H, W, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, T, H, W, generator=g) * 2 - 1


def shapes_clips(B, T, H, W, g):
    """Flat background, two flat squares moving in straight lines."""
    x = (torch.rand(B, 3, 1, 1, 1, generator=g) * 2 - 1).expand(B, 3, T, H, W).clone()
    for b in range(B):
        for _ in range(2):
            color = torch.rand(3, 1, 1, generator=g) * 2 - 1
            s = int(torch.randint(H // 6, H // 3, (1,), generator=g))
            y0, x0 = torch.randint(0, H - s, (2,), generator=g).tolist()
            vy, vx = torch.randint(-2, 3, (2,), generator=g).tolist()
            for t in range(T):
                y, xx = (y0 + vy * t) % (H - s), (x0 + vx * t) % (W - s)
                x[b, :, t, y:y + s, xx:xx + s] = color
    return x


def test_default_is_the_standard_model():
    with torch.device("meta"):
        vae = CausalVideoVAE()
    assert (vae.ft, vae.fs, vae.latent_channels) == (4, 8, 16)


@pytest.mark.parametrize("cfg", [TINY4, TINY8])
@pytest.mark.parametrize("T", [1, 5, 17])
def test_shapes(cfg, T):
    vae = make_vae(cfg)
    H, W = 16, 3 * 8  # non-square
    x = video(T, H, W, B=2)
    with torch.no_grad():
        z = vae.encode_latents(x)
        assert z.shape == (2, 4, 1 + (T - 1) // 4, H // vae.fs, W // vae.fs)
        assert vae.decode_latents(z).shape == x.shape


@pytest.mark.parametrize("cfg", [TINY4, TINY8, SHORTCUT])
def test_streaming_equals_single_pass(cfg):
    vae = make_vae(cfg)
    x = video(13, 16, 24)
    with torch.no_grad():
        streamed = vae.encode(x).latent_dist
        single = vae.encode(x, stream=False).latent_dist
        assert (streamed.mean - single.mean).abs().max() <= 1e-5
        assert (streamed.logvar - single.logvar).abs().max() <= 1e-5
        z = streamed.mean
        assert (vae.decode(z).sample - vae.decode(z, stream=False).sample).abs().max() <= 1e-5


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("cfg", [TINY8, SHORTCUT])
def test_causality(stream, cfg):
    vae = make_vae(cfg)
    ft, j = 4, 6  # frame 6 belongs to latent frame 2 (frames 5..8)
    x = video(13, 16, 16)
    x2 = x.clone()
    x2[:, :, j] = -x2[:, :, j]
    with torch.no_grad():
        z, z2 = (vae.encode(v, stream=stream).latent_dist.mean for v in (x, x2))
        chunk = 1 + (j - 1) // ft
        assert torch.equal(z[:, :, :chunk], z2[:, :, :chunk])
        assert not torch.allclose(z[:, :, chunk], z2[:, :, chunk])
        # decoder: changing latent frame 2 leaves frames 0..4 untouched
        z3 = z.clone()
        z3[:, :, chunk] += 1
        y, y3 = (vae.decode(v, stream=stream).sample for v in (z, z3))
        first = 1 + ft * (chunk - 1)
        assert torch.equal(y[:, :, :first], y3[:, :, :first])
        assert not torch.allclose(y[:, :, first], y3[:, :, first])


@pytest.mark.parametrize("stream", [True, False])
def test_shortcut_alone_keeps_block_colours(stream):
    """With both networks' output layers zeroed only the shortcuts remain: the encoder gives each latent pixel the
    mean colour of its block (fs x fs pixels; the first frame, then groups of ft), the decoder holds those colours
    over the block's frames and interpolates them bilinearly over its pixels."""
    vae = make_vae(dict(SHORTCUT, latent_channels=6))
    with torch.no_grad():
        for conv in (vae.encoder.conv_out.conv, vae.decoder.conv_out.conv):
            conv.weight.zero_()
        vae.encoder.conv_out.conv.bias[:6].zero_()  # the means; the log-variance biases stay
        vae.decoder.conv_out.conv.bias.zero_()
    blocks = video(1 + 2, 2, 3)  # (1, 3, 3 latent frames, 2 x 3 latent pixels)
    held = torch.cat([blocks[:, :, :1], blocks[:, :, 1:].repeat_interleave(4, 2)], 2)  # (1, 3, 9, 2, 3)
    x = held.repeat_interleave(8, 3).repeat_interleave(8, 4)  # (1, 3, 9, 16, 24): constant over each block
    smooth = torch.nn.functional.interpolate(held[0].transpose(0, 1), scale_factor=8, mode="bilinear")
    with torch.no_grad():
        z = vae.encode(x, stream=stream).latent_dist.mean
        assert torch.allclose(z[:, :3], blocks, atol=1e-6) and torch.equal(z[:, 3:], torch.zeros_like(z[:, 3:]))
        assert torch.allclose(vae.decode(z, stream=stream).sample[0], smooth.transpose(0, 1), atol=1e-6)


@pytest.mark.parametrize("cfg", [TINY4, SHORTCUT])
def test_a_fresh_vae_starts_near_deterministic(cfg):
    """A fresh VAE's posterior std starts near e^-3 (log-variance near -6), with its means left alone: a unit
    variance start would bury the means under noise that a small KL weight is slow to shrink."""
    vae = make_vae(cfg)
    with torch.no_grad():
        posterior = vae.encode(video(5, 16, 16)).latent_dist
    assert -7 < posterior.logvar.mean() < -5
    assert posterior.mean.abs().mean() < 1


def test_image_is_first_frame_of_video():
    vae = make_vae(TINY8)
    x = video(9, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vae.encode(x[:, :, :1]).latent_dist.mean, vae.encode(x).latent_dist.mean[:, :, :1],
                              atol=1e-6)


def test_save_load_round_trip(tmp_path):
    vae = make_vae(TINY4)
    x = video(5, 16, 16, B=2)
    compute_latent_stats(vae, [x])
    vae.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = CausalVideoVAE.from_pretrained(tmp_path).eval()
    assert loaded.config.latents_mean == vae.config.latents_mean
    with torch.no_grad():
        z = vae.encode_latents(x)
        assert torch.equal(z, loaded.encode_latents(x))
        assert torch.equal(vae.decode_latents(z), loaded.decode_latents(z))
    assert torch.equal(load_vae("causal", str(tmp_path)).encode_latents(x), z)


def test_latent_stats_normalize():
    vae = make_vae(TINY4)
    g = torch.Generator().manual_seed(0)
    batches = [shapes_clips(2, 5, 16, 16, g) for _ in range(3)]
    mean, std = compute_latent_stats(vae, batches)
    assert len(mean) == len(std) == 4
    with torch.no_grad():
        z = torch.cat([vae.encode_latents(x) for x in batches]).transpose(0, 1).flatten(1)
        assert torch.allclose(z.mean(1), torch.zeros(4), atol=1e-4)
        assert torch.allclose(z.std(1, unbiased=False), torch.ones(4), atol=1e-3)
        # decode_latents undoes the normalization
        assert torch.allclose(vae.decode_latents(vae.encode_latents(batches[0])),
                              vae.decode(vae.encode(batches[0]).latent_dist.mode()).sample, atol=1e-5)


def test_latent_stats_leave_out_the_channels_the_decoder_ignores():
    """A fresh shortcut VAE's decoder reads only the three colour channels (its network's output layer starts at
    zero): the stats give the other channels std 0, encode_latents leaves them out, decoding is unchanged."""
    vae = make_vae(dict(SHORTCUT, latent_channels=6))
    x = shapes_clips(2, 9, 16, 16, torch.Generator().manual_seed(0))
    mean, std = compute_latent_stats(vae, [x])
    assert min(std[:3]) > 0 and std[3:] == [0.0, 0.0, 0.0]
    assert (vae.used_channels, vae.denoiser_channels, vae.latent_channels) == ([0, 1, 2], 3, 6)
    with torch.no_grad():
        z = vae.encode_latents(x)
        assert z.shape[1] == 3 and z.abs().max() > 0.5
        assert torch.allclose(vae.decode_latents(z), vae.decode(vae.encode(x).latent_dist.mode()).sample, atol=1e-5)
        with pytest.raises(ValueError, match=r"\(B, 3, T, h, w\)"):
            vae.decode_latents(torch.zeros(1, 6, *z.shape[2:]))
    flat = torch.full_like(x[:1], 0.5)  # a clip of one colour last: its colour channels hardly vary within it
    assert min(compute_latent_stats(vae, [x, flat])[1][:3]) > 0  # judged at the data's mean, not the clip's own
    grey, bright = torch.zeros_like(x[:1]), torch.full_like(x[:1], 0.8)  # a last clip at colour 0: a channel
    assert min(compute_latent_stats(vae, [bright, grey])[1][:3]) > 0  # put to 0 there decodes the same
    plain = make_vae(TINY8)
    assert min(compute_latent_stats(plain, [x])[1]) > 0  # a decoder that reads every channel keeps all
    assert plain.denoiser_channels == plain.latent_channels == 4


def test_tiling_close_to_untiled():
    vae = make_vae(dict(TINY4, mid_attention=False))
    x = shapes_clips(1, 5, 96, 64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
        vae.enable_tiling(tile_sample_size=64, tile_overlap=32)
        zt = vae.encode(x).latent_dist.mean
        yt = vae.decode(z).sample
    assert zt.shape == z.shape and yt.shape == y.shape
    assert (zt - z).abs().mean() < 0.1 * z.abs().mean()
    assert (yt - y).abs().mean() < 0.05 * y.abs().mean()
    # a frame that fits in one tile is untouched
    with torch.no_grad():
        small = x[..., :64, :64]
        tiled = vae.encode(small).latent_dist.mean
        vae.disable_tiling()
        assert torch.equal(tiled, vae.encode(small).latent_dist.mean)


def test_tiling_refuses_a_tile_or_overlap_off_the_latent_grid():
    vae = make_vae(TINY4)  # fs = 4
    for size, overlap in ((64, 30), (62, 32), (64, 64), (64, -4)):
        with pytest.raises(ValueError, match="multiples of fs=4"):
            vae.enable_tiling(size, overlap)
    assert not vae.use_tiling
    vae.enable_tiling(64, 0)
    assert vae.use_tiling and (vae.config.tile_sample_size, vae.config.tile_overlap) == (64, 0)


def test_tiles_overlap_by_at_least_the_overlap_and_cover_the_frame():
    """Every pair of neighbouring tiles shares at least `overlap` pixels (where the blend hides the seam), and the
    tiles reach both edges."""
    from videodit.vae import _tile_starts

    for size, tile, overlap in [(160, 64, 32), (200, 64, 16), (65, 64, 32), (64, 64, 32), (300, 96, 40)]:
        starts = _tile_starts(size, tile, tile - overlap)
        assert starts[0] == 0 and starts[-1] + tile == max(size, tile)
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:])), (size, starts)


def test_bad_sizes_name_the_nearest_valid():
    vae = make_vae(TINY8)
    assert valid_size(6, 30, 33, ft=4, fs=8) == (5, 32, 32)
    assert vae.valid_size(16, 20, 64) == (17, 24, 64)  # ties round up
    with pytest.raises(ValueError, match="nearest valid size is 5 frames of 16x16"):
        vae.encode(video(6, 16, 16))
    with pytest.raises(ValueError, match="nearest valid size is 17 frames of 24x40"):
        vae.encode(video(17, 20, 38))
    with pytest.raises(ValueError, match="block_out_channels"):
        CausalVideoVAE(block_out_channels=(8, 8), spatial_factor=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_vae_runs_on_cpu(dtype):
    """The shortcut's pooling has no CPU kernel in bf16/fp16; the VAE still encodes and decodes there, close to the
    float32 result, and takes float32 pixels (cast to its dtype)."""
    vae = make_vae(SHORTCUT)
    x = video(5, 16, 16)
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode()
        y = vae.decode(z).sample
        vae.to(dtype)
        zh = vae.encode(x).latent_dist.mode()
        yh = vae.decode(zh).sample
    assert zh.dtype == yh.dtype == dtype
    assert torch.allclose(zh.float(), z, atol=0.03) and torch.allclose(yh.float(), y, atol=0.03)


def test_encode_and_decode_refuse_bad_layouts_dtypes_and_empty_inputs():
    vae = make_vae(TINY4)
    x = video(5, 16, 16)
    with torch.no_grad():
        for bad, words in ((x.transpose(1, 2), r"\(B, 3, T, H, W\), channels second, got .*\(1, 5, 3, 16, 16\)"),
                           (x[:, :1], r"\(B, 3, T, H, W\)"),
                           (((x + 1) * 127.5).byte(), r"float pixels in \[-1, 1\], got torch.uint8"),
                           (x[:0], r"empty pixels of shape \(0, 3, 5, 16, 16\)"),
                           (x[:, :, :0], r"empty pixels of shape \(1, 3, 0, 16, 16\)")):
            with pytest.raises(ValueError, match=words):
                vae.encode(bad)
        z = vae.encode(x).latent_dist.mode()
        assert torch.equal(vae.encode(x.double()).latent_dist.mode(), z)  # float64 is cast to the VAE's float32
        assert torch.equal(vae.decode(z.double()).sample, vae.decode(z).sample)
        for bad, words in ((z[:, :, :0], r"empty latents of shape \(1, 4, 0, 4, 4\)"),
                           (z[:0], r"empty latents of shape \(0, 4, 2, 4, 4\)"),
                           (z[:, :2], r"\(B, 4, T, h, w\)"),
                           (z.long(), "float latents")):
            with pytest.raises(ValueError, match=words):
                vae.decode(bad)


def tiny_pretrained(kind):
    if kind == "wan":
        cfg = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                   latents_std=[2.0, 1.0, 0.5, 1.5])
    else:
        cfg = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=4)
    torch.manual_seed(0)
    return load_vae(kind, cfg).eval()


@pytest.mark.parametrize("kind", ["wan", "cogvideox", "hunyuan"])
def test_pretrained_adapters_keep_the_interface(kind):
    vae = tiny_pretrained(kind)
    assert isinstance(vae, PretrainedVideoVAE)
    assert (vae.ft, vae.fs, vae.latent_channels) == (4, 8, 4)
    for T in (1, 5, 9):
        x = video(T, 16, 24)
        with torch.no_grad():
            z = vae.encode_latents(x)
            assert z.shape == (1, 4, 1 + (T - 1) // 4, 2, 3)
            assert vae.decode_latents(z).shape == x.shape
    with pytest.raises(ValueError, match="nearest valid size"):
        vae.encode_latents(video(4, 16, 24))


def test_a_wan_2_2_style_vae_encodes_rgb():
    """Wan 2.2's VAE patchifies pixels 2x2 before its convolutions (its config's in_channels 12 counts them):
    RGB clips go in, and the latents equal diffusers' own."""
    torch.manual_seed(0)
    vae = load_vae("wan", dict(base_dim=16, decoder_base_dim=24, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12,
                               out_channels=12, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)).eval()
    assert (vae.ft, vae.fs) == (2, 8)
    x = video(5, 16, 24)
    with torch.no_grad():
        z = vae.encode_latents(x)
        assert z.shape == (1, 4, 3, 2, 3) and torch.allclose(z, vae.model.encode(x).latent_dist.mode(), atol=1e-6)
        assert vae.decode_latents(z).shape == x.shape


def test_pretrained_normalization_uses_model_config():
    vae = tiny_pretrained("wan")
    x = video(5, 16, 16)
    cfg = vae.model.config
    with torch.no_grad():
        raw = vae.model.encode(x).latent_dist.mode()
        expected = (raw - torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)) / torch.tensor(
            cfg.latents_std).view(1, -1, 1, 1, 1)
        assert torch.allclose(vae.encode_latents(x), expected, atol=1e-6)
    cog = tiny_pretrained("cogvideox")
    with torch.no_grad():
        raw = cog.model.encode(x).latent_dist.mode()
        assert torch.allclose(cog.encode_latents(x), raw * cog.model.config.scaling_factor, atol=1e-6)


def test_cogvideox_shift_and_scale_invert_and_its_leading_extra_frames_are_dropped():
    """A CogVideoX VAE with a shift_factor normalizes as (z - shift) * scale, and decode_latents inverts it; decoding
    k latent frames it gives ft frames each, of which the leading ones are extra: the adapter keeps the last
    1 + ft*(k-1)."""
    torch.manual_seed(0)
    cog = load_vae("cogvideox", dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                     norm_num_groups=4, shift_factor=0.5, scaling_factor=2.0)).eval()
    x = video(13, 16, 16)  # 4 latent frames: an even number
    with torch.no_grad():
        raw = cog.model.encode(x).latent_dist.mode()
        z = cog.encode_latents(x)
        torch.testing.assert_close(z, (raw - 0.5) * 2.0)
        whole = cog.model.decode(raw).sample
        out = cog.decode_latents(z)
    assert whole.shape[2] > out.shape[2] == 1 + 4 * (raw.shape[2] - 1)
    torch.testing.assert_close(out, whole[:, :, -out.shape[2]:], atol=1e-5, rtol=1e-4)


def test_load_vae_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'causal'"):
        load_vae("sdxl")
    with pytest.raises(ValueError, match="latents_mean has 16 values for its 4 latent channels"):
        load_vae("wan", dict(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True]))


def test_load_vae_takes_a_dict_and_names_the_presets(tmp_path, monkeypatch):
    assert load_vae("causal", TINY4).latent_channels == 4
    with pytest.raises(ValueError, match="not a preset nor a folder.*'standard', 'tiny'"):
        load_vae("causal", "small")
    # a hub id (no folder of that name here) still reaches from_pretrained, for ours and the pretrained kinds
    tiny, seen = tiny_pretrained("wan").model, []
    monkeypatch.setattr(AutoencoderKLWan, "from_pretrained",
                        classmethod(lambda cls, path, **kw: seen.append((path, kw)) or tiny))
    monkeypatch.setattr(CausalVideoVAE, "from_pretrained", classmethod(lambda cls, path, **kw: seen.append(path)))
    assert load_vae("wan", "org/model", subfolder="vae").model is tiny
    load_vae("causal", "org/our-vae")
    assert seen == [("org/model", {"subfolder": "vae", "local_files_only": True}), "org/our-vae"]


def test_foreground_weight_marks_objects():
    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 4:8, 4:8] = 1.0
    w = foreground_weight(x, weight=9.0)
    assert w[0, 0, 0, 5, 5] == 10.0 and w[0, 0, 0, 0, 0] == 1.0 and w[0, 0, 0, 12, 12] == 1.0
    # per frame and pixel, the farthest channel: an object in one channel of the second frame only
    x = -torch.ones(1, 3, 2, 16, 16)
    x[:, 1, 1, 4:8, 4:8] = 1.0
    w = foreground_weight(x, weight=9.0)
    assert w.shape == (1, 1, 2, 16, 16) and w[0, 0, 1, 5, 5] == 10.0 and w[0, 0, 0, 5, 5] == 1.0
    # an object touching the border is a minority of the border: the background stays the border's usual colour
    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., :6, :6] = 1.0
    w = foreground_weight(x, weight=9.0)
    assert w[0, 0, 0, 2, 2] == 10.0 and w[0, 0, 0, 12, 12] == 1.0 and w[0, 0, 0, 0, 15] == 1.0


def test_kl_term_is_the_gaussian_kl_to_the_standard_normal_per_element():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from videodit.vae_loss import kl_loss

    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 5, 5, generator=g), torch.randn(2, 4, 3, 5, 5, generator=g)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], 1))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                             torch.distributions.Normal(0.0, 1.0)).mean()
    torch.testing.assert_close(kl_loss(posterior), want)
    zero = DiagonalGaussianDistribution(torch.zeros(1, 8, 1, 2, 2))  # the prior itself: no divergence
    assert kl_loss(zero).abs() < 1e-7


def test_reconstruction_is_a_weighted_mean_of_the_error():
    """Foreground weighting moves the weight among pixels, not the loss's scale: the same error everywhere costs that
    error, with or without it (so the perceptual and KL weights mean the same either way)."""
    x = -torch.ones(1, 3, 1, 16, 16)
    x[..., 4:8, 4:8] = 1.0  # an object: weight 1 + 4 on its pixels
    for weight in (0.0, 4.0):
        loss = VAELoss(foreground_weight=weight, perceptual_weight=0.0)
        torch.testing.assert_close(loss.reconstruction(x, x + 0.25), torch.tensor(0.25))
    err = torch.zeros_like(x)
    err[..., 4:8, 4:8] = 0.5  # the error on the object alone counts 5 times a background pixel's
    got = VAELoss(foreground_weight=4.0).reconstruction(x, x + err)
    torch.testing.assert_close(got, torch.tensor(0.5 * 5 * 16 / (5 * 16 + 240)))


def test_hinge_loss_is_zero_for_a_discriminator_that_separates_by_the_margin():
    class Sign(torch.nn.Module):  # logits 2 on real (+1) pixels, -2 on fake (-1) ones
        def forward(self, v):
            return 2 * v[:, :1]

    loss_fn = VAELoss(gan_weight=0.5, gan_start=0)
    loss_fn.discriminator = Sign()
    real, fake = torch.ones(1, 3, 1, 4, 4), -torch.ones(1, 3, 1, 4, 4)
    assert loss_fn.disc_loss(real, fake, step=0)[0] == 0
    assert loss_fn.disc_loss(fake, real, step=0)[0] == 6  # fooled both ways: 1 + 2 on each side


def test_adaptive_gan_weight_balances_the_gradients_at_the_last_layer():
    """With last_layer, the GAN term's gradient there is gan_weight times the reconstruction terms' (as VQGAN)."""
    torch.manual_seed(0)
    vae = CausalVideoVAE(**TINY4)
    loss_fn = VAELoss(gan_weight=0.5, gan_start=0)
    x = shapes_clips(1, 5, 16, 16, torch.Generator().manual_seed(0))
    recon, posterior = vae(x)
    last = vae.decoder.conv_out.conv.weight
    _, logs = loss_fn(x, recon, posterior, step=0, last_layer=last)
    g_gan = torch.autograd.grad(logs["gan_weight"] * -loss_fn.discriminator(recon).mean(), last, retain_graph=True)[0]
    rec = loss_fn.reconstruction(x, recon) + loss_fn.perceptual_weight * ms_ssim_loss(x, recon)
    g_rec = torch.autograd.grad(rec, last)[0]
    torch.testing.assert_close(g_gan.norm(), 0.5 * g_rec.norm(), rtol=1e-3, atol=1e-6)


def test_ssim_is_the_gaussian_ssim_written_out_window_by_window():
    """ssim equals SSIM (Wang et al. 2004) computed window by window: Gaussian weights (sigma 1.5), weighted
    population statistics, constants for a data range of 2, averaged over the pixels where the window fits."""
    from videodit.vae_loss import ssim

    k, c1, c2 = 7, (0.01 * 2) ** 2, (0.03 * 2) ** 2
    w = np.exp(-(np.arange(k) - k // 2) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w, w) / np.outer(w, w).sum()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, 16, 18, generator=g, dtype=torch.float64) * 2 - 1
    for noise in (0.05, 0.3, 1.0):
        y = (x + noise * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
        X, Y, values = x[0, 0].numpy(), y[0, 0].numpy(), []
        for i in range(16 - k + 1):
            for j in range(18 - k + 1):
                a, b = X[i:i + k, j:j + k], Y[i:i + k, j:j + k]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb, cab = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
                values.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        assert ssim(x, y, window=k).item() == pytest.approx(np.mean(values), abs=1e-9)


def test_loss_with_discriminator_after_warmup():
    torch.manual_seed(0)
    vae = CausalVideoVAE(**TINY4)
    loss_fn = VAELoss(foreground_weight=4.0, gan_weight=0.5, gan_start=10)
    x = shapes_clips(2, 5, 16, 16, torch.Generator().manual_seed(0))
    recon, posterior = vae(x)
    last = vae.decoder.conv_out.conv.weight
    loss, logs = loss_fn(x, recon, posterior, step=0, last_layer=last)
    assert "gan" not in logs and loss_fn.disc_loss(x, recon, step=0) == (None, {})
    loss, logs = loss_fn(x, recon, posterior, step=10, last_layer=last)
    assert "gan" in logs and torch.isfinite(loss)
    loss.backward()
    d_loss, d_logs = loss_fn.disc_loss(x, recon, step=10)
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    vae = CausalVideoVAE(**dict(TINY4, block_out_channels=(16, 32, 32), mid_attention=False))
    loss_fn = VAELoss(foreground_weight=4.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    x = shapes_clips(4, 5, 16, 16, torch.Generator().manual_seed(0))
    losses = []
    for step in range(40):
        recon, posterior = vae(x)
        loss, _ = loss_fn(x, recon, posterior, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)


def test_stats_command_normalizes_the_latents(tmp_path, capsys):
    """python -m videodit.vae stats (run once as a command, then in this process: the same code, without the
    imports of a new interpreter)."""
    import subprocess
    import sys

    from videodit.data.shapes import ShapesDataset
    from videodit.vae import stats_command

    torch.manual_seed(0)
    vae = CausalVideoVAE(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, spatial_factor=4,
                         temporal_factor=4, mid_attention=False)
    vae.save_pretrained(tmp_path / "vae")
    r = subprocess.run([sys.executable, "-m", "videodit.vae", "stats", str(tmp_path / "vae"), "--shapes", "12",
                        "--num-frames", "5", "--height", "32", "--width", "32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    loaded = CausalVideoVAE.from_pretrained(tmp_path / "vae")
    assert loaded.config.latents_mean is not None
    x = torch.stack([ShapesDataset(sizes=[(5, 32, 32)], length=12, seed=12345)[i]["video"] for i in range(12)])
    with torch.no_grad():
        z = loaded.encode_latents(x)
    per_channel = z.transpose(0, 1).reshape(4, -1)
    assert per_channel.mean(1).abs().max() < 1e-3 and (per_channel.std(1) - 1).abs().max() < 1e-2
    assert "statistics of 12 clip(s) only" in r.stdout
    from videodit.data.video import write_video  # a manifest with a missing clip: counted as what was read

    write_video(str(tmp_path / "a.mp4"), x[0])
    rows = [dict(path="a.mp4", caption="a"), dict(path="gone.mp4", caption="b")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    stats_command([str(tmp_path / "vae"), "--manifest", str(tmp_path / "m.jsonl"), "--num-frames", "5", "--height",
                   "32", "--width", "32"])
    out = capsys.readouterr().out
    assert "statistics of 1 clip(s) only" in out and "gone.mp4" in out
    (tmp_path / "not_vae").mkdir()
    for args, words in (([str(tmp_path / "vae"), "--shapes", "0"], "--shapes must be a positive integer"),
                        ([str(tmp_path / "not_vae"), "--shapes", "2"], "is not a CausalVideoVAE folder")):
        with pytest.raises(SystemExit) as e:
            stats_command(args)
        assert e.value.code == 2 and words in capsys.readouterr().err.strip().splitlines()[-1]
