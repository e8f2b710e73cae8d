"""The GPU numbers: training throughput and MFU, sampling latency, VAE decode memory. Random weights: timings only.

    python bench/gpu.py                    # on a GPU: presets B and 1B at 16k and 32k tokens, 480p 81-frame sampling
    python bench/gpu.py --tiny             # the same code at tiny sizes (runs on CPU in about a minute)
    python bench/gpu.py --only train --settings base ckpt_all compile+cudnn --presets 1B --lengths 16384

1. Training step (forward, backward, AdamW) on a packed batch of three samples (token shares 1/2, 1/4, 1/4; text
   of 226 tokens), bf16 autocast over fp32 weights unless a setting says otherwise: tokens/s, TFLOP/s (FLOPs from
   videodit.flops: 3 x forward), MFU against --peak-tflops (989: H100 SXM dense bf16), peak memory. Settings:
   base; compile (VideoDiT.compile_blocks, dynamic shapes; with static: specialized to the batch); cudnn
   (SDPA's cuDNN attention kernel only); ckpt_all / ckpt_every_2 / ckpt_attention / ckpt_mlp (activation
   checkpointing policies); bf16_weights (weights and AdamW state in bf16, no autocast); one_sample (one video
   of all the tokens instead of three). Joined with "+" they combine (compile+static+cudnn). By default each runs
   alone, static as compile+static.
2. Attention (`--only attention`): forward, and backward, of each SDPA kernel alone at the batch's segment lengths,
   with q, k, v contiguous and as strided views of one packed tensor (the model's layout).
3. Sampling: preset 1B, 480x832, 81 frames (latent 16 x 21 x 60 x 104, 32760 tokens), guidance (2 x 32760 tokens a
   step), bf16 weights: seconds per step over a few steps after a warm-up, extrapolated to 50 steps.
4. VAE: the standard CausalVideoVAE (113M, 4x8x8), bf16, streaming decode of 81 and 321 frames at 480x832: seconds
   and peak memory.
The attention backend is packed_attention's default: flash-attn's varlen kernel where installed, else one SDPA call
per sample (PyTorch picks SDPA's kernel unless "cudnn" is set). `--profile ROWS` prints the top GPU kernels of one
more step of each training case. A failing case prints its error and the run goes on. Peak memory is
torch.cuda.max_memory_allocated (reset before each case); on CPU it is not measured.
"""

import argparse
import contextlib
import gc
import time

import torch
from diffusers.utils import logging as diffusers_logging
from torch.nn.attention import SDPBackend, sdpa_kernel

from videodit.attention import default_backend
from videodit.dit import PRESETS, VideoDiT
from videodit.flops import flops_per_step
from videodit.flow import sample
from videodit.patchify import pack
from videodit.vae import VAE_PRESETS, CausalVideoVAE

SETTINGS = ("base", "compile", "static", "cudnn", "ckpt_all", "ckpt_every_2", "ckpt_attention", "ckpt_mlp",
            "bf16_weights", "one_sample")
DEFAULT_SETTINGS = ("base", "compile", "compile+static", "cudnn", "ckpt_all", "ckpt_every_2", "ckpt_attention",
                    "ckpt_mlp", "bf16_weights", "one_sample")
SDPA_KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
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


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    x, y = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(reps):
        x @ y
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - tic) / 1e12


def batch_shapes(tokens: int, channels: int, side: int) -> list:
    """Latent shapes (C, T, H, W) of three samples with 1/2, 1/4, 1/4 of `tokens` (patch 1x2x2): two square, one
    wide; tokens must be a multiple of 4 * side^2."""
    per_frame = side * side
    t1, t2 = tokens // 2 // per_frame, tokens // 4 // per_frame
    if t2 == 0 or tokens % (4 * per_frame):
        raise ValueError(f"tokens must be a multiple of {4 * per_frame}, got {tokens}")
    return [(channels, t1, 2 * side, 2 * side), (channels, t2, 2 * side, 2 * side), (channels, t2, side, 4 * side)]


def setting(text: str) -> set:
    parts = set(text.split("+"))
    if not parts <= set(SETTINGS):
        raise argparse.ArgumentTypeError(f"unknown setting {text!r}; settings are {', '.join(SETTINGS)}, joined by +")
    if "static" in parts and "compile" not in parts:
        raise argparse.ArgumentTypeError(f"{text!r}: static only specializes compile; use compile+static")
    return parts


def train_case(cfg: dict, tokens: int, parts: set, a, device) -> str:
    """One table row's cells after the name: tokens/s | TFLOP/s | MFU | peak memory."""
    reset_memory(device)
    torch.manual_seed(0)
    with device:  # initialized in place: a 1B model's init on the CPU takes longer than its steps
        model = VideoDiT(**cfg)
    weights_bf16 = "bf16_weights" in parts
    if weights_bf16:
        model.to(torch.bfloat16)
    for policy in [p[len("ckpt_"):] for p in parts if p.startswith("ckpt_")]:
        model.set_checkpoint_policy(policy)
    if "compile" in parts:
        model.compile_blocks(dynamic="static" not in parts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    shapes = batch_shapes(tokens, cfg["in_channels"], a.side)
    if "one_sample" in parts:
        shapes = [(cfg["in_channels"], tokens // a.side ** 2, 2 * a.side, 2 * a.side)]
    g = torch.Generator(device).manual_seed(0)
    packed = pack([torch.randn(s, generator=g, device=device) for s in shapes])
    target = torch.randn(packed.tokens.shape, generator=g, device=device)
    text = torch.randn(len(shapes), a.text_len, cfg["text_dim"], generator=g, device=device)
    t = torch.rand(len(shapes), generator=g, device=device)
    kernels = (lambda: sdpa_kernel(SDPA_KERNELS["cudnn"])) if "cudnn" in parts else contextlib.nullcontext

    def step():
        with kernels(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=not weights_bf16):
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
        seconds = (time.perf_counter() - tic) / a.steps
        if a.profile:
            with torch.profiler.profile() as prof:
                step()
                sync(device)
            key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=a.profile, max_name_column_width=60))
    except torch.OutOfMemoryError:
        return "OOM | - | - | -"
    except Exception as e:  # a backend or compile failure on this platform: report it, go on with the next case
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | - | - | -"
    finally:
        del model, opt
    tflops = flops_per_step(cfg, packed.seqlens, a.text_len) / seconds / 1e12
    return f"{tokens / seconds:,.0f} | {tflops:.3g} | {100 * tflops / a.peak_tflops:.3g}% | {peak(device)}"


def bench_train(a, device):
    print(f"\n### Training step (forward + backward + AdamW), packed batch of 3 samples, text {a.text_len} tokens, "
          f"attention backend {default_backend(torch.zeros(1, device=device, dtype=torch.bfloat16))!r}, "
          f"{a.warmup} warm-up + {a.steps} timed steps, MFU vs {a.peak_tflops:g} TFLOP/s\n")
    print("| preset | tokens | setting | tokens/s | TFLOP/s | MFU | peak memory |")
    print("|---|---|---|---|---|---|---|")
    for name in a.preset_names or a.presets:
        for tokens in a.token_counts or a.lengths:
            for text in a.settings:
                cells = train_case(a.presets[name], tokens, setting(text), a, device)
                print(f"| {name} | {tokens} | {text} | {cells} |", flush=True)


def bench_attention(a, device):
    """Forward, and forward + backward, of each SDPA kernel alone over the segments of the training batch (heads of
    128), in two layouts: q, k, v contiguous (b, heads, n, dim), and strided views of one packed (n, 3, heads, dim)
    tensor, as the model's qkv projection leaves them."""
    tokens = (a.token_counts or a.lengths)[0]
    lengths = [c[1] * c[2] * c[3] // 4 for c in batch_shapes(tokens, 16, a.side)]
    heads = 12 if not a.tiny else 2
    g = torch.Generator(device).manual_seed(0)
    flops = sum(4 * heads * n * n * 128 for n in lengths)  # forward 4 n^2 d per head; backward twice that
    print(f"\n### Attention kernels, segments {lengths}, {heads} heads of 128, bf16\n")
    print("| SDPA kernel | layout | forward ms | TFLOP/s | backward ms | TFLOP/s |")
    print("|---|---|---|---|---|---|")
    for layout in ("contiguous", "packed views"):
        if layout == "contiguous":
            qkv = [[torch.randn(1, heads, n, 128, generator=g, device=device, dtype=torch.bfloat16)
                    .requires_grad_() for _ in range(3)] for n in lengths]
        else:
            leaves = [torch.randn(n, 3, heads, 128, generator=g, device=device, dtype=torch.bfloat16)
                      .requires_grad_() for n in lengths]
            qkv = [[x[None, :, i].transpose(1, 2) for i in range(3)] for x in leaves]
        for name, kernel in SDPA_KERNELS.items():
            def run(backward):
                with sdpa_kernel(kernel), torch.set_grad_enabled(backward):
                    for x in qkv:
                        out = torch.nn.functional.scaled_dot_product_attention(*x)
                        if backward:
                            out.backward(torch.ones_like(out))
            try:
                times = []
                for backward in (False, True):
                    run(backward)
                    sync(device)
                    tic = time.perf_counter()
                    for _ in range(5):
                        run(backward)
                    sync(device)
                    times.append((time.perf_counter() - tic) / 5)
                fwd, bwd = times[0], times[1] - times[0]
                print(f"| {name} | {layout} | {1e3 * fwd:.1f} | {flops / fwd / 1e12:.0f} | {1e3 * bwd:.1f} | "
                      f"{2 * flops / bwd / 1e12:.0f} |", flush=True)
            except RuntimeError as e:
                print(f"| {name} | {layout} | failed: {str(e).splitlines()[0][:120]} | - | - | - |", flush=True)


def bench_sample(a, device):
    T, H, W = a.sample_size
    shape = (16, 1 + (T - 1) // 4, H // 8, W // 8)
    tokens = shape[1] * shape[2] // 2 * shape[3] // 2
    reset_memory(device)
    torch.manual_seed(0)
    with device:
        model = VideoDiT(**a.presets["1B"]).to(torch.bfloat16).eval()
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
    with device:
        vae = CausalVideoVAE(**VAE_PRESETS[a.vae]).to(torch.bfloat16).eval()
    print(f"\n### VAE streaming decode, CausalVideoVAE preset {a.vae!r} "
          f"({sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters), bf16, {H}x{W}\n")
    print("| frames | latent | seconds | peak memory |")
    print("|---|---|---|---|")
    for frames in a.vae_frames:
        z = torch.randn(1, vae.denoiser_channels, 1 + (frames - 1) // vae.ft, H // vae.fs, W // vae.fs, device=device,
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
    ap.add_argument("--only", choices=["train", "attention", "sample", "vae"], nargs="+",
                    default=["train", "attention", "sample", "vae"])
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="print the top ROWS kernels of one more step of each case")
    ap.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), type=lambda x: setting(x) and x,
                    help=f"any of {', '.join(SETTINGS)}, or several joined by + (compile+cudnn); default: "
                         f"{' '.join(DEFAULT_SETTINGS)}")
    ap.add_argument("--presets", dest="preset_names", nargs="+", choices=["B", "1B"], help="default: both")
    ap.add_argument("--lengths", dest="token_counts", nargs="+", type=int, help="tokens per step (default 16k, 32k)")
    ap.add_argument("--warmup", type=int, default=2, help="training warm-up steps (compile runs in them)")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps")
    ap.add_argument("--sample-steps", type=int, default=3, help="timed sampling steps")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    a = ap.parse_args()
    for name in ("steps", "sample_steps"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    for name in ("warmup", "profile"):
        if getattr(a, name) < 0:
            ap.error(f"--{name} must be at least 0, got {getattr(a, name)}")
    if not 0 < a.peak_tflops < float("inf"):
        ap.error(f"--peak-tflops must be a positive number (the device's dense bf16 TFLOP/s), got {a.peak_tflops:g}")
    unit = 4 * (TINY if a.tiny else FULL)["side"] ** 2  # batch_shapes: three samples of 1/2, 1/4, 1/4 of the tokens
    for n in a.token_counts or []:
        if n < unit or n % unit:
            lo = max(unit, n // unit * unit)
            ap.error(f"--lengths must be multiples of {unit}{' with --tiny' if a.tiny else ''} (three samples of "
                     f"whole frames), e.g. {lo} or {lo + unit}; got {n}")
    diffusers_logging.set_verbosity_error()  # .to(bfloat16) on random models warns about float32 modules (none here)
    for k, v in (TINY if a.tiny else FULL).items():
        setattr(a, k, v)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}"
          f"{', tiny sizes' if a.tiny else ''}")
    if device.type == "cuda":
        print(f"bf16 8192^3 matmul: {matmul_tflops():.0f} TFLOP/s (the achievable ceiling; MFU is against "
              f"{a.peak_tflops:g})")
    for part in a.only:
        {"train": bench_train, "attention": bench_attention, "sample": bench_sample, "vae": bench_vae}[part](a, device)


if __name__ == "__main__":
    main()
