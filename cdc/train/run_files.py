"""What a training run reads and writes beside its loop: the run dir's config check, resuming
on another rank count, metrics.jsonl lines and the EMA preview grids."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdc.config import Config, ConfigError, from_dict, to_dict
from cdc.flow.matching import Schedule, velocity_net_from_config
from cdc.flow.shortcut import shortcut_mode
from cdc.redact import redact_obj
from cdc.train import checkpoint as ckpt
from cdc.train import distributed as D


def check_compatible(run_dir: Path, cfg: Config) -> None:
    """A run dir keeps its model and flow: resuming with a different network is an error."""
    f = run_dir / "config.yaml"
    if not f.is_file():
        return
    from cdc.fileio import bad_file, read_yaml

    expected = "a cdc run config (restore it or use a new --run-dir)"
    raw = read_yaml(f, expected)
    if not isinstance(raw, dict):
        raise bad_file(f, expected, f"holds a {type(raw).__name__}, not a mapping")
    try:
        old = from_dict(raw)
    except ConfigError as e:
        raise bad_file(f, expected, e) from None
    for sec in ("model", "flow"):
        if to_dict(old)[sec] != to_dict(cfg)[sec]:
            diff = [k for k, v in to_dict(cfg)[sec].items() if to_dict(old)[sec].get(k) != v]
            raise ConfigError(
                f"{run_dir} was trained with different {sec} settings ({', '.join(diff)}); "
                f"use a new --run-dir or the original recipe"
            )


def resume_other_world(
    state: dict, cfg: Config, dist: D.Dist, loader: Any, gen: torch.Generator, step: int
) -> None:
    """Resume a checkpoint written by another number of ranks: the same data stream, fresh noise.

    The data plan is global (cdc.data.plan): every rank continues from the common stream position
    and takes every R-th sample, so no sample is repeated or dropped. Noise streams are per rank;
    they are reseeded from (seed, rank, step) so they do not replay step 0's noise. With
    train.global_batch set, every optimizer step sees the samples it would have seen.
    """
    ranks, t = state.get("ranks", []), cfg.train
    data = merged_data_state([r["data"] for r in ranks], dist.rank)
    loader.load_state_dict(data)
    seen = int(data.get("position", 0))
    gen.manual_seed(t.seed * 100_003 + dist.rank + 1_000_003 * step)
    torch.manual_seed(t.seed * 100_003 + dist.rank + 1_000_003 * step)
    old = state.get("config", {}).get("train", {})
    old_global = old.get("batch_size", t.batch_size) * old.get("grad_accum", 1) * len(ranks)
    new_global = t.batch_size * t.grad_accum * dist.world
    kept = (
        f"global batch {new_global} kept (grad_accum {old.get('grad_accum', 1)} -> {t.grad_accum})"
        if old_global == new_global
        else f"global batch changes {old_global} -> {new_global} (set train.global_batch to keep it)"
    )
    warnings.warn(
        f"checkpoint was written by {len(ranks)} ranks, resuming on {dist.world}: {kept}; "
        f"data continues at sample {seen} of the same stream",
        stacklevel=3,
    )


def merged_data_state(states: list[dict], rank: int) -> dict:
    """One loader state from every old rank's: the common position, and all ranks' replaced-sample
    counts given to the new rank 0 (metrics sum them over ranks). Older states carry batches alone."""
    first = dict(states[0])
    if "position" not in first:  # cdc < 0.2: per-rank batches; the position they add up to
        first["batches"] = sum(int(s["batches"]) * int(s.get("batch_size", 1)) for s in states)
        first["batch_size"], first["world_size"] = 1, 1
    first["skipped"] = sum(int(s.get("skipped", 0)) for s in states) if rank == 0 else 0
    return first


def _log_line(run_dir: Path, line: dict) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(redact_obj(line)) + "\n")  # a warning or path in a line may quote a URL


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl. Lines are appended, so a crash (full disk, power loss) can
    leave the last one torn: that one is dropped with a warning; a bad line elsewhere is an error."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append(json.loads(ln))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: dropping a torn last line ({e.msg})", stacklevel=2)
                break
            raise ValueError(
                f"{path} line {i + 1} is not JSON ({e.msg}); delete that line to resume"
            ) from None
    return out


def _changes(vals: list[Any]) -> Any:
    """One value, or "a→b" where it changed along the run (e.g. resumed on another rank count)."""
    vals = [v for i, v in enumerate(vals) if i == 0 or v != vals[i - 1]]
    return None if not vals else vals[0] if len(vals) == 1 else "→".join(map(str, vals))


def run_budget(lines: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """What a run's metrics lines say it cost, over every stretch it was trained in.

    A resumed run keeps its lines up to the checkpoint and appends the new stretch's, so the lines
    cover the whole run. Each line's window_s is the wall time of the steps it logs (a stretch's
    first window starts when its loop does), so their sum is the time in the training loop over
    all stretches; each stretch's start-up, and steps lost after a crash's last checkpoint, are
    not in it. Lines written before window_s existed give images / images_per_s, images being
    global_batch x the window's steps (exact unless non-finite steps were skipped).
    global_batch (batch_size x grad_accum x processes) and processes are the logged ones, so a
    torchrun run states its real batch.
    """
    secs: float | None = 0.0
    prev = 0
    for x in lines:
        w = x.get("window_s")
        if w is None and x.get("global_batch") and x.get("images_per_s"):
            w = x["global_batch"] * (x["step"] - prev) / x["images_per_s"]
        secs = None if secs is None or w is None else secs + w
        prev = x["step"]
    logged = [x for x in lines if "global_batch" in x]
    return {
        "train_seconds": secs if lines else None,
        "global_batch": _changes([x["global_batch"] for x in logged]),
        "processes": _changes([x["global_batch"] // (batch_size * x.get("grad_accum", 1)) for x in logged]),
    }


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics lines past the checkpoint we resume from (they will be logged again)."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return
    keep = [json.dumps(d) for d in read_metrics(f) if d.get("step", 0) <= step]
    ckpt.atomic_write_bytes(f, ("\n".join(keep) + "\n").encode() if keep else b"")


def log_window(
    run_dir, dist, acc, win, step, lr, t_win, cfg, cuda, dev, nonfinite_total, extra=None
) -> dict[str, Any]:
    """Reduce the logging window over ranks and append one metrics.jsonl line (rank 0).

    acc: the device-side window [loss, grad norm, good steps, stage sums (K), stage counts (K)];
    this is the only place it is read on the host. `extra`: more keys for the line (an early stop).
    """
    K = len(cfg.flow.sides)
    host = torch.tensor([win["flops"], float(win["images"])], dtype=torch.float64, device=dev)
    vec = torch.cat([acc[:3], host, torch.stack([acc[3:3 + K], acc[3 + K:]], 1).flatten()])
    tot = D.all_reduce_sum(vec).tolist()
    dt = max(time.perf_counter() - t_win, 1e-9)
    steps = max(tot[2] / dist.world, 1.0)
    tflops = tot[3] / dt / 1e12
    line = {
        "step": step,
        "loss": tot[0] / dist.world / steps,
        "loss_stage": {
            str(k): (tot[5 + 2 * k] / tot[6 + 2 * k] if tot[6 + 2 * k] else None) for k in range(K)
        },
        "grad_norm": tot[1] / dist.world / steps,
        "lr": lr,
        "images_per_s": tot[4] / dt,
        "window_s": dt,  # this window's wall time; summed over the lines, a resumed run's loop time
        "tflops": tflops,
        "mfu": tflops / (cfg.train.peak_tflops * dist.world) if cuda else None,
        "peak_mem_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
        "nonfinite_total": nonfinite_total,
        "grad_accum": cfg.train.grad_accum,
        "global_batch": cfg.train.batch_size * cfg.train.grad_accum * dist.world,
        "time": time.time(),
        **(extra or {}),
    }
    if dist.main:
        _log_line(run_dir, line)
    return line


@torch.no_grad()
def save_grid(ema: torch.nn.Module, cfg: Config, path: Path, dev: torch.device, per_class: int = 8) -> np.ndarray:
    """A labelled EMA sample grid: one row per class (first 10 classes), fixed seeds; returns the
    PNG's pixels (uint8 HWC) for the logging backends."""
    from PIL import Image
    from torchvision.utils import make_grid

    from cdc.flow.sampler import image_seed, sample

    n_cls = min(cfg.model.num_classes, 10)
    y = torch.arange(n_cls, device=dev).repeat_interleave(per_class)
    s = cfg.sample
    few = shortcut_mode(cfg.model.step_cond, cfg.fewstep.levels, list(s.steps))
    out = sample(
        velocity_net_from_config(ema, cfg.flow),
        Schedule.from_config(cfg.flow),
        y,
        [image_seed(s.seed, i) for i in range(len(y))],
        cfg.model.in_channels,
        steps=s.steps,
        cfg=s.cfg,
        null_class=cfg.model.num_classes,
        solver="euler" if few else s.solver,
        interval=tuple(s.interval),
        sde_eps=s.sde_eps,
        interpolant=cfg.flow.interpolant,
        step_cond=few,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    # torchvision's save_image, with the pixels kept: the same PNG
    grid = make_grid((out.x.float().clamp(-1, 1) + 1) / 2, nrow=per_class, padding=1)
    img = grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    Image.fromarray(img).save(tmp, format="PNG")
    tmp.replace(path)
    return img
