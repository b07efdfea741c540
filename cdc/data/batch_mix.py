"""How many classes a training batch spans: the loader's order against uniform random draws.

A global batch of B samples is the B stream positions `cdc.data.plan` gives it, whichever ranks
and workers read them. `loader_classes` looks up exactly the samples `cdc.data.loader.TrainLoader`
trains on, without decoding any image, and `uniform_classes`
gives the expected number of distinct classes in B samples drawn uniformly without replacement
from the same data (the hypergeometric answer), the yardstick a well-mixed loader should meet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cdc.data.index import load_index
from cdc.data.plan import DataPlan
from cdc.data.shards import read_tar, resolve_shards


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

    The partitions are the loader's: cfg.data.partitions, or world x cfg.data.workers.
    """
    if batch % world:
        raise ValueError(f"a global batch of {batch} does not split over {world} ranks")
    shards = resolve_shards(cfg.data.shards)
    classes = np.asarray([int(s["cls"]) for url in shards.urls for _, s in read_tar(url)])  # by sample id
    partitions = cfg.data.partitions or world * max(cfg.data.workers, 1)
    plan = DataPlan(load_index(shards, None, cfg.data.max_member_mb << 20).counts, partitions, seed)
    loc = plan.locate(np.arange(batches * batch))
    return [len(set(classes[loc.sample[n * batch : (n + 1) * batch]].tolist())) for n in range(batches)]

