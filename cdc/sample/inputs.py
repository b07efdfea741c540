"""A user's image (or mask) in, a checked (C, side, side) tensor out, for `cdc upscale / vary / inpaint`.

Files open through the project's bounded decoder (cdc.data.imageproc.open_image: only the formats
cdc reads, a pixel limit checked from the header) and are cropped and resized exactly as `cdc
prepare` does (load_image: the centre square, Lanczos, in one pass), so an image enters the model as
its training data did. Every refusal is one line naming the file and what to do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cdc.data.imageproc import load_image, open_image

GREY_SPREAD = 3  # uint8 levels an RGB image's channels may differ by and still count as greyscale (JPEG)


@dataclass
class InputImage:
    """One input image, ready for the sampler."""

    name: str  # the file as given (messages, samples.json)
    pixels: Tensor  # (C, side, side) float in [-1, 1]
    size: tuple[int, int]  # the file's (width, height)
    note: str  # what was done to it: crop, resize, conversions


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header; refuses what cdc cannot read (one line naming the file)."""
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"{name}: no such file")
    with open_image(name) as im:
        return im.size


def pick_side(size: tuple[int, int], sides: list[int], name: str, side: int | None = None) -> int:
    """The side an image of `size` enters at: `side` if given (one of `sides`), else the largest of
    `sides` that fits inside its shorter edge (an image is never enlarged to enter)."""
    short = min(size)
    if side is not None:
        if side not in sides:
            raise ValueError(f"--side {side}: this model takes {', '.join(map(str, sides))} px here")
        fits = [side]
    else:
        fits = [s for s in sides if s <= short]
    if not fits or fits[-1] > short:
        raise ValueError(
            f"{name}: {size[0]}x{size[1]} is too small; this model needs at least {fits[-1] if fits else sides[0]} px "
            "on the shorter side here"
        )
    return fits[-1]


def read_image(path: str | Path, side: int, channels: int) -> InputImage:
    """The image at `side` x `side` (centre square, Lanczos, as `cdc prepare`), `channels` channels."""
    name = os.fspath(path)
    size = image_size(name)
    img, notes, reason = load_image(name, side)
    if img is None:
        raise ValueError(f"{name}: {reason}")
    arr = np.asarray(img)  # (side, side, 3) uint8: load_image always gives RGB
    if channels == 1:
        arr = _grey(arr, name, notes)
    elif channels != 3:
        raise ValueError(f"{name}: the model has {channels} channels; cdc reads images for 1 or 3")
    s = min(size)
    crop = f"centre {s}x{s} of {size[0]}x{size[1]}, " if size[0] != size[1] else ""
    how = "as is" if (s, s) == (side, side) else f"{crop}Lanczos {s} -> {side} px"
    note = ", ".join([how, *notes])
    return InputImage(name, _to_float(arr), size, note)


def _grey(arr: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    """(H, W, 3) -> (H, W, 1) for a greyscale model; a colour image is refused, not silently greyed."""
    spread = int((arr.max(2).astype(int) - arr.min(2)).max())  # largest channel difference, uint8 levels
    if spread > GREY_SPREAD:
        raise ValueError(
            f"{name}: a colour image, but the model is greyscale (1 channel); convert it first "
            "(e.g. PIL's image.convert('L')) or use an RGB model"
        )
    if "greyscale -> RGB" in notes:
        notes.remove("greyscale -> RGB")
    elif spread:
        notes.append("near-grey RGB -> greyscale")
    return np.asarray(Image.fromarray(arr).convert("L"))[..., None]


def _to_float(arr: np.ndarray) -> Tensor:
    """uint8 (H, W, C) -> float (C, H, W) in [-1, 1], the loader's x / 127.5 - 1."""
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 127.5 - 1.0  # a writable copy


def read_mask(path: str | Path, image: InputImage, side: int) -> Tensor:
    """The mask at `side` as bool (1, side, side), True where pixels are to be generated.

    The mask must have the image's size; it is cropped like the image (centre square) and box-
    averaged to `side`, and a pixel any part of which was masked (non-black) counts as masked.
    """
    name = os.fspath(path)
    size = image_size(name)
    if size != image.size:
        raise ValueError(
            f"{name}: the mask is {size[0]}x{size[1]} but {image.name} is {image.size[0]}x{image.size[1]}; "
            "give a mask of the image's size (white = generate, black = keep)"
        )
    with open_image(name) as im:
        im.load()
        grey = im.convert("L")
    w, h = size
    s = min(w, h)
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)  # the crop load_image takes
    small = grey.resize((side, side), Image.BOX, box=box) if (w, h) != (side, side) else grey
    masked = torch.from_numpy(np.asarray(small) > 0)[None]  # (1, side, side)
    if not masked.any():
        raise ValueError(
            f"{name}: the mask is all black (nothing to generate); white marks the region to fill"
        )
    return masked


def from_tensor(x: Tensor, channels: int, sides: list[int], what: str = "images") -> Tensor:
    """Python-API input: (N, C, r, r) uint8 (0..255) or float in [-1, 1], r one of `sides` -> float."""
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what}: need a (N, C, r, r) tensor, got {got}")
    if x.shape[1] != channels:
        raise ValueError(f"{what}: the model has {channels} channel(s), the images {x.shape[1]}")
    if x.shape[-1] not in sides:
        raise ValueError(
            f"{what}: side {x.shape[-1]} is not one this model takes here ({', '.join(map(str, sides))})"
        )
    return x.float() / 127.5 - 1.0 if x.dtype == torch.uint8 else x.float()
