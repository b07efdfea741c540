from __future__ import annotations

import math

import pytest
import torch

from cdc.nn.attention import attention, groups_from_seqlens, xformers_available


def _naive(q, k, v):
    """Reference softmax attention for one sample: (N, H, D)."""
    s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("hnm,mhd->nhd", s.softmax(-1), v)


def _packed(seqlens, H=3, D=8, device="cpu", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    T = sum(seqlens)
    return [torch.randn(T, H, D, generator=g, dtype=dtype).to(device) for _ in range(3)]


def test_groups_from_seqlens():
    assert groups_from_seqlens([4, 4, 16, 64, 64, 64]) == [(2, 4), (1, 16), (3, 64)]


@pytest.mark.parametrize("seqlens", [[16, 16, 4, 64, 64], [9], [4, 4, 4]])
def test_packed_equals_per_sample(seqlens):
    q, k, v = _packed(seqlens)
    out = attention(q, k, v, seqlens=seqlens, backend="sdpa")
    assert out.shape == q.shape
    ref = torch.cat(
        [
            _naive(a, b, c)
            for a, b, c in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens), strict=True)
        ]
    )
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_dense_batch_layout():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = attention(q, k, v)
    assert out.shape == (2, 5, 3, 8)
    for b in range(2):
        torch.testing.assert_close(out[b], _naive(q[b], k[b], v[b]))


def test_explicit_groups_and_errors():
    seqlens = [4, 4, 16]
    q, k, v = _packed(seqlens)
    a = attention(q, k, v, seqlens=seqlens, groups=[(2, 4), (1, 16)])
    b = attention(q, k, v, seqlens=seqlens)
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="seqlens"):
        attention(q, k, v, seqlens=[4, 4])
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, seqlens=seqlens, backend="flash")
    if not xformers_available():
        with pytest.raises(RuntimeError, match="xformers"):
            attention(q, k, v, seqlens=seqlens, backend="xformers")


@pytest.mark.gpu
def test_sdpa_matches_xformers_on_cuda():
    if not xformers_available():
        pytest.skip("xformers not installed")
    seqlens = [64] * 3 + [256] * 2 + [1024]
    q, k, v = (t.to(torch.bfloat16) for t in _packed(seqlens, H=16, D=72, device="cuda", dtype=torch.float32))
    a = attention(q, k, v, seqlens=seqlens, backend="sdpa").float()
    b = attention(q, k, v, seqlens=seqlens, backend="xformers").float()
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_auto_backend_falls_back_to_sdpa_where_xformers_kernels_fail(monkeypatch):
    """An importable xformers whose kernels fail on this GPU (no build for its architecture or for
    this torch) must not break training: "auto" picks SDPA, an explicit "xformers" says why."""
    import cdc.nn.attention as A

    cuda = torch.device("cuda", 0)  # _pick only reads the device type: no GPU needed here
    monkeypatch.setattr(A, "xformers_available", lambda: True)
    monkeypatch.setattr(A, "xformers_error", lambda dev: "NotImplementedError: No operator found")
    assert A._pick("auto", cuda) == "sdpa"
    with pytest.raises(RuntimeError, match="fails on cuda:0: NotImplementedError: No operator found"):
        A._pick("xformers", cuda)
    monkeypatch.setattr(A, "xformers_error", lambda dev: "")
    assert A._pick("auto", cuda) == "xformers" and A._pick("xformers", cuda) == "xformers"
    assert A._pick("auto", torch.device("cpu")) == "sdpa"  # xformers kernels are CUDA-only
    monkeypatch.undo()
    if not xformers_available():
        assert A.xformers_error("cuda:0") == "xformers is not installed"
