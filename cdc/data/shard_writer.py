"""Writing `cdc prepare`'s shards: one tar per task, serially or in a process pool, with progress.

A shard is streamed to `<name>.partial-<pid>`, fsynced and renamed, then recorded in
`.prepare/<name>.json` (its count, bytes, sha256, skipped and converted files), so a re-run keeps
recorded shards (`shard_record`) and redoes the rest. The tar metadata is fixed, so equal content
gives byte-identical shards whichever process wrote them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from cdc.data.imageproc import encode_levels, load_image, pad_idx
from cdc.fileio import cleaned_on_failure, path_record, write_json

_counter: Any = None  # shared images-done counter for the progress bar


def _init_worker(counter: Any, parent: int | None) -> None:
    """parent: the pid that forked this worker (None when the pool does not fork)."""
    global _counter
    _counter = counter
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if sys.platform.startswith("linux"):  # die with the parent (kill -9) instead of finishing orphaned
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass
    if parent is not None and os.getppid() != parent:
        # the parent was killed between the fork and the prctl: no signal will come, and an orphan
        # would write shards behind the re-run's back, then block on the task queue for ever
        os._exit(1)


class _TarWriter:
    """Minimal streaming tar writer: fixed metadata so equal content gives equal bytes, hashed as written.

    tarfile.addfile costs ~0.1 ms per member (copies, PAX checks); building the GNU header directly
    is ~5x cheaper, which matters at five members per image.
    """

    def __init__(self, fh: Any):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def _write(self, b: bytes) -> None:
        self.fh.write(b)
        self.sha.update(b)
        self.size += len(b)

    def add(self, name: str, body: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(body), 0, 0o644, 0, 0, "", ""
        self._write(ti.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        self._write(body + b"\0" * (-len(body) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._write(b"\0" * (2 * tarfile.BLOCKSIZE))  # end-of-archive marker


def write_shard(task: dict) -> dict:
    """Write one shard (a task from cdc.data.prepare) and its `.prepare/<name>.json` record; return the record."""
    out, name, top, levels = Path(task["out"]), task["name"], task["top"], task["levels"]
    final = out / name
    tmp = out / f"{name}.partial-{os.getpid()}"
    skipped, converted, count, done, index = [], [], 0, 0, []
    squeeze = task["png"] == "huffman"

    def need(written: int) -> int | None:  # the whole shard, from the share of its images written
        return written * len(task["items"]) // done if done else None

    # a full disk: the partial shard goes, a good one of the same name stays, one line names `out`
    with cleaned_on_failure(final, tmp, "shard", need), open(tmp, "wb", buffering=1 << 20) as fh:
        tar = _TarWriter(fh)
        for key, cls, ref in task["items"]:
            if isinstance(ref, np.ndarray):
                img, notes, reason = pad_idx(ref, top), [], None
            else:
                aspect = 2 ** (levels - 1) if task.get("crop") == "full" else 0
                img, notes, reason = load_image(os.path.join(task["root"], ref), top, aspect)
            if img is None:
                skipped.append({**path_record(ref), "reason": reason})
            else:
                if notes:
                    converted.append({**path_record(ref), "note": "; ".join(notes)})
                members = [("cls", str(cls).encode())]
                members += encode_levels(img, levels, task.get("store", "png"), squeeze, task.get("quality", 95))
                start = tar.size
                for ext, body in members:
                    tar.add(f"{key}.{ext}", body)
                index.append([start, tar.size - start])  # the sample's bytes: what the loader reads
                count += 1
            done += 1
            if _counter is not None:
                with _counter.get_lock():
                    _counter.value += 1
        tar.close()
        fh.flush()
        os.fsync(fh.fileno())
        os.replace(tmp, final)
    rec = {
        "name": name,
        "count": count,
        "bytes": tar.size,
        "sha256": tar.sha.hexdigest(),
        "skipped": skipped,
        "converted": converted,
        "index": index,  # per sample [byte offset, length]: manifest's index.npy
    }
    write_json(out / ".prepare" / f"{name}.json", rec, what="shard record")
    return rec


def shard_record(out: Path, name: str) -> dict | None:
    """The record of a shard an earlier run finished, or None when it must be (re)written."""
    rec_path = out / ".prepare" / f"{name}.json"
    try:
        rec = json.loads(rec_path.read_text())
        return rec if (out / name).stat().st_size == rec["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def clear_outputs(out: Path) -> None:
    """`overwrite`: remove what `cdc prepare` wrote in `out` (the shards its manifest or its shard
    records name, the index, manifest and state), nothing else: another tool's tars stay."""
    if not out.is_dir():
        return
    for p in [*(out / n for n in _own_shards(out)), *_leftovers(out), out / "manifest.json", out / "index.npy"]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / ".prepare", ignore_errors=True)


def _own_shards(out: Path) -> set[str]:
    """Shard names prepare recorded: the manifest's list and the per-shard records of a run cut short.
    Only plain names count, so a crafted manifest cannot point the deletion outside `out`."""
    names = set()
    try:
        names |= {s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names |= {p.name[: -len(".json")] for p in (out / ".prepare").glob("*.tar.json")}
    return {n for n in names if isinstance(n, str) and re.fullmatch(r"[\w.-]+\.tar", n) and not n.startswith(".")}


def _leftovers(out: Path) -> list[Path]:
    """What a killed run leaves: half-written shards, and the atomic writer's temps
    (`.<name>.tmp.<pid>`, cdc.fileio) of a record or the manifest cut off before their rename."""
    state = out / ".prepare"
    return [
        *out.glob("*.partial-*"), *state.glob("*.partial-*"), *state.glob(".*.tmp.*"), *out.glob(".manifest.json.tmp.*"),
        *out.glob(".index.npy.tmp.*")
    ]  # fmt: skip


def drop_partials(out: Path) -> None:
    """Delete the half-written shards, records and manifest an interrupted run left in `out`."""
    for p in _leftovers(out):
        p.unlink(missing_ok=True)


def _bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, file=sys.stderr, smoothing=0.1)


def _write_serial(tasks: list[dict], bar: Any) -> list[dict]:
    records = []
    for t in tasks:
        records.append(write_shard(t))
        if bar is not None:
            bar.update(len(t["items"]))
    return records


def _write_pool(pool: Any, tasks: list[dict], counter: Any, todo: int, bar: Any) -> list[dict]:
    res = pool.map_async(write_shard, tasks, chunksize=1)
    seen = 0
    while not res.ready():
        res.wait(0.25)
        if bar is not None:
            bar.update(counter.value - seen)
            seen = counter.value
    records = res.get()
    pool.close()
    if bar is not None:
        bar.update(todo - seen)
    return records


def write_shards(tasks: list[dict], out: Path, workers: int, bar_desc: str | None) -> list[dict]:
    """Write every task's shard (a pool of `workers` when there are several) and return their records.

    bar_desc: the progress bar's label on stderr, or None for no bar. On any error or interrupt the
    pool is stopped and no `.partial-*` file is left in `out`.
    """
    todo = sum(len(t["items"]) for t in tasks)
    parallel = workers > 1 and len(tasks) > 1
    counter = mp.Value("q", 0) if parallel else None
    # the pool is forked before tqdm starts its monitor thread
    ctx = mp.get_context()
    parent = os.getpid() if ctx.get_start_method() == "fork" else None
    pool = ctx.Pool(min(workers, len(tasks)), _init_worker, (counter, parent)) if parallel else None
    bar = _bar(todo, bar_desc) if bar_desc is not None and todo else None
    try:
        if pool is None:
            return _write_serial(tasks, bar)
        return _write_pool(pool, tasks, counter, todo, bar)
    except BaseException:
        if pool is not None:
            pool.terminate()
        for p in out.glob("*.partial-*"):
            p.unlink(missing_ok=True)
        raise
    finally:
        if pool is not None:
            pool.join()
        if bar is not None:
            bar.close()
