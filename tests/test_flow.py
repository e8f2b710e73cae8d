import random

import pytest
import torch

from conftest import random_dit
from videodit.dit import VideoDiT
from videodit.flow import (cond_frames, distill_loss, draw_noise, drop_text, flow_loss, guide, random_cond,
                           resolution_shift, sample, sample_t, schedule, time_shift, velocity_error)
from videodit.patchify import pack
from videodit.train.models import with_guidance_embedding

MU, SD = 2.0, 0.5


class GaussianVelocity(torch.nn.Module):
    """The exact rectified-flow velocity when the data is N(MU, SD^2) per element."""
    patch_size = (1, 1, 1)

    def forward(self, packed, frame_t, text, mask):
        t, x = frame_t[0][0], packed.tokens
        x0 = MU + (1 - t) * SD ** 2 / ((1 - t) ** 2 * SD ** 2 + t ** 2) * (x - (1 - t) * MU)  # E[x_0 | x_t]
        return (x - (1 - t) * x0) / t - x0


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 200, 1.0), ("euler", 200, 3.0), ("unipc", 30, 3.0)])
def test_sampler_reproduces_a_known_gaussian(sampler, steps, shift):
    text, mask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    out = sample(GaussianVelocity(), [(1, 1, 100, 100)], text, mask, steps=steps, shift=shift, sampler=sampler,
                 generator=torch.Generator().manual_seed(0), progress=False)[0]
    assert abs(out.mean().item() - MU) < 0.02 and abs(out.std().item() - SD) / SD < 0.02


def test_a_schedule_never_starts_above_one_whatever_the_shift():
    """In float32 some resolution shifts round t = 1 up (1.0000001); UniPC then takes the log of a negative alpha and
    every sample comes out NaN (an all-black video)."""
    shifts = [resolution_shift(n, 36) for n in range(1, 2000)]
    assert all(1 - 1e-6 < schedule(20, s)[0] <= 1 and schedule(20, s).max() <= 1 for s in shifts)
    shift = next(s for s in shifts if time_shift(torch.linspace(1.0, 0.0, 4), s)[0] > 1)  # one that rounds up
    text, mask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    out = sample(GaussianVelocity(), [(1, 1, 10, 10)], text, mask, steps=3, shift=shift, sampler="unipc",
                 generator=torch.Generator().manual_seed(0), progress=False)[0]
    assert torch.isfinite(out).all()


def test_schedule_and_timesteps():
    ts = schedule(10, 3.0)
    assert ts[0] == 1 and ts[-1] == 0 and torch.all(ts[1:] < ts[:-1])
    assert torch.all(ts[1:-1] > torch.linspace(1, 0, 11)[1:-1])  # shifted towards noise
    assert resolution_shift(256) == 1.0 and resolution_shift(1024) == 2.0
    t = sample_t(20000, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02
    t3 = sample_t(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t3, time_shift(t, 3.0)) and t3.median() > 0.7


def test_conditioning_masks_and_text_dropout():
    assert cond_frames(5, "first").tolist() == [True, False, False, False, False]
    assert cond_frames(5, "first_k", 3).tolist() == [True, True, True, False, False]
    assert cond_frames(5, "last").tolist() == [False, False, False, False, True]
    assert cond_frames(5, "first_last").tolist() == [True, False, False, False, True]
    assert not cond_frames(1, "first").any()  # an image has nothing to condition on
    rng = random.Random(0)
    masks = [random_cond(5, 0.5, rng) for _ in range(400)]
    share = sum(bool(m.any()) for m in masks) / 400
    assert 0.4 < share < 0.6 and all(not m.all() for m in masks)
    firsts = [random_cond(5, 1.0, rng, weights=[1, 0, 0, 0]) for _ in range(50)]  # weighted: only "first"
    assert all(m.tolist() == cond_frames(5, "first").tolist() for m in firsts)
    modes = [tuple(random_cond(5, 1.0, rng, weights=[3, 0, 1, 0]).tolist()) for _ in range(800)]
    share_first = modes.count(tuple(cond_frames(5, "first").tolist())) / 800
    assert 0.68 < share_first < 0.82 and set(modes) == {tuple(cond_frames(5, m).tolist()) for m in ("first", "last")}
    two = [random_cond(2, 1.0, rng, weights=w) for w in (None, [0, 0, 0, 1]) for _ in range(100)]
    assert not any(m.all() for m in two)  # two latent frames both held clean would leave no loss (a NaN step)
    dropped = drop_text(["x"] * 2000, 0.1, random.Random(0))
    assert 150 < dropped.count("") < 250


def tiny_model():
    torch.manual_seed(0)
    m = VideoDiT(in_channels=4, hidden_size=32, depth=2, num_heads=2, text_dim=8)
    for p in m.parameters():  # leave the zero init so outputs depend on inputs
        p.data.normal_(0, 0.05)
    return m.eval()


class KnownError(torch.nn.Module):
    """The true velocity (noise - x0, read back from x_t and the clean latents) plus a set error per sample: each
    sample's squared error is known whatever the noise and timesteps drawn. Every frame noised (no conditioning)."""
    patch_size = (1, 2, 2)

    def __init__(self, latents, errors):
        super().__init__()
        self.x0, self.errors = pack(latents, self.patch_size).tokens, torch.tensor(errors)

    def forward(self, packed, frame_t, text, mask):
        t = torch.stack([f[0] for f in frame_t])[packed.sample_idx, None]
        return (packed.tokens - self.x0) / t + self.errors[packed.sample_idx, None]


def test_loss_ignores_clean_frames_and_averages_per_sample():
    """Clean conditioning frames carry no loss; the squared error is averaged per sample, then over samples, so a
    long clip and an image weigh the same (not one mean over all noisy tokens, where the clip's outweigh)."""
    m = tiny_model()
    x = torch.randn(4, 3, 4, 4)
    text, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    c = cond_frames(3, "first")
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    base = flow_loss(m, [x], text, mask, cond=[c], generator=g())
    y = torch.randn(4, 3, 4, 4)  # a second sample whose frames are all clean carries no loss
    all_clean = flow_loss(m, [x, y], torch.cat([text, text]), torch.cat([mask, mask]),
                          cond=[c, torch.ones(3, dtype=torch.bool)], generator=g())
    assert torch.isfinite(all_clean) and torch.isclose(all_clean, base)
    clip, image = torch.randn(4, 5, 4, 4), torch.randn(4, 1, 4, 4)  # 20 tokens and 4, squared errors 1 and 9
    loss = lambda lat, err: flow_loss(KnownError(lat, err), lat, torch.zeros(len(lat), 1, 8),  # noqa: E731
                                      torch.ones(len(lat), 1, dtype=torch.bool), generator=g()).item()
    alone = loss([clip], [1.0]), loss([image], [3.0])
    assert alone == pytest.approx((1.0, 9.0), rel=1e-4)
    both = loss([clip, image], [1.0, 3.0])
    assert both == pytest.approx(sum(alone) / 2, rel=1e-4), f"{both}: not the mean of the samples' own losses {alone}"


class TimestepRecorder(torch.nn.Module):
    """Zero velocity; keeps each sample's timestep."""
    patch_size = (1, 1, 1)

    def forward(self, packed, frame_t, text, mask):
        self.t = torch.stack([f[0] for f in frame_t])
        return torch.zeros_like(packed.tokens)


def test_images_train_at_their_own_logit_mean():
    m = TimestepRecorder()
    latents = [torch.randn(2, 1, 2, 2) if i % 2 else torch.randn(2, 3, 2, 2) for i in range(400)]  # images, clips
    text, mask = torch.zeros(400, 1, 4), torch.ones(400, 1, dtype=torch.bool)

    def run(**k):
        flow_loss(m, latents, text, mask, shift=1.0, generator=torch.Generator().manual_seed(0), **k)

    run()
    same = m.t.clone()
    run(image_mean=3.0)
    images, clips = m.t[1::2], m.t[0::2]
    assert torch.equal(clips, same[0::2])  # clips keep the shared mean (and the same draws)
    assert images.median() > 0.9 and (images > 0.7).float().mean() > 0.9  # sigmoid(3) = 0.95
    assert abs(same[1::2].median() - 0.5) < 0.1


def test_each_sample_trains_at_its_own_resolution_shift():
    """Without a fixed shift, a clip of n tokens draws its timesteps shifted by sqrt(n / base_tokens): the median t of
    a 16-token and a 1024-token clip is time_shift(0.5, 0.5) and time_shift(0.5, 4)."""
    m = TimestepRecorder()
    latents = [torch.randn(1, 1, 4, 4) if i % 2 else torch.randn(1, 4, 16, 16) for i in range(600)]
    text, mask = torch.zeros(600, 1, 4), torch.ones(600, 1, dtype=torch.bool)
    flow_loss(m, latents, text, mask, base_tokens=64, generator=torch.Generator().manual_seed(0))
    small, large = m.t[1::2].median(), m.t[0::2].median()
    half = torch.tensor(0.5)
    assert abs(small - time_shift(half, 0.5)) < 0.05 and abs(large - time_shift(half, 4.0)) < 0.05


def test_guidance_one_equals_conditional_and_seed_determinism():
    m = tiny_model()
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    shapes = [(4, 2, 4, 4), (4, 1, 4, 6)]
    run = lambda g, n=null: sample(m, shapes, text, mask, n, null_mask, guidance=g, steps=3,  # noqa: E731
                                   generator=torch.Generator().manual_seed(3), progress=False)
    a, b, c = run(1.0), run(1.0, None), run(4.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.allclose(x, y) for x, y in zip(a, c))
    assert all(torch.equal(x, y) for x, y in zip(c, run(4.0)))


class TextVelocity(torch.nn.Module):
    """Each token's velocity is the first number of its sample's text (found by cu_seqlens, checked against
    sample_idx); keeps every call's per-frame timesteps."""
    patch_size = (1, 1, 1)

    def forward(self, packed, frame_t, text, mask):
        n = packed.tokens.shape[0]
        owner = torch.searchsorted(packed.cu_seqlens[1:], torch.arange(n), right=True)
        assert torch.equal(owner, packed.sample_idx) and len(packed.cu_seqlens) == len(text) + 1 == len(frame_t) + 1
        self.frame_t = [f.clone() for f in frame_t]
        return text[packed.sample_idx, 0, :1].expand(n, packed.tokens.shape[1]).clone()


@pytest.mark.parametrize("guidance", [1.0, 3.0, 7.5])
def test_guidance_steers_towards_the_prompt_and_away_from_the_negative_one(guidance):
    """With velocity c for the prompt and u for the negative prompt, every step moves by v_c + (g - 1)(v_c - v_u):
    from t = 1 to 0 the sample ends at noise - that, each sample by its own prompts; held frames stay at t = 0."""
    m = TextVelocity()
    c = torch.tensor([1.0, -2.0])
    text = torch.zeros(2, 3, 4)
    text[:, :, 0] = c[:, None]
    mask = torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.full((1, 2, 4), 0.5), torch.ones(1, 2, dtype=torch.bool)
    shapes = [(2, 3, 2, 2), (2, 1, 2, 4)]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    noise = draw_noise(shapes, generator=gen())
    out = sample(m, shapes, text, mask, null, null_mask, guidance=guidance, steps=4, shift=1.0, generator=gen(),
                 progress=False)
    for z, n, ci in zip(out, noise, c):
        torch.testing.assert_close(z, n - (ci + (guidance - 1) * (ci - 0.5)))
    held = cond_frames(3, "first")
    sample(m, shapes, text, mask, null, null_mask, guidance=guidance, steps=2, shift=1.0, generator=gen(),
           cond_latents=[torch.zeros(shapes[0]), None], cond_masks=[held, None], progress=False)
    last = torch.tensor(0.5)  # the second of two steps starts at t = 0.5
    assert torch.equal(m.frame_t[0], torch.where(held, 0.0, last)) and torch.equal(m.frame_t[1], last.expand(1))
    if guidance != 1.0:  # the negative prompt's pass, at the same times
        assert len(m.frame_t) == 4 and all(torch.equal(a, b) for a, b in zip(m.frame_t[:2], m.frame_t[2:]))


def test_projected_guidance_drops_only_the_part_along_each_samples_clean_estimate():
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0] * 5 + [1] * 7)  # two packed samples
    v_c, v_u, x = (torch.randn(12, 6, generator=g) for _ in range(3))
    noisy = torch.ones(12, dtype=torch.bool)
    t = 0.7
    plain = guide(v_c, v_u, x, t, 4.0, 1.0, idx, noisy, 2)
    assert torch.allclose(plain, v_u + 4.0 * (v_c - v_u), atol=1e-6)
    projected = guide(v_c, v_u, x, t, 4.0, 0.0, idx, noisy, 2)
    x0 = x - t * v_c
    for i in range(2):  # what guidance adds is orthogonal to the sample's clean estimate, the rest is plain guidance
        m = idx == i
        added = projected[m] - v_c[m]
        assert abs((added * x0[m]).sum()) < 1e-4 * added.norm() * x0[m].norm()
        along = x0[m] * ((plain[m] - projected[m]) * x0[m]).sum() / (x0[m] * x0[m]).sum()
        assert torch.allclose(plain[m] - projected[m], along, atol=1e-5)
    half = guide(v_c, v_u, x, t, 4.0, 0.5, idx, noisy, 2)
    assert torch.allclose(half, (plain + projected) / 2, atol=1e-5)
    # a term all along x0 is dropped whole; one sample's tokens and the clean tokens leave the others alone
    along_only = guide(v_c, v_c - 0.3 * x0, x, t, 4.0, 0.0, idx, noisy, 2)
    assert torch.allclose(along_only, v_c, atol=1e-5)
    noisy[:2] = False
    x2 = x.clone()
    x2[:2] += 5.0
    a, b = guide(v_c, v_u, x, t, 4.0, 0.0, idx, noisy, 2), guide(v_c, v_u, x2, t, 4.0, 0.0, idx, noisy, 2)
    assert torch.allclose(a[2:], b[2:], atol=1e-5)


def test_sampler_projected_guidance_is_plain_at_weight_one():
    m = tiny_model()
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.randn(1, 2, 8), torch.ones(1, 2, dtype=torch.bool)
    run = lambda **kw: sample(m, [(4, 2, 4, 4), (4, 1, 4, 6)], text, mask, null, null_mask, guidance=4.0,  # noqa: E731
                              steps=3, generator=torch.Generator().manual_seed(3), progress=False, **kw)
    plain, one, projected = run(), run(guidance_parallel=1.0), run(guidance_parallel=0.0)
    assert all(torch.equal(x, y) for x, y in zip(plain, one))
    assert not any(torch.allclose(x, y) for x, y in zip(plain, projected))


def test_shared_noise_correlates_frames_and_keeps_unit_variance():
    shapes = [(4, 9, 32, 32), (4, 1, 32, 32)]
    plain = draw_noise(shapes, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(plain[0], torch.randn(shapes[0], generator=torch.Generator().manual_seed(0)))  # the plain draw
    for share in (0.3, 0.8):
        clip, image = draw_noise(shapes, share, torch.Generator().manual_seed(1))
        assert abs(clip.std() - 1) < 0.03 and abs(image.std() - 1) < 0.03 and abs(clip.mean()) < 0.03
        a, b = clip[:, 0].flatten(), clip[:, 5].flatten()
        corr = (a * b).mean() / (a.std() * b.std())
        assert abs(corr - share) < 0.05, (share, corr)
    a, b = plain[0][:, 0].flatten(), plain[0][:, 5].flatten()
    assert abs((a * b).mean()) < 0.05


def test_shared_noise_trains_and_samples():
    m = tiny_model()
    text, mask = torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    lat = [torch.randn(4, 3, 4, 4), torch.randn(4, 1, 4, 6)]
    a = flow_loss(m, lat, text, mask, generator=torch.Generator().manual_seed(0))
    b = flow_loss(m, lat, text, mask, generator=torch.Generator().manual_seed(0), shared_noise=0.5)
    assert torch.isfinite(b) and a != b
    run = lambda s: sample(m, [(4, 3, 4, 4)], text[:1], mask[:1], steps=2, shared_noise=s,  # noqa: E731
                           generator=torch.Generator().manual_seed(3), progress=False)[0]
    assert not torch.allclose(run(0.0), run(0.9))


def test_conditioning_frames_are_held():
    m = tiny_model()
    text, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    clean = torch.randn(4, 3, 4, 4)
    c = cond_frames(3, "first_last")
    for sampler in ("euler", "unipc"):
        out = sample(m, [(4, 3, 4, 4)], text, mask, steps=4, sampler=sampler, cond_latents=[clean], cond_masks=[c],
                     progress=False)[0]
        assert torch.equal(out[:, 0], clean[:, 0]) and torch.equal(out[:, 2], clean[:, 2])
        assert not torch.allclose(out[:, 1], clean[:, 1])


class ZeroVelocity(torch.nn.Module):
    """A velocity of 0: sampling returns the starting point unchanged."""
    patch_size = (1, 2, 2)

    def forward(self, packed, frame_t, text, mask):
        return torch.zeros_like(packed.tokens)


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_sdedit_starts_at_t_equal_to_the_strength(sampler):
    """SDEdit starts from the input noised to exactly t = strength, whatever times the schedule has (here 4 steps,
    shifted towards noise), so the change grows with the strength from nothing; strength 1 is text-to-video from the
    same noise."""
    text, mask = torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    x0 = torch.randn(4, 3, 4, 4)
    gen = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    noise = draw_noise([x0.shape], generator=gen())[0]
    run = lambda m, s: sample(m, [x0.shape], text, mask, steps=4, shift=3.0, sampler=sampler,  # noqa: E731
                              init_latents=[x0], strength=s, generator=gen(), progress=False)[0]
    for s in (0.01, 0.2, 0.6, 1.0):
        torch.testing.assert_close(run(ZeroVelocity(), s), (1 - s) * x0 + s * noise)
    m = tiny_model()
    change = [(run(m, s) - x0).abs().mean().item() for s in (0.01, 0.1, 0.3, 0.6, 1.0)]
    assert change[0] < 0.05 and all(a < b for a, b in zip(change, change[1:])), change
    plain = sample(m, [x0.shape], text, mask, steps=4, shift=3.0, sampler=sampler, generator=gen(), progress=False)[0]
    torch.testing.assert_close(run(m, 1.0), plain)
    for s in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
            run(m, s)


def test_a_guidance_student_starts_as_its_teacher_and_takes_a_scale_per_sample():
    teacher = random_dit()
    student = with_guidance_embedding(teacher)
    packed = pack([torch.randn(4, 3, 4, 4), torch.randn(4, 1, 4, 8)], (1, 2, 2))
    text, t, n0 = torch.randn(2, 3, 16), torch.tensor([0.3, 0.8]), 12
    with torch.no_grad():
        ref = teacher(packed, t, text)
        for g in (1.0, 4.0, torch.tensor([2.0, 7.0])):  # the embedding starts at zero: the teacher's velocity
            torch.testing.assert_close(student(packed, t, text, guidance=g), ref, rtol=0, atol=0)
        student.g_embed.mlp[2].weight.data.normal_(0, 0.05)
        a = student(packed, t, text, guidance=torch.tensor([2.0, 7.0]))
        b = student(packed, t, text, guidance=torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(a[:n0], b[:n0], rtol=0, atol=1e-6)  # each sample sees its own scale only
    assert not torch.allclose(a[n0:], b[n0:], atol=1e-4)
    with pytest.raises(ValueError, match="pass guidance"):
        student(packed, t, text)
    with pytest.raises(ValueError, match="guidance-distilled models"):
        teacher(packed, t, text, guidance=3.0)


class PlainGuidance(torch.nn.Module):
    """A 'student' that gives the teacher's guided velocity exactly, the plain way: the prompts' pass and the
    negative prompt's pass as two calls, each token's timestep read off its frame."""

    def __init__(self, teacher, null, null_mask, parallel, wrong_null=False):
        super().__init__()
        self.teacher, self.null, self.null_mask, self.parallel = teacher, null, null_mask, parallel
        self.patch_size, self.wrong_null = teacher.patch_size, wrong_null

    def forward(self, packed, frame_t, text, mask, guidance):
        B = len(packed.grids)
        v_c = self.teacher(packed, frame_t, text, mask)
        null, null_mask = (text, mask) if self.wrong_null else (self.null.expand(B, -1, -1),
                                                                self.null_mask.expand(B, -1))
        v_u = self.teacher(packed, frame_t, null, null_mask)
        token_t = torch.cat(frame_t)[packed.frame_index(self.patch_size[0])]
        return guide(v_c, v_u, packed.tokens, token_t[:, None], guidance[packed.sample_idx, None], self.parallel,
                     packed.sample_idx, token_t > 0, B)


@pytest.mark.parametrize("parallel", [1.0, 0.5])
def test_distill_loss_targets_the_teachers_guided_velocity(parallel):
    teacher = random_dit(patch_size=(1, 2, 2))
    latents = [torch.randn(4, 3, 4, 4), torch.randn(4, 1, 4, 8), torch.randn(4, 2, 8, 4)]
    cond = [torch.tensor([True, False, False]), torch.tensor([False]), torch.tensor([False, False])]
    text, mask = torch.randn(3, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    null, null_mask = torch.randn(1, 2, 16), torch.ones(1, 2, dtype=torch.bool)

    def loss(student, guidance):
        return distill_loss(student, teacher, latents, text, mask, null, null_mask, cond, guidance=guidance,
                            guidance_parallel=parallel, generator=torch.Generator().manual_seed(0)).item()

    with torch.no_grad():
        assert loss(PlainGuidance(teacher, null, null_mask, parallel), (1.0, 8.0)) < 1e-10
        assert loss(PlainGuidance(teacher, null, null_mask, parallel, wrong_null=True), (1.0, 8.0)) > 1e-6
        student = with_guidance_embedding(teacher)  # gives the conditional velocity: right at scale 1 only
        assert loss(student, (1.0, 1.0)) < 1e-10 and loss(student, (4.0, 4.0)) > 1e-6


def test_a_distilled_model_samples_with_one_pass_a_step():
    student = with_guidance_embedding(random_dit())
    calls = []

    class Counting(torch.nn.Module):
        patch_size, config = student.patch_size, student.config

        def forward(self, packed, frame_t, text, mask, guidance):
            calls.append((len(packed.grids), guidance.tolist()))
            return student(packed, frame_t, text, mask, guidance=guidance)

    text, mask = torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool)
    null, null_mask = torch.randn(1, 1, 16), torch.ones(1, 1, dtype=torch.bool)
    shapes = [(4, 2, 4, 4), (4, 1, 4, 8)]
    sample(Counting(), shapes, text, mask, null, null_mask, guidance=4.0, steps=3, progress=False)
    assert calls == [(2, [4.0, 4.0])] * 3
    with pytest.raises(ValueError, match="nothing for a cfg group"):
        sample(Counting(), shapes, text, mask, null, null_mask, guidance=4.0, steps=3, cfg_group=object())


class Echo(torch.nn.Module):
    """Returns its noisy input as the velocity; keeps the per-frame timesteps it was given."""
    patch_size = (1, 2, 2)

    def forward(self, packed, frame_t, text, mask):
        self.frame_t = frame_t
        return packed.tokens * 1.0


def test_velocity_error_noises_each_sample_at_its_own_timestep():
    """Per sample: mean over its tokens (and values) of (x_t - (eps - x0))^2, x_t = (1 - t) x0 + t eps over every
    frame, whatever the packing; computed here sample by sample without packing."""
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(3, 5, 4, 6, generator=g), torch.randn(3, 1, 8, 4, generator=g),
               torch.randn(3, 2, 4, 4, generator=g)]
    noise = [torch.randn(x.shape, generator=g) for x in latents]
    t = torch.tensor([0.1, 0.5, 0.9])
    model = Echo()
    got = velocity_error(model, latents, noise, t, torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool))
    want = torch.stack([((1 - ti) * x + ti * e - (e - x)).pow(2).mean() for x, e, ti in zip(latents, noise, t)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert [f.tolist() for f in model.frame_t] == [[t[0].item()] * 5, [0.5], [t[2].item()] * 2]
    alone = velocity_error(model, latents[1:2], noise[1:2], t[1:2], torch.zeros(1, 1, 4),
                           torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(alone, got[1:2])  # a sample's error does not depend on its batch


def test_velocity_error_asks_a_distilled_model_for_its_unguided_velocity():
    class Distilled(Echo):
        config = {"guidance_embed": True}

        def forward(self, packed, frame_t, text, mask, guidance=None):
            self.guidance = guidance
            return super().forward(packed, frame_t, text, mask)

    model, x = Distilled(), [torch.randn(3, 1, 4, 4), torch.randn(3, 2, 4, 4)]
    velocity_error(model, x, x, torch.tensor([0.3, 0.8]), torch.zeros(2, 1, 4), torch.ones(2, 1, dtype=torch.bool))
    assert model.guidance.tolist() == [1.0, 1.0]


def test_unipc_sdedit_at_a_strength_sharing_its_integer_timestep_with_the_next_time():
    """SDEdit's first time (the strength) and the schedule's next one may truncate to one integer timestep (0.85734
    and 0.85714: 857): the scheduler steps through the times in order, not by looking them up (diffusers' lookup
    takes the second match and runs out of times at the last step)."""
    ts = schedule(30, 3.0)
    strength = float(ts[10]) + 2e-4
    assert int(strength * 1000) == int(float(ts[10]) * 1000)
    text, mask = torch.zeros(1, 1, 4), torch.ones(1, 1, dtype=torch.bool)
    out = sample(GaussianVelocity(), [(1, 1, 10, 10)], text, mask, steps=30, shift=3.0, sampler="unipc",
                 init_latents=[torch.full((1, 1, 10, 10), MU)], strength=strength,
                 generator=torch.Generator().manual_seed(0), progress=False)[0]
    assert torch.isfinite(out).all()
