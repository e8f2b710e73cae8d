"""Guidance distillation: speed against fidelity. The shapes evaluation's prompts are sampled side by side in one
process with the same seeds by the teacher (classifier-free guidance: two denoiser passes a step), by the teacher
without guidance (one pass, the cost a distilled model has) and by the guidance-distilled student (one pass) at
several scales. Each row gives the sampling time against the teacher's, the PSNR of the videos against the
teacher's guided ones (over all pixels, where a few videos that came out different weigh most, and the median
video's), and the evaluation's prompt following (read back by the shapes world's rules).

    python bench/distill.py --student runs/shapes-distill/pipeline [--teacher models/shapes-tiny] [--num 16]
"""

import argparse
import os

import numpy as np
import torch
from step_cache import following, psnr, run

from videodit.eval.shapes import ATTRS, make_cases
from videodit.flow import guidance_distilled
from videodit.pipeline import VideoDiTPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", required=True, help="a guidance-distilled pipeline (train with distill.teacher)")
    ap.add_argument("--teacher", default=os.path.join(ROOT, "models", "shapes-tiny"))
    ap.add_argument("--num", type=int, default=16, help="prompts per size (17x64x64 and 1x64x64)")
    ap.add_argument("--steps", type=int, default=None, help="default: the teacher's")
    ap.add_argument("--guidance", type=float, default=None, help="default: the teacher's")
    ap.add_argument("--student-scales", type=float, nargs="+", default=None,
                    help="the student's scales to compare (default: the teacher's guidance)")
    a = ap.parse_args()
    if a.num < 1:
        ap.error(f"--num must be at least 1, got {a.num}")
    if a.steps is not None and a.steps < 1:
        ap.error(f"--steps must be at least 1, got {a.steps}")
    for path in (a.teacher, a.student):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            ap.error(f"{path} is not a pipeline folder (no model_index.json)")
    teacher, student = (VideoDiTPipeline.from_pretrained(p) for p in (a.teacher, a.student))
    if not guidance_distilled(student.transformer) or guidance_distilled(teacher.transformer):
        ap.error("--student must be a guidance-distilled pipeline (train with distill.teacher) and --teacher one "
                 "that samples with guidance's two passes")
    steps, g, _ = teacher.sampling_defaults(a.steps, a.guidance)
    cases = make_cases(a.num, 0, sizes=[(17, 64, 64), (1, 64, 64)])
    for pipe in (teacher, student):
        pipe(["warm-up"], num_inference_steps=2, progress=False)
    print(f"teacher {a.teacher}, student {a.student}; {len(cases)} prompts (17x64x64, 1x64x64 and paraphrases), "
          f"{steps} steps, CPU, {torch.get_num_threads()} threads\n")
    print("| model | passes a step | guidance | seconds | speed-up | PSNR vs teacher: all, median video | "
          + " | ".join(ATTRS) + " | all four |")
    print("|---" * (6 + len(ATTRS) + 1) + "|")
    rows = [("teacher", teacher, 2, g), ("teacher", teacher, 1, 1.0)]
    rows += [("student", student, 1, s) for s in (a.student_scales or [g])]
    base = None
    for name, pipe, passes, scale in rows:
        videos, seconds, _ = run(pipe, cases, steps, guidance_scale=scale)
        base = base or (videos, seconds)
        acc = following(cases, videos)
        median = np.median([psnr([v], [w]) for v, w in zip(videos, base[0])])
        db = "-" if videos is base[0] else f"{psnr(videos, base[0]):.1f} dB, {median:.1f} dB"
        print(f"| {name} | {passes} | {scale:g} | {seconds:.1f} | {base[1] / seconds:.2f}x | {db} | {acc} |",
              flush=True)


if __name__ == "__main__":
    main()
