"""One attention entry point for the DiT: plain batches or packed (block-diagonal) sequences.

Mixed-stage batches put every sample's tokens into one sequence (T, H, D). Each sample must attend
only to itself. On CUDA with xformers this is one `memory_efficient_attention` call with a
`BlockDiagonalMask`; otherwise (CPU, no xformers, or backend="sdpa") the packing order is used:
samples of equal length sit in contiguous runs, so each run is a dense (n, L, H, D) batch for
`scaled_dot_product_attention`. Both are exactly per-sample attention.
"""

from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "xformers")


@functools.cache
def xformers_available() -> bool:
    """True when xformers imports (its kernels only run on CUDA)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build that fails at import
        return False
    return True


def groups_from_seqlens(seqlens: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of equal length: [64, 64, 256] -> [(2, 64), (1, 256)]."""
    return [(len(list(run)), L) for L, run in itertools.groupby(seqlens)]


@functools.lru_cache(maxsize=64)
def _block_diag_mask(seqlens: tuple[int, ...], device: str):
    from xformers.ops import fmha

    try:  # newer xformers build the seqstart tensors directly on the device
        return fmha.BlockDiagonalMask.from_seqlens(list(seqlens), device=torch.device(device))
    except TypeError:
        return fmha.BlockDiagonalMask.from_seqlens(list(seqlens))


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, N, H, D) in and out; SDPA wants heads before tokens."""
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )  # (B, H, N, D)
    return o.transpose(1, 2)  # (B, N, H, D)


def _pick(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "xformers":
        if not xformers_available():
            raise RuntimeError(
                "attention backend 'xformers' requested but xformers is not installed; "
                "pip install xformers, or use backend='sdpa'"
            )
        if device.type != "cuda":
            raise RuntimeError(f"attention backend 'xformers' needs CUDA tensors, got device {device}")
        return "xformers"
    if backend == "auto":
        return "xformers" if device.type == "cuda" and xformers_available() else "sdpa"
    return "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    seqlens: list[int] | None = None,
    groups: list[tuple[int, int]] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Softmax attention, scale 1/sqrt(D). Output has q's layout.

    seqlens None: q, k, v are (B, N, H, D), a dense batch.
    seqlens given: q, k, v are packed (T, H, D) with T = sum(seqlens); token runs of each sample are
    contiguous and samples only attend to themselves. `groups` = [(n_samples, seq_len), ...] runs
    of equal length in packing order (derived from seqlens when not given).
    """
    which = _pick(backend, q.device)
    if seqlens is None:
        if q.dim() != 4:
            raise ValueError(
                f"attention: expected (B, N, H, D) tensors without seqlens, got shape {tuple(q.shape)}"
            )
        if which == "xformers":
            import xformers.ops as xops

            return xops.memory_efficient_attention(q, k, v)
        return _sdpa(q, k, v)

    if q.dim() != 3:
        raise ValueError(f"attention: packed input must be (T, H, D), got shape {tuple(q.shape)}")
    T = q.shape[0]
    if sum(seqlens) != T:
        raise ValueError(f"attention: seqlens sum to {sum(seqlens)} but the packed sequence has {T} tokens")
    if which == "xformers":
        import xformers.ops as xops

        mask = _block_diag_mask(tuple(int(s) for s in seqlens), str(q.device))
        o = xops.memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask)  # (1, T, H, D)
        return o[0]

    if groups is None:
        groups = groups_from_seqlens(list(seqlens))
    if len(groups) == 1:  # one run: a plain reshape, no copy
        n, L = groups[0]
        shp = (n, L) + tuple(q.shape[1:])
        return _sdpa(q.view(shp), k.view(shp), v.view(shp)).reshape(q.shape)
    sizes = [n * L for n, L in groups]
    if sum(sizes) != T:
        raise ValueError(f"attention: groups {groups} cover {sum(sizes)} tokens, the sequence has {T}")
    outs = []
    for (n, L), qg, kg, vg in zip(groups, q.split(sizes), k.split(sizes), v.split(sizes), strict=True):
        shp = (n, L) + tuple(q.shape[1:])  # (n, L, H, D)
        outs.append(_sdpa(qg.reshape(shp), kg.reshape(shp), vg.reshape(shp)).reshape(n * L, *q.shape[1:]))
    return torch.cat(outs)  # (T, H, D)
