"""The command line that continues a stopped `cdc` command: the options the user typed, rebuilt from
the CLI's parsed context, with the few that must change pinned (an explicit --run-dir or --out,
--resume). Built from the parsed options rather than sys.argv, so it holds under test runners and
`python -m cdc`, and follows any renamed option. The context is duck-typed: no typer import."""

from __future__ import annotations

import os
import shlex
from typing import Any


def _prefix() -> list[str]:
    """`cdc`, or the torchrun launch this process is one rank of (one node: nproc_per_node)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ["cdc"]
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = ["--nnodes", str(world // local)] if world != local else []
    return ["torchrun", *nodes, "--nproc_per_node", str(local), "-m", "cdc"]


def continue_command(ctx: Any, **pin: Any) -> str:
    """`cdc COMMAND ...` with the options given on the command line; `pin` (parameter name -> value)
    replaces or adds some: None drops one, True / False picks a flag's on / off form.

    ctx: the click (typer) context of the running command.
    """
    words = [*_prefix(), ctx.info_name]
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if p.name in pin:
            v = pin[p.name]
        elif source is not None and source.name == "COMMANDLINE":
            v = ctx.params.get(p.name)
        else:
            continue
        if v is None:
            continue
        many = v if isinstance(v, list | tuple) else [v]
        if p.param_type_name == "argument":
            words += [str(x) for x in many]
            continue
        name = min(p.opts, key=len)  # -n, not --n: torchrun's parser reads --n as one of its own
        if getattr(p, "is_flag", False):
            off = min(p.secondary_opts, key=len) if p.secondary_opts else None
            words += [name] if v else [off] if off else []
            continue
        for x in many if getattr(p, "multiple", False) else [v]:
            words += [name, str(x)]
    return shlex.join(words)


def train_stop_line(out: dict[str, Any], cmd: str) -> str | None:
    """The one line that says a `cdc train` stopped before train.steps (None when it finished):
    why, where, the checkpoint it saved and `cmd`, the command that continues."""
    if out["status"] == "done":
        return None
    where = f"at step {out['step']} of {out['steps']}"
    then = f"saved {out['checkpoint']}; continue with: {cmd}"
    if out["status"] == "interrupted":
        return f"stopped by signal {out['signal']} {where}; {then}"
    m = out["minutes"]
    took = f"{m:.1f} minutes" if m >= 1 else f"{m * 60:.1f} s"
    return f"stopped early {where} after {took} (train.max_minutes); {then}"
