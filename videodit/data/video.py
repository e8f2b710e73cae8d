"""Video and image I/O at the library's edge.

Inside the library a clip is a float tensor (3, T, H, W) in [-1, 1] (batched: (B, 3, T, H, W)); an image is a clip
with T = 1. Reading uses decord for videos (ffmpeg for what decord cannot open) and PIL for images and GIFs; writing
makes mp4 (h264), gif, or png (one frame).
Every failure to read a file raises `VideoReadError`, which names the file, so a data pipeline can catch one type.
"""

import os
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, ImageSequence

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".bmp", ".webp", ".tif", ".tiff")


class VideoReadError(Exception):
    """A missing, unreadable, corrupt or too-short video or image file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def readable(path: str) -> str:
    """A written file, or every file under a folder, readable by whom the umask lets read (safetensors writes its
    files owner-only, 0600: a shared cluster's other users could read a run's configs, not its weights)."""
    mask = _umask()
    files = [path] if os.path.isfile(path) else [os.path.join(r, n) for r, _, names in os.walk(path) for n in names]
    for f in files:
        os.chmod(f, os.stat(f).st_mode | (0o444 & ~mask))
    return path


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it: a file another thread created meanwhile would
    get mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def is_image(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTS


def resize_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize uint8/float (T, H0, W0, 3) frames to cover (height, width) keeping the aspect, then centre-crop.

    Returns float (3, T, height, width) in [-1, 1]."""
    x = frames.permute(0, 3, 1, 2).float()  # (T, 3, H0, W0)
    h0, w0 = x.shape[-2:]
    scale = max(height / h0, width / w0)
    h1, w1 = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (h1, w1) != (h0, w0):
        x = F.interpolate(x, size=(h1, w1), mode="bilinear", antialias=True, align_corners=False)
    top, left = (h1 - height) // 2, (w1 - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def _short(e: Exception) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


class _Reader:
    """Random access to the frames of a video: n frames, fps, height, width, the frame shown at a time, and
    chunks(indices). `how` reads a gif with PIL, a video with decord, or (what decord cannot open, e.g. a partly
    downloaded mp4) with ffmpeg, which streams the frames in order."""

    def __init__(self, path: str, how: str = "decord"):
        self.path, self._vr, self._frames, self.starts = path, None, None, None
        if how == "gif":
            with Image.open(path) as im:  # gif writers merge repeated frames into longer ones: expand them
                frames = [(np.array(f.convert("RGB")), f.info.get("duration") or 125)
                          for f in ImageSequence.Iterator(im)]
            base = Counter(d for _, d in frames).most_common(1)[0][0]  # one frame's time; merged ones are multiples
            self._frames = np.stack([f for f, d in frames for _ in range(max(1, round(d / base)))])
            self.fps = 1000.0 * len(self._frames) / sum(d for _, d in frames)  # durations are whole centiseconds
            self.n, (self.height, self.width) = len(self._frames), self._frames.shape[1:3]
        elif how == "decord":
            import decord

            self._vr = decord.VideoReader(path, num_threads=1)
            self.n, self.fps = len(self._vr), float(self._vr.get_avg_fps()) or 1.0
            self.height, self.width = self._vr[0].shape[:2]
            ts = self._vr.get_frame_timestamp(range(self.n)).astype(np.float64)  # (n, 2) start, end s: no decoding
            starts, end = ts[:, 0] - ts[0, 0], ts[-1, 1] - ts[0, 0]
            if end > 0 and np.all(np.diff(starts) >= 0) and \
                    np.abs(starts - np.arange(self.n) / self.fps).max() > 0.1 / self.fps:  # variable frame rate
                self.fps, self.starts = float(self.n / end), np.append(starts, end)
        else:
            import imageio.v2 as imageio
            import imageio_ffmpeg

            with imageio.get_reader(path, format="ffmpeg") as r:
                meta = r.get_meta_data()
            self.n = imageio_ffmpeg.count_frames_and_secs(path)[0]  # decodes the frames it can
            self.fps, (self.width, self.height) = meta["fps"] or 1.0, meta["size"]
            if not self.n:
                raise ValueError("ffmpeg decodes no frame")
        if self.starts is None:  # a constant rate: frame k is shown from k / fps
            self.starts = np.arange(self.n + 1) / self.fps  # each frame's start, then the end of the last

    def index(self, times: np.ndarray) -> np.ndarray:
        """The frame shown at each time (seconds from the first frame): -1 before the first, n after the last."""
        return np.searchsorted(self.starts, times + 1e-6, "right") - 1

    def chunks(self, idx: list, size: int = 16):
        """The frames at idx (ascending, repeats allowed) as uint8 (t, H, W, 3) arrays of up to `size` frames each,
        so that a long clip is never held whole at its source resolution."""
        for i in range(0, len(idx), size):
            if self._frames is not None:
                yield self._frames[idx[i:i + size]]
                continue
            try:
                batch = self._vr.get_batch(idx[i:i + size]).asnumpy()
            except Exception:  # decord 0.6 fails on some frame widths (row padding): ffmpeg reads the rest in order
                yield from self._ffmpeg(idx[i:], size)
                return
            yield batch

    def _ffmpeg(self, idx: list, size: int):
        import imageio.v2 as imageio

        pos, buf = 0, []  # passthrough: every frame once, as decord counts them (not resampled to a constant rate)
        with imageio.get_reader(self.path, format="ffmpeg", output_params=["-fps_mode", "passthrough"]) as r:
            for i, frame in enumerate(r):
                while pos < len(idx) and idx[pos] == i:
                    buf.append(frame)
                    pos += 1
                    if len(buf) == size:
                        yield np.stack(buf)
                        buf = []
                if pos == len(idx):
                    break
        if pos < len(idx):
            raise ValueError(f"ffmpeg read {i + 1} frames, fewer than the {idx[-1] + 1} needed")
        if buf:
            yield np.stack(buf)


def _open(path: str) -> _Reader | None:
    """A reader for a video, or None for an image. The file is tried as the kind its extension says first, then as
    the other kind (content decides: a PNG named .mp4, an mp4 named .jpg), then with ffmpeg."""
    if not os.path.isfile(path):
        raise VideoReadError(path, "is a folder, not a file" if os.path.isdir(path) else "no such file")
    if os.path.getsize(path) == 0:
        raise VideoReadError(path, "is an empty file (0 bytes)")
    errors = []
    order = ("image", "decord", "ffmpeg") if is_image(path) else ("gif", "decord", "ffmpeg") \
        if os.path.splitext(path)[1].lower() == ".gif" else ("decord", "image", "ffmpeg")  # the gif reader is PIL's
    for how in order:
        try:
            if how != "image":
                return _Reader(path, how)
            with Image.open(path):  # reads the header only
                return None
        except Exception as e:  # decord and PIL raise many types for one problem: an unreadable file
            errors.append(e)
    kind = "an image" if is_image(path) else "a video"
    raise VideoReadError(path, f"cannot be opened as {kind} ({_short(errors[0])})") from errors[0]


def _shown_size(im: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened image as shown: EXIF orientations 5-8 turn it a quarter (as exif_transpose)."""
    w, h = im.size
    if im.format == "PNG" and "exif" not in im.info:  # no eXIf chunk before the pixels: getexif would decode them
        return h, w
    return (w, h) if im.getexif().get(0x0112) in (5, 6, 7, 8) else (h, w)


def probe(path: str) -> dict:
    """Frame count, frame rate and size of a video or image, without decoding every frame (an image: its header)."""
    r = _open(path)
    if r is None:
        try:
            with Image.open(path) as im:
                height, width = _shown_size(im)
        except Exception as e:
            raise VideoReadError(path, f"cannot be read as an image ({_short(e)})") from e
        return dict(num_frames=1, fps=0.0, height=height, width=width)
    return dict(num_frames=r.n, fps=r.fps, height=r.height, width=r.width)


def upright_rgb(im: Image.Image) -> Image.Image:
    """A PIL image as it looks, in 8-bit RGB: turned as its EXIF orientation says; 16-bit, integer and float grey
    scaled to 8 bits (convert("RGB") alone clips them: nearly all white)."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I") or im.mode == "F":
        grey = np.array(im, dtype=np.float64)
        if im.mode == "F" and grey.max(initial=0) <= 1:  # floats in [0, 1]: not black
            grey *= 255
        elif im.mode.startswith("I;16") or grey.max(initial=0) > 255:
            grey /= 257
        im = Image.fromarray(grey.clip(0, 255).astype(np.uint8))
    return im.convert("RGB")


def read_image(path: str, height: int | None = None, width: int | None = None) -> torch.Tensor:
    """An image as a one-frame clip (3, 1, H, W) in [-1, 1], upright as its EXIF orientation says."""
    if not os.path.isfile(path):
        raise VideoReadError(path, "no such file")
    try:
        with Image.open(path) as im:
            h, w = _shown_size(im)
            k = min(h // (2 * height), w // (2 * width)) if height and width else 1  # keep twice the size needed
            if k > 1:  # a JPEG decodes at 1/2, 1/4 or 1/8 scale (no more than 1/k): a big photo for a small size
                im.draft("RGB", (-(-im.width // k), -(-im.height // k)))
            im = upright_rgb(im)
            k = min(im.height // (2 * height), im.width // (2 * width)) if height and width else 1
            arr = np.array(im.reduce(k) if k > 1 else im)  # what draft left: reduce in uint8, before the floats
    except Exception as e:
        raise VideoReadError(path, f"cannot be read as an image ({_short(e)})") from e
    return resize_crop(torch.from_numpy(arr)[None], height or arr.shape[0], width or arr.shape[1])


def read_video(path: str, num_frames: int | None = None, fps: float | None = None, start: float = 0.0,
               height: int | None = None, width: int | None = None) -> torch.Tensor:
    """`num_frames` frames (all when None) at `fps` (None: the source rate; a variable rate's average) from `start`
    seconds, resized to cover (height, width) keeping the aspect ratio and centre-cropped. Returns (3, T, H, W) in
    [-1, 1]. The frame for time t is the one shown at t (by its timestamp where the rate varies).

    Images are read as one-frame clips."""
    if fps is not None and not fps > 0:
        raise ValueError(f"fps must be > 0 (or None for the source rate), got {fps}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (or None for all), got {num_frames}")
    r = _open(path)
    if r is None:
        return read_image(path, height, width)
    fps = fps or r.fps
    if num_frames is None:  # up to the last frame's start
        num_frames = int((r.starts[-2] - start) * fps + 1e-6) + 1
    times = start + np.arange(max(num_frames, 1)) / fps
    idx = r.index(times).tolist()
    if num_frames < 1 or idx[0] < 0 or idx[-1] >= r.n:
        raise VideoReadError(path, f"has {r.n} frames ({r.starts[-1]:g} s at {r.fps:g} fps); {num_frames} frames "
                                   f"at {fps:g} fps from {start:g} s need {times[-1] + 1 / fps:g} s")
    try:  # a chunk at a time: only the resized clip is held whole
        return torch.cat([resize_crop(torch.from_numpy(c), height or r.height, width or r.width)
                          for c in r.chunks(idx)], dim=1)
    except Exception as e:
        raise VideoReadError(path, f"cannot be decoded ({_short(e)})") from e


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> a clip (3, T, H, W) in [-1, 1]; the inverse of `to_uint8`."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(video) -> np.ndarray:
    """(3, T, H, W) float in [-1, 1] tensor, or (T, H, W, 3) uint8 array, to (T, H, W, 3) uint8."""
    if isinstance(video, np.ndarray) and video.dtype == np.uint8:
        return video
    v = torch.as_tensor(video).detach().float().cpu()
    if v.ndim != 4 or v.shape[0] != 3:
        raise ValueError(f"expected a clip (3, T, H, W) in [-1, 1] or uint8 frames (T, H, W, 3), got {tuple(v.shape)}")
    return ((v.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()


def write_video(path: str, video, fps: float = 8) -> str:
    """Write a clip as .mp4 (h264), .gif, or .png (one frame only). Returns the path."""
    frames = to_uint8(video)
    ext = os.path.splitext(path)[1].lower()
    if ext in (".gif", ".mp4") and not fps > 0:
        raise ValueError(f"{path}: fps must be > 0, got {fps}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".png":
        if len(frames) != 1:
            raise ValueError(f"{path}: a .png holds one frame, got {len(frames)}; write .mp4 or .gif for a video")
        Image.fromarray(frames[0]).save(path)
    elif ext == ".gif":
        ims = [Image.fromarray(f) for f in frames]
        # a gif times frames in whole centiseconds: vary them (8 fps: 13, 12, 13, 12, ...) so the rate is exact
        ends = [max(i, int(100 * i / fps + 0.5)) for i in range(len(ims) + 1)]
        ims[0].save(path, save_all=True, append_images=ims[1:], loop=0,
                    duration=[10 * (b - a) for a, b in zip(ends, ends[1:])])
    elif ext == ".mp4":
        import imageio.v2 as imageio

        t, h, w, _ = frames.shape
        if h % 2 or w % 2:  # h264 in yuv420p needs even sides: repeat the last row / column
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        with imageio.get_writer(path, fps=fps, codec="libx264", quality=None, macro_block_size=1,
                                ffmpeg_params=["-crf", "12", "-preset", "veryfast", "-pix_fmt", "yuv420p"],
                                ffmpeg_log_level="error") as wr:
            for f in frames:
                wr.append_data(f)
    else:
        raise ValueError(f"{path}: unknown video extension {ext!r}; use .mp4, .gif, or .png for one frame")
    return path
