"""What `cdc tune sampler` minimises: a class judge's Frechet distance plus a detail distance, each in
units of its own measurement noise so neither dominates.

    objective = (FD - FD_real) / sd(FD_real) + (SWD - SWD_real) / sd(SWD_real)

FD is the judge's feature Frechet distance (Fashion-MNIST: cdc.eval.fmnist); SWD is `swd_fine`, the
sliced Wasserstein distance of finest-band patches (cdc.eval.detail). X_real and sd(X_real) are the
mean and sample standard deviation of the figure over disjoint blocks of real held-out images of
the trial's size: each term counts how many block-to-block noise units a sampler lies above real
images, so a change in either term is weighed by how far it stands out of that metric's noise.
(Scaled by a 1-px blur of real images instead, the judge's term outweighs the detail term ~10:1
on the quickstart, as a classifier sees little detail; docs/tune.md.) bin/calibrate-detail and
docs/tune.md justify the choice of SWD and show the judge alone barely sees a 0.5-px blur.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc.eval import detail as D

# images (N, C, S, S) in [-1, 1] and their labels (N,) -> {"fd": ..., "accuracy": ...}
Semantic = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


@dataclass
class Objective:
    """A judge and the real images the objective is measured and calibrated against."""

    name: str  # which judge, recorded with every result
    semantic: Semantic
    detail_ref: D.DetailReference
    real: torch.Tensor  # (M, C, S, S) in [-1, 1]: held-out real images (not in detail_ref), calibration only
    real_labels: torch.Tensor  # (M,)

    def check_fits(self, channels: int, side: int, num_classes: int) -> None:
        """A one-line error when the run's images are not what this judge scores."""
        c, s = self.real.shape[1], self.real.shape[-1]
        if (channels, side) != (c, s) or num_classes > int(self.real_labels.max()) + 1:
            raise ValueError(
                f"the {self.name} scores {c}-channel {s}-px images of {int(self.real_labels.max()) + 1} classes; "
                f"this run makes {channels}-channel {side}-px images of {num_classes} classes"
            )


@dataclass
class Calibration:
    """The objective's normalisers at a trial size of n images."""

    n: int
    blocks: int  # disjoint real blocks of n images the means and sds come from
    fd_real: float
    fd_sd: float
    swd_real: float
    swd_sd: float
    fd_blur1: float  # the same for the first block blurred by 1 px: a scale to read the figures by
    swd_blur1: float
    blur_px_real: float  # the real blocks' mean equivalent blur: what "no blur" reads at n images

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(obj: Objective, images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Judge and detail figures of images (N, C, S, S) in [-1, 1] (already quantised as saved)."""
    return {**obj.semantic(images, labels), **D.detail_scores(obj.detail_ref, images, seed=seed)}


def calibrate(obj: Objective, n: int, blocks: int = 6, seed: int = 0) -> Calibration:
    """Mean and sd of the figures over `blocks` disjoint blocks of n real held-out images (fewer when
    the judge holds fewer, at least 2), and the figures of the first block blurred by 1 px."""
    blocks = min(blocks, len(obj.real) // n)
    if blocks < 2:
        raise ValueError(
            f"calibration needs 2 blocks of {n} held-out real images, the judge has {len(obj.real)}"
        )
    real = [measure(obj, D.quantise(obj.real[i * n : (i + 1) * n]), obj.real_labels[i * n : (i + 1) * n], seed + i)
            for i in range(blocks)]  # fmt: skip
    blur = measure(obj, D.quantise(D.gaussian_blur(obj.real[:n], 1.0)), obj.real_labels[:n], seed)

    def mean_sd(k: str) -> tuple[float, float]:
        v = np.array([r[k] for r in real])
        return float(v.mean()), float(v.std(ddof=1))

    (fd, fd_sd), (swd, swd_sd) = mean_sd("fd"), mean_sd("swd_fine")
    return Calibration(n, blocks, fd, fd_sd, swd, swd_sd, blur["fd"], blur["swd_fine"], mean_sd("blur_px")[0])


def combine(m: dict[str, float], cal: Calibration) -> dict[str, float]:
    """The two normalised terms and their sum (the module doc's formula)."""
    fd_term = (m["fd"] - cal.fd_real) / cal.fd_sd
    detail_term = (m["swd_fine"] - cal.swd_real) / cal.swd_sd
    return {"fd_term": fd_term, "detail_term": detail_term, "objective": fd_term + detail_term}


def fmnist_objective(clf: str | Path, ref_images: int = 2000) -> Objective:
    """The Fashion-MNIST judge (cdc.eval.fmnist, FD to the test split) and a detail reference of the
    first `ref_images` test images; the rest of the test split calibrates."""
    from cdc.eval import fmnist as E

    judge, info = E.load_or_train(clf, verbose=True)

    @torch.no_grad()
    def semantic(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        pred = E._batched(judge, x).argmax(1)
        return {"fd": E.fd_to_test(judge, info, x, "samples"), "accuracy": float((pred == y).float().mean())}

    x, y = E.load_split("test")
    return Objective(
        name=f"fmnist judge {Path(clf).name}", semantic=semantic, detail_ref=D.detail_reference(x[:ref_images]),
        real=x[ref_images:], real_labels=y[ref_images:],
    )  # fmt: skip
