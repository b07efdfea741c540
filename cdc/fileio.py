"""Reading the small files users hand us (JSON, YAML) and naming the ones that are not what they claim.

Every reader here raises `BadFileError` (a ValueError, so the CLI prints it as one line with exit
code 2) whose message names the file and what was expected, instead of a decoder's message that
names neither. Also: how a file name that is not valid UTF-8 (legal on Linux, where names are
bytes) is shown and recorded losslessly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


class BadFileError(ValueError):
    """A file exists but is not what the caller expected; the message names it in one line."""


def one_line(e: BaseException | str) -> str:
    """The first meaningful line of an exception message (decoders and torch write paragraphs)."""
    text = str(e).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the cause is the last line
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0].strip() if text else type(e).__name__


def warn(msg: str) -> None:
    """One `warning: MSG` line on stderr: Python's warnings format adds a file name, a line number
    and a source line that mean nothing to a user, and shows a repeated warning only once."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def bad_file(path: str | os.PathLike, expected: str, cause: BaseException | str | None = None) -> BadFileError:
    """`PATH: not EXPECTED (cause)`: e.g. bad_file(p, "a cdc checkpoint (.pt from `cdc train`)", e)."""
    why = f" ({one_line(cause)})" if cause is not None else ""
    return BadFileError(f"{display(path)}: not {expected}{why}")


def read_json(path: str | os.PathLike, expected: str) -> Any:
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_file(path, expected, e) from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file + fsync + rename: readers see old or new, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike, obj: Any, indent: int = 1) -> None:
    """Write JSON atomically (temp file + fsync + rename): readers see the old file or the new one."""
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=indent) + "\n").encode())


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
