"""Token geometry of the DiT: timestep sinusoids, 2-D positions (RoPE / sin-cos) and patching.

Pure functions of shapes and coordinates, shared by every stage of cdc.nn.model.DiT.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

FREQ_DIM = 256  # sinusoid size for the timestep and resolution embeddings (DiT)
ROPE_BASE = 100.0  # grids span <= a few hundred units, so wavelengths 2*pi..2*pi*100 cover them
SINCOS_BASE = 10000.0


def sinusoid(x: Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> Tensor:
    """DiT sinusoidal embedding of a float vector: (B,) -> (B, dim) = [cos(x w), sin(x w)]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def grid_coords(g: int, final_grid: int, units: str, device: torch.device | None = None) -> Tensor:
    """(g*g, 2) float64 (y, x) coordinates of a g x g token grid, row-major.

    "final": token (i, j) covers pixels [i, i+1) * G/g of the final G x G grid, so its centre is
    ((i + 0.5) G/g, (j + 0.5) G/g) at every stage. "native": (i, j).
    """
    i = torch.arange(g, device=device, dtype=torch.float64)
    if units == "final":
        i = (i + 0.5) * (final_grid / g)
    yy, xx = torch.meshgrid(i, i, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)


def rope_table(coords: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """Axial 2-D rotary factors: cos, sin of shape (N, 1, head_dim), float32, one per head dim.

    The first half of each head's dims is rotated by y, the second half by x; within each half,
    dim j pairs with dim j + head_dim // 4 (rotate-half convention), so both dims of a pair carry
    the same angle: the table is laid out (axis, half, F) like the head dims themselves.
    """
    nf = head_dim // 4
    freqs = ROPE_BASE ** (-torch.arange(nf, device=coords.device, dtype=torch.float64) / nf)  # (F,)
    theta = coords[:, :, None] * freqs  # (N, 2, F)
    theta = theta[:, :, None].expand(-1, 2, 2, nf).reshape(-1, 1, head_dim)  # (N, 1, Dh)
    return torch.cos(theta).float(), torch.sin(theta).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (T, H, Dh) by per-token factors cos/sin (T, 1, Dh) from rope_table; math in float32.

    Each pair (a, b) becomes (a cos - b sin, b cos + a sin), written as x cos + (-b, a) sin: two
    whole-tensor products instead of four on strided halves (about half the time, forward and
    backward, on CPU), and bit for bit the same numbers.
    """
    T, H, Dh = x.shape
    xf = x.float()
    a, b = xf.view(T, H, 2, 2, Dh // 4).unbind(3)  # (T, H, axis, F) each
    rot = torch.stack([-b, a], dim=3).view(T, H, Dh)  # (T, H, axis, half, F) -> (T, H, Dh)
    return (xf * cos + rot * sin).to(x.dtype)


def sincos_table(coords: Tensor, width: int) -> Tensor:
    """2-D sin-cos position embedding (N, width) float32: first half from y, second half from x."""
    nf = width // 4
    omega = SINCOS_BASE ** (-torch.arange(nf, device=coords.device, dtype=torch.float64) / nf)  # (F,)
    ang = coords[:, :, None] * omega  # (N, 2, F)
    emb = torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)  # (N, 2, 2F)
    return emb.reshape(coords.shape[0], width).float()


def patchify(x: Tensor, p: int) -> Tensor:
    """(B, C, r, r) -> (B * g * g, p * p * C) tokens, row-major over the g x g grid."""
    B, C, r, _ = x.shape
    g = r // p
    x = x.reshape(B, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (B, g, g, p, p, C)
    return x.reshape(B * g * g, p * p * C)


def unpatchify(t: Tensor, B: int, C: int, r: int, p: int) -> Tensor:
    """Inverse of patchify: (B * g * g, p * p * C) -> (B, C, r, r)."""
    g = r // p
    t = t.reshape(B, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
    return t.reshape(B, C, r, r)
