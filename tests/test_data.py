"""The training loader: exact stage targets under crop/flip, grouping, node/worker split, exact resume."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image_tree, take
from PIL import Image

from cdc.config import from_dict
from cdc.data.loader import make_loader, read_tar
from cdc.data.prepare import prepare
from cdc.flow.matching import Schedule
from cdc.flow.pyramid import down_to


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """48 RGB images in 3 classes as 6 centre-square shards: side 32, top 40 (expand 1.25), levels 40/20/10."""
    root = smooth_image_tree(tmp_path_factory.mktemp("src"), 16, [(64, 48)], (6, 8))
    out = tmp_path_factory.mktemp("shards")
    m = prepare(root, out, side=32, expand=1.25, levels=3, shard_size=8, progress=False, crop="center")
    assert m["top"] == 40 and m["levels"] == [40, 20, 10] and len(m["shards"]) == 6
    return out


def config(shards: Path | str, **data) -> object:
    return from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 3, "in_channels": 3},
            "flow": {"sides": [8, 16, 32]},
            "data": {"shards": str(shards), "workers": 0, "shuffle": 10, **data},
            "train": {"batch_size": 8},
        }
    )


def same(a, b) -> bool:
    return (
        a.stage == b.stage
        and a.meta["keys"] == b.meta["keys"]
        and all(torch.equal(x, y) for x, y in zip(a.x1 + a.t + a.y, b.x1 + b.t + b.y, strict=True))
    )


def top_levels(shards: Path) -> dict[str, np.ndarray]:
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        for key, s in read_tar(str(tar)):
            out[key] = np.asarray(Image.open(io.BytesIO(s["40.png"])))
    return out


def test_stage_targets_equal_box_downsampled_crop(shards):
    loader = make_loader(config(shards), seed=3)
    tops = top_levels(shards)
    sched = Schedule.make([8, 16, 32])
    seen_stages, offsets, flips = set(), set(), set()
    for b in take(loader, 12):
        assert b.stage == sorted(b.stage) and b.size == 8
        for k, x, t, y, keys, offs, fl in zip(
            b.stage, b.x1, b.t, b.y, b.meta["keys"], b.meta["offsets"], b.meta["flips"], strict=True
        ):
            assert torch.equal(sched.stage_of(t), torch.full_like(y, k))
            r = [8, 16, 32][k]
            assert x.shape == (len(y), 3, r, r) and x.min() >= -1 and x.max() <= 1
            for i, key in enumerate(keys):
                oy, ox = offs[i]
                assert oy % 4 == 0 and ox % 4 == 0 and 0 <= oy <= 8 and 0 <= ox <= 8  # align = 32 / 8
                crop = (
                    torch.from_numpy(tops[key][oy : oy + 32, ox : ox + 32].copy()).permute(2, 0, 1).double()
                )
                crop = crop.flip(-1) if fl[i] else crop
                want = down_to(crop / 127.5 - 1, r)
                assert (x[i].double() - want).abs().max() <= 1 / 255 + 1e-6  # uint8 rounding of the level
                assert int(y[i]) == int(key[1])  # classes k0/k1/k2
                seen_stages.add(k)
                offsets.add((oy, ox))
                flips.add(fl[i])
    assert seen_stages == {0, 1, 2} and len(offsets) > 3 and flips == {True, False}


def test_centre_crop_without_flip(shards):
    loader = make_loader(config(shards, random_crop=False, hflip=False))
    for b in take(loader, 3):
        assert {o for offs in b.meta["offsets"] for o in offs} == {(4, 4)}
        assert not any(f for fl in b.meta["flips"] for f in fl)


def test_logit_normal_tau_moves_only_the_times(shards):
    """flow.tau_dist warps each sample's uniform draw inside its stage: the same images, stages,
    crops and labels come out, and each t is warp_time of the uniform run's t."""
    from cdc.config import from_dict, to_dict
    from cdc.flow.matching import warp_time

    base = config(shards)
    d = to_dict(base)
    d["flow"].update(tau_dist="logit_normal", tau_loc=0.4, tau_scale=1.3)
    sched = Schedule.make([8, 16, 32])
    moved = 0
    for a, b in zip(take(make_loader(base, seed=4), 6), take(make_loader(from_dict(d), seed=4), 6), strict=True):
        assert a.stage == b.stage and a.meta["keys"] == b.meta["keys"]
        assert all(torch.equal(x, y) for x, y in zip(a.x1 + a.y, b.x1 + b.y, strict=True))
        for ta, tb in zip(a.t, b.t, strict=True):
            want = torch.tensor([warp_time(float(t), sched, "logit_normal", 0.4, 1.3) for t in ta])
            assert torch.allclose(tb, want, atol=1e-6)
            moved += int((tb - ta).abs().gt(1e-3).sum())
    assert moved > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reproduces_batches(shards, workers):
    cfg = config(shards, workers=workers)
    ref = take(make_loader(cfg, seed=1), 16)  # 48 samples / 8 per batch: spans several epochs
    for start in (5, 13):
        loader = make_loader(cfg, seed=1)
        loader.load_state_dict(
            {"batches": start, "seed": 1, "workers": workers, "world_size": 1, "batch_size": 8}
        )
        got = take(loader, 16 - start)
        assert all(same(a, b) for a, b in zip(ref[start:], got, strict=True))
        assert loader.state_dict()["batches"] == 16
    other = take(make_loader(cfg, seed=2), 4)
    assert not all(same(a, b) for a, b in zip(ref[:4], other, strict=True))


def test_in_process_loading_gives_the_one_worker_batches(shards):
    """data.workers 0 (batches made in the training process) and 1 (one worker process) read the
    same single slot, so a recipe may switch between them without changing its training."""
    ref = take(make_loader(config(shards, workers=1), seed=5), 12)  # 48 samples / 8: two epochs
    got = take(make_loader(config(shards, workers=0), seed=5), 12)
    assert all(same(a, b) for a, b in zip(ref, got, strict=True))


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_worker_batches_do_not_depend_on_the_start_method(shards, method):
    """Loader workers started by spawn (macOS, Windows) or forkserver (Linux from Python 3.14)
    instead of fork: the loader must pickle and yield the very same batches."""
    import gc
    import multiprocessing as mp

    cfg = config(shards, workers=2)
    it = iter(make_loader(cfg, seed=1))
    ref = [next(it) for _ in range(4)]
    del it  # shut the fork workers down before the start method changes
    gc.collect()
    before = mp.get_start_method()
    mp.set_start_method(method, force=True)  # the default context DataLoader workers use
    try:
        it = iter(make_loader(cfg, seed=1))
        got = [next(it) for _ in range(4)]
        started = {type(p._popen).__module__ for p in mp.active_children()}  # e.g. popen_spawn_posix
        assert started and all(method in m for m in started), started
        del it
        gc.collect()
    finally:
        mp.set_start_method(before, force=True)
    assert all(same(a, b) for a, b in zip(ref, got, strict=True))


def test_reads_only_the_samples_it_trains_on(shards, monkeypatch):
    """Each sample is one read of its own bytes (index.npy): an epoch reads the shards' sample bytes
    once, and a resumed loader reads nothing of what came before its resume point."""
    import cdc.data.reader as reader

    reads = []
    real = reader.ShardFiles.read
    monkeypatch.setattr(reader.ShardFiles, "read", lambda self, *a: (reads.append(a), real(self, *a))[1])
    first = make_loader(config(shards), seed=3)
    take(first, 6)  # 48 samples / 8: one epoch
    sample_bytes = sum(p.stat().st_size for p in shards.glob("*.tar")) - 6 * 1024  # less the end markers
    assert len(reads) == 48 and sum(n for _, _, n in reads) == sample_bytes
    assert len(set(reads)) == 48
    reads.clear()
    resumed = make_loader(config(shards), seed=3)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 1)
    assert len(reads) == 8  # the next batch's samples, nothing before


def test_epoch_covers_every_sample_once_across_ranks_and_workers(shards):
    # (workers, world, shard spec, samples): 6 shards over 2 or 6 slots; 1 shard split by sample
    for workers, world, spec, n in (
        (1, 2, shards, 48),
        (2, 3, shards, 48),
        (1, 2, shards / "train-000000.tar", 8),
    ):
        cfg = config(spec, workers=workers, shuffle=0)
        cfg.train.batch_size = 1
        keys = []
        for rank in range(world):
            keys += [
                b.meta["keys"][0][0] for b in take(make_loader(cfg, rank=rank, world_size=world), n // world)
            ]
        assert len(keys) == len(set(keys)) == n


def test_pipe_and_brace_pattern_match_directory(shards, monkeypatch, tmp_path):
    monkeypatch.setenv("CDC_ALLOW_PIPE", "1")
    ref = take(make_loader(config(shards), seed=5), 7)
    brace = str(shards / "train-{000000..000005}.tar")
    assert all(same(a, b) for a, b in zip(ref, take(make_loader(config(brace), seed=5), 7), strict=True))
    pipe = f"pipe:cat {shards}/train-{{000000..000005}}.tar"  # no manifest: levels read from the samples
    first = make_loader(config(pipe, cache_dir=str(tmp_path / "copies")), seed=5, cache_dir=tmp_path / "index")
    take(first, 3)
    loader = make_loader(config(pipe, cache_dir=str(tmp_path / "copies")), seed=5, cache_dir=tmp_path / "index")
    loader.load_state_dict(first.state_dict())
    assert all(same(a, b) for a, b in zip(ref[3:], take(loader, 4), strict=True))
    assert len(list((tmp_path / "copies").glob("*.tar"))) == 6  # a command's output is read from a local copy


def test_clear_errors(shards):
    with pytest.raises(ValueError, match="more --levels"):
        make_loader(_cfg_sides(shards, [4, 8, 16, 32]))
    bad = config(shards)
    bad.model.in_channels = 1
    with pytest.raises(ValueError, match="in_channels"):
        make_loader(bad)
    with pytest.raises(FileNotFoundError, match="cdc prepare"):
        make_loader(config(shards / "missing"))


def _cfg_sides(shards: Path, sides: list[int]):
    cfg = config(shards)
    cfg.flow.sides = sides
    return cfg


def test_fashion_mnist_quickstart_batches(tmp_path):
    prepare("fashion-mnist", tmp_path / "fm", limit=200, shard_size=50, progress=False)
    cfg = from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 10, "in_channels": 1},
            "flow": {"sides": [8, 16, 32]},
            "data": {"shards": str(tmp_path / "fm"), "workers": 0},
            "train": {"batch_size": 16},
        }
    )
    b = take(make_loader(cfg), 1)[0]
    assert b.size == 16 and all(x.shape[1] == 1 for x in b.x1)
    for x in b.x1:  # 2-px zero border is black (-1) at full side
        if x.shape[-1] == 32:
            assert torch.all(x[..., :2, :] == -1)
