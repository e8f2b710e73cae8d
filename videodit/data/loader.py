"""Training data: sources of clips, patch n' pack batches by a token budget, and a resumable rank-sharded sampler.

    geom = Geometry(ft=4, fs=4, patch=(1, 2, 2))
    source = make_source(cfg.data, geom)                  # shapes world, manifest (decord) or latent cache
    loader = make_loader(cfg, source, geom, rank, world_size, start=DataPosition())

The global stream of batches does not depend on the number of processes. Each epoch shuffles the source by
(seed, epoch), marks a share `image_ratio` of the samples as single frames, and packs samples in that order into
batches of at most `max_tokens` latent tokens (first fit over a few open batches: no sample is dropped, none is
cut). Global batch g goes to rank g % world_size, so rank r reads g = start + r, start + r + W, ... A training
step consumes world_size * grad_accum global batches; saving the number consumed (`DataPosition`) lets a run
resume on any number of processes at the same place in the stream.

Each sample's randomness (clip start, caption choice, text dropout, conditioning frames) comes from a generator
seeded by (seed, epoch, index), so it is the same in any worker, on any rank, after any resume.
A missing or corrupt file is skipped with a warning and counted in the batch (`skipped`), never a crash.
"""

import json
import logging
import math
import os
import random
import signal
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors import safe_open

from ..config import ConfigError
from ..flow import drop_text, random_cond
from ..text import choose_caption
from .manifest import ManifestError, read_manifest
from .shapes import item_seed, make_clip, parse_only
from .video import VideoReadError, from_uint8, is_image, probe, read_video

logger = logging.getLogger(__name__)

MAX_OPEN_BATCHES = 8  # the packer's window: batches still accepting samples


@dataclass(frozen=True)
class Geometry:
    """How a pixel clip maps to latent tokens: VAE factors (ft, fs) and the denoiser's patch (pt, ph, pw)."""
    ft: int
    fs: int
    patch: tuple = (1, 2, 2)

    @property
    def steps(self) -> tuple[int, int]:
        """Pixel height and width must be multiples of these (fs * ph, fs * pw)."""
        return self.fs * self.patch[1], self.fs * self.patch[2]

    def frames(self, available: int, limit: int) -> int:
        """The longest 1 + ft*k frames that fit both the clip and the limit."""
        n = max(1, min(available, limit))
        return 1 + self.ft * ((n - 1) // self.ft)

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        return 1 + (T - 1) // self.ft, H // self.fs, W // self.fs

    def tokens(self, T: int, H: int, W: int) -> int:
        return self.latent_tokens(*self.latent_shape(T, H, W))

    def latent_tokens(self, t: int, h: int, w: int) -> int:
        """Patch tokens of a latent of t frames, h x w."""
        pt, ph, pw = self.patch
        return -(-t // pt) * (h // ph) * (w // pw)

    def resize(self, height: int, width: int, area: int) -> tuple[int, int]:
        """A size of about `area` pixels at the aspect of height x width, multiples of `steps`; where a thin frame's
        short side is held at its step, the long side shrinks to keep the area."""
        (mh, mw), s = self.steps, math.sqrt(area / (height * width))
        h, w = max(mh, round(height * s / mh) * mh), max(mw, round(width * s / mw) * mw)
        cells = max(1, round(area / (mh * mw)))  # the area in steps: the long side's length when the short is one
        return (h, min(w, cells * mw)) if h == mh else (min(h, cells * mh), w) if w == mw else (h, w)

    def snap(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        """The nearest size this geometry takes (ties up, as videodit.vae.valid_size): T = 1 + ft*k with k a multiple of
        pt (or T = 1), H and W multiples of `steps` (at least one of each)."""
        pt, near = self.patch[0], lambda x: int(x + 0.5)  # noqa: E731
        k = near((max(T, 1) - 1) / self.ft)
        k = k if k % pt == 0 else near(k / pt) * pt or pt
        mh, mw = self.steps
        return 1 + self.ft * k, max(mh, near(H / mh) * mh), max(mw, near(W / mw) * mw)

    def check(self, T: int, H: int, W: int, what: str):
        (mh, mw), (_, ph, pw) = self.steps, self.patch
        if (T - 1) % self.ft or H % mh or W % mw:
            sides = f"multiples of {mh}" if mh == mw else f"multiples of {mh} and {mw}"
            patch = ph if ph == pw else f"({ph}, {pw})"
            raise ConfigError(f"{what}: size (T={T}, H={H}, W={W}) does not fit the VAE and patch: frames must be "
                             f"1 + {self.ft}*k and height and width {sides} (fs={self.fs} x patch {patch})")


@dataclass
class DataPosition:
    """Where the global batch stream stands: `batches` consumed in all; the epoch they reached and the global
    index of that epoch's first batch (so a resume need not re-pack earlier epochs)."""
    batches: int = 0
    epoch: int = 0
    epoch_start: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator of one sample's randomness in one epoch."""
    return random.Random((seed * 1_000_003 + epoch) * 1_000_000_007 + index)


# ---------------------------------------------------------------------------------------------------------------
# Sources: token counts of every sample (for packing, without reading anything) and loading one sample


class ShapesSource:
    """The shapes world rendered on the fly: item i is `make_clip(item_seed(seed, i), ...)` at size
    `sizes[i % len(sizes)]` (as ShapesDataset), restricted to the attribute values in `only` (parse_only); as an
    image, its first frame."""

    def __init__(self, sizes, length: int, seed: int, geom: Geometry, only: dict | None = None):
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        for s in self.sizes:
            geom.check(*s, what=f"data.sizes entry {list(s)}")
        self.length, self.seed, self.only = length, seed, only

    def __len__(self):
        return self.length

    def token_counts(self, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
        """(video tokens, image tokens) of every item: two (N,) int arrays."""
        per_size = np.array([[geom.tokens(*s), geom.tokens(1, *s[1:])] for s in self.sizes])
        idx = np.arange(self.length) % len(self.sizes)
        return per_size[idx, 0], per_size[idx, 1]

    def typical_size(self) -> tuple[int, int, int]:
        """The most common (T, H, W) of the items (the first of data.sizes on a tie)."""
        return Counter(self.sizes).most_common(1)[0][0]

    def describe(self, i: int) -> str:
        return f"a clip of data.sizes {list(self.sizes[i % len(self.sizes)])}"

    def load(self, i: int, image: bool, rng: random.Random) -> dict:
        T, H, W = self.sizes[i % len(self.sizes)]
        clip = make_clip(item_seed(self.seed, i), H, W, 1 if image else T, self.only)
        return dict(video=from_uint8(clip["frames"]), caption=clip["caption"],
                    detailed_caption=clip["detailed_caption"])


class ManifestSource:
    """Rows of a manifest read by decord, at native aspect resized to about `target_area` pixels (multiples of
    fs*ph), at `fps`, each at the longest of the `num_frames` lengths it holds (rounded down to 1 + ft*k; a clip
    shorter than all of them at the longest 1 + ft*k it allows): few distinct lengths, few shapes. Rows without
    num_frames/fps/height/width are probed once here (put them in the manifest to skip that); a row that cannot be
    probed is planned as one frame and skipped when read."""

    def __init__(self, manifest: str, target_area: int, num_frames: list[int], fps: float, geom: Geometry):
        self.rows = read_manifest(manifest)
        self.fps = fps
        self.plans = []  # per row: (T, H, W, source frames, source fps)
        self.readable = []  # per row: False where probing failed
        unreadable = []  # messages: an exception's traceback would keep its callers' frames alive
        for row in self.rows:
            n, src_fps, h, w = row.num_frames, row.fps, row.height, row.width
            image = is_image(row.path)
            if image:
                n = src_fps = 1
            ok = True
            if n is None or src_fps is None or h is None or w is None:
                try:
                    info = probe(row.path)  # by content: a video named .jpg has its frames and rate
                    n, h, w = info["num_frames"], info["height"], info["width"]
                    src_fps = info["fps"] if image and n > 1 else src_fps or info["fps"]
                except VideoReadError as e:
                    logger.warning(f"cannot probe {e}; it will be skipped")
                    n, h, w, ok = 1, 1, 1, False
                    unreadable.append(str(e))
            self.readable.append(ok)
            available = n if not src_fps or n == 1 else int((n - 1) * fps / src_fps) + 1
            H, W = geom.resize(h, w, target_area)
            limit = max((v for v in num_frames if v <= available), default=available)
            self.plans.append((geom.frames(available, limit), H, W, n, src_fps or fps))
        if self.rows and len(unreadable) == len(self.rows):
            raise ManifestError(f"{manifest}: none of its {len(self.rows)} clips can be read (the first: "
                                f"{unreadable[0]})")
        if unreadable:
            logger.warning(f"{len(unreadable)} of the {len(self.rows)} rows of {manifest} cannot be read: they are "
                           f"skipped when drawn, and counted")

    def __len__(self):
        return len(self.rows)

    def token_counts(self, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
        video = np.array([geom.tokens(T, H, W) for T, H, W, _, _ in self.plans])
        image = np.array([geom.tokens(1, H, W) for _, H, W, _, _ in self.plans])
        return video, image

    def typical_size(self) -> tuple[int, int, int]:
        """The most common (T, H, W) the readable videos are read at (images and unreadable rows left out, unless
        the data has no readable video)."""
        readable = [p[:3] for p, ok in zip(self.plans, self.readable) if ok]
        videos = [p for p in readable if p[0] > 1]
        return Counter(videos or readable).most_common(1)[0][0]

    def describe(self, i: int) -> str:
        T, H, W = self.plans[i][:3]
        return f"{self.rows[i].path}, read at {T}x{H}x{W} (frames x height x width)"

    def load(self, i: int, image: bool, rng: random.Random) -> dict:
        row, (T, H, W, n, src_fps) = self.rows[i], self.plans[i]
        T = 1 if image else T
        span = (T - 1) * src_fps / self.fps  # source frames covered
        first = rng.randint(0, max(0, math.floor(n - 1 - span)))
        video = read_video(row.path, num_frames=T, fps=self.fps, start=first / src_fps, height=H, width=W)
        return dict(video=video, caption=row.caption, detailed_caption=row.detailed_caption)


class CacheSource:
    """Latents and text embeddings written by `python -m videodit.data.cache`; as an image, a video's first latent
    frame (the causal VAE encodes the first frame alone, so this equals encoding the frame)."""

    def __init__(self, cache_dir: str):
        path = os.path.join(cache_dir, "index.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{cache_dir} is not a latent cache (no index.json); write one with "
                                    f"python -m videodit.data.cache --config CONFIG --out NEW_FOLDER")
        with open(path) as f:
            self.index = json.load(f)
        self.dir, self.items = cache_dir, self.index["items"]
        self.ft, self.fs = self.index["ft"], self.index["fs"]
        self.text_dim, self.latent_channels = self.index["text_dim"], self.index["latent_channels"]
        self._null = None

    def __len__(self):
        return len(self.items)

    def token_counts(self, geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
        shapes = [x["shape"] for x in self.items]
        return (np.array([geom.latent_tokens(t, h, w) for _, t, h, w in shapes]),
                np.array([geom.latent_tokens(1, h, w) for _, _, h, w in shapes]))

    def typical_size(self) -> tuple[int, int, int]:
        """The most common (T, H, W) in pixels of the cached videos (images left out unless there are none)."""
        shapes = [tuple(x["shape"]) for x in self.items]
        _, t, h, w = Counter([s for s in shapes if s[1] > 1] or shapes).most_common(1)[0][0]
        return 1 + self.ft * (t - 1), h * self.fs, w * self.fs

    def null_text(self) -> torch.Tensor:
        """The empty prompt's embedding (L, D)."""
        if self._null is None:
            with safe_open(os.path.join(self.dir, "null.safetensors"), "pt") as f:
                self._null = f.get_tensor("text")
        return self._null

    def describe(self, i: int) -> str:
        _, t, h, w = self.items[i]["shape"]
        return f"cached item {i} (\"{self.items[i]['caption'][:40]}\"), latents {t}x{h}x{w} (frames x height x width)"

    def load(self, i: int, image: bool, rng: random.Random) -> dict:
        item = self.items[i]
        shard = os.path.join(self.dir, item["shard"])
        try:
            with safe_open(shard, "pt") as f:
                key = item["key"]
                latent = f.get_tensor(f"latent.{key}")  # (C, T', h, w)
                text = {item["caption"]: f.get_tensor(f"text.{key}")}  # caption -> (L, D) real tokens
                if item.get("detailed_caption"):
                    text[item["detailed_caption"]] = f.get_tensor(f"detailed.{key}")
        except Exception as e:  # missing, truncated or damaged (safetensors raises its own error type): skipped
            raise VideoReadError(shard, f"cannot read item {item['key']} of this cache shard ({e})") from None
        return dict(latent=latent[:, :1] if image else latent, caption=item["caption"],
                    detailed_caption=item.get("detailed_caption"), text=text)


def make_source(data, geom: Geometry):
    """The source named by a DataConfig."""
    if data.source == "shapes":
        return ShapesSource(data.sizes, data.shapes_count, data.seed, geom, parse_only(data.shapes_only))
    if data.source == "manifest":
        return ManifestSource(data.manifest, data.target_area, data.num_frames, data.fps, geom)
    return CacheSource(data.cache_dir)


# ---------------------------------------------------------------------------------------------------------------
# Packing and the sampler


def pack_by_budget(tokens, max_tokens: int) -> list[list[int]]:
    """Positions 0..N-1 of a sequence of token counts grouped, in order, into batches of at most max_tokens tokens:
    first fit over the open batches (at most MAX_OPEN_BATCHES; when none fits and the window is full, the oldest
    batch is closed). Every position lands in exactly one batch."""
    batches, open_, room = [], [], []
    for pos, n in enumerate(int(x) for x in tokens):
        if n > max_tokens:
            raise ValueError(f"a sample of {n} latent tokens does not fit data.max_tokens = {max_tokens}; raise "
                             f"max_tokens or lower data.target_area / data.num_frames / data.sizes")
        slot = next((k for k, r in enumerate(room) if r >= n), None)
        if slot is None:
            if len(open_) == MAX_OPEN_BATCHES:
                batches.append(open_.pop(0))
                room.pop(0)
            open_.append([])
            room.append(max_tokens)
            slot = len(open_) - 1
        open_[slot].append(pos)
        room[slot] -= n
    return batches + open_


class PackedBatchSampler:
    """Yields this rank's batches, each a list of (index, is_image, epoch) keys, forever.

    video_tokens, image_tokens: (N,) token counts of each sample as a video and as a single frame."""

    def __init__(self, video_tokens, image_tokens, max_tokens: int, image_ratio: float, seed: int,
                 rank: int = 0, world_size: int = 1, start: DataPosition | None = None):
        self.video_tokens, self.image_tokens = np.asarray(video_tokens), np.asarray(image_tokens)
        self.max_tokens, self.image_ratio, self.seed = max_tokens, image_ratio, seed
        self.rank, self.world_size = rank, world_size
        self.start = start or DataPosition()
        self._cache, self._lengths = {}, {}  # the last epoch's batches; every epoch's batch count

    def epoch(self, epoch: int) -> list[list[tuple[int, bool, int]]]:
        """All global batches of one epoch."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.video_tokens))
            image = rng.random(len(order)) < self.image_ratio  # by position in the order
            tokens = np.where(image, self.image_tokens[order], self.video_tokens[order])
            batches = pack_by_budget(tokens, self.max_tokens)
            self._cache = {epoch: [[(int(order[p]), bool(image[p]), epoch) for p in b] for b in batches]}
            self._lengths[epoch] = len(batches)
        return self._cache[epoch]

    def position(self, batches: int, after: DataPosition | None = None) -> DataPosition:
        """The position after `batches` global batches, counting epochs forward from `after` (default: the start;
        it must not lie beyond the answer). Each epoch is packed once."""
        epoch, first = (after or self.start).epoch, (after or self.start).epoch_start
        while batches >= first + self._length(epoch):
            first += self._length(epoch)
            epoch += 1
        return DataPosition(batches, epoch, first)

    def _length(self, epoch: int) -> int:
        if epoch not in self._lengths:
            self.epoch(epoch)
        return self._lengths[epoch]

    def __iter__(self):
        g, pos = self.start.batches + self.rank, self.start
        while True:
            pos = self.position(g, pos)
            yield self.epoch(pos.epoch)[g - pos.epoch_start]
            g += self.world_size


# ---------------------------------------------------------------------------------------------------------------
# Samples and batches


class TrainData(torch.utils.data.Dataset):
    """Loads a sample by its (index, is_image, epoch) key and draws its prompt and conditioning frames.

    Returns dict(video (3, T, H, W) | latent (C, T', h, w), prompt str | text (L, D), cond (T',) bool, tokens),
    or dict(error=why) when the file cannot be read (said by the process that trains on the batch: a data worker
    reads ahead, and would warn of batches no step uses)."""

    def __init__(self, source, geom: Geometry, seed: int, detailed_prob: float, text_dropout: float,
                 cond_prob: float, cond_weights=None, image_detailed_prob: float | None = None):
        self.source, self.geom, self.seed = source, geom, seed
        self.detailed_prob, self.text_dropout, self.cond_prob = detailed_prob, text_dropout, cond_prob
        self.image_detailed_prob = detailed_prob if image_detailed_prob is None else image_detailed_prob
        # equal odds draw as before weights existed, so older runs keep their data order
        self.cond_weights = None if cond_weights is None or len(set(cond_weights)) == 1 else list(cond_weights)

    def __getitem__(self, key) -> dict | None:
        i, image, epoch = key
        rng = sample_rng(self.seed, epoch, i)
        try:
            s = self.source.load(i, image, rng)
        except VideoReadError as e:
            return dict(error=str(e))
        single = (s["latent"] if "latent" in s else s["video"]).shape[1] == 1  # an image draw, a photo, a short clip
        p_detailed = self.image_detailed_prob if single else self.detailed_prob
        prompt = drop_text([choose_caption(s, p_detailed, rng)], self.text_dropout, rng)[0]
        if "latent" in s:
            C, T, h, w = s["latent"].shape
            text = s["text"][prompt] if prompt else self.source.null_text()
            out = dict(latent=s["latent"], text=text)
        else:
            _, T, H, W = s["video"].shape
            T, h, w = self.geom.latent_shape(T, H, W)
            out = dict(video=s["video"], prompt=prompt)
        out.update(cond=random_cond(T, self.cond_prob, rng, self.cond_weights), tokens=self.geom.latent_tokens(T, h, w))
        return out


def collate(items: list) -> dict:
    """A packed batch: lists of samples of any shapes (no padding), the token count, and the samples that could not
    be read (`errors`: why, each; `skipped`: how many)."""
    ok = [x for x in items if "error" not in x]
    batch = {k: [x[k] for x in ok] for k in (ok[0] if ok else {})}
    errors = [x["error"] for x in items if "error" in x]
    batch.update(tokens=sum(x["tokens"] for x in ok), skipped=len(errors), errors=errors, size=len(ok))
    return batch


def make_loader(cfg, source, geom: Geometry, rank: int = 0, world_size: int = 1,
                start: DataPosition | None = None, holdout: int = 0) -> torch.utils.data.DataLoader:
    """This rank's endless DataLoader of packed batches, starting at `start` in the global stream. The source's last
    `holdout` items are never drawn (they are held out for evaluation)."""
    d = cfg.data
    if geom.patch[0] != 1:
        raise ConfigError(f"model.patch_size {list(geom.patch)}: the loader makes images and 1 + ft*k frames, which "
                          f"need a temporal patch pt = 1")
    video, image = source.token_counts(geom)
    counts = image if d.image_ratio >= 1 and not holdout else video  # the evaluation packs whole clips
    if counts.max() > d.max_tokens:
        i = int(counts.argmax())
        raise ConfigError(f"data.max_tokens = {d.max_tokens} is smaller than the largest sample ({counts[i]} latent "
                          f"tokens: {source.describe(i)}); raise it or lower data.target_area / data.num_frames / "
                          f"data.sizes")
    if holdout >= len(video):
        raise ConfigError(f"train.eval_clips = {holdout} would hold out all {len(video)} items of the data for "
                          f"evaluation; hold out fewer")
    video, image = video[:len(video) - holdout], image[:len(image) - holdout]
    sampler = PackedBatchSampler(video, image, d.max_tokens, d.image_ratio, d.seed, rank, world_size, start)
    data = TrainData(source, geom, d.seed, cfg.text.detailed_caption_prob, cfg.flow.text_dropout, cfg.flow.cond_prob,
                     cfg.flow.cond_weights, cfg.text.image_detailed_caption_prob)
    return torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=d.num_workers,
                                       prefetch_factor=4 if d.num_workers else None, worker_init_fn=_worker_init,
                                       persistent_workers=d.num_workers > 0, pin_memory=torch.cuda.is_available())


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # what ends a training run after its step's checkpoint


def _worker_init(_):
    """Data workers leave the stop signals (SIGTERM, SIGUSR1: a preemption, sent to every process of a job; SIGINT:
    Ctrl-C, sent to the terminal's process group) to the training process, which ends the run with a checkpoint and
    then stops them; they would otherwise die first and take the run down without one."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
