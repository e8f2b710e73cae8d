"""Training-step throughput and peak memory of VideoDiT on this machine, side by side:

1. VideoDiT against diffusers' WanTransformer3DModel at the same depth, width, heads, FFN, text and token count
   (a batch of equal-shape clips: Wan takes it as a (B, C, T, H, W) tensor, VideoDiT packed).
2. A mixed batch (an image, a wide clip, a tall clip, a long clip) packed, against the same VideoDiT on the batch
   padded to its largest member (each sample padded with zero tokens to the longest, attention within each padded
   sample, loss masked to the real tokens: the compute a padded trainer does).
3. The attention backends on the mixed batch (forward + backward; flex: forward only, it has no CPU backward).

Time: the cases of a comparison are built in one process and stepped in turn (A, B, A, B..., the order flipped each
round); ratios are medians of per-round ratios, robust to a shared machine's load. Memory: each case runs in a fresh
subprocess (alternating, medians over reps); "peak RSS" is that process's max RSS (imports, model, data, steps);
"step mem" is the RSS high-water mark during the steps above the RSS just before them, after handing freed heap back
to the OS and resetting the mark (activations, gradients, optimizer state).
Run: python bench/dit.py [--reps 3] [--steps 10] [--threads 1]
"""

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

import torch

PRESET = "tiny"
CLIP = (5, 16, 32)  # latent (T, H, W): a 17-frame 64x128 clip through a 4x4x4 VAE; 640 tokens at patch (1, 2, 2)
BATCH = 4
TEXT_LEN = 32
MIXED = [(1, 16, 16), (5, 16, 32), (5, 32, 16), (17, 16, 16)]  # image, wide, tall, long: 64 + 640 + 640 + 1088
GROUPS = [("videodit", "wan"), ("packed", "padded"), ("attn_loop", "attn_mask", "attn_flex")]


def proc_status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024


def reset_peak_rss():
    """Hand freed heap back to the OS and reset the process's RSS high-water mark (VmHWM); returns RSS now."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_mb("VmRSS")


def train_step(opt, step_fn):
    """One timed training step: forward, backward, AdamW."""
    t0 = time.perf_counter()
    step_fn().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def train_steps(model, step_fn, steps):
    """Warm up twice, then time `steps` steps; returns the median step time."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = [train_step(opt, step_fn) for _ in range(steps + 2)]
    return statistics.median(times[2:])


def interleaved(group, steps):
    """The cases of a group built in one process and stepped in turn (A, B, A, B..., the order flipping each round)
    -> per case: median step time, tokens, median over rounds of its step time over the first case's."""
    runs = {}
    for case in group:
        torch.manual_seed(0)
        model, step, tokens = build_case(case)
        runs[case] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4), step, tokens)
        for _ in range(2):  # warm-up
            train_step(*runs[case][1:3])
    times = {case: [] for case in group}
    for i in range(steps):
        for case in group if i % 2 == 0 else group[::-1]:
            times[case].append(train_step(*runs[case][1:3]))
    return {case: (statistics.median(times[case]), runs[case][3],
                   statistics.median(a / b for a, b in zip(times[case], times[group[0]]))) for case in group}


def build_case(case):
    """-> (model, step_fn returning the loss, tokens per step)."""
    from videodit.dit import PRESETS, VideoDiT
    import torch.nn.functional as F

    from videodit.patchify import Packed, pack

    torch.manual_seed(0)
    cfg = PRESETS[PRESET]
    c, d, heads = cfg["in_channels"], cfg["hidden_size"], cfg["num_heads"]
    shapes = [CLIP] * BATCH if case in ("videodit", "wan") else MIXED
    latents = [torch.randn(c, *s) for s in shapes]
    text = torch.randn(len(shapes), TEXT_LEN, cfg["text_dim"])
    t = torch.rand(len(shapes))
    if case == "wan":
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=d // heads,
                                      in_channels=c, out_channels=c, text_dim=cfg["text_dim"], freq_dim=256,
                                      ffn_dim=4 * d, num_layers=cfg["depth"])
        x, target = torch.stack(latents), torch.randn(BATCH, c, *CLIP)
        tokens = x[:, 0].numel() // 4

        def step():
            out = model(x, t * 1000, text, return_dict=False)[0]
            return (out - target).square().mean()
    else:
        model = VideoDiT(**cfg)
        if case.startswith("attn_"):
            model.attention_backend = case.removeprefix("attn_")
        packed = pack(latents)
        tokens = packed.tokens.shape[0]
        target = torch.randn_like(packed.tokens)
        if case == "padded":
            longest, n = max(packed.seqlens), packed.seqlens
            pad = [(0, 0, 0, longest - k) for k in n]  # zero tokens at the end of each sample
            padded = Packed(torch.cat([F.pad(x, p) for x, p in zip(packed.tokens.split(n), pad)]),
                            torch.cat([F.pad(x, p) for x, p in zip(packed.coords.split(n), pad)]),
                            torch.arange(len(n) + 1, dtype=torch.int32) * longest,
                            torch.arange(len(n)).repeat_interleave(longest), [(1, 1, longest)] * len(n))
            real = torch.cat([torch.arange(longest) < k for k in n])  # (B * longest,) loss mask
            target = torch.randn_like(padded.tokens)
            packed = padded

            def step():
                return (model(packed, t, text)[real] - target[real]).square().mean()
        elif case == "attn_flex":
            def step():
                with torch.no_grad():
                    model(packed, t, text)
                return torch.zeros((), requires_grad=True)
        else:
            def step():
                return (model(packed, t, text) - target).square().mean()
    return model, step, tokens


def run_case(case, steps):
    """In a fresh process: memory (and a time) of one case."""
    model, step, tokens = build_case(case)
    params = sum(p.numel() for p in model.parameters())
    setup_peak = proc_status_mb("VmHWM")  # (ru_maxrss would carry the parent's peak over fork/exec)
    before = reset_peak_rss()
    sec = train_steps(model, step, steps)
    peak = max(setup_peak, proc_status_mb("VmHWM"))
    print(json.dumps(dict(tokens_per_s=tokens / sec, step_s=sec, peak_mb=peak, step_mb=proc_status_mb("VmHWM") - before,
                          params=params, tokens=tokens)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--case", choices=[c for g in GROUPS for c in g],
                    help="run one case alone, printing one JSON line (what each memory run does)")
    args = ap.parse_args()
    for name in ("reps", "steps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    if args.case:
        return run_case(args.case, args.steps)

    results = {c: [] for g in GROUPS for c in g}
    for rep in range(args.reps):
        for group in GROUPS:
            for case in group if rep % 2 == 0 else group[::-1]:
                out = subprocess.run([sys.executable, __file__, "--case", case, "--steps", "3",
                                      "--threads", str(args.threads)],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"case {case} failed:\n{out.stderr}")
                results[case].append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    speed = {}
    for group in GROUPS:  # after the memory runs: the subprocesses start from a small parent
        speed.update(interleaved(group, args.steps))
        print(f"timed {group}", file=sys.stderr)

    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
    print(f"preset {PRESET}; time: {args.steps} interleaved steps per case in one process, medians; memory: "
          f"{args.reps} fresh processes per case, medians; threads {torch.get_num_threads()}; "
          f"step = forward + backward + AdamW\n")
    print("| case | tokens | params | step s | tokens/s | step time vs first of group | peak RSS MB | step mem MB |")
    print("|---|---|---|---|---|---|---|---|")
    for c, m in med.items():
        sec, tokens, ratio = speed[c]
        print(f"| {c} | {tokens} | {m['params'] / 1e6:.2f}M | {sec:.3f} | {tokens / sec:.0f} | {ratio:.2f} "
              f"| {m['peak_mb']:.0f} | {m['step_mb']:.0f} |")
    print("\n(packed and padded carry the same 2432 real tokens, padded computes on 4 x 1088; attn_flex: forward only "
          "under no_grad, flex attention has no CPU backward)")
    print(f"memory_vs_wan: {med['videodit']['peak_mb'] / med['wan']['peak_mb']:.2f} (peak RSS), "
          f"{med['videodit']['step_mb'] / med['wan']['step_mb']:.2f} (step mem)")
    print(f"throughput_vs_wan: {speed['wan'][2]:.2f}")
    print(f"packed_vs_padded: {speed['padded'][2]:.2f}")


if __name__ == "__main__":
    main()
