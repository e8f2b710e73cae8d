"""The GPU numbers: training throughput and MFU, sampling latency, VAE decode memory. Random weights: timings only.

    python bench/gpu.py                    # on a GPU: presets B and 1B at 16k and 32k tokens, 480p 81-frame sampling
    python bench/gpu.py --tiny             # the same code at tiny sizes (runs on CPU in about a minute)
    python bench/gpu.py --only train --settings base ckpt_all

1. Training step (forward, backward, AdamW) on a packed batch of three samples (token shares 1/2, 1/4, 1/4; text
   of 226 tokens), bf16 autocast over fp32 weights unless a setting says otherwise: tokens/s, TFLOP/s (FLOPs from
   videodit.flops: 3 x forward), MFU against --peak-tflops (989: H100 SXM dense bf16), peak memory. Settings:
   base, compile (torch.compile of each block), ckpt_all / ckpt_every_2 / ckpt_attention / ckpt_mlp (activation
   checkpointing policies), bf16_weights (weights and AdamW state in bf16, no autocast).
2. Sampling: preset 1B, 480x832, 81 frames (latent 16 x 21 x 60 x 104, 32760 tokens), guidance (2 x 32760 tokens a
   step), bf16 weights: seconds per step over a few steps after a warm-up, extrapolated to 50 steps.
3. VAE: the standard CausalVideoVAE (113M, 4x8x8), bf16, streaming decode of 81 and 321 frames at 480x832: seconds
   and peak memory.
The attention backend is packed_attention's default: flash-attn's varlen kernel where installed, else one SDPA call
per sample. Peak memory is torch.cuda.max_memory_allocated (reset before each case); on CPU it is not measured.
"""

import argparse
import gc
import time

import torch
from diffusers.utils import logging as diffusers_logging

from videodit.attention import default_backend
from videodit.dit import PRESETS, VideoDiT
from videodit.flops import flops_per_step
from videodit.flow import sample
from videodit.patchify import pack
from videodit.vae import VAE_PRESETS, CausalVideoVAE

SETTINGS = ("base", "compile", "ckpt_all", "ckpt_every_2", "ckpt_attention", "ckpt_mlp", "bf16_weights")
FULL = dict(presets={k: PRESETS[k] for k in ("B", "1B")}, lengths=(16384, 32768), side=32, text_len=226,
            sample_size=(81, 480, 832), vae="standard", vae_frames=(81, 321), vae_size=(480, 832))
TINY = dict(presets={"B": dict(depth=2, hidden_size=64, num_heads=4, in_channels=16, text_dim=32),
                     "1B": dict(depth=3, hidden_size=96, num_heads=4, in_channels=16, text_dim=32)},
            lengths=(256, 512), side=8, text_len=16, sample_size=(17, 64, 64), vae="tiny", vae_frames=(17, 65),
            vae_size=(64, 64))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB" if device.type == "cuda" else "-"


def batch_shapes(tokens: int, channels: int, side: int) -> list:
    """Latent shapes (C, T, H, W) of three samples with 1/2, 1/4, 1/4 of `tokens` (patch 1x2x2): two square, one
    wide; tokens must be a multiple of 4 * side^2."""
    per_frame = side * side
    t1, t2 = tokens // 2 // per_frame, tokens // 4 // per_frame
    if t2 == 0 or tokens % (4 * per_frame):
        raise ValueError(f"tokens must be a multiple of {4 * per_frame}, got {tokens}")
    return [(channels, t1, 2 * side, 2 * side), (channels, t2, 2 * side, 2 * side), (channels, t2, side, 4 * side)]


def train_case(cfg: dict, tokens: int, setting: str, a, device) -> str:
    """One table row's cells after the name: tokens/s | TFLOP/s | MFU | peak memory."""
    reset_memory(device)
    torch.manual_seed(0)
    model = VideoDiT(**cfg).to(device)
    weights_bf16 = setting == "bf16_weights"
    if weights_bf16:
        model.to(torch.bfloat16)
    if setting.startswith("ckpt_"):
        model.set_checkpoint_policy(setting[len("ckpt_"):])
    if setting == "compile":
        for block in model.blocks:
            block.compile(dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    shapes = batch_shapes(tokens, cfg["in_channels"], a.side)
    g = torch.Generator(device).manual_seed(0)
    packed = pack([torch.randn(s, generator=g, device=device) for s in shapes])
    target = torch.randn(packed.tokens.shape, generator=g, device=device)
    text = torch.randn(len(shapes), a.text_len, cfg["text_dim"], generator=g, device=device)
    t = torch.rand(len(shapes), generator=g, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not weights_bf16):
            loss = (model(packed, t, text).float() - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        for _ in range(a.warmup):
            step()
        sync(device)
        tic = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync(device)
    except torch.OutOfMemoryError:
        return "OOM | - | - | -"
    finally:
        del model, opt
    seconds = (time.perf_counter() - tic) / a.steps
    tflops = flops_per_step(cfg, packed.seqlens, a.text_len) / seconds / 1e12
    return f"{tokens / seconds:,.0f} | {tflops:.3g} | {100 * tflops / a.peak_tflops:.3g}% | {peak(device)}"


def bench_train(a, device):
    print(f"\n### Training step (forward + backward + AdamW), packed batch of 3 samples, text {a.text_len} tokens, "
          f"attention backend {default_backend(torch.zeros(1, device=device, dtype=torch.bfloat16))!r}, "
          f"{a.warmup} warm-up + {a.steps} timed steps, MFU vs {a.peak_tflops:g} TFLOP/s\n")
    print("| preset | tokens | setting | tokens/s | TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for name, cfg in a.presets.items():
        for tokens in a.lengths:
            for setting in a.settings:
                print(f"| {name} | {tokens} | {setting} | {train_case(cfg, tokens, setting, a, device)} |",
                      flush=True)


def bench_sample(a, device):
    T, H, W = a.sample_size
    shape = (16, 1 + (T - 1) // 4, H // 8, W // 8)
    tokens = shape[1] * shape[2] // 2 * shape[3] // 2
    reset_memory(device)
    torch.manual_seed(0)
    model = VideoDiT(**a.presets["1B"]).to(device, torch.bfloat16).eval()
    g = torch.Generator(device).manual_seed(0)
    text = torch.randn(1, a.text_len, model.config.text_dim, generator=g, device=device, dtype=torch.bfloat16)
    mask = torch.ones(1, a.text_len, dtype=torch.bool, device=device)
    null = torch.zeros_like(text)
    run = lambda steps: sample(model, [shape], text, mask, null, mask, guidance=5.0, steps=steps,  # noqa: E731
                               generator=g, progress=False)
    run(1)  # warm-up
    sync(device)
    tic = time.perf_counter()
    run(a.sample_steps)
    sync(device)
    per_step = (time.perf_counter() - tic) / a.sample_steps
    print(f"\n### Sampling, preset 1B (bf16 weights), {T}x{H}x{W} -> latent {shape} = {tokens} tokens, guidance "
          f"(2 x {tokens} tokens a step)\n")
    print("| steps timed | s/step | 50 steps (extrapolated) | peak memory |")
    print("|---|---|---|---|")
    print(f"| {a.sample_steps} | {per_step:.3f} | {50 * per_step:.1f} s | {peak(device)} |")
    del model


def bench_vae(a, device):
    H, W = a.vae_size
    vae = CausalVideoVAE(**VAE_PRESETS[a.vae]).to(device, torch.bfloat16).eval()
    print(f"\n### VAE streaming decode, CausalVideoVAE preset {a.vae!r} "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters), bf16, {H}x{W}\n")
    print("| frames | latent | seconds | peak memory |")
    print("|---|---|---|---|")
    for frames in a.vae_frames:
        z = torch.randn(1, vae.latent_channels, 1 + (frames - 1) // vae.ft, H // vae.fs, W // vae.fs, device=device,
                        dtype=torch.bfloat16)
        reset_memory(device)
        tic = time.perf_counter()
        with torch.no_grad():
            vae.decode_latents(z)
        sync(device)
        print(f"| {frames} | {tuple(z.shape[1:])} | {time.perf_counter() - tic:.2f} | {peak(device)} |", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU): proves the script runs")
    ap.add_argument("--only", choices=["train", "sample", "vae"], nargs="+", default=["train", "sample", "vae"])
    ap.add_argument("--settings", choices=SETTINGS, nargs="+", default=list(SETTINGS))
    ap.add_argument("--warmup", type=int, default=2, help="training warm-up steps (compile runs in them)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--sample-steps", type=int, default=3, help="timed sampling steps")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    a = ap.parse_args()
    diffusers_logging.set_verbosity_error()  # .to(bfloat16) on random models warns about float32 modules (none here)
    for k, v in (TINY if a.tiny else FULL).items():
        setattr(a, k, v)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
          f"{', tiny sizes' if a.tiny else ''}")
    for part in a.only:
        {"train": bench_train, "sample": bench_sample, "vae": bench_vae}[part](a, device)


if __name__ == "__main__":
    main()
