"""Scoring: `cdc score` (FID / IS / precision-recall / SWD, per stage) against a reference.

Library side of `cdc score`. Images are read by cdc.eval.evalio (uint8 (N, H, W, 3) batches, streamed so
50k samples never sit in memory at once); the metric maths is cdc.eval.metrics, SWD cdc.eval.swd.
References (cdc .npz files and ADM's published batches) are built and read by cdc.eval.reference; its
public names are re-exported here so `from cdc.eval.scoring import build_reference` keeps working.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cdc.eval.evalio import (
    greyscale,
    npz_images,
    open_samples,
    resolve_device,
)
from cdc.eval.metrics import (
    ALL_METRICS,
    VERSIONS,
    frechet_distance,
    gaussian_stats,
    inception_features,
    inception_score,
    precision_recall,
)
from cdc.eval.reference import (
    _atomic_write,
    _inception,
    _parse_metrics,
    _stage_down,  # noqa: F401  (re-exported: tests build per-stage samples with it)
    adm_reference,
    build_reference,  # noqa: F401  (re-exported: cdc.cli, cdc.ablate.runner, bin/compare)
    is_adm_reference,
    load_reference,
)
from cdc.eval.swd import collect_descriptors, swd_levels


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
