"""train.global_batch: the same optimizer step on 1 or 2 processes (gloo), resume across world sizes;
the loader is told its device (pinned memory on CUDA)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp
import yaml
from conftest import free_port

from cdc.config import ConfigError, for_world, from_dict
from cdc.data.prepare import prepare
from cdc.train import checkpoint as C


def _cfg(shards: str, **train):
    t = dict(batch_size=4, global_batch=16, steps=2, lr=1e-3, log_every=1, ckpt_every=0)
    t.update(sample_every=0, precision="fp32", ema_decay=0.9, label_dropout=0.1, **train)
    return {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16, 32]},
        "data": {"shards": shards, "workers": 0, "shuffle": 64},
        "train": t,
    }


def test_grad_accum_follows_world_size():
    raw = _cfg("unused", global_batch=256, batch_size=8)
    cfg = from_dict(raw)
    assert [for_world(cfg, w).train.grad_accum for w in (1, 2, 4, 8, 16, 32)] == [32, 16, 8, 4, 2, 1]
    assert cfg.train.grad_accum == 1  # for_world returns a copy
    with pytest.raises(ConfigError, match=r"not a multiple of train.batch_size \(8\) x 3 processes"):
        for_world(cfg, 3)
    with pytest.raises(ConfigError, match="multiple of train.batch_size"):
        from_dict({**raw, "train": {**raw["train"], "global_batch": 20}})
    off = from_dict(_cfg("unused", global_batch=0, grad_accum=3))
    assert for_world(off, 4).train.grad_accum == 3  # 0 = off: grad_accum as given


class _Synthetic:
    """Stands in for the loader: micro-batch g of the global step sequence is the same on any world size.

    On rank r of W with A micro-steps per step, micro-batch i of this rank is global micro-batch
    (i // A) * A * W + (i % A) * W + r, so one optimizer step sees the same A*W micro-batches.
    """

    def __init__(self, cfg, rank, world, **_):
        self.cfg, self.rank, self.world, self.batches = cfg, rank, world, 0

    def state_dict(self):
        return {"batches": self.batches, "batch_size": self.cfg.train.batch_size, "rank": self.rank}

    def load_state_dict(self, state):
        self.batches = int(state["batches"])

    def __iter__(self):
        from cdc.flow.matching import Schedule, group_batch

        A, W, B = self.cfg.train.grad_accum, self.world, self.cfg.train.batch_size
        sched = Schedule.from_config(self.cfg.flow)
        while True:
            i = self.batches
            g = (i // A) * A * W + (i % A) * W + self.rank
            gen = torch.Generator().manual_seed(1000 + g)
            x = torch.rand(B, 1, 32, 32, generator=gen) * 2 - 1  # (B, C, R, R)
            t = torch.rand(B, generator=gen)
            y = torch.randint(0, 10, (B,), generator=gen)
            b = group_batch(x, t, y, sched)
            b.meta["g"] = g
            self.batches += 1
            yield b


def _worker(rank: int, world: int, port: int, raw: dict, run: str, synthetic: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    import cdc.data.loader
    import cdc.train.loop as T
    from cdc.train import distributed as D

    if synthetic:
        real = T.loss

        def loss(field, batch, sched, interp, gen, *a, **k):
            # noise and label dropout keyed by the global micro-batch, not by rank
            return real(field, batch, sched, interp, torch.Generator().manual_seed(batch.meta["g"]), *a, **k)

        T.loss = loss
        cdc.data.loader.make_loader = lambda cfg, rank=0, world_size=1, **k: _Synthetic(cfg, rank, world_size)
        cdc.data.loader.resolve_shards = lambda spec: ([], None)  # the synthetic batches read no shards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T.train(from_dict(raw), run, progress=False)
    if rank == 0:
        Path(run, f"warnings-{world}.txt").write_text("\n".join(str(w.message) for w in caught))
    D.shutdown()


def _launch(world: int, raw: dict, run: Path, synthetic: bool) -> None:
    tmp.spawn(_worker, (world, free_port(), raw, str(run), synthetic), nprocs=world, join=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_same_optimizer_step_on_one_and_two_gloo_processes(tmp_path):
    raw = _cfg("unused")
    runs = {w: tmp_path / f"w{w}" for w in (1, 2)}
    for w, run in runs.items():
        _launch(w, raw, run, synthetic=True)
    (a, _), (b, _) = (C.load_latest(runs[w] / "checkpoints") for w in (1, 2))
    assert a["step"] == b["step"] == 2
    init = from_dict(raw)
    moved = 0.0
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], rtol=1e-5, atol=2e-6)
        moved += float((a["model"][k] - a["ema"][k]).abs().sum())
    assert moved > 0 and init.train.global_batch == 16
    ma, mb = _metrics(runs[1]), _metrics(runs[2])
    assert [m["grad_accum"] for m in ma] == [4, 4] and [m["grad_accum"] for m in mb] == [2, 2]
    assert {m["global_batch"] for m in ma + mb} == {16}
    for x, y in zip(ma, mb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    resolved = yaml.safe_load((runs[2] / "config.yaml").read_text())
    assert resolved["train"]["grad_accum"] == 2 and resolved["train"]["global_batch"] == 16


@pytest.fixture(scope="module")
def fm_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=256, shard_size=64, progress=False)
    return out


@pytest.mark.slow
def test_resume_on_another_world_size_keeps_the_global_batch(fm_shards, tmp_path):
    run = tmp_path / "run"
    _launch(1, _cfg(str(fm_shards), steps=2), run, synthetic=False)
    _launch(2, _cfg(str(fm_shards), steps=4), run, synthetic=False)
    m = _metrics(run)
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert [x["grad_accum"] for x in m] == [4, 4, 2, 2] and {x["global_batch"] for x in m} == {16}
    st, _ = C.load_latest(run / "checkpoints")
    # the global stream position: 2 steps x 16 samples on 1 rank, then 2 x 16 on 2 ranks
    assert [r["data"]["position"] for r in st["ranks"]] == [64, 64]
    assert st["ranks"][0]["param_checksum"] == st["ranks"][1]["param_checksum"]
    msg = (run / "warnings-2.txt").read_text()
    assert "global batch 16 kept (grad_accum 4 -> 2)" in msg and "data continues at sample 32 of the same stream" in msg


class _Built(Exception):
    pass


def test_train_tells_the_loader_its_device(tmp_path, monkeypatch):
    import cdc.data.loader
    from cdc.train.loop import train

    def record(cfg, **kw):
        raise _Built(kw)

    monkeypatch.setattr(cdc.data.loader, "make_loader", record)
    monkeypatch.setattr(cdc.data.loader, "resolve_shards", lambda spec: ([], None))  # no shards needed
    with pytest.raises(_Built) as e:
        train(from_dict(_cfg("unused")), tmp_path / "run", progress=False)
    assert e.value.args[0]["device"] == torch.device("cpu")


def test_loader_pins_memory_on_cuda_only(fm_shards, monkeypatch):
    """Workers send uint8; on CUDA the joined batch is pinned and copied without blocking, then
    scaled to [-1, 1] on the device. Recorded with stand-ins, so it runs without a GPU."""
    from cdc.data.loader import make_loader

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: (calls.append(("pin", self.dtype)), self)[1])
    real_to = torch.Tensor.to

    def to(self, *a, **kw):
        if a and str(a[0]).startswith("cuda"):
            calls.append(("to", self.dtype, kw.get("non_blocking")))
            return self
        return real_to(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", to)
    raw = _cfg(str(fm_shards))
    raw["data"]["workers"] = 1
    b = next(iter(make_loader(from_dict(raw), device="cpu")))
    assert calls == [] and all(x.dtype == torch.float32 for x in b.x1)
    b = next(iter(make_loader(from_dict(raw), device="cuda")))
    groups = len(b.stage)
    assert calls.count(("pin", torch.uint8)) == groups  # pixels cross as uint8: a quarter of float32's bytes
    assert calls.count(("to", torch.uint8, True)) == groups
    assert len([c for c in calls if c[0] == "to"]) == 3 * groups and all(c[-1] is True for c in calls if c[0] == "to")
    assert all(x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 for x in b.x1)


@pytest.mark.gpu
def test_cuda_loader_yields_device_batches(fm_shards):
    from cdc.data.loader import make_loader

    raw = _cfg(str(fm_shards))
    raw["data"]["workers"] = 1
    b = next(iter(make_loader(from_dict(raw), device="cuda")))
    assert all(x.is_cuda for x in b.x1 + b.t + b.y)
