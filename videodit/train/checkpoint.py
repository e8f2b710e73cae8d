"""Checkpoints: accelerate's save_state (model, optimizer, LR schedule, per-rank RNG states, EMA and other
registered objects) plus state.json (step, data position), config.yaml and the model's config, written to a
temporary folder and moved into place with os.replace, so a crash never leaves a half-written checkpoint.

    <output_dir>/checkpoints/step_00001000/   model.safetensors optimizer.bin scheduler.bin random_states_<rank>.pkl
                                              custom_checkpoint_0.pkl (EMA) state.json config.yaml model_config.json

A parallel.fsdp run's checkpoint holds sharded/ (model, optimizer and EMA shards, sharded.py) in place of the model,
optimizer and EMA files.

Export a checkpoint's EMA weights as a diffusers model folder (save_pretrained), or with --pipeline as a whole
pipeline folder for sample.py:

    python -m videodit.train.checkpoint runs/shapes-tiny/checkpoints/step_00002000 --out runs/shapes-tiny/model
    python -m videodit.train.checkpoint runs/shapes-tiny/checkpoints/step_00002000 --out step2000 --pipeline
"""

import argparse
import glob
import json
import logging
import os
import re
import shutil

import torch
from safetensors.torch import load_file

from ..data.video import readable

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(output_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := STEP_DIR.match(n)))
    return [os.path.join(root, n) for _, n in names]


def abandon_checkpoints_after(output_dir: str, step: int):
    """Resuming from an older checkpoint starts the run's history anew from it: the run's newer checkpoints (the
    branch left) move to checkpoints/abandoned/, so that --resume latest never returns to them."""
    later = [d for d in checkpoint_dirs(output_dir) if int(STEP_DIR.match(os.path.basename(d)).group(1)) > step]
    if not later:
        return
    aside = os.path.join(output_dir, "checkpoints", "abandoned")
    os.makedirs(aside, exist_ok=True)
    for d in later:
        shutil.rmtree(os.path.join(aside, os.path.basename(d)), ignore_errors=True)
        os.replace(d, os.path.join(aside, os.path.basename(d)))
    logging.getLogger(__name__).warning(f"resumed at step {step}: the run's later checkpoints "
                                        f"({', '.join(os.path.basename(d) for d in later)}) moved to {aside}")


def find_checkpoint(resume: str, output_dir: str) -> str | None:
    """`latest` -> the newest checkpoint of the run (None when there is none yet); else the folder given."""
    if resume == "latest":
        dirs = checkpoint_dirs(output_dir)
        return dirs[-1] if dirs else None
    if not os.path.isfile(os.path.join(resume, "state.json")):
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no state.json); checkpoints are "
                                f"<output_dir>/checkpoints/step_*, or pass --resume latest")
    return resume


def save_checkpoint(accelerator, output_dir: str, step: int, state: dict, cfg, model_config: dict,
                    keep: int, also=None) -> str:
    """Write checkpoint `step` on all ranks (collective), then keep the newest `keep`. `also(folder)`: more to write
    into it on all ranks (a sharded model's shards). Returns its folder."""
    from ..config import save_config

    root = os.path.join(output_dir, "checkpoints")
    final, tmp = os.path.join(root, f"step_{step:08d}"), os.path.join(root, f".tmp_step_{step:08d}")
    if accelerator.is_main_process:
        for name in os.listdir(root) if os.path.isdir(root) else []:  # this one's, and any a failed write left
            if name.startswith(".tmp_step_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        if also is not None:
            also(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f, indent=1)
            with open(os.path.join(tmp, "model_config.json"), "w") as f:
                json.dump(model_config, f, indent=1)
            save_config(cfg, os.path.join(tmp, "config.yaml"))
            readable(tmp)
    except BaseException as e:  # a full disk surfaces as torch's or safetensors' own errors
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):  # Ctrl-C
            raise
        raise write_error(f"could not write checkpoint {step} to {root}", root, e) from e
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_error(what: str, folder: str, e: Exception) -> OSError:
    """An error writing a run's files as one line: what failed, why, and the space left where it wrote."""
    why = " ".join(str(e).split())[:200] or type(e).__name__
    try:
        free = f"; {shutil.disk_usage(folder).free / 2 ** 20:.0f} MB free there"
    except OSError:
        free = ""
    return OSError(f"{what} ({why}{free}); with room to write, go on with --resume latest")


def load_checkpoint(accelerator, path: str) -> dict:
    """Restore everything save_state wrote (on all ranks) and return state.json."""
    accelerator.load_state(path)
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


def export_ema(checkpoint: str, out: str, merge_lora: bool = True, pipeline: bool = False, lean: bool = False) -> str:
    """Write the checkpoint's EMA weights as a diffusers folder: the VAE (vae runs) or the denoiser (dit runs);
    LoRA runs write the adapters to <out>/lora and, with merge_lora, the merged denoiser to <out>. With `pipeline`
    (dit runs), <out> becomes a whole VideoDiTPipeline folder with the run's VAE and text encoder, for sample.py
    (with `lean`, as save_pipeline's lean form)."""
    from diffusers.training_utils import EMAModel

    from ..config import load_config
    from ..dit import VideoDiT
    from ..vae import CausalVideoVAE
    from .lora import add_lora, save_adapters
    from .sharded import SHARDED, read_weights

    cfg = load_config(os.path.join(checkpoint, "config.yaml"))
    with open(os.path.join(checkpoint, "model_config.json")) as f:
        model_config = json.load(f)
    cls = CausalVideoVAE if cfg.train.task == "vae" else VideoDiT
    model = cls.from_config(model_config)
    if cfg.train.lora_rank:
        model = add_lora(model, cfg.train.lora_rank)
    if os.path.isdir(os.path.join(checkpoint, SHARDED)):  # a parallel.fsdp run's: the EMA's weights if it kept one
        read_weights(checkpoint, model)
    else:
        model.load_state_dict(load_file(os.path.join(checkpoint, "model.safetensors")))
    with open(os.path.join(checkpoint, "state.json")) as f:
        state = json.load(f)
    ema_file = os.path.join(checkpoint, "custom_checkpoint_0.pkl")  # the first state registered (a GAN's is next)
    # (checkpoints from before state.json said whether it kept an EMA: its config says)
    if state.get("ema", cfg.train.ema_decay > 0) and os.path.isfile(ema_file):  # a sharded run's: read above
        params = [p for p in model.parameters() if p.requires_grad]
        ema = EMAModel(params)
        ema.load_state_dict(torch.load(ema_file, weights_only=False))
        ema.copy_to(params)
    if cfg.train.task == "vae":  # as the run's own export: with the latent statistics, measured on its data
        from ..vae import compute_latent_stats
        from .tasks import first_clips, vae_source

        compute_latent_stats(model, first_clips(vae_source(cfg, model)[1], 32, "cpu"))
    if not pipeline or cfg.train.task == "vae":
        return save_model(model, out, merge_lora)
    from ..text import load_text_encoder
    from .models import load_trained_vae, vae_changes

    differ = vae_changes(state.get("vae_config"), cfg)
    if differ:
        key, path = ("train.vae", cfg.train.vae) if cfg.train.vae else ("vae.path", cfg.vae.path)
        raise ValueError(f"{key} = {path} is not the VAE this checkpoint trained with any more (it differs in "
                         f"{', '.join(differ[:4])}): export with that VAE, or export without --pipeline")
    model = save_adapters(model, out)
    t = cfg.text
    text = load_text_encoder(t.encoder, t.path, t.max_length)
    return save_pipeline(cfg, model, load_trained_vae(cfg), text, out, lean)


def save_model(model, out: str, merge_lora: bool = True) -> str:
    """save_pretrained of a VideoDiT / CausalVideoVAE, or of a LoRA PeftModel's adapters (to <out>/lora) and,
    with merge_lora, its merged base (to <out>)."""
    from .lora import save_adapters

    model = save_adapters(model, out, merge_lora)
    if model is not None:
        forget_origin(model)
        _remove_shard_indexes(out)
        model.save_pretrained(out)
    return readable(out)


def _remove_shard_indexes(*folders):
    """An earlier sharded save's index would outlive a single-file save into the same folder, and loading would then
    look for the index's shards (diffusers removes the shards, not the index)."""
    for folder in folders:
        for index in glob.glob(os.path.join(folder, "*.safetensors.index.json")):
            os.remove(index)


def forget_origin(*models):
    """A saved config names no folder of this machine (diffusers records the one each model was loaded from)."""
    for m in models:
        if m.config.get("_name_or_path"):
            m.register_to_config(_name_or_path=None)


def sample_shift(cfg) -> float | None:
    """The time shift a run's samples take: sample.shift, else the training's (flow.shift; None: by resolution)."""
    return cfg.flow.shift if cfg.sample.shift is None else cfg.sample.shift


def save_pipeline(cfg, transformer, vae, text, out: str, lean: bool = False, source=None) -> str:
    """A VideoDiTPipeline folder (transformer/, vae/, text_encoder/, tokenizer/, scheduler/) that sample.py loads,
    with the run's text length, shift base, sampling defaults, size (sample.size, else the most common clip size of
    `source`, the run's data source, built from cfg.data when None) and frame rate in model_index.json. `lean`: the
    denoiser in float16 and no text encoder (the packaged MiniLM loads in its place): the form the repo ships."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ..data.loader import Geometry, make_source
    from ..pipeline import VideoDiTPipeline
    from ..vae import PretrainedVideoVAE

    size = cfg.sample.size
    if size is None:
        size = (source or make_source(cfg.data, Geometry(vae.ft, vae.fs, transformer.patch_size))).typical_size()

    pipe = VideoDiTPipeline(vae.model if isinstance(vae, PretrainedVideoVAE) else vae, transformer, text.model,
                            text.tokenizer, FlowMatchEulerDiscreteScheduler(), max_text_length=text.max_length,
                            base_tokens=cfg.flow.base_tokens, default_steps=cfg.sample.steps,
                            default_guidance=cfg.sample.guidance,
                            default_guidance_parallel=cfg.sample.guidance_parallel, image_first=cfg.sample.image_first,
                            shared_noise=cfg.flow.shared_noise, default_size=size, default_fps=cfg.data.fps,
                            default_shift=sample_shift(cfg))
    pipe.register_to_config(default_size=list(pipe.resolve_size()))  # snapped to what the model takes
    forget_origin(pipe.transformer, pipe.vae)
    _remove_shard_indexes(*(os.path.join(out, part) for part in ("transformer", "vae", "text_encoder")))
    if not lean:
        pipe.save_pretrained(out)
    elif cfg.text.encoder == "minilm" and not cfg.text.path:
        pipe.save_lean(out, package="minilm")
    else:
        raise ValueError(f"a lean pipeline leaves out the text encoder, so it must come from a package: text.encoder "
                         f"must be 'minilm' with no text.path, not {cfg.text.encoder!r} / {cfg.text.path!r}")
    return readable(out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Export a training checkpoint's EMA weights as a diffusers model folder.")
    p.add_argument("checkpoint", help="a folder <output_dir>/checkpoints/step_*")
    p.add_argument("--out", required=True, help="the model folder to write (save_pretrained)")
    p.add_argument("--no-merge", action="store_true", help="LoRA runs: write the adapters only")
    p.add_argument("--pipeline", action="store_true",
                   help="dit runs: write a whole pipeline (with the run's VAE and text encoder) for sample.py")
    p.add_argument("--lean", action="store_true", help="with --pipeline: float16 denoiser, no text encoder (the "
                   "packaged MiniLM loads in its place); how models/shapes-tiny ships")
    args = p.parse_args(argv)
    if not all(os.path.isfile(os.path.join(args.checkpoint, f)) for f in ("config.yaml", "model_config.json")):
        p.error(f"{args.checkpoint} is not a training checkpoint (it needs config.yaml and model_config.json): give "
                f"a folder <output_dir>/checkpoints/step_*")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; give a folder to write the model to")
    if args.lean and not args.pipeline:
        p.error("--lean is a form of --pipeline: add --pipeline")
    from ..config import load_config

    t = load_config(os.path.join(args.checkpoint, "config.yaml")).train
    if args.pipeline and t.task == "vae":
        p.error("--pipeline writes a denoiser with its VAE and text encoder; this is a VAE run's checkpoint: leave "
                "--pipeline out")
    if args.no_merge and (not t.lora_rank or args.pipeline):
        p.error("--no-merge writes a LoRA run's adapters alone, without --pipeline (which merges them)"
                + ("" if t.lora_rank else "; this run trained the whole model"))
    try:
        print(export_ema(args.checkpoint, args.out, not args.no_merge, args.pipeline, args.lean))
    except (OSError, ValueError) as e:  # a truncated or foreign weights file, a lean form it cannot take
        p.error(f"{args.checkpoint}: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    from videodit.config import one_line_warnings

    one_line_warnings()
    main()
