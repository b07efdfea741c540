"""Reference statistics: building (`cdc score ref`) and reading cdc reference .npz files, and ADM's
published reference batches (is_adm_reference / adm_reference), in the layout cdc.eval.scoring's score reads.

A reference .npz holds everything a score needs (see build_reference), plus a JSON description. The
small helpers scoring shares (metric parsing, the Inception loader, atomic writes) live here too, so the
import points one way: scoring -> reference.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cdc.eval.evalio import (
    ZIP_ERRORS,
    greyscale,
    npz_images,
    reference_images,
    resolve_device,
    to_float,
)
from cdc.eval.metrics import (
    ALL_METRICS,
    VERSIONS,
    Moments,
    inception_features,
)
from cdc.eval.swd import collect_descriptors
from cdc.fileio import one_line
from cdc.flow.pyramid import down_to


def _parse_metrics(metrics: str | Sequence[str]) -> list[str]:
    ms = [
        m.strip().lower() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip()
    ]
    bad = [m for m in ms if m not in ALL_METRICS]
    if bad or not ms:
        raise ValueError(f"unknown metric(s) {bad or ms}; choose from {','.join(ALL_METRICS)}")
    return ms


def _inception(inception_path, weights: bool, device: torch.device, model):
    """(model, weights id): an injected (module, id) pair, or the FID Inception-v3."""
    if model is not None:
        return model
    from cdc.eval.inception import load_inception

    try:
        return load_inception(inception_path, weights=weights, device=device)
    except FileNotFoundError as e:  # SWD is the one metric that needs no network: say so where it stops
        raise FileNotFoundError(f"{e}; SWD needs no weights: --metrics swd") from None


def _stage_down(b: np.ndarray, side: int) -> np.ndarray:
    """Box-average uint8 (B, S, S, 3) to `side` and re-quantise, like a stage's saved output."""
    x = torch.from_numpy(np.ascontiguousarray(b)).permute(0, 3, 1, 2).float()
    y = down_to(x, side).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).numpy()


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_reference(
    data: str | Path,
    out: str | Path,
    side: int | None = None,
    n: int | None = None,
    sides: Sequence[int] = (),
    metrics: str | Sequence[str] = ("fid", "pr", "swd"),
    inception_path: str | Path | None = None,
    batch: int = 100,
    device: str | torch.device | None = None,
    n_pr: int = 10000,
    swd_images: int = 1024,
    swd_per_image: int = 32,
    seed: int = 0,
    progress: bool = True,
    inception_weights: bool = True,
    model: tuple[torch.nn.Module, str] | None = None,
) -> dict:
    """Write reference statistics to `out` (.npz) and return their description.

    Stores: `mu`/`sigma` (pool3 Gaussian at `side`), `mu_<s>`/`sigma_<s>` for every extra side in
    `sides` (box-downsampled references for per-stage FID), `feats` (the first `n_pr` pool3 vectors,
    for precision/recall), `swd_<level>` (Laplacian patch descriptors, float16), and `meta` (JSON).
    """
    ms = [m for m in _parse_metrics(metrics) if m != "is"]  # IS needs no reference
    if sides and "fid" not in ms:
        raise ValueError("--sides stores per-stage FID statistics; add fid to --metrics or drop --sides")
    images = reference_images(data, side, n)
    side = images.side
    sides = sorted({int(s) for s in sides} - {side})
    for s in sides:
        if s > side or side % s or (side // s) & (side // s - 1):
            raise ValueError(f"--sides {s} is not {side} divided by a power of two")
    dev = resolve_device(device)
    arrays: dict[str, np.ndarray] = {}
    desc = {"version": VERSIONS["reference"], "source": images.name, "count": images.n, "side": side,
            "data": str(data), "greyscale": greyscale(images)}  # fmt: skip
    if {"fid", "pr"} & set(ms):
        net, wid = _inception(inception_path, inception_weights, dev, model)
        mom = {s: Moments() for s in [side, *sides]}
        keep: list[np.ndarray] = []
        with (
            torch.inference_mode(),
            tqdm(total=images.n, desc="reference", unit="img", disable=not progress) as bar,
        ):
            for b in images.batches(batch):
                for s in [side, *sides]:
                    x = b if s == side else _stage_down(b, s)
                    pool = net(to_float(x, dev))[0].float().cpu().numpy()
                    mom[s].add(pool)
                    if s == side and sum(map(len, keep)) < n_pr:
                        keep.append(pool)
                bar.update(len(b))
        for s in [side, *sides]:
            mu, sigma = mom[s].stats(f"reference {images.name}")
            sfx = "" if s == side else f"_{s}"
            arrays[f"mu{sfx}"], arrays[f"sigma{sfx}"] = mu, sigma
        if "pr" in ms:
            arrays["feats"] = np.concatenate(keep)[:n_pr].astype(np.float32)
        desc.update(inception_sha256=wid, sides=[side, *sides], n_pr=len(arrays.get("feats", [])))
    if "swd" in ms:
        for li, d in enumerate(collect_descriptors(images, batch, swd_per_image, swd_images, seed)):
            arrays[f"swd_{li}"] = d.astype(np.float16)
        desc.update(swd_images=min(swd_images, images.n), swd_per_image=swd_per_image, swd_seed=seed)
    desc.update(metrics=ms, versions=VERSIONS, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays["meta"] = np.array(json.dumps(desc))
    _atomic_write(out, lambda f: np.savez(f, **arrays))
    return desc


def load_reference(path: str | Path) -> tuple[dict, dict]:
    """(arrays, description) of a reference .npz written by build_reference."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"reference not found: {p} (build one with `cdc score ref --src ... --out {p}`)"
        )
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy (or its magic and noise)
            raise ValueError("a single array, not an .npz archive")
        with z:
            arrays = {k: z[k] for k in z.files}
    except (*ZIP_ERRORS, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not a readable reference .npz ({one_line(e)})") from None
    if "meta" not in arrays:
        raise ValueError(f"{p} has no 'meta' entry; it is not a cdc reference (rebuild with `cdc score ref`)")
    desc = _reference_meta(p, arrays.pop("meta"))
    _check_reference_arrays(p, arrays, desc)
    return arrays, desc


def _reference_meta(p: Path, meta: np.ndarray) -> dict:
    """The description stored in a reference's `meta` entry, its fields checked for their types."""
    fix = "rebuild it with `cdc score ref`"
    try:
        desc = json.loads(str(meta)) if meta.ndim == 0 and meta.dtype.kind == "U" else None
    except ValueError:
        desc = None
    if not isinstance(desc, dict):
        raise ValueError(f"{p}: 'meta' is not a JSON description (not a cdc reference); {fix}")
    for key, tp in (("metrics", str), ("sides", int)):
        v = desc.get(key, [])
        if not isinstance(v, list) or not all(type(x) is tp for x in v):
            raise ValueError(f"{p}: meta.{key} is {v!r}, expected a list of {tp.__name__}; {fix}")
    ints = ["side", "count"] + (["swd_images", "swd_per_image", "swd_seed"] if "swd" in desc.get("metrics", []) else [])
    for key in ints:
        if type(desc.get(key)) is not int or desc[key] < 0:
            raise ValueError(f"{p}: meta.{key} is {desc.get(key)!r}, expected a whole number; {fix}")
    return desc


def _check_reference_arrays(p: Path, arrays: dict, desc: dict) -> None:
    """Every statistic a score reads has the rank and kind it was written with."""
    fix = "rebuild it with `cdc score ref`"
    swd = sorted(k for k in arrays if k.startswith("swd_"))
    if "swd" in desc["metrics"] and not swd:
        raise ValueError(f"{p} lists swd but holds no swd_<level> descriptors; {fix}")
    for k, a in arrays.items():
        rank = {"mu": 1, "sigma": 2, "feats": 2, "swd": 2}.get(k.split("_")[0])
        if rank is not None and (a.ndim != rank or a.dtype.kind != "f" or 0 in a.shape):
            raise ValueError(f"{p}: {k} is a {a.dtype} array of shape {a.shape}, not {rank}-D float statistics; {fix}")
    dims = {arrays[k].shape[1] for k in swd}
    if dims - {3 * 7 * 7}:  # RGB 7x7 patches (cdc.eval.swd.swd_descriptors)
        raise ValueError(f"{p}: swd descriptors of width {sorted(dims)}, not 147 (RGB 7x7 patches); {fix}")


def is_adm_reference(path: str | Path) -> bool:
    """True for an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): arr_0 images plus
    stored TF-Inception statistics mu/sigma, and no cdc 'meta' entry."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (OSError, zipfile.BadZipFile):
        return False
    return {"arr_0", "mu", "sigma"} <= names and "meta" not in names


def adm_reference(
    path: str | Path,
    metrics: Sequence[str],
    net: tuple[torch.nn.Module, str] | None,
    batch: int = 100,
    device: torch.device | None = None,
    progress: bool = True,
    swd_images: int = 1024,
    swd_per_image: int = 32,
    seed: int = 0,
) -> tuple[dict, dict]:
    """(arrays, description) of an ADM reference batch, in the layout score() reads.

    FID uses the batch's stored mu/sigma: ADM computed them with the TF Inception graph over the
    whole training set, which its 10k images cannot reproduce, and our network is that graph with
    its input resize and scaling (docs/design-notes.md). Precision/recall use the batch's images
    through our Inception, as ADM's evaluator does with the same images; SWD their descriptors.
    """
    p = Path(path)
    with np.load(p, allow_pickle=False) as z:
        arrays = {"mu": z["mu"].astype(np.float64), "sigma": z["sigma"].astype(np.float64)}
    images = npz_images(p)
    desc = {
        "version": VERSIONS["reference"],
        "kind": "adm",
        "source": f"ADM reference batch {p.name}",
        "count": images.n,
        "side": images.side,
        "fid_statistics": "stored mu/sigma (ADM, TF Inception 2015-12-05, its whole dataset)",
        "metrics": ["fid"],
        "sides": [images.side],
        "versions": {"fid": VERSIONS["fid"]},
    }
    if "pr" in metrics:
        assert net is not None
        pool, _ = inception_features(net[0], images.batches(batch), images.n, device, progress)
        arrays["feats"] = pool.astype(np.float32)
        desc.update(n_pr=len(pool), pr_features=f"arr_0 ({images.n} images) through our Inception")
        desc["metrics"].append("pr")
    if "swd" in metrics:
        for li, d in enumerate(collect_descriptors(images, batch, swd_per_image, swd_images, seed)):
            arrays[f"swd_{li}"] = d.astype(np.float16)
        desc.update(swd_images=min(swd_images, images.n), swd_per_image=swd_per_image, swd_seed=seed)
        desc["metrics"].append("swd")
    return arrays, desc
