"""Training data: shards from `cdc prepare` -> mixed-stage `cdc.flow.matching.Batch`es, exactly resumable.

Which sample sits at each position of the training stream is `cdc.data.plan`'s arithmetic: every
sample once per epoch, the same global batches for any number of ranks and workers, and a resume
state of one integer (the global position). The loader fetches the samples its rank's positions
name, each by one read of its byte range (`cdc.data.index`, `cdc.data.reader`): no worker
reads what another one trains on, nor what came before the resume point.

Per sample (everything drawn from (seed, epoch, sample id), never from the reader): a global time
t ~ U[0, 1) (its in-stage tau redistributed by `flow.tau_dist`, cdc.flow.matching.warp_time),
its stage k = Schedule.stage_of(t), and only the stored level that stage needs is decoded. A
block-aligned crop (offset a multiple of final/sides[0] pixels of the level the final stage uses)
and one horizontal flip are applied to that level, so the stage target equals D_to(crop of the
top level, r_k) up to the uint8 rounding of the stored level (DESIGN.md §3). Workers send uint8
pixels; pixels map to [-1, 1] as x / 127.5 - 1 after the copy to the training device (pinned
host memory on CUDA, so the copy is asynchronous).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cdc.data.geometry import Geometry, crop_offset, crop_pixels, stage_of
from cdc.data.index import SampleIndex, load_index
from cdc.data.plan import DataPlan, layout_note, reader_positions
from cdc.data.reader import ShardFiles, parse_sample
from cdc.data.shards import ShardSet, level_bytes, read_manifest, read_tar, resolve_shards  # noqa: F401 (re-exported)
from cdc.fileio import BadFileError, bad_file, one_line, warn
from cdc.flow.matching import Batch, Schedule, warp_time, weight_stages

_DECODE_ERRORS = (BadFileError, KeyError, OSError, ValueError, SyntaxError, EOFError)  # what PIL and parsing raise
_MAX_REPLACED = 1000  # consecutive unreadable samples before skip_bad gives up on a partition


@dataclass
class Settings:
    """What a worker needs besides the plan and index, picklable (spawned workers get a copy)."""

    rank: int
    ranks: int
    workers: int  # W >= 1 (data.workers = 0 reads in the main process, as one worker)
    batch: int  # per-rank batch B
    seed: int
    skip_bad: bool
    random_crop: bool
    hflip: bool
    sched: Schedule
    tau: tuple[str, float, float]  # flow.tau_dist, tau_loc, tau_scale
    stage_weights: list[float] | None
    cache_dir: str | None
    cache_gb: float
    max_member: int  # bytes

    def __post_init__(self) -> None:
        self.bounds32 = [float(np.float32(b)) for b in self.sched.bounds[1:-1]]  # inner stage bounds


@dataclass
class Drawn:
    """One training sample, drawn and decoded: its place in the batch and what the step needs."""

    slot: int  # index in the rank's batch
    key: str
    cls: int
    t: float
    stage: int
    offset: tuple[int, int]  # crop (y, x) in pixels of level T
    flip: bool
    pixels: torch.Tensor  # (C, r_k, r_k) uint8


@dataclass
class Chunk:
    """A worker's share of one rank batch, grouped by stage (what crosses the process boundary)."""

    stage: list[int] = field(default_factory=list)
    slots: list[torch.Tensor] = field(default_factory=list)  # per stage: (B_k,) slot in the batch
    x: list[torch.Tensor] = field(default_factory=list)  # per stage: (B_k, C, r, r) uint8
    t: list[torch.Tensor] = field(default_factory=list)
    y: list[torch.Tensor] = field(default_factory=list)
    keys: list[list[str]] = field(default_factory=list)
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)
    flips: list[list[bool]] = field(default_factory=list)
    replaced: int = 0  # unreadable samples replaced in this chunk (data.skip_bad)


class _Stream(torch.utils.data.IterableDataset):
    """One rank's stream of worker chunks, one per batch per worker, from global position `start`."""

    def __init__(self, plan: DataPlan, index: SampleIndex, urls: list[str], geo: Geometry, s: Settings, start: int):
        super().__init__()
        self.plan, self.index, self.urls, self.geo, self.s, self.start = plan, index, urls, geo, s, start

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        s, P = self.s, self.plan.partitions
        files = ShardFiles(self.urls, s.cache_dir, s.cache_gb)
        try:
            b = 0
            while True:
                slots, positions = reader_positions(self.start, s.rank, s.ranks, s.workers, w, P, b * s.batch, (b + 1) * s.batch)
                yield self._chunk(files, slots, positions)
                b += 1
        finally:
            files.close()

    def _chunk(self, files: ShardFiles, slots: np.ndarray, positions: np.ndarray) -> Chunk:
        out, drawn = Chunk(), []
        loc = self.plan.locate(positions)
        sids = loc.sample.tolist()
        bodies = files.read_many([(int(sh), int(self.index.offset[i]), int(self.index.length[i]))
                                  for sh, i in zip(loc.shard.tolist(), sids)])
        for j, slot in enumerate(slots.tolist()):
            d = self._decode(slot, int(loc.shard[j]), sids[j], int(loc.epoch[j]), bodies[j])
            if d is None:  # unreadable, data.skip_bad: its partition's next readable sample instead
                d, replaced = self._replacement(files, slot, int(positions[j]))
                out.replaced += replaced
            drawn.append(d)
        for k in sorted({d.stage for d in drawn}):
            group = [d for d in drawn if d.stage == k]
            out.stage.append(k)
            out.slots.append(torch.tensor([d.slot for d in group], dtype=torch.long))
            out.x.append(torch.stack([d.pixels for d in group]))  # (B_k, C, r, r) uint8
            out.t.append(torch.tensor([d.t for d in group], dtype=torch.float32))
            out.y.append(torch.tensor([d.cls for d in group], dtype=torch.long))
            out.keys.append([d.key for d in group])
            out.offsets.append([d.offset for d in group])
            out.flips.append([d.flip for d in group])
        return out

    def _read(self, files: ShardFiles, slot: int, shard: int, sid: int, epoch: int) -> Drawn | None:
        try:
            body: bytes | BaseException = files.read(shard, int(self.index.offset[sid]), int(self.index.length[sid]))
        except _DECODE_ERRORS as e:
            body = e
        return self._decode(slot, shard, sid, epoch, body)

    def _decode(self, slot: int, shard: int, sid: int, epoch: int, body: bytes | BaseException) -> Drawn | None:
        """Sample `sid` drawn and decoded; None when it cannot be read and data.skip_bad is on."""
        key = None
        try:
            if isinstance(body, BaseException):
                raise body
            key, sample = parse_sample(body, self.urls[shard], self.s.max_member)
            return self._draw(slot, key, sample, epoch, sid)
        except _DECODE_ERRORS as e:
            self._bad(shard, key, e)
            return None

    def _replacement(self, files: ShardFiles, slot: int, pos: int) -> tuple[Drawn, int]:
        """The first readable sample at pos + j P (j >= 1: the same partition's next ones), the same
        whoever reads it; returns it and the number of samples replaced."""
        for j in range(1, _MAX_REPLACED):
            loc = self.plan.locate(np.array([pos + j * self.plan.partitions]))
            d = self._read(files, slot, int(loc.shard[0]), int(loc.sample[0]), int(loc.epoch[0]))
            if d is not None:
                return d, j
        raise ValueError(
            f"{_MAX_REPLACED} unreadable samples in a row in one partition; check the shards or re-run cdc prepare"
        )

    def _bad(self, shard: int, key: str | None, cause: BaseException) -> None:
        """One-line error naming shard and sample, or with data.skip_bad a one-line warning."""
        name = os.path.basename(self.urls[shard])
        what = f"shard {name}, sample {key}" if key is not None else f"shard {name}"
        expected = f"a sample with the levels {sorted(set(self.geo.need))} px, a class and decodable images"
        if not self.s.skip_bad:
            raise bad_file(self.urls[shard], f"{expected} in {what}; re-run cdc prepare, or set "
                           f"data.skip_bad: true to skip it", cause) from None
        warn(f"skipped {what}: not {expected} ({one_line(cause)})")

    def _draw(self, slot: int, key: str, sample: dict[str, bytes], epoch: int, sid: int) -> Drawn:
        """t, stage, crop and flip from (seed, epoch, sample id), then the crop of the stage's level."""
        s, g = self.s, self.geo
        rng = np.random.default_rng([s.seed, epoch, sid])
        t = weight_stages(float(rng.random()), s.sched, s.stage_weights)  # flow.stage_weights
        t32 = float(np.float32(t))
        k = stage_of(t32, s.bounds32)
        if s.tau[0] != "uniform":  # tau moves inside stage k (flow.tau_dist); the stage stays
            t32 = float(np.float32(warp_time(t, s.sched, *s.tau, k)))
        level, box = level_bytes(sample, g.need[k])  # box > 1: a level of a jpeg-top shard
        offset = crop_offset(g, rng, level, k, box, s.random_crop)
        flip = bool(rng.random() < 0.5) and s.hflip
        cls = int(sample["cls"])
        return Drawn(slot, key, cls, t32, k, offset, flip, crop_pixels(g, level, box, k, offset, flip))


def join_chunks(chunks: list[Chunk]) -> Chunk:
    """One rank batch from its workers' chunks: per stage, samples in batch-slot order, so the batch
    is the same for any worker count."""
    out = Chunk(replaced=sum(c.replaced for c in chunks))
    for k in sorted({k for c in chunks for k in c.stage}):
        parts = [(c, c.stage.index(k)) for c in chunks if k in c.stage]
        slots = torch.cat([c.slots[i] for c, i in parts])
        order = torch.argsort(slots)
        out.stage.append(k)
        out.slots.append(slots[order])
        for name in ("x", "t", "y"):
            getattr(out, name).append(torch.cat([getattr(c, name)[i] for c, i in parts])[order])
        for name in ("keys", "offsets", "flips"):
            flat = [v for c, i in parts for v in getattr(c, name)[i]]
            getattr(out, name).append([flat[j] for j in order.tolist()])
    return out


def _identity(x: Any) -> Any:
    return x


class TrainLoader:
    """Infinite iterable of `Batch`es (cfg.train.batch_size samples per rank), grouped by stage.

    `state_dict()` / `load_state_dict()` carry the global stream position; a loader restored from
    it yields exactly the batches an uninterrupted one would have yielded next, on this rank count
    or any other (the global batches are the same; each rank takes every R-th position).
    """

    def __init__(
        self,
        cfg: Any,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        device: str = "cpu",
        cache_dir: str | os.PathLike | None = None,
    ):
        self.shards = resolve_shards(cfg.data.shards)
        if not self.shards.urls:
            raise ValueError(f"data.shards={cfg.data.shards!r} matches no shards")
        _check_manifest(self.shards.manifest, cfg)
        d, f = cfg.data, cfg.flow
        self.seed = cfg.train.seed if seed is None else seed
        self.rank, self.world_size, self.num_workers = rank, world_size, d.workers
        self.device = torch.device(device)
        self.settings = Settings(
            rank, world_size, max(d.workers, 1), cfg.train.batch_size, self.seed, d.skip_bad, d.random_crop,
            d.hflip, Schedule.from_config(f), (f.tau_dist, f.tau_loc, f.tau_scale), f.stage_weights,
            d.cache_dir or None, d.cache_gb, d.max_member_mb << 20,
        )
        self.index = load_index(self.shards, cache_dir, self.settings.max_member)
        self.geo = _geometry(self.shards, self.index, list(f.sides))
        self.partitions = d.partitions or world_size * self.settings.workers
        self.plan = DataPlan(self.index.counts, self.partitions, self.seed)
        self.position = 0  # global stream position of the next batch (all ranks agree)
        self.batches = 0  # batches yielded since step 0 (metrics' index)
        self.skipped = 0  # unreadable samples replaced so far on this rank (data.skip_bad)
        self._noted = False

    @property
    def samples_per_epoch(self) -> int:
        """Samples one epoch trains on (all ranks together): every sample, less at most P - 1."""
        return self.plan.epoch_length

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "partitions": self.partitions,
            "epoch": self.position / self.plan.epoch_length,
            "batches": self.batches,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.num_workers,
            "batch_size": self.settings.batch,
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at `state["position"]` with the partitions it was planned with; call before iterating."""
        if "position" not in state:  # a checkpoint of cdc < 0.2 (its loader planned by shard)
            B = int(state.get("batch_size", self.settings.batch)) * int(state.get("world_size", self.world_size))
            state = {**state, "position": int(state["batches"]) * B, "partitions": self.partitions}
            warn("this checkpoint's data position predates the sample-level plan: training continues at the "
                 "same point of the epoch in the new order (samples of the interrupted epoch may repeat)")
        if int(state["partitions"]) != self.partitions:
            self.partitions = int(state["partitions"])
            self.plan = DataPlan(self.index.counts, self.partitions, self.seed)
        if state.get("seed", self.seed) != self.seed:
            warn(f"data loader resumed with seed {self.seed} where it ran with {state['seed']}: a new sample order")
        self.position = int(state["position"])
        self.batches = int(state.get("batches", 0))
        self.skipped = int(state.get("skipped", 0))

    def __iter__(self) -> Iterator[Batch]:
        s = self.settings
        if self.rank == 0 and not self._noted and (note := layout_note(self.partitions, s.ranks, s.workers)):
            warn(note)
        self._noted = True
        stream = _Stream(self.plan, self.index, self.shards.urls, self.geo, s, self.position)
        it: Any = iter(stream)
        if self.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity, prefetch_factor=4
            ))
        while True:
            chunks = [next(it) for _ in range(s.workers)]  # DataLoader yields workers 0..W-1 in turn
            joined = chunks[0] if s.workers == 1 else join_chunks(chunks)
            self.skipped += joined.replaced
            batch = self._batch(joined)
            self.batches += 1  # before the yield: a state saved after this batch resumes after it
            self.position += s.batch * s.ranks
            yield batch

    def _batch(self, c: Chunk) -> Batch:
        """uint8 -> the device (pinned, asynchronous on CUDA) -> [-1, 1] float there."""
        cuda = self.device.type == "cuda"
        x = [v.pin_memory().to(self.device, non_blocking=True) if cuda else v for v in c.x]
        meta = {"index": self.batches, "keys": c.keys, "offsets": c.offsets, "flips": c.flips,
                "skipped": self.skipped, "position": self.position}
        b = Batch(list(c.stage), [v.float().div_(127.5).sub_(1.0) for v in x], c.t, c.y, meta)
        if cuda:
            b.t = [v.pin_memory().to(self.device, non_blocking=True) for v in b.t]
            b.y = [v.pin_memory().to(self.device, non_blocking=True) for v in b.y]
        return b


def _check_manifest(manifest: dict | None, cfg: Any) -> None:
    if not manifest:
        return
    if manifest["channels"] != cfg.model.in_channels:
        raise ValueError(
            f"shards have {manifest['channels']} channels but model.in_channels="
            f"{cfg.model.in_channels}; set model.in_channels={manifest['channels']}"
        )
    if manifest["num_classes"] > cfg.model.num_classes:
        raise ValueError(
            f"shards have {manifest['num_classes']} classes but model.num_classes="
            f"{cfg.model.num_classes}; set model.num_classes={manifest['num_classes']}"
        )


def _geometry(shards: ShardSet, index: SampleIndex, sides: list[int]) -> Geometry:
    """From the manifest; without one, from the levels the index pass saw in the first sample."""
    m = shards.manifest
    if m:
        full = m.get("crop") == "full"  # centre-square shards are T x T: no need to read image headers
        return Geometry.of(sides, list(m["levels"]), m["side"], full)
    return Geometry.of(sides, index.levels or [], None, None)


def make_loader(cfg: Any, **kw: Any) -> TrainLoader:
    """The training loader for `cfg` (cdc.config.Config) on one rank: TrainLoader(cfg, rank=,
    world_size=, seed=, device=, cache_dir=). `cache_dir` keeps the index of shards that have none
    (default: the user cache, ~/.cache/cdc)."""
    return TrainLoader(cfg, **kw)
