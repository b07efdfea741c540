"""Scoring: reference statistics files and `cdc score` (FID / IS / precision-recall / SWD, per stage).

Library side of `cdc score`. Images are read by cdc.eval.evalio (uint8 (N, H, W, 3) batches, streamed so
50k samples never sit in memory at once); the metric maths is cdc.eval.metrics, SWD cdc.eval.swd.
A reference .npz holds everything a score needs (see build_reference), plus a JSON description;
ADM's published reference batches are read as well (adm_reference).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cdc.eval.evalio import (
    ZIP_ERRORS,
    greyscale,
    npz_images,
    open_samples,
    reference_images,
    resolve_device,
    to_float,
)
from cdc.eval.metrics import (
    ALL_METRICS,
    VERSIONS,
    Moments,
    frechet_distance,
    gaussian_stats,
    inception_features,
    inception_score,
    precision_recall,
)
from cdc.eval.swd import collect_descriptors, swd_levels
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


def _ref_stats(arrays: dict, desc: dict, s: int, ref: Path) -> tuple[np.ndarray, np.ndarray]:
    sfx = "" if s == desc["side"] else f"_{s}"
    if f"mu{sfx}" not in arrays:
        have = desc.get("sides") or []
        raise ValueError(
            f"{ref} has no FID statistics at side {s} (has {have}); rebuild it with "
            f"`cdc score ref --src DATA --out {ref.name} --side {desc['side']} "
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
            f"its images: `cdc score ref --src {rp} --out ref.npz --sides 32,64,128`"
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


def _rebuild_hint(desc: dict, rp: Path, add: Sequence[str]) -> str:
    """The `cdc score ref` command that rebuilds reference `rp` with the metrics in `add` as well."""
    ms = [m for m in ("fid", "pr", "swd") if m in add or m in desc.get("metrics", [])]
    extra = [s for s in desc.get("sides") or [] if s != desc["side"]]
    cmd = (
        f"`cdc score ref --src {desc.get('data', 'DATA')} --out {rp} --metrics {','.join(ms)} "
        f"--side {desc['side']} -n {desc['count']}" + (f" --sides {','.join(map(str, extra))}" if extra else "") + "`"
    )
    return cmd + (" (fid and pr need the Inception weights)" if {"fid", "pr"} & set(add) else "")


def _default_metrics(desc: dict, rp: Path, notices: list[str]) -> list[str]:
    """What the reference can score (IS too when it was built with Inception); a notice if not all."""
    have = desc.get("metrics", [])
    ms = [m for m in ALL_METRICS if m in have or (m == "is" and desc.get("inception_sha256"))]
    if not ms:
        raise ValueError(f"{rp} holds no statistics; rebuild it with {_rebuild_hint(desc, rp, ['swd'])}")
    missing = [m for m in ("fid", "pr", "swd") if m not in have]
    if missing:
        notices.append(
            f"{rp.name} holds {','.join(have)} only, so scoring {','.join(ms)}; "
            f"for {','.join(missing)} rebuild it with {_rebuild_hint(desc, rp, missing)}"
        )
    return ms


def _colour(grey: bool | None) -> str:
    return "unknown" if grey is None else "greyscale" if grey else "colour"


def _channel_notice(channels: dict, rp: Path) -> str:
    if channels["samples"] == "greyscale":
        return (
            f"samples are greyscale, the reference {rp.name} is colour: each grey image is repeated to 3 "
            "channels (the usual FID convention) and compared with colour statistics, so expect large distances"
        )
    return (
        f"samples are colour, the reference {rp.name} is greyscale: samples are scored as RGB and their "
        "colour counts as a difference; use a colour reference (or greyscale samples) to compare like with like"
    )


def _keep_previous(dest: Path) -> Path:
    """Copy an existing scores file aside as `<name>.<its mtime>.json` before the new one replaces it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(dest.stat().st_mtime))
    base = dest.name[: -len(".json")] if dest.name.endswith(".json") else dest.name
    kept, i = dest.with_name(f"{base}.{stamp}.json"), 1
    while kept.exists():  # two scores within one second: number them
        kept, i = dest.with_name(f"{base}.{stamp}-{i}.json"), i + 1
    shutil.copy2(dest, kept)
    return kept


def score(
    samples: str | Path,
    ref: str | Path,
    metrics: str | Sequence[str] | None = None,
    inception_path: str | Path | None = None,
    batch: int = 100,
    device: str | torch.device | None = None,
    stages: bool = False,
    out: str | Path | None = None,
    progress: bool = True,
    inception_weights: bool = True,
    model: tuple[torch.nn.Module, str] | None = None,
) -> dict:
    """Score samples (ADM .npz or PNG folder) against a reference; writes `<samples>.scores.json`.

    `metrics` None: every metric the reference holds (plus IS when it was built with Inception; all
    four for an ADM batch), so a SWD-only reference scores SWD without asking for weights.
    The result's `notices` (one line each) say what the caller should know: metrics left out by
    default, greyscale scored against colour (or the reverse), an earlier scores file kept aside.
    """
    t0 = time.time()
    ms = _parse_metrics(metrics) if metrics else None
    sp, rp = Path(samples), Path(ref)
    images = open_samples(sp)
    dev = resolve_device(device)
    notices: list[str] = []
    adm = is_adm_reference(rp)
    net_of = partial(_inception, inception_path, inception_weights, dev, model)
    ms, arrays, desc, net_wid = _open_reference(rp, adm, sp, images, ms, stages, net_of, batch, dev, progress, notices)
    _check_reference_fits(images, rp, desc, ms)
    channels = _channels(images, rp, adm, desc, notices)
    res, wid = _inception_metrics(sp, rp, images, ms, arrays, desc, stages, net_wid or net_of, batch, dev, progress)
    if "swd" in ms:
        res["swd"] = _swd(images, arrays, desc, batch, dev)
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
        "channels": channels,
        "inception_sha256": wid,
        "sampler": _sampler_settings(sp),
        "seconds": round(time.time() - t0, 2),
    }
    return _write_scores(result, _scores_path(sp, out), notices)


def _open_reference(rp: Path, adm: bool, sp: Path, images, ms: list[str] | None, stages: bool, net_of, batch: int,
                    dev, progress: bool, notices: list[str]) -> tuple[list[str], dict, dict, tuple | None]:
    """(metrics to score, reference arrays, its description, the Inception net if loading needed it).

    An ADM batch scores all four metrics by default and computes its statistics here (its PR
    features need our Inception); a cdc reference scores what it holds (`_default_metrics`).
    """
    if not adm:
        arrays, desc = load_reference(rp)
        return ms or _default_metrics(desc, rp, notices), arrays, desc, None
    ms = ms or list(ALL_METRICS)
    if stages:
        score_stages(sp, rp)  # raises: says how to build per-stage statistics from the ADM images
    want = ms if npz_images(rp).side == images.side else ()  # wrong side: fail below, no work
    net_wid = net_of() if "pr" in want else None
    arrays, desc = adm_reference(rp, want, net_wid, batch, dev, progress)
    return ms, arrays, desc, net_wid


def _check_reference_fits(images, rp: Path, desc: dict, ms: Sequence[str]) -> None:
    """The reference has the samples' side and holds every metric asked for (IS needs nothing)."""
    if images.side != desc["side"]:
        raise ValueError(
            f"samples are {images.side}px but the reference {rp} is {desc['side']}px; "
            f"build a {images.side}px reference with `cdc score ref --side {images.side}`"
        )
    lacking = [m for m in ms if m != "is" and m not in desc.get("metrics", [])]
    if lacking:
        rest = [m for m in ms if m not in lacking]
        raise ValueError(
            f"{rp} was built without {','.join(lacking)} (it holds {','.join(desc.get('metrics', [])) or 'none'}); "
            f"add {'it' if len(lacking) == 1 else 'them'}: {_rebuild_hint(desc, rp, lacking)}"
            + (f", or score the rest: --metrics {','.join(rest)}" if rest else "")
        )


def _channels(images, rp: Path, adm: bool, desc: dict, notices: list[str]) -> dict:
    """Colour or greyscale, of samples and reference; a notice when they differ."""
    channels = {"samples": _colour(greyscale(images))}
    channels["reference"] = _colour(greyscale(npz_images(rp)) if adm else desc.get("greyscale"))
    if "unknown" not in channels.values() and channels["samples"] != channels["reference"]:
        notices.append(_channel_notice(channels, rp))
    return channels


def _inception_metrics(sp: Path, rp: Path, images, ms: Sequence[str], arrays: dict, desc: dict, stages: bool,
                       net_wid, batch: int, dev, progress: bool) -> tuple[dict, str | None]:
    """(FID / IS / precision-recall / per-stage FID as asked, the Inception weights id or None).

    `net_wid` is the (net, id) pair already loaded, or a function that loads it.
    """
    res: dict = {}
    if not ({"fid", "is", "pr"} & set(ms) or stages):
        return res, None
    net, wid = net_wid if isinstance(net_wid, tuple) else net_wid()
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
    return res, wid


def _swd(images, arrays: dict, desc: dict, batch: int, dev) -> dict:
    """SWD per pyramid level against the reference's stored descriptors, with its seed and counts."""
    ref_desc = [arrays[f"swd_{i}"] for i in range(sum(k.startswith("swd_") for k in arrays))]
    d = collect_descriptors(images, batch, desc["swd_per_image"], desc["swd_images"], desc["swd_seed"])
    return swd_levels(ref_desc, d, seed=desc["swd_seed"], device=dev)


def _scores_path(sp: Path, out: str | Path | None) -> Path:
    """--out, else `<samples>.scores.json` beside the samples (.npz or folder)."""
    if out:
        return Path(out)
    return sp.with_name(sp.stem + ".scores.json" if sp.is_file() else sp.name + ".scores.json")


def _write_scores(result: dict, dest: Path, notices: list[str]) -> dict:
    """Write `result` (with its notices) to `dest` atomically, an earlier file there kept aside."""
    if dest.is_file():  # the earlier scores may be against another reference: keep them, and say so
        result["previous"] = str(_keep_previous(dest))
        notices.append(f"kept the earlier {dest.name} as {Path(result['previous']).name}")
    result["notices"] = notices
    _atomic_write(dest, lambda f: f.write((json.dumps(result, indent=2) + "\n").encode()))
    result["written"] = str(dest)
    return result
