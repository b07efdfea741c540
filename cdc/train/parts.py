"""What a training run trains with: the parts built once per process (model, EMA, optimizer, noise
generator, data loader, flow schedule), restored from the run's latest checkpoint, wrapped for the
devices, and saved into a checkpoint. cdc.train.loop steps them."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from cdc.config import Config, ConfigError, dump, to_dict
from cdc.flow.matching import Interpolant, Schedule, velocity_net_from_config
from cdc.nn.compiled_trunk import compile_for_training
from cdc.nn.model import build_model
from cdc.redact import redact
from cdc.train import checkpoint as ckpt
from cdc.train import distributed as D
from cdc.train import posthoc_ema as PH
from cdc.train import resume_point as RP
from cdc.train.init_from import param_groups, resolve_init, start_from_init
from cdc.train.run_files import check_compatible, resume_other_world, truncate_metrics
from cdc.train.run_lock import RunDirBusy, RunLock


def say(msg: str) -> None:
    print(msg, flush=True)


def unwrap(m: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside DDP and torch.compile wrappers (its state_dict is what checkpoints hold)."""
    m = m.module if isinstance(m, DDP) else m
    return getattr(m, "_orig_mod", m)


@dataclass
class Parts:
    """The objects every training step uses, the same from the first step to the last."""

    cfg: Config  # resolved for this world size (grad_accum)
    run_dir: Path
    dist: D.Dist
    model: torch.nn.Module  # the network being trained (its trunk compiled in place by wrap_for_training)
    ema: torch.nn.Module  # fp32 EMA of the model, never trained directly
    opt: torch.optim.Optimizer
    gen: torch.Generator  # this rank's noise and label dropout
    loader: Any  # this rank's batches (cdc.data.loader), resumable to the batch
    sched: Schedule
    interp: Interpolant
    anchor: Any  # few-step fine-tune: the frozen teacher's guided d = 0 field; None without train.init
    net: Any = None  # the model as a step calls it: DDP-wrapped over ranks (wrap_for_training)
    velocity: Any = None  # the velocity field over `net` (wrap_for_training)
    amp: Any = None  # bf16 autocast on CUDA, else a null context (wrap_for_training)
    saver: RP.Saver = field(default_factory=RP.Saver)  # rank 0's checkpoint writes (train.async_save)
    phema: PH.PowerEMA | None = None  # post-hoc EMA profiles (train.ema_snapshots); None when off
    snap_saver: RP.Saver = field(default_factory=RP.Saver)  # rank 0's snapshot writes, one in flight

    @property
    def dev(self) -> torch.device:
        return self.dist.device

    @property
    def cuda(self) -> bool:
        return self.dev.type == "cuda"


def open_run_dir(cfg: Config, run_dir: Path, dist: D.Dist, lock: RunLock | None = None) -> Any:
    """Load and check train.init before anything is written, then (rank 0) take the run dir's
    `lock` (every rank refuses alike when another run holds it), check the run dir's config against
    this one and record config.yaml; returns the loaded init (None without one)."""
    init = resolve_init(cfg, run_dir)
    from cdc.data.loader import resolve_shards

    resolve_shards(cfg.data.shards)  # missing data or a bad manifest: refused before the run dir exists
    busy = None
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        busy = lock.acquire(run_dir) if lock is not None else None
        if busy is None:  # a refused run writes nothing
            check_compatible(run_dir, cfg)
            # secrets (a token in a shard URL, credential values) never reach the run dir
            ckpt.atomic_write_bytes(run_dir / "config.yaml", redact(dump(cfg)).encode())
    if (busy := D.all_gather_objects(busy)[0]) is not None:  # rank 0's outcome, seen by every rank
        raise RunDirBusy(busy)
    D.barrier()
    return init


def build(cfg: Config, run_dir: Path, dist: D.Dist, init: Any) -> Parts:
    """Fresh parts, the weights seeded identically on every rank (train.init's weights and anchor
    when given); `init` is dropped once the model holds it, so pass it without keeping a name."""
    from cdc.data.loader import make_loader

    t, dev = cfg.train, dist.device
    if dev.type == "cuda" and t.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(t.seed)  # identical init on every rank
    model = build_model(cfg).to(dev)
    model.grad_checkpointing = t.grad_checkpointing
    # few-step fine-tune: init weights (a resume overwrites them) and the frozen teacher's
    # guided d = 0 field as anchor; None without train.init
    anchor = start_from_init(model, cfg, dev, init) if t.init else None
    params = param_groups(model, cfg, init)  # train.init_trunk_lr: the trunk's lr scale, or frozen
    del init  # the init weights now live in the model (and teacher): no second copy in RAM
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    # fused AdamW (CUDA and CPU) takes a device-side found_inf flag: a non-finite step is skipped
    # without the host ever reading the flag
    opt = torch.optim.AdamW(
        params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay, fused=True
    )
    gen = torch.Generator(dev).manual_seed(t.seed * 100_003 + dist.rank)  # noise and label dropout
    # told its device, the loader pins host memory on CUDA so the copies are truly asynchronous
    # shards without a prepared index are indexed once, the result kept in the run dir: a restart
    # reads no shard bytes before its resume point
    loader = make_loader(
        cfg, rank=dist.rank, world_size=dist.world, seed=t.seed, device=dev, cache_dir=run_dir / "data-index"
    )
    p = Parts(
        cfg, run_dir, dist, model, ema, opt, gen, loader,
        Schedule.from_config(cfg.flow), Interpolant(cfg.flow.interpolant), anchor,
    )
    p.phema = PH.PowerEMA(model, t.ema_sigma_rels) if t.ema_snapshots else None
    return p


def resume(p: Parts) -> tuple[int, int]:
    """Load the checkpoint rank 0 chooses (the newest that verifies) into every rank's parts
    (weights, EMA, optimizer, this rank's RNG and data position) and check that the ranks agree;
    returns (step, nonfinite_total), (0, 0) for a fresh run."""
    ckpt_dir, dist = p.run_dir / "checkpoints", p.dist
    state, path = RP.choose(ckpt_dir, dist.main)
    if path is None:
        if dist.main and p.phema is not None and (old := PH.remove_newer(p.run_dir, 0)):
            say(f"removed {len(old)} post-hoc EMA snapshot(s) of an earlier run without checkpoints here")
        return 0, 0
    state = RP.load_chosen(path, state, dist.rank)
    p.model.load_state_dict(state["model"])
    p.ema.load_state_dict(state["ema"])
    p.opt.load_state_dict(state["optimizer"])
    step = int(state["step"])
    _resume_profiles(p, state, path, step)
    nonfinite_total = int(state.get("nonfinite_total", 0))
    ranks = state.get("ranks", [])
    if len(ranks) != dist.world:
        resume_other_world(state, p.cfg, dist, p.loader, p.gen, step)
    else:
        r = ranks[dist.rank]
        p.gen.set_state(r["gen"])
        torch.set_rng_state(r["torch_cpu"])
        p.loader.load_state_dict(r["data"])
    del state
    RP.check_agreement(RP.state_checksum(p.model, p.ema, *_profiles(p), opt=p.opt), path, step)
    if dist.main:
        truncate_metrics(p.run_dir, step)
        PH.remove_newer(p.run_dir, step)  # the resumed run writes them again, bit for bit
        for bad in ckpt.set_aside_newer(ckpt_dir, step):
            say(f"moved the corrupt newer checkpoint aside: {bad}")
        say(f"resumed from {path} at step {step}")
    return step, nonfinite_total


def _profiles(p: Parts) -> list[torch.nn.Module]:
    return p.phema.profiles if p.phema is not None else []


def _resume_profiles(p: Parts, state: dict[str, Any], path: Path, step: int) -> None:
    """The post-hoc EMA profiles from the checkpoint; a checkpoint without them (snapshots turned
    on in a resumed run) starts them here from the model, which `cdc tune ema` reports."""
    if p.phema is None:
        return
    if state.get("posthoc_ema") is None:
        p.phema.restart_from(p.model, step)
        if p.dist.main:
            say(f"note: {path} holds no post-hoc EMA profiles; they start at step {step} from the model")
        return
    stored = state["posthoc_ema"].get("sigma_rels") if isinstance(state["posthoc_ema"], dict) else None
    if stored is not None and [float(x) for x in stored] != p.phema.sigma_rels:
        raise ConfigError(
            f"train.ema_sigma_rels {p.phema.sigma_rels} differ from the {list(stored)} that {path} tracks; "
            "keep the run's values, or start a new --run-dir"
        )
    with ckpt.reading(path):
        p.phema.load_state_dict(state["posthoc_ema"])


def wrap_for_training(p: Parts) -> None:
    """Compile the packed trunk (train.compile), wrap the model in DDP over ranks, and set the
    velocity field and autocast context a step runs under."""
    cfg, t, dev = p.cfg, p.cfg.train, p.dev
    # the packed trunk only: one graph for every stage mix (cdc.nn.compiled_trunk)
    compile_for_training(
        p.model, t.compile, list(cfg.flow.sides), t.batch_size, dev, log=say if p.dist.main else lambda m: None
    )
    p.net = p.model
    if p.dist.world > 1:
        # stage-specific DiTs: a step's batch may hold no sample of some stage
        p.net = DDP(p.net, device_ids=[dev.index] if p.cuda else None, find_unused_parameters=cfg.model.stage_models)
    p.velocity = velocity_net_from_config(p.net, cfg.flow)
    bf16 = p.cuda and t.precision == "bf16"
    p.amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def save(p: Parts, step: int, nonfinite_total: int, reason: str) -> None:
    """Checkpoint `step`: every rank's RNG and data position are gathered, rank 0 writes the file
    and prunes old ones (train.keep_last, train.milestone_every); all ranks must call it."""
    t = p.cfg.train
    per_rank = {
        "gen": p.gen.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "data": p.loader.state_dict(),
        # lets anyone check that DDP ranks hold identical weights
        "param_checksum": float(sum(q.detach().double().sum() for q in p.model.parameters())),
    }
    ranks = D.all_gather_objects(per_rank)
    # periodic saves go to the background from a host copy; the last save of a run (its end, a
    # signal, a time limit, a non-finite stop) is waited for, so the process exits with it on disk
    background = t.async_save and reason == "periodic"
    state = None
    if p.dist.main:
        state = {
            "model": unwrap(p.model).state_dict(),
            "ema": p.ema.state_dict(),
            "optimizer": p.opt.state_dict(),
            "step": step,
            "config": to_dict(p.cfg),
            "ranks": ranks,
            "nonfinite_total": nonfinite_total,
            "reason": reason,
        }
        if p.phema is not None:
            state["posthoc_ema"] = p.phema.state_dict()
        state = RP.host_copy(state) if background else state

    def write() -> None:
        ckpt.save(p.run_dir / "checkpoints" / ckpt.ckpt_name(step), state)
        ckpt.prune(p.run_dir / "checkpoints", t.keep_last, t.milestone_every)

    p.saver.save(p.dist.main, write, background)  # a failed write stops every rank at once, with one line


def save_snapshot(p: Parts, step: int, background: bool) -> None:
    """Write the post-hoc EMA profiles of `step` to RUN/ema-snapshots (rank 0, in the background
    from a host copy when asked); all ranks must call it."""
    t = p.cfg.train
    assert p.phema is not None
    state = p.phema.snapshot(step, t.ema_snapshot_dtype, to_dict(p.cfg)) if p.dist.main else None

    def write() -> None:
        ckpt.save(PH.snapshot_dir(p.run_dir) / PH.snapshot_name(step), state)

    p.snap_saver.save(p.dist.main, write, background)
