"""The CDC-FM flow math (paper Sec. 3, App. H/I): stage schedule, couplings, interpolants, loss.

Pure tensor code: the network is passed in as a callable `net(xs, taus, ys) -> vs` over lists of
per-stage groups (see cdc.nn.model.DiT.forward). Nothing here touches files, the CLI or devices.

Notation: x1 = data at a stage, x0 = the stage's source, t in [0, 1] global time, tau in [0, 1]
time inside a stage, k = 0..K-1 stage index in code (paper k = 1..K), coarse first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import Tensor

from cdc.flow.pyramid import down_to, up_to

# net(xs, taus, ys) -> vs: lists of (B_g, C, r_g, r_g), (B_g,), (B_g,) per group
VelocityNet = Callable[[list[Tensor], list[Tensor], list[Tensor]], list[Tensor]]


# ---------------------------------------------------------------------------------------------
# stage schedule


@dataclass(frozen=True)
class Schedule:
    """K stages: sides r_k (coarse first), time windows [t0_k, t1_k) partitioning [0, 1], noise."""

    sides: tuple[int, ...]
    bounds: tuple[float, ...]  # K + 1 increasing values, bounds[0] = 0, bounds[-1] = 1
    sigma: float = 1.0  # stage-1 source std
    gamma: float = 2.0  # diminish factor of sigma_k

    @staticmethod
    def make(
        sides: Sequence[int], bounds: Sequence[float] | None = None, sigma: float = 1.0, gamma: float = 2.0
    ):
        K = len(sides)
        b = tuple(float(v) for v in bounds) if bounds is not None else tuple(i / K for i in range(K + 1))
        if len(b) != K + 1 or b[0] != 0.0 or b[-1] != 1.0 or any(x >= y for x, y in zip(b, b[1:])):
            raise ValueError(f"bounds must be {K + 1} increasing values from 0 to 1, got {list(b)}")
        return Schedule(tuple(int(s) for s in sides), b, float(sigma), float(gamma))

    @staticmethod
    def from_config(flow_cfg) -> Schedule:  # flow_cfg: cdc.config.FlowConfig
        return Schedule.make(flow_cfg.sides, flow_cfg.bounds, flow_cfg.sigma, flow_cfg.gamma)

    @property
    def K(self) -> int:
        return len(self.sides)

    def sigma_k(self, k: int) -> float:
        """Source noise std of stage k (0-based): sigma at k=0, gamma^-k * sigma after (eq. 20/57)."""
        return self.sigma * self.gamma ** (-k)

    def stage_of(self, t: Tensor) -> Tensor:
        """Stage index (0-based, long) of each global time; t = 1 belongs to the last stage."""
        # built on the host and sent without blocking: a device-side torch.tensor(...) would sync
        inner = torch.tensor(self.bounds[1:-1], dtype=t.dtype).to(t.device, non_blocking=True)
        return torch.bucketize(t, inner, right=True).clamp_(max=self.K - 1)

    def tau_of(self, t: Tensor, k: Tensor | int) -> Tensor:
        """Rescaled time tau = (t - t0_k) / (t1_k - t0_k) in [0, 1]."""
        b = torch.tensor(self.bounds, dtype=t.dtype)  # on the host
        if isinstance(k, int):  # 0-dim host tensors act as scalars in device ops: no copy, no sync
            t0, t1 = b[k], b[k + 1]
        else:
            b, k = b.to(t.device, non_blocking=True), torch.as_tensor(k).to(t.device)
            t0, t1 = b[k], b[k + 1]
        return ((t - t0) / (t1 - t0)).clamp(0.0, 1.0)

    def t_of(self, tau: Tensor, k: int) -> Tensor:
        """Inverse of tau_of for stage k."""
        return self.bounds[k] + tau * (self.bounds[k + 1] - self.bounds[k])


_STD_NORMAL = NormalDist()


def weight_stages(t: float, sched: Schedule, weights: Sequence[float] | None) -> float:
    """A uniform draw `t` in [0, 1) moved so stage k's window is hit with probability w_k / sum(w).

    `flow.stage_weights` (e.g. train mostly a newly grown stage): [0, 1) is cut into pieces of
    length w_k / sum(w) and piece k is mapped linearly onto [t0_k, t1_k), so t stays uniform inside
    its stage. One number in, one out: the loader's random streams, and so exact resume, do not
    change; None returns t itself, bit for bit the paper's draw.
    """
    if weights is None:
        return t
    total, lo = float(sum(weights)), 0.0
    last = max(k for k, w in enumerate(weights) if w > 0)
    for k, w in enumerate(weights):
        hi = lo + w / total
        if w > 0 and (t < hi or k == last):
            u = min(max((t - lo) / (hi - lo), 0.0), 1 - 1e-6)  # the margin keeps float32(t) in [t0, t1)
            t0, t1 = sched.bounds[k], sched.bounds[k + 1]
            return t0 + u * (t1 - t0)
        lo = hi
    raise AssertionError("unreachable: the last weighted stage takes every t")


def warp_time(
    t: float, sched: Schedule, dist: str = "uniform", loc: float = 0.0, scale: float = 1.0, k: int | None = None
) -> float:
    """Training time with a uniform draw `t` in [0, 1): same stage, tau redistributed by `dist`.

    "uniform" returns t (Alg. 1/3). "logit_normal" maps the stage's uniform tau u through the
    inverse CDF, tau = sigmoid(loc + scale * Phi^-1(u)) (Esser et al. 2024, "SD3"), so every stage
    keeps its share of the draws (bounds) and only the times inside it move; one uniform number in,
    one out, so the loader's random streams (and exact resume) are the same for either choice.
    `k` is t's stage when the caller has it already (the loader); else it is looked up.
    """
    if dist == "uniform":
        return t
    if dist != "logit_normal":
        raise ValueError(f"unknown tau distribution {dist!r}; use uniform or logit_normal")
    if k is None:
        k = int(sched.stage_of(torch.tensor([t], dtype=torch.float32))[0])  # as the loader's float32 t has it
    t0, t1 = sched.bounds[k], sched.bounds[k + 1]
    u = min(max((t - t0) / (t1 - t0), 1e-9), 1 - 1e-9)
    tau = 1.0 / (1.0 + math.exp(-(loc + scale * _STD_NORMAL.inv_cdf(u))))
    return t0 + min(tau, 1 - 1e-5) * (t1 - t0)  # the margin keeps float32(t) inside [t0, t1)


# ---------------------------------------------------------------------------------------------
# interpolants (Table 5): I = alpha(tau) x0 + beta(tau) x1, target dI/dtau


@dataclass(frozen=True)
class Interpolant:
    name: str

    def coeffs(self, tau: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, beta, dalpha/dtau, dbeta/dtau) at tau."""
        if self.name == "linear":
            one = torch.ones_like(tau)
            return 1 - tau, tau, -one, one
        if self.name == "trig":
            h = math.pi / 2
            return torch.cos(h * tau), torch.sin(h * tau), -h * torch.sin(h * tau), h * torch.cos(h * tau)
        if self.name == "sbd":
            # alpha = sqrt(1 - tau^2) has an infinite slope at tau = 1; clamp the derivative there
            a = torch.sqrt((1 - tau * tau).clamp_min(0))
            ta = tau.clamp(max=1 - 1e-3)
            return a, tau, -ta / torch.sqrt(1 - ta * ta), torch.ones_like(tau)
        raise ValueError(f"unknown interpolant {self.name!r}; use linear, trig or sbd")

    def path(self, x0: Tensor, x1: Tensor, tau: Tensor) -> tuple[Tensor, Tensor]:
        """Interpolant I_tau and its tau-derivative (the regression target)."""
        a, b, da, db = (c.view(-1, *([1] * (x1.dim() - 1))) for c in self.coeffs(tau))
        return a * x0 + b * x1, da * x0 + db * x1


def velocity_net(net: VelocityNet, interp: Interpolant, predict: str = "velocity", alpha_min: float = 0.05):
    """The velocity field b of a network that predicts `predict` ("velocity" or "data").

    With predict="data" the network outputs x1-hat (the clean image of its stage); since
    I = alpha x0 + beta x1, x0-hat = (I - beta x1-hat) / alpha and b = alpha' x0-hat + beta' x1-hat
    (linear: b = (x1-hat - I) / (1 - tau), JiT's form). Training still regresses b, so the loss, the sampler and
    the paper's equations are unchanged; only the network's target manifold is. A clean image is
    smooth and low-dimensional where a velocity carries the source noise pixel by pixel, which a
    small patch-4 net reproduces poorly (residual speckle); see docs/design-notes.md.
    The 1/alpha in front of (I - x1-hat) is floored at `alpha_min` so tau -> 1 stays finite and
    b vanishes there when I = x1-hat.
    """
    if predict == "velocity":
        return net
    if predict != "data":
        raise ValueError(f"unknown prediction target {predict!r}; use velocity or data")

    def field(xs: list[Tensor], taus: list[Tensor], ys: list[Tensor]) -> list[Tensor]:
        out = []
        for x, tau, x1_hat in zip(xs, taus, net(xs, taus, ys)):
            a, b, da, db = (c.float().view(-1, *([1] * (x.dim() - 1))) for c in interp.coeffs(tau))
            x1_hat = x1_hat.float()
            # b = alpha' x0-hat + beta' x1-hat rearranged so that only the (x - x1-hat) term divides by
            # alpha: that one is floored; the other coefficient stays bounded (0 for linear) as tau -> 1
            pull = da / a.clamp_min(alpha_min)
            rest = db + da * (1 - b) / a.clamp_min(1e-12)
            out.append(pull * (x.float() - x1_hat) + rest * x1_hat)  # (B_g, C, r, r)
        return out

    return field


def velocity_net_from_config(net: VelocityNet, flow_cfg) -> VelocityNet:  # flow_cfg: cdc.config.FlowConfig
    """velocity_net with the interpolant and prediction target a run was trained with."""
    return velocity_net(net, Interpolant(flow_cfg.interpolant), flow_cfg.predict, flow_cfg.alpha_min)


# ---------------------------------------------------------------------------------------------
# couplings


def coarse_mean(x1: Tensor, k: int, sched: Schedule) -> Tensor:
    """m_k(x1) = U_k(D_k(x1)) (eq. 9): x1 with the detail of stage k removed, at stage k's side.

    D_k / U_k go between r_{k-1} and r_k (a factor of 2 in the paper's 4-stage path, 4 in its
    [64, 256] two-stage path), so they are the composite box / nearest operators.
    """
    return up_to(down_to(x1, sched.sides[k - 1]), sched.sides[k])


def source(x1: Tensor, k: int, sched: Schedule, noise: Tensor) -> Tensor:
    """x0 for data x1 at stage k: sigma*noise at k=0 (eq. 8), U(D(x1)) + sigma_k*noise after (eq. 9)."""
    if k == 0:
        return sched.sigma * noise
    return coarse_mean(x1, k, sched) + sched.sigma_k(k) * noise


def inference_prior(prev: Tensor, k: int, sched: Schedule, noise: Tensor) -> Tensor:
    """x0 at stage k>0 from the previous stage's output: U(x1^(k-1)) + sigma_k * noise (eq. 17)."""
    return up_to(prev, sched.sides[k]) + sched.sigma_k(k) * noise


# ---------------------------------------------------------------------------------------------
# training batches and the loss (eq. 13 / Alg. 3)


@dataclass
class Batch:
    """A mixed-stage training batch as groups of equal stage, stages increasing.

    x1[g]: (B_g, C, r, r) target images in [-1, 1] at the group's stage side; t[g]: (B_g,) global
    times inside the stage's window; y[g]: (B_g,) class labels.
    """

    stage: list[int]
    x1: list[Tensor]
    t: list[Tensor]
    y: list[Tensor]
    meta: dict = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        mv = [v.to(device, non_blocking=non_blocking) for v in self.x1]
        return Batch(
            list(self.stage),
            mv,
            [v.to(device, non_blocking=non_blocking) for v in self.t],
            [v.to(device, non_blocking=non_blocking) for v in self.y],
            self.meta,
        )

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.y)


def group_batch(x: Tensor, t: Tensor, y: Tensor, sched: Schedule) -> Batch:
    """Build a Batch from full-resolution images x (B, C, R, R), times t (B,) and labels y (B,).

    Stage targets are exact box downsamplings x1^(k) = D_{K->k}(x) (Sec. 3.1).
    """
    k_of = sched.stage_of(t)
    out = Batch([], [], [], [])
    for k in range(sched.K):
        idx = (k_of == k).nonzero().flatten()
        if idx.numel():
            out.stage.append(k)
            out.x1.append(down_to(x[idx], sched.sides[k]))
            out.t.append(t[idx])
            out.y.append(y[idx])
    return out


@dataclass
class LossOut:
    loss: Tensor  # scalar to backprop (MSE form, weighted per flow.loss_weight)
    # stage -> (sum of per-sample MSE as a detached 0-dim tensor on the batch's device, count); kept
    # on the device so that a training step never waits for it (cdc.train.loop reads it at log steps)
    per_stage: dict[int, tuple[Tensor, int]]


def loss(
    net: VelocityNet,
    batch: Batch,
    sched: Schedule,
    interp: Interpolant,
    generator: torch.Generator | None = None,
    weight: str = "pixel_sum",
    null_class: int | None = None,
    label_dropout: float = 0.0,
) -> LossOut:
    """Flow-matching loss of eq. 13 / eq. 75 for a batch whose samples sit at different stages.

    |b - dI|^2 equals eq. 13's |b|^2 - 2 dI.b up to a constant independent of the net, so we
    optimise (and report) the MSE form. Weighting: "pixel_sum" sums over the pixels of each
    sample as eq. 13 does (so a 2x finer stage weighs 4x), divided by the final stage's pixel
    count d_K to keep the scale near 1; "sample_mean" averages per sample (every stage weighs the
    same, as PixelFlow does). Both then average over the batch (Alg. 1 line 19).
    """
    xs, taus, ys, targets = [], [], [], []
    for k, x1, t, y in zip(batch.stage, batch.x1, batch.t, batch.y):
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x0 = source(x1, k, sched, noise)
        tau = sched.tau_of(t, k)
        xt, dx = interp.path(x0, x1, tau)
        if label_dropout > 0:
            if null_class is None:
                raise ValueError("label_dropout needs null_class")
            drop = torch.rand(y.shape, generator=generator, device=y.device) < label_dropout
            y = torch.where(drop, torch.full_like(y, null_class), y)
        xs.append(xt)
        taus.append(tau)
        ys.append(y)
        targets.append(dx)
    vs = net(xs, taus, ys)
    d_K = batch.x1[0].shape[1] * sched.sides[-1] ** 2
    total = torch.zeros((), device=batch.x1[0].device)
    per_stage: dict[int, tuple[Tensor, int]] = {}
    B = batch.size
    for k, v, dx in zip(batch.stage, vs, targets):
        se = (v.float() - dx.float()).pow(2).flatten(1)  # (B_g, d_k)
        mse = se.mean(1)  # (B_g,)
        per_stage[k] = (mse.detach().sum(), len(mse))
        per_sample = se.sum(1) / d_K if weight == "pixel_sum" else mse
        total = total + per_sample.sum()
    return LossOut(total / B, per_stage)


# ---------------------------------------------------------------------------------------------
# transport cost (Definition 2, Theorem 2)


@torch.no_grad()
def transport_cost(x: Tensor, sched: Schedule, generator: torch.Generator | None = None) -> list[float]:
    """Monte-Carlo E|x1^(k) - x0^(k)|^2 per stage (eq. 47) for full-resolution images x (B, C, R, R).

    With the linear interpolant this is the transport-cost bound of Definition 2. K = 1 gives the
    single-stage cost L_A = E|x1|^2 + d sigma^2 (eq. 51).
    """
    out = []
    for k, side in enumerate(sched.sides):
        x1 = down_to(x, side)
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x0 = source(x1, k, sched, noise)
        out.append(float((x1 - x0).pow(2).flatten(1).sum(1).mean()))
    return out


@torch.no_grad()
def transport_cost_theory(x: Tensor, sched: Schedule) -> list[float]:
    """Per-stage cost of eq. 53/55: E|eps^(k)|^2 + d_k sigma_k^2, with the detail energy measured on x.

    Stage 1: E|x1^(1)|^2 + d_1 sigma^2; stage k>1: E|x1^(k) - U(D(x1^(k)))|^2 + d_k sigma_k^2,
    d_k = C * r_k^2 the stage's dimension. The noise term is exact; the data term is the sample mean.
    """
    out = []
    for k, side in enumerate(sched.sides):
        x1 = down_to(x, side)
        d_k = x1[0].numel()
        detail = x1 if k == 0 else x1 - coarse_mean(x1, k, sched)
        out.append(float(detail.pow(2).flatten(1).sum(1).mean()) + d_k * sched.sigma_k(k) ** 2)
    return out
