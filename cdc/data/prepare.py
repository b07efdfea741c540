"""`cdc prepare`: decode a source once into webdataset shards holding every pyramid level (DESIGN.md §3).

Each sample is `__key__`, `cls` (class index, ascii) and one PNG per level, `{side}.png`, named
by the level's shorter side. The top level is the image resized (LANCZOS) so its shorter side is
`top = side * expand` (rounded to a multiple of 2^(levels-1)): with `crop="full"` (Table 7, the
default for photos) the whole image at its aspect ratio, the longer side cut to a multiple of
2^(levels-1); with `crop="center"` only the centre square. Each lower level is the box average
of the top one, computed from the top directly and rounded half up to uint8. So a stored level
differs from the box average of the stored (rounded) top by at most 0.5/255, i.e. 1/255 in
[-1, 1] units.
idx sources (28 px) are zero-padded to the side, never resampled, and stay 1-channel.
`--store` (cdc.data.imageproc.encode_levels) swaps the codecs: `webp` lossless WebP levels, `jpeg` a
JPEG top with the lower levels taken from the *decoded* JPEG, `jpeg-top` the JPEG top alone (the
loader box-averages it); the relation above then holds for the top as decoded.

Order (`order="shuffled"`, the default): the sorted item list is put in a permutation fixed by
`seed` before it is cut, so every shard holds a near-uniform class mix; an ImageNet tree listed
class by class would otherwise give shards of about one class each, and batches of a few classes
(docs/design-notes.md, "Data"). `order="sorted"` keeps the class-sorted list (what cdc wrote
before the order existed). Shard i holds items [i*N, (i+1)*N) of that ordered list (skipped
files make it shorter), is
streamed to `<name>.partial-<pid>`, fsynced and renamed, then recorded in `.prepare/<name>.json`
(cdc.data.shard_writer). A re-run with the same arguments keeps recorded shards and redoes the rest, so an interrupted run
ends with byte-identical shards. `manifest.json` is written atomically at the end.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cdc.data.imageproc import STORES, top_side
from cdc.data.index import INDEX_FILE, index_bytes
from cdc.data.reader import scan_tar
from cdc.data.shard_writer import clear_outputs, drop_partials, shard_record, write_shards
from cdc.data.sources import Item, Source, fingerprint, open_source
from cdc.fileio import atomic_write_bytes, display, is_utf8, path_record, read_json, write_json

FORMAT = "cdc-shards/1"

# ---------------------------------------------------------------------------------------------
# the command


def _level_keys(lv: list[int], store: str, channels: int) -> list[str]:
    """Tar member names of the stored levels, top first (jpeg-top stores the top alone)."""
    if store == "png":
        return [f"{s}.png" for s in lv]
    lossless = "webp" if channels == 3 else "png"
    if store == "webp":
        return [f"{s}.webp" for s in lv]
    return [f"{lv[0]}.jpg"] + ([f"{s}.{lossless}" for s in lv[1:]] if store == "jpeg" else [])


def _defaults(
    src: Source, side: int | None, expand: float | None, levels: int | None
) -> tuple[int, float, int]:
    if src.kind == "idx":
        return side or 32, 1.0 if expand is None else expand, levels or 3
    return side or 256, 1.125 if expand is None else expand, levels or 4


def _crop_mode(src: Source, crop: str | None) -> str:
    """Crop mode: default "full" (whole image at its aspect ratio, Table 7) for photos; idx is "center"."""
    if crop not in (None, "full", "center"):
        raise ValueError(f"--crop must be full or center, got {crop!r}")
    if src.kind == "idx":
        if crop == "full":
            raise ValueError(
                "--crop full is for photos; idx images are zero-padded squares (use --crop center)"
            )
        return "center"
    return crop or "full"


def _subset(items: list[Item], limit: int | None) -> list[Item]:
    """`--limit N`: N items evenly spaced over the sorted list, so every class keeps its share."""
    if not limit or limit >= len(items):
        return items
    return [items[(i * len(items)) // limit] for i in range(limit)]


ORDERS = ("shuffled", "sorted")


def _ordered(items: list[Item], order: str, seed: int) -> list[Item]:
    """The items in the order they are written: a seeded permutation, or the sorted list as it is."""
    if order == "sorted":
        return items
    perm = np.random.default_rng([seed, 0x5EED]).permutation(len(items))  # PCG64: same on every numpy
    return [items[i] for i in perm]


@dataclass(frozen=True)
class Plan:
    """What a `prepare` call writes: the resolved arguments, the source and its items in write order."""

    source: Source
    out: Path
    split: str
    side: int  # shorter side of the training images
    expand: float  # top = side * expand, rounded to a multiple of 2^(levels-1)
    top: int  # shorter side of the stored top level
    levels: int  # pyramid levels stored (or computed by the loader, for jpeg-top)
    shard_size: int  # items per shard
    limit: int | None  # --limit: items evenly spaced over the sorted list, or None for all
    png: str  # "huffman" or "store"
    crop: str  # "full" or "center"
    store: str  # "png", "webp", "jpeg" or "jpeg-top" ("auto" resolved)
    jpeg_quality: int  # of the JPEG top, for the jpeg stores
    order: str  # "shuffled" or "sorted"
    seed: int  # of the shuffled order
    items: list[Item]  # in the order they are written
    fingerprint: str  # of the sorted list: the file set, whatever order it is written in

    @property
    def names(self) -> list[str]:
        """Shard file names; shard i holds items [i*shard_size, (i+1)*shard_size)."""
        return [f"{self.split}-{i:06d}.tar" for i in range(-(-len(self.items) // self.shard_size))]


def _check_options(png: str, store: str, order: str, jpeg_quality: int) -> None:
    """The choices that need no source: one-line errors before anything is opened."""
    if png not in ("huffman", "store"):
        raise ValueError(f"--png must be huffman or store, got {png!r}")
    if store not in STORES + ("auto",):
        raise ValueError(f"--store must be one of {', '.join(STORES + ('auto',))}, got {store!r}")
    if order not in ORDERS:
        raise ValueError(f"--order must be shuffled or sorted, got {order!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")


def _geometry(
    source: Source, side: int | None, expand: float | None, levels: int | None, shard_size: int
) -> tuple[int, float, int, int]:
    """side, expand, levels (the source kind's defaults where None) and the top level's side, checked."""
    side, expand, levels = _defaults(source, side, expand, levels)
    if side < 1 or levels < 1 or expand < 1.0 or shard_size < 1:
        raise ValueError("need --side >= 1, --levels >= 1, --expand >= 1.0 and --shard-size >= 1")
    top = top_side(side, expand, levels)
    if top >> (levels - 1) < 1:
        raise ValueError(f"--levels {levels} is too many for a {top}-px top level")
    if source.images is not None and max(source.images.shape[1:]) > top:
        raise ValueError(
            f"idx images are {source.images.shape[1:]} px, larger than --side {side}; use a larger --side"
        )
    return side, expand, levels, top


def _plan(
    src: str | os.PathLike, out: str | os.PathLike | None, split: str, side: int | None,
    expand: float | None, levels: int | None, shard_size: int, limit: int | None, png: str,
    crop: str | None, store: str, jpeg_quality: int, order: str, seed: int,
) -> Plan:
    """Check the arguments, open the source and put its (subset of) items in write order."""
    _check_options(png, store, order, jpeg_quality)
    source = open_source(src, split)
    if store == "auto":
        store = "png" if source.images is not None else "jpeg-top"
    crop = _crop_mode(source, crop)
    side, expand, levels, top = _geometry(source, side, expand, levels, shard_size)
    out = Path(out) if out is not None else Path("data") / f"{source.name}-{side}"
    items = _subset(source.items, limit)
    if not items:
        raise ValueError(f"source {src} holds no files")
    return Plan(
        source, out, split, side, expand, top, levels, shard_size, limit, png, crop, store,
        jpeg_quality, order, seed, _ordered(items, order, seed), fingerprint(items),
    )


def _args_record(plan: Plan) -> dict[str, Any]:
    """`.prepare/args.json`: the arguments a resumed run must repeat to keep the shards already written."""
    args = {
        "format": FORMAT,
        "source": display(plan.source.ident),
        "split": plan.split,
        "side": plan.side,
        "expand": plan.expand,
        "top": plan.top,
        "levels": plan.levels,
        "shard_size": plan.shard_size,
        "limit": plan.limit,
        "png": plan.png,
        **({"store": plan.store, "jpeg_quality": plan.jpeg_quality} if plan.store != "png" else {}),
        "items": len(plan.items),
        "fingerprint": plan.fingerprint,
    }
    if plan.crop != "center":  # only then, so centre-square dirs prepared before --crop existed still resume
        args["crop"] = plan.crop
    if plan.order != "sorted":  # only then, so class-sorted dirs prepared before --order existed still resume
        args["order"], args["seed"] = plan.order, plan.seed
    return args


def _claim(out: Path, args: dict[str, Any]) -> None:
    """Record `args` in out/.prepare, or check they are the ones the shards already there were written with."""
    state = out / ".prepare"
    state.mkdir(parents=True, exist_ok=True)
    if not (state / "args.json").is_file():
        write_json(state / "args.json", args)
        return
    old = read_json(state / "args.json", "a `cdc prepare` state file; delete the folder's .prepare/ to start over")
    if old != args:
        keys = dict.fromkeys([*args, *old])  # both sides: an older state may lack a key
        diff = {k: (old.get(k), args.get(k)) for k in keys if old.get(k) != args.get(k)}
        hint = " (an earlier cdc wrote them in class order: add --order sorted to finish them)" if (
            "order" not in old and set(diff) <= {"order", "seed"}
        ) else ""
        raise ValueError(
            f"{out} holds shards prepared with other arguments {diff}{hint}; "
            f"use another --out, or --overwrite to replace them"
        )


def _resume(plan: Plan, overwrite: bool) -> dict[str, dict]:
    """Set up out/.prepare and return the records of the shards an earlier run finished (by name)."""
    if overwrite:
        clear_outputs(plan.out)
    _claim(plan.out, _args_record(plan))
    drop_partials(plan.out)
    return {n: r for n in plan.names if (r := shard_record(plan.out, n)) is not None}


def _tasks(plan: Plan, records: dict[str, dict]) -> list[dict]:
    """One task (cdc.data.shard_writer.write_shard's argument) per shard not yet in `records`."""
    tasks = []
    images, n = plan.source.images, plan.shard_size
    for i, name in enumerate(plan.names):
        if name in records:
            continue
        chunk = plan.items[i * n : (i + 1) * n]
        refs = [images[it.ref] if images is not None else it.ref for it in chunk]
        tasks.append(
            {
                "out": str(plan.out),
                "root": str(plan.source.root),
                "name": name,
                "top": plan.top,
                "levels": plan.levels,
                "png": plan.png,
                "crop": plan.crop,
                "store": plan.store,
                "quality": plan.jpeg_quality,
                "items": [(it.key, it.cls, r) for it, r in zip(chunk, refs, strict=True)],
            }
        )
    return tasks


def _note_counts(converted_files: list[dict]) -> dict[str, int]:
    """How many files each conversion note ("CMYK -> RGB", ...) applied to."""
    counts: dict[str, int] = {}
    for c in converted_files:
        for note in c["note"].split("; "):
            counts[note] = counts.get(note, 0) + 1
    return counts


def _escaped_names(items: list[Item], skipped_paths: set[str]) -> list[dict]:
    """Names that are not UTF-8 (legal on Linux): the shard key each was written under, and its bytes."""
    return [
        {"key": it.key, **path_record(it.ref)}
        for it in items
        if isinstance(it.ref, str) and not is_utf8(it.ref) and display(it.ref) not in skipped_paths
    ]


def _manifest(plan: Plan, records: dict[str, dict]) -> dict[str, Any]:
    """manifest.json from the plan and every shard's record."""
    names, source = plan.names, plan.source
    shards = [{k: records[n][k] for k in ("name", "count", "bytes", "sha256")} for n in names]
    skipped = [s for n in names for s in records[n]["skipped"]]
    converted_files = [c for n in names for c in records[n]["converted"]]
    lv = [plan.top >> j for j in range(plan.levels)]
    return {
        "format": FORMAT,
        "source": display(source.ident),
        "source_type": source.kind,
        "split": plan.split,
        "side": plan.side,
        "expand": plan.expand,
        "top": plan.top,
        "levels": lv,
        "level_keys": _level_keys(lv, plan.store, source.channels),
        "channels": source.channels,
        "classes": [display(c) for c in source.classes],
        "class_names": source.class_names and [display(c) for c in source.class_names],
        "num_classes": len(source.classes),
        "count": sum(s["count"] for s in shards),
        "files": len(plan.items),
        "limit": plan.limit,
        "shard_size": plan.shard_size,
        "png": plan.png,
        "crop": plan.crop,
        "store": plan.store,
        "order": plan.order,  # "shuffled": items in a seeded permutation, so each shard mixes classes
        "order_seed": plan.seed if plan.order == "shuffled" else None,
        "jpeg_quality": plan.jpeg_quality if plan.store.startswith("jpeg") else None,
        "pattern": f"{plan.split}-{{000000..{len(names) - 1:06d}}}.tar",
        "shards": shards,
        "skipped": skipped,
        "converted": _note_counts(converted_files),
        "converted_files": converted_files,
        "escaped_names": _escaped_names(plan.items, {s["path"] for s in skipped}),
    }


def _write_index(plan: Plan, records: dict[str, dict]) -> dict[str, Any]:
    """index.npy: every sample's [byte offset, length] in its shard, rows in manifest order, so a
    reader fetches one sample with one read (cdc.data.index); returns its manifest entry."""
    rows = []
    for n in plan.names:
        found = records[n].get("index")
        if found is None:  # a shard record without offsets: read them from the shard's headers
            found = [[s.offset, s.length] for s in scan_tar(str(plan.out / n), 1 << 62)]
        rows += found
    data = index_bytes(np.asarray(rows, dtype=np.int64).reshape(-1, 2))
    atomic_write_bytes(plan.out / INDEX_FILE, data, "sample index")
    return {"file": INDEX_FILE, "rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}


def _require_usable(plan: Plan, manifest: dict[str, Any]) -> None:
    """A source with no usable image is an error, and leaves no empty shard a training run could be pointed at."""
    if manifest["count"]:
        return
    clear_outputs(plan.out)
    skipped = manifest["skipped"]
    why = f" (first: {display(skipped[0]['path'])}: {skipped[0]['reason']})" if skipped else ""
    raise ValueError(
        f"{display(plan.source.ident)} holds no usable image: all {len(plan.items)} files were skipped{why}; "
        f"point --src at a folder of decodable images"
    )


def _report(out: Path, manifest: dict[str, Any], todo: int, elapsed: float) -> None:
    print(
        f"prepared {todo} files in {elapsed:.1f}s ({todo / max(elapsed, 1e-9):.0f} img/s); "
        f"{manifest['count']} samples, {len(manifest['skipped'])} skipped -> {display(out)}",
        file=sys.stderr,
    )


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    side: int | None = None,
    expand: float | None = None,
    levels: int | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    limit: int | None = None,
    split: str = "train",
    progress: bool = True,
    png: str = "store",
    crop: str | None = None,
    store: str = "png",
    jpeg_quality: int = 95,
    order: str = "shuffled",
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write webdataset shards of `src` under `out` and return the manifest (also in out/manifest.json).

    side/expand/levels default to 256/1.125/4 for image trees and 32/1.0/3 for idx sources; `out`
    defaults to data/<source name>-<side>. Re-running with the same arguments resumes. png:
    "huffman" (smaller shards) or "store" (uncompressed PNG, fastest to write and read). crop:
    "full" (default for image trees; Table 7) stores the whole image, shorter side `top`, at its
    aspect ratio, for random crops anywhere in it; "center" stores only the centre square. store:
    "png" (every level PNG), "webp" (every level lossless WebP), "jpeg" (JPEG top at
    `jpeg_quality`, lower levels exact box averages of the decoded top, lossless) or "jpeg-top"
    (the JPEG top alone; the loader computes the levels); sizes and speeds in docs/performance.md.
    "auto" (the CLI's default) is jpeg-top for image trees (the smallest and fastest measured, 0.56-0.77x
    the source JPEGs) and png for idx sources (small lossless digits). order: "shuffled" (items in
    a permutation fixed by `seed`, so shards mix classes) or "sorted" (class by class, as before).
    overwrite: delete the shards, manifest and resume state already in `out` first (other files
    stay). A source with no usable image is a ValueError and leaves no shard behind.
    """
    plan = _plan(
        src, out, split, side, expand, levels, shard_size, limit, png, crop, store, jpeg_quality, order, seed
    )
    records = _resume(plan, overwrite)
    tasks = _tasks(plan, records)
    todo = sum(len(t["items"]) for t in tasks)
    t0 = time.perf_counter()
    bar = f"prepare {display(plan.out)}" if progress else None
    records.update((r["name"], r) for r in write_shards(tasks, plan.out, workers, bar))
    elapsed = time.perf_counter() - t0
    manifest = _manifest(plan, records)
    _require_usable(plan, manifest)
    manifest["index"] = _write_index(plan, records)  # before the manifest, which must never name a missing one
    write_json(plan.out / "manifest.json", manifest, what="manifest")
    if progress and todo:
        _report(plan.out, manifest, todo, elapsed)
    return manifest
