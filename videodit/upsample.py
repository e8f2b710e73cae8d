"""Prompt upsampling: a short prompt -> a detailed caption in the style of the training captions.

    upsample_prompt("two blue squares moving up")                      # rule-based, shapes world
    upsample_prompt("a cat surfing", backend="lm", model="Qwen/Qwen2.5-1.5B-Instruct", seed=0)

    python -m videodit.upsample "two blue squares moving up" "a red circle"     # one caption a line
    python -m videodit.upsample --model Qwen/Qwen2.5-1.5B-Instruct < prompts.txt

Backends:
- 'shapes': parses the prompt with `parse_shapes_prompt` (count, size, color, shape, motion, background; any word
  order; the synonyms of the tables below, and for a color any of the XKCD color survey's names, mapped to the
  world's nearest color by hue: "navy", "tomato", "forest green") and writes a detailed caption through the shapes
  world's templates (videodit.data.shapes.detailed_caption). Every attribute the prompt names is kept; the others,
  and the start positions, are drawn at random from the shapes world's distribution with `seed`, since the model was
  trained on captions that state them all. A prompt with neither a color nor a shape it knows is returned unchanged,
  with a warning.
- 'lm': a transformers causal LM (a local folder or a hub id) asked to rewrite the prompt, through its chat template
  when the tokenizer has one, else a plain instruction prompt; greedy when temperature is 0, else sampled with seed.
"""

import argparse
import functools
import json
import os
import re
import sys
import warnings

import numpy as np
import torch

from videodit.data import shapes
from videodit.text import check_local_model, load_error

# The synonyms the shapes grammar understands: word -> canonical value. Colors also by name (color_by_name).
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
              "sizable": "large", "huge": "large"}
COLOR_WORDS = {c: c for c in shapes.COLORS}  # other names by color_by_name
BACKGROUND_WORDS = {"black": "black", "gray": "gray", "grey": "gray", "white": "white"}
SHAPE_WORDS = {"circle": "circle", "disc": "circle", "disk": "circle", "ball": "circle", "orb": "circle",
               "dot": "circle", "sphere": "circle", "square": "square", "box": "square", "block": "square",
               "cube": "square", "tile": "square", "triangle": "triangle", "wedge": "triangle", "pyramid": "triangle",
               "cone": "triangle"}
PLURAL_COUNT_WORDS = {"two", "pair", "couple", "twin", "twins", "duo", "both"}  # a plural shape noun also means two
MOTION_WORDS = {
    "left": "left", "leftward": "left", "leftwards": "left", "west": "left", "westward": "left",
    "right": "right", "rightward": "right", "rightwards": "right", "east": "right", "eastward": "right",
    "up": "up", "upward": "up", "upwards": "up", "rise": "up", "rises": "up", "rising": "up", "ascending": "up",
    "climb": "up", "climbs": "up", "climbing": "up", "north": "up", "northward": "up",
    "down": "down", "downward": "down", "downwards": "down", "sink": "down", "sinks": "down", "sinking": "down",
    "fall": "down", "falls": "down", "falling": "down", "descending": "down", "drop": "down", "drops": "down",
    "dropping": "down", "south": "down", "southward": "down",
    "still": "still", "motionless": "still", "static": "still", "stationary": "still", "unmoving": "still",
    "resting": "still", "frozen": "still",
}
_SIDE = {"left": "left", "right": "right", "top": "up", "bottom": "down"}
_BG = "|".join(BACKGROUND_WORDS)
_BACKGROUND_RE = re.compile(rf"\b(?:on|against|over)\s+(?:(?:a|an|the)\s+)?(?:(?:plain|flat|uniform|solid)\s+)?"
                            rf"({_BG})\b(?:\s+(?:background|backdrop))?|\b({_BG})\s+(?:background|backdrop)\b")
_START_RE = re.compile(r"\b(?:it|they)\s+starts?\s+near\s+[^.;,]*|\bstart(?:s|ing)?\s+(?:at|near|in|from)\s+[^.;,]*")
_MOTION_PHRASES = [
    (re.compile(r"\bfrom\s+(?:the\s+)?(?:left|right|top|bottom)\s+to\s+(?:the\s+)?(left|right|top|bottom)\b"),
     lambda m: _SIDE[m.group(1)]),
    (re.compile(r"\btowards?\s+the\s+(left|right|top|bottom)\b"), lambda m: _SIDE[m.group(1)]),
    (re.compile(r"\b(?:not|never)\s+mov(?:e|es|ing)\b|\bat\s+rest\b"), lambda m: "still"),
]


@functools.cache
def _color_names() -> dict:
    with open(os.path.join(os.path.dirname(__file__), "assets", "color_names.json")) as f:
        return json.load(f)["colors"]  # name -> "#rrggbb"


def _lch(rgb) -> tuple[float, float, float]:
    """sRGB 0-255 -> CIE L*C*h (D65): lightness, chroma, hue angle in degrees."""
    c = np.asarray(rgb, dtype=float) / 255
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ c
    t = xyz / np.array([0.95047, 1.0, 1.08883])
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t * 841 / 108 + 4 / 29)
    a, b = 500 * (f[0] - f[1]), 200 * (f[1] - f[2])
    return 116 * f[1] - 16, float(np.hypot(a, b)), float(np.degrees(np.arctan2(b, a)) % 360)


def color_by_name(name: str) -> str | None:
    """The shapes world's color for a color name of the XKCD color survey ("navy", "tomato", "forest green"): the
    object color nearest in hue; a pale or greyish light one is white; None for a dark grey or an unknown name."""
    code = _color_names().get(name)
    if code is None:
        return None
    lightness, chroma, hue = _lch([int(code[i:i + 2], 16) for i in (1, 3, 5)])
    if chroma < 20 or (lightness > 90 and chroma < 35):
        return "white" if lightness > 70 else None
    hues = _object_hues()
    return min(hues, key=lambda c: abs((hue - hues[c] + 180) % 360 - 180))


@functools.cache
def _object_hues() -> dict:
    return {c: _lch(rgb)[2] for c, rgb in shapes.COLORS.items() if c != "white"}

def parse_shapes_prompt(prompt: str) -> dict:
    """The shapes-world attributes a prompt or caption names: a dict with some of count (1 | 2), size, color,
    shape, motion, background. Start-position phrases are recognized and ignored."""
    text = _START_RE.sub(" ", prompt.lower())
    found = {}
    m = _BACKGROUND_RE.search(text)
    if m:
        found["background"] = BACKGROUND_WORDS[m.group(1) or m.group(2)]
        text = text[:m.start()] + " " + text[m.end():]
    for pattern, value in _MOTION_PHRASES:
        m = pattern.search(text)
        if m and "motion" not in found:
            found["motion"] = value(m)
        text = pattern.sub(" ", text)
    words = re.findall(r"[a-z]+", text)
    plural = False
    for w in words:
        noun = next((w[:-len(e)] for e in ("s", "es") if w.endswith(e) and w[:-len(e)] in SHAPE_WORDS), w)  # boxes
        if noun in SHAPE_WORDS and "shape" not in found:
            found["shape"], plural = SHAPE_WORDS[noun], noun != w
        for key, table in (("size", SIZE_WORDS), ("color", COLOR_WORDS), ("motion", MOTION_WORDS)):
            if w in table and key not in found:
                found[key] = table[w]
    if "color" not in found:  # a color by name: two-word names first ("sky blue" is blue, "sky" alone light blue)
        names = [f"{a} {b}" for a, b in zip(words, words[1:])] + words
        color = next((c for c in map(color_by_name, names) if c), None)
        if color:
            found["color"] = color
    if plural or PLURAL_COUNT_WORDS & set(words):
        found["count"] = 2
    elif "shape" in found:
        found["count"] = 1
    return found


def upsample_shapes(prompt: str, seed: int = 0, height: int = 64, width: int = 64) -> str:
    """A detailed shapes-world caption keeping every attribute the prompt names; the rest drawn with `seed`."""
    found = parse_shapes_prompt(prompt)
    if "color" not in found and "shape" not in found:
        warnings.warn(f"the shapes upsampler found no color or shape in {prompt!r}; returning it unchanged",
                      stacklevel=2)
        return prompt
    rng = np.random.default_rng(seed)
    pick = lambda options: str(options[int(rng.integers(len(options)))])  # noqa: E731
    a = dict(found)
    a.setdefault("count", 1)
    a.setdefault("size", pick(list(shapes.SIZES)))
    a.setdefault("shape", pick(shapes.SHAPES))
    a.setdefault("motion", pick(shapes.MOTIONS))
    a.setdefault("background", pick([b for b in shapes.BACKGROUNDS if shapes.drawable(a.get("color"), b)]))
    a.setdefault("color", pick([c for c in shapes.COLORS if shapes.drawable(c, a["background"])]))
    starts = shapes.sample_starts(rng, a["count"], a["size"], a["motion"], height, width)
    return shapes.detailed_caption(shapes.Attributes(starts=starts, **a), height, width, rng)


LM_INSTRUCTION = (
    "Rewrite the short video prompt below as a detailed caption of one or two sentences, in the style of these "
    "examples. State how many objects there are, their size, color and shape, how they move, the background, and "
    "where they start. Keep everything the prompt says; add nothing that contradicts it. Answer with the caption only."
    "\nExample: A single small red circle moves steadily to the right on a plain gray background. It starts near the "
    "middle left.\nExample: The video shows two large blue squares against a flat black backdrop that rise toward "
    "the top. They start near the bottom left and the bottom right."
)
_LMS: dict = {}  # model path/id -> (tokenizer, model): load once per process


LM = "the prompt upsampler's causal LM"  # for error messages


def _load_lm(model: str):
    """The (tokenizer, LM) of `model`, a local folder or a hub id (videodit.text.is_local); one-line errors:
    FileNotFoundError for a local folder without a saved model, OSError for one that cannot be loaded."""
    if model not in _LMS:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = check_local_model(model, LM)
        try:
            _LMS[model] = (AutoTokenizer.from_pretrained(source), AutoModelForCausalLM.from_pretrained(source).eval())
        except OSError as e:
            raise load_error(model, LM, e) from e
    return _LMS[model]


def upsample_lm(prompt: str, model: str, seed: int = 0, temperature: float = 0.0, max_new_tokens: int = 96) -> str:
    """The LM's rewrite of `prompt` (its first non-empty line); the prompt itself, with a warning, if it wrote none."""
    tok, lm = _load_lm(model)
    request = f"{LM_INSTRUCTION}\n\nShort prompt: {prompt}"
    if tok.chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                       add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)  # the template holds the special tokens
    else:
        inputs = tok(f"{request}\nDetailed caption:", return_tensors="pt")
    torch.manual_seed(seed)
    sampling = dict(do_sample=True, temperature=temperature, top_p=0.95) if temperature > 0 else dict(do_sample=False)
    out = lm.generate(**inputs.to(lm.device), max_new_tokens=max_new_tokens,
                      pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id, **sampling)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    lines = [ln.strip() for ln in reply.splitlines() if ln.strip()]
    if not lines:
        warnings.warn(f"the prompt upsampler {model} wrote nothing for {prompt!r}; keeping the prompt", stacklevel=2)
        return prompt
    return lines[0]


def upsample_prompt(prompt: str, backend: str = "shapes", model: str | None = None, seed: int = 0,
                    temperature: float = 0.0) -> str:
    """Short prompt -> detailed caption. backend: 'shapes' (rule-based) or 'lm' (needs `model`: folder or hub id)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    if backend == "shapes":
        return upsample_shapes(prompt, seed)
    if backend == "lm":
        if not model:
            raise ValueError("the 'lm' prompt upsampler needs model=: a local folder or a hub id of a causal LM")
        return upsample_lm(prompt, model, seed, temperature)
    raise ValueError(f"unknown prompt upsampler {backend!r}; expected 'shapes' or 'lm'")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m videodit.upsample",
                                description="Rewrite short prompts as detailed captions, one a line.")
    p.add_argument("prompts", nargs="*", help="the prompts (default: one a line from standard input)")
    p.add_argument("--model", help="a causal LM (folder or hub id) to rewrite with; default: the shapes rules")
    p.add_argument("--seed", type=int, default=0, help="draws what the prompt leaves out (rules) or samples (LM)")
    p.add_argument("--temperature", type=float, default=0.0, help="the LM's sampling temperature (0: greedy)")
    a = p.parse_args(argv)
    if a.temperature < 0:
        p.error(f"--temperature must be >= 0, got {a.temperature:g}")
    if a.model:
        try:
            _load_lm(a.model)  # before reading prompts: a folder without a model, a hub id offline
        except OSError as e:
            p.error(f"--model {e}")
    prompts = a.prompts or [line.strip() for line in sys.stdin if line.strip()]
    if not prompts or not all(q.strip() for q in prompts):
        p.error("give one or more non-empty prompts, as arguments or one a line on standard input")
    for q in prompts:
        print(upsample_prompt(q, "lm" if a.model else "shapes", a.model, a.seed, a.temperature), flush=True)


if __name__ == "__main__":
    main()
