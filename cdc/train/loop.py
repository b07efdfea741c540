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
import copy
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cdc.config import Config, ConfigError, dump, for_world, to_dict
from cdc.flow.matching import Interpolant, Schedule, loss, velocity_net_from_config
from cdc.flow.shortcut import shortcut_loss
from cdc.nn.compiled_trunk import compile_for_training, why_not_compiled
from cdc.nn.model import build_model, count_params, forward_flops
from cdc.train import checkpoint as ckpt
from cdc.train import distributed as D
from cdc.train.init_from import resolve_init, start_from_init
from cdc.train.run_files import check_compatible, log_window, resume_other_world, save_grid, truncate_metrics


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


def _unwrap(m: torch.nn.Module) -> torch.nn.Module:
    m = m.module if isinstance(m, DDP) else m
    return getattr(m, "_orig_mod", m)


def describe(cfg: Config, world: int | None = None) -> dict[str, Any]:
    """Resolved config (grad_accum for `world` ranks, default $WORLD_SIZE or 1) and parameter count
    without allocating weights (for --dry-run)."""
    cfg = for_world(cfg, world or int(os.environ.get("WORLD_SIZE", "1")))
    with torch.device("meta"):
        n = count_params(build_model(cfg))
    return {"config": dump(cfg), "params": n}


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


def _say(msg: str) -> None:
    print(msg, flush=True)


def train(cfg: Config, run_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns a summary of the last logged metrics and how
    the run ended, the same on every rank: `status` "done", "time_limit" (train.max_minutes) or
    "interrupted" (`signal` SIGINT / SIGTERM; `stopped` True), `step` of `steps`, `minutes` trained
    by this process, the `checkpoint` saved last."""
    from cdc.data.loader import make_loader

    dist = D.init()
    cfg = for_world(cfg, dist.world)  # grad_accum from train.global_batch, recorded in config.yaml
    run_dir = Path(run_dir)
    t = cfg.train
    if t.compile is True and (why := why_not_compiled(dist.device)):
        raise ConfigError(f"train.compile: {why}; fix that, or set train.compile: auto (eager where it cannot) or false")
    init = resolve_init(cfg, run_dir)  # loaded and checked before anything is written
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        check_compatible(run_dir, cfg)
        ckpt.atomic_write_bytes(run_dir / "config.yaml", dump(cfg).encode())
    D.barrier()
    dev = dist.device
    cuda = dev.type == "cuda"
    if cuda and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)  # identical init on every rank
    model = build_model(cfg).to(dev)
    model.grad_checkpointing = t.grad_checkpointing
    # few-step fine-tune: init weights (a resume below overwrites them) and the frozen teacher's
    # guided d = 0 field as anchor; None without train.init
    anchor = start_from_init(model, cfg, dev, init) if t.init else None
    del init  # the init weights now live in the model (and teacher): no second copy in RAM
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    # fused AdamW (CUDA and CPU) takes a device-side found_inf flag: a non-finite step is skipped
    # without the host ever reading the flag
    opt_kwargs = {"fused": True}
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=t.lr,
        betas=tuple(t.betas),
        eps=t.eps,
        weight_decay=t.weight_decay,
        **opt_kwargs,
    )
    gen = torch.Generator(dev).manual_seed(t.seed * 100_003 + dist.rank)  # noise and label dropout
    # told its device, the loader pins host memory on CUDA so the copies are truly asynchronous
    loader = make_loader(cfg, rank=dist.rank, world_size=dist.world, seed=t.seed, device=dev)
    sched, interp = Schedule.from_config(cfg.flow), Interpolant(cfg.flow.interpolant)
    null = cfg.model.num_classes

    step, nonfinite_total = 0, 0
    found = ckpt.load_latest(run_dir / "checkpoints", need=ckpt.RESUME_KEYS)
    if found is None and ckpt.list_checkpoints(run_dir / "checkpoints"):
        # starting over here would let pruning delete the new checkpoints in favour of the bad ones
        raise ValueError(
            f"{run_dir}/checkpoints holds checkpoints but none verifies and loads; restore one, "
            "or move them away to start a fresh run"
        )
    if found is not None:
        state, path = found
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        nonfinite_total = int(state.get("nonfinite_total", 0))
        ranks = state.get("ranks", [])
        if len(ranks) != dist.world:
            resume_other_world(state, cfg, dist, loader, gen, step)
        else:
            r = ranks[dist.rank]
            gen.set_state(r["gen"])
            torch.set_rng_state(r["torch_cpu"])
            loader.load_state_dict(r["data"])
        del state
        if dist.main:
            truncate_metrics(run_dir, step)
            for bad in ckpt.set_aside_newer(run_dir / "checkpoints", step):
                _say(f"moved the corrupt newer checkpoint aside: {bad}")
            _say(f"resumed from {path} at step {step}")

    net = model
    # the packed trunk only: one graph for every stage mix (cdc.nn.compiled_trunk)
    compile_for_training(model, t.compile, list(cfg.flow.sides), t.batch_size, dev, log=_say if dist.main else lambda m: None)
    if dist.world > 1:
        # stage-specific DiTs: a step's batch may hold no sample of some stage
        net = DDP(
            net, device_ids=[dev.index] if cuda else None, find_unused_parameters=cfg.model.stage_models
        )
    field = velocity_net_from_config(net, cfg.flow)
    amp = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda and t.precision == "bf16"
        else contextlib.nullcontext()
    )

    def save(step_: int, reason: str) -> None:
        per_rank = {
            "gen": gen.get_state(),
            "torch_cpu": torch.get_rng_state(),
            "data": loader.state_dict(),
            # lets anyone check that DDP ranks hold identical weights
            "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters())),
        }
        ranks = D.all_gather_objects(per_rank)
        if dist.main:
            state = {
                "model": _unwrap(model).state_dict(),
                "ema": ema.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step_,
                "config": to_dict(cfg),
                "ranks": ranks,
                "nonfinite_total": nonfinite_total,
                "reason": reason,
            }
            ckpt.save(run_dir / "checkpoints" / ckpt.ckpt_name(step_), state)
            ckpt.prune(run_dir / "checkpoints", t.keep_last, t.milestone_every)
        D.barrier()

    flops_side = {s: 3 * forward_flops(cfg, s) for s in cfg.flow.sides}  # fwd + bwd per sample
    it = iter(loader)
    bar = None
    if progress and dist.main:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    K = len(cfg.flow.sides)
    # window statistics on the device: [loss, grad norm, good steps, stage MSE sums (K), counts (K)]
    acc = torch.zeros(3 + 2 * K, dtype=torch.float64, device=dev)
    # [consecutive skips, total skips, skips since the last check], also on the device
    nf = torch.tensor([0.0, float(nonfinite_total), 0.0], dtype=torch.float64, device=dev)
    win = {"flops": 0.0, "images": 0}
    t_start = t_win = time.perf_counter()
    last: dict[str, Any] = {}
    done = step  # the last step whose logging / checkpointing / sampling has run
    signum, timed_out, elapsed_min = 0, 0.0, 0.0  # how the loop ended, agreed by all ranks
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    with _Stop() as stop, bar if bar is not None else contextlib.nullcontext():  # bar ends before errors print
        while step < t.steps:
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=dev)
            stage_sum = torch.zeros(K, dtype=torch.float64, device=dev)
            stage_n = [0] * K
            for micro in range(t.grad_accum):
                batch = next(it).to(dev)
                sync = micro == t.grad_accum - 1 or dist.world == 1
                ctx = net.no_sync() if isinstance(net, DDP) and not sync else contextlib.nullcontext()
                with ctx, amp:
                    if cfg.model.step_cond:  # few-step: flow matching + shortcut self-consistency
                        fs = cfg.fewstep
                        out = shortcut_loss(
                            net, batch, sched, interp, gen, cfg.flow.loss_weight, null,
                            t.label_dropout, fs.fraction, fs.levels, anchor,
                        )
                    else:
                        out = loss(field, batch, sched, interp, gen, cfg.flow.loss_weight, null, t.label_dropout)
                (out.loss / t.grad_accum).backward()
                step_loss += out.loss.detach() / t.grad_accum
                for k, (s_k, n_k) in out.per_stage.items():
                    stage_sum[k] += s_k.double()
                    stage_n[k] += n_k
                win["flops"] += sum(
                    flops_side[cfg.flow.sides[k]] * len(y) for k, y in zip(batch.stage, batch.y)
                )
                win["images"] += batch.size
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            bad = (~(torch.isfinite(step_loss) & torch.isfinite(gn))).float().reshape(1)
            keep = D.all_reduce_sum(bad)[0] == 0  # every rank skips together; no host read
            opt.grad_scale, opt.found_inf = None, (~keep).float()  # AdamW skips when found_inf = 1
            opt.step()
            del opt.grad_scale, opt.found_inf
            opt.zero_grad(set_to_none=True)
            step += 1  # provisional: the next check takes back the skipped steps
            ema_update(ema, _unwrap(model), step, cfg, keep)
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            acc[0] += torch.where(keep, step_loss.double(), zero)
            acc[1] += torch.where(keep, gn.double(), zero)
            acc[2] += keep.double()
            acc[3 : 3 + K] += torch.where(keep, stage_sum, zero)
            for k in range(K):
                if stage_n[k]:
                    acc[3 + K + k] += keep.double() * stage_n[k]
            nf[0] = (nf[0] + 1) * (~keep).double()
            nf[1:] += (~keep).double()
            if bar is not None:
                bar.update(1)
            event = (
                step >= t.steps
                or step % t.log_every == 0
                or step % t.check_every == 0
                or (t.ckpt_every and step % t.ckpt_every == 0)
                or (t.sample_every and step % t.sample_every == 0)
                or (dist.world == 1 and stop.flag)  # ranks must agree on when they all-reduce
            )
            if not event:
                continue
            # the check: one host read of skip counters and (all-reduced) stop flags
            elapsed_min = (time.perf_counter() - t_start) / 60
            over = t.max_minutes > 0 and elapsed_min >= t.max_minutes
            got = stop.signum  # read once: the handler may run between the two comparisons
            flags = [float(got == signal.SIGINT), float(got == signal.SIGTERM), float(over)]
            flags = D.all_reduce_sum(torch.tensor(flags, device=dev))
            consecutive, nonfinite, skipped, n_int, n_term, timed_out = torch.cat([nf, flags.double()]).tolist()
            signalled = n_int + n_term
            # every rank takes the same signal (SIGINT if any rank got one), so all exit alike
            signum = signal.SIGINT if n_int else signal.SIGTERM if n_term else 0
            nf[2] = 0.0
            step -= int(skipped)
            nonfinite_total = int(nonfinite)
            if bar is not None and skipped:
                bar.n = step
            if consecutive >= t.max_nonfinite:
                save(step, "nonfinite")
                raise NonFiniteError(
                    f"{int(consecutive)} consecutive non-finite steps at step {step}; saved the "
                    f"last good state in {run_dir}/checkpoints (lower train.lr or check data)"
                )
            finish = step >= t.steps or timed_out > 0
            if step > done:
                done = step
                if step % t.log_every == 0 or finish or signalled > 0:
                    # an early stop is recorded on the run's last metrics line
                    why = signal.Signals(signum).name if signum else "time_limit" if timed_out and step < t.steps else None
                    extra = {"stop": why, "minutes": elapsed_min, "steps": t.steps} if why else None
                    last = log_window(
                        run_dir, dist, acc, win, step, lr, t_win, cfg, cuda, dev, nonfinite_total, extra
                    )
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['images_per_s']:.0f}")
                    acc.zero_()
                    win = {"flops": 0.0, "images": 0}
                    t_win = time.perf_counter()
                if t.sample_every and step % t.sample_every == 0 and dist.main:
                    save_grid(ema, cfg, run_dir / "samples" / f"step_{step:07d}.png", dev)
                if t.ckpt_every and step % t.ckpt_every == 0 and not (finish or signalled > 0):
                    save(step, "periodic")
            if signalled > 0:
                save(step, "signal")  # the caller reports it (the CLI: one line, exit 128 + signal)
                break
            if finish:
                break
    status = "interrupted" if signum else "time_limit" if timed_out and step < t.steps else "done"
    if not signum:  # the agreed signal, not this rank's flag: every rank must take part in save()
        save(step, "time_limit" if status == "time_limit" else "end")
        if dist.main and t.sample_every:
            save_grid(ema, cfg, run_dir / "samples" / f"step_{step:07d}.png", dev)
    if bar is not None:
        bar.close()
    D.barrier()
    return {
        "run_dir": str(run_dir),
        **last,
        "step": step,
        "steps": t.steps,
        "status": status,
        "signal": signal.Signals(signum).name if signum else None,
        "stopped": bool(signum),
        "minutes": elapsed_min,
        "checkpoint": str(run_dir / "checkpoints" / ckpt.ckpt_name(step)),
        "rank": dist.rank,
    }
