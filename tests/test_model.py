from __future__ import annotations

import math

import pytest
import torch

import cdc.config as C
from cdc.nn.model import build_model, count_params, forward_flops
from cdc.nn.tokens import apply_rope, grid_coords, patchify, rope_table, unpatchify


def _cfg(**model):
    sides = model.pop("sides", [32, 64, 128, 256])
    return C.from_dict({"model": {"preset": "tiny", **model}, "flow": {"sides": sides}})


def _randomised(cfg, seed=0):
    """A tiny model with every parameter random (zero-init AdaLN/output layers would hide bugs)."""
    torch.manual_seed(seed)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.1)
    return m.eval()


def _mixed_batch(C_=3, seed=0, num_classes=1000):
    g = torch.Generator().manual_seed(seed)
    spec = [(2, 32), (1, 128), (3, 64), (1, 256)]  # (batch, side) per group
    xs = [torch.randn(b, C_, s, s, generator=g) for b, s in spec]
    taus = [torch.rand(b, generator=g) for b, _ in spec]
    ys = [torch.randint(0, num_classes + 1, (b,), generator=g) for b, _ in spec]
    ys[0][0] = num_classes  # the null class is a valid label
    return xs, taus, ys


def test_paper_preset_param_count():
    cfg = C.from_dict({"model": {"preset": "paper"}})
    with torch.device("meta"):
        m = build_model(cfg)
    n = count_params(m)
    print(f"paper preset: {n:,} parameters")
    assert abs(n - 677e6) / 677e6 < 0.01
    assert m.head_dim == 72 and len(m.blocks) == 28
    with torch.device("meta"):
        m64 = build_model(C.from_dict({"model": {"preset": "XL-h64"}}))
    assert m64.head_dim == 64 and abs(count_params(m64) - 677e6) / 677e6 < 0.01


def _explicit_attention(q, k, v, *args, **kwargs):
    """softmax(q k^T / sqrt(d)) v as plain matmuls, which every torch's FLOP counter sees as bmm."""
    w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return w.softmax(-1) @ v


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_forward_flops_matches_torch_flop_counter(head, monkeypatch):
    """forward_flops (used for MFU) equals torch's own count of matmul/conv/attention FLOPs.

    Which fused SDPA kernels torch's FlopCounterMode counts differs between releases (2.14 counts
    none on CPU), so attention runs as explicit matmuls here: the counter then sees every FLOP the
    analytic count claims, on any torch. One sample, because the timestep/resolution MLPs run once
    per stage group and would otherwise be shared across the batch.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = C.from_dict(
        {
            "model": {"preset": "tiny", "depth": 2, "width": 64, "heads": 4, "in_channels": 1, "head": head},
            "flow": {"sides": [8, 16, 32]},
        }
    )
    m = build_model(cfg).eval()
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", _explicit_attention)
    for side in (8, 32):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.randn(1, 1, side, side), torch.rand(1), torch.zeros(1, dtype=torch.long))
        counts = {str(op).split(".")[-1]: n for op, n in fc.get_flop_counts()["Global"].items()}
        N = (side // cfg.model.patch) ** 2
        assert counts["bmm"] == 2 * 2 * N * N * cfg.model.width * cfg.model.depth  # Q K^T and A V
        assert fc.get_total_flops() == pytest.approx(forward_flops(cfg, side), rel=1e-9)


def test_conv_head_starts_at_zero_and_sees_pixels():
    m = build_model(_cfg(head="conv", sides=[8, 16, 32], in_channels=1))
    x = torch.randn(3, 1, 32, 32)
    t, y = torch.rand(3), torch.zeros(3, dtype=torch.long)
    assert m(x, t, y).abs().max() == 0  # zero-init last conv, like AdaLN-Zero
    with torch.no_grad():
        m.pixel_head.conv2.weight.normal_(0, 0.1)
        m.final.linear.weight.zero_()  # silence the tokens: only the input skip remains
        m.final.linear.bias.zero_()
        x2 = x.clone()
        x2[:, :, 10, 13] += 1.0
        d = (m(x2, t, y) - m(x, t, y)).abs()[:, 0]  # (3, 32, 32)
    # two 3x3 convs: a one-pixel change reaches exactly its 5x5 neighbourhood, across patch borders
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[8:13, 11:16] = True
    assert (d[:, inside] > 0).all() and (d[:, ~inside] == 0).all()


def test_forward_flops_matches_design():
    # DESIGN §4: ~5.4 TFLOP per training sample (fwd+bwd) of the paper preset, uniform stages
    cfg = C.from_dict({"model": {"preset": "paper"}})
    per_sample = sum(3 * forward_flops(cfg, s) for s in cfg.flow.sides) / 4
    assert 5.3e12 < per_sample < 5.45e12
    # attention part grows with N^2: 256 px (4096 tokens) costs more than 4x 128 px
    assert forward_flops(cfg, 256) > 4 * forward_flops(cfg, 128)


def test_patchify_roundtrip_and_conv_equivalence():
    x = torch.randn(2, 3, 16, 16)
    t = patchify(x, 4)
    assert t.shape == (2 * 16, 48)
    torch.testing.assert_close(unpatchify(t, 2, 3, 16, 4), x)
    lin = torch.nn.Linear(48, 5)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)
    with torch.no_grad():  # patch vector order is (py, px, c)
        conv.weight.copy_(lin.weight.view(5, 4, 4, 3).permute(0, 3, 1, 2))
        conv.bias.copy_(lin.bias)
    ref = conv(x).flatten(2).transpose(1, 2).reshape(-1, 5)  # (B*N, 5) row-major tokens
    torch.testing.assert_close(lin(t), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sides,channels", [([32, 64, 128, 256], 3), ([8, 16, 32], 1)])
def test_tiny_runs_at_every_stage(sides, channels):
    cfg = _cfg(sides=sides, in_channels=channels, num_classes=10)
    m = build_model(cfg)
    for s in sides:
        x = torch.randn(2, channels, s, s)
        out = m(x, torch.rand(2), torch.tensor([3, 10]))
        assert out.shape == x.shape
    # DiT init: zero output layer -> zero velocity at init
    assert m(x, torch.rand(2), torch.tensor([0, 1])).abs().max() == 0


@pytest.mark.parametrize(
    "pos,fusion,head", [("rope", "xattn", "linear"), ("sincos", "add", "linear"), ("rope", "add", "conv")]
)
def test_packed_mixed_batch_equals_per_sample(pos, fusion, head):
    cfg = _cfg(pos=pos, res_fusion=fusion, head=head)
    m = _randomised(cfg)
    xs, taus, ys = _mixed_batch()
    with torch.no_grad():
        outs = m(xs, taus, ys)
        assert [o.shape for o in outs] == [x.shape for x in xs]
        for x, t, y, o in zip(xs, taus, ys, outs, strict=True):
            for b in range(x.shape[0]):
                alone = m(x[b : b + 1], t[b : b + 1], y[b : b + 1])
                torch.testing.assert_close(o[b : b + 1], alone, atol=1e-5, rtol=1e-4)
    assert outs[0].abs().mean() > 1e-2  # non-vacuous


def test_grad_checkpointing_same_result():
    cfg = _cfg()
    m = _randomised(cfg).train()
    xs, taus, ys = _mixed_batch()
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.grad_checkpointing = ckpt
        sum(o.square().mean() for o in m(xs, taus, ys)).backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("head", ["linear", "conv"])
def test_gradient_reaches_every_parameter(head):
    cfg = _cfg(qk_norm=True, head=head)
    m = _randomised(cfg).train()
    xs, taus, ys = _mixed_batch()
    sum(o.square().mean() for o in m(xs, taus, ys)).backward()
    # softmax over the single resolution key is identically 1 (App. F eq. 42), so W_q and W_k get
    # exactly zero gradient; every other parameter must get some
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        if name in ("fuse.wq.weight", "fuse.wk.weight"):
            assert p.grad.abs().max() == 0, name
        else:
            assert p.grad.abs().sum() > 0, name


def test_rope_scores_depend_on_relative_position_only():
    Dh = 16
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 1, Dh, generator=g, dtype=torch.float64),
        torch.randn(1, 1, Dh, generator=g, dtype=torch.float64),
    )

    def score(pq, pk):
        cq, sq = rope_table(torch.tensor([pq], dtype=torch.float64), Dh)
        ck, sk = rope_table(torch.tensor([pk], dtype=torch.float64), Dh)
        rq, rk = apply_rope(q, cq, sq), apply_rope(k, ck, sk)  # float32 math inside
        return (rq * rk).sum().item()

    base = score((3.0, 5.0), (7.5, 1.0))
    for shift in [(1.0, 0.0), (0.0, 2.5), (-4.0, 11.0)]:
        s = score((3.0 + shift[0], 5.0 + shift[1]), (7.5 + shift[0], 1.0 + shift[1]))
        assert abs(s - base) < 1e-5
    assert abs(score((3.0, 5.0), (8.5, 1.0)) - base) > 1e-3  # but it does see relative position
    # rotation keeps norms
    c, s = rope_table(torch.tensor([[2.0, 9.0]], dtype=torch.float64), Dh)
    torch.testing.assert_close(apply_rope(q, c, s).norm(), q.norm())


def test_rope_rotates_each_dim_pair_by_its_axis_angle():
    """The written-out rotation: dims j and j + Dh/4 of the y half turn by y * f_j, those of the x
    half by x * f_j, with f_j = 100^(-j / (Dh/4)) (ROPE_BASE); gradients too, bit for bit against the
    four-product form on the angles."""
    T, H, Dh = 7, 3, 16
    F = Dh // 4
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(T, 2, generator=g, dtype=torch.float64) * 32  # (T, 2) (y, x)
    x = torch.randn(T, H, Dh, generator=g, requires_grad=True)
    cos, sin = rope_table(coords, Dh)
    out = apply_rope(x, cos, sin)
    theta = coords[:, :, None] * 100.0 ** (-torch.arange(F, dtype=torch.float64) / F)  # (T, 2, F)
    c, s = torch.cos(theta).float()[:, None], torch.sin(theta).float()[:, None]  # (T, 1, axis, F)
    a, b = x.view(T, H, 2, 2, F).unbind(3)  # (T, H, axis, F)
    want = torch.stack([a * c - b * s, b * c + a * s], dim=3).view(T, H, Dh)
    assert torch.equal(out, want)
    gout = torch.randn(T, H, Dh, generator=g)
    assert torch.equal(*(torch.autograd.grad(o, x, gout)[0] for o in (out, want)))


def test_final_units_same_region_across_sides():
    G = 64  # 256 px / patch 4
    coarse, fine = grid_coords(8, G, "final"), grid_coords(16, G, "final")  # (64, 2), (256, 2)
    fine = fine.view(16, 16, 2)
    for i, j in [(0, 0), (3, 5), (7, 7)]:
        children = fine[2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, 2)
        torch.testing.assert_close(coarse[i * 8 + j], children.mean(0))
    # the grids span the same extent [0, G] at every stage
    for g in (8, 16, 32, 64):
        c = grid_coords(g, G, "final")
        assert c.min() == G / g / 2 and c.max() == G - G / g / 2
    torch.testing.assert_close(grid_coords(4, G, "native")[5], torch.tensor([1.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("fusion", ["xattn", "add"])
def test_resolution_embedding_changes_conditioning(fusion):
    cfg = _cfg(res_fusion=fusion)
    m = _randomised(cfg)
    tau, y = torch.tensor([0.3]), torch.tensor([7])
    with torch.no_grad():
        c8 = m.condition(tau, y, [8], [1])
        c16 = m.condition(tau, y, [16], [1])
        assert (c8 - c16).abs().max() > 1e-3
        gamma = m.t_embed(tau * m.timesteps)
        e8 = m.r_embed(torch.tensor([8.0]))
        if fusion == "xattn":
            # softmax over one key is 1: c = gamma + W_o W_v e_k + class embedding (eq. 41-44)
            expect = gamma + e8 @ m.fuse.wv.weight.T @ m.fuse.wo.weight.T + m.y_embed(y)
        else:
            expect = gamma + e8 + m.y_embed(y)
        torch.testing.assert_close(c8, expect, atol=1e-5, rtol=1e-5)
        # the network output depends on e_k: removing it (zero E) changes the same input's output
        x = torch.randn(1, 3, 32, 32)
        a = m(x, tau, y)
        m.r_embed.mlp[2].weight.zero_()
        m.r_embed.mlp[2].bias.zero_()
        m.r_embed.mlp[0].weight.zero_()
        b = m(x, tau, y)
        assert (a - b).abs().max() > 1e-4


def test_bad_input_errors():
    m = build_model(_cfg())
    with pytest.raises(ValueError, match="multiple of the patch"):
        m(torch.randn(1, 3, 30, 30), torch.rand(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="must be"):
        m(torch.randn(2, 3, 32, 32), torch.rand(3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="equal"):
        m([torch.randn(1, 3, 32, 32)], [], [])


def test_pos_cache_and_devices():
    m = build_model(_cfg())
    m(torch.randn(1, 3, 32, 32), torch.rand(1), torch.tensor([0]))
    assert (8, "cpu") in m._pos_cache
    assert math.isclose(m._pos_cache[(8, "cpu")][0][0, 0, 0].item(), math.cos(4.0), rel_tol=1e-6)


@pytest.mark.gpu
def test_paper_preset_gpu_mixed_bf16():
    cfg = C.from_dict({"model": {"preset": "paper"}})
    dev = torch.device("cuda")
    m = build_model(cfg).to(dev).train()
    g = torch.Generator().manual_seed(0)
    sides = torch.tensor(cfg.flow.sides)[torch.randint(0, 4, (8,), generator=g)].sort().values.tolist()
    groups = {s: sides.count(s) for s in sorted(set(sides))}
    xs = [torch.randn(n, 3, s, s, device=dev) for s, n in groups.items()]
    taus = [torch.rand(n, device=dev) for n in groups.values()]
    ys = [torch.randint(0, 1001, (n,), device=dev) for n in groups.values()]
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outs = m(xs, taus, ys)
        loss = sum(o.float().square().mean() for o in outs)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"paper preset, batch 8 sides {sides}: peak memory {peak:.2f} GiB")
    assert all(o.shape == x.shape for o, x in zip(outs, xs, strict=True))
    assert m.x_embed.weight.grad is not None


def test_gather_rows_is_a_gather_whose_backward_sums_per_row():
    """The compiled trunk's per-token modulation: v[idx] forward, scatter-add backward, no atomics."""
    from cdc.nn.compiled_trunk import gather_rows

    g = torch.Generator().manual_seed(0)
    v = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([0, 0, 1, 3, 3, 3, 4, 4])  # row 2 gets no token
    out = gather_rows(v, idx)
    assert torch.equal(out, v[idx])
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(up)
    want = torch.zeros(5, 7, dtype=torch.float64).index_add_(0, idx, up)
    assert torch.allclose(v.grad, want, atol=1e-12) and torch.equal(v.grad[2], torch.zeros(7, dtype=torch.float64))
