"""Does a model follow prompts? Generate shapes-world videos from prompts and read them back by the world's rules.

    python -m videodit.eval.shapes [--checkpoint DIR] [--out DIR] [--num 24] [--steps N]

For each size (frames x height x width; some not seen in training) it samples prompts with random attributes, reads
every video back with `videodit.data.shapes.read_back` and scores count, color, shape and motion, each alone and all
four together. A set of paraphrased prompts (synonyms the training captions never use) tests language beyond the
caption vocabulary. Writes `results.json`, `table.md` (with a confusion table per attribute: each asked value
against what was read back) and `contact_sheet.png` (first, middle and last frames) to --out.
`--denoise` (one-step denoising of noised clips) and `--words` (the velocity's change when one caption word is
swapped) test the denoiser without sampling.
"""

import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from videodit.data.shapes import (ATTRIBUTE_VALUES, BACKGROUNDS, COLORS, MOTIONS, SHAPES, ShapesDataset, drawable,
                                  read_back, short_caption)
from videodit.data.video import to_uint8
from videodit.flow import guidance_distilled
from videodit.upsample import upsample_prompt

ATTRS = ("count", "color", "shape", "motion")
# (frames, height, width): the training sizes, then sizes and a duration the default model never saw
SIZES = [(17, 64, 64), (17, 64, 128), (17, 128, 64), (1, 64, 64), (1, 64, 128), (1, 128, 64),
         (17, 96, 96), (17, 80, 112), (25, 64, 64)]
PARAPHRASE_SIZE = (17, 64, 64)
# --denoise: noise levels and sizes of the one-step denoising test
DENOISE_LEVELS = (0.3, 0.5, 0.7, 0.9)
DENOISE_SIZES = [(17, 64, 64), (1, 64, 64)]
# --words: noise levels of the word-sensitivity test, and the attributes it swaps
WORD_LEVELS = (0.99, 0.9, 0.6)
WORDS = tuple(ATTRIBUTE_VALUES)

# Words the shapes world's captions never use (see videodit/data/shapes.py), for the paraphrase test.
SYNONYMS = {
    "count": {1: ["just one", "only one"], 2: ["a couple of", "a twin set of"]},
    "color": {"red": ["crimson", "scarlet"], "green": ["emerald", "lime"], "blue": ["azure", "cobalt"],
              "yellow": ["golden", "lemon"], "purple": ["violet", "lilac"], "white": ["snowy", "ivory"]},
    "shape": {"circle": ["disc", "ball"], "square": ["box", "block"], "triangle": ["wedge", "pyramid"]},
    "motion": {"left": ["sliding to the left", "heading west"], "right": ["sliding to the right", "heading east"],
               "up": ["climbing", "ascending"], "down": ["falling", "descending"],
               "still": ["stationary", "at rest"]},
}
PLURAL = {"disc": "discs", "ball": "balls", "box": "boxes", "block": "blocks", "wedge": "wedges",
          "pyramid": "pyramids"}


def random_attributes(rng: np.random.Generator) -> dict:
    background = str(rng.choice(list(BACKGROUNDS)))
    colors = [c for c in COLORS if drawable(c, background)]
    return dict(count=int(rng.integers(1, 3)), color=str(rng.choice(colors)), shape=str(rng.choice(SHAPES)),
                motion=str(rng.choice(MOTIONS)), background=background)


def paraphrase(a: dict, rng: np.random.Generator) -> str:
    pick = lambda key, value: str(rng.choice(SYNONYMS[key][value]))  # noqa: E731
    shape = pick("shape", a["shape"])
    if a["count"] == 2:
        shape = PLURAL[shape]
    return (f"{pick('count', a['count'])} {pick('color', a['color'])} {shape} {pick('motion', a['motion'])} "
            f"on a {a['background']} backdrop")


def make_cases(num: int, seed: int, sizes=SIZES) -> list[dict]:
    rng = np.random.default_rng(seed)
    cases = []
    for size in sizes:
        for _ in range(num):
            a = random_attributes(rng)
            if size[0] == 1:
                a["motion"] = "still"  # an image shows no motion
            cases.append(dict(group=f"{size[0]}x{size[1]}x{size[2]}", size=size, attributes=a,
                              prompt=short_caption(a["count"], a["color"], a["shape"], a["motion"],
                                                   background=a["background"])))
    for _ in range(num):
        a = random_attributes(rng)
        cases.append(dict(group="paraphrased", size=PARAPHRASE_SIZE, attributes=a, prompt=paraphrase(a, rng)))
    return cases


def score(case: dict, frames: np.ndarray) -> dict:
    got = read_back(frames)
    want = case["attributes"]
    hits = {k: got[k] == want[k] for k in ATTRS}
    if case["size"][0] == 1:
        hits["motion"] = True  # nothing to read in one frame
    hits["all"] = all(hits.values())
    return dict(read=dict((k, got[k]) for k in ATTRS), hits=hits)


def table(results: list[dict]) -> tuple[dict, str]:
    groups = list(dict.fromkeys(r["group"] for r in results))
    summary = {}
    for g in groups + ["overall"]:
        rows = [r for r in results if g in (r["group"], "overall")]
        summary[g] = {k: float(np.mean([r["hits"][k] for r in rows])) for k in (*ATTRS, "all")} | {"n": len(rows)}
    lines = ["| prompts (frames x H x W) | n | count | color | shape | motion | all four |",
             "|---|---|---|---|---|---|---|"]
    for g, s in summary.items():
        lines.append(f"| {g} | {s['n']} | " + " | ".join(f"{100 * s[k]:.0f}%" for k in (*ATTRS, "all")) + " |")
    return summary, "\n".join(lines)


def confusion(results: list[dict]) -> tuple[dict, str]:
    """Per attribute, how often each asked value was read back as each value: {attribute: {asked: {read: n}}}
    (motion over clips only), and the same as markdown tables, rows asked, columns read ("none": nothing read)."""
    name = lambda v: "none" if v is None else str(v)  # noqa: E731
    counts, lines = {}, []
    for k in ATTRS:
        pairs = [(name(r["attributes"][k]), name(r["read"][k])) for r in results if k != "motion" or r["size"][0] > 1]
        asked, read = sorted({a for a, _ in pairs}), sorted({b for _, b in pairs})
        counts[k] = {a: {b: pairs.count((a, b)) for b in read} for a in asked}
        lines += ["", f"| {k}: asked \\ read | " + " | ".join(read) + " |", "|---" * (len(read) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(str(n) for n in counts[k][a].values()) + " |" for a in asked]
    return counts, "\n".join(lines)


def contact_sheet(results: list[dict], videos: list[np.ndarray], path: str, cell: int = 96):
    """One row per video: first, middle and last frame, and the prompt with a tick or cross per attribute."""
    rows = []
    for r, v in zip(results, videos):
        picks = [v[0], v[len(v) // 2], v[-1]] if len(v) > 1 else [v[0]]
        tiles = [Image.fromarray(f).resize((cell * f.shape[1] // max(f.shape[:2]), cell * f.shape[0] //
                                            max(f.shape[:2]))) for f in picks]
        row = Image.new("RGB", (3 * (cell + 4) + 520, cell + 4), (255, 255, 255))
        for i, t in enumerate(tiles):
            row.paste(t, (i * (cell + 4), 2))
        d = ImageDraw.Draw(row)
        marks = " ".join(f"{k}:{'ok' if r['hits'][k] else 'x'}" for k in ATTRS)
        d.text((3 * (cell + 4) + 6, 8), f"[{r['group']}] {r['prompt']}"[:80], fill=(0, 0, 0))
        d.text((3 * (cell + 4) + 6, 28), marks, fill=(0, 120, 0) if r["hits"]["all"] else (200, 0, 0))
        rows.append(row)
    sheet = Image.new("RGB", (rows[0].width, sum(r.height for r in rows)), (255, 255, 255))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    sheet.save(path)


def evaluate(pipe, num: int = 24, seed: int = 0, steps: int | None = None, guidance: float | None = None,
             batch: int = 8, sizes=SIZES, shift: float | None = None, progress: bool = True,
             image_first: bool | None = None, upsample: bool = False,
             guidance_parallel: float | None = None, cache_threshold: float = 0.0) -> tuple[list, list, dict]:
    """Sample every case's prompt (with `upsample`, first rewritten as a detailed caption by the shapes upsampler, as
    `sample.py --upsample-prompt` does) and read the videos back. Returns results, videos and timing."""
    cases = make_cases(num, seed, sizes)
    results, videos, timing = [], [], {}
    for start in range(0, len(cases), batch):
        chunk = cases[start:start + batch]
        prompts = [upsample_prompt(c["prompt"], seed=seed + start + i) if upsample else c["prompt"]
                   for i, c in enumerate(chunk)]
        t0 = time.perf_counter()
        out = pipe(prompts, height=[c["size"][1] for c in chunk],
                   width=[c["size"][2] for c in chunk], num_frames=[c["size"][0] for c in chunk],
                   num_inference_steps=steps, guidance_scale=guidance, guidance_parallel=guidance_parallel,
                   shift=shift, image_first=image_first, cache_threshold=cache_threshold,
                   generator=torch.Generator().manual_seed(seed + start), progress=progress)
        timing.setdefault("seconds_per_video", []).append((time.perf_counter() - t0) / len(chunk))
        for c, v, sampled in zip(chunk, out.frames, prompts):
            results.append(dict(group=c["group"], prompt=c["prompt"], size=c["size"], attributes=c["attributes"],
                                **({"sampled_prompt": sampled} if upsample else {}), **score(c, v)))
            videos.append(v)
    timing = {"seconds_per_video": float(np.mean(timing["seconds_per_video"]))}
    return results, videos, timing


@torch.no_grad()
def evaluate_denoising(pipe, num: int = 24, seed: int = 0, levels=DENOISE_LEVELS, sizes=DENOISE_SIZES,
                       progress: bool = True) -> list[dict]:
    """The denoiser alone, without a sampler: fresh shapes-world clips (with their short captions) are encoded,
    noised to each level t, denoised in one step (x0 = x_t - t v, conditional, no guidance), decoded and read
    back. Shows at which noise level count, colour, shape and motion are lost; generation cannot do better than
    what the denoiser restores at the levels where the sampler decides them."""
    model, results = pipe.transformer, []
    g = torch.Generator().manual_seed(seed)
    for T, H, W in sizes:
        data = ShapesDataset([(T, H, W)], num, seed)
        clips = [data[i] for i in range(num)]
        latents = [pipe.encode_video(c["video"]) for c in clips]
        text, mask = pipe.encode_prompt([c["caption"] for c in clips])
        noise = [torch.randn(z.shape, generator=g).to(z) for z in latents]
        for t in tqdm(levels, desc=f"denoising {T}x{H}x{W}", disable=not progress, leave=False):
            noisy = [(1 - t) * z + t * e for z, e in zip(latents, noise)]
            v = model.forward_latents([x.to(model.dtype) for x in noisy], torch.full((num,), float(t)), text, mask,
                                      **_distilled_scale(pipe))
            for c, x, vi in zip(clips, noisy, v):
                case = dict(size=(T, H, W), attributes=c["attributes"])
                frames = to_uint8(pipe.decode(x - t * vi.float()))
                results.append(dict(group=f"t = {t}, {T}x{H}x{W}", prompt=c["caption"], **case, **score(case, frames)))
    return results


@torch.no_grad()
def word_sensitivity(pipe, num: int = 12, seed: int = 0, levels=WORD_LEVELS, size=(17, 64, 64)) -> dict:
    """Does the denoiser listen to each word? Fresh clips are encoded and noised to each level t; their full short
    caption is changed in one attribute at a time to another value ("moving right" -> "moving left") and the velocity
    on the same input compared: |v(changed) - v(caption)| / |v(caption)|, averaged over clips, per attribute and
    level ("all": the empty prompt instead). A word the model ignores scores near 0, whatever its samples look like;
    no sampling is needed. Returns {attribute: {t: value}}."""
    rng, g = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model, data = pipe.transformer, ShapesDataset([size], num, seed)
    change = {k: {t: [] for t in levels} for k in (*WORDS, "all")}
    for i in tqdm(range(num), desc="word swaps", unit="clip"):
        clip = data[i]
        a = {k: clip["attributes"][k] for k in WORDS}
        prompts = [short_caption(**a)]
        for key in WORDS:
            other = [{**a, key: v} for v in ATTRIBUTE_VALUES[key] if v != a[key]]
            other = [b for b in other if drawable(b["color"], b["background"])]
            prompts.append(short_caption(**other[rng.integers(len(other))]))
        text, mask = pipe.encode_prompt(prompts + [""])
        z = pipe.encode_video(clip["video"])
        noise = torch.randn(z.shape, generator=g).to(z)
        for t in levels:
            x = ((1 - t) * z + t * noise).to(model.dtype)
            v = torch.stack(model.forward_latents([x] * len(text), torch.full((len(text),), float(t)), text, mask,
                                                  **_distilled_scale(pipe)))
            rel = ((v[1:] - v[:1]).float().flatten(1).norm(dim=1) / v[0].float().norm()).tolist()
            for key, r in zip((*WORDS, "all"), rel):
                change[key][t].append(r)
    return {k: {t: float(np.mean(r)) for t, r in by_t.items()} for k, by_t in change.items()}


def _distilled_scale(pipe) -> dict:
    """A guidance-distilled denoiser runs at the checkpoint's guidance scale: forward_latents' keyword for it."""
    return dict(guidance=pipe.config.default_guidance) if guidance_distilled(pipe.transformer) else {}


def time_one(pipe, steps=None, repeats: int = 3, image_first: bool | None = None,
             cache_threshold: float = 0.0) -> float:
    """Seconds to sample one 64x64, 17-frame video at the checkpoint's default steps, once loaded (median)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        pipe("a red circle moving right", height=64, width=64, num_frames=17, num_inference_steps=steps,
             image_first=image_first, cache_threshold=cache_threshold, generator=torch.Generator().manual_seed(i),
             progress=False)
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))  # the first call warms up


def _write(out: str, json_name: str, md_name: str, results: list, footer: str = "", **extra) -> str:
    """The summary table of results as markdown (returned; written with `footer` below it) and, with the results and
    `extra`, as JSON."""
    summary, md = table(results)
    with open(os.path.join(out, json_name), "w") as f:
        json.dump(dict(summary=summary, **extra, results=results), f, indent=1)
    with open(os.path.join(out, md_name), "w") as f:
        f.write(md + "\n" + footer + ("\n" if footer else ""))
    return md


def main(argv=None):
    from videodit.generate import DEFAULT_CHECKPOINT
    from videodit.pipeline import VideoDiTPipeline, check_sampling

    p = argparse.ArgumentParser(prog="python -m videodit.eval.shapes", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", default="outputs/eval-shapes")
    p.add_argument("--num", type=int, default=24, help="prompts per size (and paraphrased prompts)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--guidance-parallel", type=float, default=None,
                   help="1 plain guidance, 0 projected (default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="sampling time shift (default: the checkpoint's, by size)")
    p.add_argument("--image-first", action=argparse.BooleanOptionalAction, default=None,
                   help="draw each first frame, then animate it (default: the checkpoint's)")
    p.add_argument("--upsample-prompt", action="store_true",
                   help="rewrite each prompt as a detailed caption first (the shapes rules, as sample.py does)")
    p.add_argument("--cache-threshold", type=float, default=0.0, help="first-block step cache (sample.py's)")
    p.add_argument("--batch", type=int, default=8, help="prompts sampled together as one packed batch")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--denoise", action="store_true", help="test the denoiser alone: one-step denoising of real "
                   f"clips noised to t = {', '.join(map(str, DENOISE_LEVELS))} (writes denoise.json, denoise.md)")
    p.add_argument("--words", action="store_true", help="test whether the denoiser listens to each attribute word: "
                   "the velocity's change when one word of the caption is swapped (writes words.json)")
    a = p.parse_args(argv)
    if a.num < 1 or a.batch < 1:
        p.error("--num and --batch must be >= 1")
    try:
        check_sampling(a.steps, a.guidance, a.guidance_parallel, a.shift, a.cache_threshold, flags=True)
    except ValueError as e:
        p.error(str(e))
    if a.denoise and a.words:
        p.error("--denoise and --words are two tests: run one at a time")
    sampling = [f for f, v in (("--steps", a.steps), ("--guidance", a.guidance), ("--guidance-parallel",
                a.guidance_parallel), ("--shift", a.shift), ("--image-first", a.image_first), ("--upsample-prompt",
                a.upsample_prompt or None), ("--cache-threshold", a.cache_threshold or None)) if v is not None]
    if (a.denoise or a.words) and sampling:
        print(f"note: {'--denoise' if a.denoise else '--words'} samples nothing: {', '.join(sampling)} "
              f"{'has' if len(sampling) == 1 else 'have'} no effect")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; give a folder for the results")
    if not os.path.isfile(os.path.join(a.checkpoint, "model_index.json")):
        p.exit(2, f"error: {a.checkpoint} is not a pipeline folder (no model_index.json)\n")
    pipe = VideoDiTPipeline.from_pretrained(a.checkpoint)
    os.makedirs(a.out, exist_ok=True)
    if a.denoise:
        results = evaluate_denoising(pipe, a.num, a.seed)
        md = _write(a.out, "denoise.json", "denoise.md", results, checkpoint=a.checkpoint)
        print(md)
        print(f"wrote {a.out}/denoise.json, denoise.md")
        return
    if a.words:
        change = word_sensitivity(pipe, a.num, a.seed)
        with open(os.path.join(a.out, "words.json"), "w") as f:
            json.dump(dict(checkpoint=a.checkpoint, change=change), f, indent=1)
        print("| word swapped | " + " | ".join(f"t = {t}" for t in WORD_LEVELS) + " |")
        print("|---" * (len(WORD_LEVELS) + 1) + "|")
        for key, by_t in change.items():
            print(f"| {key} | " + " | ".join(f"{by_t[t]:.3f}" for t in WORD_LEVELS) + " |")
        print(f"wrote {a.out}/words.json")
        return
    # the checkpoint's sampling defaults where none were given, so that results.json says what was run
    a.steps, a.guidance, a.guidance_parallel = pipe.sampling_defaults(a.steps, a.guidance, a.guidance_parallel)
    if a.image_first is None:
        a.image_first = bool(pipe.config.get("image_first", False))  # shift None: the checkpoint's, by size
    results, videos, timing = evaluate(pipe, a.num, a.seed, a.steps, a.guidance, a.batch, shift=a.shift,
                                       image_first=a.image_first, upsample=a.upsample_prompt,
                                       guidance_parallel=a.guidance_parallel, cache_threshold=a.cache_threshold)
    timing["seconds_one_64x64x17"] = time_one(pipe, a.steps, image_first=a.image_first,
                                              cache_threshold=a.cache_threshold)
    counts, md_counts = confusion(results)
    md = _write(a.out, "results.json", "table.md", results, footer=md_counts, timing=timing, checkpoint=a.checkpoint,
                steps=a.steps, guidance=a.guidance, guidance_parallel=a.guidance_parallel,
                cache_threshold=a.cache_threshold, upsample_prompt=a.upsample_prompt, shift=a.shift,
                image_first=a.image_first, seed=a.seed, num=a.num, batch=a.batch, confusion=counts)
    contact_sheet(results, videos, os.path.join(a.out, "contact_sheet.png"))
    print(md)
    print(md_counts)
    print(f"\nsampling: {timing['seconds_one_64x64x17']:.2f} s for one 64x64x17 video; "
          f"{timing['seconds_per_video']:.2f} s per video in packed batches of {a.batch}")
    print(f"wrote {a.out}/results.json, table.md, contact_sheet.png")


if __name__ == "__main__":
    from videodit.config import one_line_warnings

    one_line_warnings()
    main()
