"""Analytic parameter and FLOP counts from a model config, without instantiating the model.

Counted: every matmul (MACs = multiply-accumulates; FLOPs = 2 x MACs) and the attention scores and values
(2 x n_q x n_k x width MACs per layer). Not counted: norms, softmax, RoPE, activations, biases (a few % at most).
Packed attention is per sample: a sequence of samples n_1..n_B costs sum(n_i^2), not (sum n_i)^2.

The same per-block counter reproduces the DiT paper's forward "Gflops" (which are GMACs) for its class-conditional
256x256 models; see `dit_paper_gmacs` and tests/test_dit.py.
"""

import inspect
import math

from .dit import POSITION_FREQS, VideoDiT

_DEFAULTS = {k: p.default for k, p in inspect.signature(VideoDiT.__init__).parameters.items() if k != "self"}


def _config(config) -> dict:
    """A PRESETS entry, a VideoDiT.config or any mapping of VideoDiT kwargs -> full kwargs with defaults."""
    unknown = set(config) - set(_DEFAULTS) - {"_class_name", "_diffusers_version", "_use_default_values",
                                               "_name_or_path"}
    if unknown:
        raise ValueError(f"unknown VideoDiT config keys {sorted(unknown)}")
    return {**_DEFAULTS, **{k: v for k, v in config.items() if k in _DEFAULTS}}


def block_macs(width: int, mlp_hidden: int, seq_len: int, text_len: int = 0, cross_attn: bool = True) -> int:
    """MACs of one transformer block on one sample of seq_len tokens (and text_len text tokens)."""
    d, n = width, seq_len
    macs = n * (4 * d * d + 2 * d * mlp_hidden)  # qkv + out projection, MLP
    macs += 2 * n * n * d  # attention scores and values
    if cross_attn:
        macs += n * 2 * d * d + text_len * 2 * d * d  # q + out on video tokens, k + v on text tokens
        macs += 2 * n * text_len * d
    return macs


def param_count(config) -> int:
    """Parameters of VideoDiT(**config), analytically."""
    c = _config(config)
    d, h = c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"])
    token_dim = c["in_channels"] * math.prod(c["patch_size"])
    qk = 2 * (d // c["num_heads"]) if c["qk_norm"] else 0
    attn = 4 * d * d + 4 * d + qk  # qkv, proj
    cross = 4 * d * d + 4 * d + qk + 2 * d  # q, kv, proj, affine norm
    mlp = 2 * d * h + h + d + (12 * h + 2 * h if c["local_mlp"] else 0)  # the local MLP's 3x3 and 3 taps, biases
    block = attn + cross + mlp + 6 * d
    embeds = (token_dim * d + d) + (c["text_dim"] * d + d + d * d + d) + (c["freq_dim"] * d + d + d * d + d)
    embeds += (c["text_dim"] * d + d + d * d + d) if c["pooled_text"] else 0
    embeds += (6 * POSITION_FREQS * d + d) if c["abs_pos"] else 0
    embeds += (c["freq_dim"] * d + d + d * d + d) if c["guidance_embed"] else 0  # a distilled model's scale MLP
    return embeds + (6 * d * d + 6 * d) + c["depth"] * block + (2 * d + d * token_dim + token_dim)


def forward_macs(config, seq_lens, text_lens) -> int:
    """MACs of one VideoDiT forward on a packed batch. seq_lens: tokens of each sample; text_lens: unpadded text
    tokens of each sample (or one int for all). The time MLP is counted once a sample (per-frame timesteps add a
    negligible few rows)."""
    c = _config(config)
    seq_lens = [seq_lens] if isinstance(seq_lens, int) else list(seq_lens)
    text_lens = [text_lens] * len(seq_lens) if isinstance(text_lens, int) else list(text_lens)
    if min(seq_lens, default=0) < 0 or min(text_lens, default=0) < 0 or len(text_lens) != len(seq_lens):
        raise ValueError(f"token counts must be >= 0, one text length a sample: got seq_lens {seq_lens}, text_lens "
                         f"{text_lens}")
    d, h = c["hidden_size"], int(c["hidden_size"] * c["mlp_ratio"])
    token_dim = c["in_channels"] * math.prod(c["patch_size"])
    n, m = sum(seq_lens), sum(text_lens)
    macs = n * token_dim * d + m * (c["text_dim"] * d + d * d)  # patch and text embedding
    macs += len(seq_lens) * (c["freq_dim"] * d + d * d + 6 * d * d)  # time MLP, shared modulation projection
    macs += len(seq_lens) * (c["text_dim"] * d + d * d) if c["pooled_text"] else 0  # pooled text MLP
    macs += n * 6 * POSITION_FREQS * d if c["abs_pos"] else 0  # position embedding
    macs += c["depth"] * sum(block_macs(d, h, s, t) for s, t in zip(seq_lens, text_lens))
    macs += c["depth"] * n * h * 12 if c["local_mlp"] else 0  # the local MLP's depthwise taps (9 + 3)
    return macs + n * d * token_dim  # output layer


def flops_per_token(config, seq_len: int = 16384, text_len: int = 226) -> float:
    """Forward FLOPs per video token for one sample of seq_len tokens and text_len text tokens."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be a positive number of tokens, got {seq_len}")
    return 2 * forward_macs(config, [seq_len], [text_len]) / seq_len


def flops_per_step(config, seq_lens, text_len) -> int:
    """Training FLOPs of one step (forward + backward = 3 x forward) on a packed batch, for MFU accounting."""
    return 3 * 2 * forward_macs(config, seq_lens, text_len)


def dit_paper_gmacs(depth: int, width: int, patch: int = 2, image_size: int = 256, channels: int = 4,
                    mlp_ratio: float = 4.0, freq_dim: int = 256) -> float:
    """Forward GMACs of a class-conditional DiT from the DiT paper (Peebles & Xie 2023): SD-VAE latents
    (image_size/8)^2 x 4, adaLN-Zero (6d modulation per block from the per-sample conditioning), no cross-attention,
    final layer adaLN 2d and a linear to p*p*2C (learned sigma). The paper's "Gflops" are these GMACs."""
    d = width
    tokens = (image_size // 8 // patch) ** 2
    macs = tokens * patch * patch * channels * d  # patch embedding
    macs += freq_dim * d + d * d  # timestep MLP (class embedding is a lookup)
    macs += depth * (block_macs(d, int(d * mlp_ratio), tokens, cross_attn=False) + 6 * d * d)
    macs += 2 * d * d + tokens * d * patch * patch * 2 * channels  # final adaLN and linear
    return macs / 1e9
