"""The data plan at any scale: every sample once per epoch, the same global batches for any reader
count, each worker reading only its share, and an O(1) resume (cdc.data.plan; the loader's own code)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cdc.data.plan import DataPlan, layout_note, rank_partitions, rank_positions, worker_of


def readers_epoch(plan: DataPlan, ranks: int, workers: int, batch: int, epoch: int = 0) -> dict:
    """Replay what every worker of every rank reads over one epoch's positions, as the loader does:
    rank r's q-th sample is position r + q R, fetched by the worker that owns its partition."""
    L, P = plan.epoch_length, plan.partitions
    per_rank = L // ranks
    reads = {}
    for r in range(ranks):
        owner = worker_of(P, r, ranks, workers)
        pos = rank_positions(epoch * L, r, ranks, 0, per_rank)
        for w in range(workers):
            mine = pos[owner[pos % P] == w]
            reads[(r, w)] = plan.locate(mine).sample
    return reads


@pytest.mark.parametrize(
    "counts, ranks, workers",
    [
        ([8] * 6, 2, 2),  # shards divide the slots
        ([8] * 6 + [5], 2, 2),  # a short last shard; 53 samples do not divide
        ([10] * 7, 3, 2),  # 7 shards over 6 slots
        ([10] * 3, 4, 2),  # more slots (8) than shards (3)
        ([1000] * 13 + [167], 16, 8),  # 128 slots, 14 shards
    ],
)
def test_every_sample_once_per_epoch_and_each_worker_its_share(counts, ranks, workers):
    plan = DataPlan(counts, ranks * workers, seed=3)
    N, S = sum(counts), ranks * workers
    left = []
    for epoch in range(3):
        reads = readers_epoch(plan, ranks, workers, batch=1, epoch=epoch)
        seen = np.concatenate(list(reads.values()))
        assert len(seen) == len(set(seen.tolist())) == plan.epoch_length  # no sample twice
        assert N - len(seen) <= S - 1  # at most ranks x workers - 1 left over
        left.append(sorted(set(range(N)) - set(seen.tolist())))
        assert max(len(v) for v in reads.values()) <= math.ceil(N / S)  # nobody reads more than its share
    if N % S:
        assert len({tuple(x) for x in left}) > 1  # the leftovers change with the epoch


def test_the_global_batches_do_not_depend_on_the_reader_count():
    """Global batch b is positions [b G, (b+1) G): its samples are the same at 1, 2 or 4 ranks of any
    worker count, because ranks take every R-th position and workers only fetch what the plan names."""
    counts, P, G = [9, 9, 9, 7], 4, 8
    plan = DataPlan(counts, P, seed=0)

    def global_batches(ranks: int, workers: int, batches: int) -> list[list[int]]:
        B = G // ranks
        out = []
        for b in range(batches):
            got = []
            for r in range(ranks):
                pos = rank_positions(0, r, ranks, b * B, (b + 1) * B)
                owner = worker_of(P, r, ranks, workers)
                assert sorted(np.unique(owner[pos % P]).tolist()) == sorted(set(owner[pos % P].tolist()))
                got += plan.locate(pos).sample.tolist()
            out.append(sorted(got))
        return out

    ref = global_batches(1, 1, 12)  # 96 positions: nearly three epochs of 32
    for ranks, workers in ((1, 2), (2, 1), (2, 2), (4, 1), (4, 2)):
        assert global_batches(ranks, workers, 12) == ref


def test_a_resume_on_another_rank_count_repeats_and_drops_nothing():
    """The state is the global position: 3 ranks stop after 5 global batches, 2 ranks go on from there."""
    counts, G = [7] * 9, 12
    plan = DataPlan(counts, 6, seed=1)
    before = [plan.locate(rank_positions(0, r, 3, 0, 5 * G // 3)).sample for r in range(3)]
    position = 5 * G
    after = [plan.locate(rank_positions(position, r, 2, 0, (plan.epoch_length - position) // 2)).sample for r in range(2)]
    seen = np.concatenate(before + after)
    assert len(seen) == plan.epoch_length == len(set(seen.tolist()))


def test_partitions_are_contiguous_spans_of_a_seeded_shard_order():
    """Partition p holds span [p n, (p + 1) n) of the epoch's shard order, in a seeded permutation;
    the epoch order changes with the epoch and the seed."""
    counts = [4, 4, 4]
    plan = DataPlan(counts, 2, seed=0)
    perm, starts = plan._epoch(0)
    order = np.concatenate([np.arange(plan.offsets[s], plan.offsets[s] + counts[s]) for s in perm])
    for p in range(2):
        got = plan.locate(np.arange(p, plan.epoch_length, 2)).sample  # positions p, p + P, ...
        assert sorted(got.tolist()) == sorted(order[p * 6 : (p + 1) * 6].tolist())
    e0 = plan.locate(np.arange(12)).sample.tolist()
    e1 = plan.locate(np.arange(12, 24)).sample.tolist()
    other = DataPlan(counts, 2, seed=1).locate(np.arange(12)).sample.tolist()
    assert sorted(e0) == sorted(e1) == list(range(12)) and e0 != e1 and e0 != other


def test_ranks_and_workers_share_out_the_partitions():
    assert rank_partitions(8, 1, 4) == [1, 5]
    assert rank_partitions(6, 0, 4) == [0, 2, 4]  # gcd 2: each rank meets half the partitions
    assert rank_partitions(5, 2, 3) == [0, 1, 2, 3, 4]  # coprime: every partition
    assert worker_of(8, 1, 2, 2).tolist() == [-1, 0, -1, 1, -1, 0, -1, 1]
    assert layout_note(8, 2, 2) is None
    assert "does not divide over 3 ranks" in layout_note(8, 3, 1)
    assert "some workers stay idle" in layout_note(2, 1, 4)


def test_too_few_samples_for_the_partitions_is_one_line():
    with pytest.raises(ValueError, match="cannot fill 8 partitions"):
        DataPlan([3, 2], 8, seed=0)
