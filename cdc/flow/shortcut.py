"""Few-step CDC: the shortcut self-consistency objective (Frans et al. 2024) per stage.

Pure tensor code like cdc.flow.matching: the student is a callable `net(xs, taus, ys, ds) -> vs` over lists
of per-stage groups (cdc.nn.model.DiT with step_cond), where ds[g] (B_g,) is each sample's step size
d as a fraction of its stage; d = 0 is the ordinary velocity ("flow mode"). For d > 0 the output
s(x, tau, d) is the average velocity over [tau, tau + d], so one Euler step x + d s lands where
the flow would. Why shortcut and not mean flow, and how CFG is treated: docs/design-notes.md.

Per stage group, a `fraction` of the samples (in expectation, `sc_rows`) learns self-consistency
and the rest learns d = 0:
  d = 0       target dI/dtau (flow matching, eq. 13), or the frozen teacher's (guided) velocity;
  d = 2^-j    target = mean of two steps of d/2 taken by the student itself (no gradient):
              v1 = s(x, tau, d/2), v2 = s(x + d/2 v1, tau + d/2, d/2), target (v1 + v2) / 2,
              j = 0..levels; at the smallest d the two half steps use the d = 0 field (student in
              flow mode, or the teacher), which anchors the chain of step sizes to the flow.
tau for a step of size d is drawn in [0, 1 - d] so the step stays inside its stage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from cdc.flow.matching import Batch, Interpolant, LossOut, Schedule, VelocityNet, source

# net(xs, taus, ys, ds) -> vs, lists per group; ds None = flow mode
StepNet = Callable[..., list[Tensor]]


def step_sizes(levels: int) -> list[float]:
    """The trained step sizes d = 1, 1/2, ..., 2^-levels (fractions of a stage)."""
    return [2.0**-j for j in range(levels + 1)]


def shortcut_mode(step_cond: bool, levels: int, steps: list[int]) -> bool:
    """Whether per-stage step counts `steps` sample a few-step model in shortcut mode: the model
    has step_cond and every count is a trained number of steps (1, 2, 4, ..., 2^levels). Other
    counts, and ordinary models, integrate the d = 0 velocity with the configured solver."""
    return step_cond and all(1 <= n <= 2**levels and n & (n - 1) == 0 for n in steps)


def guided_twice(
    step_cond: bool, fewstep, cfg: float | Sequence[float], guide: str, guide_scale: float | Sequence[float]
) -> list[str]:
    """Which sampling guidance a checkpoint already has in its weights: ["cfg"], ["guide"], both or [].

    A student fine-tuned with `fewstep.teacher: init` (`fewstep`: cdc.config.FewStepConfig) learned
    the teacher's field guided by fewstep.cfg and fewstep.guide; CFG (`cfg`) or autoguidance
    (`guide` with `guide_scale`) at sampling, in a stage where the same kind was distilled, applies
    it twice. The other kind stays allowed: it composes as the sampler composes the two.
    """
    if not (step_cond and fewstep.teacher == "init"):
        return []

    def per(v, n: int) -> list[float]:
        vals = [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]
        return vals * n if len(vals) == 1 else vals

    def both(a, b) -> bool:  # some stage guided in training and at sampling (each 1 or K values)
        n = max(len(per(a, 1)), len(per(b, 1)))
        return any(x != 1.0 and y != 1.0 for x, y in zip(per(a, n), per(b, n), strict=True))

    twice = ["cfg"] if both(fewstep.cfg, cfg) else []
    if fewstep.guide and guide and both(fewstep.guide_scale, guide_scale):
        twice.append("guide")
    return twice


def guided_twice_message(twice: list[str], fewstep, asked: dict[str, str]) -> str:
    """The one-line error for `guided_twice`'s answer; `asked` names each kind as the caller got it."""
    have = {"cfg": f"CFG {fewstep.cfg}", "guide": f"autoguidance weight {fewstep.guide_scale}"}
    fix = {"cfg": "CFG 1 (--cfg 1; sample.cfg: 1 in a recipe)", "guide": "no guide (--guide none; sample.guide: '')"}
    return (
        f"{' and '.join(asked[k] for k in twice)}: this few-step student has "
        f"{' and '.join(have[k] for k in twice)} distilled into its weights (fewstep), so that would "
        f"guide it twice; sample it with {' and '.join(fix[k] for k in twice)}"
    )


def guided_field(
    net: VelocityNet,
    null_class: int,
    scale: float | Sequence[float],
    sides: Sequence[int] | None = None,
    guide: VelocityNet | None = None,
    guide_scale: float | Sequence[float] = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
) -> VelocityNet:
    """net's guided velocity as a list-form VelocityNet: what `cdc sample` integrates, per group.

    Autoguidance first, v = v_guide + w (v_net - v_guide) (cdc.flow.sampler.autoguided), then CFG,
    v_u + s (v_c - v_u) (eq. 77). `scale` and `guide_scale` are one value for every stage or one
    per stage of `sides` (a group's stage is the one of its side). Samples whose label is already
    the null class get v_u. Conditional and unconditional halves run as one packed call.
    CFG applies only to rows whose in-stage tau lies in `interval` [lo, hi) (or tau = hi = 1), as
    the sampler's `sample.interval` does; other rows get the (autoguided) conditional velocity and
    skip the unconditional forward.
    """
    K = len(sides) if sides is not None else 1

    def per_stage(value, name: str) -> list[float]:
        vals = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(vals) not in (1, K):
            raise ValueError(f"guided_field: {name} needs one value or one per stage of sides, got {vals}")
        return vals * K if len(vals) == 1 else vals

    cfg_k, ag_k = per_stage(scale, "scale"), per_stage(guide_scale, "guide_scale")
    if guide is None and any(w != 1.0 for w in ag_k):
        raise ValueError("guided_field: guide_scale != 1 needs a guide net")
    use_ag = guide is not None and any(w != 1.0 for w in ag_k)
    use_cfg = any(c != 1.0 for c in cfg_k)
    if not (use_ag or use_cfg):
        return net
    stage_of = {int(r): k for k, r in enumerate(sides)} if sides is not None else {}
    lo, hi = float(interval[0]), float(interval[1])

    def field(xs: list[Tensor], taus: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
        ks = [stage_of[int(x.shape[-1])] if stage_of else 0 for x in xs]  # each group's stage
        B = [len(x) for x in xs]
        if use_cfg:  # per group: all rows conditional, then the rows guided here unconditional
            inside = [((t >= lo) & (t < hi)) | ((t == hi) & (hi == 1.0)) for t in taus]  # (B_g,) bool
            xs, taus, ys = (
                [torch.cat([x, x[m]]) for x, m in zip(xs, inside, strict=True)],
                [torch.cat([t, t[m]]) for t, m in zip(taus, inside, strict=True)],
                [torch.cat([y, torch.full_like(y[m], null_class)]) for y, m in zip(ys, inside, strict=True)],
            )
        v = net(xs, taus, ys)
        if use_ag:
            g = guide(xs, taus, ys)
            v = [gi + ag_k[k] * (vi - gi) for vi, gi, k in zip(v, g, ks, strict=True)]
        if not use_cfg:
            return v
        out = []
        for vi, k, b, m in zip(v, ks, B, inside, strict=True):
            v_c, v_u = vi[:b], vi[b:]
            o = v_c.clone()
            o[m] = v_u + cfg_k[k] * (v_c[m] - v_u)
            out.append(o)
        return out

    return field


def sc_rows(sizes: Sequence[int], fraction: float, generator: torch.Generator | None, device) -> list[int]:
    """How many samples of each stage group (of `sizes`) learn self-consistency: fraction x size in
    expectation.

    Stochastic rounding: floor(fraction n), plus one with probability frac(fraction n), from one
    uniform per group drawn from the step's generator (saved with every checkpoint, so resume stays
    exact; one host read per step). Rounding to nearest per group gave a group of one sample 0 rows
    at fraction 0.25 and 1 at 0.75, whatever the recipe asked, and groups are small when a batch
    spreads over many stages. Nothing is drawn when every fraction n is whole (fraction 0 or 1).
    """
    split = [divmod(fraction * n, 1.0) for n in sizes]
    if not any(rest > 0 for _, rest in split):
        return [int(whole) for whole, _ in split]
    u = torch.rand(len(sizes), generator=generator, device=device).tolist()
    return [int(whole) + (ui < rest) for (whole, rest), ui in zip(split, u, strict=True)]


def _eval_subset(fn, xs, taus, ys, ds, idx: list[Tensor], out: list[Tensor]) -> None:
    """out[g][idx[g]] = fn on the selected rows of every group (groups with no rows are skipped)."""
    keep = [g for g, i in enumerate(idx) if i.numel()]
    if not keep:
        return
    args = [[xs[g][idx[g]] for g in keep], [taus[g][idx[g]] for g in keep], [ys[g][idx[g]] for g in keep]]
    if ds is not None:
        args.append([ds[g][idx[g]] for g in keep])
    for g, v in zip(keep, fn(*args), strict=True):
        out[g][idx[g]] = v.to(out[g].dtype)


@torch.no_grad()
def _half_velocity(net: StepNet, anchor: VelocityNet | None, xs, taus, ys, halves, base) -> list[Tensor]:
    """Velocity for a half step: the student at d/2, or the d = 0 field where `base` (smallest d)."""
    if anchor is None:  # self-distillation: the student's own flow mode is the d = 0 field
        ds = [torch.where(b, torch.zeros_like(h), h) for h, b in zip(halves, base, strict=True)]
        return [v.float() for v in net(xs, taus, ys, ds)]
    out = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in xs]
    _eval_subset(net, xs, taus, ys, halves, [(~b).nonzero().flatten() for b in base], out)
    _eval_subset(anchor, xs, taus, ys, None, [b.nonzero().flatten() for b in base], out)
    return out


def shortcut_targets(
    net: StepNet,
    anchor: VelocityNet | None,
    xs: list[Tensor],
    taus: list[Tensor],
    ys: list[Tensor],
    d: list[Tensor],
    d_min: float,
) -> list[Tensor]:
    """Self-consistency targets (v1 + v2) / 2 for steps of size d (B_g,) from (x, tau), per group."""
    halves = [di / 2 for di in d]
    base = [di <= d_min * (1 + 1e-6) for di in d]  # (B_g,) bool: the smallest step size
    v1 = _half_velocity(net, anchor, xs, taus, ys, halves, base)
    shape = [(-1,) + (1,) * (x.dim() - 1) for x in xs]
    x_mid = [x.float() + h.view(s) * v for x, h, s, v in zip(xs, halves, shape, v1, strict=True)]
    t_mid = [t + h for t, h in zip(taus, halves, strict=True)]
    v2 = _half_velocity(net, anchor, x_mid, t_mid, ys, halves, base)
    return [(a + b) / 2 for a, b in zip(v1, v2, strict=True)]


def shortcut_loss(
    net: StepNet,
    batch: Batch,
    sched: Schedule,
    interp: Interpolant,
    generator: torch.Generator | None = None,
    weight: str = "pixel_sum",
    null_class: int | None = None,
    label_dropout: float = 0.0,
    fraction: float = 0.25,
    levels: int = 3,
    anchor: VelocityNet | None = None,
) -> LossOut:
    """Flow matching at d = 0 plus shortcut self-consistency, per stage group; see the module doc.

    anchor: the d = 0 field used as target (flow part, and the smallest step's half steps): None =
    data (x1 - x0 regression, the student's own flow mode for half steps), or a frozen teacher,
    e.g. guided_field(teacher, null, cfg, sides, guide, w) to distil CFG and autoguidance in.
    Weighting as cdc.flow.matching.loss.
    """
    d_min = 2.0**-levels
    x_fm, t_fm, y_fm, tgt_fm = [], [], [], []  # flow part, per group
    x_sc, t_sc, y_sc, d_sc = [], [], [], []  # self-consistency part, per group
    n_scs = sc_rows([len(y) for y in batch.y], fraction, generator, batch.x1[0].device)
    for k, x1, t, y, n_sc in zip(batch.stage, batch.x1, batch.t, batch.y, n_scs, strict=True):
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x0 = source(x1, k, sched, noise)
        tau = sched.tau_of(t, k)
        if label_dropout > 0:
            if null_class is None:
                raise ValueError("label_dropout needs null_class")
            drop = torch.rand(y.shape, generator=generator, device=y.device) < label_dropout
            y = torch.where(drop, torch.full_like(y, null_class), y)
        # drawn only when used, so fraction 0 consumes the generator exactly like cdc.flow.matching.loss
        j = torch.randint(0, levels + 1, (n_sc,), generator=generator, device=y.device) if n_sc else y[:0]
        d = 0.5 ** j.to(tau.dtype)  # (n_sc,) step sizes 2^-j
        tau_sc = tau[:n_sc] * (1 - d)  # the step [tau, tau + d] stays inside the stage
        x_sc.append(interp.path(x0[:n_sc], x1[:n_sc], tau_sc)[0])
        t_sc.append(tau_sc)
        y_sc.append(y[:n_sc])
        d_sc.append(d)
        xt, dx = interp.path(x0[n_sc:], x1[n_sc:], tau[n_sc:])
        x_fm.append(xt)
        t_fm.append(tau[n_sc:])
        y_fm.append(y[n_sc:])
        tgt_fm.append(dx)
    if anchor is not None:  # distil the teacher's d = 0 field instead of the noisy x1 - x0
        idx = [torch.arange(len(y), device=y.device) for y in y_fm]
        tgt_fm = [torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in x_fm]
        with torch.no_grad():
            _eval_subset(anchor, x_fm, t_fm, y_fm, None, idx, tgt_fm)
    sc_groups = [g for g, y in enumerate(y_sc) if len(y)]
    tgt_sc = [torch.empty(0)] * len(y_sc)
    if sc_groups:
        sel = shortcut_targets(
            net, anchor, [x_sc[g] for g in sc_groups], [t_sc[g] for g in sc_groups],
            [y_sc[g] for g in sc_groups], [d_sc[g] for g in sc_groups], d_min,
        )
        for g, v in zip(sc_groups, sel, strict=True):
            tgt_sc[g] = v
    # one packed forward with gradient over both parts; each group stays one side
    xs = [torch.cat([a, b]) for a, b in zip(x_sc, x_fm, strict=True)]
    taus = [torch.cat([a, b]) for a, b in zip(t_sc, t_fm, strict=True)]
    ys = [torch.cat([a, b]) for a, b in zip(y_sc, y_fm, strict=True)]
    ds = [torch.cat([a, torch.zeros_like(b)]) for a, b in zip(d_sc, t_fm, strict=True)]
    targets = [
        torch.cat([a.float(), b.float()]) if len(a) else b.float()
        for a, b in zip(tgt_sc, tgt_fm, strict=True)
    ]
    vs = net(xs, taus, ys, ds)
    d_K = batch.x1[0].shape[1] * sched.sides[-1] ** 2
    total = torch.zeros((), device=batch.x1[0].device)
    per_stage: dict[int, tuple[Tensor, int]] = {}
    for k, v, tgt in zip(batch.stage, vs, targets, strict=True):
        se = (v.float() - tgt).pow(2).flatten(1)  # (B_g, d_k)
        mse = se.mean(1)  # (B_g,)
        per_stage[k] = (mse.detach().sum(), len(mse))  # stays on the device (no host sync)
        total = total + (se.sum(1) / d_K if weight == "pixel_sum" else mse).sum()
    return LossOut(total / batch.size, per_stage)
