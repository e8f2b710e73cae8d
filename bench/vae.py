"""VAE benchmark: ours (CausalVideoVAE, "tiny" preset) vs diffusers' AutoencoderKLWan at a matched parameter count.

1. Reconstruction: both train with the same budget (data, steps, batch, optimizer, lr, loss) on crops of the first 80%
   of a real street video, then PSNR / SSIM on the held-out last 20% (full frames, 17-frame clips).
2. Memory: peak resident memory (VmHWM of a fresh subprocess per case, reset after model load and a warm-up) of
   our streaming decode of 17, 65 and 257 frames at 128x128.
3. Throughput: frames/s encoded and decoded, ours vs the same Wan, same sizes, in this run.

The video is OpenCV's sample vtest.avi (768x576, 795 frames):
    apt-get download opencv-doc
    dpkg-deb --fsys-tarfile opencv-doc_*.deb | tar -x --strip-components=7 --wildcards '*vtest.avi'
    python bench/vae.py --video vtest.avi
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from diffusers import AutoencoderKLWan

from videodit.data.video import from_uint8
from videodit.vae import VAE_PRESETS, CausalVideoVAE
from videodit.vae_loss import VAELoss

# 4x4x4 compression, 8 latent channels, 1.76M parameters (the shapes-world baseline's Wan VAE)
WAN_CONFIG = dict(base_dim=16, decoder_base_dim=32, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
                  temperal_downsample=[True, True], latents_mean=[0.0] * 8, latents_std=[1.0] * 8)
HEIGHT, WIDTH = 96, 128  # vtest.avi's 768x576 frames, resized


def build(name, seed=0):
    torch.manual_seed(seed)
    if name == "ours":
        return CausalVideoVAE(**VAE_PRESETS["tiny"])
    return AutoencoderKLWan(**WAN_CONFIG)


def reconstruct(name, model, x, sample):
    # x: (B, 3, T, H, W) -> (recon, posterior)
    if name == "ours":
        return model(x, sample_posterior=sample)
    posterior = model.encode(x).latent_dist
    return model.decode(posterior.sample() if sample else posterior.mode()).sample, posterior


def load_video(path, height, width):
    import decord
    vr = decord.VideoReader(path, width=width, height=height)
    frames = vr.get_batch(list(range(len(vr)))).asnumpy()  # (N, H, W, 3) uint8
    return from_uint8(frames)  # (3, N, H, W) in [-1, 1]


def train_clips(video, batch, T, crop, g):
    # video: (3, N, H, W) -> (batch, 3, T, crop, crop), random start and crop
    _, N, H, W = video.shape
    out = []
    for _ in range(batch):
        t = int(torch.randint(0, N - T + 1, (1,), generator=g))
        i = int(torch.randint(0, H - crop + 1, (1,), generator=g))
        j = int(torch.randint(0, W - crop + 1, (1,), generator=g))
        out.append(video[:, t:t + T, i:i + crop, j:j + crop])
    return torch.stack(out)


def train(name, video, args):
    model = build(name).train()
    loss_fn = VAELoss(perceptual_weight=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)  # the same clips for both models
    start = time.time()
    for step in range(args.steps):
        x = train_clips(video, args.batch, args.frames, args.crop, g)
        recon, posterior = reconstruct(name, model, x, sample=True)
        loss, logs = loss_fn(x, recon, posterior, step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"  {name} step {step} loss {loss.item():.4f} l1 {logs['l1'].item():.4f}", file=sys.stderr)
    return model.eval(), (time.time() - start) / args.steps


@torch.no_grad()
def evaluate(name, model, video, T):
    from skimage.metrics import structural_similarity  # checked in main

    # held-out full frames, non-overlapping T-frame clips; PSNR and SSIM per clip, averaged
    psnrs, ssims = [], []
    for t in range(0, video.shape[1] - T + 1, T):
        x = video[None, :, t:t + T]
        recon = reconstruct(name, model, x, sample=False)[0].clamp(-1, 1)
        mse = ((recon - x) ** 2).mean().item()
        psnrs.append(10 * np.log10(4 / mse))
        a, b = ((v[0].permute(1, 2, 3, 0).numpy() + 1) / 2 for v in (x, recon))  # (T, H, W, 3) in [0, 1]
        ssims.append(np.mean([structural_similarity(a[k], b[k], channel_axis=-1, data_range=1.0) for k in range(T)]))
    return float(np.mean(psnrs)), float(np.mean(ssims))


@torch.no_grad()
def throughput(model, T, size, repeats=3):
    x = torch.rand(1, 3, T, size, size) * 2 - 1
    enc = dec = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        z = model.encode(x).latent_dist.mode()
        t1 = time.perf_counter()
        model.decode(z)
        t2 = time.perf_counter()
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
    return T / enc, T / dec


def _proc_status_mb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def memory_case(T, size):
    """Run in a fresh process: resident memory of a streaming decode of T frames at size x size. Linux keeps
    ru_maxrss across fork/exec (the parent's peak leaks in), so this reads VmHWM from /proc, reset after warm-up
    with clear_refs."""
    torch.set_num_threads(1)
    vae = build("ours").eval()
    z = torch.randn(1, vae.latent_channels, 1 + (T - 1) // vae.ft, size // vae.fs, size // vae.fs)
    with torch.no_grad():
        vae.decode(z[:, :, :2])  # warm up: allocator, kernels, one chunk's activations
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        before = _proc_status_mb("VmRSS:")
        out = vae.decode(z).sample
    peak = _proc_status_mb("VmHWM:")
    print(json.dumps(dict(T=T, before_mb=before, peak_mb=peak, output_mb=out.numel() * 4 / 2 ** 20)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default="/tmp/usr/share/doc/opencv-doc/examples/data/vtest.avi")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    p.add_argument("--skip-train", action="store_true", help="only memory and throughput")
    p.add_argument("--memory-case", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_case:  # a child process of the memory table: no training, no SSIM
        return memory_case(args.memory_case, 128)
    ft, fs = VAE_PRESETS["tiny"]["temporal_factor"], VAE_PRESETS["tiny"]["spatial_factor"]  # Wan's are the same
    for name in ("steps", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.frames < 1 or (args.frames - 1) % ft:
        k = max(0, (args.frames - 1) // ft)
        p.error(f"--frames must be 1 + {ft}*k (both VAEs compress time {ft}x), e.g. {1 + ft * k} or "
                f"{1 + ft * (k + 1)}; got {args.frames}")
    if args.crop > min(HEIGHT, WIDTH):
        p.error(f"--crop must be at most {min(HEIGHT, WIDTH)} (the frames are {WIDTH}x{HEIGHT}), got {args.crop}")
    if args.crop < 1 or args.crop % fs:
        lo = max(fs, args.crop // fs * fs)
        p.error(f"--crop must be a multiple of {fs} (both VAEs' spatial factor), e.g. {lo} or {lo + fs}; "
                f"got {args.crop}")
    if not args.skip_train and importlib.util.find_spec("skimage") is None:
        sys.exit("bench/vae.py measures SSIM with scikit-image: pip install scikit-image (or --skip-train)")
    torch.set_num_threads(args.threads)
    params = {name: sum(q.numel() for q in build(name).parameters()) / 1e6 for name in ("ours", "wan")}

    rows = []
    models = {name: build(name).eval() for name in ("ours", "wan")}
    if not args.skip_train:
        if not os.path.exists(args.video):
            sys.exit(f"{args.video} not found; get vtest.avi with:\n  apt-get download opencv-doc && dpkg-deb "
                     f"--fsys-tarfile opencv-doc_*.deb | tar -x --strip-components=7 --wildcards '*vtest.avi'\n"
                     f"then pass --video vtest.avi (or --skip-train)")
        frames = load_video(args.video, HEIGHT, WIDTH)  # 768x576 -> 128x96
        split = int(0.8 * frames.shape[1])
        if args.frames > split:
            p.error(f"--frames must be at most {split}, the training part of {args.video}, got {args.frames}")
        train_part, held_out = frames[:, :split], frames[:, split:]
        res = {}
        for name in ("ours", "wan"):
            print(f"training {name} ({params[name]:.2f}M parameters)", file=sys.stderr)
            models[name], sec = train(name, train_part, args)
            res[name] = (*evaluate(name, models[name], held_out, 17), sec)
        print(f"\nBudget: {args.steps} steps x batch {args.batch} of {args.frames}x{args.crop}x{args.crop} crops of "
              f"frames 0-{split - 1} of vtest.avi at 128x96, AdamW lr {args.lr}, VAELoss(perceptual_weight=0.2) "
              f"(L1 + 0.2 MS-SSIM + 1e-6 KL), {args.threads} thread(s). Held out: frames {split}-"
              f"{frames.shape[1] - 1}, full 128x96 frames, {held_out.shape[1] // 17} clips of 17 frames.\n")
        rows += [("held-out PSNR (dB)", res["ours"][0], res["wan"][0], res["ours"][0] - res["wan"][0], "diff"),
                 ("held-out SSIM", res["ours"][1], res["wan"][1], res["ours"][1] / res["wan"][1], "ratio"),
                 ("train s/step", res["ours"][2], res["wan"][2], res["wan"][2] / res["ours"][2], "wan/ours")]
    for size in (64, 128):
        (oe, od), (we, wd) = (throughput(models[name], 17, size) for name in ("ours", "wan"))
        rows += [(f"encode frames/s, 17x{size}x{size}", oe, we, oe / we, "ours/wan"),
                 (f"decode frames/s, 17x{size}x{size}", od, wd, od / wd, "ours/wan")]

    print(f"| | ours ({params['ours']:.2f}M) | AutoencoderKLWan ({params['wan']:.2f}M) | ratio |")
    print("|---|---|---|---|")
    for label, a, b, r, kind in rows:
        print(f"| {label} | {a:.3f} | {b:.3f} | {r:.3f} ({kind}) |")

    print("\nStreaming decode memory, ours, 128x128, fresh process per case, 1 thread; peak = VmHWM during the "
          "decode (model, libraries and warm-up included):\n")
    print("| frames | peak RSS (MB) | after warm-up (MB) | growth (MB) | output tensor (MB) | peak / peak(17) |")
    print("|---|---|---|---|---|---|")
    base = None
    for T in (17, 65, 257):
        out = subprocess.run([sys.executable, __file__, "--memory-case", str(T)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench/vae.py: the memory case of {T} frames failed (exit {out.returncode}): "
                     f"{(out.stderr.strip().splitlines() or ['no error output'])[-1]}")
        m = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or m["peak_mb"]
        print(f"| {T} | {m['peak_mb']:.0f} | {m['before_mb']:.0f} | {m['peak_mb'] - m['before_mb']:.0f} | "
              f"{m['output_mb']:.0f} | {m['peak_mb'] / base:.3f} |")


if __name__ == "__main__":
    main()
