"""Where a training sample's crop lies and which stored level each stage reads, in pixels.

A block-aligned crop (offset a multiple of final/sides[0] pixels of the level the final stage
uses) and one horizontal flip are applied to the level a sample's stage decodes, so the stage
target equals D_to(crop of the top level, r_k) up to the uint8 rounding of the stored level
(DESIGN.md §3).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from cdc.data.imageproc import open_image


@dataclass
class Geometry:
    """Stored level per stage and the crop lattice: level side r_k * top / prepared side."""

    sides: list[int]  # flow.sides
    T: int  # side of the level the final stage reads (the expanded image, e.g. 288 for 256)
    need: list[int]  # stored level each stage decodes
    align: int  # crop offsets are multiples of this many pixels of level T
    full: bool | None  # aspect-ratio images (cdc prepare --crop full); None: unknown, read headers

    @classmethod
    def of(cls, sides: list[int], levels: list[int], prep_side: int | None, full: bool | None) -> Geometry:
        final, top = sides[-1], max(levels)
        prep = prep_side or final  # without a manifest, assume prepared at the final side
        need = [r * top / prep for r in sides]
        if any(n != int(n) or int(n) not in levels for n in need):
            raise ValueError(
                f"stage sides {sides} need stored levels {[int(n) if n == int(n) else n for n in need]} "
                f"but the shards hold {levels} (prepared at side {prep}); prepare with more --levels "
                f"or a matching --side"
            )
        return cls(list(sides), int(final * top / prep), [int(n) for n in need], final // sides[0], full)


def stage_of(t32: float, bounds32: list[float]) -> int:
    """Schedule.stage_of for one float32 time, without building tensors: the number of inner
    stage bounds (float32, as the tensor version compares them) at or below t."""
    return min(bisect.bisect_right(bounds32, t32), len(bounds32))


def crop_offset(g: Geometry, rng: np.random.Generator, level: bytes, k: int, box: int, random: bool) -> tuple[int, int]:
    """Top-left (y, x) of the final-side crop, in pixels of level T; multiples of g.align.

    The stored image may be T x T (centre square) or T x L at its aspect ratio (`cdc prepare
    --crop full`); its size comes from the header of the level stage k decodes anyway. Every
    aligned position is equally likely, so random crops cover the whole image (Table 7), and the
    same crop at every level is the exact box average of the final one.
    """
    if g.full is False:
        h = w = g.T
    else:
        scale = g.T // g.need[k]
        w, h = (x // box * scale for x in open_image(level, "a level image").size)  # box: jpeg-top's factor
    final = g.sides[-1]
    ny, nx = (h - final) // g.align, (w - final) // g.align
    # a square keeps the draw of the centre-square format
    pos = rng.integers(0, ny + 1, 2) if ny == nx else rng.integers(0, [ny + 1, nx + 1])
    if not random:
        pos = (ny // 2, nx // 2)
    return int(pos[0]) * g.align, int(pos[1]) * g.align


def crop_pixels(g: Geometry, body: bytes, box: int, k: int, offset: tuple[int, int], flip: bool) -> torch.Tensor:
    """One sample's crop of its stage's level, flipped as drawn: (C, r, r) uint8."""
    r, scale = g.sides[k], g.T // g.need[k]  # offsets are in T pixels; this level is T/scale
    im = open_image(body, "a level image")  # the formats cdc writes, a bounded pixel count
    a = np.asarray(im.reduce(box) if box > 1 else im)  # box > 1: a level of a jpeg-top shard
    oy, ox = offset[0] // scale, offset[1] // scale
    a = a[oy : oy + r, ox : ox + r]
    if a.shape[:2] != (r, r):
        raise ValueError(f"level is {im.size[0]}x{im.size[1]} px, too small for its crop")
    a = a[:, ::-1] if flip else a
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (H, W, C) -> (C, r, r)
    return torch.from_numpy(a.copy())  # copy: PIL's buffer is read-only
