import re

import numpy as np
import pytest
import torch

from videodit.data.shapes import make_clip
from videodit.data.video import (VideoReadError, from_uint8, probe, read_image, read_video, resize_crop, to_uint8,
                                 write_video)


def moving_clip(t=17, h=64, w=96):
    for seed in range(100):
        clip = make_clip(seed, h, w, t)
        if clip["attributes"].motion != "still":
            return clip["frames"]


def test_mp4_round_trip_through_decord(tmp_path):
    frames = moving_clip()
    path = write_video(str(tmp_path / "a.mp4"), from_uint8(frames), fps=8)
    info = probe(path)
    assert (info["num_frames"], info["height"], info["width"], info["fps"]) == (17, 64, 96, 8.0)
    back = read_video(path)
    assert back.shape == (3, 17, 64, 96) and back.min() >= -1 and back.max() <= 1
    err = np.abs(to_uint8(back).astype(int) - frames.astype(int))
    assert err.mean() < 2.0 and np.percentile(err, 95) < 8  # h264 (4:2:0 chroma) on flat colours


@pytest.mark.parametrize("width", [16, 24, 48, 40])
def test_widths_decord_misreads_are_read_all_the_same(tmp_path, width):
    frames = moving_clip(9, 32, width)
    back = read_video(write_video(str(tmp_path / "w.mp4"), frames))
    assert back.shape == (3, 9, 32, width) and np.abs(to_uint8(back).astype(int) - frames).mean() < 5


def test_long_clips_read_a_chunk_at_a_time_by_decord_or_ffmpeg(tmp_path, monkeypatch):
    """A clip longer than a chunk (16 frames), at a higher frame rate than its own (repeated frames): the same
    frames whether decord reads it or ffmpeg streams it (decord's fallback), and in the frames' order."""
    import videodit.data.video as V

    frames = np.zeros((30, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = (np.arange(30) * 8)[:, None, None]  # red channel encodes the frame index
    path = write_video(str(tmp_path / "long.mp4"), frames, fps=8)
    by_decord = read_video(path, fps=12)  # 44 frames, most of them repeated
    assert by_decord.shape[1] == 44
    red = to_uint8(by_decord)[:, 16, 16, 0].astype(int)
    assert np.all(np.abs(red - np.arange(44) * 8 // 12 * 8) <= 6), red  # the frame shown at t: floor(t * 8)
    monkeypatch.setattr(V._Reader, "chunks", lambda self, idx, size=16: self._ffmpeg(idx, size))
    assert torch.allclose(read_video(path, fps=12), by_decord, atol=2 / 255)


def test_frame_rate_and_start_select_frames(tmp_path):
    frames = np.zeros((16, 32, 32, 3), np.uint8)
    frames[:, :, :, 0] = (np.arange(16) * 16)[:, None, None]  # red channel encodes the frame index
    path = write_video(str(tmp_path / "ramp.mp4"), frames, fps=8)
    clip = read_video(path, num_frames=4, fps=4, start=0.5)  # frames 4, 6, 8, 10
    red = to_uint8(clip)[:, 16, 16, 0].astype(int)
    assert np.all(np.abs(red - np.array([4, 6, 8, 10]) * 16) <= 6), red
    with pytest.raises(VideoReadError, match="has 16 frames"):
        read_video(path, num_frames=12, fps=4)


def test_gif_and_png(tmp_path):
    frames = moving_clip(9, 32, 48)
    assert read_video(write_video(str(tmp_path / "a.gif"), frames), height=32, width=48).shape == (3, 9, 32, 48)
    for fps in (8, 12.5, 30):  # whole-centisecond frame times, varied so the rate holds; still frames merged
        held = np.concatenate([frames[:1].repeat(4, 0), frames[1:]])
        path = write_video(str(tmp_path / f"{fps}.gif"), held, fps=fps)
        assert probe(path)["num_frames"] == 12 and abs(probe(path)["fps"] - fps) < 0.02 * fps
        assert np.array_equal(to_uint8(read_video(path, fps=fps)), held)  # gifs are lossless at these colours
    png = write_video(str(tmp_path / "a.png"), frames[:1])
    assert np.array_equal(to_uint8(read_image(png)), frames[:1])  # png is lossless
    with pytest.raises(ValueError, match="one frame"):
        write_video(str(tmp_path / "b.png"), frames)
    with pytest.raises(ValueError, match=".mp4, .gif"):
        write_video(str(tmp_path / "b.avi2"), frames)


def test_bad_frame_rates_and_counts_are_refused(tmp_path):
    frames = moving_clip(5, 32, 32)
    for name, fps in (("a.gif", 0), ("a.mp4", 0), ("a.gif", -2.5)):
        with pytest.raises(ValueError, match=f"fps must be > 0, got {fps}"):
            write_video(str(tmp_path / name), frames, fps=fps)
    path = write_video(str(tmp_path / "ok.mp4"), frames, fps=8)
    for kw, words in ((dict(fps=-8), "fps must be > 0"), (dict(fps=0), "fps must be > 0"),
                      (dict(num_frames=0), "num_frames must be >= 1")):
        with pytest.raises(ValueError, match=words):
            read_video(path, **kw)


def test_sixteen_bit_and_rotated_images_read_as_they_look(tmp_path):
    from PIL import Image

    grey = np.tile(np.linspace(0, 65535, 24).astype(np.uint16), (8, 1))  # a 16-bit ramp
    Image.fromarray(grey).save(tmp_path / "g.png")
    x = to_uint8(read_image(str(tmp_path / "g.png")))[0, ..., 0].astype(float)
    assert np.abs(x - grey / 257).max() <= 1
    photo = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # stored landscape, shown portrait (EXIF 6: rotate)
    exif = photo.getexif()
    exif[0x0112] = 6
    photo.save(tmp_path / "r.jpg", exif=exif)
    assert read_image(str(tmp_path / "r.jpg")).shape == (3, 1, 40, 20)
    assert probe(str(tmp_path / "r.jpg"))["height"] == 40


def test_resize_and_crop_keep_aspect():
    # a centred disc in a wide frame stays round when resized to a square, a tall or a wide target
    h, w = 60, 120
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    disc = (((xs - w / 2) ** 2 + (ys - h / 2) ** 2) < 10 ** 2).astype(np.uint8) * 255
    frames = torch.from_numpy(np.repeat(disc[None, :, :, None], 3, axis=3))
    for th, tw in [(32, 32), (64, 32), (30, 90)]:
        out = resize_crop(frames, th, tw)
        assert out.shape == (3, 1, th, tw)
        m = out[0, 0] > 0
        ys_, xs_ = torch.nonzero(m, as_tuple=True)
        height, width = ys_.max() - ys_.min() + 1, xs_.max() - xs_.min() + 1
        assert abs(int(height) - int(width)) <= 1, (th, tw, height, width)
        assert abs(float(ys_.float().mean()) + 0.5 - th / 2) < 1 and abs(float(xs_.float().mean()) + 0.5 - tw / 2) < 1


def test_bad_files_raise_one_error_type_naming_the_file(tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00not a video" * 50)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    for name in ["missing.mp4", "corrupt.mp4", "corrupt.png", "missing.jpg"]:
        with pytest.raises(VideoReadError) as e:
            read_video(str(tmp_path / name))
        assert name in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(VideoReadError, match="corrupt.mp4"):
        probe(str(tmp_path / "corrupt.mp4"))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "clips.mp4").mkdir()
    for name, why in [("missing.mp4", "no such file"), ("empty.mp4", "is an empty file (0 bytes)"),
                      ("clips.mp4", "is a folder, not a file")]:
        with pytest.raises(VideoReadError, match=re.escape(f"{name}: {why}")):
            probe(str(tmp_path / name))


def grey_ramp(t, h=32, w=32, step=8):
    """t flat grey frames (t, h, w, 3), frame k at level step * k: a frame's level tells its index."""
    return np.repeat((np.arange(t) * step).astype(np.uint8)[:, None, None, None], h * w * 3).reshape(t, h, w, 3)


def levels(clip, step=8):
    """The source frame index of each frame of a clip of `grey_ramp` frames."""
    return np.round(to_uint8(clip)[:, 16, 16, 0] / step).astype(int).tolist()


def ffmpeg_write(path, frames, fps, *options):
    """Lossless h264 through the ffmpeg binary, with output options that write_video does not take."""
    import subprocess

    import imageio_ffmpeg

    t, h, w, _ = frames.shape
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "libx264", "-qp", "0", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", *options, str(path)], input=frames.tobytes(), check=True)
    return str(path)


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_variable_frame_rate_clips_are_read_by_time(tmp_path, ext, monkeypatch):
    """10 frames at 30 fps, then 20 at 5 fps (a screen recorder's clip): the frame read for time t is the one shown at
    t, by its timestamp, and the rate is frames / duration; ffmpeg (decord's fallback) reads the same frames."""
    import videodit.data.video as V

    pts = np.array([k if k < 10 else 10 + (k - 10) * 6 for k in range(30)]) / 30  # each frame's start, seconds
    path = ffmpeg_write(tmp_path / f"vfr.{ext}", grey_ramp(30), 30, "-fps_mode", "vfr",
                        "-vf", "setpts='if(lt(N,10),N,10+(N-10)*6)/30/TB'")
    assert abs(probe(path)["fps"] - 30 / (pts[-1] + 1 / 30)) < 0.01  # 7.2: the last frame lasts 1/30 s
    clip = read_video(path, fps=8)  # up to the last frame's start: 34 frames
    expected = (np.searchsorted(pts, np.arange(34) / 8 + 1e-6, "right") - 1).tolist()
    assert levels(clip) == expected  # [0, 3, 7, 10, 10, 11, 12, 12, 13, 13, ...]
    assert levels(read_video(path, num_frames=4, fps=2, start=2.0)) == [18, 20, 23, 25]  # 2, 2.5, 3 and 3.5 s
    with pytest.raises(VideoReadError, match="has 30 frames"):
        read_video(path, num_frames=10, fps=2, start=0.5)  # would need 5 s
    monkeypatch.setattr(V._Reader, "chunks", lambda self, idx, size=16: self._ffmpeg(idx, size))
    assert levels(read_video(path, fps=8)) == expected


def test_a_slow_clip_read_faster_repeats_each_frame_equally(tmp_path):
    """2 fps read at 8 fps: each source frame four times (rounding half to even made it 3, 5, 3, 5 ...)."""
    path = write_video(str(tmp_path / "slow.mp4"), grey_ramp(5, step=40), fps=2)
    assert levels(read_video(path, fps=8), step=40) == [k // 4 for k in range(17)]


def test_an_image_is_probed_from_its_header_and_a_big_one_read_small(tmp_path, monkeypatch):
    """probe decodes no pixels; a photo read for a much smaller size is decoded (JPEG) or reduced (others) before the
    floats, to no more than 4x the size per side, and reads as the full image would."""
    from PIL import Image, ImageFile

    import videodit.data.video as V

    y, x = np.mgrid[0:600, 0:800] / 100.0
    smooth = np.stack([127 + 120 * np.sin(x + y), 127 + 120 * np.cos(x), 127 + 100 * np.sin(y)], -1).astype(np.uint8)
    photo = Image.fromarray(smooth)
    exif = photo.getexif()
    exif[0x0112] = 6  # shown turned a quarter: 600 wide, 800 high
    photo.save(tmp_path / "big.jpg", quality=95, exif=exif)
    photo.save(tmp_path / "big.png")
    photo.save(tmp_path / "turned.png", exif=exif)  # Pillow writes the eXIf chunk before the pixels
    with monkeypatch.context() as m:
        m.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("probe decoded the image"))
        assert probe(str(tmp_path / "big.jpg")) == dict(num_frames=1, fps=0.0, height=800, width=600)
        assert probe(str(tmp_path / "big.png")) == dict(num_frames=1, fps=0.0, height=600, width=800)
        assert probe(str(tmp_path / "turned.png")) == dict(num_frames=1, fps=0.0, height=800, width=600)
    sizes = []
    resize_crop_ = V.resize_crop
    monkeypatch.setattr(V, "resize_crop", lambda f, h, w: sizes.append(f.shape[1:3]) or resize_crop_(f, h, w))
    for name, (h, w) in (("big.jpg", (40, 30)), ("big.png", (30, 40))):
        small = read_image(str(tmp_path / name), h, w)
        assert sizes[-1][0] <= 4 * h and sizes[-1][1] <= 4 * w, sizes
        full = resize_crop_(torch.from_numpy(to_uint8(read_image(str(tmp_path / name)))), h, w)
        assert small.shape == (3, 1, h, w) and (small - full).abs().mean() < 2 / 255


def test_float_tiffs_read_as_they_look(tmp_path):
    """A float (mode F) image in [0, 1] is scaled to [0, 255], not read as black."""
    from PIL import Image

    ramp = np.tile(np.linspace(0, 1, 24, dtype=np.float32), (8, 1))
    Image.fromarray(ramp).save(tmp_path / "f.tif")
    x = to_uint8(read_image(str(tmp_path / "f.tif")))[0, ..., 0].astype(float)
    assert np.abs(x - ramp * 255).max() <= 1


def test_content_not_the_name_decides_image_or_video(tmp_path):
    """JPEGs named .jfif or .jpe are images; a PNG named .mp4 is read as an image and an mp4 named .jpg as a
    video."""
    from PIL import Image

    frames = grey_ramp(9)
    for name in ("a.jfif", "a.jpe", "png.mp4"):
        Image.fromarray(frames[3]).save(tmp_path / name, format="PNG" if name == "png.mp4" else "JPEG")
        assert probe(str(tmp_path / name)) == dict(num_frames=1, fps=0.0, height=32, width=32)
        assert levels(read_video(str(tmp_path / name))) == [3]
    write_video(str(tmp_path / "v.mp4"), frames, fps=8)
    (tmp_path / "v.mp4").rename(tmp_path / "mp4.jpg")
    assert probe(str(tmp_path / "mp4.jpg"))["num_frames"] == 9
    assert levels(read_video(str(tmp_path / "mp4.jpg"))) == list(range(9))


def test_a_partly_downloaded_mp4_is_read_as_far_as_it_goes(tmp_path):
    """An mp4 (index first) cut at 90% of its bytes, which decord refuses to open: ffmpeg reads the frames it holds."""
    path = ffmpeg_write(tmp_path / "whole.mp4", grey_ramp(40, step=6), 8, "-movflags", "+faststart")
    data = open(path, "rb").read()
    (tmp_path / "cut.mp4").write_bytes(data[:len(data) * 9 // 10])
    info = probe(str(tmp_path / "cut.mp4"))
    assert 30 <= info["num_frames"] < 40 and (info["fps"], info["height"], info["width"]) == (8, 32, 32)
    assert levels(read_video(str(tmp_path / "cut.mp4"), fps=4), step=6) == list(range(0, info["num_frames"], 2))
