"""Data pipeline and batching throughput on this machine, side by side.

1. decord: samples per second the manifest DataLoader delivers with 2 workers (mp4 shapes clips of three aspects,
   read, resampled to 8 fps, resized to data.target_area), against the samples per second the tiny model consumes
   in the real training loop (train() on the same manifest: live VAE encoding + text encoding + DiT step), and the
   share of each training step spent waiting for data (log.jsonl's data_wait; target < 10%).
2. Tokens per second of the tiny preset on the same mixed shapes (tiny.yaml's sizes: videos of 9/17/33 frames at
   three aspects, images), token-budget packing against fixed pad-to-bucket batches (every sample padded to the
   largest shape's token count, as many per batch as the same budget holds); forward + backward + AdamW on random
   latents, so only batching differs. The two alternate step by step; medians.
3. The training loop of 1. on the same manifest encoded once by `python -m videodit.data.cache`: what live decoding
   and VAE/text encoding cost per step.

The VAE is the tiny preset with random weights (speed does not depend on training). Run:
    python bench/data.py [--clips 48] [--train-steps 8] [--pack-steps 6] [--threads 1]
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from videodit.config import load_config  # noqa: E402
from videodit.data.cache import build_cache  # noqa: E402
from videodit.data.loader import Geometry, ManifestSource, PackedBatchSampler, ShapesSource, make_loader  # noqa: E402
from videodit.data.manifest import write_manifest  # noqa: E402
from videodit.data.shapes import make_clip  # noqa: E402
from videodit.data.video import write_video  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/shapes/tiny.yaml")
ASPECTS = [(64, 64), (64, 128), (128, 64)]


def make_manifest(folder: str, n: int) -> str:
    rows = []
    for i in range(n):
        h, w = ASPECTS[i % len(ASPECTS)]
        clip = make_clip(i, h, w, 36)  # 4.5 s at 8 fps: room for random starts
        write_video(os.path.join(folder, f"{i}.mp4"), clip["frames"], fps=8)
        rows.append(dict(path=f"{i}.mp4", caption=clip["caption"], detailed_caption=clip["detailed_caption"],
                         num_frames=36, fps=8.0, height=h, width=w))
    return write_manifest(os.path.join(folder, "data.jsonl"), rows)


def loader_rate(cfg, geom, batches: int) -> float:
    """Samples per second out of the DataLoader (2 workers), after the first batch (worker start-up)."""
    loader = iter(make_loader(cfg, ManifestSource(cfg.data.manifest, cfg.data.target_area, cfg.data.num_frames,
                                                  cfg.data.fps, geom), geom))
    next(loader)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(loader)["size"]
    return n / (time.perf_counter() - t0)


def train_rate(cfg) -> dict:
    """Median steps/s, samples/s and data-wait share of the real loop, after its first step."""
    from videodit.train.loop import train

    train(cfg)
    with open(os.path.join(cfg.train.output_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f][1:]
    return {k: statistics.median(r[k] for r in rows) for k in ("steps_per_s", "samples_per_s", "tokens_per_s",
                                                                 "data_wait")}


def packing_vs_buckets(cfg, geom, steps: int) -> dict:
    """Real tokens per second of the tiny preset: packed batches vs pad-to-bucket batches of the same stream."""
    from videodit.dit import PRESETS, VideoDiT
    from videodit.flow import flow_loss

    source = ShapesSource(cfg.data.sizes, 10_000, 0, geom)
    sampler = PackedBatchSampler(*source.token_counts(geom), cfg.data.max_tokens, cfg.data.image_ratio, seed=0)
    C = PRESETS["tiny"]["in_channels"]

    def shape(i, is_image):  # the latent (C, T', h, w) of a sample
        T, H, W = source.sizes[i % len(source.sizes)]
        return (C, *geom.latent_shape(1 if is_image else T, H, W))

    def tokens(s):
        return geom.latent_tokens(*s[1:])

    packed = [[shape(i, im) for i, im, _ in b] for b in sampler.epoch(0)]  # latent shapes of each packed batch
    stream = [s for b in packed for s in b]
    largest = max(stream, key=tokens)
    per_bucket = max(1, cfg.data.max_tokens // tokens(largest))
    buckets = [stream[k:k + per_bucket] for k in range(0, len(stream), per_bucket)]

    torch.manual_seed(0)
    model = VideoDiT(**PRESETS["tiny"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    text, mask = torch.randn(1, 16, PRESETS["tiny"]["text_dim"]), torch.ones(1, 16, dtype=torch.bool)

    def step(shapes, padded):
        latents = [torch.randn(largest if padded else s) for s in shapes]  # padded: every sample at the largest
        t0 = time.perf_counter()
        loss = flow_loss(model, latents, text.expand(len(shapes), -1, -1), mask.expand(len(shapes), -1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return sum(tokens(s) for s in shapes) / (time.perf_counter() - t0)

    rates = {"packed": [], "buckets": []}
    step(packed[0], False)  # warm-up
    for k in range(1, steps + 1):
        rates["packed"].append(step(packed[k], False))
        rates["buckets"].append(step(buckets[k], True))
    fill = np.mean([sum(tokens(s) for s in b) for b in packed]) / cfg.data.max_tokens
    return {k: statistics.median(v) for k, v in rates.items()} | {"per_bucket": per_bucket, "fill": fill}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=48)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--pack-steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    args = p.parse_args()
    if args.train_steps < 2:
        p.error(f"--train-steps must be at least 2: the first step is a warm-up, left out of the rates; "
                f"got {args.train_steps}")
    for name in ("clips", "pack_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    from videodit.vae import load_vae

    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_manifest(tmp, args.clips)
        torch.manual_seed(0)
        load_vae("causal", "tiny").save_pretrained(os.path.join(tmp, "vae"))
        cfg = load_config(CONFIG, [
            "data.source=manifest", f"data.manifest={manifest}", "data.num_workers=2", "data.num_frames=[17]",
            f"train.vae={os.path.join(tmp, 'vae')}", f"train.output_dir={os.path.join(tmp, 'run')}",
            f"train.max_steps={args.train_steps}", "train.log_every=1", "train.checkpoint_every=100000"])
        geom = Geometry(4, 4, (1, 2, 2))
        load = loader_rate(cfg, geom, batches=6)
        loop = train_rate(cfg)
        build_cache(cfg, os.path.join(tmp, "cache"))
        cached = train_rate(dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, source="cache", cache_dir=os.path.join(tmp, "cache")), train=dataclasses.replace(
            cfg.train, output_dir=os.path.join(tmp, "run_cache"))))
        pack = packing_vs_buckets(load_config(CONFIG), geom, args.pack_steps)

    print(f"\n1. decord data loading vs the tiny model ({torch.get_num_threads()} torch thread(s), 2 workers, "
          f"{os.cpu_count()} cores)")
    print(f"{'':34s}{'samples/s':>12s}")
    print(f"{'DataLoader alone (2 workers)':34s}{load:12.2f}")
    print(f"{'training loop consumes':34s}{loop['samples_per_s']:12.2f}")
    print(f"loader headroom: {load / loop['samples_per_s']:.1f}x; training steps/s {loop['steps_per_s']:.3f}; "
          f"share of each step waiting for data: {100 * loop['data_wait']:.1f}% (target < 10%)")
    budget = load_config(CONFIG).data.max_tokens
    print(f"\n2. tiny preset, tokens/s of real tokens on the same mixed shapes (budget {budget} tokens; buckets: "
          f"{pack['per_bucket']} samples padded to the largest)")
    print(f"{'':34s}{'tokens/s':>12s}")
    print(f"{'packing (patch n pack)':34s}{pack['packed']:12.0f}   (budget filled {100 * pack['fill']:.1f}%)")
    print(f"{'pad-to-bucket':34s}{pack['buckets']:12.0f}")
    print(f"packing / buckets: {pack['packed'] / pack['buckets']:.2f}x")
    print("\n3. the same training loop on the same manifest: live decoding + VAE/text encoding vs the latent cache")
    print(f"{'':34s}{'steps/s':>12s}{'tokens/s':>12s}{'data wait':>12s}")
    for name, r in (("live (decord + VAE + text)", loop), ("latent cache", cached)):
        print(f"{name:34s}{r['steps_per_s']:12.3f}{r['tokens_per_s']:12.0f}{100 * r['data_wait']:11.1f}%")
    print(f"cache / live: {cached['steps_per_s'] / loop['steps_per_s']:.2f}x")


if __name__ == "__main__":
    main()
