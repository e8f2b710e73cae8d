import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel,
                          UMT5Config, UMT5EncoderModel)

from videodit.text import TextEncoder, choose_caption, encode_with, load_text_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a an two small large red green blue yellow purple white circle circles square squares triangle " \
        "triangles moving left right up down staying still on gray black background".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS that appends </s> (so the empty prompt has one token)."""
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_model(kind: str):
    v = len(WORDS) + 3
    if kind == "t5":
        return T5EncoderModel(T5Config(vocab_size=v, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    if kind == "umt5":
        return UMT5EncoderModel(UMT5Config(vocab_size=v, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2))
    return CLIPTextModel(CLIPTextConfig(vocab_size=v, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=12, pad_token_id=0,
                                       eos_token_id=1, bos_token_id=1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> a folder holding a tiny randomly initialized model and its tokenizer, as save_pretrained writes."""
    out = {}
    for kind in ("t5", "umt5", "clip"):
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(kind)
        tiny_model(kind).save_pretrained(d)
        word_tokenizer().save_pretrained(d)
        out[kind] = str(d)
    return out


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


PROMPTS = ["a red circle", "two small blue squares moving up on a gray background", "a circle"]


def check_batch(enc: TextEncoder, prompts, emb, mask):
    n_tokens = [len(ids) for ids in enc.tokenizer(prompts)["input_ids"]]
    assert emb.shape == (len(prompts), max(n_tokens), enc.dim) and mask.shape == emb.shape[:2]
    assert mask.dtype == torch.bool and mask.sum(1).tolist() == n_tokens
    assert mask[:, 0].all() and (emb[~mask] == 0).all()  # right padding, zero and masked
    for i, p in enumerate(prompts):  # a prompt in a padded batch encodes as it does alone
        alone, _ = encode_with(enc.model, enc.tokenizer, [p], enc.max_length)
        torch.testing.assert_close(emb[i, :n_tokens[i]], alone[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["t5", "umt5", "clip"])
def test_tiny_backends_load_and_encode(saved, kind):
    enc = load_text_encoder(kind, saved[kind], max_length=32)
    assert enc.dim == 16 and type(enc.model).__name__ == type(tiny_model(kind)).__name__
    emb, mask = enc.encode(PROMPTS)
    check_batch(enc, PROMPTS, emb, mask)
    assert not torch.allclose(emb[0, :2], emb[2, :2])  # different prompts differ
    e, m = enc.empty()
    assert e.shape[0] == 1 and m.any() and m.sum() < mask[1].sum()


def test_minilm_from_package(minilm):
    assert minilm.dim == 384 and type(minilm.model).__name__ == "BertModel"
    emb, mask = minilm.encode(PROMPTS + [PROMPTS[0]])
    check_batch(minilm, PROMPTS + [PROMPTS[0]], emb, mask)
    assert torch.equal(emb[0], emb[3])  # identical prompts match

    def pooled(p):
        e, m = minilm.encode([p])
        return e[0][m[0]].mean(0)

    sim = lambda a, b: F.cosine_similarity(pooled(a), pooled(b), dim=0).item()  # noqa: E731
    # a paraphrase is much closer than a different scene (measured: 0.98 vs 0.44)
    assert sim("a red circle moving left", "a red circle moving to the left") > \
        sim("a red circle moving left", "a green square moving down") + 0.3


def test_cache_skips_the_model(saved):
    enc = load_text_encoder("t5", saved["t5"], cache_size=3)
    calls = []
    enc.model.register_forward_hook(lambda *a: calls.append(1))
    first, _ = enc.encode(PROMPTS)
    again, _ = enc.encode(PROMPTS[::-1])
    assert len(calls) == 1 and torch.equal(again, first.flip(0)[:, :again.shape[1]])
    enc.empty(), enc.empty()
    assert len(calls) == 2  # the empty prompt once; the cache keeps at most 3 prompts (LRU)
    enc.encode([PROMPTS[2]])  # the least recently used prompt was evicted: encoded again
    assert len(calls) == 3 and [p for p, _ in enc._cache] == [PROMPTS[0], "", PROMPTS[2]]
    enc.to(torch.float64)  # moving the encoder drops stale cached embeddings
    emb, _ = enc.encode([PROMPTS[0]])
    assert len(calls) == 4 and emb.dtype == torch.float64
    enc.max_length = 2  # another length: encoded again, cut
    with pytest.warns(UserWarning, match="truncated to 2 tokens"):
        short, _ = enc.encode([PROMPTS[0]])
    assert len(calls) == 5 and short.shape[1] == 2


def test_encode_with_zeroes_the_padding_and_warns_only_of_prompts_past_the_limit(saved):
    """encode_with itself (what training and the pipeline call, without TextEncoder's cache) returns zero padding,
    and a prompt of exactly max_length tokens is not truncated, so nothing is said about it."""
    import warnings

    enc = load_text_encoder("t5", saved["t5"])
    emb, mask = encode_with(enc.model, enc.tokenizer, PROMPTS, 64)
    assert not mask.all() and (emb[~mask] == 0).all() and (emb[mask] != 0).any(-1).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        emb, mask = encode_with(enc.model, enc.tokenizer, ["a red circle"], 4)  # 3 words and </s>: 4 tokens
    assert mask.shape == (1, 4) and mask.all()


def test_truncation_warns_and_clip_caps_length(saved):
    enc = load_text_encoder("t5", saved["t5"], max_length=4)
    long = "two small blue squares moving up on a gray background"
    with pytest.warns(UserWarning, match=r"truncated to 4 tokens.*two small blue squares"):
        emb, mask = enc.encode([long])
    assert emb.shape[1] == 4 and mask.all()
    clip = load_text_encoder("clip", saved["clip"], max_length=77)
    assert clip.max_length == 12  # CLIP's absolute positions cap the length


def test_frozen_and_usable_in_training(saved):
    enc = load_text_encoder("umt5", saved["umt5"])
    enc.train()
    assert not enc.model.training and not any(p.requires_grad for p in enc.parameters())
    emb, mask = enc.encode(PROMPTS)
    assert not emb.requires_grad
    proj = torch.nn.Linear(enc.dim, 4)
    (proj(emb) * mask[..., None]).sum().backward()  # embeddings feed a trained projection
    assert proj.weight.grad is not None


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        load_text_encoder("t5", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="needs a path"):
        load_text_encoder("clip")
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("bert", str(tmp_path))
    with pytest.raises(ValueError, match="max_length must be a positive number of tokens, got 0"):
        load_text_encoder("minilm", max_length=0)


def test_choose_caption():
    rng = np.random.default_rng(0)
    row = dict(caption="a red circle", detailed_caption="A single small red circle ...")
    assert choose_caption(row, 0.0, rng) == "a red circle" and choose_caption(row, 1.0, rng) == row["detailed_caption"]
    assert choose_caption(dict(caption="x"), 1.0, rng) == "x"
    picks = [choose_caption(row, 0.3, random.Random(i)) == row["detailed_caption"] for i in range(2000)]
    assert abs(np.mean(picks) - 0.3) < 0.04


def test_a_path_is_local_when_it_exists_or_says_so_else_a_hub_id(tmp_path, monkeypatch):
    from videodit.text import is_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "here").mkdir(parents=True)
    assert all(map(is_local, ["models/here", "./nope", "../nope", "~/nope", "/nope", ".", "a/b/c"]))
    assert not any(map(is_local, ["nope", "org/nope", "models/nope"]))  # "name" or "org/name": maybe on the hub


def test_a_missing_model_is_one_line_local_or_hub(saved, tmp_path, monkeypatch):
    """A local path without a model fails before transformers is asked; a relative path that is not there is taken
    for a hub id, and offline its error says so (and that no local folder was found), in one line."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "models" / "empty").mkdir(parents=True)
    for path in ("./models/nope", "models/empty", "~/models/nope", "models/a/nope"):
        with pytest.raises(FileNotFoundError) as e:
            load_text_encoder("t5", path)
        assert str(e.value).startswith(f"{path}: not a folder with config.json") and "\n" not in str(e.value)
    with pytest.raises(OSError) as e:
        load_text_encoder("t5", "models/nope")
    assert str(e.value).startswith("models/nope: no local folder at that path, so it was taken for the hub id of "
                                   "the t5 text encoder") and "\n" not in str(e.value)
    import shutil

    shutil.copytree(saved["t5"], tmp_path / "enc")
    assert load_text_encoder("t5", "~/enc").dim == 16  # ~ is expanded


def test_a_hub_id_loads_from_the_cache_or_fails_at_once_without_a_network(saved, tmp_path):
    """No hub to reach (HF_ENDPOINT: a closed port): a hub id in the hub cache loads from it, and one not cached
    fails in one line within seconds, for every loader that takes a hub id, not after huggingface_hub's retries
    (24 s and more a file)."""
    import json
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--org--t5"
    shutil.copytree(saved["t5"], repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    script = """if True:
        import json, time
        from videodit.caption import VLMCaptioner
        from videodit.text import load_text_encoder
        from videodit.upsample import _load_lm
        from videodit.vae import load_vae
        print(json.dumps(load_text_encoder("t5", "org/t5").dim))
        for load in (lambda: load_text_encoder("t5", "org/nope"), lambda: load_vae("wan", "org/nope"),
                     lambda: _load_lm("org/nope"), lambda: VLMCaptioner("org/nope")):
            start = time.time()
            try:
                load()
            except OSError as e:
                print(json.dumps([time.time() - start, str(e)]))
    """
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "0"}
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(lines) == 5 and lines[0] == 16, r.stderr[-3000:]
    for seconds, message in lines[1:]:
        assert seconds < 5 and message.startswith("org/nope: no local folder at that path, so it was taken for the "
                                                  "hub id of ") and "\n" not in message


def test_train_says_in_one_line_that_a_text_encoder_cannot_be_loaded(tmp_path, monkeypatch):
    import importlib.util

    import huggingface_hub.constants
    import yaml

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail at once
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(dict(model=dict(preset="tiny"), text=dict(encoder="t5", path="org/nope"),
                                          train=dict(vae=os.path.join(ROOT, "models", "shapes-tiny", "vae"),
                                                     output_dir=str(tmp_path / "run")))))
    spec = importlib.util.spec_from_file_location("train_script", os.path.join(ROOT, "train.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit) as e:
        script.main(["--config", str(config)])
    assert str(e.value.code).startswith("error: org/nope: no local folder at that path, so it was taken for the hub "
                                        "id of the t5 text encoder") and "\n" not in str(e.value.code)
