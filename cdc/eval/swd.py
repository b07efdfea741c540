"""Sliced Wasserstein distance between Laplacian-pyramid patch descriptors (Karras et al. 2018).

Weight-free: random 7x7 patches of each band-pass level (finest first) are compared with the
sliced Wasserstein-1 distance after normalising both sets by the reference's per-coordinate mean
and std; one number per level and their mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cdc.eval.evalio import Images, resolve_device, to_float

_G5 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16  # binomial approximation of a Gaussian


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = (_G5[:, None] * _G5[None, :]).to(x).expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k, groups=x.shape[1])


def laplacian_pyramid(x: torch.Tensor, min_side: int = 16) -> list[torch.Tensor]:
    """Band-pass levels of (B, C, S, S), finest first; the last is the low-pass residual at >= min_side."""
    out = []
    while x.shape[-1] // 2 >= min_side:
        small = _blur(x)[..., ::2, ::2]
        up = F.interpolate(small, scale_factor=2, mode="nearest")
        out.append(x - _blur(up))  # blur after nearest-upsampling = smooth expansion
        x = small
    out.append(x)
    return out


def swd_descriptors(b: np.ndarray, start: int, per_image: int, seed: int, patch: int = 7) -> list[np.ndarray]:
    """Random 7x7 patches per Laplacian level of uint8 (B, S, S, 3); image i seeds (seed, lvl, start+i)."""
    x = to_float(b, torch.device("cpu")) * 2 - 1
    levels = laplacian_pyramid(x, min_side=min(16, x.shape[-1]))
    out = []
    for li, lv in enumerate(levels):
        s = lv.shape[-1]
        if s < patch:
            break
        pos = np.stack(
            [
                np.random.default_rng([seed, li, start + i]).integers(0, s - patch + 1, (per_image, 2))
                for i in range(len(b))
            ]
        )  # (B, P, 2)
        win = lv.unfold(2, patch, 1).unfold(3, patch, 1)  # (B, C, s-6, s-6, 7, 7)
        bi = np.arange(len(b))[:, None]
        d = win.permute(0, 2, 3, 1, 4, 5)[bi, pos[..., 0], pos[..., 1]]  # (B, P, C, 7, 7)
        out.append(d.reshape(-1, d.shape[2] * patch * patch).numpy())
    return out


def collect_descriptors(
    images: Images, batch: int, per_image: int, max_images: int, seed: int
) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = []
    seen = 0
    for b in images.batches(batch):
        b = b[: max_images - seen]
        for li, d in enumerate(swd_descriptors(b, seen, per_image, seed)):
            if li == len(parts):
                parts.append([])
            parts[li].append(d)
        seen += len(b)
        if seen >= max_images:
            break
    return [np.concatenate(p) for p in parts]


def sliced_wasserstein(
    a: np.ndarray, b: np.ndarray, dirs: int = 128, repeats: int = 4, seed: int = 0, device: str | None = None
) -> float:
    """Mean over `repeats` x `dirs` random unit directions of the 1-D Wasserstein-1 of the projections."""
    m = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    # equal counts make W1 a mean of sorted differences; subsample the larger set deterministically
    a = a[np.sort(rng.choice(len(a), m, replace=False))] if len(a) > m else a
    b = b[np.sort(rng.choice(len(b), m, replace=False))] if len(b) > m else b
    dev = resolve_device(device)
    ta, tb = (torch.as_tensor(np.asarray(x, np.float32), device=dev) for x in (a, b))
    total = 0.0
    for _ in range(repeats):
        v = torch.from_numpy(rng.standard_normal((a.shape[1], dirs)).astype(np.float32)).to(dev)
        v /= v.norm(dim=0, keepdim=True)
        pa, pb = ta @ v, tb @ v  # (m, dirs)
        if dev.type == "cpu":  # numpy's sort is ~3x faster than torch's on CPU
            diff = np.abs(np.sort(pa.numpy(), 0) - np.sort(pb.numpy(), 0)).mean()
        else:
            diff = (pa.sort(0).values - pb.sort(0).values).abs().mean().item()
        total += float(diff)
    return total / repeats


def swd_levels(
    ref_desc: list[np.ndarray],
    desc: list[np.ndarray],
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Per-level SWD, both sets normalised by the reference's per-coordinate mean and std."""
    if len(ref_desc) != len(desc):
        raise ValueError(f"pyramid depth differs: reference {len(ref_desc)} levels, samples {len(desc)}")
    vals = []
    for r, s in zip(ref_desc, desc, strict=True):
        # the reference stores float16 descriptors: quantise both sets alike so identical images give 0
        r, s = (x.astype(np.float16).astype(np.float32) for x in (r, s))
        mu, sd = r.mean(0), r.std(0) + 1e-8
        vals.append(sliced_wasserstein((r - mu) / sd, (s - mu) / sd, seed=seed, device=device))
    return {"levels": vals, "mean": float(np.mean(vals))}
