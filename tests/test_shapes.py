import json
import os
import subprocess
import sys

import numpy as np
import pytest

from videodit.data.manifest import read_manifest
from videodit.data.shapes import (COLORS, SIZES, ShapesDataset, displacement, make_clip, parse_only, read_back,
                                  read_frame, short_caption)
from videodit.data.shapes import main as shapes_main
from videodit.data.video import from_uint8, probe, read_video, to_uint8

FRAMES = [(17, 64, 64), (9, 64, 128), (17, 128, 64), (1, 64, 64), (5, 48, 80)]


def test_one_seed_gives_one_clip():
    a, b, c = make_clip(7, 64, 96, 9), make_clip(7, 64, 96, 9), make_clip(8, 64, 96, 9)
    assert np.array_equal(a["frames"], b["frames"]) and a["caption"] == b["caption"]
    assert a["detailed_caption"] == b["detailed_caption"]
    assert not np.array_equal(a["frames"], c["frames"])
    ds = ShapesDataset(sizes=[(9, 64, 64), (1, 64, 128)], length=10, seed=3)
    assert ds[4]["video"].equal(ds[4]["video"]) and ds[1]["video"].shape == (3, 1, 64, 128)


def test_the_dataset_indexes_like_a_list_and_clips_need_a_frame():
    ds = ShapesDataset(sizes=[(1, 32, 32), (5, 32, 32)], length=3, seed=1)
    assert ds[-1]["caption"] == ds[2]["caption"] and ds[-3]["video"].equal(ds[0]["video"])
    for i in (3, -4):
        with pytest.raises(IndexError, match=f"index {i} out of range for length 3"):
            ds[i]
    assert len(list(ds)) == 3
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        make_clip(0, 32, 32, 0)


def test_read_back_takes_a_clip_tensor_as_the_pipeline_returns():
    frames = make_clip(5, 64, 64, 9)["frames"]
    assert read_back(from_uint8(frames)) == read_back(frames)


def test_a_restricted_world_draws_only_its_values_and_reads_back():
    only = parse_only(["count=1", "size=large", "background=black", "shape=circle", "shape=square"])
    seen = set()
    for seed in range(40):
        clip = make_clip(seed, 64, 64, 5, only)
        a, got = clip["attributes"], read_back(clip["frames"])
        assert (a.count, a.size, a.background) == (1, "large", "black") and a.shape in ("circle", "square")
        assert (got["count"], got["shape"], got["background"]) == (1, a.shape, "black")
        seen |= {(a.shape, a.color, a.motion)}
    assert len(seen) > 20  # the unrestricted attributes still vary
    everything = parse_only([f"count={n}" for n in (1, 2)])
    assert all(make_clip(s, 64, 64, 1, everything)["caption"] == make_clip(s, 64, 64, 1)["caption"] for s in range(8))
    for items in (["colour=red"], ["count=3"], ["color=white", "background=white"]):
        with pytest.raises(ValueError, match="="):
            parse_only(items)


@pytest.mark.parametrize("t,h,w", FRAMES)
def test_pixels_match_attributes(t, h, w):
    """Read the rendered pixels back independently of the generator's bookkeeping."""
    for seed in range(12):
        clip = make_clip(seed, h, w, t)
        a, frames = clip["attributes"], clip["frames"]
        got = read_back(frames)
        assert got["count"] == a.count and got["color"] == a.color and got["shape"] == a.shape
        assert got["size"] == a.size and got["background"] == a.background
        objs = read_frame(frames[0])["objects"]
        assert len(objs) == a.count
        side = SIZES[a.size] * min(h, w)
        for o in objs:  # the object's extent is the contract's size, and its colour is the palette colour
            assert abs(o["side"] - side) <= 2.0
            assert np.abs(o["mean_rgb"] - COLORS[a.color]).max() < 4
        # each object in the first frame sits where the attributes say
        got_c = sorted(tuple(o["centre"]) for o in objs)
        want_c = sorted(tuple(s) for s in a.starts)
        if a.shape != "triangle":  # a triangle's centroid is not its box centre
            assert np.abs(np.array(got_c) - np.array(want_c)).max() < 1.0
        if t > 1:
            dx, dy = displacement(a.motion, h, w)
            assert got["motion"] == a.motion
            assert abs(got["displacement"][0] - dx / w) < 0.03 and abs(got["displacement"][1] - dy / h) < 0.03
            for fr in frames:  # objects never merge, and never leave the frame (a clipped one would shrink)
                objs = read_frame(fr)["objects"]
                assert len(objs) == a.count and all(abs(o["side"] - side) <= 2.0 for o in objs)


def test_a_small_frame_draws_two_large_objects_apart():
    """"Any height and width": below the usual gap (3 px), two large objects keep at least 1 px between them."""
    from videodit.data.shapes import sample_starts

    for motion in ("left", "right", "up", "down", "still"):
        for seed in range(20):
            a, b = sample_starts(np.random.default_rng(seed), 2, "large", motion, 8, 8)
            side = SIZES["large"] * 8
            assert max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= side + 1  # boxes apart on some axis
    with pytest.raises(ValueError, match="do not fit a 2x2 frame"):
        sample_starts(np.random.default_rng(0), 2, "large", "left", 2, 2)


def test_captions_follow_the_grammar():
    for seed in range(40):
        clip = make_clip(seed, 64, 64, 9)
        a, cap, det = clip["attributes"], clip["caption"], clip["detailed_caption"]
        assert cap.startswith("a " if a.count == 1 else "two ")
        assert f"{a.color} {a.shape}" in cap and short_caption(a.count, a.color, a.shape, a.motion) in (
            cap.replace(f" {a.size}", "").split(" on a ")[0])
        assert a.color in det and a.shape in det and a.background in det and "start" in det


def test_white_is_never_drawn_on_white():
    for seed in range(300):
        a = make_clip(seed, 32, 32, 1)["attributes"]
        assert not (a.color == "white" and a.background == "white")


def test_command_writes_clips_and_manifest(tmp_path):
    out = tmp_path / "shapes"
    subprocess.run([sys.executable, "-m", "videodit.data.shapes", "--out", str(out), "--num", "3", "--height", "64",
                    "--width", "96", "--num-frames", "9", "--seed", "2"], check=True, capture_output=True)
    rows = read_manifest(str(out / "manifest.jsonl"))
    assert len(rows) == 3 and all(r.path.endswith(".mp4") for r in rows)
    for r in rows:
        v = read_video(r.path)
        assert v.shape == (3, 9, 64, 96)
        got = read_back(to_uint8(v))
        assert got["color"] == r.extra["attributes"]["color"] and got["count"] == r.extra["attributes"]["count"]
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["caption"] == rows[0].caption


def test_command_accepts_a_float_fps_and_records_it(tmp_path):
    shapes_main(["--out", str(tmp_path), "--num", "1", "--num-frames", "5", "--fps", "7.5", "--height", "32",
                 "--width", "32"])
    row = read_manifest(str(tmp_path / "manifest.jsonl"))[0]
    assert row.fps == 7.5 and abs(probe(row.path)["fps"] - 7.5) < 0.01


def test_rerunning_the_command_into_a_folder_leaves_only_its_clips(tmp_path):
    """A second, smaller run of other-format clips into the same folder removes the first run's clips, and nothing
    else there."""
    (tmp_path / "notes.txt").write_text("mine")
    shapes_main(["--out", str(tmp_path), "--num", "3", "--num-frames", "5", "--height", "32", "--width", "32"])
    shapes_main(["--out", str(tmp_path), "--num", "2", "--num-frames", "1", "--height", "32", "--width", "32"])
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png", "manifest.jsonl", "notes.txt"]


@pytest.mark.parametrize("args,message", [
    (["--height", "37", "--width", "50", "--num-frames", "6"], "even sides"),
    (["--fps", "0"], "--fps must be > 0"),
    (["--fps", "-5"], "--fps must be > 0"),
    (["--out", "{file}"], "is a file"),
    (["--out", "{file}/sub"], "cannot create"),
])
def test_command_refuses_bad_input_in_one_line(tmp_path, capsys, args, message):
    (tmp_path / "f").write_text("")
    args = [x.replace("{file}", str(tmp_path / "f")) for x in args]
    with pytest.raises(SystemExit):
        shapes_main(["--out", str(tmp_path / "out"), "--num", "1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("python -m videodit.data.shapes: error:")
    assert not (tmp_path / "out").exists()


def test_odd_sized_images_are_fine(tmp_path):
    shapes_main(["--out", str(tmp_path), "--num", "1", "--num-frames", "1", "--height", "37", "--width", "50"])
    row = read_manifest(str(tmp_path / "manifest.jsonl"))[0]
    assert read_video(row.path).shape == (3, 1, 37, 50) and (row.height, row.width) == (37, 50)
