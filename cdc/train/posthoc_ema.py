"""Power-function EMA profiles and their snapshots: what post-hoc EMA (`cdc tune ema`) rebuilds from.

EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models",
Sec. 3, App. C.1-C.2) tracks a few power-function EMAs of the weights during training and stores
them every `train.ema_snapshots` steps; any other EMA length is a least-squares combination of the
stored snapshots afterwards (cdc.tune.ema).

A profile of exponent gamma after optimizer step n (1, 2, ...) is

    ema_n = beta_n ema_{n-1} + (1 - beta_n) theta_n,   beta_n = (1 - 1/n)^(gamma + 1),

which weighs theta_i by (i^(g+1) - (i-1)^(g+1)) / n^(g+1): exactly the continuous power EMA
(g+1)/n^(g+1) * integral_0^n tau^g theta(tau) dtau of the piecewise-constant trajectory
theta(tau) = theta_i on (i-1, i]. So the continuous inner products of App. C.2 are exact for the
snapshots this module writes. The length is given as sigma_rel, the kernel's standard deviation
relative to its time span: sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)).

Profiles live on the device in fp32 (tiny lerp weights would vanish in fp16); snapshots are
written by rank 0 in train.ema_snapshot_dtype (fp16 by default: half the bytes), in the background
through the run's Saver when train.async_save is on.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SNAP_DIR = "ema-snapshots"  # RUN/ema-snapshots/snap_0001000.pt (+ .sha256)
SNAP_RE = re.compile(r"^snap_(\d{7,})\.pt$")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
CHUNK_BYTES = 1 << 26  # the masked update's temporary: at most 64 MB (or one larger parameter)
MAX_SIGMA_REL = math.sqrt(1 / 12)  # gamma -> 0 (a flat average over the whole run); gamma > -1 needs less


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of a power EMA of relative std `sigma_rel` (EDM2 Algorithm 2)."""
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(f"sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def gamma_to_sigma_rel(gamma: float) -> float:
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(step: int, gamma: float) -> float:
    """The decay applied after optimizer step `step` (1, 2, ...); 0 at the first step."""
    return (1 - 1 / step) ** (gamma + 1)


def snapshot_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SNAP_DIR


def snapshot_name(step: int) -> str:
    return f"snap_{step:07d}.pt"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot file of the run, oldest first."""
    d = snapshot_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir() if (m := SNAP_RE.match(p.name)))


def remove_newer(run_dir: Path, step: int) -> list[Path]:
    """Delete the snapshots past a resume point (with their sidecars): the resumed run writes the
    same steps again, bit for bit, and a shorter resumed run must not keep stale ones."""
    gone = []
    for s, p in list_snapshots(run_dir):
        if s > step:
            for f in (p.with_name(p.name + ".sha256"), p):  # sidecar first: a half-deleted pair is invalid
                f.unlink(missing_ok=True)
            gone.append(p)
    return gone


def _chunks(sizes: list[int], limit: int) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of consecutive items whose sizes add up to at most `limit` (an item
    larger than that alone)."""
    out, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > limit:
            out.append((lo, i))
            lo, total = i, 0
        total += n
    return out + ([(lo, len(sizes))] if lo < len(sizes) else [])


@dataclass
class Snapshot:
    """What one snapshot file holds, read back (cdc.tune.ema)."""

    step: int
    sigma_rels: list[float]
    gammas: list[float]
    start: int  # the step the profiles started at (0 unless turned on in a resumed run)
    profiles: list[dict[str, torch.Tensor]]  # one state dict per profile, in the stored dtype
    config: dict[str, Any]


class PowerEMA:
    """The power-function EMA profiles of one model (one fp32 copy per sigma_rel), updated after
    each optimizer step with one fused lerp per profile."""

    def __init__(self, model: torch.nn.Module, sigma_rels: list[float]):
        self.sigma_rels = [float(s) for s in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]
        self.start = 0
        self.profiles = [copy.deepcopy(model).float().requires_grad_(False).eval() for _ in self.sigma_rels]
        self._params = [list(m.parameters()) for m in self.profiles]
        self._chunks = _chunks([q.numel() * 4 for q in self._params[0]], CHUNK_BYTES)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int, keep: torch.Tensor | None = None) -> None:
        """Fold the weights after optimizer step `step` into every profile; `keep` (0-dim bool on
        the device) False leaves them as they are (a skipped step), without a host read."""
        dtype = self._params[0][0].dtype  # fp32 (the model's own dtype: no copy)
        src = [q.detach().to(dtype) for q in model.parameters()]
        if keep is not None and keep.device.type == "cpu":  # reading it costs nothing here
            if not bool(keep):
                return
            keep = None
        for gamma, params in zip(self.gammas, self._params):
            w = 1 - power_beta(step - self.start, gamma)
            if keep is None:
                torch._foreach_lerp_(params, src, w)
            else:
                self._masked_lerp(params, src, torch.where(keep, w, 0.0).to(dtype))

    def _masked_lerp(self, params: list[torch.Tensor], src: list[torch.Tensor], w: torch.Tensor) -> None:
        """params += w (src - params) with a device-side weight: torch's foreach lerp takes a host
        weight only (a device one would be read back, a sync per step), so sub, mul and add, in
        chunks that bound the temporary difference."""
        for lo, hi in self._chunks:
            diff = torch._foreach_sub(src[lo:hi], params[lo:hi])
            torch._foreach_mul_(diff, w)
            torch._foreach_add_(params[lo:hi], diff)

    def restart_from(self, model: torch.nn.Module, step: int) -> None:
        """Start the profiles at `step` from `model`'s weights (a resumed run that had none)."""
        for m in self.profiles:
            m.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        self.start = step

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to continue the profiles bit for bit."""
        return {
            "sigma_rels": self.sigma_rels,
            "start": self.start,
            "profiles": [m.state_dict() for m in self.profiles],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [float(s) for s in state["sigma_rels"]] != self.sigma_rels or len(state["profiles"]) != len(
            self.profiles
        ):
            raise ValueError(f"its post-hoc EMA profiles are {state['sigma_rels']}, not {self.sigma_rels}")
        for m, sd in zip(self.profiles, state["profiles"]):
            m.load_state_dict(sd)
        self.start = int(state.get("start", 0))

    def snapshot(self, step: int, dtype: str, config: dict[str, Any]) -> dict[str, Any]:
        """A snapshot file's content: every profile's state on the host in `dtype`."""
        to = DTYPES[dtype]
        profiles = [
            {
                k: v.detach().to("cpu", to if v.is_floating_point() else v.dtype, copy=True)
                for k, v in m.state_dict().items()
            }
            for m in self.profiles
        ]
        return {
            "step": step, "sigma_rels": self.sigma_rels, "gammas": self.gammas, "start": self.start,
            "dtype": dtype, "profiles": profiles, "config": config,
        }  # fmt: skip


def read_snapshot(path: Path) -> Snapshot:
    """One snapshot file (verified by its sidecar, loaded without running code); a file that is not
    one is a one-line BadCheckpointError."""
    from cdc.train import checkpoint as ckpt

    if not ckpt.verify(path):
        raise ckpt.BadCheckpointError(
            f"{path}: incomplete or corrupt post-hoc EMA snapshot (no .sha256 sidecar, or it does not match); "
            "move it away to rebuild from the others"
        )
    state = ckpt.load(path, need=("step", "sigma_rels", "gammas", "profiles", "config"), mmap=True)
    with ckpt.reading(path):
        profiles = state["profiles"]
        if (
            not isinstance(profiles, list)
            or len(profiles) != len(state["sigma_rels"])
            or not all(isinstance(p, dict) and all(torch.is_tensor(v) for v in p.values()) for p in profiles)
        ):
            raise ValueError("its profiles are not one state dict per sigma_rel")
        return Snapshot(
            int(state["step"]), [float(s) for s in state["sigma_rels"]], [float(g) for g in state["gammas"]],
            int(state.get("start", 0)), profiles, state["config"],
        )  # fmt: skip
