"""The `cdc sample` output folder: PNGs written atomically, which images are done, the resume check,
the default folder name, the interrupted record, and the npz / figures assembled from the PNGs."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from cdc import __version__
from cdc.fileio import atomic_temp, read_json, read_json_object, write_json
from cdc.interrupt import Interrupted, signal_name
from cdc.sample.figures import GRID_IMAGES, grid, stage_figure, stages_figure

OURS = ("images", "stages", "samples.npz", "stages.npz", "grid.png", "stages.png", "samples.json")
# resume keys; guide / guide_scale are recorded only when autoguidance is on, so older records match
MATCH = ("ckpt", "weights", "steps", "cfg", "solver", "interval", "sde_eps", "seed", "classes", "guide", "guide_scale")
N_FIGURES = 16  # per-image Fig. 9 panels written under stages/
N_COMBINED = 4  # images in the combined stages.png
RECORD = "a `cdc sample` record (samples.json); use --overwrite to start again"  # names a bad file


def img_path(out: Path, i: int, stage: int | None = None) -> Path:
    return (
        out / "images" / f"{i:06d}.png"
        if stage is None
        else out / "stages" / f"stage{stage}" / f"{i:06d}.png"
    )


# a full disk while writing: the temp file goes, an earlier good file stays, and the one-line error
# names the folder to free; finished images are kept, so --resume continues where it stopped
THEN = "run again with --resume (finished images are kept)"


def write_png(path: Path, img: np.ndarray) -> None:
    """Write uint8 (H, W, C) as PNG via temp + rename, so a crash never leaves half a PNG under `path`."""
    with atomic_temp(path, "image", img.nbytes, THEN) as tmp:  # raw size: a PNG's upper bound, roughly
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(tmp, format="PNG", compress_level=4)


def read_png(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    return a[..., None] if a.ndim == 2 else a  # (H, W, C)


def png_ok(path: Path, side: int, channels: int) -> bool:
    """The file exists, decodes fully and has the expected size and mode."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (side, side) and im.mode == ("L" if channels == 1 else "RGB")
    except Exception:  # missing, truncated or foreign file: regenerate it
        return False


def save_image(out: Path, i: int, img: np.ndarray, stages: list[np.ndarray] | None) -> None:
    for k, s in enumerate(stages or []):
        write_png(img_path(out, i, k), s)
    write_png(img_path(out, i), img)  # last: its presence marks the whole image as done


# images read and written at a time when assembling an npz: its memory, whatever the image count
NPZ_BLOCK = 64

# an npz entry: name -> (shape, dtype, blocks of rows whose concatenation is the array)
Entry = tuple[tuple[int, ...], np.dtype, Iterable[np.ndarray]]


def save_npz(path: Path, entries: dict[str, Entry]) -> None:
    """Write what np.savez(path, **arrays) writes (a ZIP_STORED archive of zip64 .npy entries, read
    by np.load and ADM's evaluator) block by block, so no array is ever whole in memory; atomic."""
    need = sum(int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt, _ in entries.values())
    with atomic_temp(path, "npz", need, THEN) as tmp, open(tmp, "wb") as raw:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, (shape, dtype, blocks) in entries.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:  # as np.savez opens them
                    _write_npy(f, name, shape, np.dtype(dtype), blocks)
        raw.flush()
        os.fsync(raw.fileno())


def _write_npy(f: IO[bytes], name: str, shape: tuple[int, ...], dtype: np.dtype, blocks: Iterable[np.ndarray]) -> None:
    """An .npy file (header v1.0, C order, as np.save writes it) from blocks of rows."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    np.lib.format.write_array_header_1_0(f, header)
    rows = 0
    for b in blocks:
        if b.dtype != dtype or b.shape[1:] != tuple(shape[1:]):
            raise ValueError(f"{name}: a block of {b.dtype} {b.shape} does not fit {dtype} {tuple(shape)}")
        f.write(np.ascontiguousarray(b).data)
        rows += len(b)
    if rows != shape[0]:
        raise ValueError(f"{name}: {rows} rows written, its header says {shape[0]}")


def done_images(out: Path, n: int, side: int, channels: int, stage_sides: list[int] | None) -> list[bool]:
    """Which of images 0..n-1 are finished (final PNG, and every stage PNG when asked, decode)."""

    def ok(i: int) -> bool:
        if not png_ok(img_path(out, i), side, channels):
            return False
        return all(png_ok(img_path(out, i, k), r, channels) for k, r in enumerate(stage_sides or []))

    if not (out / "images").is_dir():
        return [False] * n
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ok, range(n)))


def _used(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _finished(folder: Path) -> bool:
    """`folder` holds a `cdc sample` output whose samples.json says it is done."""
    try:
        return read_json(folder / "samples.json", "a `cdc sample` record").get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def default_out(base: Path, resume: bool, overwrite: bool) -> Path:
    """The default output folder: `base`, or base-2, base-3, ... once those hold finished samples.

    Sampling a checkpoint again needs no flag: finished samples are skipped up to the first folder
    that is missing or empty. An unfinished one stops the walk (it is refused, naming --resume), and
    --resume / --overwrite act on that one, or else on the newest finished sample.
    """
    k, c = 1, base
    while _used(c) and _finished(c):
        k += 1
        c = base.with_name(f"{base.name}-{k}")
    if (resume or overwrite) and not _used(c) and k > 1:
        return base if k == 2 else base.with_name(f"{base.name}-{k - 1}")
    return c


def check_out(out: Path, settings: dict[str, Any], overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty output unless --overwrite of a `cdc sample` output or a --resume whose
    settings match (all ranks). --overwrite never touches a folder cdc sample did not write."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other; pick one")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if overwrite:
        if not is_ours(out):
            raise ValueError(
                f"--overwrite: {out} is not a `cdc sample` output (its samples.json is missing or not "
                "a cdc sample record); nothing was deleted; choose another --out"
            )
        return
    if not resume:
        raise ValueError(_busy_message(out))
    meta = out / "samples.json"
    if not meta.is_file():
        raise ValueError(
            f"--resume: {out} has no samples.json (not a `cdc sample` output); pick another --out"
        )
    old = read_record(out)
    for key in MATCH:
        if old.get(key) != settings.get(key):
            raise ValueError(
                f"--resume: {key} was {old.get(key)!r} in {out} but is {settings.get(key)!r} now; "
                "use the same options or --overwrite"
            )


def _busy_message(out: Path) -> str:
    """Why a non-empty --out is refused without a flag; names an interrupted --overwrite's kept samples."""
    kept = asides(out)
    if not kept:
        return f"{out} is not empty; pass --resume to continue that job or --overwrite to replace it"
    return (
        f"{out}: an --overwrite was interrupted; the previous samples are kept in {kept[0]}; pass --resume "
        "to finish the new job (the previous samples are deleted once it is done), or, to keep the "
        f"previous ones instead, delete {', '.join(OURS)} in {out} and move the contents of {kept[0]} back"
    )


# ---------------------------------------------------------------------------------------------
# --overwrite: the previous job's files are moved into a hidden folder inside --out and deleted only
# once the new job is done, so an overwrite killed half-way keeps the previous samples (a resume
# finishes the new job, or the user moves them back). Only OURS moves: a file cdc did not write stays.

ASIDE = ".old-"  # + the pid of the overwrite that set them aside


def is_record(path: Path) -> bool:
    """`path` is a samples.json that `cdc sample` wrote (its status and version, the checkpoint)."""
    try:
        r = read_json_object(path, RECORD)
    except (OSError, ValueError):
        return False
    return r.get("status") in ("running", "interrupted", "done") and "ckpt" in r and "cdc_version" in r


def asides(out: Path) -> list[Path]:
    """The folders of previous samples that --overwrite set aside in `out`, oldest first."""
    found = [p for p in out.glob(f"{ASIDE}*") if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def is_ours(out: Path) -> bool:
    """`out` holds a `cdc sample` output: its samples.json is a record, or (an overwrite killed
    between setting the old record aside and writing the new one) a set-aside one is."""
    return is_record(out / "samples.json") or any(is_record(a / "samples.json") for a in asides(out))


def set_aside(out: Path) -> Path:
    """Move the previous job's files into a new hidden folder in `out` (samples.json last: until
    then the folder still names itself a cdc sample output); returns that folder."""
    aside = Path(tempfile.mkdtemp(prefix=f"{ASIDE}{os.getpid()}-", dir=out))  # unique: pids are reused
    for name in sorted(OURS, key=lambda n: n == "samples.json"):
        p = out / name
        if os.path.lexists(p):
            os.replace(p, aside / name)
    return aside


def drop_asides(out: Path) -> None:
    """Delete the previous samples an --overwrite set aside: the new job is done."""
    for a in asides(out):
        shutil.rmtree(a, ignore_errors=True)


def read_record(out: Path) -> dict[str, Any]:
    """The folder's samples.json; an unreadable one is a one-line error naming --overwrite."""
    return read_json_object(out / "samples.json", RECORD)


def _drop_temps(out: Path) -> None:
    """Delete the temp files (cdc.fileio.temp_name) of writes a killed run cut short: nothing else
    removes them, and the one of a 50k-image samples.npz holds gigabytes."""
    stage_dirs = list((out / "stages").glob("stage*"))
    temps = [p for name in OURS for p in out.glob(f".{name}.tmp.*")]
    temps += [p for d in (out / "images", out / "stages", *stage_dirs) for p in d.glob(".*.png.tmp.*")]
    for p in temps:
        p.unlink(missing_ok=True)


def start(out: Path, settings: dict[str, Any], n_stages: int, overwrite: bool, resume: bool) -> None:
    """Rank 0, once check_out accepted the folder: set the previous job's files aside on --overwrite
    (deleted once this one is done), make the image folders and mark samples.json "running" (a
    resume keeps the old record's timings)."""
    if overwrite and out.is_dir():
        set_aside(out)
    if resume or overwrite:
        _drop_temps(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for k in range(n_stages):
        (out / "stages" / f"stage{k}").mkdir(parents=True, exist_ok=True)
    meta = out / "samples.json"
    old = read_record(out) if resume and meta.is_file() else {}
    write_json(meta, {**old, **settings, "status": "running", "cdc_version": __version__}, indent=2)


def _png_blocks(pool: ThreadPoolExecutor, out: Path, n: int, stage: int | None) -> Iterator[np.ndarray]:
    """Images 0..n-1 (of `stage`, or the final ones) as uint8 (k, H, W, C) blocks of NPZ_BLOCK,
    decoded in parallel; paths are made per block too (50k Path objects alone take megabytes)."""
    for b0 in range(0, n, NPZ_BLOCK):
        yield np.stack(list(pool.map(lambda i: read_png(img_path(out, i, stage)), range(b0, min(b0 + NPZ_BLOCK, n)))))


def _png_entry(pool: ThreadPoolExecutor, out: Path, n: int, side: int, channels: int, stage: int | None) -> Entry:
    return (n, side, side, channels), np.dtype(np.uint8), _png_blocks(pool, out, n, stage)


def assemble(out: Path, labels: np.ndarray, channels: int, sides: list[int], stages: bool) -> None:
    """Build samples.npz, grid.png and (with stages) stages.npz and the Fig. 9 panels from the PNGs,
    streamed: memory holds NPZ_BLOCK images at a time, whatever the job's image count."""
    n, labels = len(labels), labels.astype(np.int64)
    with ThreadPoolExecutor(8) as pool:
        save_npz(out / "samples.npz", {
            "arr_0": _png_entry(pool, out, n, sides[-1], channels, None),  # (N, H, W, C)
            "arr_1": (labels.shape, labels.dtype, [labels]),
        })  # fmt: skip
        head = np.stack(list(pool.map(lambda i: read_png(img_path(out, i)), range(min(n, GRID_IMAGES)))))
        write_png(out / "grid.png", grid(head, labels))
        if not stages:
            return
        save_npz(out / "stages.npz", {
            f"stage{k}": _png_entry(pool, out, n, side, channels, k) for k, side in enumerate(sides)
        })  # fmt: skip
        firsts = range(min(n, N_FIGURES))
        panels = [list(pool.map(lambda k, i=i: read_png(img_path(out, i, k)), range(len(sides)))) for i in firsts]
    for i, p in enumerate(panels):
        write_png(out / "stages" / f"{i:06d}.png", stage_figure(p))
    write_png(out / "stages.png", stages_figure(panels[:N_COMBINED]))


def mark_interrupted(out: Path, n: int, settings: dict[str, Any], signum: int) -> Interrupted:
    """Rank 0 after a signal: samples.json records how many images are done (a resume regenerates
    only the rest); returns the exception that tells the caller."""
    count = sum(img_path(out, i).is_file() for i in range(n))  # final PNGs are written last, atomically
    meta = out / "samples.json"
    old = read_record(out)
    write_json(meta, {**old, "status": "interrupted", "signal": signal_name(signum), "images_saved": count}, indent=2)
    return Interrupted(signum, f"{count} of {n} images saved in {out}", out=str(out), ckpt=settings["ckpt"], main=True)

