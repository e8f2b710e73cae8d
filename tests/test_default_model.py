"""The shipped default model (models/shapes-tiny): within its size budget, and the README's first command samples
a video with it in a fresh process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]
MODEL = ROOT / "models" / "shapes-tiny"


def test_default_model_is_a_pipeline_within_25_mb():
    assert (MODEL / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{MODEL} holds {size / 2**20:.1f} MB"
    for config in MODEL.glob("*/config.json"):  # as every export: no folder of the machine that trained it
        assert json.loads(config.read_text()).get("_name_or_path") is None, config


def test_readme_sample_command_writes_a_video(tmp_path):
    import decord

    out = tmp_path / "red_circle.mp4"
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "a red circle moving right", "--output", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-2000:]
    frames = decord.VideoReader(str(out)).get_batch(range(17)).asnumpy().astype(np.float32)  # (T, H, W, 3)
    assert frames.shape == (17, 64, 64, 3)
    assert frames.std(axis=(1, 2)).mean() > 5  # a picture, not a flat frame
    assert np.abs(np.diff(frames, axis=0)).mean() > 0.1  # and the frames are not all the same


def test_the_default_model_draws_each_prompts_colour_and_background():
    """What the shipped model has learned (README: colour in 86-100% of videos): reading its videos back by the
    world's rules finds the colour and background each prompt names. Guidance steering the wrong way, or a denoiser
    computing something else than it was trained with, loses them."""
    import torch

    from videodit.data.shapes import read_back
    from videodit.pipeline import VideoDiTPipeline

    pipe = VideoDiTPipeline.from_pretrained(str(MODEL))
    cases = [("a red circle moving right", "red", None), ("a blue square on a white background", "blue", "white"),
             ("two green triangles moving up on a gray background", "green", "gray"),
             ("a yellow circle", "yellow", None)]
    out = pipe([p for p, _, _ in cases], generator=[torch.Generator().manual_seed(0) for _ in cases], progress=False)
    for (prompt, color, background), frames in zip(cases, out.frames):
        got = read_back(frames)
        assert got["color"] == color and background in (None, got["background"]), (prompt, got)

