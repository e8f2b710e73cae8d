"""The first-block step cache: speed against fidelity. The shapes evaluation's prompts are sampled with each cache
threshold, side by side in one process, with the same seeds; each row gives the steps whose later blocks were
skipped, the sampling time against no cache, the PSNR of the videos against the uncached ones, and the evaluation's
prompt following (read back by the shapes world's rules).

    python bench/step_cache.py [--checkpoint models/shapes-tiny] [--num 16] [--steps 20 50]
"""

import argparse
import os
import time

import numpy as np
import torch

from videodit.eval.shapes import ATTRS, make_cases, score
from videodit.pipeline import VideoDiTPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(pipe, cases, steps, batch=8, **settings):
    """The videos (uint8), seconds and skipped steps of sampling every case with the pipeline settings given."""
    videos, seconds, skipped = [], 0.0, 0
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        tic = time.perf_counter()
        out = pipe([c["prompt"] for c in chunk], height=[c["size"][1] for c in chunk],
                   width=[c["size"][2] for c in chunk], num_frames=[c["size"][0] for c in chunk],
                   num_inference_steps=steps, progress=False, **settings,
                   generator=[torch.Generator().manual_seed(start + i) for i in range(len(chunk))])
        seconds += time.perf_counter() - tic
        videos += out.frames
        skipped += out.skipped_steps
    return videos, seconds, skipped / -(-len(cases) // batch)


def following(cases: list, videos: list) -> str:
    """The share of videos whose each attribute, and all four, read back as asked: table cells."""
    hits = [score(c, v)["hits"] for c, v in zip(cases, videos)]
    return " | ".join(f"{100 * np.mean([h[k] for h in hits]):.0f}%" for k in (*ATTRS, "all"))


def psnr(videos: list, reference: list) -> float:
    """Over all pixels of all videos together."""
    se = sum(float(((v.astype(np.float64) - w) ** 2).sum()) for v, w in zip(videos, reference))
    mse = se / sum(v.size for v in videos)
    return float("inf") if mse == 0 else float(10 * np.log10(255 ** 2 / mse))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "models", "shapes-tiny"))
    ap.add_argument("--num", type=int, default=16, help="prompts per size (17x64x64 and 1x64x64)")
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    a = ap.parse_args()
    if a.num < 1:
        ap.error(f"--num must be at least 1, got {a.num}")
    if min(a.steps) < 1:
        ap.error(f"--steps must be at least 1 each, got {min(a.steps)}")
    if min(a.thresholds) < 0:
        ap.error("--thresholds must be >= 0")
    a.thresholds = [0.0] + sorted(set(a.thresholds) - {0.0})  # the uncached run first: the reference
    pipe = VideoDiTPipeline.from_pretrained(a.checkpoint)
    cases = make_cases(a.num, 0, sizes=[(17, 64, 64), (1, 64, 64)])
    pipe(["warm-up"], num_inference_steps=2, progress=False)
    print(f"{a.checkpoint}, {len(cases)} prompts (17x64x64, 1x64x64 and paraphrases), CPU, {torch.get_num_threads()} "
          f"threads\n")
    print("| steps | threshold | skipped steps | seconds | speed-up | PSNR vs no cache | "
          + " | ".join(ATTRS) + " | all four |")
    print("|---" * (6 + len(ATTRS) + 1) + "|")
    for steps in a.steps:
        base = None
        for threshold in a.thresholds:
            videos, seconds, skipped = run(pipe, cases, steps, cache_threshold=threshold)
            if base is None:
                base = videos, seconds
            acc = following(cases, videos)
            db = psnr(videos, base[0])
            db = "-" if threshold == 0 else "identical" if db == float("inf") else f"{db:.1f} dB"
            print(f"| {steps} | {threshold:g} | {skipped:.1f} | {seconds:.1f} | {base[1] / seconds:.2f}x | "
                  f"{db} | {acc} |", flush=True)


if __name__ == "__main__":
    main()
