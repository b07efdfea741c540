"""Shard files from `cdc prepare`: where they are (directory, manifest, brace pattern, pipe: url),
what the manifest says, and the samples a tar holds, each failure one line naming the file.

The training loader (cdc.data.loader) and the evaluation reader (cdc.eval.evalio) read through
these; nothing here decodes an image.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from cdc.data.imageproc import LEVEL_EXTS
from cdc.fileio import bad_file, read_json


def resolve_shards(spec: str) -> tuple[list[str], dict | None]:
    """Shard URLs and the manifest (if found) of a directory, manifest file, brace pattern or pipe: url."""
    p = Path(spec).expanduser()
    if p.is_dir() or p.name == "manifest.json":
        mpath = p / "manifest.json" if p.is_dir() else p
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{mpath} not found; run `cdc prepare` to create shards in {mpath.parent}"
            )
        manifest = read_manifest(mpath)
        if not manifest.get("shards"):
            raise bad_file(mpath, "a manifest listing shards; run `cdc prepare` to completion")
        if lacking := [k for k in _TRAIN_KEYS if manifest.get(k) is None]:
            raise bad_file(mpath, "a complete `cdc prepare` manifest (re-run it to rewrite)", f"no {', '.join(lacking)}")
        return [str(mpath.parent / s["name"]) for s in manifest["shards"]], manifest
    from braceexpand import braceexpand

    urls = list(braceexpand(spec))
    manifest = None
    if not spec.startswith("pipe:") and "://" not in spec:
        mpath = Path(urls[0]).parent / "manifest.json"
        manifest = read_manifest(mpath) if mpath.is_file() else None
        missing = [u for u in urls if not Path(u).is_file()]
        if missing and len(urls) == 1:
            raise FileNotFoundError(
                f"data.shards={spec} not found; run `cdc prepare --src ... --out {spec}` first"
            )
        if missing:
            raise FileNotFoundError(f"shard {missing[0]} not found ({len(missing)} of {len(urls)} missing)")
    return urls, manifest


def read_manifest(path: Path) -> dict:
    """A `cdc prepare` manifest.json, or a one-line error naming it."""
    expected = "a `cdc prepare` manifest (JSON with a 'shards' list); re-run `cdc prepare` to rewrite it"
    m = read_json(path, expected)
    if not isinstance(m, dict) or not isinstance(m.get("shards", []), list):
        raise bad_file(path, expected)
    if any(not isinstance(s, dict) or not isinstance(s.get("name"), str) for s in m.get("shards", [])):
        raise bad_file(path, expected, "a shard entry has no name")
    if any(not _whole(s.get("count", 0)) for s in m.get("shards", [])) or not all(_whole(m.get(k, 0)) for k in _INT_KEYS):
        raise bad_file(path, expected, f"a count or one of {', '.join(_INT_KEYS)} is not a whole number")
    if not isinstance(m.get("levels", []), list) or not all(_whole(v) for v in m.get("levels", [])):
        raise bad_file(path, expected, "levels is not a list of sides")
    return m


_INT_KEYS = ("count", "channels", "num_classes", "side", "top")  # checked when present (score ref reads a
_TRAIN_KEYS = ("channels", "num_classes", "side", "top", "levels")  # count alone); training needs these


def _whole(v: object) -> bool:
    return type(v) is int and v >= 0


def read_tar(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) samples from any location webdataset's gopen opens.

    A file that is not a tar archive, or one cut short, is a one-line BadFileError naming it.
    """
    last = None
    try:
        for key, sample in _read_tar(url):
            last = key
            yield key, sample
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        where = f"after sample {last}" if last is not None else "at its first sample"
        raise bad_file(
            url, f"a readable tar shard written by `cdc prepare` (cut short or corrupt {where}; re-run it "
            f"to rewrite, or set data.skip_bad: true to skip what cannot be read)", e
        ) from None


def _read_tar(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    from webdataset import gopen

    stream = gopen(url, "rb")
    try:
        key, sample = None, {}
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = os.path.basename(m.name)
                k, _, ext = base.partition(".")
                k = os.path.join(os.path.dirname(m.name), k)
                if k != key:
                    if key is not None:
                        yield key, sample
                    key, sample = k, {}
                sample[ext] = tar.extractfile(m).read()
            if key is not None:
                yield key, sample
    finally:
        stream.close()


def level_bytes(sample: dict[str, bytes], side: int) -> tuple[bytes, int]:
    """(encoded image, box factor) for the level of `side`: the stored level (factor 1), or for
    `--store jpeg-top` shards the JPEG top level, which the collate box-averages by the factor."""
    for ext in LEVEL_EXTS:
        body = sample.get(f"{side}{ext}")
        if body is not None:
            return body, 1
    tops = [int(k[:-4]) for k in sample if k.endswith(".jpg") and k[:-4].isdigit()]
    if len(tops) == 1 and tops[0] % side == 0:
        return sample[f"{tops[0]}.jpg"], tops[0] // side
    raise ValueError(f"shard sample has no level {side} px (members: {sorted(sample)}); re-run cdc prepare")
