"""Editing with the pyramid: super-resolution, variations and inpainting as pure tensor code.

Beyond stage 1 a CDC-FM model is a chain of class-conditional super-resolution models: stage k
maps U(x_{k-1}) + sigma_k zeta to side r_k. So an existing image can enter the chain anywhere
(cdc.flow.sampler's `start`):
  upscale  an image at stage k's input side r_{k-1} enters stage k; the later stages carry it to
           the final side, with the coupling noise sigma_k of training.
  vary     an image at side r_k keeps that content and every finer stage is resampled; with a
           strength s, stage k itself is re-run from tau = 1 - s on the path from its source to the
           image (SDEdit, Meng et al. 2022), its low-pass at r_{k-1} held by replacement after every
           step (ILVR, Choi et al. 2021), so only stage k's detail changes.
  inpaint  from stage k on (default 1) the masked region is generated while the unmasked pixels
           are held, after every step, to their own path alpha(tau) x0 + beta(tau) x1 between the
           stage's source and the known image at that side (the replacement method, Song et al.
           2021): at tau = 1 they equal the input exactly.

Seeds: variant j of input image i draws its noise from image_seed(seed + j, i), the noise image i
of `cdc sample --seed SEED+j` draws; so an edit does not depend on the batch size or on how many
variants are asked for, and upscaling `cdc sample`'s own stage-k outputs (float) with one variant
reproduces its later stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from cdc.flow.matching import Interpolant, Schedule
from cdc.flow.pyramid import down_to, up_to
from cdc.flow.sampler import StepState, image_seed, sample


@dataclass
class Edit:
    """What to do with one input image: where it enters the pyramid and what is held."""

    stage: int  # 0-based first stage to run
    x: Tensor | None  # (C, r, r): the input at sides[stage - 1], or at sides[stage] when tau0 > 0
    tau0: float = 0.0  # > 0: stage `stage` re-run from this tau towards x (SDEdit)
    known: Tensor | None = None  # (C, R, R) inpainting: the image at the final side
    mask: Tensor | None = None  # (1, R, R) bool, True = generate (with `known`)
    lowpass: bool = False  # hold x's box average at sides[stage - 1] after every step (with tau0)


@dataclass
class Sampling:
    """How the sampler runs for an edit: the velocity field and the options every row shares."""

    net: Callable  # the velocity net (cdc.sample.generate.job_sampler)
    opts: dict  # keyword options of cdc.flow.sampler.sample (steps, cfg, null_class, solver, ...)
    sched: Schedule
    channels: int
    label: int  # every row's class; the null class runs the unconditional branch
    seed: int
    batch: int  # rows per sampler call
    device: torch.device


def upscale_edit(x: Tensor, sched: Schedule) -> Edit:
    """An image (C, r, r) at stage k's input side r = r_{k-1} enters stage k."""
    k = list(sched.sides[:-1]).index(x.shape[-1]) + 1
    return Edit(stage=k, x=x)


def vary_edit(x: Tensor, stage: int, sched: Schedule, strength: float = 0.0) -> Edit:
    """An image (C, r_k, r_k) kept at 1-based `stage` k; the finer stages resampled, and with
    0 < strength < 1 stage k too from tau = 1 - strength (its coarser content held)."""
    K = sched.K
    if not 1 <= stage <= K or x.shape[-1] != sched.sides[stage - 1]:
        raise ValueError(f"--stage {stage}: need 1..{K} and the image at that stage's side")
    if not 0.0 <= strength < 1.0:
        raise ValueError(
            f"--strength must be in [0, 1) (0: keep stage {stage}, towards 1: redraw it), got {strength}"
        )
    if strength == 0.0:
        if stage == K:
            raise ValueError(
                f"--stage {K} is the last stage: nothing finer to resample; add --strength or pick a lower --stage"
            )
        return Edit(stage=stage, x=x)
    return Edit(stage=stage - 1, x=x, tau0=1.0 - strength, lowpass=stage > 1)


def inpaint_edit(known: Tensor, mask: Tensor, sched: Schedule, stage: int = 1) -> Edit:
    """Generate the masked region of `known` (C, R, R) from 1-based `stage` on; stages before it
    are taken whole from the image (its coarse content, masked region included)."""
    if not 1 <= stage <= sched.K:
        raise ValueError(f"--stage {stage}: need 1..{sched.K}")
    if mask.shape[-2:] != known.shape[-2:]:
        raise ValueError(f"mask of side {mask.shape[-1]} for an image of side {known.shape[-1]}")
    coarse = None if stage == 1 else down_to(known, sched.sides[stage - 2])
    return Edit(stage=stage - 1, x=coarse, known=known, mask=mask)


def run_edits(s: Sampling, edits: list[Edit], n: int) -> Tensor:
    """Every edit `n` times: (len(edits) * n, C, R, R) float, row i * n + j = variant j of edit i.

    Rows that enter the pyramid the same way share sampler calls of at most `s.batch` rows.
    """
    R = s.sched.sides[-1]
    out = torch.empty((len(edits) * n, s.channels, R, R))
    rows = [(i, j) for i in range(len(edits)) for j in range(n)]
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, j in rows:
        e = edits[i]
        groups.setdefault((e.stage, e.tau0, e.known is None, e.lowpass), []).append((i, j))
    for group in groups.values():
        for b0 in range(0, len(group), s.batch):
            part = group[b0 : b0 + s.batch]
            x = _run_rows(s, [edits[i] for i, _ in part], part)
            for r, (i, j) in enumerate(part):
                out[i * n + j] = x[r].cpu()
    return out


def _run_rows(s: Sampling, edits: list[Edit], part: list[tuple[int, int]]) -> Tensor:
    """One sampler call over rows (input i, variant j) of alike edits; (B, C, R, R)."""
    e0, dev = edits[0], s.device
    seeds = [image_seed(s.seed + j, i) for i, j in part]
    y = torch.full((len(part),), s.label, dtype=torch.long, device=dev)
    start = None if e0.x is None else (e0.stage, torch.stack([e.x for e in edits]).to(dev))
    interp = Interpolant(s.opts.get("interpolant", "linear"))
    hold = None
    if e0.known is not None:
        known = torch.stack([e.known for e in edits]).to(dev)
        hold = mask_hold(known, torch.stack([e.mask for e in edits]).to(dev), s.sched, interp)
    elif e0.lowpass:
        hold = lowpass_hold(start[1], e0.stage, s.sched, interp)
    res = sample(
        s.net, s.sched, y, seeds, s.channels, start=start, start_tau=e0.tau0, hold=hold,
        **{**s.opts, "return_stages": False},
    )  # fmt: skip
    return res.x


def _coeffs(interp: Interpolant, tau: float) -> tuple[float, float]:
    """(alpha, beta) of the interpolant at tau, as Python floats."""
    a, b, _, _ = interp.coeffs(torch.tensor(tau))
    return a.item(), b.item()


def mask_hold(
    known: Tensor, mask: Tensor, sched: Schedule, interp: Interpolant
) -> Callable[[StepState], Tensor]:
    """Replacement inpainting: outside the mask, the state after every step is the known image's own
    path alpha(tau) (U(known_{k-1}) + noise) + beta(tau) known_k at stage k (noise: the stage's source
    noise, so the held and generated pixels share one source); at tau = 1 it is known_k itself.

    known (B, C, R, R), mask (B, 1, R, R) bool at the final side; a coarser pixel is generated when
    any pixel of its block is (max-pooled mask), so the held pixels are exactly known ones.
    """
    R = known.shape[-1]
    levels = [down_to(known, r) for r in sched.sides]
    masks = [F.max_pool2d(mask.float(), R // r).bool() for r in sched.sides]  # (B, 1, r, r)

    def hold(st: StepState) -> Tensor:
        k = st.stage
        a, b = _coeffs(interp, st.tau)
        src = st.noise if k == 0 else up_to(levels[k - 1], sched.sides[k]) + st.noise
        return torch.where(masks[k], st.x, a * src + b * levels[k])

    return hold


def lowpass_hold(
    target: Tensor, stage: int, sched: Schedule, interp: Interpolant
) -> Callable[[StepState], Tensor]:
    """ILVR-style holding while stage `stage` (0-based, > 0) is re-run towards `target` (B, C, r, r):
    after every step the state's box average at the coarser side is replaced by that of the
    target's path, so at tau = 1 the output's box average equals the target's."""
    side, coarse = sched.sides[stage], sched.sides[stage - 1]
    base = up_to(down_to(target, coarse), side)  # the stage's source mean U(D(target))

    def low(x: Tensor) -> Tensor:
        return up_to(down_to(x, coarse), side)

    def hold(st: StepState) -> Tensor:
        if st.stage != stage:
            return st.x
        a, b = _coeffs(interp, st.tau)
        return st.x - low(st.x) + low(a * (base + st.noise) + b * target)

    return hold
