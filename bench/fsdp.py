"""Training state per process, DDP against FSDP (`parallel.fsdp`), measured on CPU processes over gloo.

    python bench/fsdp.py [--preset B] [--ranks 2] [--steps 3]

Each setting runs in fresh processes: a VideoDiT preset, AdamW and an EMA of the weights, as train.py keeps them
(under FSDP process 0 builds the weights and the others only the architecture, on the meta device, as train.py does),
trained a few steps on one random 64-token sample per rank (16 x 1 x 16 x 16 latents, 16 text tokens). Measured per
process: the bytes of its weights, gradients, optimizer state and EMA (a sharded tensor counts its local shard), the
peak resident memory (VmHWM, the interpreter and torch included) once the model is built and sharded and after the
steps, and the mean time of a step and of its parts
(forward + backward with their collectives, the optimizer step, the EMA update). Then, from the same accounting,
what each preset's state would take per GPU at 8 and 64 GPUs; and FSDP's step under bf16 autocast with the weights
gathered in fp32 against in bf16 (`parallel.fsdp_param_dtype`).
"""

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor

from videodit.dit import PRESETS, VideoDiT
from videodit.flops import param_count
from videodit.flow import flow_loss
from videodit.train import sharded

STATE = ("weights", "gradients", "optimizer", "ema")
TIMES = {"step": "step time", "fwd_bwd": "forward + backward", "opt": "optimizer step", "ema_s": "EMA update"}


def _bytes(tensors) -> int:
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


# name: (sharded, bf16 autocast, the dtype FSDP gathers the weights in)
SETTINGS = {"ddp": (False, False, None), "fsdp": (True, False, "fp32"), "fsdp_autocast": (True, True, "fp32"),
            "fsdp_autocast_bf16_gather": (True, True, "bf16")}


def _worker(rank, world, init_file, preset, setting, steps, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    fsdp, autocast, gather = SETTINGS[setting]
    try:
        torch.manual_seed(0)
        with torch.device("meta" if fsdp and rank > 0 else "cpu"):  # as train.py builds it
            model = VideoDiT(**PRESETS[preset])
        if fsdp:
            sharded.shard(model, "cpu", gather)
        else:
            model = torch.nn.parallel.DistributedDataParallel(model)
            model.patch_size = model.module.patch_size
        built = _peak_rss()
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # as train.py
        ema = EMAModel(params, decay=0.999, foreach=not fsdp)
        gen = torch.Generator().manual_seed(rank)
        latents = [torch.randn(PRESETS[preset]["in_channels"], 1, 16, 16, generator=gen)]
        text = torch.randn(1, 16, PRESETS[preset]["text_dim"], generator=gen)
        times = []
        for _ in range(steps + 1):  # the first is a warm-up
            tic = [time.perf_counter()]
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                loss = flow_loss(model, latents, text, None, generator=gen)
            loss.backward()
            tic.append(time.perf_counter())
            state = dict(weights=_bytes(params), gradients=_bytes(p.grad for p in params),
                         optimizer=_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)),
                         ema=_bytes(ema.shadow_params))
            tic.append(time.perf_counter())  # the accounting above is left out
            opt.step()
            opt.zero_grad(set_to_none=True)
            tic.append(time.perf_counter())
            ema.step(params)
            tic.append(time.perf_counter())
            times.append([tic[1] - tic[0], tic[3] - tic[2], tic[4] - tic[3]])
        state["optimizer"] = _bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
        parts = [sum(t[i] for t in times[1:]) / steps for i in range(3)]
        results[rank] = dict(state, built=built, peak=_peak_rss(), step=sum(parts), fwd_bwd=parts[0], opt=parts[1],
                             ema_s=parts[2])
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(preset: str, setting: str, ranks: int, steps: int) -> dict:
    """The largest value over the ranks of each measure, and the peak memory of process 0 and of the others."""
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(ranks, os.path.join(d, "rendezvous"), preset, setting, steps, results), nprocs=ranks)
        got = {k: max(r[k] for r in results.values()) for k in (*STATE, *TIMES)}
        for k in ("built", "peak"):
            got[f"{k}_0"] = results[0][k]
            got[f"{k}_others"] = max(results[r][k] for r in range(1, ranks))
        return got


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="B", choices=list(PRESETS))
    ap.add_argument("--ranks", type=int, default=2, help="processes, at least 2")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    if a.ranks < 2:
        ap.error(f"--ranks must be at least 2 (the other processes are compared with process 0), got {a.ranks}")
    if a.steps < 1:
        ap.error(f"--steps must be at least 1 (timed steps after one warm-up step), got {a.steps}")
    got = {setting: run(a.preset, setting, a.ranks, a.steps) for setting in SETTINGS}
    mb = 2 ** 20
    print(f"VideoDiT {a.preset} ({param_count(PRESETS[a.preset]) / 1e6:.1f}M parameters), {a.ranks} CPU processes "
          f"(gloo), AdamW + EMA, fp32 weights; the largest value over the processes unless named\n")
    print("| per process | DDP | FSDP | FSDP / DDP |")
    print("|---|---|---|---|")
    names = {"built_0": "peak resident memory (VmHWM) once the model is built and sharded, process 0",
             "built_others": "the same, the other processes",
             "peak_0": "peak resident memory (VmHWM) after the steps, process 0",
             "peak_others": "the same, the other processes"}
    for k in (*STATE, *names):
        name = names.get(k, k)
        print(f"| {name} | {got['ddp'][k] / mb:,.0f} MB | {got['fsdp'][k] / mb:,.0f} MB | "
              f"{got['fsdp'][k] / got['ddp'][k]:.2f}x |")
    total = {m: sum(got[m][k] for k in STATE) for m in ("ddp", "fsdp")}
    print(f"| training state | {total['ddp'] / mb:,.0f} MB | {total['fsdp'] / mb:,.0f} MB | "
          f"{total['fsdp'] / total['ddp']:.2f}x |")
    for k, name in TIMES.items():  # 64 tokens a process, 1 thread each
        print(f"| {name} | {got['ddp'][k]:.2f} s | {got['fsdp'][k]:.2f} s | {got['fsdp'][k] / got['ddp'][k]:.2f}x |")
    per_param = total["ddp"] / param_count(PRESETS[a.preset])
    print(f"\nTraining state per GPU at {per_param:.0f} bytes a parameter (as measured; activations not included):\n")
    print("| preset | parameters | DDP | FSDP, 8 GPUs | FSDP, 64 GPUs |")
    print("|---|---|---|---|---|")
    for name, kw in PRESETS.items():
        n = param_count(kw) * per_param / 2 ** 30
        print(f"| {name} | {param_count(kw) / 1e6:,.1f}M | {n:.1f} GB | {n / 8:.2f} GB | {n / 64:.3f} GB |")
    print("\nFSDP under bf16 autocast (train.mixed_precision: bf16), the weights gathered in fp32 or in bf16 "
          "(parallel.fsdp_param_dtype):\n")
    print("| per process | fp32 gather | bf16 gather | bf16 / fp32 |")
    print("|---|---|---|---|")
    a32, a16 = got["fsdp_autocast"], got["fsdp_autocast_bf16_gather"]
    for k, name in TIMES.items():
        print(f"| {name} | {a32[k]:.2f} s | {a16[k]:.2f} s | {a16[k] / a32[k]:.2f}x |")
    for k in ("peak_0", "peak_others"):
        print(f"| {names[k]} | {a32[k] / mb:,.0f} MB | {a16[k] / mb:,.0f} MB | {a16[k] / a32[k]:.2f}x |")


if __name__ == "__main__":
    main()
