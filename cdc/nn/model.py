"""The unified multi-resolution DiT of CDC-FM (paper Sec. 3.2, App. F, Table 7).

One set of weights serves every stage: patch size p at every side, 2-D positions valid at every
grid size (coordinates in final-grid units by default, so a token covers the same image region at
every stage), and a conditioning vector c = fuse(timestep, resolution) + class used by AdaLN-Zero.

Velocity-net contract (cdc.flow.matching / cdc.flow.sampler call the net as a plain callable):
    net(x, tau, y) with x (B, C, r, r), tau (B,) in [0, 1], y (B,) long in [0, num_classes]
        -> (B, C, r, r); index num_classes is the null class for CFG.
    net(xs, taus, ys) with lists (one entry per group, each group one side) -> list of outputs.
    With step_cond (few-step shortcut models, cdc.flow.shortcut) an optional 4th argument d gives each
    sample's step size as a fraction of its stage (same layout as tau); d = 0 or None is the
    ordinary velocity ("flow mode"). Without step_cond the argument must be None.
The list form packs every group's tokens into ONE sequence (T, D): linear layers, LayerNorm and the
MLP run once over all tokens, AdaLN modulation is broadcast per sample, and attention is
block-diagonal (cdc.nn.attention), so the result equals running each sample alone.
The model knows nothing about noise or flow math.

`compile_trunk()` (train.compile) compiles everything between patchify and unpatchify as one
graph whose inputs are shaped only by the token count T and sample count B: modulation gathers
per-sample vectors by a (T,) token -> sample index, and attention is the custom op
cdc::packed_attention taking the sequence lengths as a host tensor. So the graph never depends on
the stage mix (see docs/design-notes.md); patchify / unpatchify stay eager around it. That path
lives in cdc.nn.compiled_trunk, mixed into DiT.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch import Tensor

from cdc.config import Config
from cdc.nn.compiled_trunk import CompiledTrunk
from cdc.nn.layers import Block, FinalLayer, Groups, PixelHead, ResolutionFusion, SinusoidMLP
from cdc.nn.stage_models import StageDiTs
from cdc.nn.tokens import (
    FREQ_DIM,
    grid_coords,
    patchify,
    rope_table,
    sincos_table,
    unpatchify,
)


class DiT(CompiledTrunk, nn.Module):
    def __init__(
        self,
        depth: int,
        width: int,
        heads: int,
        patch: int,
        in_channels: int,
        num_classes: int,
        final_side: int,
        timesteps: int,
        mlp_ratio: float = 4.0,
        pos: str = "rope",
        pos_units: str = "final",
        res_fusion: str = "xattn",
        attn_bias: bool = True,
        qk_norm: bool = False,
        dropout: float = 0.0,
        head: str = "linear",
        head_channels: int = 16,
        step_cond: bool = False,
        pos_side: int = 0,
    ):
        super().__init__()
        if width % heads or (pos == "rope" and (width // heads) % 4) or (pos == "sincos" and width % 4):
            raise ValueError(
                f"model: width {width} / heads {heads} does not fit pos={pos!r} "
                "(rope needs head dim % 4 == 0, sincos width % 4 == 0)"
            )
        if head not in ("linear", "conv"):
            raise ValueError(f"model: head={head!r} not supported (linear, conv)")
        if pos not in ("rope", "sincos") or pos_units not in ("final", "native"):
            raise ValueError(f"model: pos={pos!r} / pos_units={pos_units!r} not supported")
        if final_side % patch:
            raise ValueError(f"final side {final_side} must be a multiple of model.patch={patch}")
        self.patch, self.in_channels, self.num_classes = patch, in_channels, num_classes
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.pos, self.pos_units, self.timesteps = pos, pos_units, timesteps
        # G: token grid side at the final stage, or at pos_side (a grown run keeps its init's units)
        self.final_grid = (pos_side or final_side) // patch
        self.grad_checkpointing = False  # recompute each block in backward (torch.utils.checkpoint)

        self.x_embed = nn.Linear(patch * patch * in_channels, width)  # == Conv2d(k=p, stride=p)
        self.t_embed = SinusoidMLP(width)  # Gamma(tau * timesteps), eq. 39
        self.r_embed = SinusoidMLP(width)  # E(r_k), r_k = side / patch, eq. 40
        self.fuse = ResolutionFusion(width, self.head_dim, res_fusion)
        # few-step mode: step size d embedded like tau and added to Gamma; its output layer starts
        # at zero so a fine-tune from an ordinary checkpoint begins as exactly that model
        self.d_embed = SinusoidMLP(width) if step_cond else None
        self.y_embed = nn.Embedding(num_classes + 1, width)  # index num_classes = null class
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, attn_bias, qk_norm, dropout) for _ in range(depth)
        )
        self.out_channels = in_channels if head == "linear" else head_channels  # per pixel, from tokens
        self.final = FinalLayer(width, patch, self.out_channels)
        self.pixel_head = PixelHead(head_channels, in_channels) if head == "conv" else None
        self._pos_cache: dict[tuple[int, str], object] = {}
        self._trunk_compiled = None  # set by compile_trunk()
        self.initialize_weights()

    # -- init ----------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT init: xavier Linear, zero biases, N(0, 0.02) embedders, zero AdaLN and output layers."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_uniform_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for emb in (self.t_embed, self.r_embed):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        if self.d_embed is not None:
            nn.init.normal_(self.d_embed.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.d_embed.mlp[2].weight)
            nn.init.zeros_(self.d_embed.mlp[2].bias)
        for blk in self.blocks:
            nn.init.zeros_(blk.adaLN[-1].weight)
            nn.init.zeros_(blk.adaLN[-1].bias)
        zero = [self.final.adaLN[-1]]
        zero += [self.final.linear] if self.pixel_head is None else [self.pixel_head.conv2]
        for lin in zero:  # the conv head keeps its token features alive so gradients reach them
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def set_attn_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn_backend = backend

    # -- positions -----------------------------------------------------------------------------
    def _grid_pos(self, g: int, device: torch.device):
        """Per-grid table: rope (cos, sin) each (g*g, 1, Dh), or sincos (g*g, width). Cached."""
        key = (g, str(device))
        if not torch.compiler.is_compiling() and key in self._pos_cache:
            return self._pos_cache[key]
        coords = grid_coords(g, self.final_grid, self.pos_units, device)
        tab = rope_table(coords, self.head_dim) if self.pos == "rope" else sincos_table(coords, self.width)
        if not torch.compiler.is_compiling():
            self._pos_cache[key] = tab
        return tab

    def _packed_pos(self, grids: list[int], ns: list[int], device: torch.device):
        """Per-token position tables for the packed sequence (each group's table repeated n times)."""
        tabs = [self._grid_pos(g, device) for g in grids]
        if self.pos == "rope":
            cos = torch.cat([t[0].repeat(n, 1, 1) for t, n in zip(tabs, ns, strict=True)])  # (T, 1, Dh)
            sin = torch.cat([t[1].repeat(n, 1, 1) for t, n in zip(tabs, ns, strict=True)])
            return cos, sin
        return torch.cat([t.repeat(n, 1) for t, n in zip(tabs, ns, strict=True)])  # (T, width)

    # -- forward -------------------------------------------------------------------------------
    def _gamma(self, tau: Tensor, d: Tensor | None) -> Tensor:
        """Time embedding Gamma(tau T) (B, D); with step_cond plus Gamma_d(d T), d = None meaning 0."""
        gamma = self.t_embed(tau * self.timesteps)
        if self.d_embed is not None:
            gamma = gamma + self.d_embed((torch.zeros_like(tau) if d is None else d) * self.timesteps)
        return gamma

    def condition(
        self, tau: Tensor, y: Tensor, grids: list[int], ns: list[int], d: Tensor | None = None
    ) -> Tensor:
        """Per-sample conditioning c (B, width) = fuse(Gamma(tau T) [+ Gamma_d(d T)], E(r_k)) + class."""
        gamma = self._gamma(tau, d)  # (B, D)
        # filled on the device, not copied from the host: a CUDA graph cannot capture that copy
        r = torch.cat([tau.new_full((1,), float(g)) for g in grids])  # (G,)
        e_g = self.r_embed(r)  # (G, D): one resolution embedding per group
        e = torch.cat([e_g[i : i + 1].expand(n, -1) for i, n in enumerate(ns)])  # (B, D)
        return self.fuse(gamma, e) + self.y_embed(y)

    def _check(self, xs: list[Tensor], taus: list[Tensor], ys: list[Tensor]) -> None:
        if not (len(xs) == len(taus) == len(ys)) or not xs:
            raise ValueError(
                f"DiT: need equal non-empty lists, got {len(xs)} x, {len(taus)} tau, {len(ys)} y"
            )
        for x, t, y in zip(xs, taus, ys, strict=True):
            if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != x.shape[3]:
                raise ValueError(f"DiT: x must be (B, {self.in_channels}, r, r), got {tuple(x.shape)}")
            if x.shape[-1] % self.patch:
                raise ValueError(f"DiT: side {x.shape[-1]} is not a multiple of the patch size {self.patch}")
            if t.shape != x.shape[:1] or y.shape != x.shape[:1]:
                raise ValueError(f"DiT: tau {tuple(t.shape)} and y {tuple(y.shape)} must be ({x.shape[0]},)")

    def forward(self, x, tau, y, d=None):
        if isinstance(x, Tensor):
            return self.forward([x], [tau], [y], None if d is None else [d])[0]
        if d is not None and self.d_embed is None:
            raise ValueError("DiT: a step size d needs a model built with model.step_cond=true")
        xs, ys = list(x), list(y)
        if not (len(xs) == len(tau) == len(ys)) or not xs:
            raise ValueError(f"DiT: need equal non-empty lists, got {len(xs)} x, {len(tau)} tau, {len(ys)} y")
        taus = [t.expand(xi.shape[0]) if t.dim() == 0 else t for t, xi in zip(tau, xs, strict=True)]
        self._check(xs, taus, ys)
        p = self.patch
        ns = [xi.shape[0] for xi in xs]
        grids = [xi.shape[-1] // p for xi in xs]
        groups = [(n, g * g) for n, g in zip(ns, grids, strict=True)]
        seqlens = [L for n, L in groups for _ in range(n)]
        ds = None
        if d is not None:
            ds = [di.expand(xi.shape[0]) if di.dim() == 0 else di for di, xi in zip(d, xs, strict=True)]
            if len(ds) != len(xs) or any(di.shape != xi.shape[:1] for di, xi in zip(ds, xs, strict=True)):
                raise ValueError("DiT: d must hold one (B,) step size per group, like tau")
            ds = torch.cat(ds).float()  # (B,)
        if self._trunk_compiled is not None:
            return self._forward_compiled(xs, taus, ys, ds, ns, grids, groups, seqlens)

        tok = torch.cat([patchify(xi, p) for xi in xs]) if len(xs) > 1 else patchify(xs[0], p)  # (T, p*p*C)
        h = self.x_embed(tok)  # (T, D)
        c = self.condition(torch.cat(taus).float(), torch.cat(ys).long(), grids, ns, ds)  # (B, D)
        pos = self._packed_pos(grids, ns, h.device)
        rope = None
        if self.pos == "rope":
            rope = pos
        else:
            h = h + pos.to(h.dtype)

        h = self._blocks(h, c, rope, groups, seqlens)
        out = self.final(h, c, groups)  # (T, p*p*F), F = C (linear head) or head_channels
        return self._unpack(out, xs, groups)

    def _unpack(self, out: Tensor, xs: list[Tensor], groups: Groups) -> list[Tensor]:
        """Packed head output (T, p*p*F) -> per-group images (B_g, C, r, r)."""
        p = self.patch
        parts = out.split([n * L for n, L in groups])
        maps = [
            unpatchify(o, xi.shape[0], self.out_channels, xi.shape[-1], p)  # (B_g, F, r, r)
            for o, xi in zip(parts, xs, strict=True)
        ]
        if self.pixel_head is None:
            return maps
        return [self.pixel_head(f, xi) for f, xi in zip(maps, xs, strict=True)]

    def _blocks(self, h: Tensor, c: Tensor, rope, layout, seqlens) -> Tensor:
        """The transformer blocks over packed tokens h (T, D); layout = groups or a token index."""
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(blk, h, c, rope, layout, seqlens, use_reentrant=False)
            else:
                h = blk(h, c, rope, layout, seqlens)
        return h


def build_model(cfg: Config) -> nn.Module:
    """The DiT of cfg.model for the hierarchy cfg.flow.sides (final side = sides[-1]).

    With model.stage_models, K such DiTs, one per stage (cdc.nn.stage_models, Table 3's baseline).
    """
    if cfg.model.stage_models:
        return StageDiTs([_build_dit(cfg) for _ in cfg.flow.sides], list(cfg.flow.sides))
    return _build_dit(cfg)


def _build_dit(cfg: Config) -> DiT:
    m = cfg.model
    return DiT(
        depth=m.depth,
        width=m.width,
        heads=m.heads,
        patch=m.patch,
        in_channels=m.in_channels,
        num_classes=m.num_classes,
        final_side=cfg.flow.sides[-1],
        timesteps=cfg.flow.timesteps,
        mlp_ratio=m.mlp_ratio,
        pos=m.pos,
        pos_units=m.pos_units,
        res_fusion=m.res_fusion,
        attn_bias=m.attn_bias,
        qk_norm=m.qk_norm,
        dropout=m.dropout,
        head=m.head,
        head_channels=m.head_channels,
        step_cond=m.step_cond,
        pos_side=m.pos_side,
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: Config, side: int) -> float:
    """Matmul FLOPs (2 m n k) of one forward of one sample at `side`, attention QK^T and AV included.

    Elementwise work (norms, activations, rope, softmax) is ignored; training costs 3x this.
    """
    m = cfg.model
    D, p, C = m.width, m.patch, m.in_channels
    N = (side // p) ** 2
    hidden = int(D * m.mlp_ratio)
    per_block = 2 * N * D * (3 * D + D + 2 * hidden)  # qkv, proj, fc1 + fc2
    per_block += 2 * 2 * N * N * D  # Q K^T and A V over all heads
    per_block += 2 * D * 6 * D  # AdaLN modulation (per sample)
    total = m.depth * per_block
    F = C if m.head == "linear" else m.head_channels
    total += 2 * N * (p * p * C) * D + 2 * N * (p * p * F) * D  # patch embedding + final linear
    if m.head == "conv":
        total += 2 * side * side * 9 * ((F + C) * F + F * C)  # the two 3x3 convs
    total += 2 * D * 2 * D  # final AdaLN
    total += 2 * (2 + m.step_cond) * (FREQ_DIM * D + D * D)  # timestep, resolution (+ step) MLPs
    if m.res_fusion == "xattn":
        total += 2 * 4 * D * (D // m.heads)
    return float(total)
