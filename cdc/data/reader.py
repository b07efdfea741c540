"""Random access to the samples of tar shards, local or remote, by their (offset, length) in the tar.

A sample's members (`<key>.cls`, `<key>.64.png`, ...) are contiguous in its shard, so one read
of `length` bytes at `offset` holds them all: the loader reads exactly the samples it trains on,
whatever else the shard holds. Local files are read with os.pread; URLs (s3://, gs://,
http(s)://, any fsspec scheme) with one ranged read per sample through fsspec, or, with a cache
folder, from a local copy of the whole shard fetched once (kept under a size cap); `pipe:` shards
(a command's output, which cannot seek) always go through the cache.

`scan_tar` builds the index of a shard that has none (shards from other tools or earlier cdc
versions): it walks the tar headers, seeking past the bodies where the file can seek.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cdc.fileio import BadFileError, bad_file

MAX_MEMBER_MB = 256  # default cap on one tar member (data.max_member_mb): a bomb is refused, not read


def is_url(spec: str) -> bool:
    """A location fsspec opens (scheme://...), not a local path or a pipe: command."""
    return "://" in spec and not spec.startswith(("pipe:", "file://"))


def _fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a URL; a missing protocol package is one line naming the extra."""
    import fsspec

    scheme = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        extra = {"s3": "s3", "http": "http", "https": "http", "gs": "gcs", "gcs": "gcs"}.get(scheme)
        how = f"pip install 'cdc[{extra}]'" if extra else f"install the fsspec package for {scheme}://"
        raise ValueError(f"reading {scheme}:// shards needs a package that is not installed ({e}); {how}") from None


def read_url(url: str, start: int | None = None, end: int | None = None) -> bytes:
    """Bytes [start, end) of a remote file (the whole file without a range)."""
    fs, path = _fs(url)
    return fs.cat_file(path, start=start, end=end)


def open_stream(url: str) -> IO[bytes]:
    """A binary stream of a local file, URL or (allowed) pipe: command."""
    if url.startswith("pipe:"):
        from webdataset import gopen

        return gopen(url, "rb")
    if is_url(url):
        fs, path = _fs(url)
        return fs.open(path, "rb", block_size=1 << 22)
    return open(url, "rb")


def parse_sample(buf: bytes, where: str, max_member: int) -> tuple[str, dict[str, bytes]]:
    """(key, {ext: bytes}) from the tar members of one sample (the bytes the index points at).

    Handles the GNU long-name entries `cdc prepare` writes for long keys; anything else that is
    not a plain file is skipped, as the streaming reader does.
    """
    key, sample, pos, long_name = None, {}, 0, None
    while pos + 512 <= len(buf):
        hdr = buf[pos : pos + 512]
        if hdr == _ZERO_BLOCK:
            break
        name, size, kind = _header(hdr, where)
        if size > max_member:
            raise member_too_big(where, name, size, max_member)
        body = buf[pos + 512 : pos + 512 + size]
        if len(body) != size:
            raise bad_file(where, "a whole tar sample (it is cut short)")
        pos += 512 + -(-size // 512) * 512
        if kind == tarfile.GNUTYPE_LONGNAME:
            long_name = body.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        name, long_name = long_name or name, None
        if kind not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            continue
        base = os.path.basename(name)
        k, _, ext = base.partition(".")
        k = os.path.join(os.path.dirname(name), k)
        if key is not None and k != key:
            raise bad_file(where, "one sample per index entry", f"members of {key} and {k}")
        key, sample[ext] = k, body
    if key is None:
        raise bad_file(where, "a tar sample (the index points at no member)")
    return key, sample


_ZERO_BLOCK = bytes(512)


def _header(hdr: bytes, where: str) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header, its checksum verified: tarfile.TarInfo.frombuf
    parses every field and cost a third of the loader's time on small images."""
    try:
        stored = int(hdr[148:156].rstrip(b"\0 ").decode() or "-1", 8)
        size_field = hdr[124:136]
        size = int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80 else int(size_field.rstrip(b"\0 ").decode() or "0", 8)
    except ValueError as e:
        raise bad_file(where, "a tar sample whose headers parse (the index points at a header)", e) from None
    if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # the checksum counts its own field as spaces
        raise bad_file(where, "a tar sample whose headers parse (the index points at a header)", "bad checksum")
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar" and hdr[345] and hdr[257:265] != b"ustar  \0":  # POSIX ustar: a name prefix
        name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape"), size, hdr[156:157]


def member_too_big(where: str, name: str, size: int, cap: int) -> BadFileError:
    return bad_file(
        where,
        f"tar members of at most {cap >> 20} MB (data.max_member_mb)",
        f"member {name} declares {size >> 20} MB; raise data.max_member_mb if the shard is yours",
    )


@dataclass(frozen=True)
class Indexed:
    """One sample of a shard as its headers give it."""

    key: str
    offset: int  # byte offset of its first member's header
    length: int  # bytes up to the end of its last member
    exts: list[str]  # member extensions, e.g. ["cls", "8.png", "16.png"]


def scan_tar(url: str, max_member: int) -> list[Indexed]:
    """Every sample in a shard, in order, read from its headers alone.

    A file that is not a tar, or is cut short, keeps the samples before the damage; a cut-short
    sample is left out (`skip_bad` then sees fewer samples, and without it the error comes when
    the loader reaches a sample it cannot read). The bytes read are the headers where the
    stream can seek, the whole shard otherwise (remote and pipe: shards).
    """
    out: list[Indexed] = []
    with open_stream(url) as f:
        mode = "r:" if getattr(f, "seekable", lambda: False)() else "r|"
        try:
            with tarfile.open(fileobj=f, mode=mode) as tar:
                key, start, end, exts = None, 0, 0, []
                for m in tar:
                    if m.size > max_member:
                        raise member_too_big(url, m.name, m.size, max_member)
                    if not m.isfile():
                        continue
                    base = os.path.basename(m.name)
                    k = os.path.join(os.path.dirname(m.name), base.partition(".")[0])
                    if k != key:
                        if key is not None:
                            out.append(Indexed(key, start, end - start, exts))
                        key, start, exts = k, m.offset, []
                    exts.append(base.partition(".")[2])
                    end = m.offset_data + -(-m.size // 512) * 512
                if key is not None:
                    out.append(Indexed(key, start, end - start, exts))
        except (tarfile.TarError, EOFError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            if not out:
                raise bad_file(url, "a tar shard (its first header does not parse)", e) from None
            out.pop()  # the sample being read when the damage came may be cut short
    return out


class ShardFiles:
    """Reads byte ranges of shards for one process: local files by pread through a few open
    descriptors, URLs by ranged reads or through a local cache of whole shards."""

    def __init__(self, urls: list[str], cache_dir: str | None = None, cache_gb: float = 0.0, open_files: int = 64):
        self.urls, self.open_files = urls, open_files
        self.cache = ShardCache(cache_dir, cache_gb) if cache_dir or any(u.startswith("pipe:") for u in urls) else None
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._remote: dict[int, tuple[Any, str]] = {}  # shard -> (fsspec filesystem, path), resolved once
        self.bytes_read = 0  # every byte this process read from shards (tests and benchmarks count it)

    def read(self, shard: int, offset: int, length: int) -> bytes:
        url = self.urls[shard]
        local = url if not (is_url(url) or url.startswith("pipe:")) else None
        if local is None and self.cache is not None:
            local = self.cache.local_copy(url)
        if local is None:
            fs, path = self._fs_path(shard)
            data = fs.cat_file(path, start=offset, end=offset + length)
        else:
            data = os.pread(self._fd(local), length, offset)
        checked = self._checked((shard, offset, length), data)
        if isinstance(checked, BaseException):
            raise checked
        return checked

    def read_many(self, ranges: list[tuple[int, int, int]]) -> list[bytes | BaseException]:
        """Bytes of each (shard, offset, length), or the error reading it. Remote ranges without a
        cache are fetched concurrently (one batch's worth at once), so a latency-bound store costs
        about one round trip per chunk rather than per sample."""
        out: list[bytes | BaseException | None] = [None] * len(ranges)
        remote = [i for i, (s, _, _) in enumerate(ranges) if is_url(self.urls[s]) and self.cache is None]
        if len(remote) > 1:
            fs = self._fs_path(ranges[remote[0]][0])[0]  # the shards of a run share one store
            paths = [self._fs_path(ranges[i][0])[1] for i in remote]
            starts = [ranges[i][1] for i in remote]
            ends = [ranges[i][1] + ranges[i][2] for i in remote]
            got = fs.cat_ranges(paths, starts, ends, on_error="return")
            for i, data in zip(remote, got):
                out[i] = data if isinstance(data, BaseException) else self._checked(ranges[i], data)
        for i, r in enumerate(ranges):
            if out[i] is None:
                try:
                    out[i] = self.read(*r)
                except (OSError, ValueError) as e:
                    out[i] = e
        return out  # type: ignore[return-value]

    def _fs_path(self, shard: int) -> tuple[Any, str]:
        if shard not in self._remote:
            self._remote[shard] = _fs(self.urls[shard])
        return self._remote[shard]

    def _checked(self, r: tuple[int, int, int], data: bytes) -> bytes | BaseException:
        url, (_, offset, length) = self.urls[r[0]], r
        self.bytes_read += len(data)
        if len(data) > length:
            return ValueError(
                f"{url.split('://', 1)[0]}:// server sent {len(data)} bytes for a {length}-byte range: it does "
                "not serve byte ranges; set data.cache_dir to read whole shards from a local copy"
            )
        if len(data) != length:
            return bad_file(url, f"a shard holding the bytes its index names (cut short before byte {offset + length})")
        return data

    def _fd(self, path: str) -> int:
        if path in self._fds:
            self._fds.move_to_end(path)
            return self._fds[path]
        fd = os.open(path, os.O_RDONLY)
        self._fds[path] = fd
        while len(self._fds) > self.open_files:
            os.close(self._fds.popitem(last=False)[1])
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class ShardCache:
    """Whole shards copied to a local folder on first use, evicted least-recently-used past a cap.

    Copies are written to a temporary name and renamed, so readers (other workers, ranks on the
    node) never see half a shard; a cap of 0 keeps everything. `pipe:` shards without a cache
    folder go to a private temporary one.
    """

    def __init__(self, folder: str | None, cap_gb: float):
        self.folder = Path(folder or tempfile.mkdtemp(prefix="cdc-shards-")).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cap = int(cap_gb * 2**30)

    def local_copy(self, url: str) -> str:
        name = hashlib.sha256(url.encode()).hexdigest()[:24] + ".tar"
        path = self.folder / name
        if path.is_file():
            os.utime(path)  # recently used
            return str(path)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        try:
            with open_stream(url) as src, open(tmp, "wb") as dst:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    dst.write(chunk)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._evict(keep=path)
        return str(path)

    def _evict(self, keep: Path) -> None:
        if not self.cap:
            return
        files = sorted((p for p in self.folder.glob("*.tar") if p != keep), key=lambda p: p.stat().st_mtime)
        used = sum(p.stat().st_size for p in files) + keep.stat().st_size
        for p in files:
            if used <= self.cap:
                break
            used -= p.stat().st_size
            p.unlink(missing_ok=True)

