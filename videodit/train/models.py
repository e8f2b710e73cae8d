"""Building the models a run trains or uses, from its config: the denoiser, a fresh VAE, a trained VAE."""

import contextlib
import dataclasses
import json
import logging
import os

import torch

from ..config import ConfigError, ModelConfig, VAEConfig, as_saved
from ..dit import PRESETS, VideoDiT
from ..text import canonical, is_local
from ..flow import guidance_distilled
from ..vae import PRETRAINED_VAES, CausalVideoVAE, load_vae

logger = logging.getLogger(__name__)

MODEL_OVERRIDES = tuple(f.name for f in dataclasses.fields(ModelConfig) if f.name != "preset")


def denoiser_kwargs(cfg, in_channels: int, text_dim: int) -> dict:
    """VideoDiT arguments: the preset, the config's overrides, and the channels of the VAE and text encoder used."""
    kwargs = dict(PRESETS[cfg.model.preset])
    kwargs.update({k: getattr(cfg.model, k) for k in MODEL_OVERRIDES if getattr(cfg.model, k) is not None})
    kwargs.update(in_channels=in_channels, text_dim=text_dim)
    return kwargs


def build_denoiser(cfg, in_channels: int, text_dim: int, teacher: VideoDiT | None = None,
                   meta: bool = False) -> VideoDiT:
    """A fresh VideoDiT, or the weights of `train.init_from` (a model folder or a pipeline with transformer/). A
    guidance distillation (distill.teacher, loaded as `teacher`) without init_from starts from the teacher, with a
    guidance embedding. With `meta`, the same architecture without weights, on the meta device: a sharded run's
    other processes build that and receive their shards of the main process's weights."""
    distilling = cfg.distill.teacher is not None
    if cfg.train.init_from:
        model = load_denoiser(cfg.train.init_from, in_channels, text_dim, "train.init_from", meta)
        if guidance_distilled(model) != distilling:
            raise ConfigError(f"train.init_from = {cfg.train.init_from} is guidance-distilled: train it on with "
                              f"distill.teacher set" if not distilling else
                              f"train.init_from = {cfg.train.init_from} has no guidance embedding, which a guidance "
                              f"distillation trains; leave init_from out to start from distill.teacher")
        _warn_ignored({k: getattr(cfg.model, k) for k in MODEL_OVERRIDES if getattr(cfg.model, k) is not None},
                      {k: model.config[k] for k in MODEL_OVERRIDES}, cfg.train.init_from, "model.")
        return model
    if distilling:
        return with_guidance_embedding(teacher, meta)
    with _on_meta(meta):
        return VideoDiT(**denoiser_kwargs(cfg, in_channels, text_dim))


def _warn_ignored(asked: dict, got: dict, path: str, prefix: str = "", key: str = "train.init_from"):
    """Warn of the config's architecture keys that the weights of `key` override (their config decides)."""
    asked, got = as_saved(asked), as_saved(got)
    ignored = [f"{prefix}{k} = {v} (the model's: {got[k]})" for k, v in asked.items() if v != got[k]]
    if ignored:
        logger.warning(f"{key} = {path} decides the architecture; ignored: {'; '.join(ignored)}")


def _check_class(folder: str, name: str, key: str, what: str):
    """A diffusers model folder (one with config.json; a hub id passes) must hold a `name`, or `key` is wrong."""
    try:
        with open(os.path.join(os.path.expanduser(folder), "config.json")) as f:
            got = json.load(f).get("_class_name")
    except (OSError, ValueError):
        return
    if got and got != name:
        raise ConfigError(f"{key} = {folder.rstrip('/')} holds a model of class {got}, where {name} is needed: give "
                          f"{what}")


def _relative(path: str) -> str:
    """For errors about a missing folder: where a relative path was looked for."""
    return "" if os.path.isabs(path) else f" (a relative path is read from the current folder, {os.getcwd()})"


def _on_meta(meta: bool):
    return torch.device("meta") if meta else contextlib.nullcontext()


def load_denoiser(path: str, in_channels: int, text_dim: int, key: str, meta: bool = False) -> VideoDiT:
    """The VideoDiT of a model folder or of a pipeline (its transformer/), checked against the run's VAE and text
    encoder; `key` names the config key that gave the path, for errors. With `meta`, its architecture only."""
    sub = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else None
    if not os.path.isfile(os.path.join(path, sub or "", "config.json")):
        raise ConfigError(f"{key} = {path} is neither a model folder nor a pipeline with a transformer/ folder"
                          f"{_relative(path)}")
    _check_class(os.path.join(path, sub or ""), "VideoDiT", key, "a denoiser (a dit run's export or a pipeline)")
    if meta:
        with torch.device("meta"):
            model = VideoDiT.from_config(VideoDiT.load_config(path, subfolder=sub))
    else:
        model = VideoDiT.from_pretrained(path, subfolder=sub)
    got = (model.config.in_channels, model.config.text_dim)
    if got != (in_channels, text_dim):
        raise ConfigError(f"{key} = {path}: the model takes (in_channels, text_dim) = {got}, but the VAE and text "
                          f"encoder give {(in_channels, text_dim)}")
    return model


def load_teacher(cfg, in_channels: int, text_dim: int, meta: bool = False) -> VideoDiT:
    """The frozen teacher of a guidance distillation (distill.teacher); with `meta`, its architecture only."""
    teacher = load_denoiser(cfg.distill.teacher, in_channels, text_dim, "distill.teacher", meta)
    if guidance_distilled(teacher):
        raise ConfigError(f"distill.teacher = {cfg.distill.teacher} is itself guidance-distilled; distill from the "
                          f"model it was distilled from, which samples with a negative prompt's pass")
    return teacher.eval().requires_grad_(False)


def with_guidance_embedding(teacher: VideoDiT, meta: bool = False) -> VideoDiT:
    """A student for guidance distillation: the teacher's architecture and weights plus a guidance embedding, which
    starts at zero (so the student starts giving the teacher's conditional velocity at every scale). With `meta`, the
    architecture only."""
    config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
    with _on_meta(meta):
        student = VideoDiT(**{**config, "guidance_embed": True})
    if meta:
        return student
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(not k.startswith("g_embed.") for k in missing):
        raise ValueError(f"the teacher's weights do not fit its own architecture: missing {missing}, "
                         f"unexpected {unexpected}")
    return student


def build_vae(cfg) -> CausalVideoVAE:
    """A fresh causal VAE from the vae section (or `train.init_from` weights) for `train.task: vae`."""
    v = cfg.vae
    if v.kind != "causal":
        raise ConfigError(f"train.task: vae trains our causal VAE; vae.kind = {v.kind!r} is a pretrained VAE "
                         f"(use it with train.vae instead)")
    kwargs = dict(block_out_channels=[v.base_channels * m for m in v.channel_mults], layers_per_block=v.num_res_blocks,
                  latent_channels=v.latent_channels, temporal_factor=v.ft, spatial_factor=v.fs,
                  mid_attention=v.mid_attention, shortcut=v.shortcut)
    if cfg.train.init_from:
        vae = CausalVideoVAE.from_pretrained(cfg.train.init_from)
        names = dict(block_out_channels="channels", layers_per_block="num_res_blocks", temporal_factor="ft",
                     spatial_factor="fs")  # the config's names where they differ from the model's
        _warn_ignored({names.get(k, k): w for k, w in kwargs.items()},
                      {names.get(k, k): vae.config[k] for k in kwargs}, cfg.train.init_from, "vae.")
        return vae
    levels = len(v.channel_mults)
    if 2 ** (levels - 1) != v.fs:
        raise ConfigError(f"vae.channel_mults has {levels} levels, which downsample by {2 ** (levels - 1)}, but "
                         f"vae.fs = {v.fs}: give log2(fs) + 1 = {v.fs.bit_length()} multipliers")
    return CausalVideoVAE(**kwargs)


def _vae_source(cfg) -> tuple[str, str | None, str | None]:
    """(the config key that names the VAE, its path, the subfolder holding it: a pipeline's vae/ for a pretrained
    kind, else None)."""
    path = cfg.train.vae or cfg.vae.path
    sub = "vae" if path and cfg.vae.kind != "causal" and os.path.isdir(os.path.join(path, "vae")) else None
    return "train.vae" if cfg.train.vae else "vae.path", path, sub


def named_vae_config(cfg) -> dict | None:
    """The config.json of the VAE folder the run names (latent normalization included; diffusers' private keys left
    out), None for a hub id or no VAE: what a latent cache and a checkpoint record of the VAE they were made with."""
    _, path, sub = _vae_source(cfg)
    config = os.path.join(os.path.expanduser(path or ""), sub or "", "config.json")
    if not path or not os.path.isfile(config):
        return None
    with open(config) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def vae_changes(recorded: dict | None, cfg) -> list[str]:
    """The keys in which the VAE the run names now differs from a recorded config (none when either is unknown)."""
    now = named_vae_config(cfg)
    if not recorded or now is None:
        return []
    return sorted(k for k in now.keys() & recorded.keys() if now[k] != recorded[k])


def check_cache_vae(index: dict, cfg):
    """The run's VAE must be the one that encoded a latent cache (its index.json's vae_config): their configs, latent
    normalization included, agree on every key both name. A hub id or an older cache is not checked."""
    key, path, _ = _vae_source(cfg)
    differ = vae_changes(index.get("vae_config"), cfg)
    if differ:
        raise ConfigError(f"data.cache_dir holds latents of another VAE ({index.get('vae')}) than {key} = {path} "
                          f"(they differ in {', '.join(differ[:4])}): rebuild the cache with this VAE, or train with "
                          f"that one")


def check_cache_text(index: dict, cfg):
    """The run's text encoder must be the one that encoded a latent cache's captions, at its max_length (its
    index.json's text; an older cache is not checked)."""
    cached = index.get("text")
    now = dict(encoder=cfg.text.encoder, path=canonical(cfg.text.path), max_length=cfg.text.max_length)
    differ = [k for k in now if cached and (canonical(cached[k]) if k == "path" else cached[k]) != now[k]]
    if differ:
        said = ", ".join(f"text.{k} = {cached[k]!r} there, {getattr(cfg.text, k)!r} here" for k in differ)
        raise ConfigError(f"data.cache_dir holds captions encoded with another text encoder setting ({said}): "
                          f"rebuild the cache with this run's text section, or train with the cache's")


def load_trained_vae(cfg):
    """The frozen VAE named by `train.vae` (a folder written by a VAE run), or vae.path for a pretrained kind."""
    v, (key, path, sub) = cfg.vae, _vae_source(cfg)
    if cfg.train.vae and cfg.vae.path and cfg.train.vae != cfg.vae.path:
        raise ConfigError(f"train.vae = {cfg.train.vae} and vae.path = {cfg.vae.path} both name the VAE; keep one "
                          f"(--set train.vae= leaves vae.path)")
    if not path:
        raise ConfigError("this run needs a trained VAE but train.vae is not set. Train one on the shapes world with\n"
                         "    python train.py --config configs/shapes/vae.yaml\n"
                         "then pass --set train.vae=runs/shapes-vae/vae (the run's exported vae/ folder)")
    if v.kind == "causal" and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"train.vae = {path} is not a VAE folder (no config.json){_relative(path)}; a VAE "
                                f"run exports one to "
                                f"<output_dir>/vae, e.g. runs/shapes-vae/vae after "
                                f"python train.py --config configs/shapes/vae.yaml")
    if v.kind != "causal" and is_local(path) and not os.path.isdir(os.path.expanduser(path)):
        raise FileNotFoundError(f"{key} = {path} is not a folder"
                                f"{_relative(path)}; give the {v.kind} VAE's folder (or a pipeline's), or its hub id")
    want = CausalVideoVAE if v.kind == "causal" else PRETRAINED_VAES[v.kind]
    _check_class(os.path.join(path, sub or ""), want.__name__, key, f"the VAE of vae.kind {v.kind}")
    vae = load_vae(v.kind, path, **({"subfolder": sub} if sub else {}))
    default = VAEConfig()  # the keys a config changed: its compression, which the folder's weights decide
    _warn_ignored({k: getattr(v, k) for k in ("ft", "fs", "latent_channels") if getattr(v, k) != getattr(default, k)},
                  dict(ft=vae.ft, fs=vae.fs, latent_channels=vae.latent_channels), path, "vae.", key)
    return vae.eval().requires_grad_(False)
