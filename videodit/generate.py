"""The main job: sample videos from prompts (`python sample.py ...`). Every user error ends in one clear line and a
non-zero exit, never a traceback.

Under torchrun (`torchrun --nproc_per_node N sample.py ...`) the processes split into blocks that each sample their
share of the prompts (data parallel). Within a block every video's tokens are split over `--sequence-parallel` S
ranks (Ulysses, videodit.parallel), and with `--cfg-parallel` guidance's two passes run on two such groups: S x 2
ranks. The block's first rank decodes and writes. Prompt i samples with seed + i wherever it runs, so the videos are
those of one process."""

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from videodit.flow import guidance_distilled

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "shapes-tiny")


class UserError(Exception):
    pass


def png_error(path: str, frames: int | None = None, clip: bool = False) -> UserError:
    if clip:  # --extend, --connect: the input clip(s) are written with the new frames
        held = f"{frames} frames" if frames else "several frames"
        return UserError(f"--output {path}: a .png holds one frame, but the result has {held} (the input clip and the "
                         f"new frames); use .mp4 or .gif")
    return UserError(f"--output {path}: a .png holds one frame; use --num-frames 1, or .mp4 / .gif")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sample.py", description="Generate videos (or images) from text prompts.")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompt-file", help="a text file with one prompt a line, or JSON lines (.jsonl) with "
                   "{\"prompt\": ...} and, for a mode, each prompt's own \"image\", \"video\" or \"connect\" "
                   "([VID_A, VID_B]); paths relative to the file's folder")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (guidance)")
    p.add_argument("--height", type=int, help="default: the checkpoint's; with --image, --video or --connect, the "
                   "input's aspect ratio at the checkpoint's area (one of --height, --width: the other follows it)")
    p.add_argument("--width", type=int)
    p.add_argument("--num-frames", type=int, help="frames per video, 1 makes an image; with --extend or --connect, "
                   "the frames added (default: the checkpoint's; SDEdit: the whole --video)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale; 1 turns it off")
    p.add_argument("--guidance-parallel", type=float, default=None,
                   help="weight of the guidance term's part along the clean estimate: 1 plain guidance, 0 projected "
                        "(keeps small objects at strong guidance; default: the checkpoint's)")
    p.add_argument("--sampler", choices=["euler", "unipc"], default="euler")
    p.add_argument("--shift", type=float, default=None,
                   help="timestep shift (default: the checkpoint's, as it trained: fixed or by resolution)")
    p.add_argument("--cache-threshold", type=float, default=0.0, metavar="T",
                   help="skip the denoiser's later blocks at steps where its first block's output changed by less "
                        "than T (first-block cache): faster, less faithful; 0 (default) runs every block")
    p.add_argument("--seed", type=int, default=0, help="prompt i (from 0) samples with seed + i: any video comes "
                   "again alone with --prompt ... --seed SEED+i")
    p.add_argument("--batch-size", type=int, default=4, help="prompts sampled together (one packed batch)")
    p.add_argument("--fps", type=float, help="frame rate of the output and of reading input videos (default: the "
                   "checkpoint's)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a pipeline folder (default: the shipped model)")
    p.add_argument("--lora", action="append", default=[], metavar="DIR",
                   help="LoRA adapters (a LoRA run's <output_dir>/lora) merged into the checkpoint's denoiser; "
                        "repeat for several")
    p.add_argument("--lora-scale", type=float, action="append", default=[], metavar="S",
                   help="strength of each --lora, in their order (one value: all; default 1)")
    p.add_argument("--output", help="output file for one prompt: .mp4, .gif, or .png when --num-frames 1")
    p.add_argument("--output-dir", help="output folder for several prompts: 000.mp4, 001.mp4, ... and prompts.jsonl "
                   "(neither --output nor --output-dir: the videos go to the current folder)")
    p.add_argument("--image", help="animate this image from its first frame")
    p.add_argument("--video", help="a video to extend (--extend) or edit (--strength)")
    p.add_argument("--extend", choices=["forward", "backward"],
                   help="continue --video after its end or before its start")
    p.add_argument("--strength", type=float, help="SDEdit --video, in (0, 1]: near 0 keeps it, 1 ignores it")
    p.add_argument("--loop", action="store_true", help="make a seamless loop (with --image: through that image)")
    p.add_argument("--connect", nargs=2, metavar=("VID_A", "VID_B"),
                   help="a transition from VID_A's end to VID_B's start")
    p.add_argument("--image-first", action=argparse.BooleanOptionalAction, default=None,
                   help="text-to-video in two passes: draw the first frame, then animate it "
                        "(default: the checkpoint's)")
    p.add_argument("--upsample-prompt", action="store_true", help="rewrite short prompts as detailed captions first")
    p.add_argument("--upsampler-model", help="a causal LM (folder or hub id) for --upsample-prompt; default: rules")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--offload", action="store_true", help="keep the text encoder, denoiser and VAE in CPU memory, each "
                   "on the GPU only while it runs (less GPU memory, slower)")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="S",
                   help="under torchrun: split each video's tokens over S processes (S divides the processes and the "
                        "model's heads); groups of S processes share out the prompts")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="under torchrun: guidance's two passes (prompt, negative prompt) on two processes")
    p.add_argument("--verbose", action="store_true", help="print timings and peak memory")
    return p.parse_args(argv)


@dataclasses.dataclass
class Ranks:
    """This process's place in a run: one process alone, or one of torchrun's. Blocks of `per_group` consecutive
    ranks sample the same videos, block `dp_rank` of `dp_size` its share of the prompts. Within a block, `group`
    (None: none) is this rank's sequence-parallel group and `cfg_group` its partner in guidance's two passes."""
    rank: int = 0
    world: int = 1
    per_group: int = 1
    group: object = None
    cfg_group: object = None

    @property
    def dp_rank(self) -> int:
        return self.rank // self.per_group

    @property
    def dp_size(self) -> int:
        return self.world // self.per_group

    @property
    def main(self) -> bool:  # prints notes, shows progress
        return self.rank == 0

    @property
    def writer(self) -> bool:  # decodes and writes its block's videos
        return self.rank % self.per_group == 0

    def share(self, n: int) -> range:
        """The indices of this block's prompts out of n: contiguous, the blocks' shares differing by at most one."""
        return range(self.dp_rank * n // self.dp_size, (self.dp_rank + 1) * n // self.dp_size)


def setup(a) -> tuple[str, Ranks]:
    """The device, and under torchrun (WORLD_SIZE > 1) the process group (NCCL on GPUs, gloo on CPUs) and this
    rank's groups: blocks of S x 2 ranks (S x 1 without --cfg-parallel), a block's sequence-parallel groups its
    consecutive runs of S ranks, and its guidance pairs ranks j and S + j. Each process takes the GPU of its
    LOCAL_RANK."""
    world, S, cfg = int(os.environ.get("WORLD_SIZE", "1")), a.sequence_parallel, 2 if a.cfg_parallel else 1
    block = S * cfg
    device = check_device(a.device)
    what = "--cfg-parallel" if S == 1 else f"--sequence-parallel {S}" + (" x 2 (--cfg-parallel)" if cfg > 1 else "")
    if block > 1 and world == 1:
        raise UserError(f"{what} runs on several processes: launch with torchrun --nproc_per_node N sample.py ...")
    if S < 1 or world % block:
        options = [d for d in range(1, world + 1) if world % (d * cfg) == 0]
        raise UserError(f"{what} must divide the {world} processes: use --sequence-parallel in {options}")
    if a.offload and not device.startswith("cuda"):
        raise UserError(f"--offload moves the models between CPU and GPU memory; it needs a CUDA device, got {device}")
    if world == 1:
        return device, Ranks()
    if device.startswith("cuda:"):  # NCCL refuses two ranks on one GPU
        raise UserError(f"--device {device}: under torchrun each process takes the GPU of its LOCAL_RANK; pass "
                        f"--device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    from videodit.parallel import sequence_parallel_groups

    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    group = sequence_parallel_groups(S)[0] if S > 1 else None
    cfg_group = None
    if a.cfg_parallel:  # every rank creates every group, in one order
        for first in range(0, world, block):
            for j in range(S):
                pair = dist.new_group([first + j, first + S + j])
                if rank in (first + j, first + S + j):
                    cfg_group = pair
    return device, Ranks(rank, world, block, group, cfg_group)


def check_device(name: str) -> str:
    """A --device value, checked against this machine: 'auto' is cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    choices = "auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device; use {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: sample.py runs on {choices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch sees no CUDA GPU; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: there are {torch.cuda.device_count()} CUDA GPU(s); use cuda:0 .. "
                        f"cuda:{torch.cuda.device_count() - 1}")
    return name


def read_prompts(a) -> list[str]:
    prompts = list(a.prompt)
    if a.prompt_file:
        if os.path.isdir(a.prompt_file):
            raise UserError(f"--prompt-file {a.prompt_file}: is a folder; give a text file with one prompt a line")
        if not os.path.exists(a.prompt_file):  # a pipe (<(...), /dev/stdin) is no regular file, but reads
            raise UserError(f"--prompt-file {a.prompt_file}: no such file")
        try:
            with open(a.prompt_file, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is no part of a prompt
                lines = [line.strip() for line in f]
        except UnicodeDecodeError as e:
            raise UserError(f"--prompt-file {a.prompt_file}: not UTF-8 text (byte {e.start}); save it as UTF-8") \
                from None
        rows = [line for line in lines if line]
        if a.prompt_file.lower().endswith(".jsonl") or rows and all(line.startswith("{") for line in rows):
            prompts += read_rows(a, lines, bool(prompts))
        else:
            prompts += [line for line in lines if line]
    if not prompts:
        raise UserError("no prompt: give --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


INPUTS = {"image": "--image", "video": "--video", "connect": "--connect"}


def read_rows(a, lines: list[str], others: bool) -> list[str]:
    """The prompts of a JSON-lines prompt file. Rows that give inputs ("image", "video" or "connect", all rows the
    same) set a.image, a.video or a.connect to one path (a pair for connect) per prompt, relative to the file's
    folder; a.per_prompt says so, and a.origins names each prompt's row (for errors about its input)."""
    where = f"--prompt-file {a.prompt_file}"
    root = os.path.dirname(os.path.abspath(a.prompt_file))
    prompts, given, kinds, origins = [], {k: [] for k in INPUTS}, set(), []
    for n, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where} line {n}: not JSON ({e.msg}); each line is an object like "
                            f'{{"prompt": "...", "image": "first.png"}}') from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise UserError(f'{where} line {n}: a row needs "prompt", a non-empty string, got {line:.80}')
        unknown = sorted(set(row) - {"prompt", *INPUTS})
        if unknown:
            raise UserError(f"{where} line {n}: unknown key(s) {unknown}; a row takes prompt and one of "
                            f"{', '.join(INPUTS)}")
        kinds.add(tuple(k for k in INPUTS if k in row))
        for k in INPUTS:
            v = row.get(k)
            pair = k == "connect"
            if k in row and not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x for x in v)
                                 if pair else isinstance(v, str) and v):
                raise UserError(f"{where} line {n}: {k} must be " +
                                ("a list of two video paths [VID_A, VID_B]" if pair else "a file path") +
                                f", got {v!r:.80}")
            given[k].append(v and ([os.path.join(root, x) for x in v] if pair else os.path.join(root, v)))
        prompts.append(row["prompt"].strip())
        origins.append(f"{where} line {n}")
    if len(kinds) > 1:
        raise UserError(f"{where}: its rows give different inputs; every row gives the same one (image, video or "
                        f"connect) or none")
    kind = kinds.pop() if kinds else ()
    if kind:
        if len(kind) > 1:
            raise UserError(f"{where}: its rows give {' and '.join(kind)}; a row gives one input: image, video or "
                            f"connect")
        flags = [flag for k, flag in INPUTS.items() if getattr(a, k)]
        if flags or others:
            raise UserError(f"{where}: its rows give each prompt its {kind[0]}; leave out " +
                            (" and ".join(flags) if flags else "--prompt (it would have none)"))
        setattr(a, kind[0], given[kind[0]])
        a.per_prompt, a.origins = True, origins
    return prompts


def first_file(files: dict) -> str:
    """The input file whose aspect the output takes (the first of --connect's)."""
    v = next(iter(files.values()))
    return v[0] if isinstance(v, (list, tuple)) else v


def inputs_of(a, i: int) -> dict:
    """Prompt i's input files by flag ("--image": path, "--video": path, "--connect": (a, b)), those given: its
    --prompt-file row's, or the flags' (one for every prompt)."""
    per = getattr(a, "per_prompt", False)
    return {flag: v[i] if per else v for flag, v in ((flag, getattr(a, k)) for k, flag in INPUTS.items()) if v}


def check_args(a, prompts) -> dict:
    """Refuse bad arguments before any model loads. Returns each input file's probe (input_probe), by path."""
    modes = [name for name, on in (("--image", a.image and not a.loop), ("--extend", a.extend),
                                   ("--strength", a.strength is not None), ("--loop", a.loop), ("--connect", a.connect))
             if on]  # --loop --image: a loop through the image
    if len(modes) > 1:
        edit = "; to edit an image give it as --video IMG --strength S" if modes == ["--image", "--strength"] else ""
        raise UserError(f"choose one conditioning mode at a time, got {' and '.join(modes)}{edit}")
    if (a.extend or a.strength is not None) and not a.video:
        raise UserError(f"{modes[0]} needs --video VID")
    if a.video and not (a.extend or a.strength is not None):
        raise UserError("--video needs --extend forward|backward or --strength S")
    from videodit.pipeline import check_sampling

    try:
        check_sampling(a.steps, a.guidance, a.guidance_parallel, a.shift, a.cache_threshold, a.strength, flags=True)
    except ValueError as e:
        raise UserError(str(e)) from None
    probed = {}  # each input probed once, before any model loads: a bad one fails at once
    for i in range(len(prompts)):
        for flag, v in inputs_of(a, i).items():
            for path in v if flag == "--connect" else [v]:
                if path not in probed:
                    where = f"{a.origins[i]}: {flag[2:]}" if getattr(a, "per_prompt", False) else flag
                    probed[path] = input_probe(flag, path, where)
    for flag, v in (("--num-frames", a.num_frames), ("--height", a.height), ("--width", a.width)):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be positive, got {v}")
    if a.fps is not None and not (math.isfinite(a.fps) and a.fps > 0):
        raise UserError(f"--fps must be a positive finite number, got {a.fps}")
    if not -2 ** 63 <= a.seed <= 2 ** 64 - len(prompts):  # torch.Generator's range; prompt i samples with seed + i
        raise UserError(f"--seed must be in [-2**63, 2**64 - {len(prompts)}] ({len(prompts)} prompt(s), seed + i "
                        f"each), got {a.seed}")
    if a.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {a.batch_size}")
    if a.lora_scale and not a.lora:
        raise UserError("--lora-scale sets the strength of --lora adapters; give --lora DIR too")
    if len(a.lora_scale) > 1 and len(a.lora_scale) != len(a.lora):
        raise UserError(f"{len(a.lora_scale)} --lora-scale values for {len(a.lora)} --lora folders: give one for each, "
                        f"or one for all")
    for path in a.lora:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise UserError(f"--lora {path}: not a LoRA adapter folder (it needs adapter_config.json, as a LoRA run "
                            f"writes to <output_dir>/lora)")
    if a.output and a.output_dir:
        raise UserError("give --output FILE (one prompt) or --output-dir DIR, not both")
    if len(prompts) > 1 and a.output:
        raise UserError(f"{len(prompts)} prompts: use --output-dir DIR (--output names one file)")
    if a.output:
        ext = os.path.splitext(a.output)[1].lower()
        if ext not in (".mp4", ".gif", ".png"):
            raise UserError(f"--output {a.output}: use .mp4, .gif, or .png")
        if ext == ".png" and (a.extend or a.connect):
            raise png_error(a.output, clip=True)
        if ext == ".png" and a.num_frames not in (None, 1):  # before any model loads; the default is checked later
            raise png_error(a.output)
        if os.path.isdir(a.output):
            raise UserError(f"--output {a.output}: is a folder; give a file name (or use --output-dir for a folder)")
        check_folder("--output", os.path.dirname(os.path.abspath(a.output)), a.output)
    if a.output_dir:
        check_folder("--output-dir", a.output_dir, a.output_dir)
    if a.upsample_prompt and a.upsampler_model:
        from videodit.text import check_local_model
        from videodit.upsample import LM

        try:
            check_local_model(a.upsampler_model, LM)
        except FileNotFoundError as e:
            raise UserError(f"--upsampler-model {e}") from None
    return probed


def input_probe(name: str, path: str, where: str) -> dict:
    """An input file's height, width (and a video's fps), or a UserError naming what is wrong with it and where it
    was given (a flag, or a prompt file's row)."""
    from videodit.data.video import VideoReadError, probe, read_image

    try:
        return probe(path) if name != "--image" else dict(zip(("height", "width"), read_image(path).shape[-2:]))
    except VideoReadError as e:
        if name == "--image" and os.path.isfile(path):  # PIL knows images by their content, not their name
            raise UserError(f"{where} {e}; an image input takes an image file (.png, .jpg, ...); to continue a video "
                            f"use --video VID --extend") from None
        raise UserError(f"{where} {e}") from None


def check_folder(flag: str, folder: str, given: str):
    """Refuse a folder to write into that a file is in the way of: it, or the nearest of its parents that exists."""
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"{flag} {given}: {path} is a file, not a folder; choose a path whose folders can be created")


def load_pipeline(path: str, device: str, offload: bool = False, loras=(), scales=()):
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        if os.path.abspath(path) == DEFAULT_CHECKPOINT:
            raise UserError(f"the default model is missing: {path} holds no pipeline (model_index.json). Restore "
                            f"it (git checkout -- models), retrain it with the commands under 'Training' in "
                            f"README.md, or pass --checkpoint DIR")
        inner = os.path.join(path, "pipeline")
        hint = f"; a training run writes its pipeline to {inner}" if os.path.isfile(
            os.path.join(inner, "model_index.json")) else ""
        raise UserError(f"--checkpoint {path}: not a pipeline folder (it needs model_index.json, as written by "
                        f"VideoDiTPipeline.save_pretrained){hint}")
    from videodit.pipeline import VideoDiTPipeline

    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    try:
        pipe = VideoDiTPipeline.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:  # a part missing or damaged (check_parts names the file)
        raise UserError(f"--checkpoint {e}" if str(e).startswith(path) else f"--checkpoint {path}: {e}") from None
    for lora, scale in zip(loras, scales if len(scales) > 1 else list(scales or [1.0]) * len(loras)):
        try:
            pipe.load_lora(lora, scale)
        except ValueError as e:
            raise UserError(f"--lora {e}") from None
    if offload:
        pipe.enable_offload(device)
        return pipe
    return pipe.to(device)


def conditioning(a, i: int, size, cache: dict):
    """Prompt i's pipeline inputs for the chosen mode (image=, video= or connect=), and the input clips its output is
    joined with (before, after), at size (H, W). cache: the clips read so far, by file and size (an input shared by
    prompts is read once)."""
    from videodit.data.video import VideoReadError, read_image, read_video

    H, W = size
    files = inputs_of(a, i)

    def read(path, image=False):
        if (path, H, W) not in cache:
            cache[path, H, W] = read_image(path, H, W) if image else read_video(path, fps=a.fps, height=H, width=W)
        return cache[path, H, W]

    try:
        if a.image:
            return dict(image=read(files["--image"], image=True)), None, None
        if a.extend:
            clip = read(files["--video"])
            return dict(video=clip), clip if a.extend == "forward" else None, clip if a.extend == "backward" else None
        if a.strength is not None:  # the whole clip: the frames edited are its first (run caps them to it)
            return dict(video=read(files["--video"])), None, None
        if a.connect:
            clips = [read(v) for v in files["--connect"]]
            return dict(connect=tuple(clips)), clips[0], clips[1]
    except VideoReadError as e:
        raise UserError(str(e)) from None
    return {}, None, None


def run(a):
    prompts = read_prompts(a)
    probed = check_args(a, prompts)
    device, ranks = setup(a)
    try:
        sample_prompts(a, prompts, probed, device, ranks)
    finally:
        if ranks.world > 1:
            dist.destroy_process_group()


def prepare_pipeline(a, device, ranks, say):
    """Load the checkpoint for these processes; returns it with the guidance used and its parallel part."""
    pipe = load_pipeline(a.checkpoint, device, a.offload, a.lora, a.lora_scale)
    heads, S = pipe.transformer.config.num_heads, a.sequence_parallel
    if heads % S:
        from videodit.parallel import degrees

        share = ranks.world // (2 if a.cfg_parallel else 1)
        raise UserError(f"--sequence-parallel {S} splits the model's {heads} attention heads, which {S} does not "
                        f"divide; on {ranks.world} processes use one of {degrees(share, heads)}")
    pipe.transformer.set_sequence_parallel(ranks.group)
    try:  # settings a guidance-distilled checkpoint cannot take
        pipe.set_cfg_parallel(ranks.cfg_group)
        a.steps, guidance, parallel = pipe.sampling_defaults(a.steps, a.guidance, a.guidance_parallel,
                                                             a.negative_prompt)
    except ValueError as e:
        raise UserError(str(e)) from None
    for note in ignored_settings(a, guidance, guidance_distilled(pipe.transformer)):
        say(f"note: {note}")
    return pipe, guidance, parallel


def upsample_prompts(a, prompts, mine, ranks):
    """Rewrite this process's prompts (in place) as detailed captions, each printed once."""
    from videodit.upsample import upsample_prompt

    for i in mine:
        try:
            prompts[i] = upsample_prompt(prompts[i], backend="lm" if a.upsampler_model else "shapes",
                                         model=a.upsampler_model, seed=a.seed + i)
        except OSError as e:  # a hub id that cannot be fetched, a folder with broken files
            raise UserError(f"--upsampler-model {e}") from None
        if ranks.writer:
            print(f"prompt: {prompts[i]}")


def output_sizes(a, pipe, files, probed, say) -> list[tuple]:
    """Each prompt's (frames, height, width): the sizes asked, each output taking its input's aspect where it has
    one, rounded to sizes the model takes (said once per size where that changed them)."""
    likes = [None if not f else probed[first_file(f)] for f in files]
    sizes = [pipe.resolve_size(a.num_frames, a.height, a.width, None if like is None else
                               (like["height"], like["width"]), connect=bool(a.connect), extend=bool(a.extend))
             for like in likes]
    sdedit = a.strength is not None  # its frames are decided by each clip's length
    for size in dict.fromkeys(sizes):
        changed = [f"{name} {v}" for name, v, s in zip(("frames", "height", "width"),
                                                        (a.num_frames, a.height, a.width), size)
                   if v is not None and v != s and not (sdedit and name == "frames")]
        if changed:
            shown = f"{size[1]}x{size[2]} (height x width)" if sdedit else \
                f"{size[0]}x{size[1]}x{size[2]} (frames x height x width)"
            say(f"note: {', '.join(changed)}: not a size this model takes; using {shown}")
    return sizes


def sample_prompts(a, prompts, probed, device, ranks):
    """Sample this process's share of the prompts and write the videos. probed: each input file's probe (size, frame
    rate), from check_args."""
    say = print if ranks.main else lambda *args: None  # noqa: E731
    t0 = time.time()
    pipe, guidance, parallel = prepare_pipeline(a, device, ranks, say)
    mine = ranks.share(len(prompts))
    asked = list(prompts)  # as given: prompts.jsonl keeps them beside the upsampled ones
    if a.upsample_prompt:
        upsample_prompts(a, prompts, mine, ranks)
    a.fps = a.fps or pipe.config.default_fps
    per_prompt = getattr(a, "per_prompt", False)
    files = [inputs_of(a, i) for i in range(len(prompts))]
    sizes = output_sizes(a, pipe, files, probed, say)
    sdedit = a.strength is not None
    cache, said = {}, set()

    def job(i):  # prompt i's pipeline inputs, the clips its output is joined with, and its size
        T, H, W = sizes[i]
        kwargs, before, after = conditioning(a, i, (H, W), cache)
        if sdedit:  # SDEdit edits the longest 1 + ft*k frames of the clip, or of the --num-frames asked
            n = kwargs["video"].shape[1]
            T = pipe.geometry.frames(n, a.num_frames or n)
            if T != (a.num_frames or n):
                wanted = f", --num-frames {a.num_frames}" if a.num_frames else ""
                note = f"note: --video {files[i]['--video'] + ' ' if per_prompt else ''}has {n} frames at " \
                       f"{a.fps:g} fps{wanted}; SDEdit takes 1 + {pipe.geometry.ft}*k frames of it: using its first {T}"
                if note not in said and ranks.main:
                    said.add(note)
                    tqdm.write(note)
        return kwargs, before, after, (T, H, W)

    videos = dict.fromkeys((flag, path) for f in files for flag, v in f.items() if flag != "--image"
                           for path in (v if flag == "--connect" else [v]))
    other_rate = [(flag, path) for flag, path in videos  # an image given as a video has no rate
                  if probed[path]["num_frames"] > 1 and abs(probed[path]["fps"] - a.fps) > 1e-3]
    first = job(mine.start if len(mine) else 0)  # with one input for all: read once, here
    if per_prompt and other_rate:  # joined as the new frames are: at their rate
        say(f"note: {len(other_rate)} of the {len(videos)} input videos have another frame rate than {a.fps:g} fps "
            f"(--fps); each is read at {a.fps:g} fps")
    for flag, path in [] if per_prompt else other_rate:
        frames_read = cache[(path, *sizes[0][1:])].shape[1]
        say(f"note: {flag} {path} is {probed[path]['fps']:g} fps; read at {a.fps:g} fps (--fps): {frames_read} frames")
    frames = first[3][0]
    if a.connect and a.num_frames is None:
        say(f"note: --connect puts {frames} new frames between the clips (--num-frames sets how many)")
    joined = first[1] is not None or first[2] is not None  # input clips written with the new frames
    if a.output and a.output.lower().endswith(".png") and (frames != 1 or joined):
        clips = sum(v.shape[1] for v in first[1:3] if v is not None)
        raise png_error(a.output, clips + frames, clip=bool(clips))
    if a.verbose:
        length = "each clip's frames" if sdedit and per_prompt else \
            f"{frames} {'new ' if a.extend or a.connect else ''}frames"
        shape = f"{sizes[0][1]}x{sizes[0][2]}" if len(set(sizes)) == 1 else "each input's aspect"
        procs = f" on {ranks.world} processes ({ranks.dp_size} x {ranks.per_group})" if ranks.world > 1 else ""
        distilled = "; distilled: one pass a step" if guidance_distilled(pipe.transformer) else ""
        say(f"sampling {len(prompts)} prompt(s) at {shape}, {length}, {a.fps:g} fps, {a.steps} steps, "
            f"guidance {guidance:g} (parallel part {parallel:g}{distilled}), seed {a.seed}{procs}")
    if a.output_dir and ranks.main:  # prompts.jsonl begins afresh; every writer appends its batches' rows
        os.makedirs(a.output_dir, exist_ok=True)
        open(os.path.join(a.output_dir, "prompts.jsonl"), "w").close()
    barrier(ranks)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)  # --verbose reports the sampling's peak, not the loading's
    t1 = time.time()
    with tqdm(total=len(mine), desc="videos", unit="video", disable=not ranks.main or len(mine) <= a.batch_size) as bar:
        for start in range(mine.start, mine.stop, a.batch_size):
            batch = range(start, min(start + a.batch_size, mine.stop))
            if per_prompt and start != mine.start:  # each prompt's own inputs: only this batch's in memory
                cache.clear()
            jobs = [first if i == mine.start else job(i) for i in batch]
            part = [prompts[i] for i in batch]
            gens = [torch.Generator(device).manual_seed(a.seed + i) for i in batch]
            inputs = {k: [j[0][k] for j in jobs] for k in jobs[0][0]}
            out = pipe(part, a.negative_prompt, [j[3][1] for j in jobs], [j[3][2] for j in jobs],
                       [j[3][0] for j in jobs], num_inference_steps=a.steps, guidance_scale=a.guidance,
                       guidance_parallel=a.guidance_parallel, generator=gens, sampler=a.sampler, shift=a.shift,
                       image_first=a.image_first, progress=ranks.main, cache_threshold=a.cache_threshold,
                       output_type="pt" if ranks.writer else "latent", loop=a.loop, extend=a.extend,
                       strength=a.strength, **inputs)
            if ranks.writer:
                write_outputs(a, start, part, out, [j[1] for j in jobs], [j[2] for j in jobs],
                              [asked[i] for i in batch])
            if a.verbose and a.cache_threshold and ranks.main:
                tqdm.write(f"step cache: the later blocks were skipped at {out.skipped_steps} step(s)")
            bar.update(len(part))
    barrier(ranks)
    if a.output_dir and ranks.main and ranks.dp_size > 1:  # the groups appended in any order: in file order
        sort_prompts_file(os.path.join(a.output_dir, "prompts.jsonl"))
    if a.verbose:
        report(device, load=t1 - t0, sample=time.time() - t1, rank=ranks.rank if ranks.world > 1 else None)


def ignored_settings(a, guidance: float, distilled: bool) -> list[str]:
    """Settings that have no effect with the others given, each said in a line."""
    notes = []
    if a.negative_prompt and guidance == 1 and not distilled:
        notes.append("guidance 1 turns guidance off: --negative-prompt has no effect (give --guidance above 1)")
    if a.cfg_parallel and guidance == 1:
        notes.append("guidance 1 runs one pass a step: --cfg-parallel's two processes both run it (give --guidance "
                     "above 1, or leave --cfg-parallel out and share the prompts over the processes)")
    if a.upsampler_model and not a.upsample_prompt:
        notes.append("--upsampler-model rewrites prompts only with --upsample-prompt; the prompts are used as given")
    if a.image_first and (a.image or a.video or a.connect or a.loop):
        notes.append("--image-first draws the first frame of text-to-video only; the chosen mode ignores it")
    return notes


def sort_prompts_file(path: str):
    """prompts.jsonl's rows in the order of their files' numbers (999 before 1000), however the writers appended."""
    with open(path, encoding="utf-8") as f:
        rows = sorted(f, key=lambda r: int(os.path.splitext(json.loads(r)["file"])[0]))
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)


def barrier(ranks):
    if ranks.world > 1:
        dist.barrier()


def write_outputs(a, start, prompts, out, befores, afters, asked):
    """Write one batch's videos (prompts start, start + 1, ...), each joined with the input clips it continues (or
    None); with --output-dir, their rows are appended to prompts.jsonl (with --upsample-prompt, each prompt as asked
    too), so a stopped run lists what it wrote."""
    from videodit.data.video import write_video

    rows = []
    for i, (prompt, video, before, after, short) in enumerate(zip(prompts, out.frames, befores, afters, asked), start):
        parts = [v.cpu() for v in (before, video, after) if v is not None]
        video = torch.cat(parts, dim=1)
        ext = ".png" if video.shape[1] == 1 else ".mp4"
        path = a.output if a.output else os.path.join(a.output_dir or ".", f"{i:03d}{ext}")
        write_video(path, video, fps=a.fps)
        rows.append(dict(file=os.path.basename(path), prompt=prompt, seed=a.seed + i, num_frames=video.shape[1],
                         height=video.shape[2], width=video.shape[3], fps=a.fps, steps=a.steps,
                         **({"upsampled_from": short} if a.upsample_prompt else {})))
        tqdm.write(path)
    if a.output_dir:  # one write: rows of other processes' batches never interleave with these
        with open(os.path.join(a.output_dir, "prompts.jsonl"), "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))


def report(device, rank=None, **seconds):
    import resource

    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    times = ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items())
    who = "" if rank is None else f"rank {rank}: "
    print(f"{who}{times}; peak {'GPU' if device.startswith('cuda') else 'process'} memory {peak:.2f} GiB")


def main(argv=None):
    a = parse_args(argv)
    try:
        run(a)
    except UserError as e:  # under torchrun every process meets the same error: rank 0 says it and fails the job
        if int(os.environ.get("RANK", "0")) != 0:
            sys.exit(0)  # quietly: torchrun stops every worker once one fails, maybe rank 0 before it has printed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # torch's CPU allocator raises RuntimeError
        if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "allocate" not in str(e):
            raise
        print(f"error: out of memory ({str(e).splitlines()[0][:200]}): sample fewer or smaller videos at once "
              f"(--batch-size, --height, --width, --num-frames){', or --offload' if torch.cuda.is_available() else ''}",
              file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
