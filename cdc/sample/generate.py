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

The npz and figures are always assembled from the PNGs (lossless), so a resumed job gives exactly
the npz an uninterrupted one would.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cdc import __version__
from cdc.eval.evalio import resolve_device
from cdc.fileio import check_out_path, read_json, write_json
from cdc.flow.matching import Schedule, velocity_net_from_config
from cdc.flow.sampler import image_seed, sample
from cdc.flow.shortcut import guided_twice, guided_twice_message, shortcut_mode
from cdc.interrupt import Interrupted, signal_name, sigterm_raises
from cdc.sample.figures import grid, stage_figure, stages_figure, to_uint8
from cdc.sample.options import labels_for, parse_cfg, parse_classes, parse_guide, parse_interval, parse_steps
from cdc.train import checkpoint as ckpt_lib
from cdc.train import distributed as dist_lib

__all__ = [
    "generate",
    "to_uint8",
    "velocity_fn",
    "StageTimer",
    "assemble",
]

OURS = ("images", "stages", "samples.npz", "stages.npz", "grid.png", "stages.png", "samples.json")
# resume keys; guide / guide_scale are recorded only when autoguidance is on, so older records match
MATCH = ("ckpt", "weights", "steps", "cfg", "solver", "interval", "sde_eps", "seed", "classes", "guide", "guide_scale")
N_FIGURES = 16  # per-image Fig. 9 panels written under stages/
N_COMBINED = 4  # images in the combined stages.png


def _img_path(out: Path, i: int, stage: int | None = None) -> Path:
    return (
        out / "images" / f"{i:06d}.png"
        if stage is None
        else out / "stages" / f"stage{stage}" / f"{i:06d}.png"
    )


def _write_png(path: Path, img: np.ndarray) -> None:
    """Write uint8 (H, W, C) as PNG via temp + rename, so a crash never leaves half a PNG under `path`."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(tmp, format="PNG", compress_level=4)
    os.replace(tmp, path)


def _read_png(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path))
    return a[..., None] if a.ndim == 2 else a  # (H, W, C)


def _png_ok(path: Path, side: int, channels: int) -> bool:
    """The file exists, decodes fully and has the expected size and mode."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.size == (side, side) and im.mode == ("L" if channels == 1 else "RGB")
    except Exception:  # missing, truncated or foreign file: regenerate it
        return False


def _save_image(out: Path, i: int, img: np.ndarray, stages: list[np.ndarray] | None) -> None:
    for k, s in enumerate(stages or []):
        _write_png(_img_path(out, i, k), s)
    _write_png(_img_path(out, i), img)  # last: its presence marks the whole image as done


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _done(out: Path, n: int, side: int, channels: int, stage_sides: list[int] | None) -> list[bool]:
    """Which of images 0..n-1 are finished (final PNG, and every stage PNG when asked, decode)."""

    def ok(i: int) -> bool:
        if not _png_ok(_img_path(out, i), side, channels):
            return False
        return all(_png_ok(_img_path(out, i, k), r, channels) for k, r in enumerate(stage_sides or []))

    if not (out / "images").is_dir():
        return [False] * n
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(ok, range(n)))


def _used(folder: Path) -> bool:
    return folder.exists() and (not folder.is_dir() or any(folder.iterdir()))


def _finished(folder: Path) -> bool:
    """`folder` holds a `cdc sample` output whose samples.json says it is done."""
    try:
        return read_json(folder / "samples.json", "a `cdc sample` record").get("status") == "done"
    except (OSError, ValueError, AttributeError):
        return False


def default_out(base: Path, resume: bool, overwrite: bool) -> Path:
    """The default output folder: `base`, or base-2, base-3, ... once those hold finished samples.

    Sampling a checkpoint again needs no flag: finished samples are skipped up to the first folder
    that is missing or empty. An unfinished one stops the walk (it is refused, naming --resume), and
    --resume / --overwrite act on that one, or else on the newest finished sample.
    """
    k, c = 1, base
    while _used(c) and _finished(c):
        k += 1
        c = base.with_name(f"{base.name}-{k}")
    if (resume or overwrite) and not _used(c) and k > 1:
        return base if k == 2 else base.with_name(f"{base.name}-{k - 1}")
    return c


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty output unless --overwrite or a --resume whose settings match (all ranks)."""
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other; pick one")
    if not out.is_dir() or not any(out.iterdir()) or overwrite:
        return
    if not resume:
        raise ValueError(
            f"{out} is not empty; pass --resume to continue that job or --overwrite to replace it"
        )
    meta = out / "samples.json"
    if not meta.is_file():
        raise ValueError(
            f"--resume: {out} has no samples.json (not a `cdc sample` output); pick another --out"
        )
    old = read_json(meta, "a `cdc sample` record (samples.json); use --overwrite to start again")
    for key in MATCH:
        if old.get(key) != settings.get(key):
            raise ValueError(
                f"--resume: {key} was {old.get(key)!r} in {out} but is {settings.get(key)!r} now; "
                "use the same options or --overwrite"
            )


def assemble(out: Path, labels: np.ndarray, channels: int, sides: list[int], stages: bool) -> None:
    """Build samples.npz, grid.png and (with stages) stages.npz and the Fig. 9 panels from the PNGs."""
    n = len(labels)
    with ThreadPoolExecutor(8) as pool:
        imgs = np.stack(list(pool.map(lambda i: _read_png(_img_path(out, i)), range(n))))  # (N, H, W, C)
        _save_npz(out / "samples.npz", arr_0=imgs, arr_1=labels.astype(np.int64))
        _write_png(out / "grid.png", grid(imgs, labels))
        if not stages:
            return
        per_stage = {
            f"stage{k}": np.stack(list(pool.map(lambda i, k=k: _read_png(_img_path(out, i, k)), range(n))))
            for k in range(len(sides))
        }
    _save_npz(out / "stages.npz", **per_stage)
    panels = [[per_stage[f"stage{k}"][i] for k in range(len(sides))] for i in range(min(n, N_FIGURES))]
    for i, p in enumerate(panels):
        _write_png(out / "stages" / f"{i:06d}.png", stage_figure(p))
    _write_png(out / "stages.png", stages_figure(panels[:N_COMBINED]))


def _interrupted(out: Path, n: int, settings: dict[str, Any], signum: int) -> Interrupted:
    """Rank 0 after a signal: samples.json records how many images are done (a resume regenerates
    only the rest); returns the exception that tells the caller."""
    count = sum(_img_path(out, i).is_file() for i in range(n))  # final PNGs are written last, atomically
    meta = out / "samples.json"
    old = read_json(meta, "a `cdc sample` record (samples.json); use --overwrite to start again")
    write_json(meta, {**old, "status": "interrupted", "signal": signal_name(signum), "images_saved": count}, indent=2)
    return Interrupted(signum, f"{count} of {n} images saved in {out}", out=str(out), ckpt=settings["ckpt"], main=True)


# ---------------------------------------------------------------------------------------------
# the job


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
) -> dict[str, Any]:
    """Sample `n` images from a checkpoint into `out`; returns the summary also written to samples.json.

    Options left as None come from the checkpoint's `sample` config; `out` defaults to
    samples/<run>-step<step>. `bf16` (default: on for CUDA) runs the model under bf16 autocast; the
    ODE state stays fp32. `guide` / `guide_scale`: autoguidance (cdc.flow.sampler.autoguided). Under
    torchrun (WORLD_SIZE > 1) every rank calls this; rank 0 returns the summary, the others {}.
    `cuda_graph_side`: on CUDA, stages of at most this side replay CUDA graphs (cdc.nn.cuda_graphs).
    Ctrl-C or SIGTERM: finished images stay, samples.json says "interrupted" with `images_saved`,
    and cdc.interrupt.Interrupted is raised (`resume=True` then continues).
    """
    if n < 1:
        raise ValueError(f"-n/--num-images must be >= 1, got {n}")
    if sde_eps is not None and sde_eps < 0:  # before any output (the sampler checks it too)
        raise ValueError(f"sde_eps (--sde-eps) must be >= 0, got {sde_eps}")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_pg = world > 1 and not torch.distributed.is_initialized()
    if world > 1:
        d = dist_lib.init()
        rank, dev = d.rank, d.device
    else:
        rank = 0
        dev = resolve_device(device)
    main = rank == 0
    restore_sigterm = sigterm_raises()  # SIGTERM unwinds like Ctrl-C: samples.json then says what is done
    started, bar = False, None  # started: rank 0 has marked samples.json "running"
    try:
        model, mcfg, info = ckpt_lib.load_for_inference(ckpt, ema=ema, device=dev, runs_dir=runs_dir)
        sched = Schedule.from_config(mcfg.flow)
        path = Path(info["path"]).resolve()
        note = None
        if out is None:
            base = Path("samples") / f"{path.parent.parent.name}-step{info['step']}"
            out = default_out(base, resume, overwrite)
            if out != base and not (resume or overwrite):
                note = f"note: {base} holds a finished sample; writing to {out} (--out picks the folder)"
        out = Path(out)
        check_out_path(out, "--out")
        sc, C, side = mcfg.sample, mcfg.model.in_channels, sched.sides[-1]
        cls = parse_classes(classes, mcfg.model.num_classes)
        settings = {
            "ckpt": str(path),
            "step": info["step"],
            "weights": info["weights"],
            "steps": parse_steps(steps, sc.steps, sched.K),
            "cfg": parse_cfg(cfg, sc.cfg, sched.K),
            "solver": solver or sc.solver,
            "interval": parse_interval(interval, sc.interval),
            "sde_eps": float(sc.sde_eps if sde_eps is None else sde_eps),
            "seed": int(sc.seed if seed is None else seed),
            "classes": "all" if cls == list(range(mcfg.model.num_classes)) else cls,
            "n": int(n),
        }
        g_spec, g_scale = parse_guide(guide, guide_scale, (sc.guide, sc.guide_scale), sched.K)
        wanted = ckpt_lib.step_guide(g_spec, path) if guide is None else None  # the checkpoint's own choice
        if wanted is not None and not wanted.is_file():
            # a run shorter than the recipe's guide step still samples with its own defaults
            if main:
                print(
                    f"note: this checkpoint's sampler autoguides with {g_spec} ({wanted}), which does not "
                    "exist yet; sampling with CFG alone (--guide none silences this note)",
                    file=sys.stderr,
                )
            g_spec, g_scale = "", 1.0
        if twice := guided_twice(mcfg.model.step_cond, mcfg.fewstep, settings["cfg"], g_spec, g_scale):
            where = {"cfg": "--cfg" if cfg is not None else "the checkpoint's sample.cfg",
                     "guide": "--guide" if guide is not None else "the checkpoint's sample.guide"}
            asked = {"cfg": f"{where['cfg']} {settings['cfg']}", "guide": f"{where['guide']} {g_spec} (weight {g_scale})"}
            raise ValueError(guided_twice_message(twice, mcfg.fewstep, asked))
        if g_spec:
            settings["guide"] = str(ckpt_lib.guide_path(g_spec, path, runs_dir))
            settings["guide_scale"] = g_scale
            gmodel = ckpt_lib.load_guide(Path(settings["guide"]), mcfg, ema, dev)  # before any output
        if settings["solver"] not in ("euler", "heun", "sde"):
            raise ValueError(f"--solver: {settings['solver']!r} is not one of euler, heun, sde")
        few = shortcut_mode(mcfg.model.step_cond, mcfg.fewstep.levels, settings["steps"])
        if few:
            settings["solver"] = "shortcut"  # Euler steps of size 1/steps, the net told the size
        batch = int(batch or sc.batch)
        if batch < 1:
            raise ValueError(f"--batch must be >= 1, got {batch}")
        use_bf16 = dev.type == "cuda" if bf16 is None else bool(bf16 and dev.type == "cuda")
        graph_side = int(sc.cuda_graph_side if cuda_graph_side is None else cuda_graph_side)
        if graph_side < 0:
            raise ValueError(f"--cuda-graph-side must be >= 0 (0 = off), got {graph_side}")
        graph_side = graph_side if dev.type == "cuda" else 0
        labels = labels_for(n, cls)
        stage_sides = list(sched.sides) if stages else None

        _prepare_out(out, settings, overwrite, resume)
        if note and main:  # only once the folder is accepted: a refusal stays one line
            print(note, file=sys.stderr)
        dist_lib.barrier()  # every rank has checked the directory before rank 0 changes it
        if main:
            if progress:
                print(
                    f"checkpoint: {settings['ckpt']} (step {info['step']}, {info['weights']})",
                    file=sys.stderr,
                )
            if overwrite and out.is_dir():
                for name in OURS:
                    p = out / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            (out / "images").mkdir(parents=True, exist_ok=True)
            for k in range(sched.K if stages else 0):
                (out / "stages" / f"stage{k}").mkdir(parents=True, exist_ok=True)
            meta = out / "samples.json"
            old = read_json(meta, "a `cdc sample` record (samples.json); use --overwrite to start again") if resume and meta.is_file() else {}  # keeps timings on resume
            write_json(meta, {**old, **settings, "status": "running", "cdc_version": __version__}, indent=2)
            started = True
            done = _done(out, n, side, C, stage_sides)
        else:
            done = None
        done = dist_lib.all_gather_objects(done)[0]  # rank 0's view, so every rank splits the same list
        todo = [i for i in range(n) if not done[i]]
        mine = todo[rank::world]

        opts = dict(
            steps=settings["steps"],
            cfg=settings["cfg"],
            null_class=mcfg.model.num_classes,
            solver="euler" if few else settings["solver"],
            interval=tuple(settings["interval"]),
            sde_eps=settings["sde_eps"],
            interpolant=mcfg.flow.interpolant,
            return_stages=stages,
            step_cond=few,
        )
        net = sampler_net(model, mcfg, use_bf16, graph_side)
        if g_spec:
            opts.update(guide=sampler_net(gmodel, mcfg, use_bf16, graph_side), guide_scale=g_scale)
        timer = StageTimer(sched.K, dev)
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", disable=not (progress and main), desc="sampling")
        gen_sec, nfe, pending = 0.0, None, []
        wall0 = time.perf_counter()
        with ThreadPoolExecutor(4) as writer, torch.inference_mode():
            for b0 in range(0, len(mine), batch):
                idx = mine[b0 : b0 + batch]
                y = torch.as_tensor(labels[idx], device=dev)
                seeds = [image_seed(settings["seed"], i) for i in idx]
                timer.start()
                res = sample(net, sched, y, seeds, C, on_stage=timer, **opts)
                gen_sec += timer.stop()
                nfe = res.nfe
                imgs = to_uint8(res.x)
                st = [to_uint8(s) for s in res.stages] if stages else None
                for j, i in enumerate(idx):
                    pending.append(
                        writer.submit(_save_image, out, i, imgs[j], [s[j] for s in st] if st else None)
                    )
                while len(pending) > 4 * batch:  # bound memory held by queued writes
                    pending.pop(0).result()
                bar.update(min(len(idx) * world, bar.total - bar.n))
            for f in pending:
                f.result()  # surface write errors
        bar.close()
        stats = dist_lib.all_gather_objects((len(mine), gen_sec, timer.stage_sec, nfe))
        wall = time.perf_counter() - wall0
        if not main:
            # wait for rank 0's files before tearing the group down: with torch 2.4's gloo a rank
            # that destroys its group while rank 0 still works could hang there and never exit
            dist_lib.barrier()
            return {}
        count = sum(s[0] for s in stats)
        secs = sum(s[1] for s in stats)
        nfes = [s[3] for s in stats if s[3] is not None]
        old = read_json(out / "samples.json", "a `cdc sample` record (samples.json); use --overwrite to start again")
        assemble(out, labels, C, list(sched.sides), stages)
        summary = {
            **settings,
            "status": "done",
            "nfe": nfes[0] if nfes else old.get("nfe"),
            "generated": count,
            "resumed": n - len(todo),
            "sec_per_image": secs / count if count else old.get("sec_per_image"),
            "sec_per_image_stage": (
                [sum(s[2][k] for s in stats) / count for k in range(sched.K)]
                if count
                else old.get("sec_per_image_stage")
            ),
            "images_per_s": count / wall if count else None,
            "sides": list(sched.sides),
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "bf16": use_bf16,
            "cuda_graph_side": graph_side,
            "batch": batch,
            "world_size": world,
            "stages": bool(stages),
            "out": str(out),
            "cdc_version": __version__,
        }
        write_json(out / "samples.json", summary, indent=2)
        dist_lib.barrier()  # the other ranks wait for this (see above)
        return summary
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (above): finished PNGs stay, the caller reports
        if bar is not None:
            bar.close()
        signum = getattr(e, "signum", signal.SIGINT)
        if not started:
            raise Interrupted(signum, "no new image saved", main=main) from None
        raise _interrupted(out, n, settings, signum) from None
    finally:
        restore_sigterm()
        if own_pg:
            dist_lib.shutdown()
