"""The data plan: which sample every position of the training stream holds, at any reader count.

Pure integer arithmetic on manifest counts (numpy only; no files, no pixels), shared by the
training loader, `cdc.data.batch_mix` and `bin/bench_loader --plan`, so what they measure is
what the loader does.

An epoch e is one seeded order of every sample: the shards in a permutation fixed by (seed, e),
their samples concatenated, cut into P equal contiguous spans, the partitions (n = N // P samples
each; the N mod P left over are the tail of that epoch's order, so not always the same ones).
Partition p reads its span in a permutation fixed by (seed, e, p).

The stream: global position i holds the (i // P)-th sample of partition i mod P of epoch
i // (P n). Global batch b is positions [b G, (b + 1) G) for G = per-rank batch x ranks; rank r
takes the positions i = r (mod R), so a global batch holds the same samples for every rank count,
and with any worker count, since each worker only fetches samples at positions the plan names.
When R divides P, rank r meets only partitions p = r (mod R); worker w of the rank owns every
W-th of those, so every partition is read by one worker and no worker reads more than its share.
The resume state is one integer, the global position (plus P and the seed).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Located:
    """Where stream positions lead (arrays of equal length, one entry per position)."""

    position: np.ndarray  # (M,) global stream positions
    epoch: np.ndarray  # (M,) epoch of each position
    partition: np.ndarray  # (M,) partition of each position
    shard: np.ndarray  # (M,) shard index, manifest order
    index: np.ndarray  # (M,) sample index inside that shard
    sample: np.ndarray  # (M,) dataset-wide sample id: shard offset in manifest order + index


@dataclass
class DataPlan:
    """The epoch orders of a dataset of `counts[s]` samples in shard s, cut into `partitions` spans."""

    counts: list[int]  # samples per shard, manifest order
    partitions: int  # P: equal spans per epoch (fixed for a run; readers take them over)
    seed: int
    _orders: OrderedDict = field(default_factory=OrderedDict, repr=False)  # (epoch, p) -> permutation
    _epochs: OrderedDict = field(default_factory=OrderedDict, repr=False)  # epoch -> (shard perm, starts)

    def __post_init__(self) -> None:
        self.total = int(sum(self.counts))
        if self.partitions < 1:
            raise ValueError(f"data.partitions must be >= 1, got {self.partitions}")
        self.span = self.total // self.partitions  # n: samples per partition per epoch
        if self.span == 0:
            raise ValueError(
                f"{self.total} samples cannot fill {self.partitions} partitions (ranks x workers, or "
                f"data.partitions); use fewer ranks or workers, or set data.partitions <= {self.total}"
            )
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])  # shard -> first sample id

    @property
    def epoch_length(self) -> int:
        """Positions per epoch: P n (at most P - 1 samples left over)."""
        return self.partitions * self.span

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, start of each permuted shard in the epoch's concatenated order)."""
        if epoch not in self._epochs:
            perm = np.random.default_rng([self.seed, epoch, 7]).permutation(len(self.counts))
            starts = np.concatenate([[0], np.cumsum(np.asarray(self.counts, dtype=np.int64)[perm])])
            self._epochs[epoch] = (perm, starts)
            while len(self._epochs) > 2:  # readers straddle at most one epoch boundary
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _order(self, epoch: int, p: int) -> np.ndarray:
        """Partition p's reading order in `epoch`: a permutation of its span's n offsets."""
        key = (epoch, p)
        if key not in self._orders:
            self._orders[key] = np.random.default_rng([self.seed, epoch, p, 13]).permutation(self.span)
            # two epochs of every partition a reader may own; more would hold O(N) ints per worker
            while len(self._orders) > 2 * self.partitions:
                self._orders.popitem(last=False)
        return self._orders[key]

    def locate(self, positions: np.ndarray) -> Located:
        """The samples at global `positions` (any shape-(M,) int array, any order)."""
        pos = np.asarray(positions, dtype=np.int64)
        L, P = self.epoch_length, self.partitions
        epoch, within = np.divmod(pos, L)
        part, k = within % P, within // P
        span_at = np.empty_like(pos)  # offset inside the epoch's concatenated order
        group = epoch * P + part
        by = np.argsort(group, kind="stable")
        keys, first = np.unique(group[by], return_index=True)
        for g, a, b in zip(keys.tolist(), first.tolist(), [*first[1:].tolist(), len(by)]):
            sel = by[a:b]  # the positions of one (epoch, partition)
            e, p = divmod(g, P)
            span_at[sel] = p * self.span + self._order(e, p)[k[sel]]
        shard, index = np.empty_like(pos), np.empty_like(pos)
        for e in np.unique(epoch):
            sel = epoch == e
            perm, starts = self._epoch(int(e))
            j = np.searchsorted(starts, span_at[sel], side="right") - 1
            shard[sel] = perm[j]
            index[sel] = span_at[sel] - starts[j]
        return Located(pos, epoch, part, shard, index, self.offsets[shard] + index)


def rank_positions(start: int, rank: int, ranks: int, q0: int, q1: int) -> np.ndarray:
    """Global positions of rank `rank`'s samples q0..q1-1 counted from `start` (all ranks' common
    stream position when the loader started): start + rank + q R."""
    return start + rank + ranks * np.arange(q0, q1, dtype=np.int64)


def rank_partitions(partitions: int, rank: int, ranks: int) -> list[int]:
    """The partitions rank `rank` meets: p = rank (mod gcd(P, R)); every partition when they are coprime."""
    g = math.gcd(partitions, ranks)
    return list(range(rank % g, partitions, g))


def worker_of(partitions: int, rank: int, ranks: int, workers: int) -> np.ndarray:
    """(P,) the worker of this rank that reads each partition (-1: another rank's): every W-th
    of the rank's partitions, so they are shared out as evenly as whole partitions allow."""
    owner = np.full(partitions, -1, dtype=np.int64)
    mine = rank_partitions(partitions, rank, ranks)
    owner[mine] = np.arange(len(mine)) % max(workers, 1)
    return owner


def reader_positions(
    start: int, rank: int, ranks: int, workers: int, w: int, partitions: int, q0: int, q1: int
) -> tuple[np.ndarray, np.ndarray]:
    """(slots, positions): which of rank `rank`'s samples q0..q1-1 (counted from `start`) worker `w`
    fetches, as indices into that range and as global positions. The training loader calls this
    for every batch; `bin/bench_loader --plan` for whole epochs."""
    pos = rank_positions(start, rank, ranks, q0, q1)
    slots = np.nonzero(worker_of(partitions, rank, ranks, workers)[pos % partitions] == w)[0]
    return slots, pos[slots]


def layout_note(partitions: int, ranks: int, workers: int) -> str | None:
    """One line when P does not share out evenly over the readers (the sequence is the same; the
    reads are less even or less local), else None."""
    W = max(workers, 1)
    if partitions % ranks:
        return (
            f"data.partitions={partitions} does not divide over {ranks} ranks: every rank reads samples "
            f"of {len(rank_partitions(partitions, 0, ranks))} partitions, skipping the others' (the batch "
            f"sequence is unchanged; set data.partitions to a multiple of ranks x workers for local reads)"
        )
    if (partitions // ranks) % W:
        per = partitions // ranks
        return (
            f"data.partitions={partitions} gives each rank {per} partitions for {W} workers: "
            f"{'some workers stay idle' if per < W else 'workers read unequal shares'} (the batch sequence "
            f"is unchanged; set data.partitions to a multiple of ranks x workers = {ranks * W} to even them)"
        )
    return None
