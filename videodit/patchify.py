"""Spacetime patches: latents (C, T, H, W) <-> tokens (N, C*pt*ph*pw) with integer (t, h, w) coordinates,
and patch n' pack (NaViT): samples of any shape end to end in one sequence, no padding.

Token order inside a sample is t-major, then h, then w. A token's features are ordered (c, pt, ph, pw).
"""

from dataclasses import dataclass

import torch
from einops import rearrange

DEFAULT_PATCH = (1, 2, 2)


@dataclass
class Packed:
    """A batch of samples packed into one sequence.

    tokens:     (N, C*pt*ph*pw)  all samples' tokens end to end
    coords:     (N, 3) long      (t, h, w) of each token in its sample's patch grid
    cu_seqlens: (B+1,) int32     token offsets of the samples, as flash-attn's varlen API takes them
    sample_idx: (N,) long        the sample each token belongs to
    grids:      B tuples         each sample's patch grid (T/pt, H/ph, W/pw)
    """

    tokens: torch.Tensor
    coords: torch.Tensor
    cu_seqlens: torch.Tensor
    sample_idx: torch.Tensor
    grids: list[tuple[int, int, int]]

    @property
    def seqlens(self) -> list[int]:
        return [t * h * w for t, h, w in self.grids]

    def frame_index(self, pt: int) -> torch.Tensor:
        """(N,) index of each token's (first) latent frame in the concatenation of all samples' latent frames."""
        frames = torch.tensor([g[0] * pt for g in self.grids]).to(self.coords.device, non_blocking=True)
        return (frames.cumsum(0) - frames)[self.sample_idx] + self.coords[:, 0] * pt

    def with_tokens(self, tokens: torch.Tensor) -> "Packed":
        """The same layout carrying other per-token features, e.g. the model's velocity."""
        if tokens.shape[0] != self.tokens.shape[0]:
            raise ValueError(f"expected {self.tokens.shape[0]} tokens, got {tokens.shape[0]}")
        return Packed(tokens, self.coords, self.cu_seqlens, self.sample_idx, self.grids)

    def twice(self) -> "Packed":
        """The batch followed by a copy of itself (2B samples): guidance's two passes in one call."""
        n, B = self.tokens.shape[0], len(self.grids)
        return Packed(torch.cat([self.tokens, self.tokens]), torch.cat([self.coords, self.coords]),
                      torch.cat([self.cu_seqlens, self.cu_seqlens[1:] + n]),
                      torch.cat([self.sample_idx, self.sample_idx + B]), self.grids * 2)


def check_patchable(shape, patch_size=DEFAULT_PATCH) -> tuple[int, int, int]:
    """The patch grid of a latent of shape (C, T, H, W); a clear error when a dim is not divisible."""
    if len(shape) != 4:
        raise ValueError(f"a latent must be (C, T, H, W), got shape {tuple(shape)}")
    if min(shape) < 1:
        raise ValueError(f"a latent must be (C, T, H, W) with every size >= 1, got shape {tuple(shape)}")
    grid = []
    for name, size, p in zip("THW", shape[1:], patch_size):
        if size % p:
            lower, upper = size // p * p, (size // p + 1) * p
            nearest = f"{lower} or {upper}" if lower else f"{upper}"
            raise ValueError(f"latent {name}={size} is not divisible by patch size {p} (shape {tuple(shape)}, "
                             f"patch {tuple(patch_size)}); nearest valid {name}: {nearest}")
        grid.append(size // p)
    return tuple(grid)


def grid_coords(grid, device=None) -> torch.Tensor:
    """(t, h, w) integer coordinates of a patch grid, t-major: (T*H*W, 3) long."""
    axes = [torch.arange(n, device=device) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def patchify(latent: torch.Tensor, patch_size=DEFAULT_PATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """latent: (C, T, H, W) -> tokens (N, C*pt*ph*pw), coords (N, 3) long."""
    grid = check_patchable(latent.shape, patch_size)
    pt, ph, pw = patch_size
    tokens = rearrange(latent, "c (t pt) (h ph) (w pw) -> (t h w) (c pt ph pw)", pt=pt, ph=ph, pw=pw)
    return tokens, grid_coords(grid, latent.device)


def unpatchify(tokens: torch.Tensor, grid, patch_size=DEFAULT_PATCH) -> torch.Tensor:
    """tokens: (N, C*pt*ph*pw) of one sample, t-major over `grid` -> latent (C, T, H, W)."""
    pt, ph, pw = patch_size
    t, h, w = grid
    if tokens.ndim != 2 or tokens.shape[0] != t * h * w or tokens.shape[1] % (pt * ph * pw):
        raise ValueError(f"expected tokens (N={t * h * w}, C*{pt * ph * pw}) for grid {tuple(grid)} and patch "
                         f"{tuple(patch_size)}, got {tuple(tokens.shape)}")
    return rearrange(tokens, "(t h w) (c pt ph pw) -> c (t pt) (h ph) (w pw)", t=t, h=h, w=w, pt=pt, ph=ph, pw=pw)


def pack(latents: list[torch.Tensor], patch_size=DEFAULT_PATCH) -> Packed:
    """A list of latents (C, T_i, H_i, W_i) of any shapes -> one Packed sequence, no padding."""
    if not latents:
        raise ValueError("pack needs at least one latent")
    channels = {x.shape[0] for x in latents if x.ndim == 4}
    if len(channels) > 1:
        raise ValueError(f"all latents must have the same channel count, got {sorted(channels)}")
    tokens, coords, grids = [], [], []
    for i, x in enumerate(latents):
        try:
            tok, xyz = patchify(x, patch_size)
        except ValueError as e:
            raise ValueError(f"latent {i}: {e}") from None
        tokens.append(tok)
        coords.append(xyz)
        grids.append(check_patchable(x.shape, patch_size))
    seqlens = torch.tensor([t.shape[0] for t in tokens])
    device = latents[0].device
    cu_seqlens = torch.nn.functional.pad(seqlens.cumsum(0), (1, 0)).int().to(device, non_blocking=True)
    sample_idx = torch.repeat_interleave(torch.arange(len(latents)), seqlens).to(device, non_blocking=True)
    return Packed(torch.cat(tokens), torch.cat(coords), cu_seqlens, sample_idx, grids)


def unpack(tokens: torch.Tensor, packed: Packed, patch_size=DEFAULT_PATCH) -> list[torch.Tensor]:
    """tokens: (N, C*pt*ph*pw) laid out as `packed` -> list of latents (C, T_i, H_i, W_i)."""
    if tokens.shape[0] != sum(packed.seqlens):
        raise ValueError(f"expected {sum(packed.seqlens)} tokens for grids {packed.grids}, got {tokens.shape[0]}")
    return [unpatchify(tok, grid, patch_size) for tok, grid in zip(tokens.split(packed.seqlens), packed.grids)]
