"""CUDA-only checks (skipped without a GPU; bin/gpu-check runs them on a lent machine)."""

import warnings

import pytest
import torch

from cdc.config import from_dict
from cdc.data.prepare import prepare


@pytest.fixture(autouse=True)
def _no_tf32_leak():
    """cdc.train.loop.train switches TF32 matmuls on for the process (train.tf32); the fp32 comparisons
    here (1e-4) must not inherit it from an earlier test's training run."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=256, shard_size=64, progress=False)
    return out


def _recipe(shards, backend_compile: bool = False, **train):
    t = dict(
        batch_size=8,
        steps=4,
        lr=1e-3,
        log_every=1000,
        check_every=1000,
        ckpt_every=0,
        sample_every=0,
        precision="bf16",
        compile=backend_compile,
    )
    t.update(train)
    return from_dict(
        {
            "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
            "flow": {"sides": [8, 16, 32]},
            "data": {"shards": str(shards), "workers": 0, "shuffle": 64},
            "train": t,
        }
    )


def _count_syncs(cfg, run_dir) -> int:
    """Synchronizing CUDA calls made by a whole cdc.train.loop.train run (torch's sync debug mode)."""
    from cdc.train.loop import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train(cfg, run_dir, progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_training_steps_make_no_host_sync(shards, tmp_path, compiled):
    """Ten more steps add no synchronizing call: setup, the final log and checkpoint sync, the
    steps in between do not (losses, skip decision and stop flags stay on the device)."""
    _count_syncs(_recipe(shards, compiled, steps=2), tmp_path / "warm")  # lazy CUDA / cuBLAS / compile setup
    short = _count_syncs(_recipe(shards, compiled, steps=3), tmp_path / "short")
    long = _count_syncs(_recipe(shards, compiled, steps=13), tmp_path / "long")
    assert long == short, f"{long - short} host syncs in 10 training steps"


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_exact_resume_on_cuda(shards, tmp_path, compiled):
    """Train 6 steps straight, or 3 then resume to 6 (bf16 autocast on CUDA). Resuming must not
    add any difference beyond what two identical uninterrupted runs show (CUDA atomics)."""
    from cdc.train import checkpoint as C
    from cdc.train.loop import train

    def weights(name):
        state, _ = C.load_latest(tmp_path / name / "checkpoints")
        assert state["step"] == 6
        return state["model"]

    train(_recipe(shards, compiled, steps=6, ckpt_every=3), tmp_path / "full", progress=False)
    train(_recipe(shards, compiled, steps=6, ckpt_every=3), tmp_path / "again", progress=False)
    train(_recipe(shards, compiled, steps=3, ckpt_every=3), tmp_path / "part", progress=False)
    train(_recipe(shards, compiled, steps=6, ckpt_every=3), tmp_path / "part", progress=False)
    a, b, c = weights("full"), weights("again"), weights("part")
    noise = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    for k in a:
        diff = float((a[k].float() - c[k].float()).abs().max())
        assert diff <= 4 * noise, f"{k}: resumed differs by {diff}, two full runs by {noise}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_packed_attention_op_on_cuda_matches_eager_autograd(dtype, backend):
    """The compiled trunk's attention op (forward via `attention`, backward via the flash kernels
    or the written-out gradient) against eager autograd, paper head dim 72, mixed lengths."""
    from cdc.nn.attention import attention, packed_attention, xformers_available

    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers not installed")
    g = torch.Generator(device="cuda").manual_seed(0)
    seqlens = [64] * 3 + [256] * 2 + [1024]
    q, k, v, w = (torch.randn(sum(seqlens), 16, 72, device="cuda", generator=g, dtype=dtype) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    a = packed_attention(q, k, v, torch.tensor(seqlens), backend)
    ga = torch.autograd.grad((a.float() * w.float()).sum(), (q, k, v))
    b = attention(q, k, v, seqlens=seqlens, backend=backend)
    gb = torch.autograd.grad((b.float() * w.float()).sum(), (q, k, v))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.float(), b.float(), **tol)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x.float(), y.float(), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "xformers"])
def test_cuda_graph_sampling_matches_eager(bf16, backend):
    """cdc.nn.cuda_graphs on a real device: every stage up to 16 px captured (no fallback), same images."""
    from cdc.flow.matching import Schedule
    from cdc.flow.sampler import image_seed, sample
    from cdc.nn.attention import xformers_available
    from cdc.nn.cuda_graphs import GraphedNet
    from cdc.nn.model import build_model
    from cdc.sample.generate import velocity_fn

    if backend == "xformers" and not xformers_available():
        pytest.skip("xformers not installed")
    cfg = from_dict({
        "model": {"preset": "tiny", "depth": 2, "width": 64, "heads": 4, "in_channels": 1, "num_classes": 10},
        "flow": {"sides": [8, 16, 32]},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg).cuda().eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.set_attn_backend(backend)
    sched = Schedule.from_config(cfg.flow)
    net = velocity_fn(model, bf16)
    graphed = GraphedNet(net, max_side=16)
    y = (torch.arange(8) % 10).cuda()
    seeds = [image_seed(0, i) for i in range(8)]
    with torch.inference_mode():
        for solver, cfg_scale in (("heun", 1.0), ("sde", 2.0)):
            a = sample(net, sched, y, seeds, 1, steps=4, cfg=cfg_scale, null_class=10, solver=solver).x
            b = sample(graphed, sched, y, seeds, 1, steps=4, cfg=cfg_scale, null_class=10, solver=solver).x
            tol = dict(rtol=0, atol=2e-3) if bf16 else dict(rtol=0, atol=1e-5)
            torch.testing.assert_close(b, a, **tol)
    assert len(graphed.graphs) == 4 and all(e is not None for e in graphed.graphs.values())
    assert graphed.replays == 2 * 4 * 2  # 2 samplings x 4 evaluations x 2 graphed stages


@pytest.mark.gpu
def test_cdc_sample_with_cuda_graphs_writes_the_same_images(shards, tmp_path):
    """`cdc sample --cuda-graph-side`: the run's net and its autoguide both graphed, same PNGs."""
    import numpy as np

    from cdc.sample.generate import generate
    from cdc.train.loop import train

    train(_recipe(shards, steps=4, ckpt_every=2), tmp_path / "run", progress=False)  # keeps step 2
    kw = dict(n=6, steps=3, cfg=2.0, solver="sde", guide="step:2", guide_scale=2.0, progress=False)
    a = generate(tmp_path / "run", tmp_path / "eager", cuda_graph_side=0, **kw)
    b = generate(tmp_path / "run", tmp_path / "graphs", cuda_graph_side=16, **kw)
    assert a["cuda_graph_side"] == 0 and b["cuda_graph_side"] == 16 and a["nfe"] == b["nfe"]
    xa, xb = (np.load(tmp_path / d / "samples.npz")["arr_0"].astype(int) for d in ("eager", "graphs"))
    assert np.abs(xa - xb).max() <= 1  # uint8 images; bf16 kernels may round one level apart
