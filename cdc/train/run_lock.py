"""One run per run directory: rank 0 holds an exclusive `flock` on `<run_dir>/.lock` for the whole
run, so a second `cdc train` pointed at the same folder is refused with one line naming the holder.

flock (not a pid file) because the kernel drops the lock when its holder dies, however it dies: a
run killed with SIGKILL, or a rank 0 that torchrun's elastic agent kills before restarting the
group, leaves nothing stale behind, and the resume that follows takes the lock again. The holder
(pid, host, start time, command) is written into the file after locking, only to be shown.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cdc.fileio import warn

LOCK_NAME = ".lock"


class RunDirBusy(ValueError):
    """Another live process holds the run directory's lock (a ValueError: the CLI prints one line, exit 2)."""


def holder_info() -> dict[str, Any]:
    """Who this process is, as the refused run shows it."""
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(argv),
    }


def busy_message(run_dir: Path, raw: str) -> str:
    """The refusal line, from the holder's record (empty when it has locked but not written it yet)."""
    try:
        h = json.loads(raw)
        who = f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
    except (ValueError, KeyError, TypeError):
        who = "a process that has not recorded itself yet"
    return (
        f"{run_dir} is in use by another run: {who}; wait for it to end or stop it, "
        "or give this run another --run-dir"
    )


class RunLock:
    """The run directory's lock, held from `acquire` until `release` (or the `with` block's end, or
    this process's death). Only rank 0 acquires it; the other ranks hold an unused one."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, run_dir: Path) -> str | None:
        """Take the lock on the existing `run_dir`; returns None, or the refusal line when another
        process holds it. A filesystem without locks is warned about, not refused."""
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            return busy_message(run_dir, raw)
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            warn(f"{path}: this filesystem has no file locks ({e.strerror}); a second run on this run dir would not be refused")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder_info()) + "\n").encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        """Clear the holder's record and drop the lock (closing the descriptor drops it)."""
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:  # nothing to keep: the record is only shown to a refused run
                pass
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
