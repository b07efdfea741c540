"""Detail-sensitive distances between image sets: what a classifier's features mostly miss.

A class judge (cdc.eval.fmnist, Inception) sees shape and class; the fine detail of a coarse-to-fine
model is made by its last stage alone and barely moves such a figure. Two weight-free measures of
the finest octave (the frequencies a half-resolution image cannot hold):

- `spec_hf`: RMS over the top octave (0.25 .. 0.5 cycles/px) of the log ratio of the two sets'
  radially averaged power spectra. Blur lowers that band, noise raises it, bicubic upscaling from
  half resolution nearly empties it; `blur_px` reads the same log ratio as the Gaussian blur
  (sigma in px; negative: sharper or noisier than the reference) that would explain it, since a
  blur of sigma multiplies power at frequency f by exp(-4 pi^2 sigma^2 f^2).
- `swd_fine`: sliced Wasserstein distance between 7x7 patches of the finest Laplacian band (the
  finest level of cdc.eval.swd's pyramid), normalised by the reference's per-coordinate mean and
  std: the whole distribution of local detail, not only its power.

bin/calibrate-detail measures both against blur, bicubic upscaling and noise, and against the
spread between disjoint real sets (docs/tune.md). Images are float (N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cdc.eval.swd import laplacian_pyramid, sliced_wasserstein

PATCH = 7  # side of the finest-band patches (px), as cdc.eval.swd
PER_IMAGE = 32  # patches drawn per image


@dataclass
class DetailReference:
    """What the distances need of the reference set, computed once."""

    n: int  # reference images
    log_power: np.ndarray  # (R,) log radially averaged power, R = side // 2 + 1 radii
    patches: np.ndarray  # (n * PER_IMAGE, C * PATCH * PATCH) finest-band patches
    mean: np.ndarray  # (C * PATCH * PATCH,) the patches' per-coordinate mean and std
    std: np.ndarray


def radial_log_power(x: torch.Tensor) -> np.ndarray:
    """(N, C, S, S) -> (S // 2 + 1,) log of the set's mean power at integer radius r (r / S cycles/px)."""
    n, c, s, s2 = x.shape
    if s != s2:
        raise ValueError(f"detail metrics need square images, got {s}x{s2}")
    x = x.double() - x.double().mean(dim=(2, 3), keepdim=True)  # the DC term says nothing of detail
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=(0, 1)) / (s * s)  # (S, S)
    f = torch.fft.fftfreq(s, d=1.0 / s).double()  # integer frequencies
    r = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).round().long()  # (S, S)
    keep = r <= s // 2  # the corners beyond Nyquist have no full ring
    sums = torch.zeros(s // 2 + 1, dtype=torch.float64).index_add_(0, r[keep], power[keep])
    counts = torch.bincount(r[keep], minlength=s // 2 + 1).double()
    return torch.log(sums / counts + 1e-12).numpy()


def _top_octave(side: int) -> np.ndarray:
    """Radii of the finest octave, side/4 .. side/2 (what a half-resolution image cannot hold)."""
    return np.arange(side // 4, side // 2 + 1)


def fine_patches(x: torch.Tensor, seed: int, start: int = 0) -> np.ndarray:
    """PER_IMAGE random 7x7 patches of the finest Laplacian band of each image; image i's positions
    come from (seed, start + i), so a set's patches do not depend on how it is batched."""
    band = laplacian_pyramid(x.float(), min_side=x.shape[-1] // 2)[0]  # (N, C, S, S)
    s = band.shape[-1]
    pos = np.stack(
        [
            np.random.default_rng([seed, start + i]).integers(0, s - PATCH + 1, (PER_IMAGE, 2))
            for i in range(len(x))
        ]
    )  # (N, P, 2)
    win = band.unfold(2, PATCH, 1).unfold(3, PATCH, 1)  # (N, C, s-6, s-6, 7, 7)
    bi = np.arange(len(x))[:, None]
    d = win.permute(0, 2, 3, 1, 4, 5)[bi, pos[..., 0], pos[..., 1]]  # (N, P, C, 7, 7)
    return d.reshape(-1, d.shape[2] * PATCH * PATCH).numpy()


def detail_reference(x: torch.Tensor, seed: int = 0) -> DetailReference:
    """The reference statistics of real images x (N, C, S, S) in [-1, 1]."""
    if len(x) < 2:
        raise ValueError(f"a detail reference needs at least 2 images, got {len(x)}")
    p = fine_patches(x, seed + 1)  # other positions than the samples' (seed) draw
    return DetailReference(
        n=len(x), log_power=radial_log_power(x), patches=p, mean=p.mean(0), std=p.std(0) + 1e-6
    )


def equivalent_blur(log_ratio: np.ndarray, radii: np.ndarray, side: int) -> float:
    """The Gaussian sigma (px) whose transfer exp(-4 pi^2 sigma^2 f^2) best fits log_ratio (least
    squares over radii); negative sigma (-sqrt of -sigma^2) when the set has more power than real."""
    a = 4 * math.pi**2 * (radii / side) ** 2
    s2 = -float(np.dot(log_ratio, a) / np.dot(a, a))
    return math.copysign(math.sqrt(abs(s2)), s2)


def detail_scores(ref: DetailReference, x: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """spec_hf, blur_px and swd_fine of images x (N, C, S, S) in [-1, 1] against `ref`."""
    if len(x) < 2:
        raise ValueError(f"detail scores need at least 2 images, got {len(x)}")
    side = x.shape[-1]
    if len(ref.log_power) != side // 2 + 1:
        raise ValueError(f"reference is for {2 * (len(ref.log_power) - 1)}-px images, got {side} px")
    radii = _top_octave(side)
    log_ratio = (radial_log_power(x) - ref.log_power)[radii]
    p = fine_patches(x, seed)
    swd = sliced_wasserstein(
        (ref.patches - ref.mean) / ref.std, (p - ref.mean) / ref.std, seed=seed, device="cpu"
    )
    return {
        "spec_hf": float(np.sqrt(np.mean(log_ratio**2))),
        "blur_px": equivalent_blur(log_ratio, radii, side),
        "swd_fine": float(swd),
    }


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, S, S) blurred by a Gaussian of std `sigma` px, applied exactly in frequency (transfer
    exp(-2 pi^2 sigma^2 f^2), periodic borders): a sampled 3-sigma kernel blurs less than its sigma
    says below ~1 px, and `blur_px` reads this transfer back."""
    if sigma <= 0:
        return x.clone()
    fy = torch.fft.fftfreq(x.shape[-2], dtype=torch.float64)
    fx = torch.fft.fftfreq(x.shape[-1], dtype=torch.float64)
    h = torch.exp(-2 * math.pi**2 * sigma**2 * (fy[:, None] ** 2 + fx[None, :] ** 2))  # (S, S)
    return torch.fft.ifft2(torch.fft.fft2(x.double()) * h).real.to(x.dtype)


def bicubic_from(x: torch.Tensor, side: int) -> torch.Tensor:
    """Box-downsample (N, C, S, S) to `side` px and bicubic-upscale back to S (clamped to [-1, 1])."""
    small = F.avg_pool2d(x, x.shape[-1] // side)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round [-1, 1] images to the 256 levels a saved PNG (and `cdc sample`) holds."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1
