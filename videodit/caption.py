"""Re-captioning: write a detailed caption for every clip of a manifest.

    python -m videodit.caption --manifest IN --out OUT --model PATH_OR_ID [--frames K] [--batch-size B]
                               [--backend vlm|shapes] [--max-new-tokens N] [--prompt TEXT]
    python -m videodit.caption train-shapes --out DIR [--num N] [--steps S]    # train the shapes-world captioner
    python -m videodit.caption eval-shapes [--model WEIGHTS] [--num N]         # its accuracy on unseen clips

Each clip is read through videodit.data.video (decord): K frames spread evenly over the clip. Backends:
- 'vlm': a transformers vision-language model (AutoProcessor + AutoModelForImageTextToText), asked through its chat
  template with the K frames as images; greedy generation of at most --max-new-tokens tokens.
- 'shapes': a small learned video classifier of the shapes world's attributes (count, size, color, shape, motion,
  background; one softmax head each) whose predictions are written through the shapes world's detailed-caption
  templates. Start positions are not learned: they are the object centres of the first frame found by the shapes
  world's rule-based reader (`read_frame`), a triangle's centroid moved up to its box centre. Weights ship in
  videodit/assets/shapes_captioner.safetensors.

OUT holds the captioned rows, in the order of IN, with `detailed_caption` and `caption_model`; it is rewritten
atomically after each batch. Each clip is captioned once, and all of its rows (several captions of one clip) get that
detailed caption, each keeping its own caption and metadata. A rerun keeps the detailed captions already in OUT
(matched to IN's rows by path and caption; every other field as IN has it now; those of another captioner named in a
warning) and captions only the others. Unreadable clips and empty captions are skipped with a warning, counted, and
left out of OUT (a rerun tries them again); so OUT must be another file than IN, and the command refuses to write in
place. Paths are written relative to OUT's folder when they lie under it, else absolute.
"""

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from videodit.config import as_saved, one_line_warnings
from videodit.data import shapes
from videodit.data.manifest import ManifestError, read_manifest, write_manifest
from videodit.data.video import VideoReadError, from_uint8, probe, read_video, readable, to_uint8
from videodit.text import check_local_model, from_hub, load_error

logger = logging.getLogger(__name__)
ASSETS = os.path.join(os.path.dirname(__file__), "assets")
SHAPES_WEIGHTS = os.path.join(ASSETS, "shapes_captioner.safetensors")
VLM_PROMPT = ("Describe this video in detail in one or two sentences: how many objects there are, their size, "
              "color and shape, how they move, the background, and where they start.")


def sample_frames(path: str, k: int, short_side: int | None = None) -> torch.Tensor:
    """K frames spread evenly from the first to the last frame of a video: (3, K, H, W) in [-1, 1]. An image
    gives one frame. With `short_side`, frames larger than that are downscaled (aspect kept) so that their short
    side is `short_side`."""
    info = probe(path)
    size = _shrunk(info["height"], info["width"], short_side)
    size = dict(zip(("height", "width"), size)) if size else {}
    if info["num_frames"] <= 1 or k == 1:
        return read_video(path, num_frames=1, **size)
    return read_video(path, num_frames=k, fps=info["fps"] * (k - 1) / (info["num_frames"] - 1), **size)


def downscale(video: torch.Tensor, short_side: int) -> torch.Tensor:
    """(3, T, H, W) -> the same clip with its short side at most `short_side` (aspect kept; never upscaled)."""
    size = _shrunk(*video.shape[-2:], short_side)
    if size is None:
        return video
    x = F.interpolate(video.transpose(0, 1).float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.transpose(0, 1).contiguous()


def _shrunk(h: int, w: int, short_side: int | None) -> tuple[int, int] | None:
    """(h, w) scaled so that the short side is `short_side`, or None where it is already no larger."""
    if not short_side or min(h, w) <= short_side:
        return None
    scale = short_side / min(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


# ---------------------------------------------------------------------------------------------------------------
# The shapes-world captioner: a small early-fusion conv net, one softmax head per attribute

HEADS = {"count": (1, 2), "size": tuple(shapes.SIZES), "color": tuple(shapes.COLORS), "shape": shapes.SHAPES,
         "motion": shapes.MOTIONS, "background": tuple(shapes.BACKGROUNDS)}


def prepare(video: torch.Tensor, frames: int = 8, side: int = 32) -> torch.Tensor:
    """(3, T, H, W) in [-1, 1] -> (3, frames, h, w): frames spread evenly over the clip (an image is repeated),
    resized keeping the aspect ratio so that the short side is `side` (object sizes are relative to it)."""
    _, t, h, w = video.shape
    idx = torch.linspace(0, t - 1, frames).round().long()
    scale = side / min(h, w)
    size = (round(h * scale), round(w * scale))
    x = F.interpolate(video[:, idx].transpose(0, 1).float(), size=size, mode="bilinear", antialias=True,
                      align_corners=False)  # (frames, 3, h, w)
    return x.transpose(0, 1).contiguous()


def _block(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True))


class ShapesNet(nn.Module):
    """x: (B, 3, frames, h, w) from `prepare` -> {attribute: logits (B, classes)}.

    Early fusion: the frames are stacked as channels of one image, so the first convolutions see each object at
    every time step (motion), then global average + max pooling makes it work at any size. GroupNorm, not
    BatchNorm: with BatchNorm the count head leaned on batch statistics and lost 5-10 points in eval mode."""

    def __init__(self, frames: int = 8, side: int = 32, width: int = 32):
        super().__init__()
        self.config = dict(frames=frames, side=side, width=width)
        c = width
        self.body = nn.Sequential(_block(3 * frames, c, 1), _block(c, 2 * c, 2), _block(2 * c, 2 * c, 2),
                                  _block(2 * c, 4 * c, 2))
        self.mlp = nn.Sequential(nn.Linear(8 * c, 8 * c), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(8 * c, len(v)) for k, v in HEADS.items()})

    def forward(self, x):
        f = self.body(rearrange(x, "b c t h w -> b (t c) h w")).flatten(2)  # (B, 4c, h/8 * w/8)
        f = self.mlp(torch.cat([f.mean(-1), f.amax(-1)], dim=1))           # (B, 8c)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, videos: list[torch.Tensor]) -> list[dict]:
        """Attribute dicts for clips (3, T, H, W) in [-1, 1] of any sizes; clips of one-frame predict 'still'."""
        self.eval()
        xs = [prepare(v, self.config["frames"], self.config["side"]) for v in videos]
        out = [None] * len(xs)
        for shape in dict.fromkeys(x.shape for x in xs):  # one forward per prepared size
            ids = [i for i, x in enumerate(xs) if x.shape == shape]
            logits = self(torch.stack([xs[i] for i in ids]))
            for j, i in enumerate(ids):
                out[i] = {k: HEADS[k][int(v[j].argmax())] for k, v in logits.items()}
                if videos[i].shape[1] == 1:
                    out[i]["motion"] = "still"
        return out

    def save(self, path: str) -> str:
        from safetensors.torch import save_file

        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path,
                  metadata={"config": json.dumps(self.config), "heads": json.dumps(HEADS)})
        return readable(path)

    @classmethod
    def load(cls, path: str) -> "ShapesNet":
        from safetensors import safe_open
        from safetensors.torch import load_file

        if os.path.isdir(path):  # the folder train-shapes --out wrote
            path = os.path.join(path, "shapes_captioner.safetensors")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"shapes captioner weights not found: {path} (expected a .safetensors file, or "
                                    f"the folder of one, written by `python -m videodit.caption train-shapes`)")
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:  # safetensors raises its own error type for a file that is not safetensors
            raise ValueError(f"{path}: not shapes captioner weights (cannot be read as safetensors: {e})") from None
        if "config" not in meta or json.loads(meta.get("heads", "{}")) != as_saved(HEADS):
            raise ValueError(f"{path}: not shapes captioner weights (its metadata lacks the config or the heads "
                             f"differ from {list(HEADS)})")
        net = cls(**json.loads(meta["config"]))
        net.load_state_dict(load_file(path))
        return net.eval()


def _labels(attrs: shapes.Attributes, num_frames: int) -> dict:
    a = asdict(attrs)
    if num_frames == 1:
        a["motion"] = "still"  # an image shows no motion
    return {k: HEADS[k].index(a[k]) for k in HEADS}


def render_set(num: int, seed: int, sizes) -> list:
    """[(prepared clip (3, frames, h, w) uint8, labels dict)] of `num` clips cycling through (T, H, W) sizes."""
    out = []
    for i in range(num):
        t, h, w = sizes[i % len(sizes)]
        clip = shapes.make_clip(shapes.item_seed(seed, i), h, w, t)
        x = prepare(from_uint8(clip["frames"]))
        out.append((((x + 1) * 127.5).round().byte(), _labels(clip["attributes"], t)))
    return out


TRAIN_SIZES = [(t, h, w) for t in (17, 9, 5, 1) for h, w in ((64, 64), (64, 128), (128, 64), (96, 96))]
EVAL_SIZES = {"64x64 T=17": (17, 64, 64), "64x128 T=17": (17, 64, 128), "128x64 T=9": (9, 128, 64),
              "64x64 T=9": (9, 64, 64), "64x64 T=1": (1, 64, 64), "unseen 80x48 T=13": (13, 80, 48),
              "unseen 112x112 T=25": (25, 112, 112),
              "unseen 48x144 T=17": (17, 48, 144)}


def _augment(x: torch.Tensor, labels: dict, rng: np.random.Generator):
    """Flip left-right and/or reverse time (both keep a valid shapes-world clip; motion labels follow)."""
    motion = HEADS["motion"][labels["motion"]]
    if rng.random() < 0.5:
        x = x.flip(-1)
        motion = {"left": "right", "right": "left"}.get(motion, motion)
    if rng.random() < 0.5:
        x = x.flip(1)
        motion = {"left": "right", "right": "left", "up": "down", "down": "up"}.get(motion, motion)
    return x, {**labels, "motion": HEADS["motion"].index(motion)}


def train_shapes(out: str, num: int = 12000, steps: int = 4000, batch_size: int = 32, lr: float = 2e-3,
                 seed: int = 0, log=print) -> str:
    """Train ShapesNet on `num` rendered clips (seeds disjoint from evaluation's) and save it to out/."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    data = render_set(num, 7_000 + seed, TRAIN_SIZES)
    groups = {}
    for x, y in data:  # a batch holds clips of one prepared size
        groups.setdefault(tuple(x.shape), []).append((x, y))
    keys = list(groups)
    log(f"rendered {num} clips in {time.time() - t0:.0f}s; {len(keys)} prepared sizes")
    net = ShapesNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    for step in range(1, steps + 1):
        g = groups[keys[int(rng.integers(len(keys)))]]
        batch = [_augment(*g[int(i)], rng) for i in rng.integers(len(g), size=batch_size)]
        x = torch.stack([b[0] for b in batch]).float() / 127.5 - 1
        x = x + 0.02 * torch.randn_like(x)  # video compression noise
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], torch.tensor([b[1][k] for b in batch])) for k in HEADS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return net.save(os.path.join(out, "shapes_captioner.safetensors"))


def evaluate_shapes(net: ShapesNet, num: int = 60, seed: int = 123, sizes: dict = EVAL_SIZES) -> dict:
    """{size name: {attribute: accuracy}} on `num` fresh clips per size (seeds unseen in training). Motion is not
    scored on one-frame clips (an image shows none)."""
    result = {}
    for n, (name, (t, h, w)) in enumerate(sizes.items()):
        clips = [shapes.make_clip(10_000_000 * (seed + 1) + 1000 * n + i, h, w, t) for i in range(num)]
        preds = net.predict([from_uint8(c["frames"]) for c in clips])
        result[name] = {k: float(np.mean([p[k] == getattr(c["attributes"], k) for p, c in zip(preds, clips)]))
                        for k in HEADS if not (k == "motion" and t == 1)}
    return result


def format_accuracy(result: dict) -> str:
    cols = list(HEADS)
    lines = ["| clips | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, acc in result.items():
        lines.append(f"| {name} | " + " | ".join(f"{acc[k]:.1%}" if k in acc else "n/a" for k in cols) + " |")
    return "\n".join(lines)


class ShapesCaptioner:
    """Clips -> detailed captions through the shapes-world templates, from ShapesNet's predicted attributes.

    Clips are first downscaled to a short side of `short_side` pixels (twice the net's working size, enough for
    `read_frame` to find small objects): captions name only relative positions, so nothing is lost, and large
    frames cost no more than small ones."""

    def __init__(self, weights: str | None = None, seed: int = 0):
        self.net = ShapesNet.load(weights or SHAPES_WEIGHTS)
        self.short_side = 2 * self.net.config["side"]
        self.rng = np.random.default_rng(seed)  # picks the template wording
        self.model_id = f"shapes:{os.path.basename(weights or SHAPES_WEIGHTS)}"

    def __call__(self, videos: list[torch.Tensor]) -> list[str]:
        captions = []
        videos = [downscale(v, self.short_side) for v in videos]
        for v, a in zip(videos, self.net.predict(videos)):
            h, w = v.shape[-2:]
            first = to_uint8(v[:, :1])[0]  # (H, W, 3)
            lift = 1 / 6 if a["shape"] == "triangle" else 0  # a triangle's centroid lies side/6 below its box centre
            objects = shapes.read_frame(first)["objects"]
            starts = sorted((o["centre"][0], o["centre"][1] - lift * o["side"]) for o in objects) or [(w / 2, h / 2)]
            attrs = shapes.Attributes(starts=starts, **a)
            captions.append(shapes.detailed_caption(attrs, h, w, self.rng))
        return captions


# ---------------------------------------------------------------------------------------------------------------
# Vision-language model captioner


class VLMCaptioner:
    """A transformers image-text-to-text model: K frames as images + an instruction, through the chat template."""

    def __init__(self, model: str, max_new_tokens: int = 128, prompt: str = VLM_PROMPT, device="cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        what = "the captioner's vision-language model"
        source = check_local_model(model, what)
        try:
            self.processor, self.model = from_hub(lambda **kw: (
                AutoProcessor.from_pretrained(source, **kw),
                AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **kw)), model)
            self.model = self.model.to(device).eval()
        except OSError as e:
            raise load_error(model, what, e) from e
        self.processor.tokenizer.padding_side = "left"  # generation continues every row from its last token
        self.max_new_tokens, self.prompt, self.model_id = max_new_tokens, prompt, model

    @torch.no_grad()
    def __call__(self, videos: list[torch.Tensor]) -> list[str]:
        images = [list(to_uint8(v)) for v in videos]
        content = lambda k: [{"type": "image"}] * k + [{"type": "text", "text": self.prompt}]  # noqa: E731
        texts = [self.processor.apply_chat_template([{"role": "user", "content": content(len(im))}],
                                                    add_generation_prompt=True) for im in images]
        inputs = self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                                input_data_format="channels_last")  # (H, W, 3): a 1- or 3-pixel-high frame too
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)  # casts the floating inputs (pixels) only
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]  # (B, new tokens)
        return [" ".join(t.split()) for t in self.processor.batch_decode(new, skip_special_tokens=True)]


def load_captioner(backend: str, model: str | None = None, **kw):
    if backend == "shapes":
        return ShapesCaptioner(model)
    if backend == "vlm":
        if not model:
            raise ValueError("the vlm captioner needs --model: a local folder or a hub id of a vision-language model")
        return VLMCaptioner(model, **kw)
    raise ValueError(f"unknown captioner backend {backend!r}; expected 'vlm' or 'shapes'")


# ---------------------------------------------------------------------------------------------------------------
# Captioning a manifest


def caption_manifest(manifest: str, out: str, captioner, frames: int = 8, batch_size: int = 8) -> dict:
    """Caption every row of `manifest` not yet in `out`; returns counts of rows {captioned, kept, skipped}.

    Each clip is read and captioned once (`batch_size` clips a call); every row of it gets that detailed caption and
    keeps its own caption and metadata. A captioned row of `out` is kept for a row of `manifest` with its path and
    caption (rows alike are matched in order): `out` may lack rows (unreadable, or not reached before a stop)."""
    if _same_file(manifest, out):
        raise ValueError(f"{out} is the manifest being captioned; write the captions to another file")
    rows = read_manifest(manifest)
    done = {}  # (path, caption) -> out's captioned rows, in order
    for r in read_manifest(out) if os.path.isfile(out) else []:
        if "caption_model" in r.extra:
            done.setdefault((r.path, r.caption), []).append(r)
    result, others = {}, Counter()  # a kept row: IN's row (its metadata as IN has it now) with OUT's detailed caption
    for i, r in enumerate(rows):
        if done.get((r.path, r.caption)):
            old = done[r.path, r.caption].pop(0)
            r.detailed_caption, r.extra["caption_model"] = old.detailed_caption, old.extra["caption_model"]
            result[i] = r
            if old.extra["caption_model"] != captioner.model_id:
                others[old.extra["caption_model"]] += 1
    for model, n in others.items():
        logger.warning(f"{out}: {n} row(s) kept as captioned by {model}, not {captioner.model_id}; to caption them "
                       f"again, write to another --out or delete those rows")
    todo = {}  # clip path -> positions of its rows still to caption
    for i, r in enumerate(rows):
        if i not in result:
            todo.setdefault(r.path, []).append(i)
    todo = list(todo.items())
    out_dir = os.path.dirname(os.path.abspath(out))
    counts = dict(captioned=0, kept=len(result), skipped=0)

    def shown(path):  # relative under OUT's folder (they move together), else absolute
        rel = os.path.relpath(path, out_dir)
        return path if rel.startswith(os.pardir + os.sep) else rel

    def write():  # IN's order
        write_manifest(out, [{**result[i].to_dict(), "path": shown(result[i].path)} for i in sorted(result)])

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=len(rows), initial=counts["kept"], desc="captioning", unit="row")
    with logging_redirect_tqdm():  # a skip's line above the bar, not across it
        for start in range(0, len(todo), batch_size):
            batch, videos = [], []
            for path, ids in todo[start:start + batch_size]:
                try:
                    videos.append(sample_frames(path, frames, getattr(captioner, "short_side", None)))
                    batch.append(ids)
                except VideoReadError as e:
                    counts["skipped"] += len(ids)
                    logger.warning(f"skipping an unreadable clip: {e}")
            if batch:
                for ids, text in zip(batch, captioner(videos)):
                    if not text.strip():  # left out of OUT, so that a rerun tries it again
                        counts["skipped"] += len(ids)
                        logger.warning(f"skipping {rows[ids[0]].path}: the captioner wrote an empty caption")
                        continue
                    for i in ids:
                        rows[i].detailed_caption, rows[i].extra["caption_model"] = text, captioner.model_id
                        result[i] = rows[i]
                    counts["captioned"] += len(ids)
                write()
            bar.set_postfix(counts, refresh=False)
            bar.update(sum(len(ids) for _, ids in todo[start:start + batch_size]))
    bar.close()
    if result:  # kept rows take IN's current fields, and rows gone from IN leave: also when nothing was captioned
        write()
    return counts


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-shapes"]:
        p = argparse.ArgumentParser(prog="python -m videodit.caption train-shapes")
        p.add_argument("--out", required=True, help="folder for shapes_captioner.safetensors")
        p.add_argument("--num", type=int, default=12000, help="rendered training clips")
        p.add_argument("--steps", type=int, default=4000)
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        if a.num < 1 or a.steps < 1:
            p.error("--num and --steps must be >= 1")
        path = train_shapes(a.out, a.num, a.steps, seed=a.seed)
        print(format_accuracy(evaluate_shapes(ShapesNet.load(path))))
        print(path)
        return
    if argv[:1] == ["eval-shapes"]:
        p = argparse.ArgumentParser(prog="python -m videodit.caption eval-shapes")
        p.add_argument("--model", default=SHAPES_WEIGHTS, help="shapes captioner weights (.safetensors, or the "
                       "folder train-shapes wrote)")
        p.add_argument("--num", type=int, default=200, help="fresh clips per size")
        p.add_argument("--seed", type=int, default=123)
        a = p.parse_args(argv[1:])
        if a.num < 1:
            p.error("--num must be >= 1")
        try:
            net = ShapesNet.load(a.model)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None
        print(format_accuracy(evaluate_shapes(net, a.num, a.seed)))
        return
    p = argparse.ArgumentParser(prog="python -m videodit.caption", description=__doc__.split("\n\n")[0],
                                epilog="subcommands: `train-shapes --out DIR [--num N] [--steps S]` trains the "
                                       "shapes-world captioner; `eval-shapes [--model WEIGHTS] [--num N]` prints its "
                                       "accuracy on unseen clips (each has its own --help)")
    p.add_argument("--manifest", required=True, help="input manifest (.jsonl or .csv)")
    p.add_argument("--out", required=True, help="output manifest; rows already captioned there are kept")
    p.add_argument("--model", default=None, help="vlm: a folder or hub id; shapes: weights (default: shipped)")
    p.add_argument("--backend", choices=("vlm", "shapes"), default="vlm")
    p.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128, help="vlm: longest caption in tokens")
    p.add_argument("--prompt", default=VLM_PROMPT, help="vlm: the instruction sent with the frames")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if a.frames < 1 or a.batch_size < 1:
        p.error("--frames and --batch-size must be >= 1")
    if a.backend == "vlm" and not a.model:
        p.error("--backend vlm needs --model: a local folder or a hub id of a vision-language model")
    if os.path.isdir(a.out):
        p.error(f"--out {a.out} is a folder; give the path of the output manifest (.jsonl or .csv)")
    if os.path.splitext(a.out)[1].lower() not in (".jsonl", ".csv"):
        p.error(f"--out {a.out}: a manifest is a .jsonl or .csv file; name it so")
    if a.backend == "shapes" and a.frames < 2:
        p.error("--backend shapes reads motion from several frames: give --frames 2 or more (an image row is read "
                "as one frame whatever --frames is)")
    if _same_file(a.out, a.manifest):  # OUT holds only the captioned rows: in place, the others would be lost
        p.error(f"--out {a.out} is the --manifest file; write the captions to another file")
    kw = dict(max_new_tokens=a.max_new_tokens, prompt=a.prompt, device=a.device,
              dtype=torch.bfloat16 if a.device.startswith("cuda") else torch.float32) if a.backend == "vlm" else {}
    try:
        captioner = load_captioner(a.backend, a.model, **kw)
    except (OSError, ValueError) as e:  # FileNotFoundError: a folder without a model; OSError: a hub id offline
        raise SystemExit(f"error: {e}") from None
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        counts = caption_manifest(a.manifest, a.out, captioner, a.frames, a.batch_size)
    except ManifestError as e:
        raise SystemExit(f"error: {e}") from None
    if counts["skipped"] and not counts["captioned"] and not counts["kept"]:
        raise SystemExit(f"error: none of the {counts['skipped']} rows of {a.manifest} could be read (see the "
                         f"warnings above); no output written")
    print(json.dumps(counts))


if __name__ == "__main__":
    one_line_warnings()
    main()
