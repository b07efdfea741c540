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


@functools.cache
def xformers_error(device: str) -> str:
    """'' when xformers' block-diagonal attention runs forward and backward on `device` (bf16),
    else why not in one line. An importable xformers can still lack kernels for this GPU or this
    torch build; "auto" then uses SDPA instead of failing at the first step."""
    if not xformers_available():
        return "xformers is not installed"
    try:
        from xformers.ops import memory_efficient_attention

        q = torch.randn(1, 8, 2, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
        mask = _block_diag_mask((3, 5), str(torch.device(device)))  # the mask `attention` builds
        memory_efficient_attention(q, q, q, attn_bias=mask).float().sum().backward()
        torch.cuda.synchronize(device)
    except Exception as e:  # noqa: BLE001 - any failure means: not usable here
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    return ""


def _xformers_works(device: torch.device) -> bool:
    if torch.compiler.is_compiling():  # decided outside the trace (the custom op runs eagerly)
        return xformers_available()
    return xformers_error(str(device)) == ""


def groups_from_seqlens(seqlens: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs of equal length: [64, 64, 256] -> [(2, 64), (1, 256)]."""
    return [(len(list(run)), L) for L, run in itertools.groupby(seqlens)]


# Large enough never to evict while sampling: a CUDA graph captured with a mask keeps pointers to
# its seqstart tensors, which this cache owns (a training run's stage mixes number a few hundred).
@functools.lru_cache(maxsize=1024)
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
        if not _xformers_works(device):
            raise RuntimeError(f"attention backend 'xformers' fails on {device}: {xformers_error(str(device))}")
        return "xformers"
    if backend == "auto":
        return "xformers" if device.type == "cuda" and _xformers_works(device) else "sdpa"
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


# ---------------------------------------------------------------------------------------------
# the same attention as one opaque op for torch.compile (cdc.nn.model's compiled trunk)
#
# Dynamo would specialise on the Python list of sequence lengths (one graph per stage mix). As a
# custom op taking the lengths as a CPU int tensor, the packed attention is a single node whose
# only symbolic input sizes are T and B, so the rest of the network compiles once. Inside, the
# eager `attention` runs (xformers BlockDiagonalMask or per-run SDPA); the lengths live on the
# host, so reading them never waits for the GPU. Inside a custom op autograd is off, so backward
# calls the flash-attention kernels' own forward (for the log-sum-exp) and backward, one
# equal-length run at a time; where they refuse the input (e.g. fp32 on CUDA) it falls back to the
# written-out gradient from recomputed probabilities, in chunks that bound the (n, H, L, L)
# temporaries to ~2^26 elements.


# Explicit schemas: torch < 2.5 cannot infer them from this module's string annotations.
@torch.library.custom_op(
    "cdc::packed_attention",
    mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor seqlens, str backend) -> Tensor",
)
def packed_attention(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, backend: str) -> Tensor:
    """attention(q, k, v, seqlens=...) with q, k, v (T, H, D) and seqlens a CPU int64 (B,) tensor."""
    return attention(q, k, v, seqlens=seqlens.tolist(), backend=backend).contiguous()


@packed_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, backend: str) -> Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _flash_grad(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention for dense (n, L, H, D) inputs through torch's flash kernels (no dropout)."""
    qt, kt, vt, gt = (x.transpose(1, 2) for x in (q, k, v, g))  # (n, H, L, D)
    if q.device.type == "cpu":
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(gt, qt, kt, vt, o, lse, 0.0, False)
    else:
        o, lse, cq, ck, mq, mk, rng, unused, _ = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            gt, qt, kt, vt, o, lse, cq, ck, mq, mk, 0.0, False, rng, unused
        )
    return tuple(x.transpose(1, 2) for x in grads)  # (n, L, H, D) each


_FLASH_BACKWARD_OK: dict[tuple, bool] = {}  # (device type, dtype, head dim) -> the flash path works


def _attention_grad(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """_flash_grad where the kernels accept the input, else the written-out gradient."""
    key = (q.device.type, q.dtype, q.shape[-1])
    if _FLASH_BACKWARD_OK.get(key, True):
        try:
            out = _flash_grad(q, k, v, g)
            _FLASH_BACKWARD_OK[key] = True
            return out
        except (RuntimeError, AttributeError, ValueError):  # unsupported input, or a torch without
            # these kernels / with another signature: remember, use the math
            _FLASH_BACKWARD_OK[key] = False
    return _attention_grad_math(q, k, v, g)


def _attention_grad_math(q: Tensor, k: Tensor, v: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of softmax(q k^T / sqrt(D)) v for dense (n, L, H, D) inputs and output grad g."""
    dt = torch.promote_types(q.dtype, torch.float32)  # bf16 -> fp32 math; fp64 stays fp64
    q, k, v, g = (x.to(dt).transpose(1, 2) for x in (q, k, v, g))  # (n, H, L, D)
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # (n, H, L, L)
    o = p @ v
    dv = p.transpose(-1, -2) @ g
    ds = p * (g @ v.transpose(-1, -2) - (g * o).sum(-1, keepdim=True))  # softmax Jacobian
    dq, dk = ds @ k * scale, ds.transpose(-1, -2) @ q * scale
    return tuple(x.transpose(1, 2) for x in (dq, dk, dv))  # (n, L, H, D) each


@torch.library.custom_op(
    "cdc::packed_attention_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor seqlens, str backend) -> (Tensor, Tensor, Tensor)",
)
def packed_attention_backward(
    grad: Tensor, q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of packed_attention for the output gradient `grad` (all (T, H, D))."""
    T, H, D = q.shape
    out = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    start = 0
    for n, L in groups_from_seqlens(seqlens.tolist()):
        chunk = max(1, (1 << 26) // (H * L * L))  # samples per chunk
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            sl = slice(start + i * L, start + (i + m) * L)
            parts = (x[sl].reshape(m, L, H, D) for x in (q, k, v, grad))  # (m, L, H, D)
            for o, d in zip(out, _attention_grad(*parts), strict=True):
                o[sl] = d.reshape(m * L, H, D)
        start += n * L
    return out[0], out[1], out[2]


@packed_attention_backward.register_fake
def _(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, seqlens: Tensor, backend: str):
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup(ctx, inputs, output) -> None:
    q, k, v, seqlens, backend = inputs
    ctx.save_for_backward(q, k, v, seqlens)
    ctx.backend = backend


def _backward(ctx, grad: Tensor):
    q, k, v, seqlens = ctx.saved_tensors
    dq, dk, dv = packed_attention_backward(grad.contiguous(), q, k, v, seqlens, ctx.backend)
    return dq, dk, dv, None, None


packed_attention.register_autograd(_backward, setup_context=_setup)
