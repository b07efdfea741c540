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
streamed to `<name>.partial-<pid>`, fsynced and renamed, then recorded in `.prepare/<name>.json`.
A re-run with the same arguments keeps recorded shards and redoes the rest, so an interrupted run
ends with byte-identical shards. `manifest.json` is written atomically at the end.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import signal
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cdc.data.imageproc import STORES, encode_levels, load_image, pad_idx, top_side
from cdc.data.sources import Item, Source, fingerprint, open_source
from cdc.fileio import display, is_utf8, path_record, read_json, write_json

FORMAT = "cdc-shards/1"

_counter: Any = None  # shared images-done counter for the progress bar


def _init_worker(counter: Any) -> None:
    global _counter
    _counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform.startswith("linux"):  # die with the parent (kill -9) instead of finishing orphaned
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class _TarWriter:
    """Minimal streaming tar writer: fixed metadata so equal content gives equal bytes, hashed as written.

    tarfile.addfile costs ~0.1 ms per member (copies, PAX checks); building the GNU header directly
    is ~5x cheaper, which matters at five members per image.
    """

    def __init__(self, fh: Any):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def _write(self, b: bytes) -> None:
        self.fh.write(b)
        self.sha.update(b)
        self.size += len(b)

    def add(self, name: str, body: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(body), 0, 0o644, 0, 0, "", ""
        self._write(ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        self._write(body + b"\0" * (-len(body) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker


def _do_shard(task: dict) -> dict:
    out, name, top, levels = Path(task["out"]), task["name"], task["top"], task["levels"]
    final = out / name
    tmp = out / f"{name}.partial-{os.getpid()}"
    skipped, converted, count = [], [], 0
    squeeze = task["png"] == "huffman"
    with open(tmp, "wb", buffering=1 << 20) as fh:
        tar = _TarWriter(fh)
        for key, cls, ref in task["items"]:
            if isinstance(ref, np.ndarray):
                img, notes, reason = pad_idx(ref, top), [], None
            else:
                aspect = 2 ** (levels - 1) if task.get("crop") == "full" else 0
                img, notes, reason = load_image(os.path.join(task["root"], ref), top, aspect)
            if img is None:
                skipped.append({**path_record(ref), "reason": reason})
            else:
                if notes:
                    converted.append({**path_record(ref), "note": "; ".join(notes)})
                members = [("cls", str(cls).encode())]
                members += encode_levels(img, levels, task.get("store", "png"), squeeze, task.get("quality", 95))
                for ext, body in members:
                    tar.add(f"{key}.{ext}", body)
                count += 1
            if _counter is not None:
                with _counter.get_lock():
                    _counter.value += 1
        tar.close()
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    rec = {
        "name": name,
        "count": count,
        "bytes": tar.size,
        "sha256": tar.sha.hexdigest(),
        "skipped": skipped,
        "converted": converted,
    }
    write_json(out / ".prepare" / f"{name}.json", rec)
    return rec


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


def _clear(out: Path) -> None:
    """`overwrite`: remove what `cdc prepare` writes in `out` (shards, manifest, state), nothing else."""
    import shutil

    if not out.is_dir():
        return
    shards = [p for p in out.glob("*-*.tar") if re.fullmatch(r"[\w]+-\d{6}\.tar", p.name)]
    for p in shards + list(out.glob("*.partial-*")) + [out / "manifest.json"]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / ".prepare", ignore_errors=True)


def _done(out: Path, name: str) -> dict | None:
    rec_path = out / ".prepare" / f"{name}.json"
    try:
        rec = json.loads(rec_path.read_text())
        return rec if (out / name).stat().st_size == rec["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def _bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr, smoothing=0.1)


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
    if png not in ("huffman", "store"):
        raise ValueError(f"--png must be huffman or store, got {png!r}")
    if store not in STORES + ("auto",):
        raise ValueError(f"--store must be one of {', '.join(STORES + ('auto',))}, got {store!r}")
    if order not in ORDERS:
        raise ValueError(f"--order must be shuffled or sorted, got {order!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    source = open_source(src, split)
    if store == "auto":
        store = "png" if source.images is not None else "jpeg-top"
    side, expand, levels = _defaults(source, side, expand, levels)
    crop = _crop_mode(source, crop)
    if side < 1 or levels < 1 or expand < 1.0 or shard_size < 1:
        raise ValueError("need --side >= 1, --levels >= 1, --expand >= 1.0 and --shard-size >= 1")
    top = top_side(side, expand, levels)
    if top >> (levels - 1) < 1:
        raise ValueError(f"--levels {levels} is too many for a {top}-px top level")
    if source.images is not None and max(source.images.shape[1:]) > top:
        raise ValueError(
            f"idx images are {source.images.shape[1:]} px, larger than --side {side}; use a larger --side"
        )
    out = Path(out) if out is not None else Path("data") / f"{source.name}-{side}"
    items = _subset(source.items, limit)
    if not items:
        raise ValueError(f"source {src} holds no files")
    fp = fingerprint(items)  # of the sorted list: the file set, whatever order it is written in
    items = _ordered(items, order, seed)
    n_shards = -(-len(items) // shard_size)
    names = [f"{split}-{i:06d}.tar" for i in range(n_shards)]
    args = {
        "format": FORMAT,
        "source": display(source.ident),
        "split": split,
        "side": side,
        "expand": expand,
        "top": top,
        "levels": levels,
        "shard_size": shard_size,
        "limit": limit,
        "png": png,
        **({"store": store, "jpeg_quality": jpeg_quality} if store != "png" else {}),
        "items": len(items),
        "fingerprint": fp,
    }
    if crop != "center":  # only then, so centre-square dirs prepared before --crop existed still resume
        args["crop"] = crop
    if order != "sorted":  # only then, so class-sorted dirs prepared before --order existed still resume
        args["order"], args["seed"] = order, seed
    if overwrite:
        _clear(out)
    state = out / ".prepare"
    state.mkdir(parents=True, exist_ok=True)
    if (state / "args.json").is_file():
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
    else:
        write_json(state / "args.json", args)
    for p in list(out.glob("*.partial-*")) + list(state.glob("*.partial-*")):
        p.unlink(missing_ok=True)  # left by an interrupted run

    records: dict[str, dict] = {n: r for n in names if (r := _done(out, n)) is not None}
    tasks = []
    for i, name in enumerate(names):
        if name in records:
            continue
        chunk = items[i * shard_size : (i + 1) * shard_size]
        refs = [source.images[it.ref] if source.images is not None else it.ref for it in chunk]
        tasks.append(
            {
                "out": str(out),
                "root": str(source.root),
                "name": name,
                "top": top,
                "levels": levels,
                "png": png,
                "crop": crop,
                "store": store,
                "quality": jpeg_quality,
                "items": [(it.key, it.cls, r) for it, r in zip(chunk, refs, strict=True)],
            }
        )
    todo = sum(len(t["items"]) for t in tasks)
    t0 = time.perf_counter()
    parallel = workers > 1 and len(tasks) > 1
    counter = mp.Value("q", 0) if parallel else None
    # the pool is forked before tqdm starts its monitor thread
    pool = mp.get_context().Pool(min(workers, len(tasks)), _init_worker, (counter,)) if parallel else None
    bar = _bar(todo, f"prepare {display(out)}") if progress and todo else None
    try:
        if pool is None:
            for t in tasks:
                rec = _do_shard(t)
                records[rec["name"]] = rec
                if bar is not None:
                    bar.update(len(t["items"]))
        else:
            res = pool.map_async(_do_shard, tasks, chunksize=1)
            seen = 0
            while not res.ready():
                res.wait(0.25)
                if bar is not None:
                    bar.update(counter.value - seen)
                    seen = counter.value
            for rec in res.get():
                records[rec["name"]] = rec
            pool.close()
            if bar is not None:
                bar.update(todo - seen)
    except BaseException:
        if pool is not None:
            pool.terminate()
        for p in out.glob("*.partial-*"):
            p.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.join()
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0

    shards = [{k: records[n][k] for k in ("name", "count", "bytes", "sha256")} for n in names]
    skipped = [s for n in names for s in records[n]["skipped"]]
    skipped_paths = {s["path"] for s in skipped}
    converted_files = [c for n in names for c in records[n]["converted"]]
    counts: dict[str, int] = {}
    for c in converted_files:
        for note in c["note"].split("; "):
            counts[note] = counts.get(note, 0) + 1
    lv = [top >> j for j in range(levels)]
    manifest = {
        "format": FORMAT,
        "source": display(source.ident),
        "source_type": source.kind,
        "split": split,
        "side": side,
        "expand": expand,
        "top": top,
        "levels": lv,
        "level_keys": _level_keys(lv, store, source.channels),
        "channels": source.channels,
        "classes": [display(c) for c in source.classes],
        "class_names": source.class_names and [display(c) for c in source.class_names],
        "num_classes": len(source.classes),
        "count": sum(s["count"] for s in shards),
        "files": len(items),
        "limit": limit,
        "shard_size": shard_size,
        "png": png,
        "crop": crop,
        "store": store,
        "order": order,  # "shuffled": items in a seeded permutation, so each shard mixes classes
        "order_seed": seed if order == "shuffled" else None,
        "jpeg_quality": jpeg_quality if store.startswith("jpeg") else None,
        "pattern": f"{split}-{{000000..{n_shards - 1:06d}}}.tar",
        "shards": shards,
        "skipped": skipped,
        "converted": counts,
        "converted_files": converted_files,
        # names that are not UTF-8 (legal on Linux): the shard key each was written under, and its bytes
        "escaped_names": [
            {"key": it.key, **path_record(it.ref)}
            for it in items
            if isinstance(it.ref, str) and not is_utf8(it.ref) and display(it.ref) not in skipped_paths
        ],
    }
    if manifest["count"] == 0:
        _clear(out)  # nothing usable: leave no empty shard a training run could be pointed at
        why = f" (first: {display(skipped[0]['path'])}: {skipped[0]['reason']})" if skipped else ""
        raise ValueError(
            f"{display(source.ident)} holds no usable image: all {len(items)} files were skipped{why}; "
            f"point --src at a folder of decodable images"
        )
    write_json(out / "manifest.json", manifest)
    if progress and todo:
        print(
            f"prepared {todo} files in {elapsed:.1f}s ({todo / max(elapsed, 1e-9):.0f} img/s); "
            f"{manifest['count']} samples, {len(skipped)} skipped -> {display(out)}",
            file=sys.stderr,
        )
    return manifest
