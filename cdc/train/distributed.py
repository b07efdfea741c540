"""torchrun / DDP plumbing: process group from the environment, device from LOCAL_RANK."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cdc.fileio import warn


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
        dist.init_process_group(
            backend, store=_attempt_store(timeout), rank=rank, world_size=world, timeout=timeout, **kwargs
        )
        if rank == 0 and (note := node_replacement_note()):
            warn(note)
    return Dist(rank, world, local, device)


def _attempt_store(timeout: timedelta) -> dist.Store:
    """The env:// store (MASTER_ADDR/PORT), its keys under this torchrun attempt's prefix where the
    store outlives an attempt.

    torchrun's elastic agent shares its own store with the workers by default and keeps it across
    restarts (--max-restarts): without the prefix a restarted group reads the dead group's gloo
    addresses and fails with "connection refused". With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (and
    outside torchrun) rank 0 serves a new store for every attempt, so there is nothing stale to
    avoid, and no prefix: a replacement node's agent counts its restarts from 0 while the
    survivors' count on, and a prefix built from those counts would split the group."""
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    if not agent_store_shared():
        return store
    return dist.PrefixStore(f"cdc/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def agent_store_shared() -> bool:
    """Whether the workers use torchrun's rendezvous store, which lives as long as the agent."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def node_replacement_note() -> str | None:
    """One line for a multi-node elastic job that cannot take a replaced node, or None.

    With the shared store torch's agents do not re-form a group around a new node (the survivors
    keep the first round's store address, the newcomer waits for one that is never published):
    the job then waits out the rendezvous timeout instead of resuming."""
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if nodes < 2 or restarts < 1 or not agent_store_shared():
        return None
    return (
        "torchrun shares its rendezvous store with the workers, so a replaced node cannot rejoin "
        "this job; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun on every node to allow it"
    )


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
