"""`cdc sample`: a checkpoint -> PNGs, an ADM-format npz, a grid, and the stage-by-stage view (Fig. 9).

Image i always has label classes[i % len(classes)] and noise from image_seed(seed, i), so the output
depends on neither the batch size nor the number of GPUs. Under torchrun each rank samples a disjoint
share of the indices still to do; rank 0 assembles once every rank is done.

Layout of the output directory:
    images/000000.png ...           one PNG per image (atomic: temp + rename)
    samples.npz                     arr_0 uint8 (N, H, W, C), arr_1 int64 labels (N,)  (ADM format)
    grid.png                        first <= 64 images, one row per class when classes cycle
    samples.json                    settings, NFE and seconds per image
    with --stages: stages/stage0/000000.png ... (each stage's output at its side), stages.npz
                   (stage0, stage1, ... uint8 NHWC), stages/000000.png (Fig. 9 panel of the first
                   images) and stages.png (the first few panels together)
    with --preview: preview/stage0.png ... a grid of the current batch at each stage, written as
                   soon as that stage exists (replaced by the next batch's), to watch images arrive

The npz and figures are always assembled from the PNGs (lossless), so a resumed job gives exactly
the npz an uninterrupted one would. generate() runs named steps: cdc.sample.job resolves the options
into a Job, cdc.sample.outdir owns the folder's files, and the steps below sample and finish.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from cdc import __version__
from cdc.eval.evalio import resolve_device
from cdc.fileio import write_json
from cdc.flow.matching import velocity_net_from_config
from cdc.flow.sampler import image_seed, sample
from cdc.interrupt import Interrupted, sigterm_raises
from cdc.sample.figures import to_uint8
from cdc.sample.job import Job, check_counts, resolve_job
from cdc.sample.outdir import (
    assemble,
    check_out,
    default_out,
    done_images,
    drop_asides,
    mark_interrupted,
    read_record,
    save_image,
    start,
)
from cdc.sample.preview import OnStage, StageImages, preview_writer, stage_hook
from cdc.train import checkpoint as ckpt_lib
from cdc.train import distributed as dist_lib

__all__ = [
    "generate",
    "to_uint8",
    "velocity_fn",
    "StageTimer",
    "StageImages",
    "job_guide",
    "job_sampler",
    "sample_batch",
    "assemble",
    "default_out",
]


# ---------------------------------------------------------------------------------------------
# the sampler's net and its timer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def velocity_fn(model: torch.nn.Module, bf16: bool):
    """The sampler's net: the model under bf16 autocast (CUDA) returning fp32 velocities."""

    def net(xs, taus, ys, *ds):  # ds: the step sizes of a few-step (shortcut) model, if any
        # no weight-cast cache: each forward uses each weight once, and torch wants it off where a
        # forward is captured into a CUDA graph (cdc.nn.cuda_graphs)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            vs = model(xs, taus, ys, *ds)
        return [v.float() for v in vs]

    return net


def sampler_net(model: torch.nn.Module, mcfg, bf16: bool, graph_side: int = 0):
    """The velocity field the sampler integrates; stages of side <= graph_side from CUDA graphs."""
    net = velocity_net_from_config(velocity_fn(model, bf16), mcfg.flow)
    if graph_side > 0:
        from cdc.nn.cuda_graphs import GraphedNet

        net = GraphedNet(net, graph_side)
    return net


class StageTimer:
    """Synchronised wall time per stage, used as the sampler's `on_stage` callback."""

    def __init__(self, K: int, device: torch.device):
        self.stage_sec, self.device, self.t0, self.last = [0.0] * K, device, 0.0, 0.0

    def start(self) -> None:
        _sync(self.device)
        self.t0 = self.last = time.perf_counter()

    def __call__(self, k: int, x: torch.Tensor) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.stage_sec[k] += now - self.last
        self.last = now

    def stop(self) -> float:
        """Seconds since start() (the batch's total)."""
        _sync(self.device)
        return time.perf_counter() - self.t0

    def exclude(self, since: float) -> None:
        """Leave the time since `since` (a preview callback's) out of every stage and the total."""
        spent = time.perf_counter() - since
        self.last += spent
        self.t0 += spent


def generate(
    ckpt: str | Path | None = None,
    out: str | Path | None = None,
    n: int = 64,
    classes: str | list[int] | None = "all",
    steps: int | str | list[int] | None = None,
    cfg: float | str | list[float] | None = None,
    solver: str | None = None,
    seed: int | None = None,
    batch: int | None = None,
    stages: bool = False,
    ema: bool = True,
    interval: str | list[float] | None = None,
    sde_eps: float | None = None,
    overwrite: bool = False,
    resume: bool = False,
    device: str | torch.device | None = None,
    runs_dir: str | Path = "runs",
    progress: bool = True,
    bf16: bool | None = None,
    guide: str | None = None,
    guide_scale: float | str | list[float] | None = None,
    cuda_graph_side: int | None = None,
    preview: bool = False,
) -> dict[str, Any]:
    """Sample `n` images from a checkpoint into `out`; returns the summary also written to samples.json.

    Options left as None come from the checkpoint's `sample` config; `out` defaults to
    samples/<run>-step<step>. `bf16` (default: on for CUDA) runs the model under bf16 autocast; the
    ODE state stays fp32. `guide` / `guide_scale`: autoguidance (cdc.flow.sampler.autoguided). Under
    torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 returns the summary, the others {}.
    `cuda_graph_side`: on CUDA, stages of at most this side replay CUDA graphs (cdc.nn.cuda_graphs).
    `preview`: rank 0 writes preview/stage<k>.png, its current batch at stage k, as soon as it exists.
    Ctrl-C or SIGTERM: finished images stay, samples.json says "interrupted" with `images_saved`,
    and cdc.interrupt.Interrupted is raised (`resume=True` then continues).
    """
    check_counts(n, sde_eps, batch)
    rank, world, dev, own_pg = _join_ranks(device)
    restore_sigterm = sigterm_raises()  # SIGTERM unwinds like Ctrl-C: samples.json then says what is done
    job: Job | None = None
    try:
        model, mcfg, info = ckpt_lib.load_for_inference(ckpt, ema=ema, device=dev, runs_dir=runs_dir)
        job = resolve_job(
            mcfg, info, dev, rank, world, out=out, n=n, classes=classes, steps=steps, cfg=cfg, solver=solver,
            seed=seed, batch=batch, stages=stages, interval=interval, sde_eps=sde_eps, overwrite=overwrite,
            resume=resume, runs_dir=runs_dir, bf16=bf16, guide=guide, guide_scale=guide_scale,
            cuda_graph_side=cuda_graph_side,
        )
        gmodel = job_guide(job, ema)  # before any output
        if info.get("sample_defaults") and rank == 0:
            print(f"note: sampler defaults from {info['sample_defaults']} (cdc tune sampler chose them; "
                  "options given here override them, and deleting the file restores the checkpoint's)", file=sys.stderr)  # fmt: skip
        todo = _open_out(job, overwrite, resume, progress)
        on_stage = preview_writer(job.out) if preview and job.main else None
        stats, wall = _sample_missing(job, *job_sampler(job, model, gmodel), todo, progress, on_stage)
        return _finish(job, stats, wall, resumed=n - len(todo))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (above): finished PNGs stay, the caller reports
        signum = getattr(e, "signum", signal.SIGINT)
        if job is None or not job.started:
            raise Interrupted(signum, "no new image saved", main=rank == 0) from None
        raise mark_interrupted(job.out, job.n, job.settings, signum) from None
    finally:
        restore_sigterm()
        if own_pg:
            dist_lib.shutdown()


# ---------------------------------------------------------------------------------------------
# the steps of generate(), in order


def _join_ranks(device: str | torch.device | None) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we started the process group): torchrun's, or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device), False
    own_pg = not dist_lib.initialized()
    d = dist_lib.init()
    return d.rank, world, d.device, own_pg


def job_guide(job: Job, ema: bool) -> torch.nn.Module | None:
    """The autoguidance model (cdc.flow.sampler.autoguided), or None without --guide."""
    return ckpt_lib.load_guide(Path(job.settings["guide"]), job.mcfg, ema, job.dev) if job.guide else None


def _open_out(job: Job, overwrite: bool, resume: bool, progress: bool) -> list[int]:
    """Every rank checks the folder, then rank 0 prepares it and finds the images already done;
    returns the indices still to do (rank 0's view, so every rank splits the same list)."""
    check_out(job.out, job.settings, overwrite, resume)
    if job.note and job.main:  # only once the folder is accepted: a refusal stays one line
        print(job.note, file=sys.stderr)
    dist_lib.barrier()  # every rank has checked the directory before rank 0 changes it
    done = None
    if job.main:
        if progress:
            s = job.settings
            print(f"checkpoint: {s['ckpt']} (step {s['step']}, {s['weights']})", file=sys.stderr)
        start(job.out, job.settings, job.sched.K if job.stages else 0, overwrite, resume)
        job.started = True
        stage_sides = list(job.sched.sides) if job.stages else None
        done = done_images(job.out, job.n, job.sched.sides[-1], job.mcfg.model.in_channels, stage_sides)
    done = dist_lib.all_gather_objects(done)[0]
    return [i for i in range(job.n) if not done[i]]


def job_sampler(job: Job, model: torch.nn.Module, gmodel: torch.nn.Module | None) -> tuple[Any, dict[str, Any]]:
    """The velocity field and the keyword options of cdc.flow.sampler.sample for this job."""
    s = job.settings
    opts = dict(
        steps=s["steps"],
        cfg=s["cfg"],
        null_class=job.mcfg.model.num_classes,
        solver="euler" if job.few else s["solver"],
        interval=tuple(s["interval"]),
        sde_eps=s["sde_eps"],
        interpolant=job.mcfg.flow.interpolant,
        return_stages=job.stages,
        step_cond=job.few,
    )
    net = sampler_net(model, job.mcfg, job.bf16, job.graph_side)
    if job.guide:
        opts.update(guide=sampler_net(gmodel, job.mcfg, job.bf16, job.graph_side), guide_scale=job.guide_scale)
    return net, opts


def _sample_missing(
    job: Job, net, opts: dict[str, Any], todo: list[int], progress: bool, on_stage: OnStage | None = None
) -> tuple[list, float]:
    """This rank's share of `todo`, batch by batch, PNGs written in the background; returns every
    rank's (images, seconds, seconds per stage, NFE) and the wall time."""
    mine = todo[job.rank :: job.world]
    timer = StageTimer(job.sched.K, job.dev)
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", disable=not (progress and job.main), desc="sampling")
    gen_sec, nfe, pending = 0.0, None, []
    wall0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(4) as writer, torch.inference_mode():
            for b0 in range(0, len(mine), job.batch):
                idx = mine[b0 : b0 + job.batch]
                res, sec = sample_batch(job, net, opts, idx, timer, on_stage)
                gen_sec, nfe = gen_sec + sec, res.nfe
                pending += _write_batch(writer, job, idx, res)
                while len(pending) > 4 * job.batch:  # bound memory held by queued writes
                    pending.pop(0).result()
                bar.update(min(len(idx) * job.world, bar.total - bar.n))
            for f in pending:
                f.result()  # surface write errors
    finally:
        bar.close()
    stats = dist_lib.all_gather_objects((len(mine), gen_sec, timer.stage_sec, nfe))
    return stats, time.perf_counter() - wall0


def sample_batch(
    job: Job, net, opts: dict[str, Any], idx: list[int], timer: StageTimer, on_stage: OnStage | None = None
) -> tuple[Any, float]:
    """Images `idx`: image i's label and noise depend on i alone (per-image seeds); (result, seconds).
    The one sampling step of both `cdc sample` and cdc.load(...).sample (cdc.sample.api).
    on_stage (a preview) sees each stage's output; its time is left out of the timings."""
    y = torch.as_tensor(job.labels[idx], device=job.dev)
    seeds = [image_seed(job.settings["seed"], i) for i in idx]
    timer.start()
    hook = stage_hook(job.sched.sides, idx, [int(v) for v in job.labels[idx]], timer, on_stage)
    res = sample(net, job.sched, y, seeds, job.mcfg.model.in_channels, on_stage=hook, **opts)
    return res, timer.stop()


def _write_batch(writer: ThreadPoolExecutor, job: Job, idx: list[int], res) -> list[Future]:
    """Queue one PNG per image (and per stage with --stages)."""
    imgs = to_uint8(res.x)
    st = [to_uint8(s) for s in res.stages] if job.stages else None
    return [
        writer.submit(save_image, job.out, i, imgs[j], [s[j] for s in st] if st else None)
        for j, i in enumerate(idx)
    ]


def _finish(job: Job, stats: list, wall: float, resumed: int) -> dict[str, Any]:
    """Rank 0 assembles the npz and figures and writes the summary; the others return {}."""
    if not job.main:
        # wait for rank 0's files before tearing the group down: with torch 2.4's gloo a rank
        # that destroys its group while rank 0 still works could hang there and never exit
        dist_lib.barrier()
        return {}
    old = read_record(job.out)
    assemble(job.out, job.labels, job.mcfg.model.in_channels, list(job.sched.sides), job.stages)
    summary = _summary(job, old, stats, wall, resumed)
    write_json(job.out / "samples.json", summary, indent=2)
    drop_asides(job.out)  # an --overwrite's previous samples go only now that the new ones are done
    dist_lib.barrier()  # the other ranks wait for this (see above)
    return summary


def _summary(job: Job, old: dict[str, Any], stats: list, wall: float, resumed: int) -> dict[str, Any]:
    """samples.json once done: settings, NFE and timings (a resume with nothing left keeps the old ones)."""
    count = sum(s[0] for s in stats)
    secs = sum(s[1] for s in stats)
    nfes = [s[3] for s in stats if s[3] is not None]
    K, dev = job.sched.K, job.dev
    return {
        **job.settings,
        "status": "done",
        "nfe": nfes[0] if nfes else old.get("nfe"),
        "generated": count,
        "resumed": resumed,
        "sec_per_image": secs / count if count else old.get("sec_per_image"),
        "sec_per_image_stage": (
            [sum(s[2][k] for s in stats) / count for k in range(K)] if count else old.get("sec_per_image_stage")
        ),
        "images_per_s": count / wall if count else None,
        "sides": list(job.sched.sides),
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "bf16": job.bf16,
        "cuda_graph_side": job.graph_side,
        "batch": job.batch,
        "world_size": job.world,
        "stages": job.stages,
        "out": str(job.out),
        "cdc_version": __version__,
    }
