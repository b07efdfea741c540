"""Output paths users name (`--out`, `--run-dir`): checked before any work starts.

A path that is a file, or lies under one, or on a read-only disk, is one line naming it and what to do,
instead of an OSError about an internal temporary file (`.samples.json.tmp.123`) minutes later.
Nothing is created here: a command that fails later leaves no empty folder behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from cdc.fileio import display


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
