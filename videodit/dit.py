"""VideoDiT: a diffusion transformer over packed spacetime patches, conditioned on text and per-token timesteps.

Block (Wan/PixArt-style modulation: one shared time projection, a learned per-block table added to it):
    x = x + gate1 * SelfAttn(modulate(LN(x), shift1, scale1))    # QK RMSNorm, 3D RoPE, packed: no cross-sample
    x = x + CrossAttn(LN_affine(x), text)                         # each token sees its own sample's unpadded text
    x = x + gate2 * MLP(modulate(LN(x), shift2, scale2))         # GELU-tanh; optionally Mix-FFN (local_mlp)
The modulation tables, the shared time projection and the output layer start at zero (adaLN-Zero): every block is
the identity and the fresh model outputs zeros. The residual stream, norms, modulation and RoPE are float32, so the
model is stable with bf16 weights or autocast; matmuls run in the weights' (or autocast's) dtype.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import packed_attention
from .parallel import (check_heads, frame_windows, gather_tokens, gather_window, heads_to_sequence, make_shard,
                       sequence_to_heads, shard_packed)
from .patchify import Packed, pack, unpack
from .rope import RoPE3D, apply_rope

PRESETS = {
    # the CPU demo (shapes world: 64x64, 64x128, 128x64 clips, 8-channel latents, MiniLM text)
    "tiny": dict(depth=6, hidden_size=192, num_heads=4, in_channels=8, text_dim=384, pooled_text=True),
    # DiT paper sizes, video latents (16 channels) and T5 text
    "S": dict(depth=12, hidden_size=384, num_heads=6, in_channels=16, text_dim=4096),
    "B": dict(depth=12, hidden_size=768, num_heads=12, in_channels=16, text_dim=4096),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, in_channels=16, text_dim=4096),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, in_channels=16, text_dim=4096),
    # head dim 128
    "1B": dict(depth=28, hidden_size=1536, num_heads=12, in_channels=16, text_dim=4096),
    "3B": dict(depth=36, hidden_size=2304, num_heads=18, in_channels=16, text_dim=4096),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: (R,) in [0, 1] (rectified-flow time), scaled by 1000 -> (R, dim) float32 sinusoids."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32; returns float32."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32; returns the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def recompute(fn, *args):
    """fn(*args), keeping only its inputs for backward (recomputed there): for cheap elementwise chains whose
    intermediates would otherwise each hold an (N, D) float32 activation per block. On an accelerator only: on CPU
    the recomputation costs more time than the memory it saves is worth."""
    if torch.is_grad_enabled() and any(torch.is_tensor(a) and a.device.type != "cpu" for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def per_token(rows: torch.Tensor, index) -> torch.Tensor:
    """rows (R, ...) -> (N, ...), each token's row. index: (N,) row numbers (a gather), or a tuple of R run lengths:
    row r for the next index[r] tokens (a broadcast per run, whose backward sums each run, where a gather's
    index_add compiles to atomic adds that all of a sample's tokens contend for)."""
    if isinstance(index, tuple):
        return torch.cat([row.expand(n, *row.shape) for row, n in zip(rows, index)])
    return rows.index_select(0, index)


def modulated_norm(norm, x, mod, table, index, k):
    """norm(x) * (1 + scale) + shift, with shift, scale = rows k, k+1 of the block's modulation.
    x: (N, D); mod: (R, 6, D) shared time projection rows; table: (6, D) the block's; index: token -> row as in
    per_token, or an int n when the rows are runs of n tokens each (then broadcast without a copy)."""
    rows = mod[:, k:k + 2] + table[k:k + 2].float()  # (R, 2, D)
    if isinstance(index, int):
        shift, scale = rows[:, None].unbind(2)  # (R, 1, D) each
        return torch.addcmul(shift, norm(x).unflatten(0, (-1, index)), 1 + scale).flatten(0, 1)
    shift, scale = per_token(rows, index).unbind(1)  # (N, D) each
    return torch.addcmul(shift, norm(x), 1 + scale)


def gated_residual(x, y, mod, table, index, k):
    """x + gate * y, gate = row k of the block's modulation. x, y: (N, D); index as in modulated_norm."""
    gate = mod[:, k] + table[k].float()  # (R, D)
    if isinstance(index, int):
        runs = lambda v: v.unflatten(0, (-1, index))  # noqa: E731
        return torch.addcmul(runs(x), gate[:, None], runs(y.float())).flatten(0, 1)
    return torch.addcmul(x, per_token(gate, index), y.float())


def equal_runs(index: torch.Tensor, rows: int) -> int | torch.Tensor:
    """index (N,) of token rows -> n when it is rows 0, 1, .., R-1 in runs of n tokens each (equal-shape samples
    with one timestep per sample or frame: the modulation broadcasts), else index itself."""
    n = index.numel() // max(rows, 1)
    if n * rows != index.numel() or n == 0:
        return index
    same = torch.equal(index, torch.arange(rows, device=index.device).repeat_interleave(n))
    return n if same else index


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        """t: (R,) -> (R, D) float32."""
        emb = timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(emb).float()


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rot, cu_seqlens, backend, shard=None):
        """x: (N, D); rot: (N, head_dim/2, 2) RoPE cos and sin (rope.py); cu_seqlens: (B+1,) -> (N, D).
        With a Shard (sequence parallel) x and rot are this rank's slice and cu_seqlens are ignored: attention runs
        over all tokens (shard.cu_seqlens) with this rank's heads, between two all-to-alls."""
        qkv = self.qkv(x.to(self.qkv.weight.dtype))
        q, k, v = rearrange(qkv, "n (three h d) -> three n h d", three=3, h=self.num_heads)
        # recompute: the norms would keep contiguous copies of q, k (views of qkv, which attention keeps anyway)
        q, k = apply_rope(recompute(self.q_norm, q), rot), apply_rope(recompute(self.k_norm, k), rot)
        if shard is None:
            out = packed_attention(q, k, v, cu_seqlens, cu_seqlens, backend)  # (N, h, d)
        else:  # one all-to-all for q, k, v: (n, h, 3d) -> (N, h/P, 3d)
            q, k, v = heads_to_sequence(torch.cat([q, k, v.to(q.dtype)], -1), shard).chunk(3, -1)
            out = packed_attention(q, k, v, shard.cu_seqlens, shard.cu_seqlens, backend)  # (N, h/P, d)
            out = sequence_to_heads(out, shard)  # (n, h, d)
        return self.proj(rearrange(out, "n h d -> n (h d)"))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, cu_seqlens, cu_seqlens_text, backend):
        """x: (N, D) packed video tokens; context: (M, D) packed unpadded text tokens -> (N, D)."""
        dtype = self.q.weight.dtype
        q = self.q_norm(rearrange(self.q(x.to(dtype)), "n (h d) -> n h d", h=self.num_heads))
        k, v = rearrange(self.kv(context.to(dtype)), "m (two h d) -> two m h d", two=2, h=self.num_heads)
        out = packed_attention(q, self.k_norm(k), v, cu_seqlens, cu_seqlens_text, backend)  # (N, h, d)
        return self.proj(rearrange(out, "n h d -> n (h d)"))


class LocalMix(nn.Module):
    """Depthwise spacetime convolution over each sample's token grid, factored as 3x3 in space then 3 in time
    (zero padding at the sample's borders, never across samples): the local half of a Mix-FFN (Sana)."""

    def __init__(self, dim: int):
        super().__init__()
        self.space = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.time = nn.Conv2d(dim, dim, (3, 1), padding=(1, 0), groups=dim)

    def forward(self, x, grids):
        """x: (N, C) tokens of samples with patch grids `grids` (t-major), end to end -> (N, C)."""
        runs, start = [], 0  # equal grids in a row run as one batch (a plain loop: compile traces it)
        for g in map(tuple, grids):
            if runs and runs[-1][0] == g:
                runs[-1][1] += 1
            else:
                runs.append([g, 1])
        out = []
        for (t, h, w), n in runs:
            size = n * t * h * w
            v = x[start:start + size].view(n * t, h, w, -1).permute(0, 3, 1, 2)  # channels-last (n t, C, h, w)
            if t == 1:  # images: zero padding in time leaves its middle tap, a scale folded into one conv
                scale = 1 + self.time.weight[:, 0, 1, 0]
                v = F.conv2d(v, self.space.weight * scale[:, None, None, None],
                             self.space.bias * scale + self.time.bias, padding=1, groups=v.shape[1])
            else:
                v = self.space(v).permute(0, 2, 3, 1).reshape(n, t, h * w, -1).permute(0, 3, 1, 2)  # (n, C, t, hw)
                v = v + self.time(v)
            out.append(v.permute(0, 2, 3, 1).reshape(size, -1))
            start += size
        return torch.cat(out) if len(out) > 1 else out[0]


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; with local=True a Mix-FFN: the hidden features also mix with their neighbours in space
    and time (fc1 -> h + LocalMix(h) -> GELU -> fc2), which lets tokens agree on objects that span several of them
    from the first steps of training, where attention alone learns locality slowly."""

    def __init__(self, dim: int, hidden: int, local: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.local = LocalMix(hidden) if local else None
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, grids=None, shard=None):
        """Sequence parallel (`shard`): x is this rank's slice of the tokens; the convolution needs the frames next
        to it, partly on other ranks, so it runs on a window of whole frames gathered around the slice (one frame
        more on each side) and keeps the slice."""
        h = self.fc1(x.to(self.fc1.weight.dtype))
        if self.local is not None:  # grids as a tensor: from compile_blocks(dynamic=True), run outside the graph
            h = h + (_local_outside_graph(self, h, grids, shard) if torch.is_tensor(grids) else
                     self._local(h, grids, shard))
        return self.fc2(F.gelu(h, approximate="tanh"))

    def _local(self, h, grids, shard):
        if torch.is_tensor(grids):
            grids = grids.tolist()
        if shard is None:
            return self.local(h, grids)
        windows, window_grids = frame_windows(shard, grids)
        around = gather_window(h, shard, windows)
        if not window_grids:  # no tokens here; one zero token keeps this rank in the backward's all-to-all and gives
            # the convolution's weights (zero) gradients, as data parallelism expects of every rank
            return self.local(F.pad(around, (0, 0, 0, 1)), [(1, 1, 1)])[:0]
        lo = windows[shard.rank][0]
        return self.local(around, window_grids)[shard.start - lo:shard.end - lo]


# The samples' grids decide the convolutions' shapes: graphs compiled with dynamic shapes get them as a (B, 3) tensor
# (a list would be guarded on its length: a recompile for each new number of samples) and run the local mix eagerly
_local_outside_graph = torch.compiler.disable(Mlp._local)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, eps: float, local_mlp: bool):
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.attn = SelfAttention(dim, num_heads, qk_norm, eps)
        self.norm2 = FP32LayerNorm(dim, eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, eps)
        self.norm3 = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), local_mlp)
        self.modulation = nn.Parameter(torch.zeros(6, dim))  # added to the shared time projection
        self.checkpoint_parts = ()  # "attention" and/or "mlp": recomputed in backward (selective checkpointing)

    def forward(self, x, mod, t_index, context, rot, cu_seqlens, cu_seqlens_text, backend=None, shard=None,
                grids=None):
        """x: (N, D) float32 residual stream; mod: (R, 6, D) float32 rows of the shared time projection (shift1,
        scale1, gate1, shift2, scale2, gate2), t_index: (N,) each token's row (or runs, see modulated_norm);
        context: (M, D); grids: the samples' patch grids (for a local MLP) -> (N, D).
        On accelerators the per-token modulation is gathered inside recompute(): never stored per block.
        Sequence parallel: x, t_index, rot are this rank's slice, cu_seqlens the slice's pieces of the samples."""
        m = (mod, self.modulation, t_index)
        h = recompute(modulated_norm, self.norm1, x, *m, 0)
        attn = self._part("attention", self.attn, h, rot, cu_seqlens, backend, shard)
        x = recompute(gated_residual, x, attn, *m, 2)
        x = x + self.cross_attn(self.norm2(x), context, cu_seqlens, cu_seqlens_text, backend).float()
        h = recompute(modulated_norm, self.norm3, x, *m, 3)
        return recompute(gated_residual, x, self._part("mlp", self.mlp, h, grids, shard), *m, 5)

    def _part(self, name, fn, *args):
        if name in self.checkpoint_parts and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.norm = FP32LayerNorm(dim, eps, elementwise_affine=False)
        self.modulation = nn.Parameter(torch.zeros(2, dim))  # added to the time embedding
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x, temb, t_index):
        """x: (N, D); temb: (R, D) float32 rows, t_index: (N,) each token's row (or runs, see modulated_norm)
        -> (N, out_dim)."""
        h = recompute(modulated_norm, self.norm, x, temb[:, None].expand(-1, 2, -1), self.modulation, t_index, 0)
        return self.linear(h.to(self.linear.weight.dtype))


class StepCache:
    """First-block cache for sampling (ParaAttention's FBCache, as diffusers ships it): each step runs the first
    block; where its residual differs from the one of the last step that ran every block by less than `threshold`
    (mean absolute difference over mean absolute value), the other blocks are skipped and their residual of that step
    is added instead. Neighbouring steps change the features little in the middle of sampling, where most skips
    fall. One cache per sampling run (the same packed batch every step); `skipped` of `steps` counts the skips."""

    def __init__(self, threshold: float, pair=None):
        self.threshold, self.first, self.rest, self.steps, self.skipped = threshold, None, None, 0, 0
        self.pair = pair  # a torch.distributed group of guidance's two passes (cfg_group): they decide together

    def restart(self):
        """Another batch follows: its first step runs every block."""
        self.first = self.rest = None

    def reuse(self, first: torch.Tensor, group=None) -> bool:
        """first: the first block's residual this step (this rank's tokens; the ranks of a sequence-parallel `group`
        decide together). True: skip the other blocks."""
        self.steps += 1
        if self.rest is not None and first.shape == self.first.shape:  # another batch's tokens: run every block
            diff = torch.stack([(first - self.first).abs().sum(), self.first.abs().sum()]).float()
            for g in (group, self.pair):
                if g is not None:
                    torch.distributed.all_reduce(diff, group=g)
            if diff[0] < self.threshold * diff[1]:
                self.skipped += 1
                return True
        self.first = first
        return False


class VideoDiT(ModelMixin, ConfigMixin):
    """Denoiser over packed spacetime patches; predicts the rectified-flow velocity of each token."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        text_dim: int = 4096,
        freq_dim: int = 256,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        rope_base_grid: tuple[int, int, int] | None = None,
        eps: float = 1e-6,
        pooled_text: bool = False,
        local_mlp: bool = False,
        abs_pos: bool = False,
        guidance_embed: bool = False,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if len(patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in patch_size):
            raise ValueError(f"patch_size must be three positive integers (pt, ph, pw), got {patch_size}")
        self.patch_size = tuple(patch_size)
        self.token_dim = in_channels * math.prod(self.patch_size)
        self.attention_backend = None  # None: packed_attention's default ("flash" where it runs, else "loop")
        self.gradient_checkpointing = False
        self.checkpoint_every = 1  # with gradient_checkpointing: whole blocks 0, k, 2k, ... (see set_checkpoint_policy)
        self.sequence_parallel_group = None  # a torch.distributed group: see set_sequence_parallel
        # segment offsets reach the blocks as ints (traced), or as CPU tensors (read by eager attention): see
        # compile_blocks
        self.dynamic_blocks = False

        self.patch_embed = nn.Linear(self.token_dim, hidden_size)
        # where each token sits in its own clip, as fractions of the clip's grid: RoPE tells attention only how far
        # apart two tokens are, so without this a token hardly knows whether it is near the left edge of the frame
        self.pos_embed = nn.Linear(6 * POSITION_FREQS, hidden_size) if abs_pos else None
        self.text_embed = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.GELU(approximate="tanh"),
                                        nn.Linear(hidden_size, hidden_size))
        self.t_embed = TimestepEmbedder(hidden_size, freq_dim)
        # the prompt's mean token (a sentence embedding for encoders trained as such, like MiniLM), added to the
        # time embedding as SD3 and PixArt add pooled text: a whole-prompt signal beside cross-attention
        self.text_pool = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(),
                                       nn.Linear(hidden_size, hidden_size)) if pooled_text else None
        # a guidance-distilled model (videodit.flow.distill_loss) takes the guidance scale as an input, embedded as
        # the timestep is and added to the time embedding: one pass a sampling step gives the guided velocity
        self.g_embed = TimestepEmbedder(hidden_size, freq_dim) if guidance_embed else None
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))  # shared by all blocks
        self.rope = RoPE3D(hidden_size // num_heads, rope_theta, rope_base_grid)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, eps, local_mlp)
                                    for _ in range(depth))
        self.final = FinalLayer(hidden_size, self.token_dim, eps)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.t_embed.mlp[0::2]:
            nn.init.normal_(m.weight, std=0.02)
        if self.g_embed is not None:  # starts at zero: a student initialized from its teacher gives its velocities
            nn.init.normal_(self.g_embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.g_embed.mlp[2].weight)
        # adaLN-Zero: zero modulation (so zero gates) and a zero output layer
        for p in (self.time_proj[1].weight, self.time_proj[1].bias, self.final.linear.weight, self.final.linear.bias):
            nn.init.zeros_(p)

    def set_checkpoint_policy(self, policy: str):
        """Activation checkpointing: "none"; "all" (every block); "every_k" (blocks 0, k, 2k, ...); "attention" or
        "mlp" (only that part of every block: the rest keeps its activations)."""
        every = policy[len("every_"):] if policy.startswith("every_") else "1"
        every_k = policy.startswith("every_") and every.isdigit() and int(every) > 0
        if policy not in ("none", "all", "attention", "mlp") and not every_k:
            raise ValueError(f"unknown checkpoint policy {policy!r}; expected none, all, attention, mlp or every_k")
        if policy in ("none", "attention", "mlp"):
            self.disable_gradient_checkpointing()
        else:
            self.enable_gradient_checkpointing()
        self.checkpoint_every = int(every)
        for block in self.blocks:
            block.checkpoint_parts = (policy,) if policy in ("attention", "mlp") else ()

    def compile_blocks(self, dynamic: bool = True):
        """torch.compile each block: one graph, compiled once, serves every block. dynamic=False specializes it to
        the batch's shapes and segment offsets and traces attention into it: one graph a block, recompiled for each
        new batch composition, so for batches of one composition (shape buckets, sampling, benchmarks; 1B on an
        H200: 40.8% MFU against 35.0%, see README); dynamic=True keeps shapes symbolic and runs attention eagerly
        between the block's graphs, so that packed batches of any composition reuse them."""
        self.dynamic_blocks = dynamic
        for block in self.blocks:
            block.compile(dynamic=dynamic)

    def set_sequence_parallel(self, group):
        """Split every sequence over the ranks of `group` (Ulysses; see videodit.parallel); None turns it off.
        forward still takes the whole packed batch (the same on every rank of the group) and returns all tokens."""
        if group is not None:
            check_heads(self.config.num_heads, torch.distributed.get_world_size(group))
        self.sequence_parallel_group = group

    def _timestep_rows(self, timesteps, packed: Packed):
        """Timesteps (B,), (N,), a list of per-latent-frame (T_i,) or a (B, T) tensor -> values (R,), index (N,)
        of each token's row. With pt > 1 a token takes the timestep of the first latent frame it covers."""
        B, N = len(packed.grids), packed.tokens.shape[0]
        device = packed.tokens.device
        if isinstance(timesteps, torch.Tensor) and timesteps.ndim == 2:
            timesteps = list(timesteps)
        if isinstance(timesteps, (list, tuple)) and not all(isinstance(t, torch.Tensor) and t.ndim for t in timesteps):
            timesteps = torch.as_tensor(timesteps, dtype=torch.float32)  # numbers: one per sample (or token)
        if isinstance(timesteps, (list, tuple)):
            pt = self.patch_size[0]
            frames = [g[0] * pt for g in packed.grids]
            if len(timesteps) != B or any(t.shape != (f,) for t, f in zip(timesteps, frames)):
                raise ValueError(f"per-frame timesteps must be {B} tensors of shapes {[(f,) for f in frames]}, "
                                 f"got {[tuple(t.shape) for t in timesteps]}")
            return torch.cat(list(timesteps)).to(device), packed.frame_index(pt)
        t = torch.as_tensor(timesteps, device=device).float().reshape(-1)
        if t.numel() == 1:
            t = t.expand(B)
        if t.numel() == B:
            return t, packed.sample_idx
        if t.numel() == N:
            return t, torch.arange(N, device=device)
        raise ValueError(f"timesteps must be a scalar, one per sample ({B}), one per token ({N}) or per latent "
                         f"frame (a list of (T_i,) tensors), got shape {tuple(t.shape)}")

    def forward(self, packed, timesteps, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                cache: "StepCache | None" = None, guidance=None) -> torch.Tensor:
        """packed: Packed with tokens (N, C*pt*ph*pw);
        timesteps in [0, 1]: (B,), (N,) or per latent frame; text: (B, L, text_dim) padded; text_mask: (B, L)
        bool, True for real tokens (None: all real); cache: a StepCache carried across one sampling run's steps;
        guidance: the guidance scale, a number or (B,), for a guidance-distilled model (config guidance_embed) only.
        Returns the velocity tokens (N, C*pt*ph*pw)."""
        tokens, B = packed.tokens, len(packed.grids)
        if tokens.ndim != 2 or tokens.shape[1] != self.token_dim:
            raise ValueError(f"expected tokens (N, {self.token_dim}) = (N, in_channels*prod(patch_size)), got "
                             f"{tuple(tokens.shape)}; pack latents with this model's patch, "
                             f"pack(latents, model.patch_size) = {tuple(self.patch_size)}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != self.config.text_dim:
            raise ValueError(f"expected text (B={B}, L, {self.config.text_dim}), got {tuple(text.shape)}")
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask must be (B, L) = {tuple(text.shape[:2])}, got {tuple(text_mask.shape)}")
        if (guidance is None) != (self.g_embed is None):
            raise ValueError("this model has guidance distilled into it: pass guidance= (the scale)" if guidance is None
                             else "guidance= is for guidance-distilled models (guidance_embed); this one takes the "
                                  "prompt and the negative prompt in two passes (videodit.flow.guide)")

        text_mask = text_mask.bool()
        cu_seqlens = F.pad(torch.tensor(packed.seqlens).cumsum(0), (1, 0))  # from the grids: no device sync
        cu_seqlens_text = F.pad(text_mask.sum(1).cpu().cumsum(0), (1, 0))
        offsets = (lambda c: c) if self.dynamic_blocks else (lambda c: tuple(c.tolist()))
        cu_seqlens, cu_seqlens_text = offsets(cu_seqlens), offsets(cu_seqlens_text)
        context = self.text_embed(text[text_mask].to(self.dtype))  # (M, D): unpadded text, sample after sample

        t_values, t_index = self._timestep_rows(timesteps, packed)
        if t_values.device.type == "cpu" and not bool(((t_values > -1e-4) & (t_values < 1 + 1e-4)).all()):  # no sync
            got = "NaN" if t_values.isnan().any() else f"{t_values.min().item():g} to {t_values.max().item():g}"
            raise ValueError(f"timesteps must lie in [0, 1] (0: clean, 1: pure noise), got {got}")
        temb = self.t_embed(t_values)  # (R, D): one row per distinct timestep slot (sample, frame or token)
        if self.text_pool is not None or self.g_embed is not None:
            row_sample = torch.zeros(len(temb), dtype=torch.long, device=temb.device)
            row_sample = row_sample.scatter(0, t_index, packed.sample_idx)  # each row's sample
        if self.text_pool is not None:
            m = text_mask[..., None].to(self.dtype)
            pooled = (text.to(self.dtype) * m).sum(1) / m.sum(1).clamp(min=1)  # (B, text_dim); empty prompt: 0
            temb = temb + self.text_pool(pooled).float()[row_sample]
        if self.g_embed is not None:  # scales 1 .. 11 take the timestep's range [0, 1]
            g = torch.as_tensor(guidance, dtype=torch.float32, device=temb.device).reshape(-1).expand(B)
            temb = temb + self.g_embed((g - 1) / 10)[row_sample]
        mod = rearrange(self.time_proj(temb.to(self.dtype)).float(), "r (six d) -> r six d", six=6)  # (R, 6, D)

        shard = None
        if self.sequence_parallel_group is not None:  # from here on: this rank's slice of the tokens
            shard = make_shard(self.sequence_parallel_group, packed.cu_seqlens)
            shard = dataclasses.replace(shard, cu_seqlens=offsets(shard.cu_seqlens))  # ints where blocks are traced
            t_index = t_index[shard.start:shard.end]
            packed = shard_packed(packed, shard)
            cu_seqlens = offsets(packed.cu_seqlens.cpu())
        if tokens.device.type == "cpu":  # equal runs broadcast without a copy (CPU only: an int specializes graphs)
            t_index = equal_runs(t_index, len(temb))
        if t_index is packed.sample_idx and not self.dynamic_blocks:  # a timestep per sample: runs of its tokens
            t_index = tuple(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
        grids = torch.tensor(packed.grids).to(tokens.device, non_blocking=True)[packed.sample_idx]  # (N, 3)
        rot = self.rope(packed.coords, grids)

        x = self.patch_embed(packed.tokens.to(self.dtype)).float()  # (N, D) residual stream in float32
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_features(packed.coords, grids).to(self.dtype)).float()
        block_grids = torch.tensor(packed.grids) if self.dynamic_blocks else packed.grids  # see _local_outside_graph
        rest = range(len(self.blocks))
        if cache is not None:  # the first block, then the others only where its residual changed enough
            x0, x = x, self._block(0, x, mod, t_index, context, rot, cu_seqlens, cu_seqlens_text, shard, block_grids)
            rest = () if cache.reuse(x - x0, self.sequence_parallel_group) else range(1, len(self.blocks))
            x1 = x
            if not rest:
                x = x + cache.rest
        for i in rest:
            x = self._block(i, x, mod, t_index, context, rot, cu_seqlens, cu_seqlens_text, shard, block_grids)
        if cache is not None and rest:
            cache.rest = x - x1
        out = self.final(x, temb, t_index)
        return out if shard is None else gather_tokens(out, shard)

    def _block(self, i, x, mod, t_index, context, rot, cu_seqlens, cu_seqlens_text, shard, grids):
        args = (x, mod, t_index, context, rot, cu_seqlens, cu_seqlens_text, self.attention_backend, shard, grids)
        if torch.is_grad_enabled() and self.gradient_checkpointing and i % self.checkpoint_every == 0:
            return self._gradient_checkpointing_func(self.blocks[i], *args)
        return self.blocks[i](*args)

    def forward_latents(self, latents: list[torch.Tensor], timesteps, text, text_mask=None,
                        guidance=None) -> list[torch.Tensor]:
        """latents: list of (C, T_i, H_i, W_i) -> list of velocities of the same shapes (guidance: as forward's)."""
        packed = pack(latents, self.patch_size)
        return unpack(self(packed, timesteps, text, text_mask, guidance=guidance), packed, self.patch_size)


POSITION_FREQS = 4


def position_features(coords: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
    """(N, 3) token coordinates in their samples' (N, 3) grids -> (N, 6 * POSITION_FREQS) Fourier features of the
    fractions (coord + 0.5) / grid per axis: the same place in a clip of any size or length gets the same features."""
    f = (coords.float() + 0.5) / grids.float()
    angles = math.pi * f[..., None] * torch.arange(1, POSITION_FREQS + 1, device=f.device)  # (N, 3, freqs)
    return torch.cat([angles.sin(), angles.cos()], -1).flatten(1)
