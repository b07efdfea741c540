"""torchrun / DDP plumbing: process group from the environment, device from LOCAL_RANK."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(timeout_minutes: float = 30.0) -> Dist:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU).

    The device is indexed by LOCAL_RANK, never by the global rank, so multi-node runs put rank 8
    on its node's GPU 0.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        kwargs = {"device_id": device} if cuda else {}
        timeout = timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend, store=_attempt_store(timeout), rank=rank, world_size=world, timeout=timeout, **kwargs)
    return Dist(rank, world, local, device)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """The env:// store (MASTER_ADDR/PORT), its keys under this torchrun attempt's prefix.

    torchrun's elastic agent keeps one store across restarts (--max-restarts); without the prefix a
    restarted group reads the dead group's gloo addresses and fails with "connection refused"."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    return dist.PrefixStore(f"cdc/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def initialized() -> bool:
    """Whether a process group is up (one made by torchrun-launched code, or by `init`)."""
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_gather_objects(obj):
    """List of `obj` from every rank (one element when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Destroy the process group, if any. Whoever created it calls this before the process ends:
    gloo's threads outliving the interpreter's teardown abort it ("terminate called without an
    active exception"), turning a clean exit (0, or 2 for a refused run) into a SIGABRT."""
    if initialized():
        dist.destroy_process_group()
        # an exception's traceback (a reference cycle) can keep gloo's group object alive past the
        # destroy; collected at the interpreter's exit instead, its threads abort the process
        gc.collect()
