"""CUDA graphs for the sampler's short-sequence stages: one captured forward per input signature.

A sampling step of a coarse stage is likely launch-bound on a large GPU: at 32 px the paper's DiT
sees 64 tokens per image, too little work for each of the hundreds of small kernels of its 28
blocks to outlast the host's queueing of the next (bin/gpu-check measures whether graphs help).
`GraphedNet` wraps a velocity net (cdc.flow.matching.VelocityNet); a call whose images are no larger than
`max_side` replays a CUDA graph captured on the first call of the same signature (shapes, dtypes
and devices of every input tensor), so a stage's 4-24 steps cost one launch each. Larger stages
call the net directly: they are compute-bound, and their graphs would hold the most memory.

Replaying a graph runs the same kernels on the same inputs as the eager call, so the sampler's
per-image noise and results are unchanged (tests/test_gpu.py compares them). What it needs from
the net: no host reads of device values and no host-to-device copies inside the forward (the DiT
caches or builds on the device everything it needs), and the same Python control flow at every
call of a signature (true of the sampler's nets: tau and the class are tensors). A signature whose
capture fails falls back to the eager net for good, with one message on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

Replay = Callable[[], None]
Outputs = list[Tensor]


def capture_cuda(fn: Callable[[], Outputs], pool: object) -> tuple[Outputs, Replay]:
    """Warm fn up on a side stream (lazy caches, cuBLAS workspaces), then capture it.

    Returns the captured call's outputs and g.replay, which rewrites those same tensors in place.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        out = fn()
    return out, g.replay


class GraphedNet:
    """A velocity net whose calls on images of side <= max_side replay captured CUDA graphs.

    net(xs, taus, ys, *extra) -> list of velocities, every argument a list of tensors (extra: the
    few-step model's step sizes). `capture(fn, pool) -> (outputs, replay)` is `capture_cuda`;
    tests pass a stand-in. At most `max_graphs` signatures are captured (e.g. the last, smaller batch of a run
    adds one); later new signatures run eager.
    """

    def __init__(
        self,
        net: Callable[..., list[Tensor]],
        max_side: int,
        capture: Callable[[Callable[[], Outputs], object], tuple[Outputs, Replay]] = capture_cuda,
        max_graphs: int = 32,
    ):
        self.net, self.max_side, self.capture, self.max_graphs = net, int(max_side), capture, max_graphs
        self.graphs: dict[tuple, tuple[list[Tensor], list[Tensor], Replay] | None] = {}
        if capture is capture_cuda and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device; sample with cuda_graph_side 0 on this machine")
        self.pool = torch.cuda.graph_pool_handle() if capture is capture_cuda else None
        self.replays = 0  # calls served by a graph (reported by bench_sample)

    def __call__(self, xs: list[Tensor], taus: list[Tensor], ys: list[Tensor], *extra: list[Tensor]) -> list[Tensor]:
        if max(x.shape[-1] for x in xs) > self.max_side:
            return self.net(xs, taus, ys, *extra)
        lists = [list(xs), list(taus), list(ys), *[list(e) for e in extra]]
        flat = [t for lst in lists for t in lst]
        key = (tuple(len(lst) for lst in lists), tuple((tuple(t.shape), t.dtype, t.device) for t in flat))
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.net(xs, taus, ys, *extra)
            self.graphs[key] = self._capture(lists, flat)
        entry = self.graphs[key]
        if entry is None:  # its capture failed: eager from now on
            return self.net(xs, taus, ys, *extra)
        static_in, static_out, replay = entry
        for dst, src in zip(static_in, flat, strict=True):
            dst.copy_(src)
        replay()
        self.replays += 1
        # the next replay rewrites static_out, and a sampler may keep a velocity across calls (Heun
        # without CFG returns the net's output itself)
        return [o.clone() for o in static_out]

    def _capture(self, lists: list[list[Tensor]], flat: list[Tensor]):
        static_in = [t.clone() for t in flat]
        it = iter(static_in)
        static_lists = [[next(it) for _ in lst] for lst in lists]
        try:
            static_out, replay = self.capture(lambda: self.net(*static_lists), self.pool)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this signature eager
            shapes = [tuple(x.shape) for x in lists[0]]
            msg = f"cuda graphs: capture failed for inputs {shapes}, running them eager ({e})"
            print(msg.splitlines()[0], file=sys.stderr)
            return None
        return static_in, list(static_out), replay
