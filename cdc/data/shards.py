"""Shard files from `cdc prepare`: where they are (folder, folder URL, manifest, brace pattern, pipe: url),
what the manifest says, and the samples a tar holds, each failure one line naming the file.

The training loader (cdc.data.loader) and the evaluation reader (cdc.eval.evalio) read through
these; nothing here decodes an image.
"""

from __future__ import annotations

import json
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cdc.data.imageproc import LEVEL_EXTS
from cdc.data.reader import MAX_MEMBER_MB, is_url, member_too_big, open_stream, read_url
from cdc.fileio import BadFileError, bad_file, read_json


@dataclass
class ShardSet:
    """Where a run's shards are and what their manifest says."""

    spec: str  # data.shards as given (may hold credentials: print it only through redact)
    urls: list[str]  # each shard, in manifest (or pattern) order
    manifest: dict | None  # the `cdc prepare` manifest, None for a bare pattern or pipe: url
    folder: str | None  # where manifest.json (and index.npy) sit: a local folder or a URL ending in /


def resolve_shards(spec: str) -> ShardSet:
    """The shards of a local folder, manifest file, folder URL (s3://b/p/, https://h/p/, any fsspec
    scheme), brace pattern (paths or URLs) or pipe: command."""
    if spec.startswith("pipe:"):
        check_commands_allowed(spec)
    if is_url(spec) and "{" not in spec and not spec.endswith(".tar"):
        return _remote_folder(spec)
    p = Path(spec).expanduser()
    if p.is_dir() or p.name == "manifest.json":
        mpath = p / "manifest.json" if p.is_dir() else p
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{mpath} not found; run `cdc prepare` to create shards in {mpath.parent}"
            )
        manifest = _training_manifest(read_manifest(mpath), mpath)
        return ShardSet(spec, [str(mpath.parent / s["name"]) for s in manifest["shards"]], manifest, str(mpath.parent))
    from braceexpand import braceexpand

    urls = list(braceexpand(spec))
    if spec.startswith("pipe:") or "://" in spec:
        return ShardSet(spec, urls, None, None)
    mpath = Path(urls[0]).parent / "manifest.json"
    manifest = read_manifest(mpath) if mpath.is_file() else None
    missing = [u for u in urls if not Path(u).is_file()]
    if missing and len(urls) == 1:
        raise FileNotFoundError(
            f"data.shards={spec} not found; run `cdc prepare --src ... --out {spec}` first"
        )
    if missing:
        raise FileNotFoundError(f"shard {missing[0]} not found ({len(missing)} of {len(urls)} missing)")
    return ShardSet(spec, urls, manifest, str(mpath.parent) if manifest else None)


def _remote_folder(spec: str) -> ShardSet:
    """A folder URL (or its manifest.json's URL): the manifest is read from the server."""
    folder = spec[: -len("manifest.json")] if spec.endswith("/manifest.json") else spec.rstrip("/") + "/"
    murl = folder + "manifest.json"
    try:
        raw = read_url(murl)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{murl} not found; a folder URL needs the manifest.json of `cdc prepare` beside its shards "
            "(upload the whole prepared folder), or name the shards with a brace pattern"
        ) from None
    manifest = _training_manifest(parse_manifest(raw, murl), murl)
    return ShardSet(spec, [folder + s["name"] for s in manifest["shards"]], manifest, folder)


def _training_manifest(manifest: dict, where: object) -> dict:
    if not manifest.get("shards"):
        raise bad_file(where, "a manifest listing shards; run `cdc prepare` to completion")
    if lacking := [k for k in _TRAIN_KEYS if manifest.get(k) is None]:
        raise bad_file(where, "a complete `cdc prepare` manifest (re-run it to rewrite)", f"no {', '.join(lacking)}")
    return manifest


def check_commands_allowed(spec: str) -> None:
    """A pipe: url runs a shell command: only with the user's own opt-in, which no file can give."""
    if os.environ.get("CDC_ALLOW_PIPE") != "1":
        raise PermissionError(
            f"refusing to run the shard command {spec[5:]!r}: pipe: urls run programs, so they need "
            "your opt-in; pass --allow-pipe (or set CDC_ALLOW_PIPE=1) if you trust that command"
        )


def check_shard_name(name: str, where: object) -> None:
    """A manifest's shard name must be a plain file name in its folder: never a path, URL or command."""
    bad = (
        not name
        or any(c in name for c in "/\\:")
        or name.startswith(".")
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
    )
    if bad:
        raise bad_file(where, "a manifest whose shard names are plain file names (no /, \\, :, leading . or "
                       "control characters)", f"shard name {name!r}")


def read_manifest(path: Path) -> dict:
    """A `cdc prepare` manifest.json, or a one-line error naming it."""
    return _checked_manifest(read_json(path, MANIFEST), path)


def parse_manifest(raw: bytes, where: str) -> dict:
    """A manifest's bytes (e.g. fetched from a server), checked as read_manifest does."""
    try:
        m = json.loads(raw)
    except ValueError as e:
        raise bad_file(where, MANIFEST, e) from None
    return _checked_manifest(m, where)


MANIFEST = "a `cdc prepare` manifest (JSON with a 'shards' list); re-run `cdc prepare` to rewrite it"


def _checked_manifest(m: object, path: object) -> dict:
    expected = MANIFEST
    if not isinstance(m, dict) or not isinstance(m.get("shards", []), list):
        raise bad_file(path, expected)
    if any(not isinstance(s, dict) or not isinstance(s.get("name"), str) for s in m.get("shards", [])):
        raise bad_file(path, expected, "a shard entry has no name")
    for s in m.get("shards", []):
        check_shard_name(s["name"], path)
    if any(not _whole(s.get("count", 0)) for s in m.get("shards", [])) or not all(_whole(m.get(k, 0)) for k in _INT_KEYS):
        raise bad_file(path, expected, f"a count or one of {', '.join(_INT_KEYS)} is not a whole number")
    if not isinstance(m.get("levels", []), list) or not all(_whole(v) for v in m.get("levels", [])):
        raise bad_file(path, expected, "levels is not a list of sides")
    return m


_INT_KEYS = ("count", "channels", "num_classes", "side", "top")  # checked when present (score ref reads a
_TRAIN_KEYS = ("channels", "num_classes", "side", "top", "levels")  # count alone); training needs these


def _whole(v: object) -> bool:
    return type(v) is int and v >= 0


def read_tar(url: str, max_member: int = MAX_MEMBER_MB << 20) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {ext: bytes}) samples of a local, remote (fsspec URL) or allowed pipe: shard.

    A file that is not a tar archive, or one cut short, is a one-line BadFileError naming it; so
    is a member larger than `max_member` bytes, refused before it is read.
    """
    last = None
    try:
        for key, sample in _read_tar(url, max_member):
            last = key
            yield key, sample
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, FileNotFoundError | BadFileError):
            raise
        where = f"after sample {last}" if last is not None else "at its first sample"
        raise bad_file(
            url, f"a readable tar shard written by `cdc prepare` (cut short or corrupt {where}; re-run it "
            f"to rewrite, or set data.skip_bad: true to skip what cannot be read)", e
        ) from None


def _read_tar(url: str, max_member: int) -> Iterator[tuple[str, dict[str, bytes]]]:
    if url.startswith("pipe:"):
        check_commands_allowed(url)
    with open_stream(url) as stream:
        key, sample = None, {}
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                if m.size > max_member:
                    raise member_too_big(url, m.name, m.size, max_member)
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
