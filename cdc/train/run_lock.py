"""One run per run directory: rank 0 holds an exclusive `flock` on `<run_dir>/.lock` for the whole
run, so a second `cdc train` pointed at the same folder is refused with one line naming the holder.

flock (not a pid file) because the kernel drops the lock when its holder dies, however it dies: a
run killed with SIGKILL, or a rank 0 that torchrun's elastic agent kills before restarting the
group, leaves nothing stale behind, and the resume that follows takes the lock again. The holder
(pid, host, start time, command) is written into the file after locking, only to be shown.

The file is opened without following a symlink (a planted `.lock -> ~/.bashrc` would otherwise be
truncated), readable by its owner only, and the command is recorded with `--set` values and other
secrets masked (cdc.redact): a lock is shown to whoever runs on the same folder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from cdc.fileio import display, warn
from cdc.redact import redact_argv

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
        "command": redact_argv(list(argv)),
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


def open_lock_file(path: Path) -> int:
    """The lock file's descriptor: created 0600, never through a symlink, and made 0600 if an older
    cdc left it 0644 (its record names the command that ran)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise ValueError(
            f"{display(path)} is a symbolic link, not a cdc run lock; nothing was written; "
            "remove the link (its target is left as it is) and run again"
        ) from None
    try:
        os.fchmod(fd, 0o600)
    except OSError:  # another user's lock in a shared folder: theirs to fix, the lock still works
        pass
    return fd


class RunLock:
    """The run directory's lock, held from `acquire` until `release` (or the `with` block's end, or
    this process's death). Only rank 0 acquires it; the other ranks hold an unused one."""

    def __init__(self) -> None:
        self.fd: int | None = None

    def acquire(self, run_dir: Path) -> str | None:
        """Take the lock on the existing `run_dir`; returns None, or the refusal line when another
        process holds it. A filesystem without locks is warned about, not refused."""
        path = run_dir / LOCK_NAME
        fd = open_lock_file(path)
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
