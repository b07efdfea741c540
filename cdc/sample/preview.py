"""Previews: each stage's images handed to a callback (or written) as soon as the sampler makes them.

`Generator.sample(..., on_stage=f)`, `cdc sample --preview` and the diffusers pipeline's
callback_on_step_end all go through `stage_hook`: after stage k of a batch the callback gets a
StageImages record (its time is left out of the stage timings), and a tensor it returns replaces
that stage's output for the finer stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cdc.sample.figures import grid, to_uint8
from cdc.sample.outdir import write_png


@dataclass
class StageImages:
    """One stage's output for a batch, as a preview callback (`on_stage`) receives it."""

    stage: int  # 0-based stage index
    side: int  # its side in pixels
    indices: list[int]  # the image index of each row
    labels: list[int]  # each row's class
    x: torch.Tensor  # (B, C, side, side) float in [-1, 1], on the sampling device

    @property
    def images(self) -> torch.Tensor:
        """uint8 (B, C, side, side) on the CPU, rounded as `cdc sample`'s PNGs."""
        return torch.from_numpy(to_uint8(self.x)).permute(0, 3, 1, 2).contiguous()


# a preview callback: sees each stage's output as soon as it exists; a tensor it returns (same
# shape) replaces that output for the finer stages
OnStage = Callable[["StageImages"], "torch.Tensor | None"]


def stage_hook(sides, idx: list[int], labels: list[int], timer, on_stage: OnStage | None):
    """The sampler's on_stage for a batch of images `idx`: the timer (cdc.sample.generate.StageTimer),
    then the preview callback, whose time the timer leaves out."""
    if on_stage is None:
        return timer

    def hook(k: int, x: torch.Tensor) -> torch.Tensor | None:
        timer(k, x)
        t = time.perf_counter()
        try:
            return on_stage(StageImages(k, sides[k], list(idx), labels, x))
        finally:
            timer.exclude(t)

    return hook


def preview_writer(out: Path) -> OnStage:
    """--preview: preview/stage<k>.png, a grid of the batch at stage k, replaced atomically."""
    (out / "preview").mkdir(parents=True, exist_ok=True)

    def write(s: StageImages) -> None:
        write_png(out / "preview" / f"stage{s.stage}.png", grid(to_uint8(s.x), np.asarray(s.labels)))

    return write
