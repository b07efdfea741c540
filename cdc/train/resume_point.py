"""One resume point for every rank, and saves whose failure every rank sees.

On a cluster the run folder is a shared filesystem whose listings can be stale, or not shared at
all: ranks that each picked their own newest checkpoint could resume different steps, and DDP
would re-broadcast only the weights, leaving optimizer moments, EMA, step and data position to
differ silently. So rank 0 chooses, every rank loads that file (memory-mapped: the pages are
shared through the page cache, not copied per rank), and the ranks compare a checksum of what
they then hold. Any failure is agreed: every rank stops with the same one line.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cdc.fileio import one_line
from cdc.train import checkpoint as ckpt
from cdc.train import distributed as D


class ResumeMismatchError(ValueError):
    """Ranks hold different training states after a resume; the message names them."""


class SaveFailedError(OSError):
    """Rank 0 could not write a checkpoint; every rank raises this, with rank 0's one line."""


def choose(ckpt_dir: Path, main: bool) -> tuple[dict[str, Any] | None, Path | None]:
    """(rank 0's loaded state, the path every rank resumes from); (None, None) for a fresh run."""
    state, choice = None, {"path": None, "error": None}
    if main:
        try:
            found = ckpt.load_latest(ckpt_dir, need=ckpt.RESUME_KEYS, mmap=True)
        except (OSError, ValueError) as e:
            found, choice["error"] = None, one_line(e)
        if found is None and choice["error"] is None and ckpt.list_checkpoints(ckpt_dir):
            # starting over here would let pruning delete the new checkpoints in favour of the bad ones
            choice["error"] = (
                f"{ckpt_dir.parent}/checkpoints holds checkpoints but none verifies and loads; restore one, "
                "or move them away to start a fresh run"
            )
        if found is not None:
            state, choice["path"] = found[0], str(found[1])
    choice = D.all_gather_objects(choice)[0]
    if choice["error"]:
        raise ValueError(choice["error"])
    return state, (Path(choice["path"]) if choice["path"] else None)


def load_chosen(path: Path, state: dict[str, Any] | None, rank: int) -> dict[str, Any]:
    """The chosen checkpoint on every rank (rank 0 already holds it); a rank that cannot read it
    stops the job, every rank with the same line naming the ranks that failed."""
    error = None
    if state is None:
        try:
            state = ckpt.load(path, need=ckpt.RESUME_KEYS, mmap=True)
        except (OSError, ValueError) as e:
            error = one_line(e)
    errors = D.all_gather_objects(error)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if failed:
        raise ValueError(
            f"rank(s) {', '.join(map(str, failed))} could not read {path}, the checkpoint rank 0 resumes from "
            f"({errors[failed[0]]}); every node must see the run folder: put it on a shared filesystem"
        )
    assert state is not None
    return state


def state_checksum(*modules: torch.nn.Module, opt: torch.optim.Optimizer) -> list[int]:
    """One integer per tensor of the modules' and optimizer's states, equal only for equal bytes.

    Integer sums wrap around and do not depend on the order of summation, so equal states give
    equal checksums on any device and thread count, unlike float sums."""
    tensors = [v for m in modules for v in m.state_dict().values() if torch.is_tensor(v)]
    tensors += [v for s in opt.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
    return [_tensor_checksum(v) for v in tensors]


def _tensor_checksum(v: torch.Tensor) -> int:
    flat = v.detach().contiguous().reshape(-1)
    word = torch.int32 if (flat.numel() * flat.element_size()) % 4 == 0 else torch.uint8
    x = flat.view(torch.uint8).view(word).long()  # (n,) the raw bytes as words
    weight = torch.arange(1, x.numel() + 1, dtype=torch.long, device=x.device)  # position matters
    return int((x * weight).sum())


def check_agreement(checksum: list[int], path: Path, step: int) -> None:
    """Every rank's checksum against rank 0's: the ranks that differ are named on every rank."""
    sums = D.all_gather_objects(checksum)
    differ = [r for r, s in enumerate(sums) if s != sums[0]]
    if differ:
        raise ResumeMismatchError(
            f"rank(s) {', '.join(map(str, differ))} hold a different model, EMA or optimizer state than "
            f"rank 0 after loading {path} (step {step}); every node must read the same run folder"
        )


class Saver:
    """Rank 0's checkpoint writes, at most one in flight in a background thread.

    Training continues while a save is written from a host copy of the state (`host_copy`); the
    next save, or the last one, first waits for it. Each outcome is agreed between ranks at those
    points, so a failed write stops every rank with the same line."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except (OSError, ValueError) as e:
            self._error = one_line(e)

    def wait(self) -> str | None:
        """Finish the save in flight; its error line, once (None when it succeeded)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def save(self, main: bool, write: Callable[[], None], background: bool) -> None:
        """Rank 0 writes (in the background when asked); every rank raises SaveFailedError for a
        failed write, the one in flight before this save included."""
        error = None
        if main:
            error = self.wait()
            if error is None and background:
                self._thread = threading.Thread(target=self._run, args=(write,), name="cdc-save")
                self._thread.start()
            elif error is None:
                self._run(write)
                error = self.wait()
        error = D.all_gather_objects(error)[0]
        if error is not None:
            raise SaveFailedError(error)


def host_copy(obj: Any) -> Any:
    """`obj` with every tensor copied to host memory (a CPU tensor cloned), so a background write
    sees the state of this step while training goes on changing the originals."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return copy.deepcopy(obj)
