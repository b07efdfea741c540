"""Reading the small files users hand us (JSON, YAML) and naming the ones that are not what they claim.

Every reader here raises `BadFileError` (a ValueError, so the CLI prints it as one line with exit
code 2) whose message names the file and what was expected, instead of a decoder's message that
names neither. Also: how a file name that is not valid UTF-8 (legal on Linux, where names are
bytes) is shown and recorded losslessly.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class BadFileError(ValueError):
    """A file exists but is not what the caller expected; the message names it in one line."""


def one_line(e: BaseException | str) -> str:
    """The first meaningful line of an exception message (decoders and torch write paragraphs),
    secrets masked (cdc.redact): a tool's error may quote a URL or command line with a token."""
    from cdc.redact import redact

    text = redact(str(e)).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the cause is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0].strip() if text else type(e).__name__


def warn(msg: str) -> None:
    """One `warning: MSG` line on stderr: Python's warnings format adds a file name, a line number
    and a source line that mean nothing to a user, and shows a repeated warning only once."""
    from cdc.redact import redact

    print(f"warning: {redact(msg)}", file=sys.stderr, flush=True)


def bad_file(path: str | os.PathLike, expected: str, cause: BaseException | str | None = None) -> BadFileError:
    """`PATH: not EXPECTED (cause)`: e.g. bad_file(p, "a cdc checkpoint (.pt from `cdc train`)", e)."""
    from cdc.redact import redact

    why = f" ({one_line(cause)})" if cause is not None else ""
    return BadFileError(redact(f"{display(path)}: not {expected}{why}"))  # a shard path may be a URL


def read_json(path: str | os.PathLike, expected: str) -> Any:
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_file(path, expected, e) from None


def read_json_object(path: str | os.PathLike, expected: str) -> dict[str, Any]:
    """read_json for a file that must hold a JSON object (a list or a number there is as bad as noise)."""
    obj = read_json(path, expected)
    if not isinstance(obj, dict):
        raise bad_file(path, expected, f"a JSON {type(obj).__name__.replace('NoneType', 'null')}, not an object")
    return obj


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# a write that fails part-way (disk full, quota, I/O error) leaves the previous file untouched, no
# temp file behind, and one line naming what failed and which folder needs room: the raw error names
# a hidden temp file, and torch.save hides ENOSPC behind "enforce fail at inline_container.cc".

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
DISK_ERRNOS = (*NO_SPACE, errno.EIO)


class WriteFailedError(OSError):
    """A file could not be written (errno kept); str() is the one-line message, nothing else."""

    def __str__(self) -> str:
        return str(self.strerror)


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover - unreachable


def disk_errno(e: BaseException) -> int | None:
    """ENOSPC / EDQUOT / EIO if `e` or an exception it was raised from is one, else None."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in DISK_ERRNOS:
            return cur.errno
        cur = cur.__cause__ or cur.__context__
    return None


def write_failed(
    path: str | os.PathLike, what: str, code: int, need: int | None, written: int = 0, then: str = "run again"
) -> WriteFailedError:
    """The one-line error for `what` (e.g. "checkpoint") at `path` failing with errno `code`.

    need: roughly how many bytes the file takes (None: unknown, then `written`, the bytes that fit
    before the failure, is given as a lower bound). then: what to do once the disk is fixed.
    """
    folder = Path(path).parent
    shown = f"{what} {display(path)}"
    if code not in NO_SPACE:
        return WriteFailedError(
            code,
            f"I/O error writing {shown} ({os.strerror(code)}); the disk holding {display(folder)} may be "
            f"failing or gone; nothing was replaced; check the disk and {then}",
        )
    try:
        free = f", {human_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    size = f"about {human_bytes(need)}" if need else f"more than {human_bytes(written)}"
    word = "disk quota exceeded" if code == errno.EDQUOT else "no space left on device"
    return WriteFailedError(
        code,
        f"{word} writing {shown} (needs {size}{free}); nothing was replaced; "
        f"free space in {display(folder)} (or write elsewhere) and {then}",
    )


def temp_name(path: Path) -> Path:
    """The hidden temp file an atomic writer fills before renaming it to `path`."""
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


@contextlib.contextmanager
def cleaned_on_failure(
    path: Path, tmp: Path, what: str, need: int | Callable[[int], int | None] | None = None, then: str = "run again"
) -> Iterator[Path]:
    """Yield `tmp`; if the body fails, delete `tmp` and turn a disk error into a `write_failed` line.

    need: the file's rough size in bytes, or a function of the bytes written when it failed (a
    streamed file whose size is known only as it goes), or None.
    """
    try:
        yield tmp
    except BaseException as e:
        try:
            written = tmp.stat().st_size
            tmp.unlink()
        except OSError:
            written = 0
        code = disk_errno(e)
        if code is None or isinstance(e, WriteFailedError):
            raise
        size = need(written) if callable(need) else need
        raise write_failed(path, what, code, size, written, then) from e


@contextlib.contextmanager
def atomic_temp(
    path: str | os.PathLike, what: str, need: int | None = None, then: str = "run again"
) -> Iterator[Path]:
    """Yield a temp path for the caller to write `path`'s new content to; on success it is renamed
    over `path` (readers see old or new, never half). On failure `path` is untouched, the temp file
    is deleted, and a disk error (ENOSPC, EDQUOT, EIO) leaves as a one-line WriteFailedError."""
    path = Path(path)
    with cleaned_on_failure(path, temp_name(path), what, need, then) as tmp:
        yield tmp
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, what: str = "file") -> None:
    """Write `data` to `path` via a temp file + fsync + rename: readers see old or new, never half;
    a failed write leaves the old file and no temp file (see atomic_temp)."""
    with atomic_temp(path, what, len(data)) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1, what: str = "file") -> None:
    """Write JSON atomically (temp file + fsync + rename): readers see the old file or the new one."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=indent) + "\n").encode(), what)


def read_yaml(path: str | os.PathLike, expected: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise bad_file(path, f"valid YAML text: {expected}", e) from None
    except yaml.YAMLError as e:
        raise bad_file(path, f"valid YAML: {expected}", e) from None


def display(path: str | os.PathLike) -> str:
    """A printable, strict-UTF-8 form of a path: undecodable bytes shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_utf8(path: str | os.PathLike) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def path_record(path: str | os.PathLike) -> dict[str, str]:
    """JSON-safe record of a path: `path` to read, plus `path_hex` (its raw bytes) when not UTF-8."""
    rec = {"path": display(path)}
    if not is_utf8(path):
        rec["path_hex"] = os.fsencode(path).hex()
    return rec


# ---------------------------------------------------------------------------------------------
# output paths users name (`--out`, `--run-dir`), checked before any work starts: a path that is a
# file, lies under one, or is on a read-only disk is one line naming it and what to do, instead of an
# OSError about an internal temporary file minutes later. Nothing is created here.


def _nearest_existing(p: Path) -> Path:
    """`p` or its closest ancestor that exists (a relative path ends at '.')."""
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _why_not_writable(folder: Path) -> str | None:
    """None if files can be created in `folder`, else the reason in a few words."""
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    return "permission denied"


def check_out_path(path: str | os.PathLike, option: str, kind: str = "folder") -> None:
    """Raise ValueError (one line) unless `path` can be made or written as a `kind` ("folder" or "file").

    A folder may exist (commands that refuse a non-empty one say so themselves); a file's folder must
    allow creating files, since every writer here writes a temporary file next to it and renames.
    """
    p = Path(path)
    shown = display(p)
    fix = f"choose another {option}"
    if kind == "file":
        if p.is_dir():
            raise ValueError(f"{option} {shown} is a folder, not a file path; {fix}")
        folder = p.parent
    else:
        folder = p
    q = _nearest_existing(folder)
    if not q.is_dir():
        where = "is a file, not a folder" if q == p else f"is not writable: {display(q)} is a file, not a folder"
        raise ValueError(f"{option} {shown} {where}; {fix}")
    why = _why_not_writable(q)
    if why:
        at = "" if q == p else f" at {display(q)}"
        raise ValueError(f"{option} {shown} is not writable ({why}{at}); {fix}")
