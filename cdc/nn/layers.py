"""The DiT's building blocks on packed tokens: AdaLN modulation and gates broadcast per sample,
the timestep / resolution embedders and their fusion (App. F), the transformer block, and the
output heads. cdc.nn.model assembles them into the unified DiT.

Packed layout: every group's tokens lie in ONE (T, D) sequence, group after group; `Groups` says
how many samples and tokens per sample each group has. Per-sample vectors (B, D) reach their
tokens by broadcasting per group (eager) or by a (T,) token -> sample index (compiled trunk).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from cdc.nn.attention import attention, packed_attention
from cdc.nn.compiled_trunk import gather_rows
from cdc.nn.tokens import FREQ_DIM, apply_rope, sinusoid

Groups = list[tuple[int, int]]  # [(n_samples, tokens_per_sample), ...] in packing order
# eager: Groups; compiled trunk: a (T,) long tensor, the sample index of each packed token
Layout = Groups | Tensor


def _split(h: Tensor, groups: Groups) -> list[Tensor]:
    """Packed (T, D) -> per-group views (n, L, D)."""
    parts = h.split([n * L for n, L in groups]) if len(groups) > 1 else [h]
    return [x.view(n, L, -1) for x, (n, L) in zip(parts, groups, strict=True)]


def _per_sample(v: Tensor, groups: Groups) -> list[Tensor]:
    """Per-sample vectors (B, D) -> per-group (n, 1, D), broadcast over that group's tokens."""
    parts = v.split([n for n, _ in groups]) if len(groups) > 1 else [v]
    return [x[:, None] for x in parts]


def modulate(h: Tensor, shift: Tensor, scale: Tensor, groups: Layout) -> Tensor:
    """AdaLN: h * (1 + scale) + shift with per-sample (B, D) vectors on packed tokens (T, D).

    Eager: broadcasting per group (no (T, D) gather) keeps the saved activations as small as
    unpacked. Compiled (groups is the (T,) token -> sample index): a gather that inductor fuses
    into the elementwise kernel, so the graph does not depend on the group sizes.
    """
    if isinstance(groups, Tensor):
        return h * (1 + gather_rows(scale, groups)) + gather_rows(shift, groups)
    out = [
        x * (1 + sc) + sh
        for x, sc, sh in zip(
            _split(h, groups), _per_sample(scale, groups), _per_sample(shift, groups), strict=True
        )
    ]
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out]) if len(out) > 1 else out[0].view_as(h)


def gated_residual(h: Tensor, f: Tensor, gate: Tensor, groups: Layout) -> Tensor:
    """h + gate * f with a per-sample gate (B, D) on packed tokens (T, D)."""
    if isinstance(groups, Tensor):
        return h + gather_rows(gate, groups) * f
    out = [
        x + g * y
        for x, y, g in zip(_split(h, groups), _split(f, groups), _per_sample(gate, groups), strict=True)
    ]
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out]) if len(out) > 1 else out[0].view_as(h)


class SinusoidMLP(nn.Module):
    """x (B,) -> MLP(sinusoid(x)) (B, width): the timestep embedder Gamma and resolution embedder E."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(sinusoid(x).to(self.mlp[0].weight.dtype))


class ResolutionFusion(nn.Module):
    """c = gamma_t + z: fuse the resolution embedding e_k into the timestep embedding gamma_t.

    "xattn" is App. F eq. 41-44 literally: single-query, single-key cross-attention with head dim
    d_h. Softmax over one key is exactly 1, so z = W_o W_v e_k (q and k get no gradient); the
    equations are kept so the structure matches the paper and the Table 4 ablation.
    "add" is the ablation's plain sum c = gamma_t + e_k.
    """

    def __init__(self, width: int, head_dim: int, mode: str):
        super().__init__()
        self.mode, self.head_dim = mode, head_dim
        # a float, not sqrt(head_dim) at call time: dynamo may turn an int attribute into a
        # symbol, and torch 2.4's inductor then fails on softmax(x / sqrt(symbol))
        self.scale = 1.0 / math.sqrt(head_dim)
        if mode == "xattn":
            self.wq = nn.Linear(width, head_dim, bias=False)  # W_q in R^{d_h x d_model}
            self.wk = nn.Linear(width, head_dim, bias=False)
            self.wv = nn.Linear(width, head_dim, bias=False)
            self.wo = nn.Linear(head_dim, width, bias=False)  # W_o in R^{d_model x d_h}
        elif mode != "add":
            raise ValueError(f"model.res_fusion: {mode!r} is not one of ['xattn', 'add']")

    def forward(self, gamma: Tensor, e: Tensor) -> Tensor:
        if self.mode == "add":
            return gamma + e
        q, k, v = self.wq(gamma), self.wk(e), self.wv(e)  # (B, d_h) each, eq. 41
        logits = (q * k).sum(-1, keepdim=True) * self.scale  # (B, 1): one key
        alpha = torch.softmax(logits, dim=-1)  # eq. 42 (== 1)
        z = self.wo(alpha * v)  # (B, d_model), eq. 43
        return gamma + z  # eq. 44


class Block(nn.Module):
    """DiT block with AdaLN-Zero on packed tokens: pre-LN attention and MLP, per-sample gates."""

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, attn_bias: bool, qk_norm: bool, dropout: float
    ):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width, bias=attn_bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.attn_backend = "auto"

    def forward(
        self,
        h: Tensor,
        c: Tensor,
        rope: tuple[Tensor, Tensor] | None,
        groups: Layout,
        seqlens: list[int] | Tensor,
    ) -> Tensor:
        T, D = h.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)  # (B, D) each
        a = modulate(self.norm1(h), shift1, scale1, groups)
        q, k, v = self.qkv(a).view(T, 3, self.heads, self.head_dim).unbind(1)  # (T, H, Dh) each
        # .to(v.dtype): under an autocast policy that runs rms_norm in fp32, q and k must still match v
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if isinstance(seqlens, Tensor):  # compiled trunk: lengths as a host tensor, one opaque op
            o = packed_attention(q, k, v, seqlens, self.attn_backend)  # (T, H, Dh)
        else:
            o = attention(q, k, v, seqlens=seqlens, groups=groups, backend=self.attn_backend)
        h = gated_residual(h, self.drop(self.proj(o.reshape(T, D))), gate1, groups)
        m = modulate(self.norm2(h), shift2, scale2, groups)
        return gated_residual(h, self.fc2(self.drop(self.act(self.fc1(m)))), gate2, groups)


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, patch * patch * channels)

    def forward(self, h: Tensor, c: Tensor, groups: Layout) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(modulate(self.norm(h), shift, scale, groups))  # (T, p*p*C)


class PixelHead(nn.Module):
    """head=conv: two 3x3 convs over [token features unpatchified to F maps, the input image].

    A linear head predicts each p x p patch from its token alone, so small nets leave patch seams
    and cannot denoise pixel by pixel (the 4 px "speckle" of a tiny Fashion-MNIST run). The convs
    see the pixels themselves and both sides of every token border; they cost ~2 r^2 9 (F+C) F
    FLOPs per sample, a few percent of the blocks. The last conv starts at zero (AdaLN-Zero spirit).
    """

    def __init__(self, feats: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(feats + channels, feats, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(feats, channels, 3, padding=1)

    def forward(self, f: Tensor, x: Tensor) -> Tensor:
        h = torch.cat([f, x.to(f.dtype)], dim=1)  # (B, F + C, r, r)
        return self.conv2(self.act(self.conv1(h)))  # (B, C, r, r)
