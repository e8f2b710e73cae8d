import io
import json
import os
import random
import subprocess
import sys
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from videodit import caption
from videodit.data import shapes
from videodit.data.manifest import read_manifest, write_manifest
from videodit.data.video import from_uint8
from videodit.upsample import (SHAPE_WORDS, SIZE_WORDS, color_by_name, parse_shapes_prompt,
                               upsample_prompt)
from videodit.upsample import main as upsample_main

WORDS = "describe this video in detail a red circle moving left on gray background two blue squares".split()
CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c is string %}{{ c }}"
        "{% elif c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


def word_tokenizer(**kw) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", **kw)


def text_config():
    return LlamaConfig(vocab_size=len(WORDS) + 5, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def speak_words(model):
    """A random model emits special tokens as often as words; they decode to nothing: make it emit words only."""
    model.generation_config.suppress_tokens = list(range(5))


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A tiny randomly initialized LLaVA (CLIP vision tower + Llama) and its processor, saved to a folder."""
    d = str(tmp_path_factory.mktemp("vlm"))
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                      text_config=text_config(), image_token_index=4, vision_feature_select_strategy="default",
                      vision_feature_layer=-1)
    model = LlavaForConditionalGeneration(cfg)
    speak_words(model)
    model.save_pretrained(d)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size=16),
                   tokenizer=word_tokenizer(extra_special_tokens={"image_token": "<image>"}), patch_size=8,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=CHAT).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A manifest of 5 rendered shapes-world mp4 clips (64x64, 9 frames) and one unreadable file."""
    d = tmp_path_factory.mktemp("clips")
    path = shapes.write_dataset(str(d), 5, 64, 64, 9, seed=99)
    (d / "broken.mp4").write_bytes(b"not a video")
    rows = [json.loads(line) for line in open(path)]
    rows.insert(2, dict(path="broken.mp4", caption="a broken clip"))
    return write_manifest(path, rows)


class Counting:
    """Wraps a captioner: counts the clips it captions; raises after `fail_after` calls (an interrupted run)."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.clips, self.calls = inner, fail_after, 0, 0
        self.model_id = inner.model_id

    def __call__(self, videos):
        if self.fail_after is not None and self.calls == self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.clips += len(videos)
        return self.inner(videos)


def test_vlm_captions_in_batches_and_resumes(tiny_vlm, clips, tmp_path, caplog):
    out = str(tmp_path / "captioned.jsonl")
    vlm = caption.VLMCaptioner(tiny_vlm, max_new_tokens=6)
    with pytest.raises(KeyboardInterrupt):
        caption.caption_manifest(clips, out, Counting(vlm, fail_after=1), frames=3, batch_size=2)
    assert "broken.mp4" in caplog.text
    first = read_manifest(out)
    assert len(first) == 2  # the first batch was written before the interruption

    run = Counting(vlm)
    caplog.clear()
    counts = caption.caption_manifest(clips, out, run, frames=3, batch_size=2)
    assert "broken.mp4" in caplog.text
    assert counts == dict(captioned=3, kept=2, skipped=1) and run.clips == 3 and run.calls == 2
    rows, source = read_manifest(out), read_manifest(clips)
    assert [r.path for r in rows] == [r.path for r in source if not r.path.endswith("broken.mp4")]
    assert [r.detailed_caption for r in rows[:2]] == [r.detailed_caption for r in first]  # kept, not redone
    for r, s in zip(rows, [s for s in source if "broken" not in s.path]):
        assert r.detailed_caption and r.detailed_caption != s.detailed_caption and r.caption == s.caption
        assert r.extra["caption_model"] == tiny_vlm and r.extra["attributes"] == s.extra["attributes"]

    again = Counting(vlm)
    caplog.clear()
    assert caption.caption_manifest(clips, out, again, frames=3)["kept"] == 5
    assert "broken.mp4" in caplog.text
    assert again.clips == 0


def test_shapes_backend_command(clips, tmp_path, caplog):
    out = str(tmp_path / "out.jsonl")
    caption.main(["--manifest", clips, "--out", out, "--backend", "shapes", "--batch-size", "4"])
    assert "unreadable" in caplog.text
    rows = read_manifest(out)
    assert len(rows) == 5 and all(r.extra["caption_model"].startswith("shapes:") for r in rows)
    agree = []
    for r in rows:  # the caption states the attributes of the clip (read from mp4 at 9 frames)
        truth, said = r.extra["attributes"], parse_shapes_prompt(r.detailed_caption)
        agree += [said[k] == truth[k] for k in caption.HEADS]
    assert np.mean(agree) >= 0.8


def test_rows_of_one_clip_each_keep_their_caption_and_the_clip_is_captioned_once(clips, tmp_path):
    """Several captions of one clip: each row keeps its own caption and metadata, all get the clip's detailed
    caption from one read; an interrupted run resumes row by row, alike rows included."""
    a, b = (os.path.relpath(r.path, tmp_path) for r in read_manifest(clips)[:2])
    rows = [dict(path=a, caption="a red square", split="train"), dict(path=b, caption="clip b"),
            dict(path=a, caption="a crimson box", fps=8.0), dict(path="./" + a, caption="third caption"),
            dict(path=a, caption="a red square", split="val")]
    manifest, out = write_manifest(str(tmp_path / "in.jsonl"), rows), str(tmp_path / "out.jsonl")
    shapes_captioner = caption.ShapesCaptioner()
    with pytest.raises(KeyboardInterrupt):
        caption.caption_manifest(manifest, out, Counting(shapes_captioner, fail_after=1), frames=3, batch_size=1)
    assert [r.caption for r in read_manifest(out)] == ["a red square", "a crimson box", "third caption",
                                                       "a red square"]  # clip a, all of its rows, in one call
    run = Counting(shapes_captioner)
    counts = caption.caption_manifest(manifest, out, run, frames=3, batch_size=1)
    assert counts == dict(captioned=1, kept=4, skipped=0) and run.clips == 1
    got = read_manifest(out)
    assert [(r.caption, r.fps, r.extra.get("split")) for r in got] == [(r["caption"], r.get("fps"), r.get("split"))
                                                                        for r in rows]
    assert len({got[i].detailed_caption for i in (0, 2, 3, 4)}) == 1 and got[1].detailed_caption
    assert caption.caption_manifest(manifest, out, Counting(shapes_captioner, fail_after=0))["kept"] == 5


class Mute:
    """The shapes captioner, but writing an empty caption for every other clip (as a VLM that stops at once)."""

    def __init__(self):
        self.inner, self.model_id, self.calls = caption.ShapesCaptioner(), "mute", 0

    def __call__(self, videos):
        self.calls += 1
        return ["" if (self.calls + i) % 2 else text for i, text in enumerate(self.inner(videos))]


def test_a_rerun_takes_the_manifest_as_it_is_now_and_redoes_empty_captions(clips, tmp_path, caplog, capsys):
    """Kept rows take IN's current metadata with OUT's caption; an empty caption is skipped, warned about and
    redone by a rerun; clips outside OUT's folder keep absolute paths; captions by another model are named."""
    rows = [dict(path=r.path, caption=r.caption) for r in read_manifest(clips) if "broken" not in r.path][:2]
    manifest, out = write_manifest(str(tmp_path / "in.jsonl"), rows), str(tmp_path / "out" / "o.jsonl")
    os.makedirs(tmp_path / "out")
    counts = caption.caption_manifest(manifest, out, Mute(), frames=2, batch_size=2)
    assert counts == dict(captioned=1, kept=0, skipped=1) and "wrote an empty caption" in caplog.text
    first = [json.loads(line) for line in open(out)]
    assert len(first) == 1 and first[0]["detailed_caption"] and os.path.isabs(first[0]["path"])
    rows = [{**r, "split": "val"} for r in rows]  # a field added to the manifest since
    write_manifest(manifest, rows)
    caplog.clear()
    counts = caption.caption_manifest(manifest, out, caption.ShapesCaptioner(), frames=2)
    assert counts == dict(captioned=1, kept=1, skipped=0)
    got = read_manifest(out)
    assert [r.extra["split"] for r in got] == ["val", "val"] and all(r.detailed_caption for r in got)
    assert got[[r.path for r in got].index(first[0]["path"])].detailed_caption == first[0]["detailed_caption"]
    assert "kept as captioned by mute, not shapes:" in caplog.text
    write_manifest(manifest, rows[:1])  # a row gone from the manifest: gone from OUT, though nothing is captioned
    assert caption.caption_manifest(manifest, out, caption.ShapesCaptioner(), frames=2)["captioned"] == 0
    assert len(read_manifest(out)) == 1
    with pytest.raises(SystemExit):
        caption.main(["--manifest", manifest, "--out", str(tmp_path / "o.json"), "--backend", "shapes"])
    assert "a manifest is a .jsonl or .csv file" in capsys.readouterr().err
    csv_path = write_manifest(str(tmp_path / "m.csv"), [dict(path="a.mp4", caption="x", tags=["a", "b"])])
    assert read_manifest(csv_path)[0].extra["tags"] == ["a", "b"]  # written as JSON text, read back as the list


def test_command_refuses_to_caption_a_manifest_in_place(clips, tmp_path, capsys):
    """OUT holds only the captioned rows: written over IN it would lose the unreadable ones (and, on an
    interruption, all not yet reached); refused before the model loads, the manifest untouched."""
    rows = [dict(path=r.path, caption=r.caption) for r in read_manifest(clips)[:1]]
    manifest = write_manifest(str(tmp_path / "m.jsonl"), rows + [dict(path="uploading.mp4", caption="not there yet")])
    before = open(manifest).read()
    for out in (manifest, str(tmp_path / "." / "m.jsonl")):
        with pytest.raises(SystemExit) as e:
            caption.main(["--manifest", manifest, "--out", out, "--backend", "shapes", "--frames", "2"])
        assert e.value.code == 2 and "is the --manifest file; write the captions to another file" in \
            capsys.readouterr().err.strip().splitlines()[-1]
    with pytest.raises(ValueError, match="write the captions to another file"):
        caption.caption_manifest(manifest, manifest, caption.ShapesCaptioner())
    assert open(manifest).read() == before


def test_command_says_each_skip_in_one_line(clips, tmp_path):
    run = subprocess.run([sys.executable, "-m", "videodit.caption", "--manifest", clips, "--out",
                          str(tmp_path / "out.jsonl"), "--backend", "shapes", "--frames", "2", "--batch-size", "2"],
                         capture_output=True, text=True, check=True)
    lines = run.stderr.replace("\r", "\n").splitlines()  # the progress bar redraws with \r
    skips = [line for line in lines if "skipping" in line]
    assert len(skips) == 1 and skips[0].startswith("WARNING skipping an unreadable clip: ") and \
        "broken.mp4" in skips[0], run.stderr
    assert "caption_manifest(" not in run.stderr and "Warning" not in run.stderr, run.stderr


def test_sampled_frames_span_the_clip_and_only_large_frames_shrink(tmp_path):
    """sample_frames reads K frames from the first to the last, evenly; with short_side, a frame whose short side is
    larger shrinks to it, aspect kept, and a smaller one is left alone."""
    import numpy as np

    from videodit.data.video import write_video

    frames = np.repeat(np.arange(0, 225, 28, dtype=np.uint8)[:, None, None, None], 3, -1)  # frame i: grey 28 i
    frames = np.broadcast_to(frames, (9, 32, 96, 3))
    path = write_video(str(tmp_path / "ramp.mp4"), frames, fps=8)
    x = caption.sample_frames(path, 3)
    assert x.shape == (3, 3, 32, 96)
    grey = ((x.mean((0, 2, 3)) + 1) * 127.5).tolist()
    assert grey == pytest.approx([0, 112, 224], abs=4)
    assert caption.sample_frames(path, 3, short_side=16).shape == (3, 3, 16, 48)
    assert caption.sample_frames(path, 3, short_side=64).shape == (3, 3, 32, 96)  # short side 32: kept


def test_shapes_captioner_works_on_large_frames_at_its_own_size(monkeypatch):
    seen = []
    read_frame = shapes.read_frame
    monkeypatch.setattr(shapes, "read_frame", lambda f: seen.append(f.shape) or read_frame(f))
    cap = caption.ShapesCaptioner()
    clip = shapes.make_clip(5, 480, 640, 1)  # a large image: read at native size this took seconds
    said = parse_shapes_prompt(cap([from_uint8(clip["frames"])])[0])
    assert seen == [(64, 85, 3)]  # downscaled to a short side of twice the net's working size
    truth = asdict(clip["attributes"])
    assert all(said[k] == truth[k] for k in ("count", "color", "shape", "background"))


@pytest.mark.parametrize("args,message", [
    (["--out", "{tmp}"], "is a folder"),
    (["--backend", "shapes", "--model", "{tmp}/nope.safetensors"], "not found"),
    (["--backend", "shapes", "--model", "{tmp}/bad.safetensors"], "not shapes captioner weights"),
    (["--manifest", "{tmp}/broken.jsonl"], "none of the 1 rows"),
    (["train-shapes", "--out", "{tmp}", "--num", "0"], "--num and --steps"),
    (["train-shapes", "--out", "{tmp}", "--steps", "0"], "--num and --steps"),
    (["eval-shapes", "--num", "0"], "--num must be >= 1"),
])
def test_command_refuses_bad_input_in_one_line(clips, tmp_path, capsys, args, message):
    (tmp_path / "bad.safetensors").write_text("not weights")
    write_manifest(str(tmp_path / "broken.jsonl"), [dict(path="broken.mp4", caption="x")])
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    args = [x.replace("{tmp}", str(tmp_path)) for x in args]
    if args[0] not in ("train-shapes", "eval-shapes"):
        args = ["--manifest", clips, "--out", str(tmp_path / "out.jsonl"), "--backend", "shapes", *args]
    with pytest.raises(SystemExit) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        caption.main(args)
    text = str(e.value.code) if e.value.code != 2 else capsys.readouterr().err.strip().splitlines()[-1]
    assert message in text and "\n" not in text.strip()
    assert not os.path.exists(tmp_path / "out.jsonl")


def test_command_creates_the_output_folder_and_help_names_subcommands(clips, tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "out.jsonl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        caption.main(["--manifest", clips, "--out", str(out), "--backend", "shapes"])
    assert len(read_manifest(str(out))) == 5
    with pytest.raises(SystemExit):
        caption.main(["--help"])
    help_text = capsys.readouterr().out
    assert "train-shapes" in help_text and "eval-shapes" in help_text


def test_shipped_shapes_captioner_beats_chance_on_unseen_clips():
    net = caption.ShapesNet.load(caption.SHAPES_WEIGHTS)
    assert os.path.getsize(caption.SHAPES_WEIGHTS) < 2 * 2**20
    result = caption.evaluate_shapes(net, num=8, seed=777)  # 8 fresh clips of each of 7 sizes, 2 of them unseen
    for k in caption.HEADS:  # chance: count/size 50%, color 17%, shape 33%, motion 20%, background 33%
        acc = np.mean([r[k] for r in result.values() if k in r])
        assert acc >= 0.8, (k, acc, caption.format_accuracy(result))


def test_train_shapes_writes_loadable_weights(tmp_path):
    path = caption.train_shapes(str(tmp_path), num=24, steps=2, batch_size=4, log=lambda *a: None)
    net = caption.ShapesNet.load(path)
    pred = net.predict([from_uint8(shapes.make_clip(1, 48, 80, 1)["frames"])])[0]
    assert set(pred) == set(caption.HEADS) and pred["motion"] == "still"


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        caption.ShapesNet.load(str(tmp_path / "nope.safetensors"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        caption.VLMCaptioner(str(tmp_path))
    with pytest.raises(ValueError, match="needs --model"):
        caption.load_captioner("vlm")


# ---------------------------------------------------------------------------------------------------------------
# Prompt upsampling


def test_grammar_reads_every_detailed_caption():
    for i in range(300):
        clip = shapes.make_clip(i, 64, 96, 5)
        truth = asdict(clip["attributes"])
        truth.pop("starts")
        assert parse_shapes_prompt(clip["detailed_caption"]) == truth, clip["detailed_caption"]


COLOR_NAMES = {"red": ["red", "crimson", "scarlet"], "green": ["green", "emerald"], "blue": ["blue", "cobalt"],
               "yellow": ["yellow", "golden"], "purple": ["purple", "violet"], "white": ["white", "ivory"]}


def random_prompt(rng: random.Random) -> tuple[str, dict]:
    """A short prompt naming some attributes in some word order, with the tables' synonyms; and what it names."""
    a = dict(count=rng.choice([1, 2]), color=rng.choice(list(shapes.COLORS)), shape=rng.choice(shapes.SHAPES))
    syn = lambda table, value: rng.choice([w for w, v in table.items() if v == value])  # noqa: E731
    noun = syn(SHAPE_WORDS, a["shape"]) + ("s" if a["count"] == 2 else "")
    words = ["a" if a["count"] == 1 else rng.choice(["two", "a pair of"])]
    if rng.random() < 0.6:
        a["size"] = rng.choice(list(shapes.SIZES))
        words.append(syn(SIZE_WORDS, a["size"]))
    words += [rng.choice(COLOR_NAMES[a["color"]]), noun]
    parts = [" ".join(words)]
    if rng.random() < 0.8:
        a["motion"] = rng.choice(shapes.MOTIONS)
        parts.append(rng.choice({"left": ["moving left", "going leftward"], "right": ["moving right", "to the right"],
                                 "up": ["moving up", "rising"], "down": ["moving down", "falling"],
                                 "still": ["staying still", "motionless"]}[a["motion"]]))
    if rng.random() < 0.6:
        a["background"] = rng.choice([b for b in shapes.BACKGROUNDS if not (b == "white" == a["color"])])
        parts.append(rng.choice(["on a {} background", "against a {} backdrop", "{} background"])
                     .format(rng.choice(["grey", "gray"]) if a["background"] == "gray" else a["background"]))
    rng.shuffle(parts)
    return rng.choice([" ", ", "]).join(parts), a


def test_shapes_upsampler_keeps_every_attribute():
    rng = random.Random(0)
    for i in range(300):
        prompt, named = random_prompt(rng)
        assert parse_shapes_prompt(prompt) == named, prompt
        detailed = upsample_prompt(prompt, seed=i)
        said = parse_shapes_prompt(detailed)
        assert set(said) == set(caption.HEADS), detailed  # a detailed caption states everything
        assert {k: said[k] for k in named} == named, (prompt, detailed)
        assert not (said["color"] == said["background"] == "white"), detailed
    assert upsample_prompt("a red circle", seed=1) == upsample_prompt("a red circle", seed=1)
    with pytest.raises(TypeError, match="prompt must be a string, got NoneType"):
        upsample_prompt(None)
    assert len({upsample_prompt("a red circle", seed=s) for s in range(10)}) > 5
    with pytest.warns(UserWarning, match="no color or shape"):
        assert upsample_prompt("a cat surfing a wave") == "a cat surfing a wave"


def test_colors_by_name_map_to_the_world_color_of_their_hue():
    for c in shapes.COLORS:  # the survey's own "red", "green", ... are the world's
        assert color_by_name(c) == c
    named = {"ruby": "red", "tomato": "red", "navy": "blue", "sapphire": "blue", "jade": "green", "grass": "green",
             "mustard": "yellow", "amber": "yellow", "lavender": "purple", "plum": "purple", "cream": "white",
             "forest green": "green", "sky blue": "blue", "charcoal": None, "teapot": None,
             "hot pink": "red", "crimson": "red", "raspberry": "red"}  # hues just below 360 wrap round to red
    assert {n: color_by_name(n) for n in named} == named
    said = parse_shapes_prompt("two navy cubes drifting west on a grey backdrop")
    assert said == dict(count=2, color="blue", shape="square", motion="left", background="gray")
    assert parse_shapes_prompt("a sky blue orb at rest") == dict(count=1, color="blue", shape="circle", motion="still")
    assert "color" not in parse_shapes_prompt("a ball at rest")  # no color named: none made up


@pytest.mark.parametrize("chat", [True, False])
def test_lm_upsampler(tmp_path, chat):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(text_config())
    speak_words(lm)
    lm.save_pretrained(tmp_path)
    tok = word_tokenizer()
    if chat:
        tok.chat_template = CHAT
    tok.save_pretrained(tmp_path)
    greedy = upsample_prompt("a red circle moving left", backend="lm", model=str(tmp_path))
    assert isinstance(greedy, str) and greedy.strip() and "\n" not in greedy
    assert upsample_prompt("a red circle moving left", backend="lm", model=str(tmp_path)) == greedy
    sampled = [upsample_prompt("a red circle", backend="lm", model=str(tmp_path), seed=s, temperature=1.0)
               for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] != sampled[2] and all(w in WORDS for w in sampled[0].split())
    with pytest.raises(FileNotFoundError, match="nope"):
        upsample_prompt("a red circle", backend="lm", model=str(tmp_path / "nope"))
    if chat:  # the command line gives the function's rewrites, one a line
        run = subprocess.run([sys.executable, "-m", "videodit.upsample", "--model", str(tmp_path), "--seed", "3",
                              "--temperature", "1", "a red circle", "a red circle moving left"],
                             capture_output=True, text=True, check=True)
        assert run.stdout.splitlines() == [sampled[0], upsample_prompt("a red circle moving left", backend="lm",
                                                                       model=str(tmp_path), seed=3, temperature=1.0)]


def test_upsample_command_reads_prompts_from_arguments_or_lines(capsys, monkeypatch):
    upsample_main(["two navy squares moving up", "a red circle", "--seed", "2"])
    assert capsys.readouterr().out.splitlines() == [upsample_prompt(q, seed=2) for q in
                                                    ("two navy squares moving up", "a red circle")]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a red circle\n\n  a green triangle  \n"))
    upsample_main([])
    assert capsys.readouterr().out.splitlines() == [upsample_prompt(q) for q in ("a red circle", "a green triangle")]
    for args, message in ((["--model", "./nope", "x"], "--model ./nope: not a folder"), ([""], "non-empty prompts"),
                          (["--temperature", "-1", "x"], "--temperature must be >= 0")):
        with pytest.raises(SystemExit):
            upsample_main(args)
        assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_commands_print_a_warning_as_one_line():
    run = subprocess.run([sys.executable, "-m", "videodit.upsample", "three circles"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), env=os.environ | {"PYTHONWARNINGS": ""})
    assert run.returncode == 0 and run.stderr == ("UserWarning: the shapes upsampler cannot follow all of 'three "
                                                  "circles': 'three': the world shows at most two objects; two are "
                                                  "drawn; drawn at random: size, color, motion, background\n")


# ---------------------------------------------------------------------------------------------------------------
# A model path: a local folder (it exists, or starts with /, ./, ../ or ~) or else a hub id (videodit.text.is_local)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "empty").mkdir(parents=True)


@pytest.mark.parametrize("model,words", [
    ("models/nope", "--model models/nope: no local folder at that path, so it was taken for the hub id of the prompt "
                    "upsampler's causal LM, which cannot be loaded"),
    ("./models/nope", "--model ./models/nope: not a folder with config.json"),
    ("models/empty", "--model models/empty: not a folder with config.json"),  # there: local, though no ./
])
def test_upsample_command_says_in_one_line_that_a_model_is_missing(offline, capsys, model, words):
    with pytest.raises(SystemExit) as e:
        upsample_main(["--model", model, "a red circle"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and words in err, err


@pytest.mark.parametrize("model,words", [
    ("models/nope", "error: models/nope: no local folder at that path, so it was taken for the hub id of the "
                    "captioner's vision-language model"),
    ("models/empty", "error: models/empty: not a folder with config.json"),
])
def test_caption_command_says_in_one_line_that_a_model_is_missing(offline, clips, tmp_path, model, words):
    with pytest.raises(SystemExit) as e:
        caption.main(["--manifest", clips, "--out", str(tmp_path / "out.jsonl"), "--model", model])
    assert str(e.value.code).startswith(words) and "\n" not in str(e.value.code), e.value.code


# Prompt wordings the shapes rules once misread (s26 words probe): prompt -> the attributes it names
@pytest.mark.parametrize("prompt, named", [
    ("a red circle moving left to right", dict(count=1, color="red", shape="circle", motion="right")),  # 1
    ("a blue square moving right to left", dict(count=1, color="blue", shape="square", motion="left")),
    ("a square moving left-to-right", dict(count=1, shape="square", motion="right")),
    ("a triangle moving top to bottom", dict(count=1, shape="triangle", motion="down")),
    ("a red circle on the right moving left", dict(count=1, color="red", shape="circle", motion="left")),  # 2
    ("a red circle in the top left moving down", dict(count=1, color="red", shape="circle", motion="down")),
    ("a red circle starting on the left, moving right", dict(count=1, color="red", shape="circle", motion="right")),
    ("a red circle starting at the left moving right", dict(count=1, color="red", shape="circle", motion="right")),
    ("a red circle on the right", dict(count=1, color="red", shape="circle")),
    ("a circle moving to the bottom", dict(count=1, shape="circle", motion="down")),  # 3
    ("a circle moving to the top", dict(count=1, shape="circle", motion="up")),
    ("a red circle that isn't moving", dict(count=1, color="red", shape="circle", motion="still")),  # 4
    ("a red circle that doesn't move", dict(count=1, color="red", shape="circle", motion="still")),
    ("a green square with no motion", dict(count=1, color="green", shape="square", motion="still")),
    ("a circle that isn't red", dict(count=1, shape="circle")),
    ("a square on a blue background", dict(count=1, shape="square")),  # 5/6
    ("a triangle against a red backdrop", dict(count=1, shape="triangle")),
    ("a circle on a pale background", dict(count=1, shape="circle", background="white")),
    ("a red circle on a light background", dict(count=1, color="red", shape="circle", background="white")),
    ("a red circle on a dark background", dict(count=1, color="red", shape="circle", background="black")),
    ("a circle, background is white", dict(count=1, shape="circle", background="white")),
    ("a red circel moving right", dict(count=1, color="red", shape="circle", motion="right")),  # 7/12
    ("a blue trangle moving up", dict(count=1, color="blue", shape="triangle", motion="up")),
    ("2 red circle", dict(count=2, color="red", shape="circle")),
    ("a snowy ball at rest", dict(count=1, color="white", shape="circle", motion="still")),  # 11
    ("three red circles", dict(count=2, color="red", shape="circle")),
    ("a blue square, not a triangle", dict(count=1, color="blue", shape="square")),
    ("no circles, just one green square", dict(count=1, color="green", shape="square")),
    ("one red circles", dict(count=1, color="red", shape="circle")),
    ("a red circle starting top left moving down", dict(count=1, color="red", shape="circle", motion="down")),
    ("a red circle moving down from the top left", dict(count=1, color="red", shape="circle", motion="down")),
    ("twenty red circles", dict(count=2, color="red", shape="circle")),
    ("a small red circle and a large red circle", dict(count=2, size="small", color="red", shape="circle")),
])
def test_shapes_rules_read_common_wordings(prompt, named):
    assert parse_shapes_prompt(prompt) == named


def test_shapes_rules_read_every_paraphrase_of_the_evaluation():
    import itertools

    from videodit.eval.shapes import PLURAL, SYNONYMS
    s = SYNONYMS
    for count, color, shape, motion in itertools.product(*(s[k] for k in ("count", "color", "shape", "motion"))):
        for words in itertools.product(s["count"][count], s["color"][color], s["shape"][shape], s["motion"][motion]):
            noun = PLURAL[words[2]] if count == 2 else words[2]
            prompt = f"{words[0]} {words[1]} {noun} {words[3]} on a gray backdrop"
            assert parse_shapes_prompt(prompt) == dict(count=count, color=color, shape=shape, motion=motion,
                                                       background="gray"), prompt


@pytest.mark.parametrize("prompt, drawn", [
    ("a red circle and a blue square", "second shape 'square'"),  # 8
    ("a black circle moving left", "no 'black' color.*drawn at random: size, color"),  # 12
    ("a medium red circle", "no 'medium' size.*drawn at random: size"),
    ("a red circle rotating clockwise", "no 'rotating' motion.*drawn at random: size, motion"),
    ("a circle that isn't red", "isn't red"),  # 4
    ("a square on a blue background", "background 'blue'"),  # 5
    ("a white circle on a white background", "never drawn on a white background"),  # 9
    ("three red circles", "'three': the world shows at most two objects"),
    ("5 dots rising", "'5': the world shows at most two objects"),
    ("a circle moving up and to the right", "second direction 'to the right': objects move one way, up"),
    ("a red shape that is not a circle", "'not a circle': the shape is drawn.*drawn at random: size, shape"),
    ("a hundred red circles moving up", "'hundred': the world shows at most two objects"),
    ("a small red circle and a large red circle", "a second size 'large'"),
    ("a large red circle starting on the right moving right", "large objects moving right cannot start at the right"),
])
def test_shapes_upsampler_warns_once_about_what_it_cannot_follow(prompt, drawn):
    import re

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detailed = upsample_prompt(prompt, seed=0)
    assert len(caught) == 1 and re.search(drawn, str(caught[0].message)), [str(w.message) for w in caught]
    assert caught[0].filename == __file__  # 13: the warning points at the caller of upsample_prompt
    said = parse_shapes_prompt(detailed)
    assert not (said["color"] == said["background"] == "white"), detailed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        drawn = [parse_shapes_prompt(upsample_prompt(prompt, seed=s)) for s in range(20)]
    if "isn't red" in prompt:
        assert all(d["color"] != "red" for d in drawn)
    if "not a circle" in prompt:
        assert all(d["shape"] != "circle" for d in drawn) and {d["shape"] for d in drawn} == {"square", "triangle"}
    if "three" in prompt or "5" in prompt:
        assert all(d["count"] == 2 for d in drawn)


@pytest.mark.parametrize("prompt, cell", [
    ("a small red circle starting on the right moving left", ("right", None)),
    ("a blue square at the bottom", (None, "bottom")),
    ("two green triangles on the left moving up", ("left", None)),
    ("a white circle in the top right", ("right", "top")),
    ("a red circle in the middle", ("center", "middle")),
    ("a red circle moving down from the top left", ("left", "top")),
])
def test_shapes_upsampler_starts_the_objects_where_the_prompt_places_them(prompt, cell):
    import re

    for seed in range(10):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # each of these places admits some size and motion: no warning
            detailed = upsample_prompt(prompt, seed=seed)
        said = re.search(r"starts? near (.*)\.$", detailed).group(1)
        cells = []
        for region in said.split(" and "):  # "the middle right", "the top center", "the center"
            words = region.split()[1:]
            cells.append(("center", "middle") if words == ["center"] else (words[-1], words[0]))
        assert any(all(want in (None, g) for want, g in zip(cell, got)) for got in cells), (prompt, detailed)


def test_shapes_upsampler_takes_any_int_seed_and_is_quiet_on_plain_prompts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert upsample_prompt("a red circle", seed=-1) == upsample_prompt("a red circle", seed=-1)  # 10
        upsample_prompt("just one snowy pyramid climbing on a black backdrop", seed=3)
    with pytest.warns(UserWarning) as caught:
        upsample_prompt("a cat surfing")
    assert caught[0].filename == __file__
