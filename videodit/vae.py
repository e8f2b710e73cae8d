"""Causal video VAE: pixels (B, 3, T, H, W) in [-1, 1] <-> latents (B, C, 1 + (T-1)/ft, H/fs, W/fs).

Causal in time: every convolution sees only the current and past frames (zero padding in front of the first frame),
so the first frame is encoded alone and each later group of `ft` frames makes one latent frame. An image is a
video with T = 1. Encode and decode stream over time (the first frame, then `ft` frames per step for encode; one
latent frame per step for decode) with a cache that holds the last `kt - 1` input frames of every causal
convolution, so memory does not grow with T and the result equals a single pass. Large frames can be tiled in
space with linearly blended overlaps (`enable_tiling`).

Also here: `PretrainedVideoVAE`, the same interface over diffusers' Wan, CogVideoX and HunyuanVideo VAEs, and
`load_vae(kind, ...)` that builds any of them by name.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from diffusers import AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLWan
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin


VAE_PRESETS = {
    # Sora/Wan-sized: 4x8x8 compression, 16 latent channels, 113M parameters.
    "standard": dict(),
    # Sized for training on 2 CPU cores: 4x4x4 compression (two spatial downsamplings keep small flat objects at
    # 2x2+ latent pixels on 64x64 frames), 8 latent channels, one block per level, no attention, 1.66M parameters.
    "tiny": dict(block_out_channels=(16, 40, 64), layers_per_block=1, latent_channels=8, spatial_factor=4,
                 temporal_factor=4, mid_attention=False),
}


def valid_size(T: int, H: int, W: int, ft: int = 4, fs: int = 8) -> tuple[int, int, int]:
    """Nearest (T, H, W) a VAE with temporal factor `ft` and spatial factor `fs` accepts: T = 1 + ft*k, H and W
    multiples of fs."""
    T = 1 + ft * max(0, math.floor((T - 1) / ft + 0.5))  # ties go up
    H = fs * max(1, math.floor(H / fs + 0.5))
    W = fs * max(1, math.floor(W / fs + 0.5))
    return T, H, W


def check_size(x: torch.Tensor, ft: int, fs: int, channels: int = 3):
    if x.ndim != 5 or x.shape[1] != channels:
        raise ValueError(f"expected pixels of shape (B, {channels}, T, H, W), channels second, got a tensor of shape "
                         f"{tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected float pixels in [-1, 1], got {x.dtype}; convert first, e.g. uint8 pixels with "
                         f"x.float() / 127.5 - 1")
    if 0 in x.shape:
        raise ValueError(f"got empty pixels of shape {tuple(x.shape)}; need at least one sample, one frame and one "
                         f"pixel")
    T, H, W = x.shape[2:]
    if T < 1 or (T - 1) % ft or H % fs or W % fs:
        vt, vh, vw = valid_size(T, H, W, ft, fs)
        raise ValueError(
            f"a video of {T} frames of {H}x{W} does not fit this VAE (ft={ft}, fs={fs}): frames must be 1 + {ft}*k "
            f"and height and width multiples of {fs}; the nearest valid size is {vt} frames of {vh}x{vw}")


def check_latents(z: torch.Tensor, channels: int):
    if z.ndim != 5 or z.shape[1] != channels:
        raise ValueError(f"expected latents of shape (B, {channels}, T, h, w), got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise ValueError(f"expected float latents, got {z.dtype}")
    if 0 in z.shape:
        raise ValueError(f"got empty latents of shape {tuple(z.shape)}; need at least one sample, one frame and one "
                         f"pixel")


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class CausalConv3d(nn.Module):
    """Conv3d that sees only the past in time. Pads `kt - 1` frames in front: zeros at the start of a video, or,
    when streaming, the last `kt - 1` input frames of the previous chunk, kept in `cache[self]`. Space is padded
    symmetrically with zeros; a spatial stride is allowed, a temporal stride is not (see Downsample).

    The weight is a plain Conv3d's, but the product runs as one conv2d over frames with the `kt` frames of each
    window stacked in channels: PyTorch's CPU conv3d takes a slow im2col path (about 8x slower here)."""

    def __init__(self, cin, cout, kernel=3, stride=1):
        super().__init__()
        kt, kh, kw = _triple(kernel)
        _, sh, sw = _triple(stride)
        self.kt, self.stride, self.padding = kt, (sh, sw), (kh // 2, kw // 2)
        self.conv = nn.Conv3d(cin, cout, (kt, kh, kw))

    def forward(self, x, cache=None):
        # x: (B, C, T, H, W) -> (B, Cout, T, H', W')
        B, _, T = x.shape[:3]
        if self.kt > 1:
            past = cache.get(self) if cache is not None else None
            if past is None:
                past = x.new_zeros(*x.shape[:2], self.kt - 1, *x.shape[3:])
            x = torch.cat([past, x], dim=2)  # (B, C, T + kt - 1, H, W)
            if cache is not None:
                cache[self] = x[:, :, -(self.kt - 1):].clone()  # clone: do not keep the whole chunk alive
            x = torch.cat([x[:, :, k:k + T] for k in range(self.kt)], dim=1)  # (B, kt*C, T, H, W)
        weight = rearrange(self.conv.weight, "o i k h w -> o (k i) h w")
        y = F.conv2d(rearrange(x, "b c t h w -> (b t) c h w"), weight, self.conv.bias, self.stride, self.padding)
        return rearrange(y, "(b t) c h w -> b c t h w", b=B)


class ChannelNorm(nn.Module):
    """RMS norm over channels at each (t, h, w): causal, and blind to tiling (no statistics over space or time)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1, 1))
        self.beta = nn.Parameter(torch.zeros(dim, 1, 1, 1))

    def forward(self, x):
        # x: (B, C, T, H, W)
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5 * self.gamma + self.beta


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = ChannelNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3)
        self.norm2 = ChannelNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, cache=None):
        # x: (B, Cin, T, H, W) -> (B, Cout, T, H, W)
        h = self.conv1(F.silu(self.norm1(x)), cache)
        h = self.conv2(F.silu(self.norm2(h)), cache)
        return self.skip(x) + h


class FrameAttention(nn.Module):
    """Single-head self-attention over the pixels of each frame (never across frames, so it stays causal)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = ChannelNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cache=None):
        # x: (B, C, T, H, W)
        B, _, _, H, _ = x.shape
        h = rearrange(self.norm(x), "b c t h w -> (b t) (h w) c")
        q, k, v = rearrange(self.qkv(h), "n l (three c) -> three n 1 l c", three=3)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B*T, H*W, C)
        return x + rearrange(self.proj(h), "(b t) (h w) c -> b c t h w", b=B, h=H)


def _first_chunk(module, cache) -> bool:
    """Whether this call of `module` sees the start of a video (one pass, or a streaming run's first chunk)."""
    first = cache is None or module not in cache
    if cache is not None:
        cache[module] = True
    return first


class Downsample(nn.Module):
    """Halves H and W with a stride-2 conv per frame. With `time=True` also halves T on the 1 + 2k grid: the first
    frame of a video is paired with a zero frame in front of it, every later pair (2i-1, 2i) makes one frame. The
    pairs never straddle a streaming chunk (chunks after the first have an even length), so no state is needed
    beyond whether the first frame has passed."""

    def __init__(self, dim, time):
        super().__init__()
        self.space = CausalConv3d(dim, dim, (1, 3, 3), stride=(1, 2, 2))
        self.time = nn.Conv3d(dim, dim, (2, 1, 1), stride=(2, 1, 1)) if time else None
        if time:  # start as "keep the later frame of each pair"; the earlier tap learns from there
            nn.init.zeros_(self.time.weight)
            nn.init.zeros_(self.time.bias)
            with torch.no_grad():
                self.time.weight[:, :, 1, 0, 0].copy_(torch.eye(dim))

    def forward(self, x, cache=None):
        # x: (B, C, T, H, W) -> (B, C, T', H/2, W/2), T' = (T + 1) / 2 at the start of a video, T / 2 after
        x = self.space(x, cache)
        if self.time is not None:
            if _first_chunk(self, cache):
                x = F.pad(x, (0, 0, 0, 0, 1, 0))
            x = self.time(x)
        return x


class Upsample(nn.Module):
    """Doubles H and W (nearest, then a conv per frame). With `time=True` first doubles T: a causal conv makes the
    channels of two frames per frame (depth to time), and the first frame of a video keeps only the second of its
    two, so 1 + k frames become 1 + 2k, chunk by chunk exactly as in one pass."""

    def __init__(self, dim, time):
        super().__init__()
        self.time = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if time else None
        self.space = CausalConv3d(dim, dim, (1, 3, 3))
        if time:  # start as frame duplication, so motion does not fade before the model has learnt anything
            nn.init.zeros_(self.time.conv.weight)
            nn.init.zeros_(self.time.conv.bias)
            with torch.no_grad():
                self.time.conv.weight[:, :, -1, 0, 0].copy_(torch.eye(dim).repeat(2, 1))

    def forward(self, x, cache=None):
        # x: (B, C, T, H, W) -> (B, C, T', 2H, 2W), T' = 2T - 1 at the start of a video, 2T after
        if self.time is not None:
            first = _first_chunk(self, cache)
            x = rearrange(self.time(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
            if first:
                x = x[:, :, 1:]
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return self.space(x, cache)


class Encoder(nn.Module):
    def __init__(self, cin, cout, channels, layers, time_down, attention, shortcut=False):
        super().__init__()
        self.ft, self.fs = 2 ** sum(time_down), 2 ** len(time_down)
        self.shortcut = shortcut
        self.conv_in = CausalConv3d(cin, channels[0], 3)
        blocks, c = [], channels[0]
        for i, ch in enumerate(channels):
            for _ in range(layers):
                blocks.append(ResBlock(c, ch))
                c = ch
            if i < len(channels) - 1:
                blocks.append(Downsample(c, time_down[i]))
        blocks += [ResBlock(c, c)] + ([FrameAttention(c)] if attention else []) + [ResBlock(c, c)]
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelNorm(c)
        self.conv_out = CausalConv3d(c, cout, 3)

    def forward(self, x, cache=None):
        # x: (B, 3, T, H, W) -> (B, 2C, T', H/fs, W/fs)
        short = self.pool(x, _first_chunk(self, cache)) if self.shortcut else None
        x = self.conv_in(x, cache)
        for block in self.blocks:
            x = block(x, cache)
        x = self.conv_out(F.silu(self.norm_out(x)), cache)
        if short is None:
            return x
        # the first means take the pooled colours; the other channels are the network's alone, free from the start to
        # carry what block averages lose (edges, motion within the frame group), so both networks learn together
        return x + F.pad(short, (0, 0, 0, 0, 0, 0, 0, x.shape[1] - short.shape[1]))

    def pool(self, x, first):
        """The non-parametric shortcut (as DC-AE's space-to-channel shortcuts): each latent pixel's input block of
        fs x fs pixels and its frames (the first frame alone, then groups of ft) averaged."""
        dtype = x.dtype
        if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):  # no CPU avg_pool3d for these
            x = x.float()
        x = F.avg_pool3d(x, (1, self.fs, self.fs))
        head, x = (x[:, :, :1], x[:, :, 1:]) if first else (None, x)
        x = x.unflatten(2, (-1, self.ft)).mean(3)
        return (x if head is None else torch.cat([head, x], 2)).to(dtype)


class Decoder(nn.Module):
    def __init__(self, cin, cout, channels, layers, time_up, attention, shortcut=False):
        super().__init__()
        self.ft, self.fs = 2 ** sum(time_up), 2 ** len(time_up)
        self.shortcut = shortcut
        channels = channels[::-1]
        c = channels[0]
        self.conv_in = CausalConv3d(cin, c, 3)
        blocks = [ResBlock(c, c)] + ([FrameAttention(c)] if attention else []) + [ResBlock(c, c)]
        for i, ch in enumerate(channels):
            for _ in range(layers):
                blocks.append(ResBlock(c, ch))
                c = ch
            if i < len(channels) - 1:
                blocks.append(Upsample(c, time_up[i]))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = ChannelNorm(c)
        self.conv_out = CausalConv3d(c, cout, 3)

    def forward(self, z, cache=None):
        # z: (B, C, T', h, w) -> (B, 3, T, h*fs, w*fs)
        first = _first_chunk(self, cache)
        x = self.conv_in(z, cache)
        for block in self.blocks:
            x = block(x, cache)
        x = self.conv_out(F.silu(self.norm_out(x)), cache)
        if not self.shortcut:
            return x
        # the shortcut's inverse: the first latent channels as colours, held over their frames and interpolated
        # bilinearly over the pixels (a smooth base for the network to sharpen, rather than blocks)
        short = z[:, :x.shape[1]].repeat_interleave(self.ft, 2)[:, :, self.ft - 1 if first else 0:]
        B, T = short.shape[0], short.shape[2]
        short = F.interpolate(rearrange(short, "b c t h w -> (b t) c h w"), scale_factor=self.fs, mode="bilinear")
        return x + rearrange(short, "(b t) c h w -> b c t h w", b=B, t=T)


def _tile_starts(size, tile, stride):
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(n, overlap, device):
    # weights (n,) rising linearly over `overlap` pixels from each edge; the sum over tiles is divided out
    i = torch.arange(n, device=device, dtype=torch.float32) + 0.5
    return torch.clamp(torch.minimum(i, n - i) / max(overlap, 1), max=1.0)


def _tiled(fn, x, tile, overlap, ratio):
    """Apply `fn` to overlapping spatial tiles of x: (B, C, T, H, W) and blend the outputs with linear ramps.
    `tile` and `overlap` are in x's pixels; the output is `ratio` times x's spatial size."""
    H, W = x.shape[-2:]
    out = weight = None
    for i in _tile_starts(H, tile, tile - overlap):
        for j in _tile_starts(W, tile, tile - overlap):
            y = fn(x[..., i:i + tile, j:j + tile])
            h, w = y.shape[-2:]
            oi, oj = round(i * ratio), round(j * ratio)
            wt = (_ramp(h, overlap * ratio, y.device)[:, None] * _ramp(w, overlap * ratio, y.device)).to(y.dtype)
            if out is None:
                out = y.new_zeros(*y.shape[:3], round(H * ratio), round(W * ratio))
                weight = y.new_zeros(round(H * ratio), round(W * ratio))
            out[..., oi:oi + h, oj:oj + w] += y * wt
            weight[oi:oi + h, oj:oj + w] += wt
    return out / weight


class CausalVideoVAE(ModelMixin, ConfigMixin):
    """Causal 3D-convolutional KL autoencoder for videos and images.

    block_out_channels: channels per level; len - 1 = log2(spatial_factor) levels downsample space, the last
        log2(temporal_factor) of those also downsample time.
    layers_per_block: residual blocks per level.
    latent_channels: C of the latent.
    temporal_factor, spatial_factor: ft and fs, powers of 2 (ft <= fs).
    mid_attention: per-frame self-attention between the two middle residual blocks.
    latents_mean, latents_std: per-channel statistics for normalized latents (see `compute_latent_stats`).
    tile_sample_size, tile_overlap: spatial tile and overlap in pixels when tiling is enabled.
    shortcut: non-parametric shortcuts around encoder and decoder (block average colours into the first latent
        means; those held over their frames and interpolated bilinearly back to pixels; after DC-AE): colours and
        coarse motion are right from the first step, and the networks learn the rest. Faster to train when small.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        block_out_channels: tuple = (96, 192, 384, 384),
        layers_per_block: int = 2,
        latent_channels: int = 16,
        temporal_factor: int = 4,
        spatial_factor: int = 8,
        mid_attention: bool = True,
        latents_mean: list | None = None,
        latents_std: list | None = None,
        tile_sample_size: int = 256,
        tile_overlap: int = 64,
        shortcut: bool = False,
    ):
        super().__init__()
        n_space, n_time = math.log2(spatial_factor), math.log2(temporal_factor)
        if not (n_space.is_integer() and n_time.is_integer() and n_time <= n_space):
            raise ValueError(f"spatial_factor ({spatial_factor}) and temporal_factor ({temporal_factor}) must be "
                             f"powers of 2 with temporal_factor <= spatial_factor")
        if len(block_out_channels) != int(n_space) + 1:
            raise ValueError(f"block_out_channels needs log2(spatial_factor) + 1 = {int(n_space) + 1} entries for "
                             f"spatial_factor {spatial_factor}, got {len(block_out_channels)}")
        if shortcut and latent_channels < in_channels:
            raise ValueError(f"shortcut needs latent_channels >= in_channels ({in_channels}), got {latent_channels}")
        for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if stats is not None and len(stats) != latent_channels:
                raise ValueError(f"{name} has {len(stats)} entries, expected latent_channels = {latent_channels}")
        time_down = [False] * int(n_space - n_time) + [True] * int(n_time)
        channels = list(block_out_channels)
        self.encoder = Encoder(in_channels, 2 * latent_channels, channels, layers_per_block, time_down, mid_attention,
                               shortcut)
        self.decoder = Decoder(latent_channels, in_channels, channels, layers_per_block, time_down[::-1],
                               mid_attention, shortcut)
        # start near-deterministic (posterior std e^-3 = 0.05): a unit-variance start buries the mean under noise
        # that a KL weight of ~1e-6 takes thousands of steps to shrink, so nothing is learnt early
        nn.init.constant_(self.encoder.conv_out.conv.bias[latent_channels:], -6.0)
        if shortcut:  # exact colours at the start: the decoder adds only what it has learnt, the encoder nothing
            for conv, rows in ((self.encoder.conv_out.conv, in_channels), (self.decoder.conv_out.conv, None)):
                nn.init.zeros_(conv.weight[:rows])  # to its colour channels
                nn.init.zeros_(conv.bias[:rows])
        self.use_tiling = False

    @property
    def ft(self) -> int:
        return self.config.temporal_factor

    @property
    def fs(self) -> int:
        return self.config.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.config.latent_channels

    @property
    def used_channels(self) -> list[int]:
        """The latent channels the decoder uses (std > 0 in the statistics; all without statistics): the ones
        encode_latents returns and a denoiser generates."""
        std = self.config.latents_std
        return [c for c in range(self.latent_channels) if std is None or std[c] > 0]

    @property
    def denoiser_channels(self) -> int:
        return len(self.used_channels)

    def valid_size(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        return valid_size(T, H, W, self.ft, self.fs)

    def enable_tiling(self, tile_sample_size: int | None = None, tile_overlap: int | None = None):
        """Encode and decode frames larger than `tile_sample_size` pixels in overlapping spatial tiles."""
        size = tile_sample_size or self.config.tile_sample_size
        overlap = self.config.tile_overlap if tile_overlap is None else tile_overlap
        if size % self.fs or overlap % self.fs or not 0 <= overlap < size:
            raise ValueError(f"tile size ({size}) and overlap ({overlap}) must be multiples of fs={self.fs} with "
                             f"0 <= overlap < size")
        self.register_to_config(tile_sample_size=size, tile_overlap=overlap)
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def _encode_stream(self, x):
        # x: (B, 3, 1 + ft*k, H, W) -> moments (B, 2C, 1 + k, H/fs, W/fs), the first frame, then ft frames a step
        cache = {}
        chunks = [x[:, :, :1]] + (list(x[:, :, 1:].split(self.ft, dim=2)) if x.shape[2] > 1 else [])
        return torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)

    def _decode_stream(self, z):
        # z: (B, C, 1 + k, h, w) -> (B, 3, 1 + ft*k, h*fs, w*fs), one latent frame a step into a preallocated output
        cache, out, t = {}, None, 0
        for i in range(z.shape[2]):
            frames = self.decoder(z[:, :, i:i + 1], cache)
            if out is None:
                T = 1 + self.ft * (z.shape[2] - 1)
                out = frames.new_empty(*frames.shape[:2], T, *frames.shape[3:])
            out[:, :, t:t + frames.shape[2]] = frames
            t += frames.shape[2]
        return out

    def encode(self, x: torch.Tensor, return_dict: bool = True, stream: bool = True):
        """x: (B, 3, 1 + ft*k, H, W) in [-1, 1] -> AutoencoderKLOutput(latent_dist) over (B, C, 1 + k, H/fs, W/fs).
        stream=False runs one pass over all frames (faster to train, memory grows with T)."""
        check_size(x, self.ft, self.fs, self.config.in_channels)
        x = x.to(self.dtype)
        fn = self._encode_stream if stream else self.encoder
        size, overlap = self.config.tile_sample_size, self.config.tile_overlap
        if self.use_tiling and max(x.shape[-2:]) > size:
            moments = _tiled(fn, x, size, overlap, 1 / self.fs)
        else:
            moments = fn(x)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, stream: bool = True):
        """z: (B, C, 1 + k, h, w) -> DecoderOutput(sample) of (B, 3, 1 + ft*k, h*fs, w*fs)."""
        check_latents(z, self.latent_channels)
        z = z.to(self.dtype)
        fn = self._decode_stream if stream else self.decoder
        size, overlap = self.config.tile_sample_size // self.fs, self.config.tile_overlap // self.fs
        if self.use_tiling and max(z.shape[-2:]) > size:
            x = _tiled(fn, z, size, overlap, self.fs)
        else:
            x = fn(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """Training pass in one go: returns (reconstruction, posterior)."""
        posterior = self.encode(x, stream=False).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z, stream=False).sample, posterior

    def _stats(self, z):
        C = self.latent_channels
        mean = self.config.latents_mean or [0.0] * C
        std = self.config.latents_std or [1.0] * C
        shape = (1, C, 1, 1, 1)
        return z.new_tensor(mean).view(shape), z.new_tensor(std).view(shape)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 1 + ft*k, H, W) -> normalized latents (B, C, 1 + k, H/fs, W/fs) of the C = denoiser_channels
        used channels, from the posterior's mode: a channel with std 0 (unused by the decoder, see
        `compute_latent_stats`) is left out."""
        z = self.encode(x).latent_dist.mode()
        mean, std = self._stats(z)
        keep = self.used_channels
        return (z[:, keep] - mean[:, keep]) / std[:, keep]

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, denoiser_channels, 1 + k, h, w) -> pixels (B, 3, 1 + ft*k, h*fs, w*fs); the
        channels encode_latents leaves out decode at their mean."""
        keep = self.used_channels
        if z.ndim != 5 or z.shape[1] != len(keep):
            raise ValueError(f"expected normalized latents (B, {len(keep)}, T, h, w) (the VAE's used channels "
                             f"{keep}), got {tuple(z.shape)}")
        full = z.new_zeros(z.shape[0], self.latent_channels, *z.shape[2:], dtype=self.dtype)
        full[:, keep] = z.to(self.dtype)
        mean, std = self._stats(full)
        return self.decode(full * std + mean).sample


@torch.no_grad()
def compute_latent_stats(vae: CausalVideoVAE, batches) -> tuple[list, list]:
    """Per-channel mean and std of the raw latents (posterior modes) of an iterable of pixel batches (B, 3, T, H, W);
    stored in the VAE's config (latents_mean, latents_std), so encode_latents gives roughly zero-mean unit-variance
    latents.

    A channel the decoder does not use (`unused_channels`: tested on the last batch, set to the channel's mean over
    all of them, as decode_latents puts it back) gets std 0: encode_latents leaves
    it out rather than blowing its leftovers up to unit variance for a denoiser to learn and carry (the shapes VAE's
    decoder reads only the three shortcut colour channels of its eight)."""
    total = total_sq = None
    count = 0
    for x in batches:
        raw = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
        z = rearrange(raw.double(), "b c t h w -> c (b t h w)")
        total = z.sum(1) if total is None else total + z.sum(1)
        total_sq = (z ** 2).sum(1) if total_sq is None else total_sq + (z ** 2).sum(1)
        count += z.shape[1]
    if count == 0:
        raise ValueError("compute_latent_stats got no batches")
    mean = total / count
    std = (total_sq / count - mean ** 2).clamp(min=1e-12).sqrt()
    for c in unused_channels(vae, raw, mean.tolist()):
        std[c] = 0.0
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return mean.tolist(), std.tolist()


@torch.no_grad()
def unused_channels(vae: CausalVideoVAE, raw: torch.Tensor, means: list, tol: float = 1e-3) -> list[int]:
    """The channels of raw latents (B, C, T, h, w) whose replacement by the data's mean (`means`; not these latents'
    own: a flat clip's colour channel is constant, so its own mean alone would call it unused) changes the decoded
    pixels (in [-1, 1]) by less than `tol` on average: the decoder ignores them."""
    ref = vae.decode(raw).sample
    unused = []
    for c in range(raw.shape[1]):
        flat = raw.clone()
        flat[:, c] = means[c]
        if (vae.decode(flat).sample - ref).abs().mean() < tol:
            unused.append(c)
    return unused


class PretrainedVideoVAE(nn.Module):
    """diffusers' AutoencoderKLWan / AutoencoderKLCogVideoX / AutoencoderKLHunyuanVideo behind CausalVideoVAE's
    interface: ft, fs, latent_channels, denoiser_channels (all of them), valid_size, encode_latents,
    decode_latents (same shapes contract).
    Normalization comes from the wrapped model's config: latents_mean/std where it has them (Wan), else
    (z - shift_factor) * scaling_factor (CogVideoX, HunyuanVideo)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        if isinstance(model, AutoencoderKLWan):
            self.ft = 2 ** sum(cfg.temperal_downsample)
            self.fs = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)
            self.latent_channels = cfg.z_dim
        elif isinstance(model, AutoencoderKLCogVideoX):
            self.ft = int(cfg.temporal_compression_ratio)
            self.fs = 2 ** (len(cfg.block_out_channels) - 1)
            self.latent_channels = cfg.latent_channels
        elif isinstance(model, AutoencoderKLHunyuanVideo):
            self.ft = cfg.temporal_compression_ratio
            self.fs = cfg.spatial_compression_ratio
            self.latent_channels = cfg.latent_channels
        else:
            raise TypeError(f"PretrainedVideoVAE wraps AutoencoderKLWan, AutoencoderKLCogVideoX or "
                            f"AutoencoderKLHunyuanVideo, got {type(model).__name__}")
        for key in ("latents_mean", "latents_std"):  # diffusers' defaults are the 16 channels of Wan 2.1
            stats = getattr(cfg, key, None)
            if stats is not None and len(stats) != self.latent_channels:
                raise ValueError(f"the VAE's {key} has {len(stats)} values for its {self.latent_channels} latent "
                                 f"channels; give {key} (and its partner) with one value a channel")

    @property
    def denoiser_channels(self) -> int:
        return self.latent_channels

    @property
    def dtype(self):
        return self.model.dtype

    def valid_size(self, T: int, H: int, W: int) -> tuple[int, int, int]:
        return valid_size(T, H, W, self.ft, self.fs)

    def encode(self, x, return_dict: bool = True):
        patch = getattr(self.model.config, "patch_size", None) or 1  # Wan 2.2 counts the patchified channels
        check_size(x, self.ft, self.fs, self.model.config.in_channels // patch ** 2)
        return self.model.encode(x.to(self.dtype), return_dict=return_dict)

    def decode(self, z, return_dict: bool = True):
        check_latents(z, self.latent_channels)
        x = self.model.decode(z.to(self.dtype)).sample
        T = 1 + self.ft * (z.shape[2] - 1)
        x = x[:, :, -T:]  # CogVideoX decodes an even number of latent frames to ft each: the first ones are extra
        return DecoderOutput(sample=x) if return_dict else (x,)

    def _normalize(self, z, inverse):
        cfg = self.model.config
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            shape = (1, -1, 1, 1, 1)
            mean, std = z.new_tensor(cfg.latents_mean).view(shape), z.new_tensor(cfg.latents_std).view(shape)
            return z * std + mean if inverse else (z - mean) / std
        shift, scale = getattr(cfg, "shift_factor", None) or 0.0, cfg.scaling_factor
        return z / scale + shift if inverse else (z - shift) * scale

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalize(self.encode(x).latent_dist.mode(), inverse=False)

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self._normalize(z.to(self.dtype), inverse=True)).sample


PRETRAINED_VAES = {"wan": AutoencoderKLWan, "cogvideox": AutoencoderKLCogVideoX,
                   "hunyuan": AutoencoderKLHunyuanVideo}


def load_vae(kind: str = "causal", path_or_config: str | dict | None = None, **kwargs):
    """Build a VAE by name. kind: 'causal' (ours), 'wan', 'cogvideox' or 'hunyuan'. path_or_config: a directory
    (or hub id) for from_pretrained (kwargs go to it, e.g. subfolder='vae', torch_dtype), a dict of constructor
    arguments, None for the class defaults, or for 'causal' a preset name from VAE_PRESETS. A hub id loads from the
    hub cache first and, not cached and without a network, fails at once in one line (videodit.text.from_hub)."""
    from .text import from_hub, is_local, load_error

    def pretrained(cls):
        try:
            return from_hub(lambda **kw: cls.from_pretrained(path_or_config, **{**kw, **kwargs}), path_or_config)
        except OSError as e:
            if is_local(path_or_config):
                raise
            raise load_error(path_or_config, "the VAE", e) from e

    if kind == "causal":
        if isinstance(path_or_config, dict):  # first: a dict is unhashable, so `in VAE_PRESETS` would raise
            return CausalVideoVAE(**path_or_config, **kwargs)
        if path_or_config is None or path_or_config in VAE_PRESETS:
            return CausalVideoVAE(**VAE_PRESETS[path_or_config or "standard"], **kwargs)
        if "/" not in str(path_or_config) and not os.path.isdir(path_or_config):  # not a folder nor a hub id
            raise ValueError(f"load_vae('causal', {str(path_or_config)!r}): not a preset nor a folder; give one of "
                             f"the presets {', '.join(map(repr, VAE_PRESETS))}, a dict of CausalVideoVAE arguments, "
                             f"or a folder written by save_pretrained (or its hub id, org/name)")
        return pretrained(CausalVideoVAE)
    if kind not in PRETRAINED_VAES:
        raise ValueError(f"unknown VAE kind {kind!r}; choose one of 'causal', "
                         f"{', '.join(map(repr, PRETRAINED_VAES))}")
    cls = PRETRAINED_VAES[kind]
    if path_or_config is None or isinstance(path_or_config, dict):
        model = cls(**(path_or_config or {}), **kwargs)
    else:
        model = pretrained(cls)
    return PretrainedVideoVAE(model)


def stats_command(argv=None):
    """python -m videodit.vae stats VAE_DIR (--manifest M | --shapes N) [--num-frames T --height H --width W]:
    compute the per-channel latent mean and std over a data set and write them into VAE_DIR/config.json."""
    import argparse
    import json

    from tqdm import tqdm

    from .data.manifest import ManifestError, read_manifest
    from .data.shapes import ShapesDataset
    from .data.video import VideoReadError, read_video

    p = argparse.ArgumentParser(prog="python -m videodit.vae stats", description=stats_command.__doc__.split(":")[0])
    p.add_argument("vae", help="a CausalVideoVAE folder (save_pretrained)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="a .jsonl or .csv manifest of clips")
    src.add_argument("--shapes", type=int, help="this many rendered shapes-world clips")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--limit", type=int, default=256, help="at most this many manifest clips")
    a = p.parse_args(argv)
    for name in ("shapes", "num_frames", "height", "width", "limit"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(a, name)}")
    config, kind = os.path.join(a.vae, "config.json"), None
    if os.path.isfile(config):
        with open(config) as f:
            kind = json.load(f).get("_class_name")
    if kind != "CausalVideoVAE":
        p.error(f"{a.vae} is not a CausalVideoVAE folder (its config.json names the class); give one, e.g. a VAE "
                f"run's <output_dir>/vae or a pipeline's vae/")
    try:
        rows = read_manifest(a.manifest)[:a.limit] if a.manifest else []
    except ManifestError as e:
        raise SystemExit(f"error: {e}") from None
    vae = CausalVideoVAE.from_pretrained(a.vae).eval()
    T, H, W = vae.valid_size(a.num_frames, a.height, a.width)

    bar = tqdm(total=a.shapes or len(rows), desc="encoding", unit="clip")
    counted = 0

    def clips():
        nonlocal counted
        ds = ShapesDataset(sizes=[(T, H, W)], length=a.shapes, seed=12345) if a.shapes else None
        for i in range(a.shapes or len(rows)):
            try:
                x = ds[i]["video"] if ds else read_video(rows[i].path, T, height=H, width=W)
                counted += 1
                yield x[None]
            except VideoReadError as e:
                bar.write(f"skipped: {e}")
            bar.update(1)

    try:
        mean, std = compute_latent_stats(vae, clips())
    except ValueError:
        raise SystemExit("error: no clip could be read; the statistics need clips the VAE can encode") from None
    bar.close()
    if counted < 16:
        print(f"warning: statistics of {counted} clip(s) only; use 16 or more varied clips (a flat or still clip "
              f"says little about the channels)")
    vae.save_config(a.vae)
    print(f"latents_mean {[round(m, 4) for m in mean]}\nlatents_std {[round(s, 4) for s in std]}\nwrote {a.vae}")


if __name__ == "__main__":
    import sys

    from videodit.config import one_line_warnings

    one_line_warnings()
    if sys.argv[1:2] != ["stats"]:
        sys.exit("usage: python -m videodit.vae stats VAE_DIR (--manifest M | --shapes N) [...]")
    stats_command(sys.argv[2:])
