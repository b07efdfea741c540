"""Training data: shards from `cdc prepare` -> mixed-stage `cdc.flow.matching.Batch`es, exactly resumable.

Per sample: a global time t ~ U[0, 1) (its in-stage tau redistributed by `flow.tau_dist`,
cdc.flow.matching.warp_time), its stage k = Schedule.stage_of(t), and only the stored
level that stage needs is decoded. A block-aligned crop (offset a multiple of final/sides[0]
pixels of the level the final stage uses) and one horizontal flip are applied to that level, so
the stage target equals D_to(crop of the top level, r_k) up to the uint8 rounding of the stored
level (DESIGN.md §3). Pixels map to [-1, 1] as x / 127.5 - 1.

Determinism: rank r with W loader workers has S = world * W slots; slot s reads the shards
perm_e[s::S] of epoch e's seeded shard permutation (or every S-th sample when there are fewer
shards than slots), up to `data.mix_shards` of them at once, interleaved by a seeded draw;
draws each sample's t/crop/flip from a generator seeded by (seed, rank, worker, epoch,
position) and shuffles through a buffer seeded the same way. Sample p of a rank's sequence
comes from worker p % W: each worker yields its share of every batch as a chunk (torch's
DataLoader yields workers round-robin) and the loader joins W chunks, so a batch draws on all
of the rank's shards at once. A resumed loader has each worker skip its exact share of the
batches already yielded, without decoding any image.

Mixing (docs/design-notes.md, "Data"): `cdc prepare` writes items in a seeded global order, so
shards are already class-mixed; the interleave and the per-sample worker split keep batches
near a uniform draw even for class-sorted shards (earlier cdc versions, user-made tars).
"""

from __future__ import annotations

import io
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from cdc.data.imageproc import LEVEL_EXTS
from cdc.data.shards import level_bytes, read_manifest, read_tar, resolve_shards  # noqa: F401 (re-exported)
from cdc.fileio import BadFileError, bad_file, one_line, warn
from cdc.flow.matching import Batch, Schedule, warp_time, weight_stages


class _Plan:
    """Everything a worker needs, picklable: shard list, counts, geometry and seeds."""

    def __init__(self, cfg: Any, urls: list[str], manifest: dict | None, rank: int, world: int, seed: int):
        self.urls, self.rank, self.world, self.seed = urls, rank, world, seed
        self.workers = max(cfg.data.workers, 1)
        self.batch = cfg.train.batch_size
        self.shuffle = cfg.data.shuffle
        self.mix = cfg.data.mix_shards
        self.skip_bad = cfg.data.skip_bad
        self.cache_bytes = cfg.data.cache_mb * 2**20
        self.random_crop, self.hflip = cfg.data.random_crop, cfg.data.hflip
        self.sched = Schedule.from_config(cfg.flow)
        self.tau_dist, self.tau_loc, self.tau_scale = cfg.flow.tau_dist, cfg.flow.tau_loc, cfg.flow.tau_scale
        self.stage_weights = cfg.flow.stage_weights
        self.sides = list(cfg.flow.sides)
        counts = {s["name"]: s["count"] for s in manifest["shards"]} if manifest else {}
        self.counts = [counts.get(os.path.basename(u)) for u in urls]
        if any(c is None for c in self.counts):
            self.counts = None  # unknown: resume skips by reading, epochs are not skipped arithmetically
        final = self.sides[-1]
        self.prep_side = manifest["side"] if manifest else None
        self.top = manifest["top"] if manifest else None
        self.levels = list(manifest["levels"]) if manifest else None
        self.align = final // self.sides[0]  # crop offsets, in pixels of the final stage's level
        # centre-square shards (no "crop" in the manifest) are T x T: no need to read image headers
        self.full = manifest.get("crop") == "full" if manifest else None
        if manifest:
            self._geometry(self.levels)

    def _geometry(self, levels: list[int]) -> None:
        """Level side per stage: r_k * top / side_prepared; the final stage's level has side T."""
        final, top = self.sides[-1], max(levels)
        prep = self.prep_side or final  # without a manifest, assume prepared at the final side
        T = final * top / prep
        need = [r * top / prep for r in self.sides]
        bad = [int(n) if n == int(n) else n for n in need if n != int(n) or int(n) not in levels]
        if bad:
            raise ValueError(
                f"stage sides {self.sides} need stored levels {[int(n) if n == int(n) else n for n in need]} "
                f"but the shards hold {levels} (prepared at side {prep}); prepare with more --levels "
                f"or a matching --side"
            )
        self.T, self.need = int(T), [int(n) for n in need]
        self.n_pos = (self.T - final) // self.align

    def crop_offsets(self, rng: np.random.Generator, level: bytes, k: int, box: int = 1) -> tuple[int, int]:
        """Top-left (y, x) of the final-side crop, in pixels of the final stage's level; multiples of align.

        The stored image may be T x T (centre square) or T x L at its aspect ratio (`cdc prepare
        --crop full`); its size comes from the header of the level stage k decodes anyway. Every
        aligned position is equally likely, so random crops cover the whole image (Table 7), and
        the same crop at every level is the exact box average of the final one.
        """
        if self.full is False:
            h = w = self.T
        else:
            scale = self.T // self.need[k]
            w, h = (x // box * scale for x in Image.open(io.BytesIO(level)).size)  # box: jpeg-top's factor
        final = self.sides[-1]
        ny, nx = (h - final) // self.align, (w - final) // self.align
        # a square keeps the draw of the centre-square format, so its batches are unchanged
        pos = rng.integers(0, ny + 1, 2) if ny == nx else rng.integers(0, [ny + 1, nx + 1])
        if not self.random_crop:
            pos = (ny // 2, nx // 2)
        return int(pos[0]) * self.align, int(pos[1]) * self.align

    def epoch_shards(self, epoch: int, slot: int) -> tuple[list[int], int, int]:
        """(shard indices this slot reads in `epoch`, sample stride, sample phase)."""
        perm = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.urls)).tolist()
        S = self.world * self.workers
        if len(self.urls) >= S:
            return perm[slot::S], 1, 0
        return perm, S, slot  # fewer shards than slots: every slot reads all, keeps every S-th sample

    def epoch_count(self, epoch: int, slot: int) -> int | None:
        if self.counts is None:
            return None
        shards, stride, phase = self.epoch_shards(epoch, slot)
        n = sum(self.counts[i] for i in shards)
        return (n - phase + stride - 1) // stride if stride > 1 else n


class _Stream(torch.utils.data.IterableDataset):
    """One rank's infinite stream of worker chunks; TrainLoader joins W consecutive chunks into a batch."""

    def __init__(self, plan: _Plan, start: int, undecodable: list[int] | None = None):
        super().__init__()
        self.plan, self.start = plan, start  # start: batches already yielded (resume)
        # per worker: samples dropped at decode time so far (data.skip_bad); resume skips them too
        self.undecodable = list(undecodable or [0] * plan.workers)
        self.skipped = 0  # samples (or rest of shards) this worker dropped before decoding
        self._quiet = False
        self._cache: dict[int, list[tuple[str, dict[str, bytes]]]] = {}  # shard -> samples (per worker)
        self._cached_bytes = 0

    def _read(self, i: int) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Shard i's samples; with data.cache_mb, from RAM after the first full read.

        Parsing tar headers in Python costs more than decoding a small PNG, so for datasets that
        fit in memory (Fashion-MNIST: 44 MB) later epochs skip it; order and bytes are unchanged.
        """
        if i in self._cache:
            yield from self._cache[i]
            return
        budget = self.plan.cache_bytes - self._cached_bytes
        if budget <= 0:  # cache off or full: no bookkeeping on the hot path
            yield from read_tar(self.plan.urls[i])
            return
        kept, size = [], 0
        for key, sample in read_tar(self.plan.urls[i]):
            size += sum(len(v) for v in sample.values())
            if size <= budget:
                kept.append((key, sample))
            yield key, sample
        # only a shard read to its end, that still fits (others read at the same time may have
        # filled the budget meanwhile), is cached
        if size <= self.plan.cache_bytes - self._cached_bytes:
            self._cache[i] = kept
            self._cached_bytes += size

    def _mixed(self, shards: list[int], rng: random.Random) -> Iterator[tuple[int, str, dict[str, bytes]]]:
        """The samples of `shards`, up to `plan.mix` of them open at once, interleaved at random.

        Each next sample comes from an open shard drawn uniformly, so equal shards are read at
        equal pace and, with all of a slot's shards open, even shards of one class each give
        batches of many classes. A finished shard makes room for the next (yields shard index, key, sample). The draw never looks
        at manifest counts, so a directory, a brace pattern and a pipe: url give the same stream.
        """
        queue = list(reversed(shards))  # pop() from the end: next shard in epoch order
        open_: list[Iterator] = []
        ids: list[int] = []  # shard index of each open reader
        while queue or open_:
            while queue and len(open_) < self.plan.mix:
                ids.append(queue.pop())
                open_.append(self._read(ids[-1]))
            j = rng.randrange(len(open_)) if len(open_) > 1 else 0
            try:
                item = next(open_[j], None)
            except BadFileError as e:  # cut short or corrupt: the error names it (skip_bad: drop the rest)
                if not self.plan.skip_bad:
                    raise
                self.skipped += 1
                if not self._quiet:
                    warn(f"skipped the rest of {one_line(e)}")
                item = None
            if item is None:  # shard ended
                del open_[j], ids[j]
                continue
            yield (ids[j], *item)

    def __iter__(self) -> Iterator[tuple]:
        info = torch.utils.data.get_worker_info()
        w = info.id if info is not None else 0
        samples = self._samples(w, worker_share(self.plan, w, self.start) + self.undecodable[w])
        n = self.start
        while True:
            take = worker_share(self.plan, w, n + 1) - worker_share(self.plan, w, n)
            group, pixels, dropped, before = [], [], 0, self.skipped
            while len(group) < take:
                rec = next(samples)
                try:
                    pixels.append(self._pixels(rec))
                except (OSError, ValueError, SyntaxError, EOFError) as e:  # what PIL raises on bad bytes
                    dropped += 1
                    self._bad(rec[8], rec[0], "an image PIL can decode", e)
                    continue
                group.append(rec)
            yield (*self._collate(group, pixels), dropped, self.skipped - before)
            n += 1

    def _bad(self, shard: int, key: str | None, expected: str, cause: BaseException) -> None:
        """A sample (or a shard's rest) that cannot be read: one-line error, or with data.skip_bad a
        one-line warning and a count that reaches metrics.jsonl; never a silently wrong batch."""
        name = os.path.basename(self.plan.urls[shard])
        what = f"shard {name}, sample {key}" if key is not None else f"shard {name}"
        if not self.plan.skip_bad:
            raise bad_file(self.plan.urls[shard], f"{expected} in {what}; re-run cdc prepare, or set "
                           f"data.skip_bad: true to skip it", cause) from None
        if not self._quiet:
            warn(f"skipped {what}: not {expected} ({one_line(cause)})")

    def _samples(self, w: int, skip: int) -> Iterator[tuple]:
        """Worker w's output samples across epochs, the first `skip` of them dropped undecoded."""
        P = self.plan
        slot = P.rank * P.workers + w
        epoch = 0
        self._quiet = skip > 0  # re-reading what a resumed run already trained on: count and warn nothing
        while True:
            n = P.epoch_count(epoch, slot) if not P.skip_bad else None  # a bad shard may hold fewer
            if n == 0:
                raise ValueError(
                    f"rank {P.rank} worker {w} has no samples: fewer samples than ranks x workers"
                )
            if n is not None and skip >= n:  # skip whole epochs without reading them
                skip, epoch = skip - n, epoch + 1
                self._quiet = skip > 0
                continue
            got = 0
            for sample in self._epoch(epoch, w, slot):
                got += 1
                if skip:
                    skip -= 1
                    if not skip:  # drops met from here on happen after the resume point
                        self._quiet, self.skipped = False, 0
                    continue
                yield sample
            if got == 0:
                raise ValueError(
                    f"rank {P.rank} worker {w} read no samples in epoch {epoch}; check the shards"
                )
            epoch += 1

    def _epoch(self, epoch: int, w: int, slot: int) -> Iterator[tuple]:
        P = self.plan
        seeds = np.random.SeedSequence([P.seed, P.rank, w, epoch])
        buf_rng = random.Random(int(seeds.generate_state(1)[0]))
        buf: list[tuple] = []
        shards, stride, phase = P.epoch_shards(epoch, slot)
        # the interleave of a sample-level split is shared by every slot (each keeps its g % stride)
        mix_seed = [P.seed, epoch, 11] + ([slot] if stride == 1 else [])
        mix_rng = random.Random(int(np.random.SeedSequence(mix_seed).generate_state(1)[0]))
        j = -1  # position in this slot's input stream
        g = -1  # position in the shared stream (sample-level split)
        for shard, key, sample in self._mixed(shards, mix_rng):
            g += 1
            if g % stride != phase:
                continue
            j += 1
            if not hasattr(P, "T"):  # no manifest: levels from the first sample's keys
                P._geometry(sorted(int(e.split(".")[0]) for e in sample if e.endswith(LEVEL_EXTS)))
            rng = np.random.default_rng([P.seed, P.rank, w, epoch, j])
            t = weight_stages(float(rng.random()), P.sched, P.stage_weights)  # flow.stage_weights
            t32 = torch.tensor([t], dtype=torch.float32)
            k = int(P.sched.stage_of(t32)[0])
            if P.tau_dist != "uniform":  # tau moves inside stage k (flow.tau_dist); the stage stays
                t32.fill_(warp_time(t, P.sched, P.tau_dist, P.tau_loc, P.tau_scale, k))
            try:
                level, box = level_bytes(sample, P.need[k])  # box > 1: a level of a jpeg-top shard
                oy, ox = P.crop_offsets(rng, level, k, box)
                cls = int(sample["cls"])
            except (KeyError, OSError, ValueError, SyntaxError) as e:  # a missing level or class, a bad header
                self.skipped += 1
                self._bad(shard, key, f"a sample with level {P.need[k]} px and a class", e)
                continue
            flip = bool(rng.random() < 0.5)
            rec = (
                key,
                cls,
                float(t32[0]),
                k,
                (level, box),
                oy,
                ox,
                flip and P.hflip,
                shard,
            )
            if P.shuffle <= 1:
                yield rec
            elif len(buf) < P.shuffle:
                buf.append(rec)
            else:
                idx = buf_rng.randrange(len(buf))
                buf[idx], rec = rec, buf[idx]
                yield rec
        buf_rng.shuffle(buf)
        yield from buf

    def _pixels(self, rec: tuple) -> torch.Tensor:
        """One sample's crop of its stage's level, flipped as drawn: (C, r, r) uint8."""
        P = self.plan
        k, (body, box), oy, ox, flip = rec[3], rec[4], rec[5], rec[6], rec[7]
        r, scale = P.sides[k], P.T // P.need[k]  # offsets are in T pixels; this level is T/scale
        im = Image.open(io.BytesIO(body))
        a = np.asarray(im.reduce(box) if box > 1 else im)  # box > 1: a level of a jpeg-top shard
        a = a[oy // scale : oy // scale + r, ox // scale : ox // scale + r]
        if a.shape[:2] != (r, r):
            raise ValueError(f"level is {im.size[0]}x{im.size[1]} px, too small for its crop")
        a = a[:, ::-1] if flip else a
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (H, W, C) -> (C, r, r)
        return torch.from_numpy(a.copy())  # copy: PIL's buffer is read-only

    def _collate(self, group: list[tuple], pixels: list[torch.Tensor] | None = None) -> tuple:
        if pixels is None:  # not decoded yet
            pixels = [self._pixels(rec) for rec in group]
        out: tuple[list, ...] = ([], [], [], [], [], [], [])  # stage, x, t, y, keys, offsets, flips
        for k in sorted({s[3] for s in group}):
            idx = [i for i, s in enumerate(group) if s[3] == k]
            members = [group[i] for i in idx]
            x = torch.stack([pixels[i] for i in idx]).float().div_(127.5).sub_(1.0)  # (B_k, C, r, r)
            out[0].append(k)
            out[1].append(x)
            out[2].append(torch.tensor([s[2] for s in members], dtype=torch.float32))
            out[3].append(torch.tensor([s[1] for s in members], dtype=torch.long))
            out[4].append([s[0] for s in members])
            out[5].append([(s[5], s[6]) for s in members])
            out[6].append([s[7] for s in members])
        return out


def worker_share(plan: _Plan, w: int, batches: int) -> int:
    """Samples worker w gives to a rank's first `batches` batches.

    Sample p of the rank's sample sequence (batch p // B) comes from worker p % W, so every batch
    holds samples of every worker (and so of every worker's shards), and the count is exact
    arithmetic: resume skips it without reading a batch.
    """
    P = batches * plan.batch
    return max(0, (P - w + plan.workers - 1) // plan.workers)


def join_chunks(chunks: list[tuple]) -> tuple:
    """One batch from the workers' chunks (each grouped by stage): groups of a stage joined in worker
    order; the two drop counts (undecodable, skipped before decoding) summed."""
    stages = sorted({k for c in chunks for k in c[0]})
    out: tuple[list, ...] = ([], [], [], [], [], [], [])  # stage, x, t, y, keys, offsets, flips
    for k in stages:
        parts = [[field[c[0].index(k)] for field in c[1:7]] for c in chunks if k in c[0]]
        out[0].append(k)
        out[1].append(torch.cat([p[0] for p in parts]))  # (B_k, C, r, r)
        out[2].append(torch.cat([p[1] for p in parts]))
        out[3].append(torch.cat([p[2] for p in parts]))
        for i in (4, 5, 6):
            out[i].append([v for p in parts for v in p[i - 1]])
    return (*out, sum(c[7] for c in chunks), sum(c[8] for c in chunks))


def _identity(x: Any) -> Any:
    return x


class TrainLoader:
    """Infinite iterable of `Batch`es (cfg.train.batch_size samples per rank), grouped by stage.

    `state_dict()` / `load_state_dict()` carry the number of batches yielded; a loader restored
    from it yields exactly the batches an uninterrupted one would have yielded next.
    """

    def __init__(
        self, cfg: Any, rank: int = 0, world_size: int = 1, seed: int | None = None, device: str = "cpu"
    ):
        urls, manifest = resolve_shards(cfg.data.shards)
        if not urls:
            raise ValueError(f"data.shards={cfg.data.shards!r} matches no shards")
        if manifest:
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
        if manifest and manifest.get("order") != "shuffled" and rank == 0:
            warn(
                f"{cfg.data.shards} was prepared class by class (cdc prepare before --order, or "
                f"--order sorted): batches mix classes only as far as data.mix_shards="
                f"{cfg.data.mix_shards} and data.shuffle={cfg.data.shuffle} reach; "
                f"`cdc prepare ... --overwrite` rewrites it in a shuffled order"
            )
        self.seed = cfg.train.seed if seed is None else seed
        self.plan = _Plan(cfg, urls, manifest, rank, world_size, self.seed)
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.num_workers = cfg.data.workers
        self.device = torch.device(device)
        self.batches = 0  # batches yielded so far (the resume position)
        self.undecodable = [0] * self.plan.workers  # per worker: samples dropped at decode (skip_bad)
        self.skipped = 0  # all samples / shard rests dropped so far (data.skip_bad), for metrics

    @property
    def samples_per_epoch(self) -> int | None:
        """Samples in one pass over all shards (all ranks together), when a manifest is known."""
        return sum(self.plan.counts) if self.plan.counts is not None else None

    def state_dict(self) -> dict[str, Any]:
        n = self.samples_per_epoch
        epoch = self.batches * self.plan.batch * self.world_size / n if n else None
        return {
            "batches": self.batches,
            "epoch": epoch,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.num_workers,
            "batch_size": self.plan.batch,
            "undecodable": list(self.undecodable),  # per worker, data.skip_bad's decode-time drops
            "skipped": self.skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state["batches"]` batches; call before iterating."""
        mine = self.state_dict()
        diff = [
            k for k in ("seed", "world_size", "workers", "batch_size") if k in state and state[k] != mine[k]
        ]
        if diff:
            warnings.warn(
                f"data loader resumed with different {diff}: the batch sequence will not repeat exactly",
                stacklevel=2,
            )
        self.batches = int(state["batches"])
        drops = state.get("undecodable", [])  # absent before data.skip_bad existed: nothing dropped
        self.undecodable = list(drops) if len(drops) == self.plan.workers else [0] * self.plan.workers
        self.skipped = int(state.get("skipped", 0))

    def __iter__(self) -> Iterator[Batch]:
        stream = _Stream(self.plan, self.batches, self.undecodable)
        if self.num_workers == 0:
            it: Any = iter(stream)
        else:
            it = iter(
                torch.utils.data.DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_identity,
                    pin_memory=self.device.type == "cuda",
                    prefetch_factor=4,
                )
            )
        W = self.plan.workers
        while True:
            chunks = [next(it) for _ in range(W)]  # DataLoader yields workers 0..W-1 in turn
            for w, c in enumerate(chunks):
                self.undecodable[w] += c[7]
                self.skipped += c[7] + c[8]
            stage, x, t, y, keys, offsets, flips, _, _ = chunks[0] if W == 1 else join_chunks(chunks)
            b = Batch(
                list(stage),
                x,
                t,
                y,
                {"index": self.batches, "keys": keys, "offsets": offsets, "flips": flips,
                 "skipped": self.skipped},
            )
            self.batches += 1
            yield b.to(self.device) if self.device.type != "cpu" else b


def make_loader(
    cfg: Any, rank: int = 0, world_size: int = 1, seed: int | None = None, device: str = "cpu"
) -> TrainLoader:
    """The training loader for `cfg` (cdc.config.Config) on one rank; see TrainLoader."""
    return TrainLoader(cfg, rank, world_size, seed, device)
