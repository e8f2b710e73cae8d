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
  trained on captions that state them all; a place ("starting on the right") starts the objects there where their
  size and motion leave room. A prompt with neither a color nor a shape it knows is returned unchanged,
  with a warning. A prompt that says what the world cannot show ("a black circle", "rotating", a second object, "on a
  blue background", "three circles", "up and to the right") or holds words the rules do not read gets its caption
  with one warning that names what was drawn at random. Misspelled shape and color words are matched to the nearest
  known word (difflib); any int seed is taken.
- 'lm': a transformers causal LM (a local folder or a hub id) asked to rewrite the prompt, through its chat template
  when the tokenizer has one, else a plain instruction prompt; greedy when temperature is 0, else sampled with seed.
"""

import argparse
import difflib
import functools
import json
import os
import re
import sys
import warnings

import numpy as np
import torch

from videodit.data import shapes
from videodit.text import check_local_model, from_hub, load_error

# The synonyms the shapes grammar understands: word -> canonical value. Colors also by name (color_by_name).
SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
              "sizable": "large", "huge": "large"}
COLOR_WORDS = {c: c for c in shapes.COLORS} | {"snowy": "white", "snow": "white"}  # others: color_by_name
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
_DIRECTION = ("left|right|top|bottom|up|down|(?:left|right|up|down)wards?|(?:west|east|north|south)(?:ward)?")
_BG = "|".join(BACKGROUND_WORDS)
_BG_ADJ = r"(?:(?:plain|flat|uniform|solid|simple|single-colou?red)\s+)?"
_BG_MOD = r"(?:(?:very|light|pale|bright|dark|deep|medium|mid)[\s-]+)?"
# A background phrase names its color, any name ("on a blue background" is no blue object): read as the background.
_BACKGROUND_RE = re.compile(
    rf"\b(?:on|against|over)\s+(?:(?:a|an|the)\s+)?{_BG_ADJ}((?:[a-z]+[\s-]+){{0,2}}?)(?:background|backdrop)\b"
    rf"|\b(?:the\s+)?(?:background|backdrop)\s+(?:is|being|:|=)\s+(?:(?:a|an|the)\s+)?{_BG_ADJ}({_BG_MOD}[a-z]+)\b"
    rf"|\b({_BG_MOD}[a-z]+[\s-]+)(?:background|backdrop)\b"
    rf"|\b(?:on|against|over)\s+(?:(?:a|an|the)\s+)?{_BG_ADJ}({_BG_MOD}(?:{_BG}))\b")
_PLACE = r"(?:\s+(?:the|top|bottom|middle|center|centre|upper|lower|left|right|side|corner|edge|and|of|frame|screen))+"
_START_RE = re.compile(rf"\b(?:(?:it|they)\s+)?start(?:s|ed|ing)?(?:\s+out)?(?:\s+(?:at|near|in|from|on))?{_PLACE}\b")
# "on the right", "in the top left", "from the top left": where the objects are, not how they move
_PLACE_RE = re.compile(rf"\b(?:on|in|at|near|from)\s+the{_PLACE}\b")
_VERB = (r"(?:mov|go|goes|going|went|travel|slid|glid|drift|head|roll|float|run|ran|shift|fl[yi]|flew|pan|scroll|"
         r"walk|zoom|speed|rac|swim|swam|cross|pass|sweep|swept|sail|coast|creep|crept|wander|push|pull|track)\w*")
_MOTION_PHRASES = [
    (re.compile(r"\b(?:from\s+)?(?:the\s+)?(?:left|right|top|bottom)(?:\s+side)?(?:\s+|-)to(?:\s+|-)(?:the\s+)?"
                r"(left|right|top|bottom)\b"), lambda m: _SIDE[m.group(1)]),
    (re.compile(r"(?:\bnot|\bnever|n't|\bno|\bwithout)\s+(?:be(?:ing)?\s+|any\s+)?(?:mov|motion)\w*|\bat\s+rest\b"),
     lambda m: "still"),
    (re.compile(rf"\b{_VERB}\s+(?:\w+ly\s+)?(?:(?:to|toward|towards|into)\s+(?:the\s+)?)?({_DIRECTION})\b"),
     lambda m: _SIDE.get(m.group(1)) or MOTION_WORDS[m.group(1)]),
    (re.compile(r"\b(?:to|toward|towards|into)\s+the\s+(left|right|top|bottom)\b"), lambda m: _SIDE[m.group(1)]),
]
_NEGATED_RE = re.compile(r"\b(?:not|\w+n't|non)[\s-]+(?:be\s+|colou?red\s+)?([a-z]+)")  # "a circle that isn't red"
_NO_SHAPE_RE = re.compile(rf"\b(?:no|zero|not|never|without|non|\w+n't)[\s-]+(?:(?:be|a|an|any|the)\s+)*"
                          rf"({'|'.join(SHAPE_WORDS)})(?:e?s)?\b")  # "no circles", "not a square"
_DIGITS = {"0": "no", "1": "one", "2": "two"}  # any other number is more than the world's two
MANY_COUNT_WORDS = {"many", "several", "multiple", "numerous", "few", "dozen", "dozens", "lots", "crowd", *"""three
                    four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen
                    eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred hundreds thousand
                    thousands million millions""".split()}
SINGLE_COUNT_WORDS = {"one", "single", "lone"}  # "one red circles": one, whatever the noun
# Words the world cannot show, by the attribute they would set (the attribute is then drawn at random).
UNSHOWABLE = {"color": {"black", "gray", "grey", "dark", "transparent", "striped", "rainbow", "multicolored"},
              "size": {"medium", "mid", "average", "normal", "growing", "shrinking"},
              "motion": {"rotating", "rotates", "rotate", "spinning", "spins", "spin", "clockwise", "diagonally",
                         "diagonal", "bouncing", "bounces", "zigzag", "circling", "orbiting", "wobbling", "pulsing"}}
_KNOWN = {*SIZE_WORDS, *COLOR_WORDS, *SHAPE_WORDS, *PLURAL_COUNT_WORDS, *MANY_COUNT_WORDS, *MOTION_WORDS, *_SIDE,
          *BACKGROUND_WORDS,
          *"""a an the one single only just lone of set and with that which is are its it they their in on at near
          from to toward towards into over against background backdrop moving moves move going goes travels
          travelling traveling sliding slides gliding glides drifting drifts heading heads floating floats staying
          stays stay remaining remains remain standing stands sitting sits steadily slowly quickly smoothly
          constantly evenly while across side frame screen canvas video clip shows showing of some plain flat
          uniform solid colored coloured light pale dark bright several many three four five few objects object
          shape shapes does do isn aren don doesn t s not no never without any all motion movement be being
          there here very travel identical perfectly""".split()}


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


@functools.cache
def _color_name_words() -> frozenset:
    return frozenset(w for name in _color_names() for w in re.findall(r"[a-z]+", name))


def _background(words: list[str]) -> str | None:
    """The world's background for the words of a background phrase ("light gray", "pale", "dark", "cream")."""
    known = [BACKGROUND_WORDS[w] for w in words if w in BACKGROUND_WORDS]
    rest = [w for w in words if w not in ("very", "light", "pale", "bright", "dark", "deep", "medium", "mid")]
    if known:
        return known[0]
    if not rest:
        return "black" if {"dark", "deep"} & set(words) else "white" if words else None
    return "white" if color_by_name(" ".join(rest)) == "white" or COLOR_WORDS.get(rest[0]) == "white" else None


def _fuzzy(word: str, table: dict) -> str | None:
    """The table's value for a misspelled word ("circel", "trangels"), or None."""
    for w in (word, word[:-1] if word.endswith("s") else None):
        match = w and len(w) >= 4 and difflib.get_close_matches(w, list(table), n=1, cutoff=0.8)
        if match:
            return table[match[0]]
    return None


def _place(phrase: str) -> tuple[str | None, str | None]:
    """The (column, row) of the frame a start or place phrase names ("starting on the right": ("right", None)), in
    the words of shapes.cell."""
    w = set(re.findall(r"[a-z]+", phrase))
    col = "left" if "left" in w else "right" if "right" in w else None
    row = "top" if w & {"top", "upper"} else "bottom" if w & {"bottom", "lower"} else None
    if not (col or row) and w & {"middle", "center", "centre"}:
        return "center", "middle"
    return col, row


def _parse(prompt: str) -> tuple[dict, list, set, tuple]:
    """(the attributes the prompt names, notes [(attribute or None, what could not be followed)], colors it rules
    out, and the (column, row) where the objects start, None where it does not say). A note with an attribute
    matters only when that attribute is drawn at random."""
    text = re.sub(r"\b[012]\b", lambda m: _DIGITS[m.group()], prompt.lower().replace("’", "'"))
    starts = [m.group() for m in _START_RE.finditer(text)]
    text = _START_RE.sub(" ", text)
    found, notes, excluded = {}, [], set()
    for m in _NO_SHAPE_RE.finditer(text):
        excluded.add(SHAPE_WORDS[m.group(1)])
        notes.append(("shape", f"{m.group().strip()!r}: the shape is drawn among the others"))
    text = _NO_SHAPE_RE.sub(" ", text)
    m = _BACKGROUND_RE.search(text)
    if m:
        phrase = next(g for g in m.groups() if g is not None)
        background = _background(re.findall(r"[a-z]+", phrase))
        if background:
            found["background"] = background
        elif phrase.strip():
            notes.append(("background", f"the background {phrase.strip()!r} is none of the world's"))
        text = text[:m.start()] + " " + text[m.end():]
    for pattern, value in _MOTION_PHRASES:
        for m in pattern.finditer(text):
            if "motion" not in found:
                found["motion"] = value(m)
            elif value(m) != found["motion"]:
                notes.append((None, f"a second direction {m.group().strip()!r}: objects move one way, "
                                    f"{found['motion']}"))
        text = pattern.sub(" ", text)
    for m in _NEGATED_RE.finditer(text):
        color = COLOR_WORDS.get(m.group(1)) or color_by_name(m.group(1))
        if color:
            excluded.add(color)
            notes.append((None, f"{m.group().strip()!r}: the color is drawn among the others"))
            text = text.replace(m.group(), " ")
    place = next((p for p in map(_place, starts + [m.group() for m in _PLACE_RE.finditer(text)]) if any(p)),
                 (None, None))
    text = _PLACE_RE.sub(" ", text)
    words = re.findall(r"[a-z]+", text)
    plural, unknown = False, []
    for w in words:
        noun = next((w[:-len(e)] for e in ("s", "es") if w.endswith(e) and w[:-len(e)] in SHAPE_WORDS), w)  # boxes
        for key, table, word in (("shape", SHAPE_WORDS, noun), ("size", SIZE_WORDS, w), ("color", COLOR_WORDS, w),
                                 ("motion", MOTION_WORDS, w)):
            if word in table and key not in found:
                found[key] = table[word]
                plural = plural or (key == "shape" and noun != w)
            elif word in table and key in ("shape", "color") and table[word] != found[key]:
                notes.append((None, f"a second {key} {w!r}: a clip shows one kind of object"))
            elif word in table and key == "size" and table[word] != found[key]:
                notes.append((None, f"a second size {w!r}: a clip's objects are one size"))
            elif word in table and key == "motion" and table[word] != found[key]:
                notes.append((None, f"a second direction {w!r}: objects move one way, {found['motion']}"))
        if noun not in _KNOWN and w not in _color_name_words():
            unknown.append(w)
    if "color" not in found:  # a color by name: two-word names first ("sky blue" is blue, "sky" alone light blue)
        names = [f"{a} {b}" for a, b in zip(words, words[1:])] + words
        color = next((c for c in map(color_by_name, names) if c), None)
        if color:
            found["color"] = color
    for key, table in (("shape", SHAPE_WORDS), ("color", COLOR_WORDS)):  # misspelled: "circel", "yelow"
        guess = next(((w, v) for w in unknown if (v := _fuzzy(w, table))), None) if key not in found else None
        if guess:
            found[key] = guess[1]
            plural = plural or (key == "shape" and guess[0].endswith("s"))
            unknown.remove(guess[0])
    for key, table in UNSHOWABLE.items():
        notes += [(key, f"the world shows no {w!r} {key}") for w in words if w in table]
    unknown = [w for w in unknown if not any(w in t for t in UNSHOWABLE.values())]
    if unknown:
        notes.append(("any", f"not understood: {' '.join(unknown)}"))
    many = sorted(MANY_COUNT_WORDS & set(words)) + re.findall(r"\b\d+\b", text)
    if many:
        notes.append((None, f"{many[0]!r}: the world shows at most two objects; two are drawn"))
    nouns = [w for w in words if w in SHAPE_WORDS]  # "a red circle and a blue circle": two objects
    if many or PLURAL_COUNT_WORDS & set(words) or len(nouns) > 1 or plural and not SINGLE_COUNT_WORDS & set(words):
        found["count"] = 2
    elif "shape" in found:
        found["count"] = 1
    for key in ("color", "shape"):
        if found.get(key) in excluded:
            del found[key]
    return found, notes, excluded, place


def parse_shapes_prompt(prompt: str) -> dict:
    """The shapes-world attributes a prompt or caption names: a dict with some of count (1 | 2), size, color,
    shape, motion, background. Start-position and place phrases ("starting on the left", "in the top right") are
    no attributes (the upsampler starts the objects there); a side word after a motion verb ("moving right") is the
    motion."""
    return _parse(prompt)[0]


def _upsample_shapes(prompt: str, seed: int) -> str:
    """A detailed shapes-world caption (64x64 frames) keeping every attribute the prompt names; the rest drawn with
    `seed` (any int). Warns, naming what is drawn at random, when the prompt says what the world cannot show or the
    rules do not read."""
    height = width = 64
    found, notes, excluded, place = _parse(prompt)
    if "color" not in found and "shape" not in found:
        warnings.warn(f"the shapes upsampler found no color or shape in {prompt!r}; returning it unchanged",
                      stacklevel=3)  # at upsample_prompt's caller
        return prompt
    if found.get("color") == found.get("background") == "white":
        notes.append((None, "a white object is never drawn on a white background: the background is drawn"))
        del found["background"]
    rng = np.random.default_rng(seed % 2**64)  # a negative seed too, as sample.py takes
    pick = lambda options: str(options[int(rng.integers(len(options)))])  # noqa: E731
    a = dict(found)
    a.setdefault("count", 1)
    a.setdefault("size", pick(list(shapes.SIZES)))
    a.setdefault("shape", pick([s for s in shapes.SHAPES if s not in excluded] or shapes.SHAPES))
    a.setdefault("motion", pick(shapes.MOTIONS))
    a.setdefault("background", pick([b for b in shapes.BACKGROUNDS if shapes.drawable(a.get("color"), b)]))
    a.setdefault("color", pick([c for c in shapes.COLORS if shapes.drawable(c, a["background"]) and c not in excluded]))
    for tries in range(200):  # starts where the prompt places the objects, with a size and motion that leave room
        if tries:
            a.update({k: pick(options) for k, options in (("size", list(shapes.SIZES)), ("motion", shapes.MOTIONS))
                      if k not in found})
        starts = shapes.sample_starts(rng, a["count"], a["size"], a["motion"], height, width)
        if any(all(want in (None, got) for want, got in zip(place, shapes.cell(x, y, height, width)))
               for x, y in starts):  # two objects: one of them there (two in one ninth of the frame rarely fit)
            break
    else:
        shown = "the center" if place == ("center", "middle") else "the " + " ".join(w for w in place[::-1] if w)
        notes.append((None, f"{a['size']} objects moving {a['motion']} cannot start at {shown}: their start is "
                            f"drawn"))
    drawn = [k for k in ("size", "color", "shape", "motion", "background") if k not in found]
    said = [note for key, note in notes if key is None or key in drawn or (key == "any" and drawn)]
    if said:
        warnings.warn(f"the shapes upsampler cannot follow all of {prompt!r}: {'; '.join(dict.fromkeys(said))}"
                      + (f"; drawn at random: {', '.join(drawn)}" if drawn else ""), stacklevel=3)
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
            _LMS[model] = from_hub(lambda **kw: (AutoTokenizer.from_pretrained(source, **kw),
                                                 AutoModelForCausalLM.from_pretrained(source, **kw).eval()), model)
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
        return _upsample_shapes(prompt, seed)
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
    from videodit.config import one_line_warnings

    one_line_warnings()
    main()
