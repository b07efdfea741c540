"""`cdc upscale`, `cdc vary`, `cdc inpaint`: a checkpoint and a user's images -> an output folder.

Each command resolves its sampler options exactly as `cdc sample` does (cdc.sample.job: every
option left as None comes from the checkpoint), reads its images through cdc.sample.inputs, runs
the edit (cdc.sample.edit) and writes a folder like `cdc sample`'s:
    images/000000.png ...   row i * n + j: variant j of input i, at the model's final side
    samples.npz             arr_0 uint8 (N, H, W, C), arr_1 int64 labels (N,) (the null class
                            num_classes when no --class was given)
    grid.png                one row per input: input | bicubic (upscale) or masked input
                            (inpaint) | the variants
    samples.json            settings, each input's file and what was done to it, timings
Without a class the model's null class (the unconditional branch its label dropout trained) runs
and CFG is off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cdc import __version__
from cdc.eval.evalio import resolve_device
from cdc.fileio import write_json
from cdc.flow.matching import Schedule
from cdc.sample import edit as E
from cdc.sample.figures import rgb, tile, to_uint8, upsample
from cdc.sample.generate import job_guide, job_sampler
from cdc.sample.inputs import InputImage, image_size, pick_side, read_image, read_mask
from cdc.sample.job import check_counts, resolve_job
from cdc.sample.outdir import check_out, default_out, drop_asides, img_path, save_npz, start, write_png
from cdc.train import checkpoint as ckpt_lib

SEED_RULE = "variant j of input i: noise of image_seed(seed + j, i), as image i of `cdc sample --seed SEED+j`"
GRID_ROWS = 16  # inputs shown in grid.png
GRID_COLS = 8  # variants shown per input


def upscale(images: list[str | Path], ckpt: str | Path | None = None, klass: int | None = None,
            side: int | None = None, **common: Any) -> dict[str, Any]:  # fmt: skip
    """Each image, cropped and resized (as `cdc prepare`) to a stage's input side (`side`, else the
    largest that fits inside it), enters that stage and is carried to the final side."""
    if not images:
        raise ValueError("give at least one image to upscale")
    ctx = EditContext.open(ckpt, klass, "upscale", **common)
    ins_sides = list(ctx.sched.sides[:-1])
    inputs = [read_image(p, pick_side(image_size(p), ins_sides, str(p), side), ctx.channels) for p in images]
    edits = [E.upscale_edit(im.pixels, ctx.sched) for im in inputs]
    extra = [_bicubic(im.pixels, ctx.sched.sides[-1]) for im in inputs]
    return ctx.run(inputs, edits, extra, {"side": side})


def vary(image: str | Path, stage: int, strength: float = 0.0, ckpt: str | Path | None = None,
         klass: int | None = None, **common: Any) -> dict[str, Any]:  # fmt: skip
    """Variations of `image` that keep its content at stage `stage`'s side (1-based) and resample
    every finer stage; 0 < strength < 1 also redraws stage `stage`'s own detail (SDEdit)."""
    ctx = EditContext.open(ckpt, klass, "vary", **common)
    if not 1 <= stage <= ctx.sched.K:
        raise ValueError(
            f"--stage {stage}: this model has stages 1..{ctx.sched.K} (sides {list(ctx.sched.sides)})"
        )
    r = ctx.sched.sides[stage - 1]
    im = read_image(image, pick_side(image_size(image), [r], str(image)), ctx.channels)
    edit = E.vary_edit(im.pixels, stage, ctx.sched, strength)
    return ctx.run([im], [edit], [], {"stage": stage, "strength": strength})


def inpaint(image: str | Path, mask: str | Path, stage: int = 1, ckpt: str | Path | None = None,
            klass: int | None = None, **common: Any) -> dict[str, Any]:  # fmt: skip
    """Fill the mask's white region of `image` from stage `stage` on (replacement method), the rest
    held to the image at every step of every stage."""
    ctx = EditContext.open(ckpt, klass, "inpaint", **common)
    R = ctx.sched.sides[-1]
    im = read_image(image, pick_side(image_size(image), [R], str(image)), ctx.channels)
    m = read_mask(mask, im, R)
    edit = E.inpaint_edit(im.pixels, m, ctx.sched, stage)
    masked = torch.where(m, torch.zeros_like(im.pixels), im.pixels)  # the region to fill in mid-grey
    return ctx.run([im], [edit], [masked], {"mask": str(mask), "stage": stage})


def edit_sampling(model: torch.nn.Module, mcfg, info: dict[str, Any], dev: torch.device, klass: int | None, *,
                  n: int = 1, steps=None, cfg=None, solver: str | None = None, seed: int | None = None,
                  batch: int | None = None, guide: str | None = None, guide_scale=None,
                  runs_dir: str | Path = "runs", ema: bool = True, bf16: bool | None = None,
                  ) -> tuple[E.Sampling, dict[str, Any]]:  # fmt: skip
    """The sampler of an edit, resolved as `cdc sample` resolves its options (each None from the
    checkpoint); without `klass` the null class with CFG off. Returns it and the recorded settings."""
    check_counts(n, None, batch)
    if klass is None and cfg is not None:
        raise ValueError("--cfg needs --class: without a class the unconditional branch runs and CFG is off")
    if klass is not None and not 0 <= klass < mcfg.model.num_classes:
        raise ValueError(f"--class {klass}: this model has classes 0..{mcfg.model.num_classes - 1}")
    job = resolve_job(
        mcfg, info, dev, 0, 1, to_folder=False, out=None, n=n, classes=None if klass is None else [klass],
        steps=steps, cfg=1.0 if klass is None else cfg, solver=solver, seed=seed, batch=batch, stages=False,
        interval=None, sde_eps=None, overwrite=False, resume=False, runs_dir=runs_dir, bf16=bf16,
        guide=guide, guide_scale=guide_scale, cuda_graph_side=0,
    )  # fmt: skip
    net, opts = job_sampler(job, model, job_guide(job, ema))
    label = mcfg.model.num_classes if klass is None else klass
    settings = {**job.settings, "classes": "null" if klass is None else [klass], "n": n}
    sampling = E.Sampling(
        net, opts, job.sched, mcfg.model.in_channels, label, settings["seed"], job.batch, dev
    )
    return sampling, settings


class EditContext:
    """A loaded checkpoint, the resolved sampler options and the output folder of one command."""

    def __init__(self, sampling: E.Sampling, settings: dict[str, Any], out: Path, common: dict[str, Any]):
        self.sampling, self.settings, self.out, self.common = sampling, settings, out, common
        self.sched: Schedule = sampling.sched
        self.channels = sampling.channels

    @staticmethod
    def open(ckpt, klass: int | None, command: str, *, out: str | Path | None = None, n: int = 1,
             steps=None, cfg=None, solver: str | None = None, seed: int | None = None, batch: int | None = None,
             guide: str | None = None, guide_scale=None, overwrite: bool = False, device=None,
             runs_dir: str | Path = "runs", ema: bool = True, progress: bool = True) -> EditContext:  # fmt: skip
        dev = resolve_device(device)
        model, mcfg, info = ckpt_lib.load_for_inference(ckpt, ema=ema, device=dev, runs_dir=runs_dir)
        sampling, settings = edit_sampling(
            model, mcfg, info, dev, klass, n=n, steps=steps, cfg=cfg, solver=solver, seed=seed, batch=batch,
            guide=guide, guide_scale=guide_scale, runs_dir=runs_dir, ema=ema,
        )  # fmt: skip
        settings["command"] = command
        folder = _out_folder(out, Path(info["path"]).resolve(), info["step"], command, overwrite)
        check_out(folder, settings, overwrite, resume=False)  # before any work: a refusal writes nothing
        return EditContext(sampling, settings, folder, {"overwrite": overwrite, "progress": progress, "n": n})

    def run(self, inputs: list[InputImage], edits: list[E.Edit], extra: list[torch.Tensor],
            options: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
        """Sample every edit n times and write the folder; returns the summary (samples.json)."""
        n, K, R = self.common["n"], self.sched.K, self.sched.sides[-1]
        records = [_record(im, e, K, R) for im, e in zip(inputs, edits)]
        if self.common["progress"]:
            for r in records:
                print(f"{r['file']}: {r['note']}; {r['enters']}", file=sys.stderr)
        t0 = time.perf_counter()
        with torch.inference_mode():
            x = E.run_edits(self.sampling, edits, n)
        sec = time.perf_counter() - t0
        settings = {**self.settings, **options, "seeds": SEED_RULE}
        _write_folder(
            self.out, settings, to_uint8(x), self.sampling.label, inputs, extra, n, self.common["overwrite"]
        )
        summary = {**settings, "status": "done", "inputs": records, "images": len(x), "sec_per_image": sec / len(x),
                   "sides": list(self.sched.sides), "device": str(self.sampling.device), "out": str(self.out),
                   "cdc_version": __version__}  # fmt: skip
        write_json(self.out / "samples.json", summary, indent=2)
        drop_asides(self.out)
        return summary


def _record(im: InputImage, e: E.Edit, K: int, R: int) -> dict[str, Any]:
    """samples.json's line for one input: its file, what was done to it, where it entered."""
    side = im.pixels.shape[-1]
    if e.tau0 > 0:
        how = f"stage {e.stage + 1}/{K} re-run from tau {e.tau0:g}"
    elif e.known is not None:
        how = f"masked region generated from stage {e.stage + 1}/{K}"
    else:
        how = f"enters stage {e.stage + 1}/{K}"
    return {
        "file": im.name,
        "size": list(im.size),
        "side": side,
        "note": im.note,
        "enters": f"{how} ({side} -> {R} px)",
    }


def _out_folder(out: str | Path | None, path: Path, step: int, command: str, overwrite: bool) -> Path:
    """--out, or samples/<run>-step<step>-<command> (then -2, -3, ... once finished)."""
    if out is not None:
        return Path(out)
    run = path.parent if path.suffix == ".safetensors" else path.parent.parent
    return default_out(Path("samples") / f"{run.name}-step{step}-{command}", False, overwrite)


def _bicubic(x: torch.Tensor, side: int) -> torch.Tensor:
    """The baseline beside each upscale: PIL bicubic of the input (C, r, r) to `side`, in [-1, 1]."""
    u8 = to_uint8(x[None])[0]  # (r, r, C)
    im = Image.fromarray(u8[..., 0] if u8.shape[2] == 1 else u8).resize((side, side), Image.BICUBIC)
    a = np.asarray(im)
    a = a[..., None] if a.ndim == 2 else a
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def _write_folder(out: Path, settings: dict[str, Any], imgs: np.ndarray, label: int, inputs: list[InputImage],
                  extra: list[torch.Tensor], n: int, overwrite: bool) -> None:  # fmt: skip
    """PNGs, samples.npz and grid.png (samples.json is the caller's, last)."""
    start(out, settings, 0, overwrite, resume=False)
    for i, img in enumerate(imgs):
        write_png(img_path(out, i), img)
    labels = np.full(len(imgs), label, np.int64)
    save_npz(
        out / "samples.npz",
        {"arr_0": (imgs.shape, imgs.dtype, [imgs]), "arr_1": (labels.shape, labels.dtype, [labels])},
    )
    write_png(out / "grid.png", _grid(imgs, inputs, extra, n))


def _grid(imgs: np.ndarray, inputs: list[InputImage], extra: list[torch.Tensor], n: int) -> np.ndarray:
    """One row per input (at most GRID_ROWS): input (nearest) | extra (bicubic, masked) | variants."""
    R = imgs.shape[1]
    show = R * max(1, -(-64 // R))  # tiles of at least 64 px

    def big(a: np.ndarray) -> np.ndarray:  # (h, w, C) uint8 -> (show, show, 3)
        return rgb(upsample(a, show))

    rows = []
    for i, im in enumerate(inputs[:GRID_ROWS]):
        row = [big(to_uint8(im.pixels[None])[0])]
        row += [big(to_uint8(extra[i][None])[0])] if extra else []
        row += [big(imgs[i * n + j]) for j in range(min(n, GRID_COLS))]
        rows.append(row)
    return tile(rows)
