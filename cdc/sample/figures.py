"""Pictures from samples: uint8 conversion, class-row grids and the stage-by-stage view of paper Fig. 9.

Everything here works on uint8 NHWC numpy arrays (what the PNGs and the npz hold), so a figure made
after a resumed job is identical to one made after an uninterrupted job.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_uint8(x: Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, C) via round((x.clamp(-1, 1) + 1) * 127.5)."""
    x = (x.detach().float().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def rgb(img: np.ndarray) -> np.ndarray:
    """(H, W, C) with C in {1, 3} -> (H, W, 3)."""
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


def upsample(img: np.ndarray, side: int) -> np.ndarray:
    """Nearest upsampling of (h, w, C) to (side, side, C) by an integer factor."""
    f = side // img.shape[0]
    return img.repeat(f, axis=0).repeat(f, axis=1)


def tile(rows: list[list[np.ndarray]], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Lay out equal-size (h, w, 3) tiles row by row with `pad` pixels of `fill` between and around them."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((pad + len(rows) * (h + pad), pad + ncol * (w + pad), 3), fill, np.uint8)
    for i, row in enumerate(rows):
        for j, t in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = t
    return out


# grid() reads at most this many leading images (64, or 16 cycling classes x 8 columns), so a
# caller with 50k images on disk passes only these
GRID_IMAGES = 128


def grid(images: np.ndarray, labels: np.ndarray, max_images: int = 64, min_tile: int = 64) -> np.ndarray:
    """Sample grid (H', W', 3) from uint8 (N, H, W, C) images and their (N,) labels.

    `images` may be only the first min(N, max(max_images, GRID_IMAGES)) of them: the layout
    depends on the labels, and reads no image beyond those.

    When the labels cycle through c <= 16 distinct classes (``--classes``), each row holds one class
    and its columns are successive samples of it (max(8, max_images // c) of them); otherwise the
    first `max_images` images fill rows of 8.
    Images smaller than `min_tile` are enlarged (nearest, integer factor) so 32-px samples stay visible.
    """
    n = len(labels)
    side = images.shape[1]
    c = len(dict.fromkeys(labels.tolist()))  # distinct classes in first-seen order
    cycling = 1 < c <= 16 and n >= 2 * c and bool((labels == labels[np.arange(n) % c]).all())
    cols = min(n // c, max(8, max_images // c)) if cycling else 0
    images = images[: max(max_images, c * cols)]  # both layouts below index only these
    if side < min_tile:
        images = np.stack([upsample(im, side * -(-min_tile // side)) for im in images])
    if cycling:
        rows = [[rgb(images[j + q * c]) for q in range(cols)] for j in range(c)]
    else:
        m = min(n, max_images)
        ncol = min(8, m)
        rows = [[rgb(images[i]) for i in range(r, min(r + ncol, m))] for r in range(0, m, ncol)]
    return tile(rows)


def _signed(d: np.ndarray) -> np.ndarray:
    """Signed float detail -> uint8 with 0 at mid-grey, stretched so its largest magnitude reaches 0/255."""
    s = float(np.abs(d).max())
    d = d / s if s > 0 else d
    return np.clip(np.round((d + 1) * 127.5), 0, 255).astype(np.uint8)


def stage_rows(stages: list[np.ndarray], min_tile: int = 128) -> list[list[np.ndarray]]:
    """The two rows of paper Fig. 9 for one image from its per-stage outputs (h_k, w_k, C) uint8.

    Row 1: every stage's output, nearest-upsampled to the final side. Row 2: the detail each stage
    added, x_k - U(x_{k-1}) (stage 1: x_1 itself), each stretched to full contrast so fine-stage
    detail is visible. Tiles are enlarged by an integer factor to at least `min_tile` pixels.
    """
    side = stages[-1].shape[0]
    show = side * max(1, -(-min_tile // side))  # ceil to an integer multiple of the final side
    outs, details = [], []
    prev = None
    for s in stages:
        x = s.astype(np.float32) / 127.5 - 1.0  # back to [-1, 1]
        d = x if prev is None else x - upsample(prev, x.shape[0])
        outs.append(rgb(upsample(s, show)))
        details.append(rgb(upsample(_signed(d), show)))
        prev = x
    return [outs, details]


def stage_figure(stages: list[np.ndarray], min_tile: int = 128) -> np.ndarray:
    """One image's Fig. 9 panel (two rows, one column per stage) as uint8 (H', W', 3)."""
    return tile(stage_rows(stages, min_tile))


def stages_figure(per_image: list[list[np.ndarray]], min_tile: int = 128) -> np.ndarray:
    """Fig. 9 for several images stacked vertically (two rows per image, a wider gap between images)."""
    panels = [stage_figure(stages, min_tile) for stages in per_image]
    gap = np.full((6, panels[0].shape[1], 3), 255, np.uint8)
    return np.concatenate([p for panel in panels for p in (panel, gap)][:-1])
