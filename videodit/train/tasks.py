"""What a run trains: the denoiser on packed latents (`DiTTask`; with distill.teacher, its guidance distilled) or
the causal VAE on pixels (`VAETask`).

A task builds its model and data source from the config and gives the loop: `model` (to prepare),
`loss(model, batch, generator, step)` on one micro-batch (with a dict of logs; "flops": its training FLOPs),
`extra_state()` (more objects to checkpoint), `after_step()` (extra optimizers, e.g. the GAN discriminator),
`write_samples(model, step, folder)`, and `export(model, folder)` for the final weights.
"""

import logging
import os
import random

import torch

from ..config import ConfigError
from ..data.loader import CacheSource, Geometry, make_source, pack_by_budget
from ..data.video import VideoReadError, write_video
from ..flops import flops_per_step
from ..flow import distill_loss, draw_noise, flow_loss, sample, velocity_error
from ..text import encode_with, pad_rows
from ..vae_loss import VAELoss
from .checkpoint import sample_shift, save_model, save_pipeline
from .lora import add_lora, save_adapters
from .models import build_denoiser, build_vae, check_cache_text, check_cache_vae, load_teacher, load_trained_vae

logger = logging.getLogger(__name__)


def _last_items(source, count: int):
    """(index, sample) of the source's last `count` items as whole clips; an unreadable one is warned about and
    skipped."""
    for i in range(max(len(source) - count, 0), len(source)):
        try:
            yield i, source.load(i, False, random.Random(i))
        except VideoReadError as e:
            logger.warning(f"held-out item {i} skipped: {e}")


def _stand_in(source) -> dict:
    """A batch of the source's first readable item as an image and an empty prompt: what a rank runs, at weight 0,
    when every sample of its first batch failed to load (its passes keep the ranks' collectives in step)."""
    for i in range(len(source)):
        try:
            s = source.load(i, True, random.Random(i))
        except VideoReadError:
            continue
        one = dict(latent=[s["latent"]], text=[source.null_text()]) if "latent" in s else \
            dict(video=[s["video"]], prompt=[""])
        return dict(one, cond=[torch.zeros(1, dtype=torch.bool)])
    raise RuntimeError("no item of the data can be read; check the data source")


def _group_by_shape(tensors: list) -> dict:
    """{shape: [positions]} of a list of tensors."""
    groups = {}
    for i, x in enumerate(tensors):
        groups.setdefault(tuple(x.shape), []).append(i)
    return groups


def _reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    """A VAE's reconstruction of pixels x through the posterior's mode, in [-1, 1]."""
    return vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)


class DiTTask:
    """Rectified flow on packed latents: live (decode + VAE encode + text encode per batch) or from the cache."""

    def __init__(self, cfg, accelerator):
        self.cfg, self.device = cfg, accelerator.device
        self.vae = self.text = None
        if cfg.data.source == "cache":
            self.source = CacheSource(cfg.data.cache_dir)
            check_cache_vae(self.source.index, cfg)
            check_cache_text(self.source.index, cfg)
            ft, fs, channels, text_dim = (self.source.ft, self.source.fs, self.source.latent_channels,
                                          self.source.text_dim)
            if cfg.train.sample_every and cfg.train.sample_prompts:  # sampling decodes and encodes prompts
                self.vae, self.text = self._vae(), self._text()
        else:
            self.vae, self.text = self._vae(), self._text()
            ft, fs, channels, text_dim = self.vae.ft, self.vae.fs, self.vae.denoiser_channels, self.text.dim
        if cfg.distill.teacher and cfg.train.lora_rank:
            raise ConfigError("distill.teacher with train.lora_rank > 0: guidance distillation trains the whole "
                              "denoiser (its new guidance embedding is no adapter); set train.lora_rank=0")
        # a sharded run's main process builds the weights and hands each process its shards (sharded.shard), of the
        # denoiser and of a distillation's teacher
        meta = cfg.parallel.fsdp and not accelerator.is_main_process
        self.teacher = None
        if cfg.distill.teacher:
            self.teacher = load_teacher(cfg, channels, text_dim, meta)
            if not cfg.parallel.fsdp:
                self.teacher.to(self.device)
            self.text = self.text or self._text()  # the negative prompt of the teacher's second pass, encoded once
            self.null = self.text.encode([cfg.sample.negative_prompt])
        self.autocast = accelerator.autocast
        model = build_denoiser(cfg, channels, text_dim, self.teacher, meta)
        self.model_config = dict(model.config)
        self.geom = Geometry(ft, fs, tuple(model.patch_size))
        if cfg.data.source != "cache":
            self.source = make_source(cfg.data, self.geom)
        if cfg.train.gradient_checkpointing:
            model.set_checkpoint_policy(cfg.train.checkpoint_policy)
        if cfg.train.lora_rank and not cfg.train.init_from:
            logger.warning("train.lora_rank > 0 without train.init_from: the adapters train on a random base model")
        self.model = add_lora(model, cfg.train.lora_rank) if cfg.train.lora_rank else model
        self.last_batch = None

    def _vae(self):
        return load_trained_vae(self.cfg).to(self.device)

    def _text(self):
        from ..text import load_text_encoder

        t = self.cfg.text
        return load_text_encoder(t.encoder, t.path, t.max_length, device=self.device)

    @torch.no_grad()
    def latents(self, videos: list) -> list:
        """Pixels (3, T, H, W) of any shapes -> normalized latents (C, T', h, w), one VAE call per shape."""
        out = [None] * len(videos)
        for idx in _group_by_shape(videos).values():
            # each clip copied from the loader's pinned memory without a sync, then stacked: (B, 3, T, H, W)
            x = torch.stack([videos[i].to(self.device, non_blocking=True) for i in idx]).to(self.vae.dtype)
            for i, z in zip(idx, self.vae.encode_latents(x).float()):
                out[i] = z
        return out

    def loss(self, model, batch: dict, generator, step: int) -> tuple[torch.Tensor, dict]:
        weight = 1.0
        if batch["size"] == 0:  # every sample failed to load: run the last batch at weight 0 (ranks stay in step)
            batch, weight = self.last_batch or _stand_in(self.source), 0.0
        self.last_batch = batch
        if "latent" in batch:
            latents = [z.to(self.device, non_blocking=True) for z in batch["latent"]]  # pinned by the loader
            text, mask = (t.to(self.device) for t in pad_rows(batch["text"]))
        else:
            latents = self.latents(batch["video"])
            # the batch's prompts in one call, no cache: embeddings depend only on the batch (exact resumes)
            text, mask = encode_with(self.text.model, self.text.tokenizer, batch["prompt"], self.text.max_length)
        # equal shapes side by side: the Mix-FFN and the loop attention backend run each run of them as one batch
        order = sorted(range(len(latents)), key=lambda i: tuple(latents[i].shape))
        latents, text, mask = [latents[i] for i in order], text[order], mask[order]
        cond = [batch["cond"][i] for i in order]
        f = self.cfg.flow
        noising = dict(mean=f.logit_mean, std=f.logit_std, shift=f.shift, base_tokens=f.base_tokens,
                       generator=generator, image_mean=f.image_logit_mean, shared_noise=f.shared_noise)
        with self.autocast():  # the run's precision for what accelerate did not prepare: a sharded model, a teacher
            if self.teacher is None:
                loss = flow_loss(model, latents, text, mask, cond, **noising)
            else:
                loss = distill_loss(model, self.teacher, latents, text, mask, *self.null, cond,
                                    guidance=self.cfg.distill.guidance,
                                    guidance_parallel=self.cfg.sample.guidance_parallel, **noising)
        seqlens = [self.geom.latent_tokens(*z.shape[1:]) for z in latents]
        flops = flops_per_step(self.model_config, seqlens, mask.sum(1).tolist()) * weight
        if self.teacher is not None:  # the teacher's two forward passes: 2 more to the student's 3
            flops = flops * 5 / 3
        return loss * weight, {"flops": flops}

    def extra_state(self) -> list:
        return []

    def after_step(self):
        pass

    def held_out(self, count: int) -> dict:
        """The source's last `count` items (the loader never draws them) as whole clips with their short captions,
        on the device, each with noise of its own (seeded by its index): the fixed set eval_sums measures. `items`:
        the indices read (an unreadable one is skipped)."""
        items, latents, texts, prompts = [], [], [], []
        for i, s in _last_items(self.source, count):
            items.append(i)
            if "latent" in s:
                latents.append(s["latent"].float().to(self.device))
                texts.append(s["text"][s["caption"]])
            else:
                latents += self.latents([s["video"]])
                prompts.append(s["caption"])
        if not items:
            return dict(items=items)
        if texts:
            text, mask = (x.to(self.device) for x in pad_rows(texts))
        else:
            text, mask = encode_with(self.text.model, self.text.tokenizer, prompts, self.text.max_length)
        gens = [torch.Generator(self.device).manual_seed(i) for i in items]
        noise = draw_noise([z.shape for z in latents], self.cfg.flow.shared_noise, gens, self.device)
        return dict(items=items, latents=latents, text=text, mask=mask, noise=noise)

    @torch.no_grad()
    def eval_sums(self, model, held: dict, rank: int, ranks: int) -> dict:
        """{name: (sum, count)} over this data-parallel rank's share of the held-out (clip, timestep) pairs: the
        velocity error at each of train.eval_timesteps (eval_loss_t<t>) and at all (eval_loss). The pairs are packed
        into batches of data.max_tokens and shared out over the ranks; every rank runs as many forward passes, the
        ones past its share at weight 0, since a sharded or sequence-parallel model's forward is collective."""
        timesteps, lat = self.cfg.train.eval_timesteps, held["latents"]
        pairs = [(j, k) for k in range(len(timesteps)) for j in range(len(lat))]
        tokens = [self.geom.latent_tokens(*lat[j].shape[1:]) for j, _ in pairs]
        batches = [[pairs[p] for p in b] for b in pack_by_budget(tokens, self.cfg.data.max_tokens)]
        mine = batches[rank::ranks]
        out = torch.zeros(2, len(timesteps), dtype=torch.float64, device=self.device)
        for b in range(-(-len(batches) // ranks)):
            batch, weight = (mine[b], 1.0) if b < len(mine) else (batches[0], 0.0)
            j, k = (list(v) for v in zip(*batch))
            t = torch.tensor([timesteps[x] for x in k], device=self.device)
            with self.autocast():
                err = velocity_error(model, [lat[x] for x in j], [held["noise"][x] for x in j], t, held["text"][j],
                                     held["mask"][j])
            k = torch.tensor(k, device=self.device)
            out[0].index_add_(0, k, err.double() * weight)
            out[1].index_add_(0, k, torch.full_like(err, weight, dtype=torch.float64))
        return {"eval_loss": out.sum(1), **{f"eval_loss_t{t:g}": out[:, i] for i, t in enumerate(timesteps)}}

    @torch.no_grad()
    def write_samples(self, model, step: int, folder: str | None):
        """Videos of train.sample_prompts at sample.size (default: the data's most common clip size; snapped to the
        VAE and patch), written to folder (None: sampled, not written: the other ranks of a sharded model)."""
        cfg, s = self.cfg, self.cfg.sample
        if not cfg.train.sample_prompts:
            return
        T, H, W = self.geom.snap(*(s.size or self.source.typical_size()))
        shape = (self.model_config["in_channels"], *self.geom.latent_shape(T, H, W))
        text, mask = self.text.encode(cfg.train.sample_prompts)
        null, null_mask = self.text.encode([s.negative_prompt])
        gen = torch.Generator(self.device).manual_seed(s.seed)
        latents = sample(model, [shape] * len(cfg.train.sample_prompts), text, mask, null, null_mask,
                         guidance=s.guidance, guidance_parallel=s.guidance_parallel,
                         shared_noise=cfg.flow.shared_noise, steps=s.steps, shift=sample_shift(cfg),
                         base_tokens=cfg.flow.base_tokens, sampler=s.sampler, generator=gen, progress=False)
        if folder is None:
            return
        for i, z in enumerate(latents):
            video = self.vae.decode_latents(z[None].to(self.vae.dtype))[0]
            write_video(os.path.join(folder, f"step_{step:08d}_{i}.mp4"), video, fps=s.fps or cfg.data.fps)

    def export(self, model, folder: str) -> str:
        """<folder>/pipeline: the denoiser with the run's VAE and text encoder, for sample.py (init_from takes it
        too); LoRA runs also write the adapters alone to <folder>/lora and merge them into the pipeline's."""
        model = save_adapters(model, folder)
        self.vae, self.text = self.vae or self._vae(), self.text or self._text()
        return save_pipeline(self.cfg, model, self.vae, self.text, os.path.join(folder, "pipeline"), source=self.source)


def vae_source(cfg, model) -> tuple:
    """(geometry, data source) of a VAE run: the model's factors (train.init_from's weights decide them)."""
    c = model.config
    geom = Geometry(c.temporal_factor, c.spatial_factor, tuple(cfg.model.patch_size or (1, 2, 2)))
    return geom, make_source(cfg.data, geom)


def first_clips(source, count: int, device):
    """The source's first `count` readable clips, each (1, 3, T, H, W) on the device."""
    for i in range(len(source)):
        if count == 0:
            return
        try:
            yield source.load(i, False, random.Random(0))["video"][None].to(device)
            count -= 1
        except VideoReadError:
            continue


class VAETask:
    """The causal VAE: foreground-weighted L1 + multi-scale SSIM + KL, and a 3D PatchGAN from vae.gan_start on."""

    def __init__(self, cfg, accelerator):
        v = cfg.vae
        if cfg.distill.teacher:
            raise ConfigError("distill.teacher distills a denoiser's guidance: it needs train.task: dit, not vae")
        if cfg.data.source == "cache":
            raise ConfigError("train.task: vae reads pixels; data.source must be 'shapes' or 'manifest', not 'cache'")
        if v.gan_weight > 0 and cfg.train.mixed_precision == "fp16":
            raise ConfigError("vae.gan_weight > 0 is not supported with train.mixed_precision: fp16 (the "
                             "discriminator's gradients are not unscaled); use bf16 or no")
        self.cfg, self.acc, self.device = cfg, accelerator, accelerator.device
        self.model = build_vae(cfg)
        self.model_config = dict(self.model.config)
        self.geom, self.source = vae_source(cfg, self.model)
        self.loss_fn = VAELoss(v.perceptual_weight, v.kl_weight, v.foreground_weight, v.gan_weight,
                               v.gan_start).to(self.device)
        self.disc = self.loss_fn.discriminator  # replicated on every rank; gradients averaged in after_step
        self.disc_opt, self.last_batch = None, None
        if self.disc is not None:
            self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=cfg.train.lr, betas=(0.5, 0.9), fused=True)

    def extra_state(self) -> list:
        """Objects the checkpoint holds besides the model, optimizer and schedule."""
        return [self.disc, self.disc_opt] if self.disc is not None else []

    def loss(self, model, batch: dict, generator, step: int) -> tuple[torch.Tensor, dict]:
        weight = 1.0
        if batch["size"] == 0:  # every sample failed to load: run the last batch at weight 0 (ranks stay in step)
            batch, weight = self.last_batch or _stand_in(self.source), 0.0
        self.last_batch = batch
        videos = batch["video"]
        last_layer = self.acc.unwrap_model(model).decoder.conv_out.conv.weight
        total, logs = 0.0, {}
        for idx in _group_by_shape(videos).values():
            x = torch.stack([videos[i] for i in idx]).to(self.device)  # (B, 3, T, H, W)
            if self.disc is not None:
                self.disc.requires_grad_(False)  # the generator's GAN term must not train the discriminator
            recon, posterior = model(x, generator=generator)
            g_loss, g_logs = self.loss_fn(x, recon.float(), posterior, step, last_layer=last_layer)
            loss = g_loss
            if self.disc is not None:
                self.disc.requires_grad_(True)
                d_loss, d_logs = self.loss_fn.disc_loss(x, recon.float(), step)
                if d_loss is not None:
                    loss = loss + d_loss
                    g_logs.update(d_logs)
            share = len(idx) / len(videos)
            total = total + share * loss
            for k, v in g_logs.items():
                if k == "loss":
                    continue
                logs[k] = logs.get(k, 0.0) + share * weight * float(v)
        return total * weight, logs

    def after_step(self):
        """Average the discriminator's gradients over ranks and step it."""
        if self.disc_opt is None or all(p.grad is None for p in self.disc.parameters()):
            return
        for p in self.disc.parameters():
            if p.grad is not None and self.acc.num_processes > 1:
                p.grad = self.acc.reduce(p.grad, "mean")
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)

    def clips(self, count: int):
        return first_clips(self.source, count, self.device)

    def held_out(self, count: int) -> dict:
        """The source's last `count` clips (the loader never draws them), kept in CPU memory; `items`: the indices
        read (an unreadable one is skipped)."""
        read = list(_last_items(self.source, count))
        return dict(items=[i for i, _ in read], clips=[s["video"][None] for _, s in read])

    @torch.no_grad()
    def eval_sums(self, model, held: dict, rank: int, ranks: int) -> dict:
        """{name: (sum, count)} over this rank's share of the held-out clips, reconstructed through the posterior
        mean: PSNR (eval_psnr, pixels in [-1, 1], per clip) and mean absolute error (eval_l1)."""
        out = torch.zeros(2, 2, dtype=torch.float64, device=self.device)
        for x in held["clips"][rank::ranks]:
            x = x.to(self.device)
            with self.acc.autocast():
                recon = _reconstruct(model, x).float()
            mse = (recon - x).pow(2).mean().clamp_min(1e-12)
            out[0] += torch.stack([10 * torch.log10(4 / mse), (recon - x).abs().mean()]).double()
            out[1] += 1
        return {"eval_psnr": out[:, 0], "eval_l1": out[:, 1]}

    @torch.no_grad()
    def write_samples(self, model, step: int, folder: str, count: int = 4):
        """Reconstructions of the source's first `count` clips, each written as [input | reconstruction]."""
        for i, x in enumerate(self.clips(count)):
            recon = _reconstruct(model, x)
            write_video(os.path.join(folder, f"step_{step:08d}_recon_{i}.mp4"), torch.cat([x, recon], -1)[0],
                        fps=self.cfg.sample.fps or self.cfg.data.fps)

    @torch.no_grad()
    def export(self, model, folder: str, stats_clips: int = 32) -> str:
        """The VAE to <folder>/vae, with per-channel latent statistics measured on the first clips of the data."""
        from ..vae import compute_latent_stats

        compute_latent_stats(model, self.clips(stats_clips))
        return save_model(model, os.path.join(folder, "vae"))
