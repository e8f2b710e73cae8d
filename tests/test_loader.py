import json
import logging
import os
import random

import numpy as np
import pytest
import torch

from videodit.config import ConfigError, load_config
from videodit.data.loader import (CacheSource, DataPosition, Geometry, ManifestSource, PackedBatchSampler, ShapesSource,
                                  TrainData, make_loader, pack_by_budget)
from videodit.data.manifest import write_manifest
from videodit.data.shapes import item_seed, make_clip
from videodit.data.video import write_video

GEOM = Geometry(ft=4, fs=4, patch=(1, 2, 2))


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_geometry():
    assert GEOM.tokens(17, 64, 64) == 5 * 8 * 8 and GEOM.tokens(1, 64, 128) == 8 * 16
    assert GEOM.frames(available=14, limit=33) == 13 and GEOM.frames(available=100, limit=17) == 17
    H, W = GEOM.resize(720, 1280, 64 * 64)  # 16:9 at about 4096 pixels, multiples of fs * ph = 8
    assert H % 8 == 0 and W % 8 == 0 and abs(W / H - 16 / 9) < 0.15 and abs(H * W - 4096) < 700
    with pytest.raises(ValueError, match="1 \\+ 4\\*k"):
        ShapesSource([[16, 64, 64]], 10, 0, GEOM)
    wide = Geometry(4, 4, (1, 2, 4))  # a patch wider than tall: heights step by 8, widths by 16
    assert wide.snap(17, 40, 50) == (17, 40, 48) and wide.resize(720, 1280, 4096) == (48, 80)
    assert wide.snap(3, 12, 24) == (5, 16, 32)  # ties up, as the VAE's valid_size
    wide.check(17, 40, 48, "data.sizes entry")
    with pytest.raises(ValueError, match="multiples of 8 and 16"):
        wide.check(17, 40, 40, "data.sizes entry")


def test_packing_respects_budget_and_drops_nothing():
    rng = np.random.default_rng(0)
    video, image = rng.integers(10, 300, 500), rng.integers(1, 40, 500)
    sampler = PackedBatchSampler(video, image, max_tokens=512, image_ratio=0.3, seed=1)
    for epoch in range(2):
        batches = sampler.epoch(epoch)
        seen = sorted(i for b in batches for i, _, _ in b)
        assert seen == list(range(500))  # every sample exactly once per epoch
        for b in batches:
            assert sum(image[i] if im else video[i] for i, im, _ in b) <= 512
        share = np.mean([im for b in batches for _, im, _ in b])
        assert 0.2 < share < 0.4  # the image ratio
        fill = sum(image[i] if im else video[i] for b in batches for i, im, _ in b) / (512 * len(batches))
        assert fill > 0.85  # first fit leaves little room unused
    indices = lambda epoch: [[i for i, _, _ in b] for b in sampler.epoch(epoch)]  # noqa: E731
    assert indices(0) != indices(1)  # reshuffled per epoch (the keys always differ: each holds its epoch)
    again = PackedBatchSampler(video, image, max_tokens=512, image_ratio=0.3, seed=1)
    assert again.epoch(1) == sampler.epoch(1)  # deterministic by seed and epoch
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_budget([10, 600, 10], 512)


def test_ranks_shard_the_stream_and_resume_on_another_world_size():
    rng = np.random.default_rng(1)
    video, image = rng.integers(10, 200, 40), rng.integers(1, 20, 40)  # short epochs: the test crosses several

    def sampler(rank=0, world=1, start=None):
        return PackedBatchSampler(video, image, 400, 0.2, seed=3, rank=rank, world_size=world, start=start)

    stream = take(iter(sampler()), 90)
    # two ranks: rank r reads global batches r, r + 2, ...
    two = [take(iter(sampler(r, 2)), 30) for r in range(2)]
    assert [b for pair in zip(*two) for b in pair] == stream[:60]
    # stop after 11 steps of 2 ranks x grad_accum 2 = 44 batches; resume on 3 ranks from the saved position
    pos = sampler(0, 2).position(44)
    assert pos.batches == 44 and pos.epoch > 0  # the saved position is past an epoch boundary
    saved = DataPosition(**json.loads(json.dumps(pos.to_dict())))
    three = [take(iter(sampler(r, 3, saved)), 15) for r in range(3)]
    assert [b for trio in zip(*three) for b in trio] == stream[44:89]


def test_the_sampler_packs_each_epoch_once(monkeypatch):
    """Batches are drawn and positions saved without re-packing the epochs behind them: a long run (many epochs of
    a small data set) costs the same per batch at its end as at its start."""
    from videodit.data import loader

    calls = []
    monkeypatch.setattr(loader, "pack_by_budget", lambda *a: calls.append(1) or pack_by_budget(*a))
    video, image = np.random.default_rng(2).integers(10, 200, 40), np.full(40, 5)
    sampler = PackedBatchSampler(video, image, 400, 0.2, seed=3)
    stream = take(iter(sampler), 200)
    epochs = stream[-1][0][2] + 1
    assert epochs >= 8 and len(calls) == epochs
    assert sampler.position(199).epoch == epochs - 1 and len(calls) == epochs  # a checkpoint's position: no packing


def test_the_token_budget_must_hold_the_largest_sample_drawn():
    """17x64x64 clips are 320 tokens, their frames 64: a budget of 100 is refused for clips, and taken for frames
    only (image_ratio 1), unless held-out clips must be packed too."""
    source = ShapesSource([[17, 64, 64]], 10, 0, GEOM)
    cfg = lambda *more: load_config(None, ["data.sizes=[[17,64,64]]", "data.max_tokens=100",  # noqa: E731
                                           "data.num_workers=0", *more])
    with pytest.raises(ConfigError, match=r"max_tokens = 100 is smaller than the largest sample \(320 latent"):
        make_loader(cfg(), source, GEOM)
    batch = next(iter(make_loader(cfg("data.image_ratio=1"), source, GEOM)))
    assert all(v.shape[1] == 1 for v in batch["video"]) and batch["tokens"] <= 100
    with pytest.raises(ConfigError, match="largest sample \\(320 latent tokens: a clip of data.sizes"):
        make_loader(cfg("data.image_ratio=1"), source, GEOM, holdout=2)


def test_a_manifest_too_large_for_the_token_budget_names_the_largest_clip(tmp_path):
    rows = [dict(path=f"{name}.mp4", caption="c", num_frames=n, fps=8.0, height=h, width=w)  # metadata: no probing
            for name, n, h, w in [("short", 9, 64, 64), ("long", 300, 64, 64), ("middle", 20, 64, 64)]]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = ManifestSource(str(tmp_path / "m.jsonl"), 64 * 64, [9, 17, 33], 8.0, GEOM)
    cfg = load_config(None, ["data.max_tokens=400", "data.num_workers=0"])
    with pytest.raises(ConfigError, match=r"\(576 latent tokens: .*long\.mp4, read at 33x64x64 \(frames x height x "):
        make_loader(cfg, source, GEOM)


def test_held_out_items_are_never_drawn():
    cfg = load_config(None, ["data.sizes=[[5,16,16],[1,16,32]]", "data.shapes_count=30", "data.max_tokens=64",
                             "data.num_workers=0"])
    source = ShapesSource(cfg.data.sizes, 30, 0, GEOM)
    sampler = make_loader(cfg, source, GEOM, holdout=6).batch_sampler
    for epoch in range(3):
        assert sorted(i for b in sampler.epoch(epoch) for i, _, _ in b) == list(range(24))  # 24-29 held out
    with pytest.raises(ConfigError, match="eval_clips = 30 would hold out all 30 items"):
        make_loader(cfg, source, GEOM, holdout=30)


def test_held_out_items_leave_the_token_budget_to_the_items_drawn():
    """Each item is packed by its own token count, whatever the holdout: with 3 sizes of very different counts and a
    holdout of 5 (not a multiple of 3), every batch holds at most max_tokens tokens of the items it really holds."""
    cfg = load_config(None, ["data.sizes=[[17,32,32],[1,16,16],[9,16,16]]", "data.shapes_count=20",
                             "data.max_tokens=80", "data.image_ratio=0.2", "data.num_workers=0"])
    source = ShapesSource(cfg.data.sizes, 20, 0, GEOM)
    video, image = source.token_counts(GEOM)
    assert video.tolist()[:3] == [80, 4, 12]  # clips of 80, 4 and 12 tokens, in turn
    sampler = make_loader(cfg, source, GEOM, holdout=5).batch_sampler
    for epoch in range(3):
        batches = sampler.epoch(epoch)
        assert sorted(i for b in batches for i, _, _ in b) == list(range(15))
        for b in batches:
            assert sum(image[i] if im else video[i] for i, im, _ in b) <= 80, b


def test_each_epoch_draws_a_samples_randomness_afresh():
    """Caption choice, text dropout and conditioning frames are drawn per (seed, epoch, index): one item over 20
    epochs takes both captions, is sometimes dropped and sometimes kept, and gets several conditioning masks; an
    epoch drawn again gives the same."""
    src = ShapesSource([[9, 16, 16]], 4, 0, GEOM)
    data = TrainData(src, GEOM, 0, detailed_prob=0.5, text_dropout=0.5, cond_prob=0.5)
    clip = make_clip(item_seed(src.seed, 1), 16, 16, 9)
    draws = [data[(1, False, epoch)] for epoch in range(20)]
    prompts = [d["prompt"] for d in draws]
    assert {"", clip["caption"], clip["detailed_caption"]} == set(prompts)
    assert len({tuple(d["cond"].tolist()) for d in draws}) > 1
    assert [data[(1, False, epoch)]["prompt"] for epoch in range(20)] == prompts


def test_cond_weights_decide_the_conditioning_frames_drawn():
    """flow.cond_weights reach the data: with all the weight on 'last' (and cond_prob 1), every sample of every
    epoch holds its last latent frame clean, and only that one."""
    from videodit.flow import COND_MODES, cond_frames

    weights = [float(m == "last") for m in COND_MODES]
    data = TrainData(ShapesSource([[17, 16, 16]], 10, 0, GEOM), GEOM, 0, 0.5, 0.0, cond_prob=1.0,
                     cond_weights=weights)
    for epoch in range(3):
        for i in range(10):
            assert torch.equal(data[(i, False, epoch)]["cond"], cond_frames(5, "last")), (i, epoch)


def test_shapes_source_items_and_determinism():
    cfg = load_config(None, ["data.sizes=[[9,32,32],[1,32,64]]", "data.shapes_count=6", "data.image_ratio=0.5",
                             "data.num_workers=0", "flow.cond_prob=1.0", "flow.text_dropout=0.0"])
    src = ShapesSource(cfg.data.sizes, 6, 0, GEOM)
    data = TrainData(src, GEOM, 0, 0.5, 0.0, 1.0)
    a, b = data[(0, False, 3)], data[(0, False, 3)]
    assert torch.equal(a["video"], b["video"]) and a["prompt"] == b["prompt"] and torch.equal(a["cond"], b["cond"])
    assert a["video"].shape == (3, 9, 32, 32) and a["cond"].shape == (3,) and a["tokens"] == 3 * 4 * 4
    image = data[(0, True, 3)]["video"]
    assert image.shape == (3, 1, 32, 32) and torch.equal(image[:, 0], a["video"][:, 0])  # a frame of the clip
    batch = next(iter(make_loader(cfg, src, GEOM)))
    assert batch["tokens"] <= cfg.data.max_tokens and batch["skipped"] == 0
    assert len(batch["video"]) == len(batch["prompt"]) == len(batch["cond"]) == batch["size"]


def test_images_draw_captions_at_their_own_rate():
    src = ShapesSource([[9, 32, 32]], 20, 0, GEOM)
    data = TrainData(src, GEOM, 0, 1.0, 0.0, 0.0, image_detailed_prob=0.0)  # clips always detailed, images never
    for i in range(20):
        clip = make_clip(item_seed(src.seed, i), 32, 32, 9)
        assert data[(i, False, 0)]["prompt"] == clip["detailed_caption"] != clip["caption"]
        assert data[(i, True, 0)]["prompt"] == clip["caption"]
    one_frame = ShapesSource([[1, 32, 32]], 20, 0, GEOM)  # drawn as clips, single frames all the same: photos
    data = TrainData(one_frame, GEOM, 0, 1.0, 0.0, 0.0, image_detailed_prob=0.0)
    for i in range(20):
        assert data[(i, False, 0)]["prompt"] == make_clip(item_seed(src.seed, i), 32, 32, 1)["caption"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Clips of three aspects, an image, a missing file and a corrupt file."""
    d = tmp_path_factory.mktemp("manifest")
    rows = []
    for i, (h, w, t) in enumerate([(48, 80, 13), (64, 64, 13), (96, 64, 6), (40, 40, 13)]):
        clip = make_clip(i, h, w, t)
        name = f"clip{i}.mp4"
        write_video(str(d / name), clip["frames"], fps=8)
        row = dict(path=name, caption=clip["caption"], detailed_caption=clip["detailed_caption"])
        if i % 2:
            row.update(num_frames=t, fps=8.0, height=h, width=w)  # metadata given: no probing
        rows.append(row)
    write_video(str(d / "still.png"), make_clip(9, 40, 56, 1)["frames"])
    rows.append(dict(path="still.png", caption="a still image"))
    rows.append(dict(path="missing.mp4", caption="gone", num_frames=13, fps=8.0, height=48, width=48))
    (d / "corrupt.mp4").write_bytes(b"\x00\x01 not a video " * 50)
    rows.append(dict(path="corrupt.mp4", caption="broken"))
    with open(d / "data.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(d / "data.jsonl")


def test_manifest_clips_keep_aspect_and_fit_the_vae(manifest, caplog):
    with caplog.at_level(logging.WARNING):
        src = ManifestSource(manifest, target_area=32 * 32, num_frames=[9], fps=8.0, geom=GEOM)
    assert "1 of the 7 rows of" in caplog.text  # corrupt.mp4; missing.mp4 gave its metadata, so is found when read
    caplog.clear()
    expect = {0: (9, 24, 40), 1: (9, 32, 32), 2: (5, 40, 24), 3: (9, 32, 32), 4: (1, 24, 40)}
    for i, (T, H, W) in expect.items():
        assert src.plans[i][:3] == (T, H, W)
    data = TrainData(src, GEOM, 0, 0.5, 0.1, 0.3)
    for i, (T, H, W) in expect.items():
        assert data[(i, False, 0)]["video"].shape == (3, T, H, W)
        assert data[(i, True, 0)]["video"].shape == (3, 1, H, W)  # a video row used as one frame
    with caplog.at_level(logging.WARNING):
        missing, corrupt = data[(5, False, 0)], data[(6, False, 0)]
    assert "missing.mp4" in missing["error"] and "corrupt.mp4" in corrupt["error"]
    assert not caplog.text  # said by the process that trains on it, as it counts it


def test_manifest_clips_are_read_from_a_random_frame(tmp_path):
    """A clip longer than the frames read starts anywhere it fits: over 20 draws, a 40-frame clip (frame k grey
    6k) read as 9 frames gives consecutive frames, starting at several frames in 0..31."""
    frames = np.repeat((np.arange(40) * 6).astype(np.uint8), 32 * 32 * 3).reshape(40, 32, 32, 3)
    write_video(str(tmp_path / "ramp.mp4"), frames, fps=8)
    write_manifest(str(tmp_path / "m.jsonl"), [dict(path="ramp.mp4", caption="c", num_frames=40, fps=8.0,
                                                    height=32, width=32)])
    src = ManifestSource(str(tmp_path / "m.jsonl"), target_area=32 * 32, num_frames=[9], fps=8.0, geom=GEOM)
    starts = set()
    for seed in range(20):
        grey = (src.load(0, False, random.Random(seed))["video"] + 1).mul(127.5).mean(dim=(0, 2, 3))  # (9,)
        k = (grey / 6).round().long()
        assert torch.equal(k, k[0] + torch.arange(9)) and (grey - 6 * k).abs().max() < 2, grey
        starts.add(int(k[0]))
    assert len(starts) >= 5 and min(starts) >= 0 and max(starts) <= 31, starts


def test_each_clip_is_read_at_the_longest_listed_length_it_holds(tmp_path):
    lengths = {1: 1, 4: 1, 6: 5, 9: 9, 12: 9, 20: 17, 33: 17, 40: 33, 100: 33}  # frames at 8 fps -> frames read
    rows = [dict(path=f"{n}.mp4", caption="c", num_frames=n, fps=8.0, height=32, width=32) for n in lengths]
    write_manifest(str(tmp_path / "m.jsonl"), rows)
    src = ManifestSource(str(tmp_path / "m.jsonl"), 32 * 32, [9, 17, 36], 8.0, GEOM)  # 36: 33 in 1 + 4k frames
    assert [p[0] for p in src.plans] == list(lengths.values())


def test_loader_skips_and_counts_bad_files_in_workers(manifest):
    cfg = load_config(None, ["data.source=manifest", f"data.manifest={manifest}", "data.target_area=1024",
                             "data.num_frames=[9]", "data.max_tokens=64", "data.num_workers=2",
                             "data.image_ratio=0.3"])
    src = ManifestSource(manifest, 1024, [9], 8.0, GEOM)
    sampler_batches = PackedBatchSampler(*src.token_counts(GEOM), 64, 0.3, 0).epoch(0)
    batches = take(iter(make_loader(cfg, src, GEOM)), len(sampler_batches))  # one epoch
    assert sum(b["skipped"] for b in batches) == 2 == sum(len(b["errors"]) for b in batches)
    assert sum(b["size"] for b in batches) == 5
    for b in batches:
        assert b["tokens"] <= 64
        for v in b.get("video", []):  # a batch whose samples all failed is empty
            assert (v.shape[1] - 1) % 4 == 0 and v.shape[2] % 8 == 0 and v.shape[3] % 8 == 0


def test_each_source_knows_its_most_common_clip_size(tmp_path):
    """What a trained model samples at by default (the exported pipeline's default_size)."""
    assert ShapesSource([[9, 32, 64], [17, 64, 64], [17, 64, 64]], 30, 0, GEOM).typical_size() == (17, 64, 64)
    assert ShapesSource([[9, 32, 64], [17, 64, 64]], 30, 0, GEOM).typical_size() == (9, 32, 64)  # a tie: the first
    rows = [dict(path=f"{i}.mp4", caption="c", num_frames=40, fps=8.0, height=h, width=w)  # metadata: no probing
            for i, (h, w) in enumerate([(720, 1280), (1080, 1920), (480, 480), (720, 1280)])]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = ManifestSource(str(tmp_path / "m.jsonl"), target_area=64 * 64, num_frames=[17], fps=8.0, geom=GEOM)
    assert manifest.typical_size() == (17, *GEOM.resize(720, 1280, 64 * 64))  # 16:9, the most common aspect
    items = [dict(shape=[4, 5, 8, 16], caption="a red circle")] * 2 + [dict(shape=[4, 1, 16, 16], caption="c")] * 3
    index = dict(items=items, ft=4, fs=8, text_dim=16, latent_channels=4)
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert CacheSource(str(tmp_path)).typical_size() == (17, 64, 128)  # the commonest video, though images outnumber
    assert CacheSource(str(tmp_path)).describe(1) == 'cached item 1 ("a red circle"), latents 5x8x16 (frames x ' \
        'height x width)'  # how an error names it
    (tmp_path / "index.json").write_text(json.dumps(dict(index, items=items[2:])))
    assert CacheSource(str(tmp_path)).typical_size() == (1, 128, 128)  # images only


def test_a_missing_or_damaged_cache_shard_is_a_read_error_naming_it(tmp_path):
    """As an unreadable clip: the loader skips, warns and counts the items of a shard that is gone or cut short."""
    from safetensors.torch import save_file

    from videodit.data.video import VideoReadError

    save_file({"latent.0": torch.zeros(4, 1, 2, 2), "text.0": torch.zeros(3, 16)}, str(tmp_path / "a.safetensors"))
    items = [dict(shard="a.safetensors", key="0", caption="c", shape=[4, 1, 2, 2]),
             dict(shard="b.safetensors", key="1", caption="c", shape=[4, 1, 2, 2])]
    (tmp_path / "index.json").write_text(json.dumps(dict(items=items, ft=4, fs=8, text_dim=16, latent_channels=4)))
    source = CacheSource(str(tmp_path))
    assert source.load(0, False, random.Random(0))["latent"].shape == (4, 1, 2, 2)
    with pytest.raises(VideoReadError, match="b.safetensors: cannot read item 1 of this cache shard"):
        source.load(1, False, random.Random(0))
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "a.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(VideoReadError, match="a.safetensors: cannot read item 0"):
        source.load(0, False, random.Random(0))


def test_a_row_without_its_frame_rate_is_probed_for_it(tmp_path):
    """num_frames, height and width given, fps not: the clip's own rate decides how many frames it has at data.fps
    (31 frames at 30 fps are 9 at 8 fps), and every draw reads."""
    write_video(str(tmp_path / "a.mp4"), make_clip(0, 32, 32, 31)["frames"], fps=30)
    (tmp_path / "m.jsonl").write_text(json.dumps(dict(path="a.mp4", caption="c", num_frames=31, height=32,
                                                      width=32)) + "\n")
    src = ManifestSource(str(tmp_path / "m.jsonl"), target_area=32 * 32, num_frames=[17], fps=8.0, geom=GEOM)
    assert src.plans[0][0] == 9 and src.plans[0][4] == 30
    data = TrainData(src, GEOM, 0, 0.5, 0.1, 0.3)
    assert all(data[(0, False, epoch)]["video"].shape[1] == 9 for epoch in range(8))


def test_a_video_under_an_images_name_is_planned_as_the_video_it_is(tmp_path):
    """Content decides: an mp4 saved as .jpg has its frames and rate (not one frame at 1 fps), and every draw reads."""
    write_video(str(tmp_path / "a.mp4"), make_clip(0, 32, 32, 31)["frames"], fps=30)
    os.rename(tmp_path / "a.mp4", tmp_path / "a.jpg")
    (tmp_path / "m.jsonl").write_text(json.dumps(dict(path="a.jpg", caption="c")) + "\n")
    src = ManifestSource(str(tmp_path / "m.jsonl"), target_area=32 * 32, num_frames=[17], fps=8.0, geom=GEOM)
    assert src.plans[0][0] == 9 and src.plans[0][3:] == (31, 30)
    data = TrainData(src, GEOM, 0, 0.5, 0.1, 0.3)
    assert all(data[(0, False, epoch)]["video"].shape[1] == 9 for epoch in range(4))


def test_the_most_common_size_is_a_readable_videos(tmp_path):
    """Images and rows that cannot be read do not decide the size a trained model samples at by default."""
    write_video(str(tmp_path / "a.mp4"), make_clip(0, 32, 64, 9)["frames"], fps=8)
    for i in range(3):
        write_video(str(tmp_path / f"{i}.png"), make_clip(i, 32, 32, 1)["frames"])
    rows = [dict(path="a.mp4", caption="c")] + [dict(path=f"{i}.png", caption="c") for i in range(3)] + \
        [dict(path=f"gone{i}.mp4", caption="c") for i in range(3)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = ManifestSource(str(tmp_path / "m.jsonl"), target_area=32 * 64, num_frames=[9], fps=8.0, geom=GEOM)
    assert src.typical_size() == (9, 32, 64)


def test_a_manifest_of_only_unreadable_clips_fails_at_once(tmp_path):
    from videodit.data.manifest import ManifestError

    (tmp_path / "bad.mp4").write_bytes(b"not a video" * 50)
    rows = [dict(path="bad.mp4", caption="a"), dict(path="gone.mp4", caption="b")]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"m.jsonl: none of its 2 clips can be read \(the first: .*bad.mp4"):
        ManifestSource(str(tmp_path / "m.jsonl"), target_area=32 * 32, num_frames=[9], fps=8.0, geom=GEOM)
