"""Evaluation maths: FID / IS / improved precision-recall (ADM protocol) on feature arrays.

Reference files and `cdc score` (per-stage FID, reference .npz, ADM references) are in
cdc.eval.scoring, which calls these. Inception features go through cdc.eval.inception (the FID graph); the
metric maths is in plain numpy / torch:
  * FID: Frechet distance of Gaussians fitted to pool3 features (scipy sqrtm, eps offset fallback).
  * IS: exp(E KL(p(y|x) || p(y))) on the 1008-way softmax, mean and std over 10 splits.
  * precision / recall: Kynkaanniemi et al. 2019 as in ADM's evaluator; a point is inside a set's
    manifold if it lies within the k=3-NN radius of some point of that set. Distances are computed
    in row x column blocks (torch.cdist on the chosen device), so 50k x 50k never materialises.
  * SWD (cdc.eval.swd): sliced Wasserstein distance between Laplacian-pyramid patch descriptors.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

from cdc.eval.evalio import resolve_device, to_float

VERSIONS = {
    "fid": "cdc-fid-2: pool3 2048-d, TF-graph input (legacy bilinear, (x-128)/128), scipy sqrtm",
    "is": "cdc-is-1: 1008-way softmax, 10 splits",
    "pr": "cdc-pr-1: ADM/Kynkaanniemi manifolds, k=3, euclidean pool3",
    "swd": "cdc-swd-1: 5-tap Laplacian pyramid, 7x7 patches, ref-normalised, 4 x 128 directions",
    "reference": "cdc-ref-1",
}
ALL_METRICS = ("fid", "is", "pr", "swd")


# ----------------------------------------------------------------------------- statistics


def inception_features(
    model: torch.nn.Module,
    batches: Iterator[np.ndarray],
    total: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Run Inception over uint8 batches; returns pool3 (N, 2048) and logits (N, 1008), float32."""
    pools, logits = [], []
    with torch.inference_mode(), tqdm(total=total, desc="inception", unit="img", disable=not progress) as bar:
        for b in batches:
            p, lg = model(to_float(b, device))
            pools.append(p.float().cpu().numpy())
            logits.append(lg.float().cpu().numpy())
            bar.update(len(b))
    return np.concatenate(pools), np.concatenate(logits)


def gaussian_stats(feats: np.ndarray, what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in float64; needs at least 2 rows."""
    if len(feats) < 2:
        raise ValueError(f"{what}: {len(feats)} image(s) is too few for a covariance; FID needs at least 2")
    f = feats.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Dowson & Landau 1982)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(
            f"feature dims differ: mean {mu1.shape} vs {mu2.shape}, covariance {s1.shape} vs {s2.shape}"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products are handled just below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # singular product (e.g. fewer samples than dims): regularise both covariances slightly
        off = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        # round-off gives tiny imaginary parts; large ones mean the inputs are not covariances
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has imaginary part {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, std) over `splits` equal splits."""
    n = len(logits)
    if n < splits:
        raise ValueError(f"{n} samples is too few for an Inception Score over {splits} splits")
    p = torch.from_numpy(np.asarray(logits, np.float64)).softmax(-1).numpy()
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(py + 1e-30))).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _knn_radii(x: torch.Tensor, k: int, rows: int, cols: int) -> torch.Tensor:
    """Distance of each row of x to its k-th nearest other row, in (rows x cols) blocks."""
    n = len(x)
    out = torch.empty(n, device=x.device)
    for i in range(0, n, rows):
        best = None  # (r, k+1) smallest distances so far; the point itself is the 0-th
        for j in range(0, n, cols):
            d = torch.cdist(x[i : i + rows], x[j : j + cols])  # (r, c)
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        out[i : i + rows] = best[:, k]
    return out


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, rows: int, cols: int) -> float:
    """Fraction of query rows inside some support ball (|q - s_j| <= radii_j)."""
    inside = torch.zeros(len(query), dtype=torch.bool, device=query.device)
    for i in range(0, len(query), rows):
        for j in range(0, len(support), cols):
            d = torch.cdist(query[i : i + rows], support[j : j + cols])  # (r, c)
            inside[i : i + rows] |= (d <= radii[j : j + cols]).any(1)
    return inside.double().mean().item()


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = 3,
    batch: int = 10000,
    device: str | torch.device | None = None,
) -> tuple[float, float]:
    """Improved precision (fake inside real manifold) and recall (real inside fake manifold)."""
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} images per set, got {len(real)} and {len(fake)}"
        )
    dev = resolve_device(device)
    r = torch.as_tensor(np.asarray(real, np.float32), device=dev)
    f = torch.as_tensor(np.asarray(fake, np.float32), device=dev)
    r_rad, f_rad = _knn_radii(r, k, batch, batch), _knn_radii(f, k, batch, batch)
    return _coverage(f, r, r_rad, batch, batch), _coverage(r, f, f_rad, batch, batch)


class Moments:
    """Streaming mean / covariance in float64 (features shifted by the first batch's mean for accuracy)."""

    def __init__(self) -> None:
        self.n, self.shift, self.s, self.ss = 0, None, None, None

    def add(self, f: np.ndarray) -> None:
        f = f.astype(np.float64)
        if self.shift is None:
            self.shift = f.mean(0)
            self.s, self.ss = np.zeros_like(self.shift), np.zeros((f.shape[1], f.shape[1]))
        f = f - self.shift
        self.n += len(f)
        self.s += f.sum(0)
        self.ss += f.T @ f

    def stats(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"{what}: {self.n} image(s) is too few for a covariance; FID needs at least 2")
        m = self.s / self.n
        return self.shift + m, (self.ss - self.n * np.outer(m, m)) / (self.n - 1)
