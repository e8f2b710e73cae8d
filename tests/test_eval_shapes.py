import json
import re

import numpy as np
import pytest
import torch

from videodit.data.shapes import Attributes, make_clip, render, sample_starts
from videodit.eval.shapes import (SYNONYMS, WORDS, confusion, contact_sheet, evaluate, evaluate_denoising, main,
                                  make_cases, score, table, word_sensitivity)
from videodit.upsample import parse_shapes_prompt


class RenderingPipe:
    """Stands in for a model that follows every prompt perfectly: it renders each case's attributes."""

    def __init__(self, cases, wrong_color=False):
        self.by_prompt = {c["prompt"]: c for c in cases}
        self.wrong_color = wrong_color

    def __call__(self, prompts, height, width, num_frames, generator=None, **kw):
        frames = []
        for p, h, w, t in zip(prompts, height, width, num_frames):
            a = dict(self.by_prompt[p]["attributes"])
            if self.wrong_color:
                a["color"] = "green" if a["color"] != "green" else "red"
            rng = np.random.default_rng(len(frames))
            starts = sample_starts(rng, a["count"], "large", a["motion"], h, w)
            frames.append(render(Attributes(size="large", starts=starts, **a), h, w, t))
        return type("Out", (), {"frames": frames})


def test_a_model_that_follows_prompts_scores_full_marks(tmp_path):
    cases = make_cases(3, seed=0)
    results, videos, _ = evaluate(RenderingPipe(cases), num=3, seed=0, batch=4, progress=False)
    summary, md = table(results)
    assert summary["overall"]["all"] == 1.0 and summary["paraphrased"]["n"] == 3
    assert "| 17x64x128 |" in md and "| paraphrased |" in md
    contact_sheet(results, videos, str(tmp_path / "sheet.png"))
    assert (tmp_path / "sheet.png").stat().st_size > 0


def test_a_wrong_color_is_caught():
    cases = make_cases(2, seed=1)
    results, _, _ = evaluate(RenderingPipe(cases, wrong_color=True), num=2, seed=1, batch=8, progress=False)
    summary, _ = table(results)
    assert summary["overall"]["color"] == 0.0 and summary["overall"]["all"] == 0.0
    assert summary["overall"]["shape"] == 1.0
    counts, md = confusion(results)
    for asked, reads in counts["color"].items():  # every colour read as the one the fake swapped in, nothing else
        wrong = "green" if asked != "green" else "red"
        assert reads[wrong] == sum(reads.values()) == sum(r["attributes"]["color"] == asked for r in results)
    assert all(reads.get(asked) == sum(reads.values()) for asked, reads in counts["shape"].items())
    clips = sum(r["size"][0] > 1 for r in results)
    assert sum(n for reads in counts["motion"].values() for n in reads.values()) == clips < len(results)
    assert "| color: asked \\ read |" in md


def test_paraphrases_use_words_the_captions_never_use():
    words = set()
    for seed in range(300):
        clip = make_clip(seed, 64, 64, 9)
        words |= set(re.findall(r"[a-z]+", (clip["caption"] + " " + clip["detailed_caption"]).lower()))
    for table_ in SYNONYMS.values():
        for synonyms in table_.values():
            for phrase in synonyms:
                assert set(phrase.split()) - words, phrase  # each carries a word the captions never use


def test_images_are_scored_without_motion():
    case = dict(size=(1, 64, 64), attributes=dict(count=1, color="red", shape="circle", motion="still"))
    frames = render(Attributes(1, "large", "red", "circle", "still", "black", [(32.0, 32.0)]), 64, 64, 1)
    assert score(case, frames)["hits"]["all"]


def test_command_refuses_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "model_index.json" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--num", "0"], ["--num", "-1"], ["--batch", "0"], ["--steps", "0"],
                                  ["--shift", "-1"], ["--cache-threshold", "-1"], ["--denoise", "--num", "0"],
                                  ["--words", "--num", "0"], ["--out", "{file}"], ["--guidance", "-1"],
                                  ["--guidance-parallel", "5"], ["--denoise", "--words"]])
def test_command_refuses_bad_settings_in_one_line(tmp_path, capsys, args):
    (tmp_path / "f").write_text("")
    args = [x.replace("{file}", str(tmp_path / "f")) for x in args]
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "error: --" in err[-1] and "model_index.json" not in err[-1]


class PixelPipe:
    """Latents are the pixels themselves. The denoiser either knows the clean clips it was shown (an oracle) or
    predicts zero velocity (it leaves the noise in)."""

    def __init__(self, oracle: bool):
        self.oracle, self.clean, self.transformer, self.dtype = oracle, [], self, torch.float32

    def encode_video(self, video):
        self.clean.append(video.float())
        return video.float()

    def encode_prompt(self, prompts):
        return torch.zeros(len(prompts), 1, 4), torch.ones(len(prompts), 1, dtype=torch.bool)

    def forward_latents(self, noisy, t, text, mask):
        if not self.oracle:
            return [torch.zeros_like(x) for x in noisy]
        return [(x - c) / ti for x, c, ti in zip(noisy, self.clean[-len(noisy):], t)]  # x - t v = the clean clip

    def decode(self, z):
        return z.clamp(-1, 1)


def test_denoising_test_reads_a_perfect_denoiser_fully_and_noise_worse_with_the_level():
    sizes, levels = [(9, 64, 64), (1, 64, 64)], (0.3, 0.9)
    summary, md = table(evaluate_denoising(PixelPipe(oracle=True), num=4, levels=levels, sizes=sizes,
                                           progress=False))
    assert summary["overall"]["all"] == 1.0 and summary["overall"]["n"] == 16
    assert "| t = 0.9, 9x64x64 | 4 |" in md
    summary, _ = table(evaluate_denoising(PixelPipe(oracle=False), num=4, levels=levels, sizes=sizes,
                                          progress=False))
    assert summary["t = 0.9, 9x64x64"]["all"] == 0.0
    assert summary["t = 0.3, 1x64x64"]["color"] > summary["t = 0.9, 1x64x64"]["color"]


class ShapeListener(PixelPipe):
    """A denoiser whose velocity depends on the prompt through its shape word only."""

    def __init__(self):
        super().__init__(oracle=False)

    def encode_prompt(self, prompts):
        words = torch.tensor([[float(w in p) for w in ("circle", "square", "triangle")] for p in prompts])
        return words[:, None], torch.ones(len(prompts), 1, dtype=torch.bool)

    def forward_latents(self, noisy, t, text, mask):
        return [0.5 * x + text[i, 0] @ torch.tensor([1.0, 2.0, 3.0]) for i, x in enumerate(noisy)]


def test_word_sensitivity_finds_the_one_word_a_denoiser_listens_to():
    change = word_sensitivity(ShapeListener(), num=3, levels=(0.9, 0.5), size=(5, 32, 32))
    assert set(change) == {*WORDS, "all"}
    for t in (0.9, 0.5):
        assert change["shape"][t] > 0.01 and change["all"][t] > 0.01
        assert all(change[k][t] == 0.0 for k in WORDS if k != "shape")


@pytest.mark.filterwarnings("ignore:the shapes upsampler found no color or shape")  # some paraphrases
def test_upsampled_prompts_keep_every_attribute_the_evaluation_asks_for():
    seen = []

    def parsing_pipe(prompts, height, width, num_frames, **kw):  # draws what it can read in each prompt given to it
        seen.extend(prompts)
        frames = []
        for p, h, w, t in zip(prompts, height, width, num_frames):
            a = dict(count=1, color="red", shape="circle", motion="still", background="black")
            a.update({k: v for k, v in parse_shapes_prompt(p).items() if k != "size"})
            starts = sample_starts(np.random.default_rng(0), a["count"], "large", a["motion"], h, w)
            frames.append(render(Attributes(size="large", starts=starts, **a), h, w, t))
        return type("Out", (), {"frames": frames})

    results, _, _ = evaluate(parsing_pipe, num=3, seed=2, batch=4, progress=False, upsample=True)
    assert seen == [r["sampled_prompt"] for r in results]
    plain = [r for r in results if r["group"] != "paraphrased"]
    assert all(len(r["sampled_prompt"]) > len(r["prompt"]) for r in plain)  # detailed captions, not the prompts
    assert all(r["hits"]["all"] for r in plain)


@pytest.mark.parametrize("args, want", [
    ([], dict(steps=1, guidance=3.0, guidance_parallel=1.0, shift=None, image_first=False)),
    (["--guidance", "1", "--shift", "2", "--image-first", "--batch", "3"],
     dict(steps=1, guidance=1.0, guidance_parallel=1.0, shift=2.0, image_first=True, batch=3)),
])
def test_command_writes_what_it_ran(tiny_pipe, tmp_path, args, want):
    """results.json records the settings each video was sampled with (the checkpoint's defaults where none were
    given) and a summary row per size, next to the table and the contact sheet."""
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    main(["--checkpoint", str(tmp_path / "pipe"), "--out", str(tmp_path / "o"), "--num", "1", "--steps", "1",
          "--seed", "7", *args])
    with open(tmp_path / "o" / "results.json") as f:
        got = json.load(f)
    assert {k: got[k] for k in want} == want and got["seed"] == 7 and got["num"] == 1
    assert got["checkpoint"] == str(tmp_path / "pipe") and got["timing"]["seconds_one_64x64x17"] > 0
    rows = got["summary"]
    assert rows["overall"]["n"] == len(rows) - 1 and all(r["n"] == 1 for k, r in rows.items() if k != "overall")
    assert "paraphrased" in rows and "1x64x64" in rows and "17x64x64" in rows
    assert (tmp_path / "o" / "table.md").read_text().count("\n") > len(rows)
    assert (tmp_path / "o" / "contact_sheet.png").stat().st_size > 0


@pytest.mark.parametrize("args,words", [(["--shift", "inf"], "--shift must be a positive finite number"),
                                        (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
                                        (["--steps", "0"], "--steps must be a positive whole number of steps")])
def test_command_refuses_sampling_settings_as_sample_py_does_before_any_model_loads(tmp_path, capsys, args, words):
    """videodit.pipeline.check_sampling's message, with the flag's name; before the checkpoint is even looked at (it
    does not exist here), so a bad setting never waits for a model to load and then ends in a traceback."""
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.startswith("python -m videodit.eval.shapes: error: ") and words in err, err
    assert f"got {args[1]}" in err and not (tmp_path / "o").exists()
