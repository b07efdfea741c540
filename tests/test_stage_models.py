"""Stage-specific DiTs (model.stage_models, Table 3) and the per-stage-grid RoPE option (model.pos_units)."""

from __future__ import annotations

import pytest
import torch

import cdc.config as C
from cdc.config import to_dict
from cdc.nn.model import DiT, build_model, count_params
from cdc.nn.stage_models import StageDiTs
from cdc.train import checkpoint


def _cfg(sides=(8, 16, 32), **model):
    return C.from_dict(
        {
            "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, **model},
            "flow": {"sides": list(sides)},
        }
    )


def _random(m, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def _batch(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, 1, s, s, generator=g) for b, s in spec]
    taus = [torch.rand(b, generator=g) for b, _ in spec]
    ys = [torch.randint(0, 11, (b,), generator=g) for b, _ in spec]
    return xs, taus, ys


def test_same_per_stage_size_convention():
    unified, staged = build_model(_cfg()), build_model(_cfg(stage_models=True))
    assert isinstance(unified, DiT) and isinstance(staged, StageDiTs)
    assert len(staged.nets) == 3 and staged.sides == [8, 16, 32]
    assert count_params(staged) == 3 * count_params(unified)


def test_each_group_runs_through_its_stage_net_alone():
    m = _random(build_model(_cfg(stage_models=True)))
    spec = [(2, 16), (3, 8), (1, 32), (2, 8)]  # mixed order, side 8 twice
    xs, taus, ys = _batch(spec)
    with torch.no_grad():
        outs = m(xs, taus, ys)
        for (_b, side), x, t, y, o in zip(spec, xs, taus, ys, outs):
            k = [8, 16, 32].index(side)
            torch.testing.assert_close(o, m.nets[k](x, t, y), rtol=1e-5, atol=1e-5)
            assert o.shape == x.shape
        # the nets really differ: the side-8 input through the side-16 net gives another answer
        assert (m.nets[1](xs[1], taus[1], ys[1]) - outs[1]).abs().max() > 1e-3
        with pytest.raises(ValueError, match="no DiT for side 4"):
            m([torch.randn(1, 1, 4, 4)], [torch.rand(1)], [torch.zeros(1, dtype=torch.long)])


def test_a_stage_loss_only_trains_that_stage():
    m = build_model(_cfg(stage_models=True)).train()
    xs, taus, ys = _batch([(2, 16)])
    m(xs, taus, ys)[0].sum().backward()  # linear in the output: zero-init heads still get a gradient
    assert all(p.grad is None for p in m.nets[0].parameters())
    assert all(p.grad is None for p in m.nets[2].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.nets[1].parameters())


def test_checkpoint_round_trip_for_sampling(tmp_path):
    cfg = _cfg(stage_models=True)
    m = _random(build_model(cfg))
    checkpoint.save(
        tmp_path / "step_0000001.pt", {"config": to_dict(cfg), "model": m.state_dict(), "step": 1}
    )
    loaded, lcfg, info = checkpoint.load_for_inference(tmp_path, ema=False)
    assert lcfg.model.stage_models and isinstance(loaded, StageDiTs)
    xs, taus, ys = _batch([(2, 32), (1, 8)])
    with torch.no_grad():
        for a, b in zip(m(xs, taus, ys), loaded(xs, taus, ys)):
            torch.testing.assert_close(a, b)


def test_per_stage_grid_rope_differs_only_below_the_final_stage():
    """RoPE sees only relative positions. Final-grid units shift the final grid by 0.5 (same
    attention) but stretch a coarser grid by G/g, so the per-stage grid changes coarse stages only."""
    fin = _random(build_model(_cfg(pos="rope", pos_units="final")))
    nat = build_model(_cfg(pos="rope", pos_units="native")).eval()
    nat.load_state_dict(fin.state_dict())
    xs, taus, ys = _batch([(2, 32), (2, 8)])
    with torch.no_grad():
        a, b = fin(xs, taus, ys), nat(xs, taus, ys)
    torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
    assert (a[1] - b[1]).abs().max() > 1e-3
