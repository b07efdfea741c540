"""One image in, its pyramid levels out: robust decoding to RGB (or L), resizing, PNG encoding.

Used by `cdc prepare` workers. Every conversion applied to a file is reported as a note so the
manifest can list it; files that cannot be decoded return a reason instead of raising.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import zlib

import numpy as np
from PIL import Image, UnidentifiedImageError

_EXT_FORMAT = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".jpe": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


# ---------------------------------------------------------------------------------------------
# opening a file from anyone: only the formats cdc reads, and a pixel limit checked from the header
# before any pixel is decoded, so a small file that declares a huge image (a decompression bomb)
# costs no memory. Every image cdc decodes (prepare, the loader, score) opens here.

READ_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # never EPS (Ghostscript) or other plugins
MAX_PIXELS = 2**26  # 67 Mpx, e.g. 8192 x 8192: ~200 MB as RGB; far above any photo cdc trains on


class ImageRefused(ValueError):
    """A file is not an image cdc reads, or declares more than MAX_PIXELS pixels: `NAME: REASON`."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name}: {reason}")
        self.reason = reason  # without the name, for records that keep the path beside it


def open_image(src: bytes | str | os.PathLike, what: str | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open `src` (a file's bytes or its path; `what` names it in errors) lazily: header parsed,
    no pixel decoded. Raises ImageRefused for a format outside READ_FORMATS or a declared size
    above `max_pixels`; the caller's load()/convert() then decodes at most that many pixels."""
    name = what or (os.fsdecode(src) if not isinstance(src, bytes) else "image")
    fp = io.BytesIO(src) if isinstance(src, bytes) else src
    try:
        im = Image.open(fp, formats=READ_FORMATS)
    except UnidentifiedImageError:
        raise ImageRefused(name, f"not a recognised image format (cdc reads {', '.join(READ_FORMATS)})") from None
    except Image.DecompressionBombError as e:  # Pillow's own, higher limit, checked on the header
        n = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(n.group(1)):,}" if n else f"more than {max_pixels:,}"
        raise ImageRefused(name, f"declares {declared} pixels, above the limit of {max_pixels:,}") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageRefused(name, f"declares {w} x {h} = {w * h:,} pixels, above the limit of {max_pixels:,}")
    return im


# ---------------------------------------------------------------------------------------------
# encoding


def encode_png(arr: np.ndarray, compress: bool = True) -> bytes:
    """Lossless 8-bit PNG of (H, W) or (H, W, 3) uint8, about 3x faster than PIL's writer.

    Every row uses the "Up" filter (vectorised in numpy) and zlib Huffman-only coding: filtered
    residuals of natural images are small, so entropy coding alone gets close to PIL's level-1
    output size at a fraction of the time. compress=False stores the deflate blocks uncompressed
    (about 10x faster to write, shards 1.2-1.6x larger).
    """
    h, w = arr.shape[:2]
    c = 1 if arr.ndim == 2 else arr.shape[2]
    raw = np.ascontiguousarray(arr).reshape(h, w * c)
    f = np.empty((h, w * c + 1), np.uint8)  # (H, 1 + W*C): filter byte then the row
    f[:, 0] = 2
    f[0, 1:] = raw[0]
    np.subtract(raw[1:], raw[:-1], out=f[1:, 1:])  # uint8 wrap-around is what PNG "Up" means
    z = zlib.compressobj(1 if compress else 0, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = z.compress(f.tobytes()) + z.flush()

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if c == 1 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def top_side(side: int, expand: float, levels: int) -> int:
    """Side of the stored top level: side*expand rounded (half up) to a multiple of 2^(levels-1), >= side."""
    m = 2 ** (levels - 1)
    top = m * max(1, math.floor(side * expand / m + 0.5))
    return top if top >= side else m * math.ceil(side / m)


def pyramid(top: Image.Image, levels: int) -> list[Image.Image]:
    """[top, D(top), D^2(top), ...]: Image.reduce(f) is the f x f box mean rounded half up."""
    return [top] + [top.reduce(2**j) for j in range(1, levels)]


# ---------------------------------------------------------------------------------------------
# compact storage: a JPEG top level, lower levels exact box averages of the decoded top

# png: every level lossless PNG. webp: every level lossless WebP (RGB only). jpeg: the top level
# JPEG, each lower level the box average of the *decoded* JPEG stored losslessly (WebP for RGB,
# PNG for greyscale). jpeg-top: the JPEG top level alone; the loader box-averages the decoded top.
STORES = ("png", "webp", "jpeg", "jpeg-top")
LEVEL_EXTS = (".png", ".webp", ".jpg")


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def _lossless(im: Image.Image, webp: bool, squeeze: bool) -> tuple[str, bytes]:
    """(extension, bytes) of a lossless encoding; lossless WebP (method 0: fastest) needs RGB."""
    if webp and im.mode == "RGB":
        return "webp", _save(im, "WEBP", lossless=True, quality=0, method=0)
    return "png", encode_png(np.asarray(im), squeeze)


def encode_levels(
    top: Image.Image, levels: int, store: str = "png", squeeze: bool = False, quality: int = 95
) -> list[tuple[str, bytes]]:
    """[(f"{side}.{ext}", bytes), ...] top first: the stored levels of one sample.

    Every stored lower level equals `decoded(top).reduce(2^j)` exactly, where decoded(top) is the
    top level as the loader will decode it (the JPEG round trip for jpeg / jpeg-top).
    """
    if store not in STORES:
        raise ValueError(f"--store must be one of {list(STORES)}, got {store!r}")
    if store in ("png", "webp"):
        if store == "webp" and top.mode != "RGB":
            raise ValueError(f"--store webp needs RGB images, got mode {top.mode}; use png or jpeg")
        return [
            (f"{min(im.size)}.{ext}", body)
            for im in pyramid(top, levels)
            for ext, body in [_lossless(im, store == "webp", squeeze)]
        ]
    jpg = _save(top, "JPEG", quality=quality)
    out = [(f"{min(top.size)}.jpg", jpg)]
    if store == "jpeg":
        dec = Image.open(io.BytesIO(jpg))
        dec.load()
        for im in pyramid(dec, levels)[1:]:
            ext, body = _lossless(im, True, squeeze)
            out.append((f"{min(im.size)}.{ext}", body))
    return out


# ---------------------------------------------------------------------------------------------
# decoding one file, with every conversion named and every failure a skip reason


def _to_rgb(img: Image.Image, notes: list[str]) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale PNG/TIFF: rescale, don't clip
        a = np.asarray(img, dtype=np.int64).clip(0, 65535)
        notes.append("16-bit greyscale -> RGB")
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ValueError("floating-point image (mode F) has no defined 0..255 range")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        notes.append("palette -> RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            notes.append("alpha composited on white")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode == "RGB":
        return img
    notes.append(
        {"L": "greyscale -> RGB", "1": "bilevel -> RGB", "CMYK": "CMYK -> RGB"}.get(mode, f"{mode} -> RGB")
    )
    return img.convert("RGB")


def load_image(path: str, top: int, keep_aspect: int = 0) -> tuple[Image.Image | None, list[str], str | None]:
    """(top x top RGB image, conversion notes, None) or (None, [], skip reason). Never raises on bad files.

    keep_aspect=m > 0: the whole image instead, shorter side `top`, longer side a multiple of m
    (see resize_short_side).
    """
    notes: list[str] = []
    try:
        if os.path.getsize(path) == 0:
            return None, [], "empty file"
        with open(path, "rb") as f:
            data = f.read()
        img = open_image(data, path)
        ext = os.path.splitext(path)[1].lower()
        if _EXT_FORMAT.get(ext, img.format) != img.format:
            notes.append(f"mislabelled: {img.format} data in a {ext} file")
        if (
            img.format == "PNG"
            and img.mode in ("RGB", "RGBA")
            and img.tile
            and str(img.tile[0][3]).endswith(";16B")
        ):
            notes.append("16-bit -> 8-bit")
        if img.format == "JPEG":
            img.draft(img.mode, (top, top))  # DCT-domain downscale while decoding, never below top
        img.load()
        img = _to_rgb(img, notes)
        w, h = img.size
        if keep_aspect:
            img = resize_short_side(img, top, keep_aspect)
        elif (w, h) != (top, top):
            s = min(w, h)
            box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)  # centre square, resampled in one pass
            img = img.resize((top, top), Image.LANCZOS, box=box)
    except ImageRefused as e:  # the skip reason is recorded beside the path
        return None, [], e.reason
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as e:
        return None, [], f"unreadable or truncated: {e}"
    return img, notes, None


def resize_short_side(img: Image.Image, short: int, multiple: int) -> Image.Image:
    """Resize (LANCZOS) so the shorter side is `short`, keeping the aspect ratio (Table 7's Resize).

    The longer side is cut to a multiple of `multiple` (2^(levels-1), so every pyramid level is an
    exact box average), at least `short`: the resampling box drops at most multiple-1 output pixels,
    split evenly between both ends, so nothing is stretched.
    """
    w, h = img.size
    scale = short / min(w, h)
    wide = w > h
    exact = (w if wide else h) * scale
    long_ = max(short, multiple * math.floor(exact / multiple + 1e-9))
    length = w if wide else h
    span = min(long_ / scale, length)  # source pixels along the long axis that the output covers
    lo = max(0.0, (length - span) / 2)  # clamped: 288 / (288 / 500) is 500.00000000000006
    size = (long_, short) if wide else (short, long_)
    box = (lo, 0.0, lo + span, float(h)) if wide else (0.0, lo, float(w), lo + span)
    if size == (w, h):
        return img
    return img.resize(size, Image.LANCZOS, box=box)


def pad_idx(a: np.ndarray, top: int) -> Image.Image:
    """Zero-pad an idx image (value 0 = background) to top x top; odd margins put the extra pixel last."""
    h, w = a.shape
    if h > top or w > top:
        raise ValueError(f"idx images are {h}x{w}, larger than --side {top}; they are never resampled")
    py, px = (top - h) // 2, (top - w) // 2
    out = np.zeros((top, top), np.uint8)
    out[py : py + h, px : px + w] = a
    return Image.fromarray(out, "L")


# ---------------------------------------------------------------------------------------------
# one shard (runs in a worker process)
