"""Resolution operators of Sec. 3.1: box downsampling D, nearest upsampling U, composite D_to.

D averages each 2x2 block, U copies each pixel into a 2x2 block, so D(U(x)) = x exactly and
D_to(x, r) = D applied log2(side / r) times = one avg_pool2d with kernel side / r (transitive).
All functions take (B, C, H, W) or (C, H, W) tensors with square H = W.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _batched(x: Tensor) -> tuple[Tensor, bool]:
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    return x, False


def down(x: Tensor) -> Tensor:
    """D: (B, C, H, W) -> (B, C, H/2, W/2), each output pixel the mean of a 2x2 block."""
    return down_to(x, x.shape[-1] // 2)


def up(x: Tensor) -> Tensor:
    """U: (B, C, H, W) -> (B, C, 2H, 2W), each pixel replicated into a 2x2 block."""
    xb, squeeze = _batched(x)
    y = xb.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    return y[0] if squeeze else y


def up_to(x: Tensor, side: int) -> Tensor:
    """Composite nearest upsampling to `side` (a power-of-two multiple of the input side)."""
    f = side // x.shape[-1]
    if f * x.shape[-1] != side or f & (f - 1):
        raise ValueError(f"cannot upsample side {x.shape[-1]} to {side}: need a power-of-two factor")
    xb, squeeze = _batched(x)
    y = xb.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1) if f > 1 else xb
    return y[0] if squeeze else y


def down_to(x: Tensor, side: int) -> Tensor:
    """D_{K->k}: box-average to `side`; one pooling with kernel H/side equals repeated D."""
    h = x.shape[-1]
    f = h // side
    if side < 1 or f * side != h or f & (f - 1) or x.shape[-2] != h:
        raise ValueError(f"cannot box-downsample a {tuple(x.shape[-2:])} image to side {side}")
    if f == 1:
        return x
    xb, squeeze = _batched(x)
    # pool uint8 / half inputs in float32 so they average exactly; keep float32/64 as they are
    work = xb if xb.dtype in (torch.float32, torch.float64) else xb.float()
    y = F.avg_pool2d(work, kernel_size=f, stride=f)
    y = y.to(x.dtype) if x.is_floating_point() else y
    return y[0] if squeeze else y


def coarse_prior_mean(x1: Tensor) -> Tensor:
    """m_k(x1) = U(D(x1)) of eq. 9: the detail-free version of x1 at its own side."""
    return up(down(x1))


def levels(x: Tensor, sides: list[int]) -> list[Tensor]:
    """Box pyramid of `x` at every side in `sides` (coarse first): x1^(k) = D_{K->k}(x)."""
    return [down_to(x, s) for s in sides]


def aligned_crop_offset(
    full: int, crop: int, align: int, generator: torch.Generator | None = None, random: bool = True
) -> tuple[int, int]:
    """Top-left (y, x) of a `crop`-sized window inside a `full`-sized image, both multiples of `align`.

    Offsets that are multiples of 2^(K-1) make the crop of a precomputed level equal the box
    downsampling of the full-resolution crop, so stage targets stay exact under augmentation.
    `random=False` gives the centre window (rounded down to the grid).
    """
    if crop > full:
        raise ValueError(f"crop {crop} larger than image {full}")
    n = (full - crop) // align  # number of aligned positions beyond 0
    if not random:
        return (n // 2) * align, (n // 2) * align
    oy, ox = torch.randint(0, n + 1, (2,), generator=generator).tolist()
    return oy * align, ox * align


def crop_levels(
    levels_: list[Tensor], crop_sides: list[int], offset: tuple[int, int], full_side: int
) -> list[Tensor]:
    """Crop every level at the same image region: level of side s takes offset * s / full_side.

    `levels_[i]` has side full_side * crop_sides[i] / crop_sides[-1]; offsets must be aligned so
    that the scaled offset is an integer at every level (see aligned_crop_offset).
    """
    out = []
    top = crop_sides[-1]
    for lv, cs in zip(levels_, crop_sides):
        s = lv.shape[-1]
        if s * top != full_side * cs:
            raise ValueError(f"level side {s} does not match crop side {cs} of a {full_side}-px image")
        num = offset[0] * s, offset[1] * s
        if num[0] % full_side or num[1] % full_side:
            raise ValueError(f"offset {offset} is not aligned for level side {s}")
        oy, ox = num[0] // full_side, num[1] // full_side
        out.append(lv[..., oy : oy + cs, ox : ox + cs])
    return out
