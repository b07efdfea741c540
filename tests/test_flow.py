import math

import pytest
import torch

from cdc.flow import matching as F
from cdc.flow.pyramid import down_to


def test_stage_schedule_equal_and_custom_bounds():
    s = F.Schedule.make([32, 64, 128, 256])
    t = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.74, 0.75, 0.99, 1.0])
    assert s.stage_of(t).tolist() == [0, 0, 1, 1, 2, 3, 3, 3]
    k = s.stage_of(t)
    assert torch.allclose(s.tau_of(t, k), torch.tensor([0.0, 0.4, 0.0, 0.2, 0.96, 0.0, 0.96, 1.0]))
    c = F.Schedule.make([8, 16, 32], bounds=[0, 0.5, 0.8, 1.0])
    tt = torch.tensor([0.4, 0.5, 0.65, 0.9])
    kk = c.stage_of(tt)
    assert kk.tolist() == [0, 1, 1, 2]
    assert torch.allclose(c.tau_of(tt, kk), torch.tensor([0.8, 0.0, 0.5, 0.5]))
    assert torch.allclose(c.t_of(c.tau_of(tt, kk), 1)[1:3], tt[1:3])
    with pytest.raises(ValueError):
        F.Schedule.make([8, 16], bounds=[0, 0.7, 0.5])


def test_warp_time_keeps_the_stage_and_gives_logit_normal_tau():
    s = F.Schedule.make([8, 16, 32], bounds=[0, 0.5, 0.9, 1.0])
    assert F.warp_time(0.123, s) == 0.123  # uniform: the paper's draw, untouched
    # the stage's uniform tau u goes through the inverse CDF: u = 1/2 -> sigmoid(loc);
    # u = Phi(1) -> sigmoid(loc + scale)
    assert F.warp_time(0.25, s, "logit_normal") == pytest.approx(0.25)  # stage 1 centre
    assert F.warp_time(0.7, s, "logit_normal", loc=1.0) == pytest.approx(0.5 + 0.4 / (1 + math.exp(-1)))
    u = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # Phi(1)
    want = 0.9 + 0.1 / (1 + math.exp(-(0.3 + 2.0)))
    assert F.warp_time(0.9 + 0.1 * u, s, "logit_normal", loc=0.3, scale=2.0) == pytest.approx(want)
    ts = torch.linspace(0, 1, 2001)[:-1].double()
    warped = torch.tensor([F.warp_time(float(t), s, "logit_normal", 0.5, 1.5) for t in ts], dtype=torch.float64)
    assert torch.equal(s.stage_of(warped.float()), s.stage_of(ts.float()))  # every stage keeps its draws
    assert torch.all(warped[1:] >= warped[:-1])  # monotone within and across stages
    # tau's logit over a fine grid of one stage: mean loc, std scale
    k0 = s.stage_of(ts) == 0
    tau = s.tau_of(warped[k0], 0).clamp(1e-12, 1 - 1e-12)
    z = torch.log(tau / (1 - tau))
    assert float(z.mean()) == pytest.approx(0.5, abs=0.02) and float(z.std()) == pytest.approx(1.5, rel=0.05)
    with pytest.raises(ValueError, match="unknown tau distribution"):
        F.warp_time(0.5, s, "beta")


def test_sigma_k_diminishes_by_gamma():
    s = F.Schedule.make([8, 16, 32, 64], sigma=0.8, gamma=2.0)
    assert [s.sigma_k(k) for k in range(4)] == pytest.approx([0.8, 0.4, 0.2, 0.1])


@pytest.mark.parametrize("sides", [[8, 16, 32], [8, 32]])
def test_training_prior_equals_inference_prior_given_D_x1(sides):
    """App. E.2: U(D(x1)) + s_k z equals U(x1^(k-1)) + s_k z when the previous output is D(x1)."""
    sched = F.Schedule.make(sides)
    x = torch.randn(4, 3, sides[-1], sides[-1], dtype=torch.float64)
    for k in range(1, len(sides)):
        x1 = down_to(x, sides[k])
        z = torch.randn_like(x1)
        prev = down_to(x1, sides[k - 1])
        assert torch.equal(F.source(x1, k, sched, z), F.inference_prior(prev, k, sched, z))
        # and the mean is the detail-free x1: D(m_k) = D(x1)
        assert torch.allclose(down_to(F.coarse_mean(x1, k, sched), sides[k - 1]), prev)


@pytest.mark.parametrize("name", ["linear", "trig", "sbd"])
def test_interpolants_boundaries_and_derivatives(name):
    it = F.Interpolant(name)
    x0, x1 = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    I0, _ = it.path(x0, x1, torch.zeros(5, dtype=torch.float64))
    I1, _ = it.path(x0, x1, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(I0, x0) and torch.allclose(I1, x1)
    tau = torch.linspace(0.05, 0.9, 5, dtype=torch.float64)
    h = 1e-6
    Ip, _ = it.path(x0, x1, tau + h)
    Im, _ = it.path(x0, x1, tau - h)
    _, dI = it.path(x0, x1, tau)
    assert torch.allclose((Ip - Im) / (2 * h), dI, atol=1e-6)


def _oracle(batch, sched, offset=0.0):
    """Linear-interpolant oracle: knows x1, so v = (x1 - x_tau)/(1 - tau) is the exact target."""
    by_side = {x1.shape[-1]: x1 for x1 in batch.x1}

    def net(xs, taus, ys):
        return [(by_side[x.shape[-1]] - x) / (1 - t).view(-1, 1, 1, 1) + offset for x, t in zip(xs, taus)]

    return net


def test_loss_zero_for_exact_target_and_weighting():
    sched = F.Schedule.make([8, 16, 32])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 32, 32, generator=g) * 2 - 1
    t = torch.rand(64, generator=g) * 0.99
    batch = F.group_batch(x, t, torch.zeros(64, dtype=torch.long), sched)
    lin = F.Interpolant("linear")
    assert F.loss(_oracle(batch, sched), batch, sched, lin, g).loss.item() < 1e-8
    c = 0.5  # a constant error c per pixel: per-sample MSE = c^2 at every stage
    out_mean = F.loss(_oracle(batch, sched, c), batch, sched, lin, g, weight="sample_mean")
    assert out_mean.loss.item() == pytest.approx(c * c, rel=1e-4)
    # eq. 13 sums over pixels: stage k weighs d_k / d_K
    k = sched.stage_of(t)
    expect = (c * c * torch.tensor([s * s for s in sched.sides])[k].float() / 32**2).mean()
    out_sum = F.loss(_oracle(batch, sched, c), batch, sched, lin, g, weight="pixel_sum")
    assert out_sum.loss.item() == pytest.approx(expect.item(), rel=1e-4)
    assert sum(n for _, n in out_sum.per_stage.values()) == 64
    for s, n in out_sum.per_stage.values():  # kept on the device as tensors: no host sync in the step
        assert isinstance(s, torch.Tensor) and s.dim() == 0 and not s.requires_grad
        assert s.item() == pytest.approx(c * c * n, rel=1e-4)


@pytest.mark.parametrize("name", ["linear", "trig", "sbd"])
def test_data_prediction_oracle_gives_exact_velocity_and_zero_loss(name):
    """predict=data: a net that outputs the true x1 yields b = dI/dtau exactly (alpha > alpha_min)."""
    sched = F.Schedule.make([8, 16, 32])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(48, 1, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    k, tau = torch.arange(48) % 3, torch.rand(48, generator=g, dtype=torch.float64) * 0.9
    t = (k + tau) / 3  # stage k's window is [k/3, (k+1)/3); tau <= 0.9 keeps alpha above 0.05
    batch = F.group_batch(x, t, torch.zeros(48, dtype=torch.long), sched)
    by_side = {x1.shape[-1]: x1 for x1 in batch.x1}
    it = F.Interpolant(name)
    field = F.velocity_net(lambda xs, taus, ys: [by_side[v.shape[-1]] for v in xs], it, "data", 0.05)
    for k_, x1, tt in zip(batch.stage, batch.x1, batch.t):
        tau = sched.tau_of(tt, k_)
        x0 = F.source(x1, k_, sched, torch.randn(x1.shape, generator=g, dtype=x1.dtype))
        xt, dx = it.path(x0, x1, tau)
        assert torch.allclose(field([xt], [tau], [None])[0].double(), dx, atol=1e-4)
    assert F.loss(field, batch, sched, it, g).loss.item() < 1e-8
    # linear, closed form: b = (x1_hat - x_tau) / (1 - tau), floored at alpha_min near tau = 1
    xt, tau = torch.randn(2, 1, 4, 4), torch.tensor([0.5, 0.99])
    x1_hat = torch.randn(2, 1, 4, 4)
    b = F.velocity_net(lambda *a: [x1_hat], F.Interpolant("linear"), "data", 0.05)([xt], [tau], [None])[0]
    assert torch.allclose(b, (x1_hat - xt) / torch.tensor([0.5, 0.05]).view(-1, 1, 1, 1), atol=1e-5)
    assert F.velocity_net(abs, it, "velocity") is abs


def test_single_stage_is_plain_pixel_flow_matching():
    """K = 1: x0 = sigma * noise, tau = t, target x1 - x0; the loss is plain FM MSE."""
    sched = F.Schedule.make([16], sigma=1.0)
    x = torch.randn(8, 3, 16, 16)
    t = torch.rand(8)
    batch = F.group_batch(x, t, torch.zeros(8, dtype=torch.long), sched)
    assert batch.stage == [0] and torch.equal(batch.t[0], t)
    w = torch.randn(3, 3, 3, 3) * 0.1

    def net(xs, taus, ys):
        return [torch.nn.functional.conv2d(xs[0], w, padding=1) + taus[0].view(-1, 1, 1, 1)]

    out = F.loss(
        net, batch, sched, F.Interpolant("linear"), torch.Generator().manual_seed(3), weight="sample_mean"
    )
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    xt = (1 - t.view(-1, 1, 1, 1)) * noise + t.view(-1, 1, 1, 1) * x
    expect = (net([xt], [t], None)[0] - (x - noise)).pow(2).mean()
    assert out.loss.item() == pytest.approx(expect.item(), rel=1e-5)


def test_label_dropout_uses_null_class():
    sched = F.Schedule.make([8])
    seen = []

    def net(xs, taus, ys):
        seen.append(ys[0])
        return [torch.zeros_like(xs[0])]

    batch = F.group_batch(torch.randn(4000, 1, 8, 8), torch.rand(4000), torch.full((4000,), 3), sched)
    F.loss(
        net,
        batch,
        sched,
        F.Interpolant("linear"),
        torch.Generator().manual_seed(0),
        null_class=10,
        label_dropout=0.1,
    )
    frac = (seen[0] == 10).float().mean().item()
    assert set(seen[0].tolist()) == {3, 10} and abs(frac - 0.1) < 0.02


def test_transport_costs_on_fashion_mnist_match_theorem2(fmnist32):
    """Per-stage E|x1 - x0|^2 agrees with eq. 53/55 within sampling error; the sum beats one stage."""
    x = fmnist32.double()
    N = x.shape[0]
    multi = F.Schedule.make([8, 16, 32], sigma=1.0, gamma=2.0)
    single = F.Schedule.make([32], sigma=1.0)
    g = torch.Generator().manual_seed(0)
    meas = F.transport_cost(x, multi, g)
    theory = F.transport_cost_theory(x, multi)
    for k, side in enumerate(multi.sides):
        d, s = side * side, multi.sigma_k(k)
        detail = theory[k] - d * s * s
        se = math.sqrt((2 * d * s**4 + 4 * s * s * detail) / N)  # std error of the noise terms
        assert abs(meas[k] - theory[k]) < 5 * se, (k, meas[k], theory[k], se)
    L_A = F.transport_cost(x, single, g)[0]
    L_A_theory = float(x.pow(2).flatten(1).sum(1).mean()) + 32 * 32 * 1.0  # eq. 51/58
    assert abs(L_A - L_A_theory) < 5 * math.sqrt((2 * 1024 + 4 * L_A_theory) / N)
    assert sum(meas) < L_A
    # Lemma 1 holds exactly for box/nearest pyramids (U D is an orthogonal projection): the detail
    # energies, measured at full resolution, add up to the image energy.
    from cdc.flow.pyramid import up_to

    details = [up_to(down_to(x, 8), 32)]
    for k in (1, 2):
        x1 = down_to(x, multi.sides[k])
        details.append(up_to(x1 - F.coarse_mean(x1, k, multi), 32))
    energy = x.pow(2).flatten(1).sum(1).mean()
    assert sum(d.pow(2).flatten(1).sum(1).mean() for d in details).item() == pytest.approx(
        energy.item(), rel=1e-9
    )
