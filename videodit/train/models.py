"""Building the models a run trains or uses, from its config: the denoiser, a fresh VAE, a trained VAE."""

import os

from ..config import ConfigError
from ..dit import PRESETS, VideoDiT
from ..vae import CausalVideoVAE, load_vae

MODEL_OVERRIDES = ("depth", "hidden_size", "num_heads", "mlp_ratio", "patch_size", "rope_base_grid", "qk_norm",
                   "local_mlp", "pooled_text", "abs_pos")


def denoiser_kwargs(cfg, in_channels: int, text_dim: int) -> dict:
    """VideoDiT arguments: the preset, the config's overrides, and the channels of the VAE and text encoder used."""
    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"model.preset = {cfg.model.preset!r} is unknown; expected one of {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[cfg.model.preset])
    kwargs.update({k: getattr(cfg.model, k) for k in MODEL_OVERRIDES if getattr(cfg.model, k) is not None})
    kwargs.update(in_channels=in_channels, text_dim=text_dim)
    return kwargs


def build_denoiser(cfg, in_channels: int, text_dim: int) -> VideoDiT:
    """A fresh VideoDiT, or the weights of `train.init_from` (a model folder or a pipeline with transformer/)."""
    if not cfg.train.init_from:
        return VideoDiT(**denoiser_kwargs(cfg, in_channels, text_dim))
    path = cfg.train.init_from
    sub = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else None
    model = VideoDiT.from_pretrained(path, subfolder=sub)
    got = (model.config.in_channels, model.config.text_dim)
    if got != (in_channels, text_dim):
        raise ConfigError(f"train.init_from = {path}: the model takes (in_channels, text_dim) = {got}, but the VAE "
                         f"and text encoder give {(in_channels, text_dim)}")
    return model


def build_vae(cfg) -> CausalVideoVAE:
    """A fresh causal VAE from the vae section (or `train.init_from` weights) for `train.task: vae`."""
    v = cfg.vae
    if v.kind != "causal":
        raise ConfigError(f"train.task: vae trains our causal VAE; vae.kind = {v.kind!r} is a pretrained VAE "
                         f"(use it with train.vae instead)")
    if cfg.train.init_from:
        return CausalVideoVAE.from_pretrained(cfg.train.init_from)
    levels = len(v.channel_mults)
    if 2 ** (levels - 1) != v.fs:
        raise ConfigError(f"vae.channel_mults has {levels} levels, which downsample by {2 ** (levels - 1)}, but "
                         f"vae.fs = {v.fs}: give log2(fs) + 1 = {v.fs.bit_length()} multipliers")
    return CausalVideoVAE(block_out_channels=[v.base_channels * m for m in v.channel_mults],
                          layers_per_block=v.num_res_blocks, latent_channels=v.latent_channels,
                          temporal_factor=v.ft, spatial_factor=v.fs, mid_attention=v.mid_attention,
                          shortcut=v.shortcut)


def load_trained_vae(cfg):
    """The frozen VAE named by `train.vae` (a folder written by a VAE run), or vae.path for a pretrained kind."""
    v, path = cfg.vae, cfg.train.vae or cfg.vae.path
    if not path:
        raise ConfigError("this run needs a trained VAE but train.vae is not set. Train one on the shapes world with\n"
                         "    python train.py --config configs/shapes/vae.yaml\n"
                         "then pass --set train.vae=runs/shapes-vae/vae (the run's exported vae/ folder)")
    if v.kind == "causal" and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"train.vae = {path} is not a VAE folder (no config.json); a VAE run exports one to "
                                f"<output_dir>/vae, e.g. runs/shapes-vae/vae after "
                                f"python train.py --config configs/shapes/vae.yaml")
    sub = "vae" if v.kind != "causal" and os.path.isdir(os.path.join(path, "vae")) else None
    vae = load_vae(v.kind, path, **({"subfolder": sub} if sub else {}))
    return vae.eval().requires_grad_(False)
