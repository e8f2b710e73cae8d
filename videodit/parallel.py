"""Sequence parallelism (DeepSpeed-Ulysses) over torch.distributed, for sequences too long for one device.

The P ranks of a group share one packed batch (all samples end to end, N tokens). Each holds a contiguous slice of
the sequence, ceil(N / P) tokens (the last ranks fewer, possibly none): every per-token part of the model (patch
embedding, modulation, RoPE, cross-attention to the sample's own text, MLP, output layer) runs on that slice. Around
self-attention an all-to-all trades the slice of tokens for a slice of heads:

    (N/P tokens, heads, head_dim) --all-to-all--> (N tokens, heads/P, head_dim)   attention per sample, full cu_seqlens
    (N tokens, heads/P, head_dim) --all-to-all--> (N/P tokens, heads, head_dim)

Any N works with any P that divides the heads: slices are padded to ceil(N / P) rows inside the collectives and the
padding is dropped after them. The collectives are autograd functions, so backward is exact. `gather_tokens` is
the adjoint pair of slicing: its backward sums the gradient over the group; `gather_window` brings a rank only the
rows next to its slice that a local convolution reaches (`frame_windows`). When every rank of the group computes
the same loss from the gathered output, the mean of the ranks' parameter gradients is the one-process gradient,
which is what DDP's mean over all ranks gives (data parallel over groups, sequence parallel within).

    group = sequence_parallel_groups(2)          # after init_process_group: ranks [0,1], [2,3], ...
    model.set_sequence_parallel(group)           # VideoDiT: forward takes the whole batch, returns all N tokens
"""

import bisect
import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .patchify import Packed


@dataclass(frozen=True)
class Shard:
    """This rank's slice [start, end) of a packed sequence split over a group of `size` ranks in slices of
    `chunk` = ceil(total / size) tokens. cu_seqlens: (B+1,) the whole sequence's sample offsets (a CPU tensor, or a
    tuple of ints for blocks compiled with static shapes, which trace attention through them)."""
    group: object
    rank: int
    size: int
    cu_seqlens: torch.Tensor | tuple

    @property
    def total(self) -> int:
        return int(self.cu_seqlens[-1])

    @property
    def chunk(self) -> int:
        return -(-self.total // self.size)

    @property
    def start(self) -> int:
        return min(self.rank * self.chunk, self.total)

    @property
    def end(self) -> int:
        return min(self.start + self.chunk, self.total)


def make_shard(group, cu_seqlens: torch.Tensor) -> Shard:
    """This rank's Shard of a packed sequence with sample offsets cu_seqlens (B+1,)."""
    return Shard(group, dist.get_rank(group), dist.get_world_size(group), cu_seqlens.cpu())


def degrees(*counts: int) -> list[int]:
    """The sequence-parallel degrees that divide every one of `counts` (processes, attention heads)."""
    return [d for d in range(1, min(counts) + 1) if all(c % d == 0 for c in counts)]


def sequence_parallel_groups(degree: int):
    """Split the default group into consecutive groups of `degree` ranks (ranks [0..degree), [degree..2 degree),
    ...) and return this rank's group, its data-parallel rank and the data-parallel size (the number of groups).
    Every rank must call it (new_group is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % degree:
        raise ValueError(f"parallel.sequence_parallel = {degree} does not divide the {world} processes; "
                         f"use one of {degrees(world)}")
    mine = None
    for first in range(0, world, degree):
        group = dist.new_group(list(range(first, first + degree)))
        if first <= rank < first + degree:
            mine = group
    return mine, rank // degree, world // degree


def check_heads(num_heads: int, degree: int):
    if num_heads % degree:
        raise ValueError(f"sequence parallelism over {degree} ranks splits the attention heads: {num_heads} heads "
                         f"are not divisible by {degree}; use a degree in {degrees(num_heads)}")


def shard_packed(packed: Packed, shard: Shard) -> Packed:
    """The local view of a packed batch: this rank's tokens, coordinates and sample indices, and cu_seqlens of the
    slice's pieces of every sample (empty pieces for samples outside the slice), as cross-attention needs them.
    grids stay the whole samples' grids."""
    a, b = shard.start, shard.end
    cu = packed.cu_seqlens.clamp(a, b) - a
    return Packed(packed.tokens[a:b], packed.coords[a:b], cu, packed.sample_idx[a:b], packed.grids)


class _AllToAll(torch.autograd.Function):
    """x: (P * c, ...) -> (P * c, ...): block i of the input goes to rank i; block j of the output comes from rank
    j. The equal-split all-to-all is its own adjoint."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group), None


class _Gather(torch.autograd.Function):
    """Local slices (n_r, ...) -> the whole sequence (total, ...) on every rank; backward sums the gradient over the
    group and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x, shard: Shard):
        ctx.shard = shard
        x = _pad_rows(x, shard.chunk).contiguous()
        parts = [torch.empty_like(x) for _ in range(shard.size)]
        dist.all_gather(parts, x, group=shard.group)
        return torch.cat(parts)[:shard.total]

    @staticmethod
    def backward(ctx, grad):
        s = ctx.shard
        grad = grad.contiguous()
        dist.all_reduce(grad, group=s.group)
        return grad[s.start:s.end], None


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended to x: (n, ...) -> (rows, ...)."""
    return F.pad(x, (0, 0) * (x.ndim - 1) + (0, rows - x.shape[0]))


class _Window(torch.autograd.Function):
    """This rank's slice (n, ...) -> rows [lo, hi) of the whole sequence, its window (`windows`: every rank's), from
    the ranks that hold them (one all-to-all of uneven parts); backward sends each row's gradient back to the rank
    that holds the row, which sums what it receives."""

    @staticmethod
    def forward(ctx, x, shard: Shard, windows: list):
        slices = [dataclasses.replace(shard, rank=q) for q in range(shard.size)]
        send = [_overlap(shard.start, shard.end, *w) for w in windows]  # our rows in rank q's window
        recv = [_overlap(s.start, s.end, *windows[shard.rank]) for s in slices]  # rank q's rows in ours
        ctx.shard, ctx.send, ctx.recv = shard, send, recv
        parts = torch.cat([x[a - shard.start:b - shard.start] for a, b in send]).contiguous()
        out = x.new_empty(sum(_sizes(recv)), *x.shape[1:])
        dist.all_to_all_single(out, parts, _sizes(recv), _sizes(send), group=shard.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        s, send = ctx.shard, ctx.send
        back = grad.new_empty(sum(_sizes(send)), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), _sizes(send), _sizes(ctx.recv), group=s.group)
        out = grad.new_zeros(s.end - s.start, *grad.shape[1:])
        for (a, b), part in zip(send, back.split(_sizes(send))):
            out[a - s.start:b - s.start] += part
        return out, None, None


def _overlap(a: int, b: int, c: int, d: int) -> tuple[int, int]:
    """[a, b) intersected with [c, d), as (start, end) with start <= end."""
    lo = max(a, c)
    return lo, max(lo, min(b, d))


def _sizes(ranges) -> list[int]:
    return [b - a for a, b in ranges]


def frame_windows(shard: Shard, grids: list) -> tuple[list, list]:
    """What a convolution over each sample's (t, h, w) token grid, reaching one frame back and forth, needs across
    ranks: every rank's window [lo, hi) of the whole sequence (the frames its slice touches, whole, and one frame
    more on each side within the sample), and this rank's window as the grids of the samples' frames in it."""
    cu = [int(c) for c in shard.cu_seqlens]
    frame = [h * w for _, h, w in grids]  # tokens per frame
    windows, mine = [], []
    for q in range(shard.size):
        s = dataclasses.replace(shard, rank=q)
        if s.start == s.end:  # a rank with no tokens needs none
            windows.append((s.start, s.start))
            continue
        first, last = bisect.bisect_right(cu, s.start) - 1, bisect.bisect_right(cu, s.end - 1) - 1  # their samples
        lo = cu[first] + max((s.start - cu[first]) // frame[first] - 1, 0) * frame[first]
        hi = cu[last] + min((s.end - 1 - cu[last]) // frame[last] + 2, grids[last][0]) * frame[last]
        windows.append((lo, hi))
        if q == shard.rank:
            for i in range(first, last + 1):
                t0 = (lo - cu[i]) // frame[i] if i == first else 0
                t1 = (hi - cu[i]) // frame[i] if i == last else grids[i][0]
                mine.append((t1 - t0, *grids[i][1:]))
    return windows, mine


def gather_window(x: torch.Tensor, shard: Shard, windows: list) -> torch.Tensor:
    """x: (n_local, ...) this rank's slice -> (hi - lo, ...): rows [lo, hi) = windows[rank] of the whole sequence."""
    return _Window.apply(x, shard, windows)


def gather_tokens(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """x: (n_local, ...) this rank's slice -> (N, ...) the whole sequence, on every rank of the group."""
    return _Gather.apply(x, shard)


def heads_to_sequence(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """x: (n_local, heads, d) -> (N, heads/P, d): all tokens, this rank's heads (rank r gets heads
    [r*heads/P, (r+1)*heads/P))."""
    P, c = shard.size, shard.chunk
    x = _pad_rows(x, c)  # (c, h, d)
    x = x.reshape(c, P, x.shape[1] // P, x.shape[2]).transpose(0, 1)  # (P, c, h/P, d): block i to rank i
    x = _AllToAll.apply(x.reshape(P * c, *x.shape[2:]), shard.group)  # block j: rank j's tokens, our heads
    return x[:shard.total]


def sequence_to_heads(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """x: (N, heads/P, d) -> (n_local, heads, d): the inverse of heads_to_sequence."""
    P, c = shard.size, shard.chunk
    x = _pad_rows(x, P * c)  # (P*c, h/P, d): block i holds rank i's tokens
    x = _AllToAll.apply(x, shard.group).reshape(P, c, *x.shape[1:])  # block j: our tokens, rank j's heads
    x = x.transpose(0, 1).reshape(c, P * x.shape[2], x.shape[3])  # (c, h, d)
    return x[:shard.end - shard.start]
