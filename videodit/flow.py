"""Rectified flow: the training objective and the samplers.

    x_t = (1 - t) * x_0 + t * noise,    velocity v = noise - x_0 = dx_t/dt,    t = 1 is pure noise.

Training draws t from a logit-normal, shifted by resolution as in SD3 (`t' = s t / (1 + (s - 1) t)` with
`s = sqrt(tokens / base_tokens)`): larger samples need more noise to destroy the same structure. Frame conditioning
trains every conditioning mode into one checkpoint: some samples keep clean latent frames (first, first k, last, or
first and last) at timestep 0, with no loss on them. Sampling integrates the velocity from t = 1 to t = 0 with Euler
or a diffusers flow-matching scheduler, with classifier-free guidance, re-imposing clean conditioning frames.
Guidance distillation (`distill_loss`) trains a denoiser that takes the guidance scale as an input, so that
sampling runs one pass a step instead of the prompt's and the negative prompt's.
"""

import math
import random

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .patchify import pack, unpack

COND_MODES = ("first", "first_k", "last", "first_last")


def time_shift(t: torch.Tensor, shift) -> torch.Tensor:
    """SD3's shift of t in [0, 1] towards noise; shift may be a tensor broadcasting against t."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """The resolution-dependent shift: 1 at `base_tokens`, growing with the square root of the token count."""
    return math.sqrt(max(num_tokens, 1) / base_tokens)


def sample_t(n: int, mean=0.0, std=1.0, shift=1.0, generator=None, device=None) -> torch.Tensor:
    """n timesteps from a shifted logit-normal: sigmoid(N(mean, std)), then `time_shift`. mean and shift: numbers or
    (n,) tensors, one per sample."""
    u = torch.randn(n, generator=generator, device=device) * std + mean
    return time_shift(torch.sigmoid(u), torch.as_tensor(shift, dtype=torch.float32, device=device))


def cond_frames(num_frames: int, mode: str | None, k: int = 1) -> torch.Tensor:
    """A (T,) bool mask of the latent frames held clean in a conditioning mode."""
    m = torch.zeros(num_frames, dtype=torch.bool)
    if mode is None or num_frames < 2:  # an image has nothing to condition on
        return m
    if mode == "first":
        m[0] = True
    elif mode == "first_k":
        m[:max(1, min(k, num_frames - 1))] = True
    elif mode == "last":
        m[-1] = True
    elif mode == "first_last":
        m[0] = m[-1] = True
    else:
        raise ValueError(f"unknown conditioning mode {mode!r}; expected one of {COND_MODES}")
    return m


def random_cond(num_frames: int, p: float, rng: random.Random, weights=None) -> torch.Tensor:
    """With probability p, a random conditioning mode's clean-frame mask; otherwise no clean frames. weights: the
    modes' relative odds, in the order of COND_MODES (None: equal)."""
    if num_frames < 2 or rng.random() >= p:
        return torch.zeros(num_frames, dtype=torch.bool)
    modes = list(COND_MODES)
    weights = None if weights is None else list(weights)
    if num_frames == 2:  # first and last would hold every frame clean: nothing left to learn from
        i = modes.index("first_last")
        del modes[i]
        if weights is not None:
            del weights[i]
    if weights is not None and not any(weights):
        return torch.zeros(num_frames, dtype=torch.bool)
    mode = rng.choice(modes) if weights is None else rng.choices(modes, weights)[0]
    return cond_frames(num_frames, mode, rng.randint(1, max(1, num_frames // 2)))


def draw_noise(shapes: list, shared: float = 0.0, generator=None, device=None) -> list:
    """Standard normal noise of each shape (C, T, H, W). shared: the share of its variance common to all T frames (the
    mixed noise of PYoCo, Ge et al. 2023): frames that start from alike noise start alike, so a clip's frames settle on
    one layout; each element's variance stays 1. 0: independent frames. generator: one for all, or a list of one
    per shape (each sample's noise then depends on its own generator alone, not on the batch). Noise is drawn on
    its generator's device and moved to `device`: a CPU generator serves a GPU pipeline, as in diffusers."""
    gens = generator if isinstance(generator, (list, tuple)) else [generator] * len(shapes)
    if len(gens) != len(shapes):
        raise ValueError(f"{len(gens)} generators for {len(shapes)} samples; give one, or one per sample")
    out = []
    for s, generator in zip(shapes, gens):
        on = device if generator is None else generator.device
        z = torch.randn(tuple(s), generator=generator, device=on)
        if shared > 0 and s[1] > 1:
            common = torch.randn((s[0], 1, *s[2:]), generator=generator, device=on)
            z = (1 - shared) ** 0.5 * z + shared ** 0.5 * common
        out.append(z.to(device))
    return out


def drop_text(prompts: list[str], p: float, rng: random.Random) -> list[str]:
    """Replace each prompt by the empty prompt with probability p (classifier-free guidance training)."""
    return ["" if rng.random() < p else s for s in prompts]


def flow_loss(model, latents: list, text, text_mask, cond: list | None = None, **noising) -> torch.Tensor:
    """The rectified-flow loss on one packed batch.

    latents: list of clean (C, T_i, H_i, W_i); cond: list of (T_i,) bool masks of clean conditioning frames (no
    noise, timestep 0, no loss). The squared error is averaged over each sample's noisy tokens, then over samples,
    so a long clip and an image weigh the same. noising: how timesteps and noise are drawn (see `noised`)."""
    packed, frame_t, token_t, x0, noise = noised(model.patch_size, latents, cond, **noising)
    v = model(packed, frame_t, text, text_mask)
    return _sample_mse(v, noise - x0, token_t, packed)


def distill_loss(model, teacher, latents: list, text, text_mask, null_text, null_mask, cond: list | None = None,
                 guidance=(1.0, 8.0), guidance_parallel: float = 1.0, **noising) -> torch.Tensor:
    """Guidance distillation (Meng et al. 2023; how FLUX.1-dev was made): `model`, which takes the guidance scale
    as an input (VideoDiT guidance_embed), learns to give in one pass the guided velocity that `teacher` gives in
    two (prompt and negative prompt, `guide`), at scales drawn uniformly from the range `guidance` (one per sample).
    Sampling then costs one denoiser pass a step instead of two. Timesteps, noise, conditioning frames and the
    averaging are those of flow_loss; null_text/null_mask: (1, L', D) / (1, L') the negative prompt."""
    packed, frame_t, token_t, x0, noise = noised(model.patch_size, latents, cond, **noising)
    B, generator = len(latents), noising.get("generator")
    lo, hi = guidance
    g = lo + (hi - lo) * torch.rand(B, generator=generator, device=x0.device)
    with torch.no_grad():
        txt, msk = _with_null(text, text_mask, null_text, null_mask)
        x = packed.tokens
        v_c, v_u = teacher(packed.twice().with_tokens(torch.cat([x, x])), frame_t + frame_t, txt, msk).float().chunk(2)
        target = guide(v_c, v_u, x.float(), token_t[:, None], g[packed.sample_idx, None], guidance_parallel,
                       packed.sample_idx, token_t > 0, B)
    v = model(packed, frame_t, text, text_mask, guidance=g)
    return _sample_mse(v, target, token_t, packed)


def velocity_error(model, latents: list, noise: list, t, text, text_mask) -> torch.Tensor:
    """(B,) each sample's mean squared velocity error at its timestep t (B,), every frame noised with the noise given
    (no conditioning frames): a held-out loss that changes between evaluations only as the model does. A
    guidance-distilled model is asked for its unguided velocity (scale 1)."""
    packed = pack(latents, model.patch_size)
    x0, eps = packed.tokens, pack(noise, model.patch_size).tokens
    token_t = t[packed.sample_idx][:, None]
    frame_t = [t[i].expand(x.shape[1]) for i, x in enumerate(latents)]
    kw = {"guidance": torch.ones_like(t)} if guidance_distilled(model) else {}
    v = model(packed.with_tokens((1 - token_t) * x0 + token_t * eps), frame_t, text, text_mask, **kw)
    return _per_sample_mse(v, eps - x0, token_t[:, 0], packed)[0]


def noised(patch_size, latents: list, cond: list | None = None, mean=0.0, std=1.0, shift: float | None = None,
           base_tokens: int = 256, generator=None, image_mean: float | None = None, shared_noise: float = 0.0):
    """A training batch's noisy input: the packed x_t, per-frame timesteps (list of (T_i,)), per-token timesteps
    (N,), and the packed clean tokens and noise. t is drawn per sample (sample_t, with the resolution shift unless
    `shift` fixes it); conditioning frames stay clean at t = 0. image_mean: the logit mean of single frames (None:
    mean). shared_noise: the share of each clip's noise common to its frames (draw_noise)."""
    device = latents[0].device
    if image_mean is not None:
        mean = torch.tensor([image_mean if x.shape[1] == 1 else mean for x in latents], device=device)
    cond = cond or [torch.zeros(x.shape[1], dtype=torch.bool) for x in latents]
    packed = pack(latents, patch_size)
    shifts = torch.tensor([shift or resolution_shift(n, base_tokens) for n in packed.seqlens])
    shifts = shifts.to(device, non_blocking=True)
    t = sample_t(len(latents), mean, std, shifts, generator, device)  # (B,)
    frames = [x.shape[1] for x in latents]  # held frames at 0, the rest at their sample's t, in one host-device copy
    owner = torch.repeat_interleave(torch.arange(len(latents)), torch.tensor(frames))
    held = torch.cat([c.cpu() for c in cond]).to(device, non_blocking=True)
    frame_t = list(torch.where(held, 0.0, t[owner.to(device, non_blocking=True)]).split(frames))
    x0 = packed.tokens
    if shared_noise > 0:
        noise = pack(draw_noise([x.shape for x in latents], shared_noise, generator, device), patch_size).tokens
    else:
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
    token_t = torch.cat(frame_t)[packed.frame_index(patch_size[0])]  # (N,)
    xt = (1 - token_t[:, None]) * x0 + token_t[:, None] * noise
    return packed.with_tokens(xt), frame_t, token_t, x0, noise


def _per_sample_mse(v, target, token_t, packed) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) the squared error of v (N, D) against target averaged over each sample's noisy tokens (token_t > 0), and
    (B,) whether the sample has any."""
    B = len(packed.grids)
    err = (v.float() - target.float()).pow(2).mean(1)  # (N,)
    keep = (token_t > 0).float()
    total = torch.zeros(B, device=v.device).index_add_(0, packed.sample_idx, err * keep)
    count = torch.zeros(B, device=v.device).index_add_(0, packed.sample_idx, keep)
    return total / count.clamp_min(1), count > 0


def _sample_mse(v, target, token_t, packed) -> torch.Tensor:
    """The squared error of v (N, D) against target, averaged over each sample's noisy tokens, then over samples."""
    err, valid = _per_sample_mse(v, target, token_t, packed)
    return (err * valid).sum() / valid.sum()  # no boolean index: a GPU would wait for it


# ---------------------------------------------------------------------------------------------------------------
# Sampling


def schedule(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 times from 1 to 0, shifted towards noise. Clamped: in float32 a shift may round t = 1 up to
    1.0000001, where UniPC's alpha = 1 - sigma is negative and its log makes every sample NaN (a black video)."""
    return time_shift(torch.linspace(1.0, 0.0, steps + 1), shift).clamp(0.0, 1.0)


def make_scheduler(name: str, ts: torch.Tensor):
    """diffusers' UniPC flow-matching scheduler stepping through the times `ts` (1 -> 0), or None for plain Euler
    (which diffusers' FlowMatchEulerDiscreteScheduler, given the same times, equals)."""
    if name == "euler":
        return None
    if name != "unipc":
        raise ValueError(f"unknown sampler {name!r}; expected 'euler' or 'unipc'")
    from diffusers import UniPCMultistepScheduler

    sch = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True,
                                  flow_shift=1.0)
    sch.set_timesteps(len(ts) - 1)
    sch.sigmas = ts.detach().float().cpu()  # our shifted schedule in place of the scheduler's own
    sch.timesteps = (sch.sigmas[:-1] * 1000).to(torch.int64)
    sch.set_begin_index(0)  # step through ts in order: never look up a timestep (SDEdit's first may repeat the next)
    return sch


@torch.no_grad()
def sample(model, shapes: list, text, text_mask, null_text=None, null_mask=None, guidance: float = 1.0,
           guidance_parallel: float = 1.0, shared_noise: float = 0.0, steps: int = 30, shift: float | None = None,
           base_tokens: int = 256, sampler: str = "euler", cond_latents: list | None = None,
           cond_masks: list | None = None, init_latents: list | None = None, strength: float = 1.0, generator=None,
           progress: bool = True, cfg_group=None, cache=None, noise: list | None = None) -> list:
    """Generate latents of the given shapes [(C, T, H, W), ...]: as one packed batch with a given `shift`; with
    `shift` None each token count samples at its own resolution shift, as one packed batch a token count.

    text/text_mask: (B, L, D) / (B, L) prompts; null_text/null_mask: the negative (or empty) prompt for guidance.
    guidance_parallel: the weight of the guidance term's part along the conditional clean estimate (1: plain
    classifier-free guidance; 0: projected guidance, see `guide`). shared_noise: as the model was trained (draw_noise).
    cond_latents/cond_masks: per sample, clean latents and a (T,) mask of frames held at them (None: nothing).
    init_latents/strength: SDEdit, start from these latents noised to t = strength instead of pure noise.
    cfg_group: a torch.distributed group of two ranks that share guidance's two passes (rank 0 of the group the
    prompts, rank 1 the negative prompt) and exchange their velocities each step; both call with the same arguments.
    Without it (or without guidance) both passes run here, as one packed batch.
    cache: a fresh videodit.dit.StepCache, to skip the denoiser's later blocks at steps where its first barely
    changes (None: every block every step). noise: the starting noise (default: drawn from `generator`)."""
    device, dtype = text.device, torch.float32
    B = len(shapes)
    if noise is None:
        noise = draw_noise(shapes, shared_noise, generator, device)
    packed = pack(noise, model.patch_size)
    if shift is None and len(set(packed.seqlens)) > 1:  # a video's schedule must not depend on the rest of its batch
        out = [None] * B
        for n in dict.fromkeys(packed.seqlens):
            idx = [i for i, m in enumerate(packed.seqlens) if m == n]
            pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
            rows = lambda x: x if x is None or len(x) == 1 else x[idx]  # noqa: E731
            if cache is not None:
                cache.restart()
            group = sample(model, pick(shapes), text[idx], text_mask[idx], rows(null_text), rows(null_mask), guidance,
                           guidance_parallel, shared_noise, steps, resolution_shift(n, base_tokens), base_tokens,
                           sampler, pick(cond_latents), pick(cond_masks), pick(init_latents), strength, None,
                           progress, cfg_group, cache, pick(noise))
            for i, z in zip(idx, group):
                out[i] = z
        return out
    pt = model.patch_size[0]
    fidx = packed.frame_index(pt)
    if shift is None:
        shift = resolution_shift(packed.seqlens[0], base_tokens)
    ts = schedule(steps, shift).to(device)
    if init_latents is not None:  # SDEdit: start at t = strength, then the schedule's times below it
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1] (near 0 keeps the video, 1 ignores it), got {strength}")
        rest = ts[1:]
        ts = torch.cat([ts[:1] if strength == 1 else ts.new_tensor([float(strength)]), rest[rest < strength]])
        x0 = pack([z.to(device, dtype) for z in init_latents], model.patch_size).tokens
        x = (1 - ts[0]) * x0 + ts[0] * packed.tokens
    else:
        x = packed.tokens
    # clean conditioning frames: a (T_i,) mask per sample, the clean tokens, and a per-token "is clean" mask
    masks = [torch.zeros(s[1], dtype=torch.bool, device=device) for s in shapes]
    x_cond = torch.zeros_like(x)
    if cond_latents is not None:
        masks = [m.to(device) if m is not None else z for m, z in zip(cond_masks, masks)]
        lat = [c.to(device, dtype) if c is not None else torch.zeros(tuple(s), device=device)
               for c, s in zip(cond_latents, shapes)]
        x_cond = pack(lat, model.patch_size).tokens
    clean = torch.cat(masks)[fidx]
    x = torch.where(clean[:, None], x_cond, x)

    distilled = guidance_distilled(model)
    if distilled and cfg_group is not None:
        raise ValueError("this model has guidance distilled into it: one pass a step, nothing for a cfg group to "
                         "share; sample without cfg_group (--cfg-parallel)")
    use_cfg = guidance != 1.0 and null_text is not None and not distilled
    split = use_cfg and cfg_group is not None
    if split:  # this rank's pass: the prompts or the negative prompt
        txt, msk = (text, text_mask) if dist.get_rank(cfg_group) == 0 else \
            (null_text.expand(B, -1, -1), null_mask.expand(B, -1))
    elif use_cfg:  # conditional and unconditional in one packed batch of 2B samples
        both = packed.twice()
        txt, msk = _with_null(text, text_mask, null_text, null_mask)
    sch = make_scheduler(sampler, ts)
    kw = {} if cache is None else dict(cache=cache)  # any velocity model works without a cache
    if distilled:  # the guided velocity in one pass
        kw["guidance"] = torch.full((B,), float(guidance), device=device)
    for i in tqdm(range(len(ts) - 1), desc="sampling", disable=not progress, leave=False):
        t, t_next = ts[i], ts[i + 1]
        frame_t = [torch.where(m, 0.0, t) for m in masks]
        if split:
            v = model(packed.with_tokens(x), frame_t, txt, msk, **kw).float().contiguous()
            v_c, v_u = torch.empty_like(v), torch.empty_like(v)
            dist.all_gather([v_c, v_u], v, group=cfg_group)
            v = guide(v_c, v_u, x, t, guidance, guidance_parallel, packed.sample_idx, ~clean, B)
        elif use_cfg:
            v = model(both.with_tokens(torch.cat([x, x])), frame_t + frame_t, txt, msk, **kw)
            v_c, v_u = v.float().chunk(2)
            v = guide(v_c, v_u, x, t, guidance, guidance_parallel, packed.sample_idx, ~clean, B)
        else:
            v = model(packed.with_tokens(x), frame_t, text, text_mask, **kw)
        v = v.float()
        if sch is None:
            x = x + (t_next - t) * v
        else:
            x = sch.step(v, sch.timesteps[i], x, return_dict=False)[0]
        x = torch.where(clean[:, None], x_cond, x)
    return unpack(x, packed, model.patch_size)


def guide(v_c, v_u, x, t, guidance: float, parallel: float, sample_idx, noisy, num_samples: int) -> torch.Tensor:
    """Classifier-free guidance of packed velocities (N, D), v_c + (g - 1)(v_c - v_u), with the guidance term's part
    parallel to the conditional clean estimate x0 = x - t v_c weighted by `parallel` (APG, Sadat et al. 2024, without
    its momentum and norm threshold). That part mostly scales the sample up and, at strong guidance, washes small
    objects out of the frame; the orthogonal part carries what the prompt changes. The projection is per sample,
    over its noisy tokens (`noisy`, (N,) bool) only; `sample_idx` (N,) names each token's sample of `num_samples`.
    t and guidance: numbers, or (N, 1) one per token (guidance distillation draws a scale per sample)."""
    dv = v_c - v_u
    if parallel != 1.0:
        x0 = x - t * v_c
        keep = noisy.float()
        dot = x0.new_zeros(num_samples).index_add_(0, sample_idx, (dv * x0).sum(1) * keep)
        norm = x0.new_zeros(num_samples).index_add_(0, sample_idx, (x0 * x0).sum(1) * keep)
        dv = dv - (1 - parallel) * (dot / norm.clamp_min(1e-12))[sample_idx, None] * x0
    return v_c + (guidance - 1) * dv


def guidance_distilled(model) -> bool:
    """Whether a denoiser takes the guidance scale as an input (distill_loss) rather than a negative prompt's pass."""
    return bool(getattr(model, "config", {}).get("guidance_embed", False))


def _with_null(text, text_mask, null_text, null_mask):
    """(B, L, D) prompts and (1 or B, L', D) negative prompts -> (2B, max(L, L'), D) text and its (2B, ...) mask."""
    B, L = text.shape[0], max(text.shape[1], null_text.shape[1])
    txt = torch.cat([_pad_to(text, L), _pad_to(null_text.expand(B, -1, -1), L)])
    return txt, torch.cat([_pad_to(text_mask, L), _pad_to(null_mask.expand(B, -1), L)])


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], dim=1)
