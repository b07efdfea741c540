"""train(cfg, run_dir): one loop from a 2-core CPU to many GPUs under torchrun, resumable to the step.

Each step: mixed-stage batches from the data loader (every sample its own t and stage), the
flow loss of eq. 13 (cdc.flow.matching.loss) through the packed DiT, bf16 autocast on CUDA, gradient
accumulation, clipping, AdamW, EMA. Non-finite losses/gradients skip the step (all ranks agree);
too many in a row stop the run with a checkpoint of the last good state. SIGTERM/SIGINT save a
checkpoint at the next check. The step never waits for the device: the skip is decided on the
device (fused AdamW's found_inf, a masked EMA), statistics accumulate there, and the host reads
them only at log steps and every `train.check_every` steps (stop flags, skipped-step count). Everything needed to continue bit-for-bit on CPU (model,
EMA, optimizer, step, every rank's RNG and data position) goes into each checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cdc.config import Config, ConfigError, dump, for_world
from cdc.flow.matching import loss
from cdc.flow.shortcut import shortcut_loss
from cdc.nn.compiled_trunk import why_not_compiled
from cdc.nn.model import build_model, count_params, forward_flops
from cdc.train import checkpoint as ckpt
from cdc.train import distributed as D
from cdc.train.loggers import GRID, Loggers, check_backends, open_loggers
from cdc.train.parts import Parts, build, open_run_dir, resume, save, save_snapshot, unwrap, wrap_for_training
from cdc.train.run_files import log_window, save_grid
from cdc.train.run_lock import RunLock


class NonFiniteError(RuntimeError):
    """Raised when max_nonfinite consecutive steps had a non-finite loss or gradient."""


def lr_at(step: int, cfg: Config) -> float:
    t = cfg.train
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        span = max(t.steps - t.warmup_steps, 1)
        p = min(max(step - t.warmup_steps, 0) / span, 1.0)
        return t.lr_min + 0.5 * (t.lr - t.lr_min) * (1 + math.cos(math.pi * p))
    return t.lr


@torch.no_grad()
def ema_decay_at(step: int, cfg: Config) -> float:
    """The EMA decay d applied after optimizer step `step` (1, 2, ...)."""
    t = cfg.train
    if t.ema_gamma > 0:  # EDM2's power-function EMA: weights ~ (step taken)^gamma, no fixed decay
        return (1 - 1 / (step + 1)) ** (t.ema_gamma + 1)
    d = t.ema_decay
    if t.ema_warmup:  # short runs: the EMA must not be dominated by the random init
        d = min(d, (1 + step) / (10 + step))
    return d


def ema_update(
    ema: torch.nn.Module, model: torch.nn.Module, step: int, cfg: Config, keep: torch.Tensor | None = None
) -> None:
    """EMA <- EMA + (1 - d) (model - EMA); `keep` (0-dim bool on the device) False leaves it as is."""
    d = ema_decay_at(step, cfg)
    w: float | torch.Tensor = 1 - d
    if keep is not None:  # decided on the device: no host round trip
        w = torch.where(keep, 1 - d, 0.0).to(next(ema.parameters()).dtype)
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach().float(), w)


def describe(cfg: Config, world: int | None = None) -> dict[str, Any]:
    """Resolved config (grad_accum for `world` ranks, default $WORLD_SIZE or 1) and parameter count
    without allocating weights (for --dry-run)."""
    cfg = for_world(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
    with torch.device("meta"):
        n = count_params(build_model(cfg))
    from cdc.redact import redact

    return {"config": redact(dump(cfg)), "params": n}  # printed: no credentials from a shard URL


class _Stop:
    """SIGTERM/SIGINT set a flag (and `signum`); the loop saves and exits at the next check."""

    def __init__(self):
        self.flag = False
        self.signum = 0
        self.old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        self.flag, self.signum = True, signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


def train(
    cfg: Config, run_dir: str | Path, progress: bool = True, evaluation: Callable[[Config, D.Dist], Any] | None = None
) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns a summary of the last logged metrics and how
    the run ended, the same on every rank: `status` "done", "time_limit" (train.max_minutes) or
    "interrupted" (`signal` SIGINT / SIGTERM; `stopped` True), `step` of `steps`, `minutes` trained
    by this process, the `checkpoint` saved last. Another run holding `run_dir` refuses it
    (cdc.train.run_lock.RunDirBusy, a ValueError).

    With train.eval_every, `evaluation(cfg, dist)` builds what samples and scores the EMA while
    training (`cdc train` passes cdc.tune.evaluate.TrainingEvaluation; sampling and scoring sit in
    parts above this one); its `at(parts, step)` returns the metrics record."""
    if cfg.train.eval_every and evaluation is None:
        raise ConfigError(
            "train.eval_every: this caller gives no evaluation; run `cdc train`, pass "
            "evaluation=cdc.tune.evaluate.TrainingEvaluation to cdc.train.loop.train, or set train.eval_every: 0"
        )
    own_pg = not D.initialized()  # a group this call creates is destroyed by it, however it ends
    try:
        with RunLock() as lock:  # rank 0 holds the run dir's lock from open_run_dir to the run's end
            return _train(cfg, Path(run_dir), progress, lock, evaluation)
    finally:
        if own_pg:  # a gloo group left to the interpreter's exit can abort it (SIGABRT, exit -6)
            D.shutdown()


def _train(cfg: Config, run_dir: Path, progress: bool, lock: RunLock, evaluation: Any) -> dict[str, Any]:
    dist = D.init()
    cfg = for_world(cfg, dist.world)  # grad_accum from train.global_batch, recorded in config.yaml
    if cfg.train.compile is True and (why := why_not_compiled(dist.device)):
        raise ConfigError(f"train.compile: {why}; fix that, or set train.compile: auto (eager where it cannot) or false")
    check_backends(cfg.train.log)  # a missing TensorBoard / W&B package: refused before any work
    p = build(cfg, run_dir, dist, open_run_dir(cfg, run_dir, dist, lock))  # init checked before anything is written
    step, nonfinite_total = resume(p)
    wrap_for_training(p)  # after the resume: compiled, DDP-wrapped, with its autocast
    with open_loggers(cfg, run_dir, dist.main, step) as log:  # train.log's backends, closed however it ends
        r = _start(p, step, nonfinite_total, progress, log)
        if cfg.train.eval_every:  # a reference that does not load stops the run before any step
            r.evaluation = evaluation(p.cfg, p.dist)
        with _Stop() as stop, r.bar if r.bar is not None else contextlib.nullcontext():  # bar ends before errors print
            while r.step < cfg.train.steps:
                _step(p, r)
                if _is_check_step(p, r, stop) and _check(p, r, stop):
                    break
        _finish(p, r)
    return _summary(p, r)


@dataclass
class _Progress:
    """Where the loop stands between steps, and (after the last check) how it ended."""

    step: int  # provisional between checks: the next check takes back the skipped steps
    nonfinite_total: int  # skipped steps over the whole run, as of the last check
    it: Iterator[Any]  # this rank's batches
    bar: Any  # tqdm on rank 0 with `progress`, else None
    log: Loggers  # TensorBoard / W&B (train.log); no backends off rank 0
    flops_side: dict[int, float]  # training FLOPs (fwd + bwd) per sample of each side
    acc: torch.Tensor  # device-side window: [loss, grad norm, good steps, stage MSE sums (K), counts (K)]
    nf: torch.Tensor  # [consecutive skips, total skips, skips since the last check], also on the device
    done: int  # the last step whose logging / checkpointing / sampling has run
    t_start: float  # perf_counter at the loop's start (train.max_minutes, `minutes`)
    t_win: float  # perf_counter at the logging window's start
    win: dict[str, Any] = field(default_factory=lambda: {"flops": 0.0, "images": 0})  # host-side window
    lr: float = 0.0  # the last step's learning rate
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics line
    signum: int = 0  # how the loop ended, agreed by all ranks: the signal, or 0
    timed_out: float = 0.0  # ranks over train.max_minutes at the last check
    elapsed_min: float = 0.0  # loop minutes at the last check
    snapped: int = -1  # the last step whose post-hoc EMA snapshot was written
    evaluation: Any = None  # train.eval_every's sampling and scoring (train()'s `evaluation`); None when off

    def stopped_early(self, steps: int) -> str | None:
        """The signal's name, "time_limit" when the time cap ended it before `steps`, else None."""
        if self.signum:
            return signal.Signals(self.signum).name
        return "time_limit" if self.timed_out and self.step < steps else None


def _start(p: Parts, step: int, nonfinite_total: int, progress: bool, log: Loggers) -> _Progress:
    """The loop's state at `step` (after a resume), the device's peak-memory counter reset."""
    t, dev, K = p.cfg.train, p.dev, len(p.cfg.flow.sides)
    flops_side = {s: 3 * forward_flops(p.cfg, s) for s in p.cfg.flow.sides}
    it = iter(p.loader)
    bar = None
    if progress and p.dist.main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    acc = torch.zeros(3 + 2 * K, dtype=torch.float64, device=dev)
    nf = torch.tensor([0.0, float(nonfinite_total), 0.0], dtype=torch.float64, device=dev)
    now = time.perf_counter()
    r = _Progress(step, nonfinite_total, it, bar, log, flops_side, acc, nf, done=step, t_start=now, t_win=now)
    if p.cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    return r


def _step(p: Parts, r: _Progress) -> None:
    """One optimizer step over train.grad_accum micro-batches, its statistics added to the window."""
    r.lr = lr_at(r.step, p.cfg)
    for g in p.opt.param_groups:
        g["lr"] = r.lr * g.get("lr_scale", 1.0)  # train.init_trunk_lr's trunk group (init_from.param_groups)
    step_loss, stage_sum, stage_n = _forward_backward(p, r)
    keep, gn = _update(p, step_loss)
    r.step += 1  # provisional: the next check takes back the skipped steps
    ema_update(p.ema, unwrap(p.model), r.step, p.cfg, keep)
    if p.phema is not None:
        p.phema.update(unwrap(p.model), r.step, keep)
    _add_to_window(r, keep, step_loss, gn, stage_sum, stage_n)
    if r.bar is not None:
        r.bar.update(1)


def _forward_backward(p: Parts, r: _Progress) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Accumulate the gradients of train.grad_accum micro-batches (DDP syncs on the last one);
    returns the step's mean loss and per-stage MSE sums (on the device) and sample counts."""
    t, K = p.cfg.train, len(p.cfg.flow.sides)
    step_loss = torch.zeros((), device=p.dev)
    stage_sum = torch.zeros(K, dtype=torch.float64, device=p.dev)
    stage_n = [0] * K
    for micro in range(t.grad_accum):
        batch = next(r.it).to(p.dev)
        sync = micro == t.grad_accum - 1 or p.dist.world == 1
        ctx = p.net.no_sync() if isinstance(p.net, DDP) and not sync else contextlib.nullcontext()
        with ctx, p.amp:
            out = _loss(p, batch)
        (out.loss / t.grad_accum).backward()
        step_loss += out.loss.detach() / t.grad_accum
        for k, (s_k, n_k) in out.per_stage.items():
            stage_sum[k] += s_k.double()
            stage_n[k] += n_k
        r.win["flops"] += sum(r.flops_side[p.cfg.flow.sides[k]] * len(y) for k, y in zip(batch.stage, batch.y))
        r.win["images"] += batch.size
    return step_loss, stage_sum, stage_n


def _loss(p: Parts, batch: Any) -> Any:
    """One micro-batch's objective: the flow loss, plus shortcut self-consistency for few-step models."""
    cfg, t, null = p.cfg, p.cfg.train, p.cfg.model.num_classes
    if cfg.model.step_cond:
        fs = cfg.fewstep
        return shortcut_loss(
            p.net, batch, p.sched, p.interp, p.gen, cfg.flow.loss_weight, null,
            t.label_dropout, fs.fraction, fs.levels, p.anchor,
        )
    return loss(p.velocity, batch, p.sched, p.interp, p.gen, cfg.flow.loss_weight, null, t.label_dropout)


def _update(p: Parts, step_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip and apply the gradients, or skip the step where any rank's loss or gradient is not
    finite (decided on the device); returns (`keep`, the gradient norm)."""
    t = p.cfg.train
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    gn = torch.nn.utils.clip_grad_norm_(p.model.parameters(), clip)
    bad = (~(torch.isfinite(step_loss) & torch.isfinite(gn))).float().reshape(1)
    keep = D.all_reduce_sum(bad)[0] == 0  # every rank skips together; no host read
    p.opt.grad_scale, p.opt.found_inf = None, (~keep).float()  # AdamW skips when found_inf = 1
    p.opt.step()
    del p.opt.grad_scale, p.opt.found_inf
    p.opt.zero_grad(set_to_none=True)
    return keep, gn


def _add_to_window(r: _Progress, keep: torch.Tensor, step_loss: torch.Tensor, gn: torch.Tensor,
                   stage_sum: torch.Tensor, stage_n: list[int]) -> None:
    """Add a kept step to the device-side window and count a skipped one, without a host read."""
    K = len(stage_n)
    zero = torch.zeros((), dtype=torch.float64, device=r.acc.device)
    r.acc[0] += torch.where(keep, step_loss.double(), zero)
    r.acc[1] += torch.where(keep, gn.double(), zero)
    r.acc[2] += keep.double()
    r.acc[3 : 3 + K] += torch.where(keep, stage_sum, zero)
    for k in range(K):
        if stage_n[k]:
            r.acc[3 + K + k] += keep.double() * stage_n[k]
    r.nf[0] = (r.nf[0] + 1) * (~keep).double()
    r.nf[1:] += (~keep).double()


def _is_check_step(p: Parts, r: _Progress, stop: _Stop) -> bool:
    """Whether the host looks at the device counters after this step (the same on every rank)."""
    t, step = p.cfg.train, r.step
    return bool(
        step >= t.steps
        or step % t.log_every == 0
        or step % t.check_every == 0
        or (t.ckpt_every and step % t.ckpt_every == 0)
        or (t.sample_every and step % t.sample_every == 0)
        or (t.ema_snapshots and step % t.ema_snapshots == 0)
        or (t.eval_every and step % t.eval_every == 0)
        or (p.dist.world == 1 and stop.flag)  # ranks must agree on when they all-reduce
    )


def _check(p: Parts, r: _Progress, stop: _Stop) -> bool:
    """Read the counters and stop flags, stop on too many non-finite steps, log / sample / save
    what this step is due; returns True when the loop ends here."""
    t = p.cfg.train
    consecutive, signalled = _read_counters(p, r, stop)
    if consecutive >= t.max_nonfinite:
        _snapshot(p, r, background=False)
        save(p, r.step, r.nonfinite_total, "nonfinite")
        raise NonFiniteError(
            f"{int(consecutive)} consecutive non-finite steps at step {r.step}; saved the "
            f"last good state in {p.run_dir}/checkpoints (lower train.lr or check data)"
        )
    finish = r.step >= t.steps or r.timed_out > 0
    if r.step > r.done:
        r.done = r.step
        _log_sample_save(p, r, last=finish or signalled)
    if signalled:
        _snapshot(p, r, background=False)
        save(p, r.step, r.nonfinite_total, "signal")  # the caller reports it (the CLI: one line, exit 128 + signal)
        return True
    return finish


def _read_counters(p: Parts, r: _Progress, stop: _Stop) -> tuple[float, bool]:
    """The check's one host read: skip counters and stop flags, all-reduced so every rank takes the
    same decision; takes back the skipped steps. Returns (consecutive skips, signalled)."""
    t = p.cfg.train
    r.elapsed_min = (time.perf_counter() - r.t_start) / 60
    over = t.max_minutes > 0 and r.elapsed_min >= t.max_minutes
    got = stop.signum  # read once: the handler may run between the two comparisons
    flags = [float(got == signal.SIGINT), float(got == signal.SIGTERM), float(over)]
    flags = D.all_reduce_sum(torch.tensor(flags, device=p.dev))
    consecutive, nonfinite, skipped, n_int, n_term, r.timed_out = torch.cat([r.nf, flags.double()]).tolist()
    # every rank takes the same signal (SIGINT if any rank got one), so all exit alike
    r.signum = signal.SIGINT if n_int else signal.SIGTERM if n_term else 0
    r.nf[2] = 0.0
    r.step -= int(skipped)
    r.nonfinite_total = int(nonfinite)
    if r.bar is not None and skipped:
        r.bar.n = r.step
    return consecutive, n_int + n_term > 0


def _log_sample_save(p: Parts, r: _Progress, last: bool) -> None:
    """What a new step is due: a metrics line (always on the `last` one), an EMA preview grid, a
    periodic checkpoint (not on the last one: the loop's end saves it)."""
    t = p.cfg.train
    scores = _evaluate(p, r) if t.eval_every and r.step % t.eval_every == 0 else None
    if r.step % t.log_every == 0 or last or scores:
        _log(p, r, scores)
    if t.sample_every and r.step % t.sample_every == 0 and p.dist.main:
        grid = save_grid(p.ema, p.cfg, p.run_dir / "samples" / f"step_{r.step:07d}.png", p.dev)
        r.log.log_image(r.step, GRID, grid)
    if t.ema_snapshots and r.step % t.ema_snapshots == 0:
        _snapshot(p, r, background=t.async_save and not last)
    if t.ckpt_every and r.step % t.ckpt_every == 0 and not last:
        save(p, r.step, r.nonfinite_total, "periodic")


def _snapshot(p: Parts, r: _Progress, background: bool) -> None:
    """The post-hoc EMA snapshot of this step, once; the run's last one is waited for."""
    if p.phema is not None and r.snapped != r.step:
        save_snapshot(p, r.step, background)
        r.snapped = r.step


def _evaluate(p: Parts, r: _Progress) -> dict[str, Any]:
    """Sample and score on every rank, the time it took left out of the logging window's."""
    assert r.evaluation is not None
    scores = r.evaluation.at(p, r.step)
    r.t_win += scores["seconds"]
    return scores


def _log(p: Parts, r: _Progress, scores: dict[str, Any] | None = None) -> None:
    """Append the window's metrics line (an early stop and an evaluation's `scores` are recorded
    on it) and start a new window."""
    t = p.cfg.train
    why = r.stopped_early(t.steps)
    extra = {"stop": why, "minutes": r.elapsed_min, "steps": t.steps} if why else None
    if scores is not None:
        extra = {**(extra or {}), "eval": scores}
    if p.cfg.data.skip_bad:  # samples or shard rests the loaders dropped so far, all ranks together
        dropped = D.all_reduce_sum(torch.tensor([float(p.loader.skipped)], device=p.dev))
        extra = {**(extra or {}), "data_skipped": int(dropped.item())}
    r.last = log_window(
        p.run_dir, p.dist, r.acc, r.win, r.step, r.lr, r.t_win, p.cfg, p.cuda, p.dev, r.nonfinite_total, extra
    )
    r.log.log_metrics(r.last)  # the same line's values to TensorBoard / W&B (rank 0)
    if r.bar is not None:
        r.bar.set_postfix(loss=f"{r.last['loss']:.4f}", img_s=f"{r.last['images_per_s']:.0f}")
    r.acc.zero_()
    r.win = {"flops": 0.0, "images": 0}
    r.t_win = time.perf_counter()


def _status(p: Parts, r: _Progress) -> str:
    return "interrupted" if r.signum else "time_limit" if r.timed_out and r.step < p.cfg.train.steps else "done"


def _finish(p: Parts, r: _Progress) -> None:
    """Save the final checkpoint and preview grid (a signal's were saved at the check)."""
    if not r.signum:  # the agreed signal, not this rank's flag: every rank must take part in save()
        _snapshot(p, r, background=False)
        save(p, r.step, r.nonfinite_total, "time_limit" if _status(p, r) == "time_limit" else "end")
        if p.dist.main and p.cfg.train.sample_every:
            grid = save_grid(p.ema, p.cfg, p.run_dir / "samples" / f"step_{r.step:07d}.png", p.dev)
            r.log.log_image(r.step, GRID, grid)
    if r.bar is not None:
        r.bar.close()
    D.barrier()


def _summary(p: Parts, r: _Progress) -> dict[str, Any]:
    return {
        "run_dir": str(p.run_dir),
        **r.last,
        "step": r.step,
        "steps": p.cfg.train.steps,
        "status": _status(p, r),
        "signal": signal.Signals(r.signum).name if r.signum else None,
        "stopped": bool(r.signum),
        "minutes": r.elapsed_min,
        "checkpoint": str(p.run_dir / "checkpoints" / ckpt.ckpt_name(r.step)),
        "rank": p.dist.rank,
    }
