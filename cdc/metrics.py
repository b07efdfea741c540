"""Evaluation: FID / IS / improved precision-recall (ADM protocol), per-stage FID; reference and scoring.

Library side of `cdc score`. Images are read by cdc.evalio (uint8 (N, H, W, 3) batches, streamed so
50k samples never sit in memory at once); SWD is in cdc.swd. Inception features go through
cdc.inception (the FID graph); the metric maths is in plain numpy / torch:
  * FID: Frechet distance of Gaussians fitted to pool3 features (scipy sqrtm, eps offset fallback).
  * IS: exp(E KL(p(y|x) || p(y))) on the 1008-way softmax, mean and std over 10 splits.
  * precision / recall: Kynkaanniemi et al. 2019 as in ADM's evaluator; a point is inside a set's
    manifold if it lies within the k=3-NN radius of some point of that set. Distances are computed
    in row x column blocks (torch.cdist on the chosen device), so 50k x 50k never materialises.
  * SWD (cdc.swd): sliced Wasserstein distance between Laplacian-pyramid patch descriptors.
A reference .npz holds everything a score needs (see build_reference), plus a JSON description.
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from tqdm import tqdm

from cdc.evalio import npz_images, open_samples, reference_images, resolve_device, to_float
from cdc.pyramid import down_to
from cdc.swd import collect_descriptors, swd_levels

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


# ----------------------------------------------------------------------------- reference and scoring


class _Moments:
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
    from cdc.inception import load_inception

    return load_inception(inception_path, weights=weights, device=device)


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
    images = reference_images(data, side, n)
    side = images.side
    sides = sorted({int(s) for s in sides} - {side})
    for s in sides:
        if s > side or side % s or (side // s) & (side // s - 1):
            raise ValueError(f"--sides {s} is not {side} divided by a power of two")
    dev = resolve_device(device)
    arrays: dict[str, np.ndarray] = {}
    desc = {"version": VERSIONS["reference"], "source": images.name, "count": images.n, "side": side}
    if {"fid", "pr"} & set(ms) or sides:
        net, wid = _inception(inception_path, inception_weights, dev, model)
        mom = {s: _Moments() for s in [side, *sides]}
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
            f"reference not found: {p} (build one with `cdc score ref --data ... --out {p}`)"
        )
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{p} is not a readable reference .npz ({e})") from None
    if "meta" not in arrays:
        raise ValueError(f"{p} has no 'meta' entry; it is not a cdc reference (rebuild with `cdc score ref`)")
    return arrays, json.loads(str(arrays.pop("meta")))


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


def _ref_stats(arrays: dict, desc: dict, s: int, ref: Path) -> tuple[np.ndarray, np.ndarray]:
    sfx = "" if s == desc["side"] else f"_{s}"
    if f"mu{sfx}" not in arrays:
        have = desc.get("sides") or []
        raise ValueError(
            f"{ref} has no FID statistics at side {s} (has {have}); rebuild it with "
            f"`cdc score ref --data DATA --out {ref.name} --side {desc['side']} "
            f"--sides {','.join(map(str, sorted({*have, s})))}`"
        )
    return arrays[f"mu{sfx}"], arrays[f"sigma{sfx}"]


def _sampler_settings(samples: Path) -> dict:
    for c in (samples.with_suffix(".json"), samples / "samples.json", samples.parent / "samples.json"):
        if c.is_file() and not c.name.endswith(".scores.json"):
            try:
                return json.loads(c.read_text())
            except ValueError:  # JSONDecodeError or UnicodeDecodeError: record it, do not fail the score
                return {"unreadable": str(c)}
    return {}


def score_stages(
    samples: str | Path,
    ref: str | Path,
    batch: int = 100,
    device: str | torch.device | None = None,
    inception_path: str | Path | None = None,
    progress: bool = True,
    inception_weights: bool = True,
    model: tuple[torch.nn.Module, str] | None = None,
) -> dict:
    """Per-stage FID (paper Fig. 7): `stages.npz` next to the samples (stage0, stage1, ... at each
    stage's side) against the reference's statistics at that side. Returns {"stage<k>": {side, fid}}."""
    sp, rp = Path(samples), Path(ref)
    if is_adm_reference(rp):
        raise ValueError(
            f"{rp} is an ADM reference batch without per-stage statistics; build a cdc reference from "
            f"its images: `cdc score ref --data {rp} --out ref.npz --sides 32,64,128`"
        )
    st = (sp if sp.is_dir() else sp.parent) / "stages.npz"
    if not st.is_file():
        raise FileNotFoundError(f"{st} not found; write stage outputs with `cdc sample --stages`")
    with zipfile.ZipFile(st) as z:
        keys = sorted((k[:-4] for k in z.namelist() if k.startswith("stage")), key=lambda k: int(k[5:]))
    arrays, desc = load_reference(rp)
    dev = resolve_device(device)
    net, wid = _inception(inception_path, inception_weights, dev, model)
    _check_weights(desc, wid, rp)
    out = {}
    for k in keys:
        imgs = npz_images(st, k)
        mu_r, s_r = _ref_stats(arrays, desc, imgs.side, rp)
        pool, _ = inception_features(net, imgs.batches(batch), imgs.n, dev, progress)
        mu, sigma = gaussian_stats(pool, f"{st}:{k}")
        out[k] = {"side": imgs.side, "count": imgs.n, "fid": frechet_distance(mu, sigma, mu_r, s_r)}
    return out


def _ref_used(rp: Path, desc: dict, ms: Sequence[str]) -> str:
    """One line saying which reference, and which part of it, each metric was scored against."""
    if desc.get("kind") == "adm":
        parts = []
        if "fid" in ms:
            parts.append("FID vs its stored mu/sigma (TF Inception, whole dataset)")
        if "pr" in ms:
            parts.append(f"precision/recall vs its {desc['n_pr']} images through our Inception")
        if "swd" in ms:
            parts.append(f"SWD vs {desc['swd_images']} of its images")
        return f"{rp} (ADM reference batch; {'; '.join(parts) or 'IS needs no reference'})"
    return f"{rp} (cdc reference: {desc.get('source', '?')}, {desc.get('count', '?')} images)"


def _check_version(desc: dict, ref: Path) -> None:
    old = (desc.get("versions") or {}).get("fid")
    if old not in (None, VERSIONS["fid"]):
        raise ValueError(
            f"{ref} holds features of {old.split(':')[0]}, scoring uses {VERSIONS['fid'].split(':')[0]} "
            f"(TF-exact Inception input); rebuild it with `cdc score ref`"
        )


def _check_weights(desc: dict, wid: str, ref: Path) -> None:
    if desc.get("inception_sha256") not in (None, wid):
        raise ValueError(
            f"{ref} was built with Inception weights {desc['inception_sha256'][:12]}, scoring uses "
            f"{wid[:12]}; rebuild the reference with the same --inception"
        )


def score(
    samples: str | Path,
    ref: str | Path,
    metrics: str | Sequence[str] = ALL_METRICS,
    inception_path: str | Path | None = None,
    batch: int = 100,
    device: str | torch.device | None = None,
    stages: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    inception_weights: bool = True,
    model: tuple[torch.nn.Module, str] | None = None,
) -> dict:
    """Score samples (ADM .npz or PNG folder) against a reference; writes `<samples>.scores.json`."""
    t0 = time.time()
    ms = _parse_metrics(metrics)
    sp, rp = Path(samples), Path(ref)
    images = open_samples(sp)
    dev = resolve_device(device)
    net_wid = None
    if is_adm_reference(rp):
        if stages:
            score_stages(sp, rp)  # raises: says how to build per-stage statistics from the ADM images
        want = ms if npz_images(rp).side == images.side else ()  # wrong side: fail below, no work
        if "pr" in want:
            net_wid = _inception(inception_path, inception_weights, dev, model)
        arrays, desc = adm_reference(rp, want, net_wid, batch, dev, progress)
    else:
        arrays, desc = load_reference(rp)
    if images.side != desc["side"]:
        raise ValueError(
            f"samples are {images.side}px but the reference {rp} is {desc['side']}px; "
            f"build a {images.side}px reference with `cdc score ref --side {images.side}`"
        )
    lacking = [m for m in ms if m != "is" and m not in desc.get("metrics", [])]
    if lacking:
        raise ValueError(
            f"{rp} was built without {','.join(lacking)}; rebuild it with `cdc score ref --metrics ...`"
        )
    res: dict = {}
    wid = None
    if {"fid", "is", "pr"} & set(ms) or stages:
        net, wid = net_wid or _inception(inception_path, inception_weights, dev, model)
        if {"fid", "pr"} & set(ms) or stages:
            _check_weights(desc, wid, rp)
            _check_version(desc, rp)
        if "fid" in ms and images.n < 2:
            raise ValueError(
                f"{sp} has {images.n} image(s); FID needs at least 2 (use thousands: 50k is standard)"
            )
        pool, logits = inception_features(net, images.batches(batch), images.n, dev, progress)
        if "fid" in ms:
            res["fid"] = frechet_distance(*gaussian_stats(pool, str(sp)), arrays["mu"], arrays["sigma"])
        if "is" in ms:
            res["is"], res["is_std"] = inception_score(logits, splits=10)
        if "pr" in ms:
            res["precision"], res["recall"] = precision_recall(arrays["feats"], pool, k=3, device=dev)
        if stages:
            res["fid_stages"] = score_stages(sp, rp, batch, dev, progress=progress, model=(net, wid))
    if "swd" in ms:
        ref_desc = [arrays[f"swd_{i}"] for i in range(sum(k.startswith("swd_") for k in arrays))]
        d = collect_descriptors(images, batch, desc["swd_per_image"], desc["swd_images"], desc["swd_seed"])
        res["swd"] = swd_levels(ref_desc, d, seed=desc["swd_seed"], device=dev)
    result = {
        "samples": str(sp),
        "count": images.n,
        "side": images.side,
        "metrics": res,
        "reference": {
            "path": str(rp),
            "kind": desc.get("kind", "cdc"),
            "used": _ref_used(rp, desc, ms),
            "description": desc,
        },
        "versions": {m: VERSIONS[m] for m in ms},
        "inception_sha256": wid,
        "sampler": _sampler_settings(sp),
        "seconds": round(time.time() - t0, 2),
    }
    dest = (
        Path(out)
        if out
        else sp.with_name(sp.stem + ".scores.json" if sp.is_file() else sp.name + ".scores.json")
    )
    _atomic_write(dest, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    result["written"] = str(dest)
    return result
