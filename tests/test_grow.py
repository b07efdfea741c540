"""Growing a trained model by one stage: cdc train RECIPE --init RUN with one more side (docs/grow.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from cdc.cli import app
from cdc.config import ConfigError, from_dict
from cdc.data.loader import make_loader
from cdc.data.prepare import prepare
from cdc.flow.matching import Schedule, weight_stages
from cdc.nn.model import build_model
from cdc.sample.generate import generate
from cdc.train import checkpoint as C
from cdc.train.init_from import _load_into, start_from_init


def recipe(shards, sides, **extra):
    raw = {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": sides},
        "data": {"shards": str(shards), "workers": 0, "shuffle": 64},
        "train": dict(batch_size=8, steps=3, lr=1e-3, log_every=1, ckpt_every=3, keep_last=10,
                      sample_every=0, precision="fp32", ema_decay=0.99),
        "sample": {"steps": 2, "cfg": 2.0, "batch": 16},
    }  # fmt: skip
    for sec, vals in extra.items():
        raw[sec] = {**raw.get(sec, {}), **vals}
    return raw


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run trained 8 -> 16 on Fashion-MNIST, the model to grow to 8 -> 16 -> 32."""
    from cdc.train.loop import train

    root = tmp_path_factory.mktemp("grow")
    shards = root / "shards"
    prepare("fashion-mnist", shards, limit=128, shard_size=64, progress=False)
    train(from_dict(recipe(shards, [8, 16])), root / "small", progress=False)
    return root, shards


def _grow(root, shards, run, **train):
    rec = root / f"{run}.yaml"
    raw = recipe(shards, [8, 16, 32], flow={"stage_weights": [1, 1, 6]}, train={"steps": 2, "ckpt_every": 2, **train})
    rec.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(root / run), "--init", str(root / "small")])
    assert res.exit_code == 0, res.output
    return from_dict(yaml.safe_load((root / run / "config.yaml").read_text()))


def test_grown_model_loads_every_old_weight_and_samples_32px(small_run, tmp_path):
    root, shards = small_run
    cfg = _grow(root, shards, "grown-frozen", init_trunk_lr=0.0)
    assert cfg.flow.sides == [8, 16, 32] and cfg.model.pos_side == 16  # the init's position units
    old = C.load(cfg.train.init)["ema"]
    grown = build_model(cfg)
    start_from_init(grown, cfg, torch.device("cpu"))
    for k, v in grown.state_dict().items():  # the unified DiT has no per-stage weight: all of them load
        assert torch.equal(v, old[k]), k
    small = build_model(from_dict(recipe(shards, [8, 16])))
    small.load_state_dict(old)
    # old stages see exactly the positions they were trained with; the new stage's token grid (8)
    # sits at half-unit spacing inside the same span (interpolated, not extrapolated)
    for g in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(grown._grid_pos(g, "cpu"), small._grid_pos(g, "cpu")))
    cos8 = grown._grid_pos(8, "cpu")[0][:, 0, 1]  # a rotation frequency of the new grid
    from cdc.nn.tokens import grid_coords

    assert grid_coords(8, grown.final_grid, "final").max() == 3.75  # < the old final grid's 4 units
    assert cos8.shape == (64,)
    # the new stage's resolution embedding is the trained E(r) at its grid r = 8: the same MLP
    with torch.no_grad():
        r = torch.tensor([2.0, 4.0, 8.0])
        assert torch.equal(grown.r_embed(r), small.r_embed(r))
        assert not torch.allclose(grown.r_embed(r)[2], grown.r_embed(r)[1])  # a stage of its own
    # init_trunk_lr 0: after optimizer steps the blocks are bit-identical, the rest moved
    trained = C.load(root / "grown-frozen" / "checkpoints" / C.ckpt_name(2))
    assert trained["step"] == 2
    blocks = [k for k in old if k.startswith("blocks.")]
    assert blocks and all(torch.equal(trained["model"][k], old[k]) for k in blocks)
    assert all(torch.equal(trained["ema"][k], old[k]) for k in blocks)
    assert not torch.equal(trained["model"]["final.adaLN.1.weight"], old["final.adaLN.1.weight"])
    # the grown run samples at the new size
    generate(root / "grown-frozen", tmp_path / "s", n=3, steps="1", batch=3, progress=False, device="cpu")
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["arr_0"].shape == (3, 32, 32, 1)


def test_trunk_lr_scale_reaches_the_optimizer_and_survives_resume(small_run):
    root, shards = small_run
    _grow(root, shards, "grown-slow", init_trunk_lr=0.1)
    state = C.load(root / "grown-slow" / "checkpoints" / C.ckpt_name(2))
    rest, trunk = state["optimizer"]["param_groups"]
    assert trunk["lr_scale"] == 0.1 and "lr_scale" not in rest
    assert trunk["lr"] == pytest.approx(0.1 * rest["lr"]) and rest["lr"] > 0
    assert len(trunk["params"]) == sum(1 for k in state["model"] if k.startswith("blocks."))


def test_stage_weights_set_the_stage_frequencies():
    sched = Schedule.make([8, 16, 32])
    rng = np.random.default_rng(0)
    u = rng.random(30_000)
    t = torch.tensor([weight_stages(float(x), sched, [1, 1, 6]) for x in u], dtype=torch.float32)
    k = sched.stage_of(t)
    freq = torch.bincount(k, minlength=3).double() / len(k)
    # binomial std at n = 30000 is <= 0.0025: 0.01 is four of them
    assert torch.allclose(freq, torch.tensor([0.125, 0.125, 0.75], dtype=torch.float64), atol=0.01), freq
    tau = sched.tau_of(t, k)
    for s in range(3):  # uniform inside each stage: mean 1/2, variance 1/12
        ts = tau[k == s].double()
        assert abs(ts.mean() - 0.5) < 0.02 and abs(ts.var() - 1 / 12) < 0.01
    assert weight_stages(0.3, sched, None) == 0.3  # default: the draw itself, bit for bit
    zero = [weight_stages(float(x), sched, [0, 1, 1]) for x in u[:2000]]
    assert min(zero) >= 1 / 3  # a zero weight never draws its stage


def test_loader_draws_stages_by_weight(small_run):
    root, shards = small_run
    cfg = from_dict(recipe(shards, [8, 16, 32], flow={"stage_weights": [1, 0, 3]}, train={"batch_size": 32}))
    counts = torch.zeros(3)
    for _, b in zip(range(4), make_loader(cfg, seed=0)):
        for s, x in zip(b.stage, b.x1):
            counts[s] += len(x)
    assert counts[1] == 0 and 0.6 < counts[2] / counts.sum() < 0.9  # 128 draws of p = 0.75


def test_growing_refuses_anything_but_one_more_side(small_run, tmp_path):
    root, shards = small_run
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(recipe(shards, [16, 32, 64])))
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(tmp_path / "r"), "--init", str(root / "small")])
    assert res.exit_code == 2 and "growing adds exactly one finer side" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    # a weight whose shape does not fit is one line naming it
    cfg = from_dict(recipe(shards, [8, 16]))
    model = build_model(cfg)
    weights = dict(model.state_dict())
    weights["y_embed.weight"] = torch.zeros(5, 64)
    with pytest.raises(ConfigError, match=r"y_embed.weight has shape \[5, 64\] there, \[11, 64\] here"):
        _load_into(model, weights, "x.pt")


def test_stage_models_grow_by_copying_the_last_stage():
    small = build_model(from_dict({"model": {"preset": "tiny", "stage_models": True}, "flow": {"sides": [8, 16]}}))
    grown = build_model(from_dict({"model": {"preset": "tiny", "stage_models": True}, "flow": {"sides": [8, 16, 32]}}))
    old = small.state_dict()
    _load_into(grown, old, "x.pt", grown=True)
    new = grown.state_dict()
    for k, v in old.items():
        assert torch.equal(new[k], v), k
        if k.startswith("nets.1."):
            assert torch.equal(new["nets.2." + k[len("nets.1.") :]], v), k
