"""Latent cache: encode a data set once (VAE latents + text embeddings of the short and detailed captions) into
safetensors shards, so training reads latents instead of decoding and encoding video every step.

    python -m videodit.data.cache --config configs/shapes/tiny.yaml --out cache/shapes [--num 20000]

The config's data section names the source (a manifest, or the shapes world: the first --num clips, default
data.shapes_count), its train.vae the VAE and its text section the encoder. Clips keep the shapes training would
give them (manifest: native aspect at data.target_area, each clip at the longest of data.num_frames it holds,
from the clip's start). Train from the cache with `--set data.source=cache data.cache_dir=DIR`.

Layout: shard_00000.safetensors ... holding latent.{i} (C, T', h, w), text.{i} and detailed.{i} (L, D) (real
tokens only); null.safetensors with the empty prompt; index.json with each item's shard, key, shape and captions.
"""

import argparse
import dataclasses
import json
import logging
import os
import random
import re
import shutil

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..config import ConfigError, as_saved, load_config, one_line_warnings
from .loader import Geometry, make_source
from .manifest import ManifestError
from .video import VideoReadError, read_video, readable

logger = logging.getLogger(__name__)


@torch.no_grad()
def build_cache(cfg, out: str, num: int | None = None, shard_size: int = 256, device: str = "cpu") -> dict:
    """Encode the config's data source into `out` (written to a temporary folder, then moved). Returns the index."""
    from ..text import canonical, load_text_encoder
    from ..train.models import denoiser_kwargs, load_trained_vae

    if cfg.data.source == "cache":
        raise ConfigError("data.source is 'cache': point the config at the shapes world or a manifest to cache")
    _check_out(out)
    vae = load_trained_vae(cfg).to(device)
    text = load_text_encoder(cfg.text.encoder, cfg.text.path, cfg.text.max_length, device=device)
    patch = tuple(denoiser_kwargs(cfg, vae.denoiser_channels, text.dim).get("patch_size", (1, 2, 2)))
    geom = Geometry(vae.ft, vae.fs, patch)
    data = cfg.data
    if num is not None and data.source == "shapes":
        data = dataclasses.replace(data, shapes_count=num)
    source = make_source(data, geom)
    count = len(source) if num is None else min(num, len(source))

    tmp = out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        items, skipped = _write_shards(tmp, source, count, vae, text, shard_size, device, data.source == "shapes")
    except BaseException:  # a failed run leaves no temporary folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index = dict(items=items, ft=vae.ft, fs=vae.fs, latent_channels=vae.denoiser_channels, text_dim=text.dim,
                 text=dict(encoder=cfg.text.encoder, path=canonical(cfg.text.path), max_length=cfg.text.max_length),
                 vae=cfg.train.vae or cfg.vae.path, skipped=skipped,
                 vae_config={k: v for k, v in as_saved(dict(getattr(vae, "model", vae).config)).items()
                             if not k.startswith("_")})  # as its config.json holds it: checked by a cached run
    with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(index, f)
    readable(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    if skipped:
        logger.warning(f"{skipped} unreadable samples were skipped")
    return index


def _check_out(out: str):
    """The cache replaces `out` whole: refuse a file, or a folder holding anything but an earlier cache's files."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out} is a file; give a folder for the cache")
    if os.path.isdir(out):
        others = sorted(n for n in os.listdir(out) if not re.fullmatch(r"index\.json|null\.safetensors|"
                                                                      r"shard_\d+\.safetensors", n))
        if others:
            raise ConfigError(f"--out {out} holds files that are not a latent cache's ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}), and the cache replaces the folder's contents: "
                              f"give a new or empty folder (or an earlier cache, to rewrite it)")


def _write_shards(tmp: str, source, count: int, vae, text, shard_size: int, device, shapes: bool):
    """Encode the source's first `count` items into safetensors shards in `tmp`, and the empty prompt into
    null.safetensors. Returns the index's items and the number of unreadable items skipped."""
    items, shard, skipped, shard_id = [], {}, 0, 0

    def embed(prompt):  # (L, D): real tokens only
        emb, mask = text.encode([prompt])
        return emb[0][mask[0]].float().cpu().contiguous()

    for i in tqdm(range(count), desc="caching"):
        try:
            s = source.load(i, False, random.Random(0)) if shapes else _load_from_start(source, i)
        except VideoReadError as e:
            logger.warning(f"skipping a sample: {e}")
            skipped += 1
            continue
        latent = vae.encode_latents(s["video"][None].to(device, vae.dtype))[0].float().cpu().contiguous()
        key, name = str(len(items)), f"shard_{shard_id:05d}.safetensors"
        shard[f"latent.{key}"] = latent
        shard[f"text.{key}"] = embed(s["caption"])
        if s.get("detailed_caption"):
            shard[f"detailed.{key}"] = embed(s["detailed_caption"])
        items.append(dict(shard=name, key=key, shape=list(latent.shape), source_index=i, caption=s["caption"],
                          detailed_caption=s.get("detailed_caption")))
        if len(items) % shard_size == 0:
            save_file(shard, os.path.join(tmp, name))
            shard, shard_id = {}, shard_id + 1
    if shard:
        save_file(shard, os.path.join(tmp, f"shard_{shard_id:05d}.safetensors"))
    save_file({"text": embed("")}, os.path.join(tmp, "null.safetensors"))
    return items, skipped


def _load_from_start(source, i: int) -> dict:
    """A manifest clip at its planned size from its first frame (a cache fixes one window per clip)."""
    row, (T, H, W, _, _) = source.rows[i], source.plans[i]
    video = read_video(row.path, num_frames=T, fps=source.fps, height=H, width=W)
    return dict(video=video, caption=row.caption, detailed_caption=row.detailed_caption)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m videodit.data.cache", description="Encode a data set once into a "
                                "cache of VAE latents and text embeddings (safetensors shards).")
    p.add_argument("--config", required=True, help="a training config: its data, vae (train.vae) and text sections")
    p.add_argument("--out", required=True, help="the cache folder to write")
    p.add_argument("--num", type=int, default=None,
                   help="how many samples to cache (default: the shapes world's data.shapes_count, a manifest's "
                        "every row); a manifest gives at most its rows")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides")
    args = p.parse_args(argv)
    if (args.num is not None and args.num < 1) or args.shard_size < 1:
        p.error("--num and --shard-size must be >= 1")
    from ..generate import UserError, check_device

    try:
        args.device = check_device(args.device)
    except UserError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        index = build_cache(load_config(args.config, args.set), args.out, args.num, args.shard_size, args.device)
    except (ConfigError, ManifestError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"cached {len(index['items'])} samples ({index['skipped']} skipped) in {args.out}")


if __name__ == "__main__":
    one_line_warnings()
    main()
