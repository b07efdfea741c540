"""The real loader on prepared shards: exactly once per epoch at any reader count, the same global
batches (samples, times, crops, flips, pixels) for 1x1, 1x2, 2x1 and 2x2 readers, a resume on
another rank count, and resumes that read no shard bytes before their position."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image_tree, take

import cdc.data.reader as reader
from cdc.config import from_dict
from cdc.data.loader import make_loader
from cdc.data.prepare import prepare
from cdc.train.run_files import merged_data_state


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """30 images in 3 classes as 7 shards (six of 4, one of... the rest: the counts do not divide)."""
    root = smooth_image_tree(tmp_path_factory.mktemp("src"), 10, [(40, 40), (48, 40)], (4,))
    out = tmp_path_factory.mktemp("shards")
    m = prepare(root, out, side=16, levels=2, shard_size=4, progress=False)
    assert m["count"] == 30 and len(m["shards"]) == 8
    return out


def config(spec: Path | str, workers: int = 0, batch: int = 4, **data) -> object:
    return from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 3, "in_channels": 3},
            "flow": {"sides": [8, 16]},
            "data": {"shards": str(spec), "workers": workers, **data},
            "train": {"batch_size": batch},
        }
    )


def samples(batch) -> dict[str, tuple]:
    """key -> (stage, t, crop, flip, pixels) of every sample in a batch."""
    out = {}
    for g, k in enumerate(batch.stage):
        for i, key in enumerate(batch.meta["keys"][g]):
            out[key] = (k, float(batch.t[g][i]), batch.meta["offsets"][g][i], batch.meta["flips"][g][i], batch.x1[g][i])
    return out


def global_batches(shards: Path, ranks: int, workers: int, n: int, partitions: int = 4, G: int = 8) -> list[dict]:
    per_rank = [take(make_loader(config(shards, workers, G // ranks, partitions=partitions), rank=r, world_size=ranks, seed=2), n)
                for r in range(ranks)]
    return [{k: v for r in range(ranks) for k, v in samples(per_rank[r][b]).items()} for b in range(n)]


def same_samples(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k][:4] == b[k][:4] and torch.equal(a[k][4], b[k][4]) for k in a
    )


def test_global_batches_are_the_same_for_any_reader_count(shards):
    ref = global_batches(shards, 1, 0, 8)  # 64 positions: two epochs of 28 and a part
    for ranks, workers in ((1, 2), (2, 1), (2, 2)):
        got = global_batches(shards, ranks, workers, 8)
        assert all(same_samples(a, b) for a, b in zip(ref, got, strict=True)), (ranks, workers)
    first = take(make_loader(config(shards, 0, 4, partitions=4), seed=2), 7)  # positions 0..27: epoch 0
    epoch = [k for b in first for ks in b.meta["keys"] for k in ks]
    assert len(epoch) == len(set(epoch)) == 28  # 30 samples, 4 partitions: 2 left over


@pytest.mark.parametrize("ranks, workers", [(1, 1), (3, 2), (5, 2)])  # 5 x 2 = 10 slots > 8 shards
def test_exactly_once_per_epoch_with_real_shards(shards, ranks, workers):
    P = ranks * workers
    L = 30 // P * P
    seen = []
    for r in range(ranks):
        loader = make_loader(config(shards, workers, 1), rank=r, world_size=ranks)
        seen += [k for b in take(loader, L // ranks) for ks in b.meta["keys"] for k in ks]
    assert len(seen) == len(set(seen)) == L and 30 - L <= P - 1


def test_resume_on_another_rank_count_repeats_and_drops_nothing(shards):
    """2 ranks x batch 3 stop after 2 batches; 3 ranks x batch 2 go on to the end of the epoch."""
    cfg2, cfg3 = config(shards, 1, 3, partitions=6), config(shards, 1, 2, partitions=6)
    old = [make_loader(cfg2, rank=r, world_size=2) for r in range(2)]
    seen = [k for lo in old for b in take(lo, 2) for ks in b.meta["keys"] for k in ks]
    states = [lo.state_dict() for lo in old]
    assert {s["position"] for s in states} == {12}
    for r in range(3):
        loader = make_loader(cfg3, rank=r, world_size=3)
        loader.load_state_dict(merged_data_state(states, r))
        seen += [k for b in take(loader, 3) for ks in b.meta["keys"] for k in ks]  # 12 + 18 = 30 = one epoch
    assert len(seen) == len(set(seen)) == 30


def _count_reads(monkeypatch) -> dict:
    """Every byte the loader takes from a shard: sample reads, and whole-stream opens (index pass)."""
    got = {"ranges": [], "streams": []}
    real_read, real_open = reader.ShardFiles.read, reader.open_stream
    monkeypatch.setattr(reader.ShardFiles, "read", lambda self, *a: (got["ranges"].append(a), real_read(self, *a))[1])
    monkeypatch.setattr(reader, "open_stream", lambda url: (got["streams"].append(url), real_open(url))[1])
    return got


def test_a_resume_without_a_manifest_reads_only_its_cached_index(shards, tmp_path, monkeypatch):
    bare = tmp_path / "bare"
    shutil.copytree(shards, bare, ignore=shutil.ignore_patterns("manifest.json", "index.npy", ".prepare"))
    spec = str(bare / "train-{000000..000007}.tar")
    run = tmp_path / "run-index"
    first = make_loader(config(spec), cache_dir=run)  # the index pass: every shard's headers, once
    ref = take(first, 5)
    state = first.state_dict()
    uninterrupted = take(make_loader(config(spec), cache_dir=run), 8)[5:]
    got = _count_reads(monkeypatch)
    resumed = make_loader(config(spec), cache_dir=run)
    resumed.load_state_dict(state)
    after = take(resumed, 3)
    assert got["streams"] == []  # no shard opened as a stream: the index came from the run's cache
    keys = [k for b in after for ks in b.meta["keys"] for k in ks]
    assert len(got["ranges"]) == len(keys) == 12  # one read per sample trained on, none before
    assert all(same_samples(samples(a), samples(b)) for a, b in zip(uninterrupted, after, strict=True))
    before = {k for b in ref for ks in b.meta["keys"] for k in ks}  # positions 0..19 of epoch 0
    rest = {k for b in after[:2] for ks in b.meta["keys"] for k in ks}  # positions 20..27, still epoch 0
    assert len(before) == 20 and len(rest) == 8 and not rest & before


def test_a_resume_with_skip_bad_reads_nothing_before_its_position(shards, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    victim = bad / "train-000003.tar"
    data = bytearray(victim.read_bytes())
    data[600:1400] = bytes(800)  # garble the first sample's image bytes; the tar stays a tar
    victim.write_bytes(bytes(data))
    cfg = config(bad, skip_bad=True)
    ref = take(make_loader(cfg), 12)
    first = make_loader(cfg)
    take(first, 7)
    got = _count_reads(monkeypatch)
    resumed = make_loader(cfg)
    resumed.load_state_dict(first.state_dict())
    after = take(resumed, 5)
    assert got["streams"] == []
    reads = len(got["ranges"])
    replaced = after[-1].meta["skipped"] - ref[6].meta["skipped"]
    assert reads == 5 * 4 + replaced  # the batches' samples and the unreadable ones they replace
    assert all(same_samples(samples(a), samples(b)) for a, b in zip(ref[7:], after, strict=True))
    assert ref[-1].meta["skipped"] >= 1 and after[-1].meta["skipped"] == ref[-1].meta["skipped"]
    np.testing.assert_array_equal([b.size for b in after], [4] * 5)


@pytest.mark.parametrize("fmt", ["gnu", "ustar"])
def test_the_sample_parser_reads_what_tarfile_reads(tmp_path, fmt):
    """The loader's header parser (by offset, checksum verified) against tarfile: long names (GNU
    long-name entries, ustar name prefixes), sizes, bodies; a flipped header byte is refused."""
    import io
    import tarfile

    from cdc.data.reader import parse_sample, scan_tar
    from cdc.data.shards import read_tar
    from cdc.fileio import BadFileError

    path = tmp_path / "t.tar"
    form = tarfile.GNU_FORMAT if fmt == "gnu" else tarfile.USTAR_FORMAT
    keys = ["short", "d" * 60 + "/" + "k" * 90]  # the second needs a long name or a ustar prefix
    with tarfile.open(path, "w", format=form) as t:
        for i, key in enumerate(keys):
            for ext, body in (("cls", str(i).encode()), ("8.png", bytes(range(256)) * (i + 3))):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                t.addfile(info, io.BytesIO(body))
    want = list(read_tar(str(path)))
    data = path.read_bytes()
    got = [parse_sample(data[s.offset : s.offset + s.length], "t.tar", 1 << 20) for s in scan_tar(str(path), 1 << 20)]
    assert got == want and [k for k, _ in got] == keys
    first = scan_tar(str(path), 1 << 20)[0]
    bad = bytearray(data[first.offset : first.offset + first.length])
    bad[10] ^= 1  # a name byte: the checksum no longer matches
    with pytest.raises(BadFileError, match="bad checksum"):
        parse_sample(bytes(bad), "t.tar", 1 << 20)
