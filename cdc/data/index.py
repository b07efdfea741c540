"""The per-sample index of a shard set: where each sample's bytes sit in its tar.

`cdc prepare` writes it as `index.npy` beside the manifest (rows in manifest shard order,
columns byte offset and length; the manifest records its sha256). Shards without one (tars
written by other tools or without an index, brace patterns and pipe: urls without a manifest)
are indexed once by reading their tar headers, and the result is cached (by default beside the
run), so a restart reads no shard bytes before its resume point.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdc.data.imageproc import LEVEL_EXTS
from cdc.data.reader import is_url, read_url, scan_tar
from cdc.data.shards import ShardSet
from cdc.fileio import atomic_write_bytes, bad_file, warn

INDEX_FILE = "index.npy"


@dataclass
class SampleIndex:
    """Byte ranges of every sample: sample id s (shard-major, manifest order) is bytes
    [offset[s], offset[s] + length[s]) of shard `shard_of(s)`."""

    counts: list[int]  # samples per shard
    offset: np.ndarray  # (N,) int64
    length: np.ndarray  # (N,) int64
    levels: list[int] | None = None  # stored level sides of the first sample (an index pass sees them)

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])  # shard -> first id


def index_bytes(rows: np.ndarray) -> bytes:
    """The .npy bytes of an (N, 2) int64 index (deterministic: equal rows give equal bytes)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, dtype="<i8"), allow_pickle=False)
    return buf.getvalue()


def load_index(shards: ShardSet, cache_dir: str | os.PathLike | None, max_member: int) -> SampleIndex:
    """The index the manifest names, a cached index pass, or a fresh index pass (then cached)."""
    m = shards.manifest
    if m and isinstance(m.get("index"), dict) and shards.folder:
        return _manifest_index(shards)
    cache = Path(cache_dir or _user_cache()).expanduser() / f"index-{_cache_key(shards.urls)}.npz"
    if cache.is_file():
        got = _read_cache(cache, len(shards.urls))
        if _agrees(got, m):
            return got
    rows, levels = _index_pass(shards, max_member)
    cache.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, rows=rows, levels=np.asarray(levels, dtype=np.int64))
    atomic_write_bytes(cache, buf.getvalue(), "data index")
    got = SampleIndex(_counts_of(rows[:, 0], len(shards.urls)), rows[:, 1].copy(), rows[:, 2].copy(), levels)
    if m and not _agrees(got, m):
        warn(f"the shards hold {sum(got.counts)} readable samples where their manifest lists "
             f"{sum(s.get('count', 0) for s in m['shards'])}; training on the readable ones")
    return got


def _read_cache(path: Path, shards: int) -> SampleIndex:
    try:
        with np.load(path, allow_pickle=False) as z:
            rows, levels = z["rows"], z["levels"].tolist()
    except (ValueError, OSError, EOFError, KeyError) as e:
        raise bad_file(path, "a cdc index cache (.npz); delete it to index the shards again", e) from None
    if rows.dtype != np.int64 or rows.ndim != 2 or rows.shape[1] != 3 or (rows < 0).any() or rows[:, 0].max() >= shards:
        raise bad_file(path, "a cdc index cache of [shard, offset, length] rows; delete it to index the shards again")
    return SampleIndex(_counts_of(rows[:, 0], shards), rows[:, 1].copy(), rows[:, 2].copy(), levels)


def _manifest_index(shards: ShardSet) -> SampleIndex:
    """index.npy as the manifest records it (sha256 and row count must match), cut to the shards
    named (a brace pattern may name some of a prepared folder's shards)."""
    m, rec = shards.manifest, shards.manifest["index"]
    where = shards.folder + INDEX_FILE if is_url(shards.folder) else str(Path(shards.folder) / INDEX_FILE)
    raw = read_url(where) if is_url(where) else Path(where).read_bytes()
    if hashlib.sha256(raw).hexdigest() != rec.get("sha256"):
        raise bad_file(where, "the index.npy its manifest.json records (sha256 differs); re-run `cdc prepare`")
    counts = [int(s["count"]) for s in m["shards"]]
    rows = _parse(raw, where, sum(counts))
    if rows.shape[1] != 2:
        raise bad_file(where, "an (N, 2) index of byte offsets and lengths")
    first = dict(zip((s["name"] for s in m["shards"]), np.cumsum([0, *counts]).tolist()))
    count = dict(zip((s["name"] for s in m["shards"]), counts))
    names = [u.rsplit("/", 1)[-1] for u in shards.urls]
    if any(n not in first for n in names):
        raise bad_file(where, "an index of the shards named", "a shard is not in its manifest; re-run `cdc prepare`")
    picked = np.concatenate([rows[first[n] : first[n] + count[n]] for n in names])
    return SampleIndex([count[n] for n in names], picked[:, 0].copy(), picked[:, 1].copy())


def _parse(raw: bytes, where: str, rows: int) -> np.ndarray:
    try:
        a = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise bad_file(where, "a cdc sample index (.npy of int64)", e) from None
    if a.dtype != np.int64 or a.ndim != 2 or len(a) != rows or (a < 0).any():
        raise bad_file(where, f"a cdc sample index of {rows} int64 rows", f"{a.dtype} {a.shape}")
    return a


def _index_pass(shards: ShardSet, max_member: int) -> tuple[np.ndarray, list[int]]:
    """(N, 3) rows [shard, offset, length] read from every shard's tar headers, and the level
    sides the first sample stores."""
    rows, exts = [], []
    for i, url in enumerate(shards.urls):
        found = scan_tar(url, max_member)
        rows += [(i, s.offset, s.length) for s in found]
        exts = exts or (found[0].exts if found else [])
    if not rows:
        raise ValueError(f"data.shards={shards.spec!r} holds no samples; check the shards or re-run cdc prepare")
    levels = sorted(int(e.split(".")[0]) for e in exts if e.endswith(LEVEL_EXTS) and e.split(".")[0].isdigit())
    return np.asarray(rows, dtype=np.int64), levels


def _counts_of(shard_col: np.ndarray, shards: int) -> list[int]:
    return np.bincount(shard_col, minlength=shards).astype(int).tolist()


def _agrees(index: SampleIndex, manifest: dict | None) -> bool:
    if not manifest:
        return True
    return index.counts == [int(s.get("count", -1)) for s in manifest["shards"]]


def _cache_key(urls: list[str]) -> str:
    """Names and, for local files, sizes and modification times: a rewritten shard is indexed anew."""
    h = hashlib.sha256()
    for u in urls:
        st = os.stat(u) if not (is_url(u) or u.startswith("pipe:")) else None
        h.update(f"{u}\0{st.st_size if st else ''}\0{st.st_mtime_ns if st else ''}\n".encode())
    return h.hexdigest()[:24]


def _user_cache() -> Path:
    """CDC_CACHE_DIR, else $XDG_CACHE_HOME/cdc (~/.cache/cdc)."""
    if os.environ.get("CDC_CACHE_DIR"):
        return Path(os.environ["CDC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cdc"
