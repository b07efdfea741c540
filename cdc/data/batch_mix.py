"""How many classes a training batch spans: the loader's order against uniform random draws.

A global batch of B samples on R ranks is R per-rank batches of B / R; sample p of a rank's
sequence comes from its loader worker p % W. `loader_classes` replays exactly the
sample order `cdc.data.loader.TrainLoader` yields, without decoding any image, and `uniform_classes`
gives the expected number of distinct classes in B samples drawn uniformly without replacement
from the same data (the hypergeometric answer), the yardstick a well-mixed loader should meet.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from cdc.data.loader import _Plan, _Stream, resolve_shards


def uniform_classes(class_counts: Sequence[int], batch: int) -> float:
    """E[distinct classes] in `batch` samples drawn without replacement from these class sizes.

    Class c is missed with probability C(N - n_c, B) / C(N, B); the expectation sums 1 - that.
    """
    n = sum(class_counts)
    if not 0 < batch <= n:
        raise ValueError(f"batch {batch} must be in 1..{n} (the samples there are)")

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    total = log_choose(n, batch)
    return sum(1.0 - (math.exp(log_choose(n - c, batch) - total) if n - c >= batch else 0.0) for c in class_counts)


def loader_classes(cfg: Any, batch: int, world: int, batches: int, seed: int = 0) -> list[int]:
    """Distinct classes in each of the first `batches` global batches of `batch` samples on `world` ranks.

    cfg.train.batch_size is replaced by batch / world; the loader's worker count, shuffle buffer
    and mixing are cfg.data's.
    """
    if batch % world:
        raise ValueError(f"a global batch of {batch} does not split over {world} ranks")
    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size = batch // world
    urls, manifest = resolve_shards(cfg.data.shards)
    per_rank = []  # per rank: a list of per-batch class lists
    for rank in range(world):
        plan = _Plan(cfg, urls, manifest, rank, world, seed)
        stream = _Stream(plan, 0)
        workers = [stream._samples(w, 0) for w in range(plan.workers)]
        b, W = cfg.train.batch_size, plan.workers
        per_rank.append([[next(workers[p % W])[1] for p in range(n * b, (n + 1) * b)] for n in range(batches)])
    return [len({c for rank in per_rank for c in rank[n]}) for n in range(batches)]
