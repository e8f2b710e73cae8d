"""Sequence-parallel scaling on CPU: tokens/s of one VideoDiT forward + backward against the sequence length, on one
process and on a sequence-parallel group of 2 (Ulysses over gloo), one thread per process.

    python bench/scaling.py [--lengths 1024 2048 4096 8192] [--ranks 1 2] [--repeats 3]

Each length is one sample (a 1 x 32 x (L/32) patch grid, t=1). Both settings use one thread per process, so 2 ranks
use twice the cores: the ratio shows what the all-to-alls cost and what splitting the sequence gains. The model is
small (depth 4, width 256, 4 heads): attention's share grows with the length as on a GPU at full size.
"""

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from videodit.dit import VideoDiT
from videodit.patchify import pack

MODEL = dict(in_channels=16, hidden_size=256, depth=4, num_heads=4, text_dim=64)


def measure(lengths, repeats, group=None) -> dict:
    """{length: the best seconds of `repeats` forward + backward passes (best: robust to other jobs' load)}."""
    torch.manual_seed(0)
    model = VideoDiT(**MODEL)
    model.set_sequence_parallel(group)
    text = torch.randn(1, 16, MODEL["text_dim"])
    out = {}
    for n in lengths:
        latent = torch.randn(MODEL["in_channels"], 1, 64, 2 * n // 32)  # (C, 1, 64, 2L/32): L tokens of patch 1x2x2
        packed = pack([latent])
        times = []
        for i in range(repeats + 1):  # the first is a warm-up
            if group is not None:
                dist.barrier(group)
            tic = time.perf_counter()
            model(packed, torch.tensor([0.5]), text).square().mean().backward()
            if i:
                times.append(time.perf_counter() - tic)
        out[n] = min(times)
    return out


def _worker(rank, world, init_file, lengths, repeats, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        got = measure(lengths, repeats, dist.group.WORLD)
        if rank == 0:
            results.update(got)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(ranks: int, lengths, repeats) -> dict:
    if ranks == 1:
        torch.set_num_threads(1)
        return measure(lengths, repeats)
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(ranks, os.path.join(d, "rendezvous"), lengths, repeats, results), nprocs=ranks)
        return dict(results)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    for n in a.lengths:  # the grid is 32 tokens high, so a length is 32 x its width in tokens
        if n < 32 or n % 32:
            lo = max(32, n // 32 * 32)
            ap.error(f"--lengths must be multiples of 32 (a 1 x 32 x L/32 patch grid), e.g. {lo} or {lo + 32}; "
                     f"got {n}")
    heads = MODEL["num_heads"]
    for r in a.ranks:
        if r < 1 or heads % r:
            ap.error(f"--ranks must divide the model's {heads} heads (Ulysses splits them): "
                     f"{', '.join(str(d) for d in range(1, heads + 1) if heads % d == 0)}; got {r}")
    if a.repeats < 1:
        ap.error(f"--repeats must be at least 1 (timed passes after one warm-up pass), got {a.repeats}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {r: run(r, a.lengths, a.repeats) for r in a.ranks}
    print(f"VideoDiT {MODEL}, forward + backward of one sample, CPU, 1 thread per process, sequence parallel "
          f"(Ulysses, gloo) over the ranks; best of {a.repeats}\n")
    print("| tokens | " + " | ".join(f"{r} rank{'s' * (r > 1)}: tokens/s" for r in a.ranks) +
          "".join(f" | speed-up {r} vs {a.ranks[0]}" for r in a.ranks[1:]) + " |")
    print("|---" * (1 + 2 * len(a.ranks) - 1) + "|")
    for n in a.lengths:
        rates = [n / results[r][n] for r in a.ranks]
        print(f"| {n} | " + " | ".join(f"{x:,.0f}" for x in rates) +
              "".join(f" | {x / rates[0]:.2f}x" for x in rates[1:]) + " |")


if __name__ == "__main__":
    main()
