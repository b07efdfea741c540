"""Coarse-to-fine sampling: Algorithms 2 and 4 of the paper as a pure function of the velocity net.

Stage 1 integrates dX/dtau = b(X, tau, r_1, c) from X_0 ~ N(0, sigma^2 I); stage k > 1 starts at
X_0 = U(x1^(k-1)) + sigma_k zeta (eq. 17/79). CFG (eq. 77) takes one scale for every stage, as in
the paper, or one per stage: stage 1 decides the class and the layout, so guiding it less and the
refinements more trades recognisability for diversity differently (docs/quickstart-notes.md).
Autoguidance (`guide`, an earlier checkpoint of the same run) can replace most of that CFG.

`steps` counts model evaluations per stage for every solver (x2 with CFG), so it always controls
cost: Euler takes `steps` steps; Heun takes ceil(steps/2) intervals, the last one Euler when
`steps` is odd; the SDE sampler takes `steps` Euler-Maruyama steps.

Few-step (shortcut) models, `step_cond=True`: each of the `steps` Euler steps of size d = 1/steps
also gives d to the net (net(xs, taus, ys, ds), cdc.flow.shortcut), whose output is then the average
velocity over the step; CFG, if asked for, combines the two average velocities the same way.

Every image draws its noise from its own generator seeded by (seed, image index), in a fixed
order (stage 1 source, then per stage: zeta, then SDE increments), so image i is the same at any
batch size or number of GPUs.

Editing an existing image (cdc.sample.edit) uses three hooks, all off by default: `start` enters
the pyramid at a later stage with given coarse images (super-resolution), `start_tau` re-runs that
stage from an intermediate tau on the path to given images (SDEdit), and `hold` may replace the
state after every step (inpainting by replacement, low-pass holding); `on_stage` sees, and may
replace, each stage's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cdc.flow.matching import Interpolant, Schedule, VelocityNet, inference_prior
from cdc.flow.pyramid import down_to, up_to


def image_seed(seed: int, index: int) -> int:
    """Seed of image `index` under run seed `seed`.

    torch's CPU generator keeps only the low 32 bits of a seed, so (seed, index) is folded into 32
    bits: index plus a golden-ratio multiple of the run seed keeps every image of a run distinct
    and moves each run seed to a far-away block of streams.
    """
    return (int(index) + int(seed) * 0x9E3779B1) & 0xFFFFFFFF


class ImageNoise:
    """Per-image Gaussian streams: row i of every draw comes from image i's own generator."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.gens = [torch.Generator().manual_seed(s) for s in seeds]
        self.device = device

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        x = torch.stack([torch.randn(shape, generator=g) for g in self.gens])  # (B, *shape)
        return x.to(self.device, dtype)


@dataclass
class StepState:
    """What a `hold` hook sees after each solver step: stage k's state x at time tau."""

    stage: int  # 0-based stage index
    tau: float  # time within the stage that x has reached (1.0 after the last step)
    x: Tensor  # (B, C, r, r) the state
    noise: Tensor  # (B, C, r, r) the stage's source noise x0 - m: sigma*zeta at stage 1, sigma_k*zeta after


@dataclass
class SampleOut:
    x: Tensor  # (B, C, R, R) final images, nominally in [-1, 1]
    stages: list[Tensor] | None  # every stage's output (coarse first) when asked for
    nfe: int  # model evaluations per image (CFG pairs count 2)


def autoguided(net: VelocityNet, guide: VelocityNet, weight: float) -> VelocityNet:
    """Autoguidance (Karras et al. 2024): v = v_guide + w (v_net - v_guide), itself a velocity net.

    `guide` is a weaker version of the same model (an earlier checkpoint of the run); pushing away
    from its errors sharpens the samples without the loss of variety that a large CFG scale costs
    (docs/quickstart-notes.md). w = 1 is the net alone.
    """

    def v(xs, taus, ys, *extra):
        good, bad = net(xs, taus, ys, *extra), guide(xs, taus, ys, *extra)
        return [b + weight * (g - b) for g, b in zip(good, bad, strict=True)]

    return v


def _guided(
    net: VelocityNet, y: Tensor, null_class: int, scale: float, interval: tuple[float, float], cost: int = 1
):
    """Velocity field with CFG (eq. 77) applied for tau in [lo, hi), plain conditional outside.

    `cost` is the model evaluations one call of `net` takes (2 when it is autoguided).
    """
    nfe = [0]

    def v(x: Tensor, tau: float, d: float | None = None) -> Tensor:
        B = x.shape[0]
        tt = torch.full((B,), tau, device=x.device, dtype=torch.float32)
        extra = () if d is None else ([torch.full((B,), d, device=x.device, dtype=torch.float32)],)
        extra2 = () if d is None else ([torch.full((2 * B,), d, device=x.device, dtype=torch.float32)],)
        lo, hi = interval
        use_cfg = lo <= tau < hi or (tau == hi == 1.0)
        if not use_cfg or scale == 1.0:
            nfe[0] += cost
            return net([x], [tt], [y], *extra)[0]
        y_null = torch.full_like(y, null_class)
        if scale == 0.0:
            nfe[0] += cost
            return net([x], [tt], [y_null], *extra)[0]
        nfe[0] += 2 * cost
        both = net([torch.cat([x, x])], [torch.cat([tt, tt])], [torch.cat([y, y_null])], *extra2)[0]  # (2B, C, r, r)
        return _cfg_combine(both[:B], both[B:], scale)

    return v, nfe


def _cfg_combine(v_c: Tensor, v_u: Tensor, scale: float) -> Tensor:
    """Eq. 77: the unconditional velocity moved `scale` times the way to the conditional one."""
    return v_u + scale * (v_c - v_u)


def _per_stage(value, conv, K: int) -> list:
    """One value for every stage, or a sequence of one per stage (left for the caller to check)."""
    vals = [conv(value)] if isinstance(value, (int, float)) else [conv(v) for v in value]
    return vals * K if len(vals) == 1 else vals


def _heun_plan(steps: int) -> list[bool]:
    """Which intervals take a Heun (2-eval) step so that evaluations total exactly `steps`."""
    n = (steps + 1) // 2
    return [True] * (steps - n) + [False] * (2 * n - steps)


def _integrate(
    v, x: Tensor, steps: int, solver: str, m: Tensor, sigma_k: float, noise: ImageNoise, sde_eps: float,
    step_cond: bool = False, tau0: float = 0.0, after=None,
):
    """One stage's path from tau = tau0 to 1 in `steps` model evaluations (the module doc's solvers);
    `after(tau, x)`, if given, may replace the state after every step (the `hold` hook)."""
    if step_cond:
        return _shortcut_steps(v, x, steps, after)
    if solver == "heun":
        return _heun_steps(v, x, steps, tau0, after)
    dt = (1.0 - tau0) / steps  # tau0 = 0: exactly 1.0 / steps, and tau below exactly i * dt
    for i in range(steps):
        tau = tau0 + i * dt
        b = v(x, tau)
        if solver == "euler" or i == steps - 1:
            x = x + dt * b  # the last SDE step is deterministic so no noise is left in the output
        else:
            x = _sde_step(x, b, tau, dt, m, sigma_k, noise, sde_eps)
        if after is not None:
            x = after(1.0 if i == steps - 1 else tau0 + (i + 1) * dt, x)
    return x


def _shortcut_steps(v, x: Tensor, steps: int, after=None) -> Tensor:
    """Few-step models: Euler steps whose size the net is told (its output is the average velocity)."""
    dt = 1.0 / steps
    for i in range(steps):
        x = x + dt * v(x, i * dt, dt)
        if after is not None:
            x = after(1.0 if i == steps - 1 else (i + 1) * dt, x)
    return x


def _heun_steps(v, x: Tensor, steps: int, tau0: float = 0.0, after=None) -> Tensor:
    """Heun's method over ceil(steps/2) intervals from tau0, the last one Euler when `steps` is odd."""
    plan = _heun_plan(steps)
    n, span = len(plan), 1.0 - tau0
    for i, heun in enumerate(plan):
        tau, dt = tau0 + span * i / n, span / n  # tau0 = 0: exactly i / n and 1.0 / n
        d = v(x, tau)
        if heun:
            x_e = x + dt * d
            x = x + dt * 0.5 * (d + v(x_e, tau + dt))
        else:
            x = x + dt * d
        if after is not None:
            x = after(1.0 if i == n - 1 else tau0 + span * (i + 1) / n, x)
    return x


def _sde_step(
    x: Tensor, b: Tensor, tau: float, dt: float, m: Tensor, sigma_k: float, noise: ImageNoise, sde_eps: float
) -> Tensor:
    """One Euler-Maruyama step of the SDE of App. D (eq. 34), given the velocity b at (x, tau).

    For the linear interpolant with x0 ~ N(m, sigma_k^2 I) the score is
    s = -(x - m - tau b) / ((1 - tau) sigma_k^2); with eps_tau = eps (1 - tau) sigma_k^2 the drift
    correction eps_tau * s = -eps (x - m - tau b) stays bounded and the noise vanishes at tau=1.
    """
    drift = b - sde_eps * (x - m - tau * b)
    dw = noise(tuple(x.shape[1:]), x.dtype)
    return x + dt * drift + sigma_k * (2 * sde_eps * (1 - tau) * dt) ** 0.5 * dw


@torch.no_grad()
def sample(
    net: VelocityNet,
    sched: Schedule,
    y: Tensor,
    seeds: Sequence[int],
    channels: int,
    steps: int | Sequence[int] = 24,
    cfg: float | Sequence[float] = 1.0,
    null_class: int | None = None,
    solver: str = "euler",
    interval: tuple[float, float] = (0.0, 1.0),
    sde_eps: float = 1.0,
    interpolant: str = "linear",
    return_stages: bool = False,
    on_stage: Callable[[int, Tensor], Tensor | None] | None = None,
    start: tuple[int, Tensor] | None = None,
    step_cond: bool = False,
    guide: VelocityNet | None = None,
    guide_scale: float | Sequence[float] = 1.0,
    start_tau: float = 0.0,
    hold: Callable[[StepState], Tensor] | None = None,
) -> SampleOut:
    """Generate one image per label in `y` (B,), image i from `seeds[i]`; see the module doc.

    guide / guide_scale: autoguidance by a weaker net, one weight or one per stage (`autoguided`);
    CFG, if asked for too, then combines the autoguided conditional and unconditional fields.

    start=(k, coarse): skip stages < k and refine the given (B, C, r_{k-1}, r_{k-1}) images from
    stage k on (super-resolution of an existing image; probing one stage on real coarse data).
    The noise streams are drawn as if the skipped stages had run, so image i is unchanged.
    start_tau > 0 (SDEdit): the images are at stage k's own side r_k (k = 0 allowed) and stage k
    runs from tau = start_tau, from the interpolant between its source U(D(images)) + sigma_k zeta
    and the images, in ceil(steps_k (1 - start_tau)) evaluations.

    hold(StepState) -> x: replaces the state after every step of every stage run (tau = 1 after
    the last), e.g. to hold known pixels to their own path. on_stage(k, x) sees each stage's
    output; a tensor it returns replaces that output.
    """
    steps_k, cfg_k, ag_k = _check_options(
        sched, y, seeds, steps, cfg, null_class, solver, sde_eps, interpolant, step_cond, guide, guide_scale
    )
    noise = ImageNoise(seeds, y.device)
    fields = _stage_fields(net, guide, y, null_class, cfg_k, ag_k, interval)
    k0, x = _start_stage(start, sched, y.shape[0], channels, start_tau, step_cond)
    nfe = 0
    stages: list[Tensor] = []
    for k, side in enumerate(sched.sides):
        shape = (channels, side, side)
        if k < k0:
            _skip_stage_noise(noise, shape, solver, steps_k[k])
            continue
        tau0 = start_tau if k == k0 else 0.0
        target = x if tau0 > 0 else None  # SDEdit: the given images at this stage's side
        prev = None if target is None or k == 0 else down_to(target, sched.sides[k - 1])
        m, x0 = _stage_prior(prev if target is not None else x, k, sched, noise, shape, y)
        after = None if hold is None else _hold_step(hold, k, x0 - m)
        n_steps = steps_k[k]
        if target is not None:
            a, b, _, _ = Interpolant(interpolant).coeffs(torch.tensor(tau0))
            x0 = a.item() * x0 + b.item() * target
            n_steps = max(1, math.ceil(steps_k[k] * (1.0 - tau0) - 1e-9))
        v, nfe_k = fields[k]
        x = _integrate(v, x0, n_steps, solver, m, sched.sigma_k(k), noise, sde_eps, step_cond, tau0, after)
        nfe += nfe_k[0]
        if on_stage is not None:
            replaced = on_stage(k, x)
            x = x if replaced is None else _replacement(replaced, x)
        if return_stages:
            stages.append(x)
    return SampleOut(x, stages if return_stages else None, nfe)


def _hold_step(hold: Callable[[StepState], Tensor], k: int, src_noise: Tensor):
    """The `after(tau, x)` of one stage that hands the state to `hold`."""
    return lambda tau, x: hold(StepState(k, tau, x, src_noise))


def _replacement(new: Tensor, x: Tensor) -> Tensor:
    """A stage output an `on_stage` callback returned, checked to fit where `x` was."""
    if not isinstance(new, Tensor) or new.shape != x.shape:
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        raise ValueError(
            f"on_stage returned {got} for a stage output of shape {tuple(x.shape)}; return None or a tensor of that shape"
        )
    return new.to(x.device, x.dtype)


def _check_options(
    sched: Schedule, y: Tensor, seeds: Sequence[int], steps, cfg, null_class: int | None, solver: str,
    sde_eps: float, interpolant: str, step_cond: bool, guide: VelocityNet | None, guide_scale,
) -> tuple[list[int], list[float], list[float]]:
    """`sample`'s arguments checked, one line per mistake; the per-stage steps, CFG and guide weights."""
    B = y.shape[0]
    if len(seeds) != B:
        raise ValueError(f"need one seed per image: {len(seeds)} seeds for {B} labels")
    steps_k, cfg_k = _per_stage(steps, int, sched.K), _per_stage(cfg, float, sched.K)
    if len(steps_k) != sched.K or min(steps_k) < 1:
        raise ValueError(f"steps: give one count >= 1 or one per stage ({sched.K}), got {list(steps_k)}")
    if solver not in ("euler", "heun", "sde"):
        raise ValueError(f"unknown solver {solver!r}; use euler, heun or sde")
    if sde_eps < 0:  # the noise scale enters as a square root
        raise ValueError(f"sde_eps (--sde-eps) must be >= 0, got {sde_eps}")
    if step_cond and solver != "euler":
        raise ValueError(f"few-step (step_cond) sampling takes Euler steps of the trained sizes, not {solver!r}")
    if solver == "sde" and interpolant != "linear":
        raise ValueError(
            "the SDE sampler derives the score for the linear interpolant only; use euler or heun"
        )
    if len(cfg_k) != sched.K:
        raise ValueError(f"cfg: give one scale or one per stage ({sched.K}), got {list(cfg_k)}")
    ag_k = _per_stage(guide_scale, float, sched.K)
    if len(ag_k) != sched.K or min(ag_k) < 0:
        raise ValueError(f"guide_scale: give one weight >= 0 or one per stage ({sched.K}), got {list(ag_k)}")
    if guide is None and any(w != 1.0 for w in ag_k):
        raise ValueError("guide_scale != 1 needs a guide net (autoguidance)")
    if any(c != 1.0 for c in cfg_k) and null_class is None:
        raise ValueError("CFG needs the null class index (model.num_classes)")
    return steps_k, cfg_k, ag_k


def _stage_fields(
    net: VelocityNet, guide: VelocityNet | None, y: Tensor, null_class: int | None,
    cfg_k: list[float], ag_k: list[float], interval: tuple[float, float],
) -> list:
    """Each stage's guided velocity field and its evaluation counter (`_guided`)."""
    null = null_class if null_class is not None else -1
    return [
        _guided(net, y, null, c, tuple(interval))
        if w == 1.0
        else _guided(autoguided(net, guide, w), y, null, c, tuple(interval), cost=2)
        for c, w in zip(cfg_k, ag_k, strict=True)
    ]


def _start_stage(
    start: tuple[int, Tensor] | None,
    sched: Schedule,
    B: int,
    channels: int,
    start_tau: float = 0.0,
    step_cond: bool = False,
):
    """(first stage to run, its input): (0, None) for a full run, else `start` checked."""
    if start is None:
        if start_tau != 0.0:
            raise ValueError("start_tau needs start=(k, images at the side of stage k)")
        return 0, None
    k0, x = int(start[0]), start[1]
    if start_tau != 0.0:
        if not 0.0 < start_tau < 1.0 or step_cond:
            raise ValueError(f"start_tau must be in (0, 1) and not with a few-step model, got {start_tau}")
        side = sched.sides[k0] if 0 <= k0 < sched.K else -1
        if tuple(x.shape) != (B, channels, side, side):
            raise ValueError(
                f"start=(k, images) with start_tau needs 0 <= k < {sched.K} and images of shape "
                f"({B}, {channels}, r, r) at the side of stage k, got k={k0}, {tuple(x.shape)}"
            )
        return k0, x
    if not 1 <= k0 < sched.K or tuple(x.shape) != (B, channels, sched.sides[k0 - 1], sched.sides[k0 - 1]):
        raise ValueError(
            f"start=(k, images) needs 1 <= k < {sched.K} and images of shape "
            f"({B}, {channels}, r, r) at the side of stage k-1, got k={k0}, {tuple(x.shape)}"
        )
    return k0, x


def _skip_stage_noise(noise: ImageNoise, shape: tuple[int, ...], solver: str, steps: int) -> None:
    """Draw what a skipped stage would have drawn, so every image's noise stream stays in step."""
    noise(shape)
    if solver == "sde":
        for _ in range(steps - 1):
            noise(shape)


def _stage_prior(
    x: Tensor | None, k: int, sched: Schedule, noise: ImageNoise, shape: tuple[int, ...], y: Tensor
) -> tuple[Tensor, Tensor]:
    """Stage k's source mean m and start X_0: N(0, sigma^2) at k = 0, else U(x) + sigma_k zeta (eq. 17)."""
    if k == 0:
        return torch.zeros((y.shape[0], *shape), device=y.device), sched.sigma * noise(shape)
    return up_to(x, shape[-1]), inference_prior(x, k, sched, noise(shape))
