"""Commands stopped by SIGINT / SIGTERM: the exception the library raises after saving what it had,
the exit code the CLI maps it to, and SIGTERM made to unwind like Ctrl-C."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A command stopped by signal `signum` after saving what it had.

    A KeyboardInterrupt, so code that already cleans up on Ctrl-C (a sweep, `finally` blocks) does
    the same on SIGTERM. `saved`: what was kept, for the user; `info`: what a caller needs to build
    the command that continues (e.g. the output folder).
    """

    def __init__(self, signum: int, saved: str = "", **info: Any) -> None:
        super().__init__(saved)
        self.signum, self.saved, self.info = int(signum), saved, info


def exit_code(sig: int | str) -> int:
    """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM
    (`sig`: the number or the name)."""
    return 128 + int(signal.Signals[sig] if isinstance(sig, str) else sig)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def sigterm_raises() -> Callable[[], None]:
    """Make SIGTERM raise Interrupted(SIGTERM) like Ctrl-C raises KeyboardInterrupt (the default
    would end the process without running any cleanup); returns the function that restores the old
    handler. Does nothing outside the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    old = signal.signal(signal.SIGTERM, handle)
    return lambda: signal.signal(signal.SIGTERM, old)
