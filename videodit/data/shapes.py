"""The shapes world: a procedurally rendered, captioned video world (the contract is docs/shapes-world.md).

Flat coloured circles, squares and triangles, one or two per clip, moving at constant speed on a flat background.
Every clip carries its short caption (what a user types), a detailed caption (what a re-captioner writes) and its
ground-truth attributes. `read_back` reads any video by the contract's rules, so evaluations never trust bookkeeping.

    python -m videodit.data.shapes --out DIR --num N [--height H --width W --num-frames T --seed S]
"""

import argparse
import os
import re
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .video import from_uint8, to_uint8

BACKGROUNDS = {"black": (16, 16, 16), "gray": (128, 128, 128), "white": (235, 235, 235)}
COLORS = {
    "red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 90, 230),
    "yellow": (235, 215, 40), "purple": (150, 60, 200), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.32}
MOTIONS = ("left", "right", "up", "down", "still")
MOTION_PHRASES = {"left": "moving left", "right": "moving right", "up": "moving up", "down": "moving down",
                  "still": "staying still"}
ATTRIBUTE_VALUES = {"count": (1, 2), "size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES,
                    "motion": MOTIONS, "background": tuple(BACKGROUNDS)}  # what a caption can name
FPS = 8


@dataclass
class Attributes:
    count: int          # 1 or 2
    size: str           # small | large
    color: str
    shape: str
    motion: str         # left | right | up | down | still
    background: str
    starts: list        # [(x, y), ...] object centres in the first frame, pixels

    def short_caption(self, with_size=True, with_background=True) -> str:
        return short_caption(self.count, self.color, self.shape, self.motion,
                             self.size if with_size else None, self.background if with_background else None)


def short_caption(count, color, shape, motion, size=None, background=None) -> str:
    words = ["a" if count == 1 else "two"]
    if size:
        words.append(size)
    words += [color, shape + ("s" if count == 2 else ""), MOTION_PHRASES[motion]]
    if background:
        words.append(f"on a {background} background")
    return " ".join(words)


# ---------------------------------------------------------------------------------------------------------------
# Sampling attributes and start positions


def displacement(motion: str, height: int, width: int) -> tuple[float, float]:
    """(dx, dy) travelled by a centre from the first frame to the last."""
    return {"left": (-0.5 * width, 0.0), "right": (0.5 * width, 0.0), "up": (0.0, -0.5 * height),
            "down": (0.0, 0.5 * height), "still": (0.0, 0.0)}[motion]


def side_px(size: str, height: int, width: int) -> float:
    return SIZES[size] * min(height, width)


def _start_range(lo: float, hi: float, d: float) -> tuple[float, float]:
    # centre c must satisfy lo <= c <= hi and lo <= c + d <= hi
    return max(lo, lo - d), min(hi, hi - d)


def sample_starts(rng: np.random.Generator, count, size, motion, height, width) -> list:
    s = side_px(size, height, width)
    dx, dy = displacement(motion, height, width)
    xr = _start_range(s / 2, width - s / 2, dx)
    yr = _start_range(s / 2, height - s / 2, dy)
    if xr[0] > xr[1] or yr[0] > yr[1]:
        raise ValueError(f"a {size} object moving {motion} does not fit a {height}x{width} frame")
    first = (rng.uniform(*xr), rng.uniform(*yr))
    if count == 1:
        return [first]
    gap = max(3.0, 0.15 * s)
    for _ in range(2000):
        a = (rng.uniform(*xr), rng.uniform(*yr))
        b = (rng.uniform(*xr), rng.uniform(*yr))
        if abs(a[0] - b[0]) >= s + gap or abs(a[1] - b[1]) >= s + gap:
            return sorted([a, b])
    # The contract always admits two objects side by side across the axis of motion; place them there (in a small
    # frame with less of a gap, down to 1 px: they never touch)
    horizontal = motion in ("left", "right")
    span = (yr if horizontal else xr)
    gap = min(gap, span[1] - span[0] - s)
    if gap < 1:
        raise ValueError(f"two {size} objects moving {motion} do not fit a {height}x{width} frame")
    u = rng.uniform(span[0], span[1] - s - gap)
    v = rng.uniform(*(xr if horizontal else yr))
    pts = [(v, u), (v, u + s + gap)] if horizontal else [(u, v), (u + s + gap, v)]
    return sorted(pts)


def check_frame(height: int, width: int):
    """Raise ValueError unless the world draws every clip in a height x width frame (two large moving objects are
    the tightest)."""
    for motion in MOTIONS:
        sample_starts(np.random.default_rng(0), 2, "large", motion, height, width)


def parse_only(items) -> dict:
    """A restriction of the world to some attribute values, from items like "background=black" or "count=1" (an
    attribute named twice allows both values) -> {attribute: set of values}. Raises ValueError naming a bad item."""
    only = {}
    for item in items:
        key, value = (part.strip() for part in str(item).partition("=")[::2])
        if value not in map(str, ATTRIBUTE_VALUES.get(key, ())):
            raise ValueError(f"{item!r} is not ATTRIBUTE=VALUE with one of: " +
                             "; ".join(f"{k}={'|'.join(map(str, v))}" for k, v in ATTRIBUTE_VALUES.items()))
        only.setdefault(key, set()).add(int(value) if key == "count" else value)
    if only.get("color") == {"white"} and only.get("background") == {"white"}:
        raise ValueError("color=white with only background=white: a white object is never drawn on white")
    return only


def drawable(color: str, background: str) -> bool:
    """The world's one exclusion: a white object is never drawn on a white background."""
    return not color == background == "white"


def sample_attributes(rng: np.random.Generator, height: int, width: int, only: dict | None = None) -> Attributes:
    """Random attributes; with `only` (from parse_only), drawn again until they are among its values (the same
    draws as without it whenever the first draw is allowed)."""
    while True:
        background = str(rng.choice(list(BACKGROUNDS)))
        colors = [c for c in COLORS if drawable(c, background)]
        a = dict(count=int(rng.integers(1, 3)), size=str(rng.choice(list(SIZES))), color=str(rng.choice(colors)),
                 shape=str(rng.choice(SHAPES)), motion=str(rng.choice(MOTIONS)), background=background)
        if all(a[k] in v for k, v in (only or {}).items()):
            break
    a["starts"] = sample_starts(rng, a["count"], a["size"], a["motion"], height, width)
    return Attributes(**a)


# ---------------------------------------------------------------------------------------------------------------
# Rendering


def signed_distance(shape: str, cx: float, cy: float, s: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Distance inside (> 0) or outside (< 0) the edge of a shape with bounding-box side s centred at (cx, cy)."""
    if shape == "circle":
        d = s / 2 - np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
    elif shape == "square":
        d = np.minimum(s / 2 - np.abs(xs - cx), s / 2 - np.abs(ys - cy))
    elif shape == "triangle":  # apex up, base horizontal, as wide as it is tall
        top, bottom = cy - s / 2, cy + s / 2
        slant = ((ys - top) / 2 - np.abs(xs - cx)) * (2 / np.sqrt(5))  # distance to the sloped sides
        d = np.minimum(slant, bottom - ys)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return d


def coverage(shape: str, cx: float, cy: float, s: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1]; xs, ys are pixel centres."""
    return np.clip(signed_distance(shape, cx, cy, s, xs, ys) + 0.5, 0.0, 1.0)


def centres(attrs: Attributes, height: int, width: int, num_frames: int) -> np.ndarray:
    """(T, count, 2) object centres per frame."""
    dx, dy = displacement(attrs.motion, height, width)
    f = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    start = np.asarray(attrs.starts, dtype=np.float64)  # (count, 2)
    return start[None] + f[:, None, None] * np.array([dx, dy])[None, None]


def render(attrs: Attributes, height: int, width: int, num_frames: int) -> np.ndarray:
    """uint8 frames (T, H, W, 3)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    bg = np.array(BACKGROUNDS[attrs.background], dtype=np.float64)
    fg = np.array(COLORS[attrs.color], dtype=np.float64)
    s = side_px(attrs.size, height, width)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t, pts in enumerate(centres(attrs, height, width, num_frames)):
        cov = np.zeros((height, width))
        for cx, cy in pts:
            cov = np.maximum(cov, coverage(attrs.shape, cx, cy, s, xs, ys))
        out[t] = np.round(bg + cov[..., None] * (fg - bg)).astype(np.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Detailed captions: what a re-captioner writes. Wording varies; every attribute is stated.

_COUNT = {1: ["a single", "one", "a lone"], 2: ["two", "a pair of", "two identical"]}
_SIZE = {"small": ["small", "little", "tiny"], "large": ["large", "big", "sizable"]}
_MOTION = {
    "left": ["moves steadily to the left", "glides leftward", "travels from right to left"],
    "right": ["moves steadily to the right", "glides rightward", "travels from left to right"],
    "up": ["moves steadily upward", "rises toward the top", "travels from bottom to top"],
    "down": ["moves steadily downward", "sinks toward the bottom", "travels from top to bottom"],
    "still": ["stays perfectly still", "remains motionless", "does not move at all"],
}


def _plural(phrase: str) -> str:
    """'moves steadily upward' -> 'move steadily upward'; 'does not move' -> 'do not move'."""
    verb, rest = phrase.split(" ", 1)
    return ("do" if verb == "does" else verb[:-1]) + " " + rest


_MOTION_PLURAL = {m: [_plural(p) for p in phrases] for m, phrases in _MOTION.items()}
_BACKGROUND = ["on a plain {b} background", "against a flat {b} backdrop", "over a uniform {b} background"]
_TEMPLATES = [
    "{Count} {size} {color} {shape} {motion} {background}. {Start}.",
    "The video shows {count} {size} {color} {shape} {background} that {motion}. {Start}.",
    "{Background}, {count} {size} {color} {shape} {motion}. {Start}.",
    "A clip of {count} {size} {color} {shape}; {pronoun} {motion} {background}, {start}.",
]


def cell(x: float, y: float, height: int, width: int) -> tuple[str, str]:
    """The (column, row) of the frame's 3x3 grid that holds point (x, y)."""
    return (["left", "center", "right"][min(2, int(3 * x / width))],
            ["top", "middle", "bottom"][min(2, int(3 * y / height))])


def region(x: float, y: float, height: int, width: int) -> str:
    col, row = cell(x, y, height, width)
    if (row, col) == ("middle", "center"):
        return "the center"
    if row == "middle":
        return f"the middle {col}" if col != "center" else "the center"
    return f"the {row} {col}" if col != "center" else f"the {row} center"


def detailed_caption(attrs: Attributes, height: int, width: int, rng: np.random.Generator) -> str:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    plural = attrs.count == 2
    shape = attrs.shape + ("s" if plural else "")
    where = " and ".join(dict.fromkeys(region(x, y, height, width) for x, y in attrs.starts))
    start = f"{'they start' if plural else 'it starts'} near {where}"
    fields = dict(
        count=pick(_COUNT[attrs.count]), size=pick(_SIZE[attrs.size]), color=attrs.color, shape=shape,
        motion=pick((_MOTION_PLURAL if plural else _MOTION)[attrs.motion]),
        background=pick(_BACKGROUND).format(b=attrs.background), pronoun="they" if plural else "it", start=start,
    )
    text = pick(_TEMPLATES).format(Count=fields["count"].capitalize(), Start=start[0].upper() + start[1:],
                                   Background=fields["background"][0].upper() + fields["background"][1:], **fields)
    return text


# ---------------------------------------------------------------------------------------------------------------
# Clips and the on-the-fly dataset


def item_seed(seed: int, i: int) -> int:
    """The make_clip seed of item i of a shapes data set drawn with `seed`: every reader of the set (the dataset, the
    training source, the rendered folder, the captioner's set) draws the same clip for the same item."""
    return seed * 1_000_003 + i


def make_clip(seed: int, height: int, width: int, num_frames: int, only: dict | None = None) -> dict:
    """One clip, fully determined by (seed, height, width, num_frames, only); `only` restricts the attributes (see
    parse_only)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    rng = np.random.default_rng(seed)
    attrs = sample_attributes(rng, height, width, only)
    # The short caption names size and background only sometimes, as users do.
    caption = short_caption(attrs.count, attrs.color, attrs.shape, attrs.motion,
                            attrs.size if rng.random() < 0.5 else None,
                            attrs.background if rng.random() < 0.5 else None)
    return dict(frames=render(attrs, height, width, num_frames), caption=caption,
                detailed_caption=detailed_caption(attrs, height, width, rng), attributes=attrs)


class ShapesDataset(torch.utils.data.Dataset):
    """Renders clips on the fly. Item i uses seed `item_seed(seed, i)` and size `sizes[i % len(sizes)]`; `only`
    restricts the attributes (see parse_only)."""

    def __init__(self, sizes=((17, 64, 64),), length: int = 100_000, seed: int = 0, only: dict | None = None):
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.length, self.seed, self.only = length, seed, only

    def __len__(self):
        return self.length

    def size_of(self, i: int) -> tuple:
        return self.sizes[i % len(self.sizes)]

    def __getitem__(self, i: int) -> dict:
        if not -self.length <= i < self.length:
            raise IndexError(f"ShapesDataset index {i} out of range for length {self.length}")
        i = i + self.length if i < 0 else i  # negative indices count from the end, as in a list
        t, h, w = self.size_of(i)
        clip = make_clip(item_seed(self.seed, i), h, w, t, self.only)
        return dict(video=from_uint8(clip["frames"]), caption=clip["caption"],
                    detailed_caption=clip["detailed_caption"], attributes=asdict(clip["attributes"]))


# ---------------------------------------------------------------------------------------------------------------
# Reading a video back by the contract's rules


def _components(mask: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbourhood) of a bool (H, W) mask: int labels, 0 = background."""
    h, w = mask.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(1, 1, h, w) * mask
    for _ in range(h * w):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels[0, 0].long()


def _shape_iou(obj: np.ndarray) -> dict:
    """Overlap (IoU) of a cropped object mask with each shape drawn to fill its bounding box."""
    h, w = obj.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    scores = {}
    for shape in SHAPES:  # the shape drawn in box-normalized coordinates fills the box, whatever its aspect
        ideal = signed_distance(shape, 0.0, 0.0, 1.0, (xs - w / 2) / w, (ys - h / 2) / h) > 0
        scores[shape] = (ideal & obj).sum() / max(1, (ideal | obj).sum())
    return scores


def _nearest(table: dict, rgb: np.ndarray) -> str:
    return min(table, key=lambda k: float(np.sum((np.array(table[k], dtype=np.float64) - rgb) ** 2)))


def read_frame(frame: np.ndarray, threshold: float = 60.0, min_area_frac: float = 0.25) -> dict:
    """Objects in one uint8 (H, W, 3) frame: background colour, and per object centre, bbox, mask stats."""
    h, w, _ = frame.shape
    f = frame.astype(np.float64)
    border = np.concatenate([f[0], f[-1], f[:, 0], f[:, -1]])
    bg = np.median(border, axis=0)
    fg = np.sqrt(((f - bg) ** 2).sum(-1)) > threshold
    labels = _components(torch.from_numpy(fg)).numpy()
    min_area = min_area_frac * (SIZES["small"] * min(h, w)) ** 2
    objects = []
    for lab in np.unique(labels[labels > 0]):
        m = labels == lab
        if m.sum() < min_area:
            continue
        ys, xs = np.nonzero(m)
        box = m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        outside = F.pad(torch.from_numpy(~m).float()[None, None], (2, 2, 2, 2), value=1.0)
        interior = F.max_pool2d(outside, 5, 1)[0, 0].numpy() == 0  # two pixels or more from the edge
        pix = f[interior] if interior.any() else f[m]
        objects.append(dict(centre=(xs.mean() + 0.5, ys.mean() + 0.5), side=max(box.shape), area=int(m.sum()),
                            mean_rgb=pix.mean(0), shape_iou=_shape_iou(box)))
    return dict(background_rgb=bg, objects=objects)


def read_back(frames) -> dict:
    """Attributes of a video read by the rules of docs/shapes-world.md: uint8 frames (T, H, W, 3), or a clip
    (3, T, H, W) in [-1, 1] as the pipeline returns it (see `to_uint8`).

    Returns count, color, shape, size, motion, background, and the centre displacement (dx/W, dy/H)."""
    frames = to_uint8(frames)
    t, h, w, _ = frames.shape
    reads = [read_frame(fr) for fr in frames]
    counts = [len(r["objects"]) for r in reads]
    count = max(set(counts), key=lambda c: (counts.count(c), c))
    objs = [o for r in reads for o in r["objects"]]
    out = dict(count=count, background=_nearest(BACKGROUNDS, reads[0]["background_rgb"]))
    if not objs:
        return dict(out, color=None, shape=None, size=None, motion=None, displacement=(0.0, 0.0))
    out["color"] = _nearest(COLORS, np.mean([o["mean_rgb"] for o in objs], axis=0))
    iou = {s: np.mean([o["shape_iou"][s] for o in objs]) for s in SHAPES}
    out["shape"] = max(iou, key=iou.get)
    side = np.median([o["side"] for o in objs]) / min(h, w)
    out["size"] = "small" if side < (SIZES["small"] + SIZES["large"]) / 2 else "large"
    first, last = reads[0]["objects"], reads[-1]["objects"]
    if t == 1 or not first or not last:
        out["motion"], out["displacement"] = "still", (0.0, 0.0)
        return out
    c0 = np.mean([o["centre"] for o in first], axis=0)
    c1 = np.mean([o["centre"] for o in last], axis=0)
    dx, dy = (c1[0] - c0[0]) / w, (c1[1] - c0[1]) / h
    if max(abs(dx), abs(dy)) < 0.2:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    out["motion"], out["displacement"] = motion, (float(dx), float(dy))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Command line


def write_dataset(out: str, num: int, height: int, width: int, num_frames: int, seed: int, fps: float = FPS) -> str:
    from tqdm import tqdm

    from videodit.data.manifest import write_manifest
    from videodit.data.video import write_video

    os.makedirs(out, exist_ok=True)
    ext = ".png" if num_frames == 1 else ".mp4"
    rows = []
    for i in tqdm(range(num), desc="rendering", unit="clip"):
        clip = make_clip(item_seed(seed, i), height, width, num_frames)
        name = f"{i:06d}{ext}"
        write_video(os.path.join(out, name), clip["frames"], fps=fps)
        rows.append(dict(path=name, caption=clip["caption"], detailed_caption=clip["detailed_caption"],
                         num_frames=num_frames, fps=fps, height=height, width=width,
                         attributes=asdict(clip["attributes"])))
    written = {r["path"] for r in rows}
    for name in os.listdir(out):  # clips of an earlier, larger or other-format run into the folder
        if re.fullmatch(r"\d{6}\.(mp4|png)", name) and name not in written:
            os.remove(os.path.join(out, name))
    return write_manifest(os.path.join(out, "manifest.jsonl"), rows)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m videodit.data.shapes", description="Render shapes-world clips.")
    p.add_argument("--out", required=True, help="output folder (clips and manifest.jsonl)")
    p.add_argument("--num", type=int, required=True, help="number of clips")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--num-frames", type=int, default=17, help="frames per clip; 1 writes png images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fps", type=float, default=FPS, help="frame rate of the mp4 clips (> 0)")
    a = p.parse_args(argv)
    if a.num < 1 or a.height < 16 or a.width < 16 or a.num_frames < 1:
        p.error("need --num >= 1, --height and --width >= 16, --num-frames >= 1")
    if a.num_frames > 1 and (a.height % 2 or a.width % 2):
        p.error(f"--height {a.height} --width {a.width}: mp4 (h264) clips need even sides; use even sizes, or "
                f"--num-frames 1 for png images of any size")
    if not a.fps > 0:
        p.error(f"--fps must be > 0, got {a.fps:g}")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        p.error(f"--out {a.out} is a file; give a folder for the clips and manifest.jsonl")
    try:
        os.makedirs(a.out, exist_ok=True)
    except OSError as e:
        p.error(f"--out {a.out}: cannot create the folder ({e.strerror})")
    if not os.access(a.out, os.W_OK):
        p.error(f"--out {a.out}: the folder is not writable")
    a.fps = int(a.fps) if a.fps == int(a.fps) else a.fps  # the manifest records 8, not 8.0
    print(write_dataset(a.out, a.num, a.height, a.width, a.num_frames, a.seed, a.fps))


if __name__ == "__main__":
    from videodit.config import one_line_warnings

    one_line_warnings()
    main()
