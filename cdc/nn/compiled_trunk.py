"""The compiled path of the DiT (train.compile): one graph for every stage mix.

`CompiledTrunk` is mixed into cdc.nn.model.DiT. `compile_trunk()` compiles everything between an
eager patchify and an eager unpatchify; inside, tensors are shaped only by the token count T and
the sample count B: AdaLN modulation gathers per-sample vectors with a (T,) token -> sample index
(`gather_rows`), and attention is the custom op cdc::packed_attention with the sequence lengths as
a host tensor. Why, and what it costs: docs/design-notes.md, "Compile".
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Callable

import torch
from torch import Tensor

from cdc.nn.tokens import patchify


class _Gather(torch.autograd.Function):
    """v[idx] (rows of v, one per index) whose backward sums the rows' gradients by a matmul.

    Inductor lowers the scatter-add in a plain gather's backward to atomic adds from several
    threads, whose order, and so the float result, changes from run to run under load; that broke
    bit-exact resume of compiled training. A one-hot matmul reduces in a fixed order and costs
    2 T B D FLOPs, well under 1% of a block.
    """

    @staticmethod
    def forward(ctx, v: Tensor, idx: Tensor) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.rows = v.shape[0]
        return v[idx]  # (T, D)

    @staticmethod
    def backward(ctx, g: Tensor):
        (idx,) = ctx.saved_tensors
        onehot = (idx[:, None] == torch.arange(ctx.rows, device=idx.device)).to(g.dtype)  # (T, B)
        return onehot.t() @ g, None  # (B, D)


def gather_rows(v: Tensor, idx: Tensor) -> Tensor:
    """v[idx] with a deterministic backward (see _Gather); used by the compiled trunk."""
    return _Gather.apply(v, idx)


def why_not_compiled(device: torch.device | str) -> str | None:
    """Why torch.compile cannot build the trunk on `device` on this machine, None if it can.

    `train.compile: auto` trains eager when this names a reason; the compile tests skip on it.
    """
    version = torch.torch_version.TorchVersion(torch.__version__)
    if version < "2.5":
        # torch 2.4's inductor fails on the packed trunk (its cat_mm and softmax passes)
        return f"torch {torch.__version__} is older than 2.5"
    if torch.device(device).type == "cpu" and "2.6" <= version < "2.7":
        # torch 2.6's C++ codegen writes `ops.<lambda>(...)` into a trunk kernel, which g++ rejects
        return f"torch {torch.__version__}'s CPU inductor mis-compiles the trunk (g++ rejects a generated kernel)"
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "inductor needs triton on CUDA (pip install triton)"
        return None
    cxx = [c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c]
    if not any(shutil.which(c) for c in cxx):  # inductor builds its CPU kernels as C++
        return "inductor needs a C++ compiler on CPU (e.g. apt-get install g++)"
    return None


def compile_for_training(
    model: torch.nn.Module,
    setting: bool | str,
    sides: list[int],
    batch: int,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> bool:
    """Apply train.compile (true | false | "auto") to `model`; returns whether it trains compiled.

    "auto" trains eager, saying why in one line, where why_not_compiled() names a reason or the
    first compile raises (e.g. a broken C++ toolchain); true lets such an error propagate.
    """
    if setting is False:
        return False
    if setting == "auto" and (why := why_not_compiled(device)):
        log(f"train.compile auto: training eager ({why})")
        return False
    t0 = time.perf_counter()
    model.compile_trunk()
    try:
        model.warm_up_compiled(sides, batch, device)  # same kernels after resume
    except Exception as e:
        if setting != "auto":
            raise
        model.eager_trunk()
        for p in model.parameters():
            p.grad = None
        torch._dynamo.reset()
        first = (str(e).strip().splitlines() or [""])[0][:200]
        log(f"train.compile auto: the first compile failed, training eager ({type(e).__name__}: {first})")
        return False
    log(f"train.compile {setting}: training compiled (inductor on {torch.device(device).type}; "
        f"compile + warm-up {time.perf_counter() - t0:.0f} s)")
    return True


class CompiledTrunk:
    """compile_trunk / warm_up_compiled and the compiled forward of cdc.nn.model.DiT."""

    _trunk_compiled = None  # set by compile_trunk()

    def compile_trunk(self, backend="inductor", **kwargs) -> None:
        """Run the packed forward through torch.compile(dynamic=True) from now on (train.compile).

        The compiled function sees only (T, ...) and (B, ...) tensors, so it compiles once per
        train/eval mode and grad setting and is reused for every stage mix and batch size.
        """
        self._trunk_compiled = torch.compile(self._trunk, backend=backend, dynamic=True, **kwargs)

    def eager_trunk(self) -> None:
        """Undo compile_trunk(): the eager packed forward from now on."""
        self._trunk_compiled = None

    def warm_up_compiled(self, sides: list[int], batch: int, device: torch.device | str = "cpu") -> None:
        """One forward + backward of a fixed mixed-stage batch right after compile_trunk().

        With dynamic shapes inductor still tunes its kernels (e.g. how a reduction is split over
        threads) to the sizes of the first call, which changes float summation order. A fresh run
        and a resumed one would otherwise compile against different first batches and drift apart
        by ~1e-9 after resume; compiling against the same batch keeps resume bit-exact. Weights
        are untouched and gradients are cleared afterwards.
        """
        K, C = len(sides), self.in_channels
        ns = [len(range(k, batch, K)) for k in range(K)]  # sample i at stage i % K
        xs = [torch.zeros(n, C, r, r, device=device) for n, r in zip(ns, sides, strict=True) if n]
        taus = [torch.full((x.shape[0],), 0.5, device=device) for x in xs]
        ys = [torch.zeros(x.shape[0], dtype=torch.long, device=device) for x in xs]
        with torch.enable_grad():
            sum(o.sum() for o in self(xs, taus, ys)).backward()
        for p in self.parameters():
            p.grad = None

    def _forward_compiled(self, xs, taus, ys, ds, ns, grids, groups, seqlens) -> list[Tensor]:
        p, dev = self.patch, xs[0].device
        tok = torch.cat([patchify(xi, p) for xi in xs]) if len(xs) > 1 else patchify(xs[0], p)  # (T, p*p*C)
        r = torch.cat([torch.full((n,), float(g), device=dev) for n, g in zip(ns, grids, strict=True)])  # (B,)
        lens = torch.tensor(seqlens)  # (B,) on the host: the attention op reads it there
        idx = torch.arange(len(seqlens)).repeat_interleave(lens).to(dev, non_blocking=True)  # (T,)
        pos = self._packed_pos(grids, ns, dev)
        rope = pos if self.pos == "rope" else None
        sincos = None if self.pos == "rope" else pos
        out = self._trunk_compiled(
            tok, torch.cat(taus).float(), torch.cat(ys).long(), r, idx, rope, sincos, lens, ds
        )
        return self._unpack(out, xs, groups)

    def _trunk(self, tok, tau, y, r, idx, rope, sincos, seqlens, d=None) -> Tensor:
        """tokens (T, p*p*C) -> head output (T, p*p*F); per-sample tau, y, r, d (B,); idx (T,)."""
        h = self.x_embed(tok)  # (T, D)
        y_emb = gather_rows(self.y_embed.weight, y)  # = y_embed(y); its backward is no scatter either
        c = self.fuse(self._gamma(tau, d), self.r_embed(r)) + y_emb  # (B, D)
        if sincos is not None:
            h = h + sincos.to(h.dtype)
        return self.final(self._blocks(h, c, rope, idx, seqlens), c, idx)
