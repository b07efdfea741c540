"""cdc.nn.cuda_graphs.GraphedNet on CPU, with a stand-in for the capture (the real one: tests/test_gpu.py).

The stand-in's replay re-runs the captured function on the static input buffers, as a CUDA graph
replays its kernels on them; so these tests check the wrapper's own logic (copy in, clone out,
one capture per signature, which stages it serves, the fallbacks) against the plain net.
"""

import pytest
import torch

from cdc import config as C
from cdc.flow.matching import Schedule
from cdc.flow.sampler import autoguided, image_seed, sample
from cdc.nn.cuda_graphs import GraphedNet
from cdc.nn.model import build_model
from cdc.sample.generate import velocity_fn


class FakeCapture:
    def __init__(self, fail: bool = False):
        self.fail, self.captures = fail, 0

    def __call__(self, fn, pool):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore detail")
        out = fn()

        def replay():  # like a graph: the captured output tensors are rewritten in place
            for o, new in zip(out, fn(), strict=True):
                o.copy_(new)

        return out, replay


def _model(seed: int = 0):
    cfg = C.from_dict({
        "model": {"preset": "tiny", "depth": 2, "width": 64, "heads": 4, "in_channels": 1, "num_classes": 10},
        "flow": {"sides": [8, 16, 32]},
    })  # fmt: skip
    torch.manual_seed(seed)
    m = build_model(cfg).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():  # random everywhere: zero-init output layers would hide bugs
            p.normal_(0, 0.05)
    return m, Schedule.from_config(cfg.flow)


def _sample(net, sched, solver, cfg=2.0, **kw):
    y = torch.arange(6) % 10
    seeds = [image_seed(3, i) for i in range(6)]
    with torch.inference_mode():
        return sample(net, sched, y, seeds, 1, steps=3, cfg=cfg, null_class=10, solver=solver, **kw)


@pytest.mark.parametrize("solver", ["heun", "sde"])
def test_graphed_sampling_equals_the_plain_net(solver):
    model, sched = _model()
    net = velocity_fn(model, bf16=False)
    cap = FakeCapture()
    g = GraphedNet(net, max_side=16, capture=cap)
    plain = _sample(net, sched, solver)
    graphed = _sample(g, sched, solver)
    assert torch.equal(plain.x, graphed.x)
    assert plain.nfe == graphed.nfe == 3 * 3 * 2
    # one capture per signature: stages 8 and 16 px (CFG batch of 12); 32 px > max_side runs eager
    assert cap.captures == 2 and len(g.graphs) == 2
    assert {k[1][0][0] for k in g.graphs} == {(12, 1, 8, 8), (12, 1, 16, 16)}
    assert g.replays == 2 * 3  # 3 evaluations in each of the two graphed stages
    _sample(g, sched, solver)  # a second batch of the same shape captures nothing new
    assert cap.captures == 2 and g.replays == 2 * 2 * 3
    # without CFG the sampler gets the net's output itself, and Heun holds one across the next call
    assert torch.equal(_sample(net, sched, solver, cfg=1.0).x, _sample(g, sched, solver, cfg=1.0).x)
    assert cap.captures == 4  # batch 6 instead of 12: two new signatures


def test_outputs_are_not_overwritten_by_the_next_replay():
    model, _ = _model()
    g = GraphedNet(velocity_fn(model, bf16=False), max_side=32, capture=FakeCapture())
    x = torch.randn(2, 1, 8, 8)
    t, y = torch.full((2,), 0.3), torch.tensor([1, 2])
    with torch.inference_mode():
        first = g([x], [t], [y])[0]
        kept = first.clone()
        second = g([x + 1], [t * 2], [y])[0]
    assert torch.equal(first, kept) and not torch.equal(first, second)


def test_autoguided_nets_each_keep_their_graphs():
    model, sched = _model(0)
    guide, _ = _model(1)
    net, gnet = velocity_fn(model, bf16=False), velocity_fn(guide, bf16=False)
    plain = _sample(net, sched, "sde", guide=gnet, guide_scale=2.0)
    ga, gb = GraphedNet(net, 8, capture=FakeCapture()), GraphedNet(gnet, 8, capture=FakeCapture())
    graphed = _sample(ga, sched, "sde", guide=gb, guide_scale=2.0)
    assert torch.equal(plain.x, graphed.x) and ga.replays == gb.replays == 3
    both = autoguided(ga, gb, 2.0)  # the combination itself is plain tensor code around the two
    x = torch.randn(2, 1, 8, 8)
    with torch.inference_mode():
        a = both([x], [torch.full((2,), 0.5)], [torch.tensor([0, 1])])[0]
        b = autoguided(net, gnet, 2.0)([x], [torch.full((2,), 0.5)], [torch.tensor([0, 1])])[0]
    assert torch.equal(a, b)


def test_a_failed_capture_runs_that_signature_eager_and_says_so_once(capsys):
    model, sched = _model()
    net = velocity_fn(model, bf16=False)
    cap = FakeCapture(fail=True)
    g = GraphedNet(net, max_side=32, capture=cap)
    assert torch.equal(_sample(g, sched, "euler").x, _sample(net, sched, "euler").x)
    err = capsys.readouterr().err.strip().splitlines()
    assert cap.captures == 3 and len(err) == 3  # one per signature, never retried
    assert err[0].startswith("cuda graphs: capture failed for inputs [(12, 1, 8, 8)], running them eager")
    assert g.replays == 0


def test_at_most_max_graphs_signatures_are_captured():
    model, sched = _model()
    net = velocity_fn(model, bf16=False)
    cap = FakeCapture()
    g = GraphedNet(net, max_side=32, capture=cap, max_graphs=1)
    assert torch.equal(_sample(g, sched, "euler").x, _sample(net, sched, "euler").x)
    assert cap.captures == 1 and g.replays == 3  # stage 1 from its graph, the others eager


def test_without_cuda_the_real_capture_is_a_one_line_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        GraphedNet(lambda *a: a, 16)


def test_cuda_graph_side_config():
    assert C.from_dict({"sample": {"cuda_graph_side": 128}}).sample.cuda_graph_side == 128
    with pytest.raises(C.ConfigError, match="sample.cuda_graph_side must be >= 0"):
        C.from_dict({"sample": {"cuda_graph_side": -1}})
