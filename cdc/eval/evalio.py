"""Reading images for evaluation: sample batches (ADM .npz or PNG folder) and reference images.

Images travel as uint8 (N, H, W, 3) numpy batches, streamed so that 50k samples at 256 px (~10 GB)
never sit in memory at once. References come from an image folder (ADM centre crop + resize) or from
`cdc prepare` shards (a stored pyramid level, centre-cropped without resampling).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cdc.data.imageproc import ImageRefused, open_image
from cdc.data.reader import is_url
from cdc.data.shards import level_bytes, read_manifest, read_tar, resolve_shards
from cdc.fileio import bad_file, one_line
from cdc.redact import redact

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class Images:
    """A sized, re-iterable stream of uint8 (B, S, S, 3) batches; greyscale is repeated to 3 channels."""

    def __init__(self, n: int, side: int, batches_fn, name: str) -> None:
        self.n, self.side, self._fn, self.name = n, side, batches_fn, name

    def batches(self, batch: int) -> Iterator[np.ndarray]:
        for b in self._fn(batch):
            yield np.repeat(b, 3, axis=-1) if b.shape[-1] == 1 else b


def greyscale(images: Images, k: int = 64) -> bool:
    """True when the first `k` images carry no colour (R == G == B everywhere, 1-channel included).

    The content decides, not the storage: a greyscale set saved as RGB PNGs counts as greyscale.
    The first k images suffice to tell a colour dataset from a greyscale one, and cost one batch.
    """
    for b in images.batches(k):
        return bool((b[..., 0] == b[..., 1]).all() and (b[..., 1] == b[..., 2]).all())
    return True


# what a damaged zip member raises while it is read (bad CRC, bad deflate data, cut short)
ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


def _npz_header(zf: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and header length of `key` inside an .npz without reading the array."""
    if f"{key}.npy" not in zf.namelist():
        raise ValueError(f"{path} has no '{key}' array (ADM sample format: arr_0 uint8 NHWC, arr_1 labels)")
    with zf.open(f"{key}.npy") as f:
        try:
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ZIP_ERRORS as e:
            raise ValueError(f"{path}:{key} is not a readable .npy array ({one_line(e)})") from None
        if fortran:
            raise ValueError(f"{path}:{key} is Fortran-ordered; save it with np.savez from a C-ordered array")
        return shape, dtype, f.tell()


def npz_images(path: Path, key: str = "arr_0") -> Images:
    """Stream `key` (uint8 (N, S, S, 1|3)) out of an .npz in row batches (works for savez_compressed too)."""
    try:
        zf = zipfile.ZipFile(path)
    except ZIP_ERRORS as e:
        raise ValueError(f"{path} is not a readable .npz file ({one_line(e)})") from None
    with zf:
        shape, dtype, offset = _npz_header(zf, key, path)
    if len(shape) != 4 or shape[-1] not in (1, 3) or shape[1] != shape[2]:
        raise ValueError(
            f"{path}:{key} has shape {shape}; expected (N, S, S, 3) or (N, S, S, 1) square images"
        )
    if dtype != np.uint8:
        raise ValueError(f"{path}:{key} has dtype {dtype}; expected uint8 pixels in [0, 255]")
    if shape[0] < 1:
        raise ValueError(f"{path}:{key} holds no images")
    row = int(np.prod(shape[1:]))

    def read(f, m: int) -> bytes:
        try:
            buf = f.read(m * row)
        except ZIP_ERRORS as e:  # a member damaged past its header: found while streaming
            raise ValueError(f"{path}:{key} is damaged ({one_line(e)}); not a readable .npz file") from None
        if len(buf) != m * row:
            raise ValueError(f"{path}:{key} is cut short; not a readable .npz file")
        return buf

    def gen(batch: int) -> Iterator[np.ndarray]:
        with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
            f.read(offset)
            for i in range(0, shape[0], batch):
                m = min(batch, shape[0] - i)
                yield np.frombuffer(bytearray(read(f, m)), np.uint8).reshape(m, *shape[1:])  # writable copy

    return Images(shape[0], shape[1], gen, str(path))


def _load_rgb(path: Path) -> np.ndarray:
    try:
        with open_image(path) as im:
            return np.asarray(im.convert("RGB"))
    except ImageRefused:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, zlib.error) as e:
        # PIL says "broken PNG file" (SyntaxError) or "image file is truncated" without the name
        raise bad_file(path, "a readable image", e) from None


def folder_images(path: Path) -> Images:
    """Sample images from a folder (sorted file names, not recursive); all square, of one side."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    first = _load_rgb(files[0])
    if first.shape[0] != first.shape[1]:
        raise ValueError(f"{files[0]} is {first.shape[1]}x{first.shape[0]}; samples must be square")

    def gen(batch: int) -> Iterator[np.ndarray]:
        for i in range(0, len(files), batch):
            imgs = [_load_rgb(f) for f in files[i : i + batch]]
            for f, im in zip(files[i : i + batch], imgs, strict=True):
                if im.shape != first.shape:
                    raise ValueError(f"{f} has shape {im.shape}, unlike {first.shape} of {files[0].name}")
            yield np.stack(imgs)

    return Images(len(files), first.shape[0], gen, str(path))


def open_samples(path: str | Path) -> Images:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"samples not found: {p}")
    return folder_images(p) if p.is_dir() else npz_images(p)


def center_crop_resize(img: Image.Image, side: int) -> np.ndarray:
    """ADM's reference preprocessing: box-halve while >= 2x, bicubic to short side `side`, centre crop."""
    img = img.convert("RGB")
    while min(img.size) >= 2 * side:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = side / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    y, x = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
    return a[y : y + side, x : x + side]


def _shard_samples(tars: list[str]) -> Iterator[dict[str, bytes]]:
    """webdataset samples as {ext: bytes}, in shard order (the training loader's reader)."""
    for t in tars:
        for _, sample in read_tar(t):
            yield sample


def reference_images(data: str | Path, side: int | None, n: int | None = None) -> Images:
    """Reference images from an image folder (recursive, class folders fine), prepared shards, or the
    arr_0 images of an .npz (e.g. an ADM reference batch, used as they are).

    Folder: images of side `side` are used as they are, others get ADM's centre crop + resize.
    Shards (a folder with manifest.json and *.tar, one PNG per pyramid level, `{side}.png`): the
    smallest stored level >= `side` (the expanded image, e.g. 288 for 256, square or at its aspect
    ratio) is centre-cropped to `side` without resampling, matching the training crops.
    """
    if is_url(str(data)) or str(data).startswith("pipe:"):  # prepared shards on a server (manifest beside)
        shards = resolve_shards(str(data))
        if shards.manifest is None:
            raise ValueError(f"{redact(str(data))}: a reference from a server needs the folder URL of prepared "
                             "shards (manifest.json beside them)")
        return _shard_reference(redact(str(data)), shards.urls, shards.manifest, side, n)
    d = Path(data)
    if d.is_file() and d.suffix == ".npz":
        return _npz_reference(d, side, n)
    if not d.is_dir():
        raise FileNotFoundError(f"reference data folder not found: {d}")
    if (d / "manifest.json").is_file():
        manifest = read_manifest(d / "manifest.json")
        return _shard_reference(str(d), [str(t) for t in _manifest_tars(d, manifest)], manifest, side, n)
    return _folder_reference(d, side, n)


def _shard_reference(d: str, tars: list[str], manifest: dict, side: int | None, n: int | None) -> Images:
    """Prepared shards: the smallest stored level >= side, centre-cropped (`reference_images`)."""
    count = int(manifest.get("count", 0)) or sum(int(v) for v in manifest.get("shard_counts", {}).values())
    side, level = _shard_level(d, tars, manifest, side)
    total = min(n, count) if n and count else (n or count)
    if not total:
        raise ValueError(f"{d}/manifest.json has no sample count; pass -n/--num-images")

    def gen_shards(batch: int) -> Iterator[np.ndarray]:
        buf, seen = [], 0
        for s in _shard_samples(tars):
            if seen >= total:
                break
            buf.append(_shard_crop(s, level, side))
            seen += 1
            if len(buf) == batch:
                yield np.stack(buf)
                buf = []
        if buf:
            yield np.stack(buf)

    return Images(total, side, gen_shards, f"shards {d} (level {level}, centre crop {side})")


def _manifest_tars(d: Path, manifest: dict) -> list[Path]:
    """The shards manifest.json lists (every *.tar when it lists none); all must be there."""
    listed = [d / sh["name"] for sh in manifest.get("shards", []) if "name" in sh]
    tars = [t for t in listed if t.is_file()] if listed else sorted(d.glob("*.tar"))
    if not tars or len(tars) < len(listed):
        raise ValueError(f"{d}: shards listed in manifest.json are missing; run `cdc prepare` to completion")
    return tars


def _shard_level(d: str, tars: list[str], manifest: dict, side: int | None) -> tuple[int, int]:
    """(side, the smallest stored level >= it); side defaults to the final (training) side prepare recorded."""
    from cdc.data.imageproc import LEVEL_EXTS

    first = next(_shard_samples(tars[:1]), None)
    keys = [e.rsplit(".", 1)[0] for e in (first or {}) if e.endswith(LEVEL_EXTS)]
    lv = sorted(manifest.get("levels") or [int(e) for e in keys if e.isdigit()])
    if not lv or not keys:
        raise ValueError(f"{tars[0]} has no '<side>.png' (or .webp / .jpg) level images")
    side = side or int(manifest.get("side") or lv[-1])
    fit = [s for s in lv if s >= side]
    if not fit:
        raise ValueError(f"shards in {d} have levels {lv}; none is >= --side {side}")
    return side, fit[0]


def _shard_crop(sample: dict[str, bytes], level: int, side: int) -> np.ndarray:
    """One shard sample's `level` image, centre-cropped to side x side (full-image shards are not square)."""
    body, box = level_bytes(sample, level)  # box > 1: a level of a jpeg-top shard
    with open_image(body, f"a shard sample's level {level}") as im:
        a = np.asarray((im.reduce(box) if box > 1 else im).convert("RGB"))
    y, x = (a.shape[0] - side) // 2, (a.shape[1] - side) // 2
    return a[y : y + side, x : x + side]


def _folder_reference(d: Path, side: int | None, n: int | None) -> Images:
    """An image folder, recursive: side x side images as they are, others ADM's centre crop + resize."""
    # os.walk, not rglob: class folders linked in (a subset of ILSVRC2012 made of symlinks) are
    # followed, as `cdc prepare` follows them
    files = sorted(Path(top, f) for top, _, names in os.walk(d, followlinks=True) for f in names)
    files = [p for p in files if p.suffix.lower() in IMAGE_EXTS and p.is_file()]
    if not files:
        raise ValueError(f"{d} holds no images ({', '.join(sorted(IMAGE_EXTS))}) and no manifest.json")
    files = files[:n] if n else files
    if side is None:
        with open_image(files[0]) as im:
            if im.size[0] != im.size[1]:
                raise ValueError(f"{files[0]} is not square; pass --side")
            side = im.size[0]

    def gen_folder(batch: int) -> Iterator[np.ndarray]:
        for i in range(0, len(files), batch):
            yield np.stack([_folder_image(f, side) for f in files[i : i + batch]])

    return Images(len(files), side, gen_folder, f"folder {d} (ADM centre crop to {side})")


def _folder_image(f: Path, side: int) -> np.ndarray:
    with open_image(f) as im:
        return np.asarray(im.convert("RGB")) if im.size == (side, side) else center_crop_resize(im, side)


def _npz_reference(path: Path, side: int | None, n: int | None) -> Images:
    """arr_0 of an .npz (ADM layout: uint8 NHWC) as reference images, the first n of them."""
    imgs = npz_images(path)
    if side is not None and side != imgs.side:
        raise ValueError(f"{path} holds {imgs.side}px images; --side {side} would need resampling them")
    total = min(n, imgs.n) if n else imgs.n

    def gen(batch: int) -> Iterator[np.ndarray]:
        seen = 0
        for b in imgs.batches(batch):
            if seen >= total:
                break
            yield b[: total - seen]
            seen += len(b)

    return Images(total, imgs.side, gen, f"npz {path} (arr_0)")


def to_float(b: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1] on `device`."""
    return torch.from_numpy(np.ascontiguousarray(b)).to(device).permute(0, 3, 1, 2).float().div_(255)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The given device, else CUDA when available, else CPU.

    A name torch does not know, or a device this machine lacks (cuda without a GPU, cuda:3 on a
    two-GPU box), is a one-line ValueError here rather than a RuntimeError at the first copy.
    """
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA GPU here; use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"--device {device}: this machine has {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except (RuntimeError, AssertionError) as e:
            why = str(e).split(". ")[0][:120]
            raise ValueError(f"--device {device}: unusable here ({why}); use --device cpu") from None
    return dev
