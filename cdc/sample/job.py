"""A `cdc sample` job resolved from its options and the checkpoint's config: the output folder, the
recorded settings, each image's label, the guide, the solver and the speed options. Every refusal of
an option happens here, before any output is written."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc.fileio import check_out_path
from cdc.flow.matching import Schedule
from cdc.flow.shortcut import guided_twice, guided_twice_message, shortcut_mode
from cdc.sample.options import labels_for, parse_cfg, parse_classes, parse_guide, parse_interval, parse_steps
from cdc.sample.outdir import default_out
from cdc.train import checkpoint as ckpt_lib
from cdc.train import exported


@dataclass
class Job:
    """One resolved `cdc sample` job: what the steps of generate() share (all but `rank` and
    `started` are the same on every rank)."""

    out: Path | None  # None: images kept in memory (cdc.sample.api), no folder
    settings: dict[str, Any]  # what samples.json records and a --resume must match
    labels: np.ndarray  # (n,) int64, image i's class
    mcfg: Any  # the checkpoint's config (cdc.config.Config)
    sched: Schedule
    dev: torch.device
    rank: int
    world: int  # number of ranks; each samples a disjoint share of the images still to do
    stages: bool  # also keep each stage's output (Fig. 9)
    few: bool  # a few-step model sampled in shortcut mode
    guide: str  # autoguidance checkpoint spec; "" for none
    guide_scale: float | list[float]
    batch: int
    bf16: bool  # the model under bf16 autocast (CUDA only)
    graph_side: int  # stages of at most this side replay CUDA graphs; 0 = off
    note: str | None  # printed once the output folder is accepted
    started: bool = False  # rank 0 has marked samples.json "running"

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_counts(n: int, sde_eps: float | None, batch: int | None) -> None:
    """The options that need no checkpoint, refused before anything loads."""
    if n < 1:
        raise ValueError(f"-n/--num-images must be >= 1, got {n}")
    if sde_eps is not None and sde_eps < 0:  # before any output (the sampler checks it too)
        raise ValueError(f"sde_eps (--sde-eps) must be >= 0, got {sde_eps}")
    if batch is not None and batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")


def resolve_job(
    mcfg, info: dict[str, Any], dev: torch.device, rank: int, world: int, to_folder: bool = True, **asked: Any
) -> Job:
    """The job the options ask for, each option left as None taken from the checkpoint's `sample`
    config; every refusal comes here, before any output. `asked`: generate()'s own options;
    to_folder=False (cdc.sample.api) resolves no output folder."""
    sched, path = Schedule.from_config(mcfg.flow), Path(info["path"]).resolve()
    out, note = None, None
    if to_folder:
        out, note = _out_folder(asked["out"], path, info["step"], asked["resume"], asked["overwrite"])
    settings, labels = _settings(mcfg, sched, path, info, asked)
    g_spec, g_scale = _resolve_guide(settings, mcfg, sched, path, asked, main=rank == 0)
    few = _solver(settings, mcfg)
    batch, bf16, graph_side = _speed(mcfg.sample, dev, asked["batch"], asked["bf16"], asked["cuda_graph_side"])
    return Job(
        out=out, settings=settings, labels=labels, mcfg=mcfg, sched=sched, dev=dev, rank=rank, world=world,
        stages=bool(asked["stages"]), few=few, guide=g_spec, guide_scale=g_scale, batch=batch, bf16=bf16,
        graph_side=graph_side, note=note,
    )


def _out_folder(
    out: str | Path | None, path: Path, step: int, resume: bool, overwrite: bool
) -> tuple[Path, str | None]:
    """--out, or samples/<run>-step<step> (-2, -3, ... once finished); the note saying so."""
    note = None
    if out is None:
        run = path.parent if path.suffix == ".safetensors" else path.parent.parent  # export folder, or run
        base = Path("samples") / f"{run.name}-step{step}"
        out = default_out(base, resume, overwrite)
        if out != base and not (resume or overwrite):
            note = f"note: {base} holds a finished sample; writing to {out} (--out picks the folder)"
    out = Path(out)
    check_out_path(out, "--out")
    return out, note


def _settings(
    mcfg, sched: Schedule, path: Path, info: dict[str, Any], asked: dict[str, Any]
) -> tuple[dict[str, Any], np.ndarray]:
    """The recorded settings (samples.json, the resume match) and each image's label."""
    sc = mcfg.sample
    cls = parse_classes(asked["classes"], mcfg.model.num_classes)
    settings = {
        "ckpt": str(path),
        "step": info["step"],
        "weights": info["weights"],
        "steps": parse_steps(asked["steps"], sc.steps, sched.K),
        "cfg": parse_cfg(asked["cfg"], sc.cfg, sched.K),
        "solver": asked["solver"] or sc.solver,
        "interval": parse_interval(asked["interval"], sc.interval),
        "sde_eps": float(sc.sde_eps if asked["sde_eps"] is None else asked["sde_eps"]),
        "seed": int(sc.seed if asked["seed"] is None else asked["seed"]),
        "classes": "all" if cls == list(range(mcfg.model.num_classes)) else cls,
        "n": int(asked["n"]),
    }
    return settings, labels_for(asked["n"], cls)


def _resolve_guide(
    settings: dict[str, Any], mcfg, sched: Schedule, path: Path, asked: dict[str, Any], main: bool
) -> tuple[str, float | list[float]]:
    """(guide spec, weight): --guide, else the checkpoint's own (CFG alone, with a note, when that
    checkpoint does not exist yet); refuses guidance the weights already hold. Records it in `settings`."""
    sc, guide = mcfg.sample, asked["guide"]
    g_spec, g_scale = parse_guide(guide, asked["guide_scale"], (sc.guide, sc.guide_scale), sched.K)
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
        where = {"cfg": "--cfg" if asked["cfg"] is not None else "the checkpoint's sample.cfg",
                 "guide": "--guide" if guide is not None else "the checkpoint's sample.guide"}
        asked_for = {"cfg": f"{where['cfg']} {settings['cfg']}",
                     "guide": f"{where['guide']} {g_spec} (weight {g_scale})"}
        raise ValueError(guided_twice_message(twice, mcfg.fewstep, asked_for))
    if g_spec:
        bundled = exported.own_guide(g_spec, path) if guide is None else None  # guide/ of an export
        settings["guide"] = str(bundled.resolve() if bundled else ckpt_lib.guide_path(g_spec, path, asked["runs_dir"]))
        settings["guide_scale"] = g_scale
    return g_spec, g_scale


def _solver(settings: dict[str, Any], mcfg) -> bool:
    """Check --solver; a few-step model at trained step counts samples in shortcut mode (returns True)."""
    if settings["solver"] not in ("euler", "heun", "sde"):
        raise ValueError(f"--solver: {settings['solver']!r} is not one of euler, heun, sde")
    few = shortcut_mode(mcfg.model.step_cond, mcfg.fewstep.levels, settings["steps"])
    if few:
        settings["solver"] = "shortcut"  # Euler steps of size 1/steps, the net told the size
    return few


def _speed(
    sc, dev: torch.device, batch: int | None, bf16: bool | None, cuda_graph_side: int | None
) -> tuple[int, bool, int]:
    """(batch, bf16, CUDA-graph side): options that change speed, never the images' seeds."""
    batch = int(batch or sc.batch)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    use_bf16 = dev.type == "cuda" if bf16 is None else bool(bf16 and dev.type == "cuda")
    graph_side = int(sc.cuda_graph_side if cuda_graph_side is None else cuda_graph_side)
    if graph_side < 0:
        raise ValueError(f"--cuda-graph-side must be >= 0 (0 = off), got {graph_side}")
    return batch, use_bf16, graph_side if dev.type == "cuda" else 0
