"""3D rotary position embedding over (t, h, w), computed from per-token coordinates so it works on packed sequences.

The head dimension is split into rotation pairs between the axes, Wan-like: h and w get 2*(head_dim//6) dims each,
t gets the rest (head_dim - 4*(head_dim//6)). Each axis uses its own frequency ladder theta^(-2i/d_axis).

With `base_grid=(T0, H0, W0)`, each sample's positions are scaled by base/actual per axis, so that every sample
spans the extent of the training grid (fractional positions, as LTX-Video): a model trained at one grid then sees
familiar position ranges at other resolutions and durations.
"""

import torch
from torch import nn


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """(d_t, d_h, d_w), each even, summing to head_dim."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"3D RoPE needs an even head_dim >= 6, got {head_dim}")
    d_hw = 2 * (head_dim // 6)
    return head_dim - 2 * d_hw, d_hw, d_hw


class RoPE3D(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0, base_grid=None):
        super().__init__()
        self.dims = axis_dims(head_dim)
        self.base_grid = tuple(base_grid) if base_grid is not None else None
        inv_freqs = [theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d) for d in self.dims]
        self.register_buffer("inv_freq", torch.cat(inv_freqs).float(), persistent=False)  # (head_dim/2,)
        self.register_buffer("axis", torch.cat([torch.full((d // 2,), a) for a, d in enumerate(self.dims)]),
                             persistent=False)  # (head_dim/2,) which axis each pair rotates with

    def forward(self, coords: torch.Tensor, grids: torch.Tensor | None = None) -> torch.Tensor:
        """coords: (N, 3) integer; grids: (N, 3) each token's sample grid (needed with base_grid).
        Returns the rotations as (cos, sin) of each pair's angle: (N, head_dim/2, 2) float32."""
        pos = coords.float()
        if self.base_grid is not None:
            if grids is None:
                raise ValueError("RoPE3D with base_grid needs each token's sample grid")
            pos = pos * (torch.tensor(self.base_grid, device=pos.device) / grids.float())
        angles = pos[:, self.axis] * self.inv_freq  # (N, head_dim/2)
        return torch.stack([angles.cos(), angles.sin()], -1)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """x: (N, heads, head_dim), consecutive pairs (a, b) rotated in float32; rot: (N, head_dim/2, 2) from RoPE3D,
    not differentiated. Autograd keeps only rot for backward, nothing of x."""
    if torch.compiler.is_compiling():
        return rope_real(x, rot)
    # eager: one complex multiply, about 6x faster forward + backward on CPU than the real form
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * torch.view_as_complex(rot)[:, None]).flatten(-2).to(x.dtype)


def rope_real(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """apply_rope in real numbers, which inductor fuses into its neighbours (it has no code for complex ones)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (N, heads, head_dim/2) each
    cos, sin = rot[:, None, :, 0], rot[:, None, :, 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], -1).flatten(-2).to(x.dtype)
