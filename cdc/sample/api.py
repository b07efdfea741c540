"""The Python API: `from cdc import load; g = load("runs/quickstart"); images = g.sample(classes=[3, 7], n=8)`.

`load` takes what `cdc sample --ckpt` takes (a run directory, a checkpoint file or a `cdc export`
folder); `Generator.sample` resolves its options exactly as `cdc sample` does (cdc.sample.job, the
checkpoint's stored sampler settings for every option left as None) and samples through the same
step (cdc.sample.generate.sample_batch), so image i for a seed equals image i of `cdc sample`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cdc.eval.evalio import resolve_device
from cdc.sample.figures import to_uint8
from cdc.sample.generate import StageTimer, job_guide, job_sampler, sample_batch
from cdc.sample.job import check_counts, resolve_job
from cdc.sample.preview import OnStage
from cdc.train import checkpoint as ckpt_lib

# dtype= names -> bf16 autocast or not (the ODE state stays fp32 either way; CPU always runs fp32)
_BF16 = {"bf16": True, "bfloat16": True, torch.bfloat16: True, "fp32": False, "float32": False, torch.float32: False}


def _uint8_nchw(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 (N, C, H, W), by the same rounding as `cdc sample`'s PNGs."""
    return torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).contiguous()


class Generator:
    """A loaded model and its config; `sample` makes images, `to_pil` turns them into PIL images."""

    def __init__(self, model: torch.nn.Module, mcfg, info: dict[str, Any], device: torch.device,
                 bf16: bool | None, ema: bool, runs_dir: str | Path) -> None:  # fmt: skip
        self.model, self.config, self.info, self.device = model, mcfg, info, device
        self._bf16, self._ema, self._runs_dir = bf16, ema, runs_dir

    def __repr__(self) -> str:
        return f"Generator({self.info['path']}, step {self.info['step']}, {self.info['weights']}, {self.device})"

    def sample(
        self,
        classes: str | list[int] | None = "all",
        n: int = 8,
        steps: int | str | list[int] | None = None,
        cfg: float | str | list[float] | None = None,
        seed: int | None = None,
        stages: bool = False,
        *,
        solver: str | None = None,
        interval: str | list[float] | None = None,
        sde_eps: float | None = None,
        guide: str | None = None,
        guide_scale: float | str | list[float] | None = None,
        batch: int | None = None,
        on_stage: OnStage | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """`n` images as uint8 (N, C, H, W) on the CPU; with stages=True also each stage's output,
        a list of uint8 (N, C, side_k, side_k). Image i has label classes[i % len(classes)] and noise
        seeded by (seed, i); every option left as None comes from the checkpoint (as `cdc sample`).

        on_stage(s): called as soon as each stage of each batch exists, stages in order, with a
        cdc.sample.preview.StageImages record (s.stage, s.side, s.indices, s.labels, s.x in [-1, 1],
        s.images as uint8); a tensor it returns (s.x's shape) replaces that stage's output."""
        check_counts(n, sde_eps, batch)
        job = resolve_job(
            self.config, self.info, self.device, 0, 1, to_folder=False, out=None, n=n, classes=classes,
            steps=steps, cfg=cfg, solver=solver, seed=seed, batch=batch, stages=stages, interval=interval,
            sde_eps=sde_eps, overwrite=False, resume=False, runs_dir=self._runs_dir, bf16=self._bf16,
            guide=guide, guide_scale=guide_scale, cuda_graph_side=None,
        )  # fmt: skip
        net, opts = job_sampler(job, self.model, job_guide(job, self._ema))
        timer = StageTimer(job.sched.K, job.dev)
        finals: list[torch.Tensor] = []
        per_stage: list[list[torch.Tensor]] = [[] for _ in range(job.sched.K)]
        with torch.inference_mode():
            for b0 in range(0, n, job.batch):
                idx = list(range(b0, min(b0 + job.batch, n)))
                res, _ = sample_batch(job, net, opts, idx, timer, on_stage)
                finals.append(_uint8_nchw(res.x))
                for k, s in enumerate(res.stages if stages else []):
                    per_stage[k].append(_uint8_nchw(s))
        images = torch.cat(finals)
        return (images, [torch.cat(s) for s in per_stage]) if stages else images

    def upscale(
        self,
        images: torch.Tensor,
        klass: int | None = None,
        n: int = 1,
        *,
        steps: int | str | list[int] | None = None,
        cfg: float | str | list[float] | None = None,
        seed: int | None = None,
        solver: str | None = None,
        guide: str | None = None,
        batch: int | None = None,
    ) -> torch.Tensor:
        """`cdc upscale` on tensors: images (N, C, r, r), uint8 or float in [-1, 1], r a stage's input
        side, each carried to the final side by the later stages; uint8 (N * n, C, R, R), row i * n + j
        variant j of image i (the noise of image i at seed + j). Without `klass` the null class runs
        and CFG is off; every option left as None comes from the checkpoint."""
        from cdc.sample import edit as E
        from cdc.sample.edit_run import edit_sampling
        from cdc.sample.inputs import from_tensor

        s, _ = edit_sampling(
            self.model, self.config, self.info, self.device, klass, n=n, steps=steps, cfg=cfg, solver=solver,
            seed=seed, batch=batch, guide=guide, runs_dir=self._runs_dir, ema=self._ema, bf16=self._bf16,
        )  # fmt: skip
        x = from_tensor(images, s.channels, list(s.sched.sides[:-1]))
        with torch.inference_mode():
            out = E.run_edits(s, [E.upscale_edit(v, s.sched) for v in x], n)
        return _uint8_nchw(out)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list:
        """uint8 (N, C, H, W) with C = 1 or 3 -> N PIL images ("L" or "RGB"), as `cdc sample` saves them."""
        from PIL import Image

        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"to_pil: need uint8 (N, C, H, W) with C = 1 or 3, got {images.dtype} {tuple(images.shape)}")
        arr = images.permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a[..., 0] if a.shape[2] == 1 else a) for a in arr]


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    ema: bool = True,
    runs_dir: str | Path = "runs",
) -> Generator:
    """A Generator from a run directory, a checkpoint file or an exported folder (never runs code
    from the file). device: default cuda if available, else cpu. dtype: None (as `cdc sample`: bf16
    autocast on CUDA), "bf16" or "fp32" (torch dtypes too); CPU always runs fp32."""
    if dtype is not None and dtype not in _BF16:
        raise ValueError(f"dtype: expected bf16 or fp32 (or None), got {dtype!r}")
    dev = resolve_device(device)
    model, mcfg, info = ckpt_lib.load_for_inference(path, ema=ema, device=dev, runs_dir=runs_dir)
    return Generator(model, mcfg, info, dev, None if dtype is None else _BF16[dtype], ema, runs_dir)
