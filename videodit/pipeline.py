"""VideoDiTPipeline: text (and image or video) to video with one checkpoint.

    pipe = VideoDiTPipeline.from_pretrained("models/shapes-tiny")
    frames = pipe("a red circle moving right", height=64, width=128, num_frames=17).frames[0]  # (T, H, W, 3) uint8

Modes, all from the one checkpoint trained with random frame conditioning (videodit.flow):
- text to video (num_frames > 1) and text to image (num_frames = 1);
- `image=`: animate an image from its first frame;
- `video=, extend="forward"|"backward"`: num_frames new frames after a clip's end, or leading into its start;
- `loop=True`: a clip whose last frame leads back into its first (with `image=`, a loop through that image);
- `video=, strength=s`: SDEdit, restyle a clip from its noised latents;
- `connect=(video_a, video_b)`: a transition of num_frames new frames (whole latent frames of ft) from the end of
  one clip to the start of the other.

The causal VAE encodes a clip's first frame alone, so a clean first latent frame is exactly an image. A clean *last*
latent frame stands for a group of ft frames; to end on a given frame the pipeline conditions on the latent of that
frame held still for ft frames, and trims the held frames from the result.
"""

import contextlib
import copy
import dataclasses
import importlib
import json
import math
import numbers
import os
import shutil
import warnings

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from .data.loader import Geometry
from .data.video import from_uint8, resize_crop, to_uint8, upright_rgb
from .dit import StepCache, VideoDiT  # noqa: F401  (model_index.json names videodit.dit: importing registers it)
from .flow import cond_frames, guidance_distilled, sample
from .text import encode_with, load_text_encoder
from .vae import CausalVideoVAE, PretrainedVideoVAE


@dataclasses.dataclass
class VideoDiTOutput(BaseOutput):
    frames: list  # per prompt: uint8 (T, H, W, 3) ("np"), float (3, T, H, W) in [-1, 1] ("pt") or latents ("latent")
    sizes: list   # per prompt: (T, H, W) actually generated
    skipped_steps: int = 0  # steps of the last pass whose later blocks the step cache skipped (cache_threshold)


def check_sampling(steps=None, guidance=None, guidance_parallel=None, shift=None, cache_threshold=0.0,
                   strength=None, flags: bool = False):
    """Refuse a sampling setting out of range, whatever the model: a ValueError saying what was given and what is
    allowed. None: not given (the checkpoint's default; for shift, the checkpoint's default_shift, else by
    resolution; for strength, no SDEdit). The messages name the settings as VideoDiTPipeline.__call__ does
    (num_inference_steps, guidance_scale, ...), or with `flags` as the command lines do (--steps, --guidance, ...)."""
    def name(key):
        if flags:
            return "--" + key.replace("_", "-")
        return dict(steps="num_inference_steps", guidance="guidance_scale").get(key, key)

    def number(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if steps is not None and not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"{name('steps')} must be a positive whole number of steps, got {steps!r}")
    if guidance is not None and not (number(guidance) and math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"{name('guidance')} must be a finite number >= 0 (1: no guidance), got {guidance!r}")
    if guidance_parallel is not None and not (number(guidance_parallel) and 0 <= guidance_parallel <= 1):
        raise ValueError(f"{name('guidance_parallel')} must be in [0, 1] (1: plain guidance, 0: projected), "
                         f"got {guidance_parallel!r}")
    if shift is not None and not (number(shift) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"{name('shift')} must be a positive finite number (1: no shift), got {shift!r}")
    if not (number(cache_threshold) and cache_threshold >= 0):
        raise ValueError(f"{name('cache_threshold')} must be a number >= 0 (0: no cache), got {cache_threshold!r}")
    if strength is not None and not (number(strength) and 0 < strength <= 1):
        raise ValueError(f"{name('strength')} must be in (0, 1] (near 0 keeps the video, 1 ignores it), "
                         f"got {strength!r}")


def check_parts(folder: str, index: dict, given=()):
    """Refuse a pipeline folder with a part missing or damaged, before diffusers loads it, in one line naming the
    file: each part that model_index.json `index` names (but those `given` as objects) needs its folder and config;
    a model, its safetensors weights (one file, or an index and every shard it names), readable; a diffusers model,
    weights that fit its config (the names and shapes of the model the config builds: diffusers only warns of
    weights left over, and samples with a model short of them). OSError for a missing or damaged file, ValueError
    for weights that do not fit."""
    from accelerate import init_empty_weights
    from diffusers import ModelMixin

    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or None in entry or name in given:
            continue
        try:
            cls = getattr(importlib.import_module(entry[0]), entry[1])
        except (ImportError, AttributeError):
            continue  # diffusers says that it cannot find the class
        part = os.path.join(folder, name)
        if not os.path.isdir(part):
            raise FileNotFoundError(f"{folder}: {name}/ is missing (model_index.json names it, a {entry[1]}); copy "
                                    f"the whole pipeline folder again")
        config = getattr(cls, "config_name", None) or ("config.json" if issubclass(cls, torch.nn.Module) else None)
        if config and not os.path.isfile(os.path.join(part, config)):
            raise FileNotFoundError(f"{folder}: {name}/{config} is missing; copy the whole pipeline folder again")
        for file in sorted(f for f in os.listdir(part) if f.endswith(".json")):  # configs, tokenizer.json, ...
            try:
                with open(os.path.join(part, file), encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise OSError(f"{folder}: {name}/{file} is damaged (not JSON: {e}); copy it again") from None
        if hasattr(cls, "all_special_tokens") and hasattr(cls, "from_pretrained"):  # a transformers tokenizer
            tok = cls.from_pretrained(part)  # without its vocabulary file, transformers makes an empty one, silently
            if len(tok) <= len(set(tok.all_special_tokens)):
                raise OSError(f"{folder}: {name}/ has no vocabulary ({len(tok)} tokens, all special): its vocabulary "
                              f"file (tokenizer.json, vocab.txt, ...) is missing; copy the whole pipeline folder again")
        if not issubclass(cls, torch.nn.Module) or any(f.endswith(".bin") for f in os.listdir(part)):
            continue  # a scheduler or tokenizer; or pickled weights, which diffusers reads itself
        shapes = _weight_shapes(folder, name, "diffusion_pytorch_model" if issubclass(cls, ModelMixin) else "model")
        if not issubclass(cls, ModelMixin):
            continue
        with init_empty_weights():
            model = cls.from_config(cls.load_config(part))
        want = {k: list(v.shape) for k, v in model.state_dict().items()}
        both = sorted(want.keys() & shapes.keys())
        differ = [f"{k} {shapes[k]}, not {want[k]}" for k in both if want[k] != shapes[k]]
        odd = [what.format(len(keys)) + f" ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})" for what, keys in
               (("{} weights the config's model lacks", sorted(shapes.keys() - want.keys())),
                ("the config's model has {} weights they lack", sorted(want.keys() - shapes.keys())),
                ("{} weights of another shape than the config's", differ)) if keys]
        if odd:
            raise ValueError(f"{folder}: the {name} weights do not fit {name}/{config}: {'; '.join(odd)}; keep each "
                             f"part's weights with the config they were saved with")


def _weight_shapes(folder: str, name: str, stem: str) -> dict:
    """{key: shape} of the safetensors weights of part `name` (files `stem`.safetensors, or `stem`.safetensors
    .index.json and its shards); a one-line OSError naming a file that is missing or cannot be read."""
    from safetensors import SafetensorError, safe_open

    part, index = os.path.join(folder, name), stem + ".safetensors.index.json"
    files, named = [stem + ".safetensors"], ""
    if os.path.isfile(os.path.join(part, index)):
        with open(os.path.join(part, index)) as f:
            files, named = sorted(set(json.load(f)["weight_map"].values())), f" ({index} names it)"
    shapes = {}
    for file in files:
        if not os.path.isfile(os.path.join(part, file)):
            raise FileNotFoundError(f"{folder}: {name}/{file} is missing{named}; copy the whole pipeline folder again")
        try:
            with safe_open(os.path.join(part, file), "pt") as f:
                shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        except SafetensorError as e:
            raise OSError(f"{folder}: {name}/{file} is damaged ({e}): a download or copy cut short? copy it again") \
                from None
    return shapes


class VideoDiTPipeline(DiffusionPipeline):
    # No model_cpu_offload_seq: diffusers' hooks catch forward() only, and the VAE runs through decode_latents().
    # enable_offload() below moves each part to the accelerator while it runs.

    def __init__(self, vae, transformer, text_encoder, tokenizer, scheduler, max_text_length: int = 64,
                 base_tokens: int = 256, default_steps: int = 30, default_guidance: float = 5.0,
                 default_guidance_parallel: float = 1.0, text_encoder_package: str | None = None,
                 image_first: bool = False, shared_noise: float = 0.0, default_size: list[int] | tuple = (17, 64, 64),
                 default_fps: float = 8.0, default_shift: float | None = None):
        super().__init__()
        self.register_modules(vae=vae, transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler)
        # how the checkpoint was trained and is best sampled: saved in model_index.json. text_encoder_package:
        # a text encoder installed as a package (videodit.text backend "minilm"), which a folder need not hold;
        # image_first: text-to-video draws the first frame as an image, then animates it (see __call__);
        # shared_noise: the share of a clip's starting noise common to its frames, as it trained (flow.draw_noise);
        # default_size, default_fps: the (frames, height, width) and frame rate it trained at; default_shift: the
        # time shift it trained with where that was fixed (flow.shift), None where it went by resolution
        self.register_to_config(max_text_length=max_text_length, base_tokens=base_tokens, default_steps=default_steps,
                                default_guidance=default_guidance, default_guidance_parallel=default_guidance_parallel,
                                text_encoder_package=text_encoder_package, image_first=image_first,
                                shared_noise=shared_noise, default_size=list(default_size), default_fps=default_fps,
                                default_shift=default_shift)
        self.offload_device = None  # see enable_offload
        self.cfg_group = None  # see set_cfg_parallel

    @classmethod
    def from_pretrained(cls, path, **kwargs):
        """diffusers' loader, for a folder or a hub id (downloaded, or from the hub cache); a pipeline saved without
        its text encoder (model_index.json names none, see save_lean) takes it from the package that the index
        names. A part missing or damaged, or weights that do not fit their config, fail first in one line naming
        the file (check_parts). Weights load as float32 unless `dtype` says otherwise."""
        folder = os.fspath(path)
        if not os.path.isdir(folder) and (os.path.isabs(folder) or folder.startswith(".") or os.path.exists(folder)):
            raise OSError(f"{folder} is not a folder: a pipeline is a folder with model_index.json (or a hub id, "
                          f"namespace/name)")
        if not os.path.isdir(folder):  # a hub id: its snapshot in the cache, downloaded if need be
            hub = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
            folder = cls.download(folder, **{k: kwargs[k] for k in hub if k in kwargs})
        index = cls.load_config(folder)
        package = index.get("text_encoder_package")
        if package and (index.get("text_encoder") or [None])[0] is None and "text_encoder" not in kwargs:
            enc = load_text_encoder(package)
            kwargs.update(text_encoder=enc.model, tokenizer=enc.tokenizer)
        if "variant" not in kwargs:  # a variant's weights have other file names
            check_parts(folder, index, given=kwargs)
        if "torch_dtype" not in kwargs:  # diffusers' older name for it
            kwargs.setdefault("dtype", torch.float32)
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=os.fspath(path))
        return pipe

    def save_lean(self, out: str, package: str = "minilm", dtype=torch.float16):
        """Save for shipping: the denoiser in `dtype`, the VAE in float32, and no text encoder (it comes from the
        package `package` at load time, so the pipeline's text encoder must be that package's model). The pipeline
        itself is left as it was."""
        if self.text_encoder is not None:
            enc, own = load_text_encoder(package).model, self.text_encoder.state_dict()
            theirs = enc.state_dict()
            if type(enc) is not type(self.text_encoder) or own.keys() != theirs.keys() or not all(
                    torch.equal(own[k].cpu(), v.to(own[k].dtype)) for k, v in theirs.items()):
                raise ValueError(f"save_lean: this pipeline's text encoder ({type(self.text_encoder).__name__}) is "
                                 f"not the {package!r} package's model, which a lean folder loads in its place; save "
                                 f"it whole with save_pretrained")
        transformer = copy.deepcopy(self.transformer)
        torch.nn.Module.to(transformer, dtype)  # (diffusers' to() warns of float32 modules the model has none of)
        init = {k: self.config[k] for k in self._get_signature_keys(self)[1] if k in self.config}
        init["text_encoder_package"] = package
        lean = type(self)(self.vae, transformer, None, None, self.scheduler, **init)
        lean._optional_components = ["text_encoder", "tokenizer"]  # left out of the index without a warning
        lean.save_pretrained(out)
        for name in ("text_encoder", "tokenizer"):  # an earlier whole save's: loading would take them for parts
            shutil.rmtree(os.path.join(out, name), ignore_errors=True)

    def load_lora(self, path: str, scale: float = 1.0):
        """Merge the LoRA adapters in `path` (a LoRA run's <output_dir>/lora) into the denoiser at `scale` times the
        strength they trained at; call again for more. The adapters must come from a run on this denoiser."""
        from .train.lora import merge_lora

        self.register_modules(transformer=merge_lora(self.transformer, path, scale))
        return self

    def enable_model_cpu_offload(self, *args, **kwargs):
        raise NotImplementedError("this pipeline offloads with enable_offload(device) (diffusers' hooks would catch "
                                  "forward() only, and the VAE runs through decode_latents())")

    def enable_offload(self, device="cuda"):
        """Keep the text encoder, denoiser and VAE in CPU memory and move each to `device` only while it runs: the
        accelerator holds the largest part and its activations, never all three."""
        self.offload_device = torch.device(device)
        self.to("cpu")

    def set_cfg_parallel(self, group):
        """Share guidance's two passes with the other rank of `group` (two ranks, which call the pipeline with the
        same arguments and generators): each runs the denoiser on half the samples. None turns it off."""
        if group is not None and guidance_distilled(self.transformer):
            raise ValueError("this checkpoint has guidance distilled into it: one denoiser pass a step, nothing for "
                             "--cfg-parallel to share; leave it out")
        size = None if group is None else torch.distributed.get_world_size(group)
        if size not in (None, 2):
            raise ValueError(f"guidance's two passes go to a group of 2 ranks, got {size}")
        self.cfg_group = group

    @contextlib.contextmanager
    def on_device(self, module):
        """With offload: `module` on the offload device for the duration of the block, then back to the CPU."""
        if self.offload_device is None:
            yield
            return
        module.to(self.offload_device)
        try:
            yield
        finally:
            module.to("cpu")

    # -- parts ---------------------------------------------------------------------------------------------------

    @property
    def video_vae(self):
        """The VAE behind the project's interface (encode_latents, decode_latents, ft, fs, valid_size)."""
        return self.vae if isinstance(self.vae, CausalVideoVAE) else PretrainedVideoVAE(self.vae)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.video_vae.ft, self.video_vae.fs, self.transformer.patch_size)

    def valid_size(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """The nearest (T, H, W) the VAE and the patchifier take: T = 1 + ft*k, H and W multiples of fs*patch, each
        rounded once from the value asked, ties up (as the VAE's valid_size)."""
        return self.geometry.snap(T, H, W)

    def resolve_size(self, num_frames: int | None = None, height: int | None = None, width: int | None = None,
                     like: tuple[int, int] | None = None, connect: bool = False,
                     extend: bool = False) -> tuple[int, int, int]:
        """The valid (T, H, W) to sample: the values given, the rest from the checkpoint's default_size. With
        neither height nor width, the frame takes the aspect of `like` (an input image's or video's (h, w)) at the
        default's area, or is the default; with one of them, the other follows that aspect. connect: T counts the
        new frames between the two clips, whole latent frames of ft (at least one). extend: T counts the new frames
        before or after the clip, any number."""
        T0, H0, W0 = self.config.default_size
        h, w = like or (H0, W0)
        if height is None and width is None:
            height, width = self.geometry.resize(h, w, H0 * W0) if like else (H0, W0)
        elif height is None:
            height = round(width * h / w)
        elif width is None:
            width = round(height * w / h)
        T = T0 if num_frames is None else num_frames
        if connect or extend:
            ft = self.video_vae.ft
            new = ft * max(1, math.floor(T / ft + 0.5))  # whole latent frames; ties go up, as valid_size's
            return (new if connect else T, *self.valid_size(1, height, width)[1:])
        return self.valid_size(T, height, width)

    def encode_prompt(self, prompts: list[str]):
        device = self.offload_device or self.transformer.device
        with self.on_device(self.text_encoder):
            emb, mask = encode_with(self.text_encoder, self.tokenizer, prompts, self.config.max_text_length, device)
        return emb.to(device, self.transformer.dtype), mask.to(device)

    @torch.no_grad()
    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """(3, T, H, W) pixels in [-1, 1] -> normalized latents (C, T', H', W')."""
        vae = self.video_vae
        with self.on_device(self.vae):
            return vae.encode_latents(video[None].to(self.vae.device, self.vae.dtype))[0].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(C, T', H', W') -> (3, T, H, W) in [-1, 1]. The causal VAE decodes streaming (one latent frame a step)."""
        with self.on_device(self.vae):
            return self.video_vae.decode_latents(latents[None].to(self.vae.device))[0].float().clamp(-1, 1)

    def held_latent(self, frame: torch.Tensor) -> torch.Tensor:
        """The latent frame of a group of ft copies of `frame` (3, H, W) following it: how a clip ends on it."""
        ft = self.video_vae.ft
        still = frame[:, None].expand(-1, 1 + ft, -1, -1)
        return self.encode_video(still)[:, 1]

    # -- the call --------------------------------------------------------------------------------------------------

    def sampling_defaults(self, steps: int | None = None, guidance: float | None = None,
                          guidance_parallel: float | None = None, negative_prompt=None) -> tuple[int, float, float]:
        """The steps, guidance scale and guidance_parallel a call runs with: those given, else the checkpoint's.
        A guidance-distilled checkpoint refuses a negative prompt or another guidance_parallel than its own."""
        negs = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt or [])
        if any(negs) and guidance_distilled(self.transformer):
            raise ValueError("this checkpoint has guidance distilled into it (one pass a step, steered away from the "
                             "negative prompt it was distilled with); it takes no negative prompt")
        steps = self.config.default_steps if steps is None else steps
        guidance = self.config.default_guidance if guidance is None else guidance
        own = self.config.get("default_guidance_parallel", 1.0)
        guidance_parallel = own if guidance_parallel is None else guidance_parallel
        check_sampling(steps, guidance, guidance_parallel)
        if guidance_distilled(self.transformer) and guidance_parallel != own:
            raise ValueError(f"this checkpoint has guidance distilled into it with guidance_parallel {own:g}, which "
                             f"sampling cannot change; leave guidance_parallel out")
        return steps, guidance, guidance_parallel

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt: str | list | None = None, height=None, width=None, num_frames=None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 guidance_parallel: float | None = None, generator=None, sampler: str = "euler",
                 shift: float | None = None, image: torch.Tensor | None = None, video: torch.Tensor | None = None,
                 extend: str | None = None, loop: bool = False, strength: float | None = None,
                 connect: tuple | None = None, image_first: bool | None = None, cache_threshold: float = 0.0,
                 output_type: str = "np", progress: bool = True) -> VideoDiTOutput:
        """prompt: a string or a list (one video each). height, width, num_frames: one value for all, or a list per
        prompt (different sizes sample together as one packed batch); they are rounded to valid sizes. Left out
        (None), they come from resolve_size: the checkpoint's default_size, with an image, video or connect the
        input's aspect at the default's area, and with strength (SDEdit) the video's own length.
        image, video, connect: pixels (3, T, H, W) in [-1, 1] (an image has T = 1; (3, H, W), a PIL image or uint8
        frames (H, W, 3) / (T, H, W, 3) are taken too), resized and centre-cropped to the size sampled; one for all
        prompts, or a list of one per prompt (for connect, of (video_a, video_b) pairs).
        generator: one torch.Generator for the batch, or a list of one per prompt (each video then depends on its own
        generator only, whatever else is in the batch).
        output_type: "np" (uint8 frames), "pt" (float pixels) or "latent": the normalized latents (C, T', H', W') as
        sampled, undecoded, with any held conditioning frames (loop, connect, extend) still in them.
        guidance_parallel (None: the checkpoint's `default_guidance_parallel`): 1 is plain classifier-free guidance,
        0 drops the guidance term's part along the clean estimate (projected guidance, videodit.flow.guide), which keeps
        small objects in frame at strong guidance.
        image_first (None: the checkpoint's `image_first`): text-to-video in two passes, as Emu Video factorizes it:
        the prompt's first frame is drawn as an image, then animated from it (image-to-video, same prompt). From a
        given first frame a model learns to follow the motion word far sooner than in one pass, where the layout
        comes from the starting noise and the motion follows the layout (README, Training).
        A guidance-distilled checkpoint (train with distill.teacher, README Training) gives the guided velocity at
        guidance_scale in one denoiser pass a step; its negative prompt and guidance_parallel are those it was
        distilled with.
        cache_threshold: 0 runs every block at every step; above 0, a first-block cache (videodit.dit.StepCache)
        skips the denoiser's later blocks at steps where the first block's residual changed by less than this share
        since the last full step: faster, at some cost in fidelity (README, Sampling).
        sampler ("euler" or "unipc") and shift (None: the checkpoint's default_shift, else by resolution) decide the
        steps: the pipeline's `scheduler` component is kept for diffusers' folder layout and not used.
        progress: the sampling's progress bar (also off after set_progress_bar_config(disable=True))."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        B = len(prompts)
        progress = progress and not getattr(self, "_progress_bar_config", {}).get("disable", False)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")

        for name, v in (("num_frames", num_frames), ("height", height), ("width", width)):
            if any(x is not None and (not isinstance(x, numbers.Integral) or x < 1) for x in _per(v, name, B)):
                raise ValueError(f"{name} must be positive integers (one, or a list of one per prompt), got {v!r}")
        if isinstance(negative_prompt, (list, tuple)):  # None in a list: no negative prompt for that one
            negative_prompt = [n or "" for n in negative_prompt]
        if not all(n is None or isinstance(n, str) for n in _per(negative_prompt, "negative_prompt", B)):
            raise ValueError(f"negative_prompt must be a string or a list of one per prompt, got "
                             f"{negative_prompt!r:.80}")
        if not all(g is None or isinstance(g, torch.Generator) for g in _per(generator, "generator", B)):
            raise ValueError(f"generator must be a torch.Generator or a list of one per prompt (a seed s: "
                             f"torch.Generator().manual_seed(s)), got {generator!r:.80}")
        if output_type not in ("np", "pt", "latent"):
            raise ValueError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        check_sampling(num_inference_steps, guidance_scale, guidance_parallel, shift, cache_threshold, strength)
        if video is not None and extend is None and strength is None:
            raise ValueError("video needs extend='forward' or 'backward' (extend it) or strength= (SDEdit)")
        image, video, connect = (_per_prompt(x, name, B) for x, name in ((image, "image"), (video, "video"),
                                                                         (connect, "connect")))
        num_inference_steps, guidance_scale, guidance_parallel = self.sampling_defaults(
            num_inference_steps, guidance_scale, guidance_parallel, negative_prompt)
        shift = self.config.get("default_shift") if shift is None else shift
        # the sampling settings, as the passes that draw first frames (image_first, loop) take them too
        run = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   guidance_parallel=guidance_parallel, generator=generator, sampler=sampler, shift=shift,
                   cache_threshold=cache_threshold, progress=progress)
        refs = image or video or [pair[0] for pair in connect or []] or [None] * B  # each output takes its aspect
        if strength is not None and video is not None and num_frames is None:  # SDEdit: the whole clip
            num_frames = [self.geometry.frames(v.shape[1], v.shape[1]) for v in video]
        sizes = [self.resolve_size(t, h, w, None if r is None else tuple(r.shape[-2:]), connect is not None,
                                   extend is not None and video is not None)
                 for t, h, w, r in zip(_per(num_frames, "num_frames", B), _per(height, "height", B),
                                       _per(width, "width", B), refs)]
        if strength is not None and video is not None:  # SDEdit: no more frames than the clip has
            sizes = [(self.geometry.frames(v.shape[1], t), h, w) for (t, h, w), v in zip(sizes, video)]
        vae = self.video_vae
        C = vae.denoiser_channels
        if self.transformer.config.in_channels != C:
            raise ValueError(f"the denoiser takes {self.transformer.config.in_channels} latent channels but the VAE "
                             f"gives {C} (its used channels); pair the denoiser with the VAE it was trained on")
        shapes = [(C, 1 + (t - 1) // vae.ft, h // vae.fs, w // vae.fs) for t, h, w in sizes]

        # conditioning: per sample, clean latents and the mask of latent frames held at them
        cond_latents, cond_masks, init, trim = None, None, None, [(0, 0)] * B
        modes = [m for m, on in (("image", image is not None), ("extend", extend is not None), ("loop", loop),
                                 ("strength", strength is not None), ("connect", connect is not None)) if on]
        if loop and image is not None:  # a loop that starts and ends on the image
            modes.remove("image")
        if len(modes) > 1:
            raise ValueError(f"choose one conditioning mode at a time, got {modes}")
        if image_first is None:
            image_first = self.config.get("image_first", False)
        if image_first and not modes and any(t > 1 for t, _, _ in sizes):
            cond_latents, cond_masks = self._first_frames(prompts, negative_prompt, sizes, shapes, run)
        if modes:
            mode = modes[0]
            if mode == "strength" and video is None:
                raise ValueError("strength (SDEdit) needs a video to edit")
            if mode == "extend" and (video is None or extend not in ("forward", "backward")):
                raise ValueError("extend needs a video and the direction 'forward' or 'backward'")
            shapes = self._mode_shapes(mode, shapes, sizes, video, extend)
            cond_latents, cond_masks, init, trim = self._conditioning(mode, shapes, sizes, image, video, extend,
                                                                      connect, prompts, negative_prompt, run)

        text, mask = self.encode_prompt(prompts)
        null_text = null_mask = None
        if guidance_scale != 1.0 and not guidance_distilled(self.transformer):
            negs = _per(negative_prompt or "", "negative_prompt", B)
            null_text, null_mask = self.encode_prompt(negs if len(set(negs)) > 1 else negs[:1])
        cache = StepCache(cache_threshold, self.cfg_group) if cache_threshold > 0 else None
        with self.on_device(self.transformer):
            latents = sample(self.transformer, shapes, text, mask, null_text, null_mask, guidance=guidance_scale,
                             guidance_parallel=guidance_parallel, shared_noise=self.config.get("shared_noise", 0.0),
                             steps=num_inference_steps, shift=shift, base_tokens=self.config.base_tokens,
                             sampler=sampler, cond_latents=cond_latents, cond_masks=cond_masks, init_latents=init,
                             generator=generator, progress=progress, strength=1.0 if strength is None else strength,
                             cfg_group=self.cfg_group, cache=cache)
        skipped = cache.skipped if cache else 0
        if output_type == "latent":
            return VideoDiTOutput(frames=latents, sizes=sizes, skipped_steps=skipped)
        videos = []
        for z, (head, tail) in zip(latents, trim):
            v = self.decode(z)
            videos.append(v[:, head:v.shape[1] - tail])
        sizes = [(v.shape[1], *s[1:]) for v, s in zip(videos, sizes)]
        if output_type == "np":
            videos = [to_uint8(v) for v in videos]
        return VideoDiTOutput(frames=videos, sizes=sizes, skipped_steps=skipped)

    def _mode_shapes(self, mode, shapes, sizes, video, extend):
        """The latent shapes a conditioning mode samples for videos of `sizes`: the new frames and the held ones."""
        ft = self.video_vae.ft
        if mode == "loop":  # one more latent frame: the held one is trimmed
            return [(c, t + 1, h, w) for c, t, h, w in shapes]
        if mode == "connect":  # a's last frame, T / ft new latent frames, b's first frame held (both trimmed)
            return [(c, T // ft + 2, h, w) for (c, _, h, w), (T, _, _) in zip(shapes, sizes)]
        if mode == "extend" and extend == "backward":  # whole latent frames for T new frames, then the held one
            return [(c, 2 - (1 - T) // ft, h, w) for (c, _, h, w), (T, _, _) in zip(shapes, sizes)]
        if mode == "extend":  # after k latent frames of context, m new: T new frames (the surplus trimmed)
            m = [-(-T // ft) for T, _, _ in sizes]
            return [(c, 1 + min(mi, (v.shape[1] - 1) // ft) + mi, h, w)
                    for (c, _, h, w), mi, v in zip(shapes, m, video)]
        return shapes

    def _first_frames(self, prompts, negative_prompt, sizes, shapes, run):
        """image_first's first pass: every prompt drawn as an image; each sample's latents with it as the first
        frame, and the masks holding it (an image asked for keeps the first pass whole)."""
        firsts = self._draw_images(prompts, negative_prompt, sizes, run)
        lat, masks = [], []
        for (C, Tl, h, w), first in zip(shapes, firsts):
            z = torch.zeros(C, Tl, h, w)
            z[:, :1] = first
            lat.append(z)
            masks.append(cond_frames(Tl, "first") if Tl > 1 else torch.ones(1, dtype=torch.bool))
        return lat, masks

    def _draw_images(self, prompts, negative_prompt, sizes, run):
        """Each prompt drawn as an image at its sample's size: a list of its latents (C, 1, h, w)."""
        return self(prompts, negative_prompt, [h for _, h, _ in sizes], [w for _, _, w in sizes], 1,
                    image_first=False, output_type="latent", **run).frames

    def _conditioning(self, mode, shapes, sizes, images, videos, extend, connects, prompts, negative_prompt, run):
        """Per sample (its own image, video or connect pair): clean latents, the mask of latent frames held at them,
        and (head, tail) pixel frames to trim from the decoded result; or, for SDEdit, the initial latents."""
        ft = self.video_vae.ft
        lat, masks, trim = [], [], []
        if mode == "loop" and images is None:  # a first pass draws each sample's first frame; the clip ends on it
            firsts = self._draw_images(prompts, negative_prompt, sizes, run)
        for i, ((C, Tl, h, w), (T, H, W)) in enumerate(zip(shapes, sizes)):
            image, video, connect = (x and x[i] for x in (images, videos, connects))
            z = torch.zeros(C, Tl, h, w)
            if mode == "strength":  # SDEdit starts from the clip's latents
                lat.append(self.encode_video(_fit(video, H, W)[:, :T]))
                continue
            if mode == "image":  # the image is the first frame (an image asked for: the image)
                z[:, :1] = self.encode_video(_fit(image[:, :1], H, W))
                m, cut = cond_frames(Tl, "first") if Tl > 1 else torch.ones(1, dtype=torch.bool), (0, 0)
            elif mode == "extend" and extend == "forward":  # the clip's last 1 + ft*k frames, then T new ones
                new = -(-T // ft)
                k = Tl - 1 - new  # as many frames of context as new ones, as far as the clip has them
                z[:, :k + 1] = self.encode_video(_fit(video, H, W)[:, -(1 + ft * k):])
                m, cut = cond_frames(Tl, "first_k", k + 1), (1 + ft * k, ft * new - T)  # keep only the new frames
            elif mode == "extend":  # backward: the new clip ends on the given clip's first frame
                z[:, -1] = self.held_latent(_fit(video, H, W)[:, 0])
                m, cut = cond_frames(Tl, "last"), (1 + ft * (Tl - 2) - T, ft)
            elif mode == "connect":  # from the end of a to the start of b
                a, b = (_fit(v, H, W) for v in connect)
                z[:, :1] = self.encode_video(a[:, -1:])
                z[:, -1] = self.held_latent(b[:, 0])
                m, cut = cond_frames(Tl, "first_last"), (1, ft)
            else:  # loop, from the image or the drawn first frame back to it
                frame = _fit(image[:, :1], H, W) if image is not None else self.decode(firsts[i])
                z[:, :1] = self.encode_video(frame) if image is not None else firsts[i]
                z[:, -1] = self.held_latent(frame[:, 0])
                m, cut = cond_frames(Tl, "first_last"), (0, ft)
            lat.append(z)
            masks.append(m)
            trim.append(cut)
        if mode == "strength":
            return None, None, lat, [(0, 0)] * len(shapes)
        return lat, masks, None, trim


def _per(v, name: str, B: int, is_list=lambda v: isinstance(v, (list, tuple))) -> list:
    """One value for all B prompts, or a list (is_list) of one per prompt, as a list of B values."""
    if not is_list(v):
        return [v] * B
    if len(v) != B:
        raise ValueError(f"{name} has {len(v)} values for {B} prompts; give one, or one per prompt")
    return list(v)


def _per_prompt(x, name: str, B: int) -> list | None:
    """An image, video or connect pair (two videos) for each of B prompts, as pixels (_as_clip): one serves every
    prompt; a list (of pairs, for connect) gives one a prompt. None stays None."""
    if x is None:
        return None
    pair = name == "connect"
    items = _per(x, name, B, lambda v: isinstance(v, (list, tuple)) and (not pair or all(
        isinstance(c, (list, tuple)) for c in v)))
    done = {}  # one input shared by the prompts is converted once
    for v in items:
        if pair and (not isinstance(v, (list, tuple)) or len(v) != 2):
            got = len(v) if isinstance(v, (list, tuple)) else type(v).__name__
            raise ValueError(f"connect takes two videos (video_a, video_b), or a list of such pairs, got {got}")
        if id(v) not in done:
            done[id(v)] = tuple(_as_clip(c, name) for c in v) if pair else _as_clip(v, name)
    return [done[id(v)] for v in items]


def _as_clip(x, name: str) -> torch.Tensor:
    """An image or video input as pixels (3, T, H, W) in [-1, 1]: such a tensor, a (3, H, W) tensor, a PIL image, or
    uint8 frames (H, W, 3) or (T, H, W, 3)."""
    if hasattr(x, "convert") and hasattr(x, "size"):  # a PIL image
        x = np.array(upright_rgb(x))
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim in (3, 4) and x.shape[-1] == 3 and x.size:
        return from_uint8(x if x.ndim == 4 else x[None])
    if isinstance(x, torch.Tensor) and x.dtype == torch.uint8 and x.ndim in (3, 4) and x.shape[-1] == 3 and x.numel():
        return from_uint8(x.cpu().numpy() if x.ndim == 4 else x[None].cpu().numpy())  # frames as decord gives them
    if isinstance(x, torch.Tensor) and x.ndim in (3, 4) and x.shape[0] == 3 and x.numel():
        x = x if x.ndim == 4 else x[:, None]
        if x.dtype == torch.uint8:  # (3, T, H, W) in 0..255
            return x.float() / 127.5 - 1
        if not x.is_floating_point():
            raise ValueError(f"{name}: pixels are floats in [-1, 1] or uint8 in 0..255, got {x.dtype}")
        low, high = x.min().item(), x.max().item()
        if not (math.isfinite(low) and math.isfinite(high)) or low < -1.01 or high > 1.01:
            raise ValueError(f"{name}: pixels must lie in [-1, 1], got values from {low:g} to {high:g} (0..255 "
                             f"frames: pass them as uint8, or x / 127.5 - 1)")
        if low >= 0 and high > 0.05:
            warnings.warn(f"{name}: every pixel is in [0, 1]; pixels are read in [-1, 1] (from [0, 1]: x * 2 - 1)",
                          stacklevel=3)
        return x
    got = f"{tuple(x.shape)} {x.dtype}" if hasattr(x, "shape") else type(x).__name__
    raise ValueError(f"{name} must be pixels (3, T, H, W) or (3, H, W) as a tensor in [-1, 1], a PIL image, or uint8 "
                     f"frames (H, W, 3) / (T, H, W, 3); got {got}")


def _fit(video: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Resize (3, T, h, w) pixels to cover (H, W) keeping the aspect, and centre-crop."""
    if video.shape[-2:] == (H, W):
        return video
    frames = ((video.float() + 1) * 127.5).permute(1, 2, 3, 0)  # (T, h, w, 3) in [0, 255]
    return resize_crop(frames, H, W)
