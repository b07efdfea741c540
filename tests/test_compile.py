"""train.compile on CPU (inductor): one graph for every stage mix, eager results, exact resume.

The first compile of the tiny DiT takes ~20-90 s on 2 cores (inductor's C++ build, cached on disk
afterwards), so all these tests share one module-scoped compiled model where they can.
"""

import pytest
import torch
import torch._dynamo.testing as DT

import cdc.config as C
from cdc.data.prepare import prepare
from cdc.flow import matching as F
from cdc.flow.sampler import image_seed, sample
from cdc.nn.attention import attention, packed_attention
from cdc.nn.compiled_trunk import why_not_compiled
from cdc.nn.model import build_model

SIDES = [8, 16, 32]
# inductor builds C++ kernels on CPU; without a compiler, compile cannot run here (eager still can)
_WHY_NOT = why_not_compiled("cpu")  # torch < 2.5, or no C++ compiler
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"train.compile cannot run here: {_WHY_NOT}")


def _cfg():
    return C.from_dict(
        {"model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4}, "flow": {"sides": SIDES}}
    )


@pytest.fixture(scope="module")
def pair():
    """(compiled model, eager twin with the same weights, compile counter)."""
    torch.manual_seed(0)
    m = build_model(_cfg())
    for p in m.parameters():  # AdaLN-Zero starts at zero; random weights exercise every path
        torch.nn.init.normal_(p, std=0.05)
    ref = build_model(_cfg())
    ref.load_state_dict(m.state_dict())
    cnt = DT.CompileCounterWithBackend("inductor")
    m.compile_trunk(backend=cnt)
    return m, ref, cnt


def _mix(g, B):
    stage = torch.randint(0, len(SIDES), (B,), generator=g).sort().values.tolist()
    counts = {k: stage.count(k) for k in sorted(set(stage))}
    xs = [torch.randn(n, 1, SIDES[k], SIDES[k], generator=g) for k, n in counts.items()]
    taus = [torch.rand(n, generator=g) for n in counts.values()]
    ys = [torch.randint(0, 11, (n,), generator=g) for n in counts.values()]
    return xs, taus, ys


def test_packed_attention_op_matches_eager_attention_and_its_gradient():
    g = torch.Generator().manual_seed(0)
    seqlens = [4, 4, 16, 64, 64]
    q, k, v = (torch.randn(sum(seqlens), 2, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    w = torch.randn(sum(seqlens), 2, 8, generator=g, dtype=torch.float64)
    a = packed_attention(q, k, v, torch.tensor(seqlens), "auto")
    ga = torch.autograd.grad((a * w).sum(), (q, k, v))
    b = attention(q, k, v, seqlens=seqlens)
    gb = torch.autograd.grad((b * w).sum(), (q, k, v))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    torch.library.opcheck(packed_attention, tuple(x.detach() for x in (q, k, v)) + (torch.tensor(seqlens), "auto"))


def test_written_out_attention_gradient_matches_the_flash_kernels():
    """The fallback backward (used where the flash kernels refuse the input) is the same gradient."""
    from cdc.nn.attention import _attention_grad_math, _flash_grad

    g = torch.Generator().manual_seed(2)
    q, k, v, w = (torch.randn(3, 16, 2, 8, generator=g, dtype=torch.float64) for _ in range(4))  # (n, L, H, D)
    for x, y in zip(_attention_grad_math(q, k, v, w), _flash_grad(q, k, v, w), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


def test_compiled_trunk_compiles_once_over_200_stage_mixes(pair):
    m, ref, cnt = pair
    g = torch.Generator().manual_seed(1)
    seen, counts = set(), []
    for i in range(200):
        xs, taus, ys = _mix(g, 8)
        seen.add(tuple(x.shape[0] for x in xs) + tuple(x.shape[-1] for x in xs))
        if i % 20 == 0:  # outputs and parameter gradients equal eager within float32 rounding
            a, b = m(xs, taus, ys), ref(xs, taus, ys)
            sum(o.square().mean() for o in a).backward()
            sum(o.square().mean() for o in b).backward()
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
            for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)
            m.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                m(xs, taus, ys)
        counts.append(cnt.frame_count)
    assert len(seen) > 30  # many distinct stage mixes went through
    # grad / no-grad are two graphs, compiled on first use; nothing after that
    assert counts[-1] == counts[1] and counts[-1] <= 4, counts


def test_compiled_sampling_gives_the_same_images_at_any_batch_size(pair):
    m, ref, cnt = pair
    m.eval()
    ref.eval()
    sched = F.Schedule.make(SIDES)
    y = torch.arange(5) % 10
    seeds = [image_seed(3, i) for i in range(5)]
    kw = dict(steps=2, cfg=2.0, null_class=10, solver="heun")
    with torch.no_grad():
        full = sample(m, sched, y, seeds, 1, **kw).x
        parts = torch.cat([sample(m, sched, y[i : i + 2], seeds[i : i + 2], 1, **kw).x for i in (0, 2, 4)])
        eager = sample(ref, sched, y, seeds, 1, **kw).x
    m.train()
    ref.train()
    torch.testing.assert_close(full, parts, rtol=0, atol=1e-5)
    torch.testing.assert_close(full, eager, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=128, shard_size=64, progress=False)
    return out


def test_compiled_training_resumes_bit_for_bit(shards, tmp_path):
    from cdc.train import checkpoint as ck
    from cdc.train.loop import train

    def cfg(steps):
        return C.from_dict(
            {
                "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
                "flow": {"sides": SIDES},
                "data": {"shards": str(shards), "workers": 0, "shuffle": 64},
                "train": dict(
                    batch_size=8, steps=steps, lr=1e-3, log_every=1, ckpt_every=3, sample_every=0,
                    precision="fp32", compile=True,
                ),
            }
        )

    train(cfg(6), tmp_path / "full", progress=False)
    train(cfg(3), tmp_path / "part", progress=False)
    train(cfg(6), tmp_path / "part", progress=False)
    a, _ = ck.load_latest(tmp_path / "full" / "checkpoints")
    b, _ = ck.load_latest(tmp_path / "part" / "checkpoints")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
