"""Attention over packed sequences: segment i of the queries attends only to segment i of the keys.

Self-attention passes the same cu_seqlens twice; cross-attention to text passes the text's own cu_seqlens (the text
packed without its padding), so a text padding mask is honoured exactly. A query segment whose key segment is empty
(e.g. an all-masked prompt) gets zeros.

Backends, all equal up to float rounding:
  "loop"  one F.scaled_dot_product_attention per run of consecutive segments of equal query length (keys of unequal
          length, e.g. prompts, padded and masked; fastest portable path on CPU, see bench/dit.py); on the CPU in
          bf16/fp16, short segments (images, text) as explicit matmuls
  "mask"  one SDPA call with a block-diagonal boolean mask (the reference; memory quadratic in the packed length)
  "flex"  torch flex_attention with a document-mask BlockMask (wrap in torch.compile to make it fast; GPU)
  "flash" flash_attn_varlen_func (CUDA, flash-attn installed, fp16/bf16)
The default picks "flash" where it can run, else "loop".
"""

import itertools

import torch
import torch.nn.functional as F
from einops import rearrange

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

BACKENDS = ("loop", "mask", "flex", "flash")
# On the CPU in bf16, PyTorch's SDPA kernel is slower than two matmuls and a softmax when the score matrix is small
# (2 cores, forward + backward, 4 heads of 48: 24 images of 64 tokens 8.9 vs 1.9 ms; 576 tokens 6.2 vs 4.4 ms;
# 1152 tokens 13.8 vs 18.8 ms): below this many scores per head, "loop" takes the matmuls.
CPU_MATMUL_SCORES = 600 * 600


def default_backend(q: torch.Tensor) -> str:
    flash_ok = flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
    return "flash" if flash_ok else "loop"


def packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k=None, backend: str | None = None) -> torch.Tensor:
    """q: (N, heads, head_dim); k, v: (M, heads, head_dim); cu_seqlens_*: (B+1,) offsets of the segments, as ints
    (what compiled callers pass: torch.compile traces through them, where reading a tensor's values breaks the
    graph) or an int tensor (read once; on the CPU that needs no device sync). Returns (N, heads, head_dim)."""
    if torch.is_tensor(cu_seqlens_q) and torch.compiler.is_compiling():  # outside the graph: see below
        return _eager_packed_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, backend)
    cu_q = cu_seqlens_q.tolist() if torch.is_tensor(cu_seqlens_q) else list(cu_seqlens_q)
    cu_k = cu_q if cu_seqlens_k is None else cu_seqlens_k.tolist() if torch.is_tensor(cu_seqlens_k) \
        else list(cu_seqlens_k)
    if q.ndim != 3 or k.shape != v.shape or k.ndim != 3 or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (N, heads, dim) and k, v (M, heads, dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"{len(cu_q) - 1} query segments but {len(cu_k) - 1} key segments")
    backend = backend or default_backend(q)
    if backend == "loop":
        return _loop(q, k, v, cu_q, cu_k)
    if backend in ("mask", "flex", "flash"):
        fn = {"mask": _mask, "flex": _flex, "flash": _flash}[backend]
        return fn(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k))
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


# Called from compiled code with tensor offsets (graphs compiled with dynamic shapes), packed_attention runs outside the
# graph, one clean graph break: traced, the segment structure would specialize the graph (see VideoDiT.compile_blocks)
_eager_packed_attention = torch.compiler.disable(packed_attention)


def _loop(q, k, v, cu_q: list[int], cu_k: list[int]):
    len_q = [b - a for a, b in zip(cu_q[:-1], cu_q[1:])]
    len_k = [b - a for a, b in zip(cu_k[:-1], cu_k[1:])]
    runs = [(lq, [lk for _, lk in r]) for lq, r in itertools.groupby(zip(len_q, len_k), key=lambda p: p[0])]
    # split (not slicing): its backward writes the segments' gradients into one tensor
    parts = zip(q.split([lq * len(lks) for lq, lks in runs]), k.split([sum(lks) for _, lks in runs]),
                v.split([sum(lks) for _, lks in runs]))
    out = []
    for (lq, lks), (qi, ki, vi) in zip(runs, parts):
        if max(lks) == 0:
            out.append(torch.zeros_like(qi))
            continue
        # a run of equal query segments as one batched call; 4D (b, h, n, d): 3D inputs send CPU SDPA to its slow
        # math path, which saves the attention matrix
        n = len(lks)
        qi = rearrange(qi, "(b n) h d -> b h n d", b=n)
        if min(lks) == max(lks):
            o = _sdpa(qi, *(rearrange(x, "(b n) h d -> b h n d", b=n) for x in (ki, vi)))
        else:  # keys of unequal length (cross-attention to prompts): padded to the longest and masked
            lens = torch.tensor(lks).to(q.device, non_blocking=True)  # a blocking copy syncs a GPU, every block
            valid = torch.arange(max(lks), device=q.device) < lens[:, None]  # (b, L)
            index = torch.where(valid, (lens.cumsum(0) - lens)[:, None] + valid.cumsum(1) - 1, 0)
            ki, vi = (rearrange(x[index], "b l h d -> b h l d") for x in (ki, vi))
            empty = lens == 0  # no keys: attend to anything (finite) and zero the result
            o = _sdpa(qi, ki, vi, (valid | empty[:, None])[:, None, None, :])
            o = torch.where(empty[:, None, None, None], torch.zeros((), dtype=o.dtype, device=o.device), o)
        out.append(rearrange(o, "b h n d -> (b n) h d"))
    return torch.cat(out) if len(out) > 1 else out[0]


def _sdpa(q, k, v, mask=None):
    """(b, h, n, d) attention, optionally with a boolean key mask broadcastable to (b, h, n, m); see
    CPU_MATMUL_SCORES."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and \
            q.shape[-2] * k.shape[-2] <= CPU_MATMUL_SCORES:
        scores = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(-1).to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _segment_ids(cu_seqlens, device):
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), cu.diff())  # (N,)


def _zero_empty(out, cu_q, cu_k):
    """Zero the rows of query segments whose key segment is empty (no keys: attend to nothing)."""
    seg_q = _segment_ids(cu_q, out.device)
    has_keys = cu_k.to(device=out.device).diff() > 0  # (B,)
    return torch.where(has_keys[seg_q][:, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


def _mask(q, k, v, cu_q, cu_k):
    mask = _segment_ids(cu_q, q.device)[:, None] == _segment_ids(cu_k, q.device)[None, :]  # (N, M) block diagonal
    qh, kh, vh = (rearrange(x, "n h d -> 1 h n d") for x in (q, k, v))
    out = rearrange(F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask), "1 h n d -> n h d")
    return _zero_empty(out, cu_q, cu_k)


def _flex(q, k, v, cu_q, cu_k):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg_q, seg_k = _segment_ids(cu_q, q.device), _segment_ids(cu_k, q.device)

    def same_segment(b, h, q_idx, kv_idx):
        return seg_q[q_idx] == seg_k[kv_idx]

    block_mask = create_block_mask(same_segment, None, None, q.shape[0], k.shape[0], device=q.device)
    qh, kh, vh = (rearrange(x, "n h d -> 1 h n d") for x in (q, k, v))
    out = rearrange(flex_attention(qh, kh, vh, block_mask=block_mask), "1 h n d -> n h d")
    return _zero_empty(out, cu_q, cu_k)


def _flash(q, k, v, cu_q, cu_k):
    if flash_attn_varlen_func is None:
        raise RuntimeError("attention backend 'flash' needs flash-attn installed (pip install flash-attn)")
    max_q, max_k = int(cu_q.diff().max()), int(cu_k.diff().max())  # CPU tensors: no device sync
    cu_q, cu_k = (c.to(device=q.device, dtype=torch.int32) for c in (cu_q, cu_k))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)
    return _zero_empty(out, cu_q, cu_k)
