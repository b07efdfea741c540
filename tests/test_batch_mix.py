"""Batch class mix: shards in a seeded order, a loader that interleaves shards and splits every
batch over its workers, measured against the hypergeometric expectation of a uniform draw."""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import pytest
from conftest import smooth_image_tree, take

from cdc.config import from_dict
from cdc.data.batch_mix import loader_classes, uniform_classes
from cdc.data.loader import make_loader, read_tar
from cdc.data.prepare import prepare


def test_uniform_classes_known_answers():
    assert uniform_classes([3, 5, 2], 1) == pytest.approx(1.0)
    assert uniform_classes([3, 5, 2], 10) == pytest.approx(3.0)  # the whole set
    # two classes of two: the second draw differs from the first with p 2/3
    assert uniform_classes([2, 2], 2) == pytest.approx(5 / 3)
    counts, batch = [1, 2, 3, 1], 3  # brute force over every 3-subset of the 7 labelled items
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    subsets = list(itertools.combinations(range(len(labels)), batch))
    brute = sum(len({labels[i] for i in s}) for s in subsets) / len(subsets)
    assert uniform_classes(counts, batch) == pytest.approx(brute)
    with pytest.raises(ValueError, match="batch"):
        uniform_classes([2, 2], 5)


def test_prepare_writes_a_seeded_permutation(tmp_path):
    root = smooth_image_tree(tmp_path / "src", 12, [(40, 40)], (4,))  # 4 classes x 12, listed by class
    keys = {}
    for order, seed in (("sorted", 0), ("shuffled", 0), ("shuffled", 0), ("shuffled", 1)):
        out = tmp_path / f"{order}-{seed}-{len(keys)}"
        m = prepare(root, out, side=16, levels=2, shard_size=12, progress=False, order=order, seed=seed)
        assert m["order"] == order and m["order_seed"] == (seed if order == "shuffled" else None)
        keys[(order, seed, len(keys))] = [[k for k, _ in read_tar(str(out / s["name"]))] for s in m["shards"]]
    ks = list(keys.values())
    flat = [sorted(k for shard in v for k in shard) for v in ks]
    assert flat[0] == flat[1] == flat[3]  # the same items, only the order differs
    classes = [[{k.split("_")[0] for k in shard} for shard in v] for v in ks]
    assert all(len(c) == 1 for c in classes[0])  # sorted: one class per 12-image shard
    assert all(len(c) >= 3 for c in classes[1])  # shuffled: every shard mixes classes
    assert ks[1] == ks[2] and ks[1] != ks[3]  # fixed by the seed


def test_every_worker_reads_its_own_partitions(tmp_path):
    """With partitions = ranks x workers each worker reads one partition: a rank batch holds samples
    of both workers' partitions, and no sample is read by two workers."""
    root = smooth_image_tree(tmp_path / "src", 8, [(40, 40)], (4,))
    out = tmp_path / "sh"
    prepare(root, out, side=16, levels=2, shard_size=4, progress=False, order="sorted")  # 8 shards
    cfg = from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 4, "in_channels": 3},
            "flow": {"sides": [8, 16]},
            "data": {"shards": str(out), "workers": 2},
            "train": {"batch_size": 5},
        }
    )
    loader = make_loader(cfg)
    assert loader.partitions == 2
    span = loader.plan.span  # 12 samples per partition: partition p = the p-th half of epoch 0's order
    perm, starts = loader.plan._epoch(0)
    names = sorted(out.glob("*.tar"))
    order = [k for s in perm for k, _ in read_tar(str(names[s]))]
    half = {k: i // span for i, k in enumerate(order)}
    for n, b in enumerate(take(loader, 4)):
        keys = [k for ks in b.meta["keys"] for k in ks]
        assert b.size == 5
        # position i holds partition i % 2: slots alternate between the two workers' partitions
        assert sorted(half[k] for k in keys) == sorted((n * 5 + j) % 2 for j in range(5))


@pytest.fixture(scope="module")
def mini_layouts(shared_dir, tmp_path_factory) -> dict[str, Path]:
    """imagenet-mini (200 classes, 20 images each kept here for speed) prepared in the default order
    (20 shards, as the full tree's 20000 at the default 1000 per shard) and class-sorted with one
    class per shard, as ILSVRC2012's 1000-image shards were before the order existed."""
    tgz = shared_dir / "datasets" / "imagenet-mini.tar.gz"
    if not tgz.is_file():
        pytest.skip(f"{tgz} not found")
    dst = tmp_path_factory.mktemp("inm")
    with tarfile.open(tgz) as t:
        t.extractall(dst)
    root = dst / "imagenet-mini"
    out = {}
    for name, kw in (("shuffled", {"shard_size": 200}), ("sorted", {"order": "sorted", "shard_size": 20})):
        out[name] = dst / name
        m = prepare(root, out[name], side=8, levels=2, limit=4000, workers=2, progress=False, **kw)
        assert m["count"] == 4000 and m["num_classes"] == 200
    return out


@pytest.mark.parametrize("layout, tolerance", [("shuffled", 0.05), ("sorted", 0.10)])
def test_imagenet_mini_batches_span_as_many_classes_as_random_draws(mini_layouts, layout, tolerance):
    shards = mini_layouts[layout]
    cfg = from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 200, "in_channels": 3},
            "flow": {"sides": [4, 8]},
            "data": {"shards": str(shards), "workers": 2},
            "train": {"batch_size": 8},
        }
    )
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["order"] == layout
    for batch in (8, 32, 256):
        uniform = uniform_classes([20] * 200, batch)
        for ranks in (1, 2, 8):
            got = loader_classes(cfg, batch, ranks, batches=6)
            mean = sum(got) / len(got)
            assert abs(mean / uniform - 1) <= tolerance, (layout, batch, ranks, mean, uniform)
