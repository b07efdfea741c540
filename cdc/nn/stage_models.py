"""Stage-specific DiTs (paper Table 3's baseline): one separate DiT per stage, same coupling.

`model.stage_models: true` builds K DiTs of the configured size, one per side r_k, and routes each
packed group to the DiT of its side. Everything else (flow, loss, sampler, checkpoints) sees the
same velocity-net contract as the unified DiT (cdc.nn.model), so `cdc train`, `cdc sample` and
`cdc ablate unified` use it without special cases.

Parameter budget: the *same per-stage size* convention. Each stage's DiT has the unified model's
depth and width, so a training sample costs the same FLOPs (it passes through one DiT of that
size) and the comparison isolates weight sharing; the total parameter count is K times the
unified one. (The paper's Table 3 instead uses SiT-B for 32/64/128 px and SiT-L for 256 px,
130M x 3 + 458M = 848M against 677M unified.)
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


class StageDiTs(nn.Module):
    """K independent DiTs; a group of side r_k is run by `nets[k]`. Same call contract as DiT."""

    def __init__(self, nets: list[nn.Module], sides: list[int]):
        super().__init__()
        if len(nets) != len(sides) or len(set(sides)) != len(sides):
            raise ValueError(f"stage models: need one net per distinct side, got {len(nets)} for {sides}")
        self.nets = nn.ModuleList(nets)
        self.sides = [int(s) for s in sides]
        first = nets[0]
        self.patch, self.in_channels, self.num_classes = first.patch, first.in_channels, first.num_classes

    @property
    def grad_checkpointing(self) -> bool:
        return any(n.grad_checkpointing for n in self.nets)

    @grad_checkpointing.setter
    def grad_checkpointing(self, on: bool) -> None:
        for n in self.nets:
            n.grad_checkpointing = on

    def set_attn_backend(self, backend: str) -> None:
        for n in self.nets:
            n.set_attn_backend(backend)

    def forward(self, x, tau, y, d=None):
        if isinstance(x, Tensor):
            return self.forward([x], [tau], [y], None if d is None else [d])[0]
        xs, taus, ys = list(x), list(tau), list(y)
        if not (len(xs) == len(taus) == len(ys)) or not xs:
            raise ValueError(
                f"DiT: need equal non-empty lists, got {len(xs)} x, {len(taus)} tau, {len(ys)} y"
            )
        by_stage: dict[int, list[int]] = {}
        for i, xi in enumerate(xs):
            side = xi.shape[-1]
            if side not in self.sides:
                raise ValueError(f"stage models: no DiT for side {side}; this model has sides {self.sides}")
            by_stage.setdefault(self.sides.index(side), []).append(i)
        out: list[Tensor | None] = [None] * len(xs)
        for k, idx in by_stage.items():  # one packed forward per stage's DiT
            dk = None if d is None else [d[i] for i in idx]  # few-step step sizes (model.step_cond)
            res = self.nets[k]([xs[i] for i in idx], [taus[i] for i in idx], [ys[i] for i in idx], dk)
            for i, r in zip(idx, res, strict=True):
                out[i] = r
        return out

    def compile_trunk(self, **kwargs) -> None:
        """train.compile: each stage's DiT compiles its own packed trunk (cdc.nn.model.DiT)."""
        for n in self.nets:
            n.compile_trunk(**kwargs)

    def eager_trunk(self) -> None:
        for n in self.nets:
            n.eager_trunk()

    def warm_up_compiled(self, sides: list[int], batch: int, device="cpu") -> None:
        # the DiT's own warm-up, run on this module: it routes the mixed batch to every stage's DiT
        type(self.nets[0]).warm_up_compiled(self, sides, batch, device)
