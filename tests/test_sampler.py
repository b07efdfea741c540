import pytest
import torch

from cdc.flow import matching as F
from cdc.flow.pyramid import down_to, up_to
from cdc.flow.sampler import _heun_plan, image_seed, sample

SIDES = [1, 2, 4]


def _op_matrix(fn, d_in, side_in):
    """Matrix of a linear image op acting on flattened (1, side, side) images (columns = basis)."""
    eye = torch.eye(d_in, dtype=torch.float64).view(d_in, 1, side_in, side_in)
    return fn(eye).reshape(d_in, -1).T  # (d_out, d_in)


def gaussian_problem(seed=0):
    """Data x ~ N(mu, Sigma) on 4x4 one-channel images, correlated; exact velocity at every stage."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    mu = torch.randn(d, generator=g, dtype=torch.float64) * 0.5
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3
    Sigma = a @ a.T + 0.05 * torch.eye(d, dtype=torch.float64)
    sched = F.Schedule.make(SIDES, sigma=1.0, gamma=2.0)

    def stage_net(k):
        r = SIDES[k]
        A = _op_matrix(lambda e: down_to(e, r), d, 4)  # (d_k, 16)
        S = A @ Sigma @ A.T
        m1 = A @ mu
        if k == 0:
            P = torch.zeros(r * r, r * r, dtype=torch.float64)
            s = sched.sigma
        else:
            P = _op_matrix(lambda e: up_to(down_to(e, SIDES[k - 1]), r), r * r, r)
            s = sched.sigma_k(k)
        C00 = P @ S @ P.T + s * s * torch.eye(r * r, dtype=torch.float64)
        C01 = P @ S
        m0 = P @ m1

        def b(x, tau):  # x (B, d_k); exact E[x1 - x0 | I_tau = x] for jointly Gaussian (x0, x1)
            CII = (1 - tau) ** 2 * C00 + tau**2 * S + tau * (1 - tau) * (C01 + C01.T)
            CdI = (1 - tau) * C01.T + tau * S - (1 - tau) * C00 - tau * C01
            mI = (1 - tau) * m0 + tau * m1
            return (m1 - m0) + (x - mI) @ torch.linalg.solve(CII, CdI.T)

        return b

    nets = {SIDES[k]: stage_net(k) for k in range(3)}

    def net(xs, taus, ys):
        out = []
        for x, t in zip(xs, taus):
            B, r = x.shape[0], x.shape[-1]
            taus_ = t.double().unique()
            assert len(taus_) == 1
            out.append(nets[r](x.double().reshape(B, -1), float(taus_[0])).reshape(x.shape).to(x.dtype))
        return out

    return net, sched, mu, Sigma


@pytest.mark.parametrize("solver,steps", [("euler", 64), ("heun", 24), ("sde", 200)])
def test_exact_velocity_reaches_the_data_distribution(solver, steps):
    net, sched, mu, Sigma = gaussian_problem()
    n = 3000
    y = torch.zeros(n, dtype=torch.long)
    out = sample(
        net,
        sched,
        y,
        [image_seed(1, i) for i in range(n)],
        channels=1,
        steps=steps,
        solver=solver,
        return_stages=True,
    )
    x = out.x.double().reshape(n, -1)
    se = (Sigma.diag() / n).sqrt()
    assert ((x.mean(0) - mu).abs() < 5 * se + 0.02).all()
    cov = torch.cov(x.T)
    assert (cov - Sigma).norm() / Sigma.norm() < 0.1
    # the coarsest stage alone has the right law too
    A = _op_matrix(lambda e: down_to(e, 1), 16, 4)
    c = out.stages[0].double().reshape(n)
    assert abs(c.var().item() - (A @ Sigma @ A.T).item()) < 0.1 * (A @ Sigma @ A.T).item() + 0.01


def test_heun_is_more_accurate_than_euler_at_equal_nfe():
    net, sched, mu, Sigma = gaussian_problem()
    y = torch.zeros(64, dtype=torch.long)
    seeds = [image_seed(0, i) for i in range(64)]
    ref = sample(net, sched, y, seeds, 1, steps=2000).x
    e = (sample(net, sched, y, seeds, 1, steps=32).x - ref).abs().max()
    h = (sample(net, sched, y, seeds, 1, steps=32, solver="heun").x - ref).abs().max()
    assert h < 0.5 * e


def test_heun_plan_counts_evaluations():
    for s in range(1, 12):
        plan = _heun_plan(s)
        assert sum(2 if p else 1 for p in plan) == s


class Counting:
    """A small nonlinear net mixing pixels and labels, counting evaluations per image."""

    def __init__(self, C=1, classes=10):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(C, C, 3, 3, generator=g) * 0.3
        self.emb = torch.randn(classes + 1, generator=g)
        self.rows = 0
        self.calls = 0

    def __call__(self, xs, taus, ys):
        out = []
        for x, t, y in zip(xs, taus, ys):
            self.rows += x.shape[0]
            self.calls += 1
            h = torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1))
            out.append(h + self.emb[y].view(-1, 1, 1, 1) * (1 + t.view(-1, 1, 1, 1)) - 0.3 * x)
        return out


def test_same_images_at_any_batch_size():
    sched = F.Schedule.make([4, 8, 16], sigma=1.0)
    net = Counting()
    y = torch.arange(7) % 10
    seeds = [image_seed(5, i) for i in range(7)]
    for solver in ("euler", "heun", "sde"):
        full = sample(net, sched, y, seeds, 1, steps=3, cfg=2.0, null_class=10, solver=solver).x
        one = torch.cat(
            [
                sample(
                    net,
                    sched,
                    y[i : i + 1],
                    seeds[i : i + 1],
                    1,
                    steps=3,
                    cfg=2.0,
                    null_class=10,
                    solver=solver,
                ).x
                for i in range(7)
            ]
        )
        assert torch.allclose(full, one, atol=1e-6)
    other = sample(
        net, sched, y, [image_seed(6, i) for i in range(7)], 1, steps=3, cfg=2.0, null_class=10, solver="sde"
    ).x
    assert (other - full).abs().flatten(1).amax(1).min() > 1e-3  # another run seed: every image differs
    assert len({image_seed(s, i) for s in range(50) for i in range(1000)}) == 50_000


def test_nfe_counts_with_cfg_and_interval():
    sched = F.Schedule.make([4, 8, 16])
    net = Counting()
    y = torch.arange(5)
    out = sample(net, sched, y, list(range(5)), 1, steps=4, cfg=3.0, null_class=10)
    assert out.nfe == 4 * 3 * 2 and net.rows == 4 * 3 * 2 * 5
    net2 = Counting()
    out = sample(net2, sched, y, list(range(5)), 1, steps=4, cfg=3.0, null_class=10, interval=(0.5, 1.0))
    assert out.nfe == 3 * (1 + 1 + 2 + 2) and net2.rows == out.nfe * 5
    net3 = Counting()
    assert sample(net3, sched, y, list(range(5)), 1, steps=5, solver="heun").nfe == 5 * 3


def test_cfg_scale_0_1_and_linear_rule():
    sched = F.Schedule.make([4, 8])
    net = Counting()
    y = torch.arange(4)
    seeds = list(range(4))
    cond = sample(net, sched, y, seeds, 1, steps=3, cfg=1.0, null_class=10).x
    assert torch.allclose(sample(net, sched, y, seeds, 1, steps=3, cfg=1.0).x, cond)
    uncond = sample(net, sched, torch.full_like(y, 10), seeds, 1, steps=3).x
    assert torch.allclose(sample(net, sched, y, seeds, 1, steps=3, cfg=0.0, null_class=10).x, uncond)
    assert not torch.allclose(cond, uncond)

    def guided(xs, taus, ys):  # eq. 77 by hand, as a plain conditional net
        c = net(xs, taus, ys)[0]
        u = net(xs, taus, [torch.full_like(ys[0], 10)])[0]
        return [(1 - 3.0) * u + 3.0 * c]

    assert torch.allclose(
        sample(net, sched, y, seeds, 1, steps=3, cfg=3.0, null_class=10).x,
        sample(guided, sched, y, seeds, 1, steps=3).x,
        atol=1e-6,
    )


def test_per_stage_cfg_applies_each_scale_to_its_own_stage():
    """cfg=[s1, s2]: stage k follows eq. 77 with s_k. A net that knows the stage by the input side
    and is guided by hand must give the same images; NFE counts 2 per guided evaluation only."""
    sched = F.Schedule.make([4, 8])
    net = Counting()
    y, seeds = torch.arange(4), list(range(4))
    scales = {4: 2.5, 8: 1.0}

    def guided(xs, taus, ys):  # eq. 77 with the scale of the stage this side belongs to
        s = scales[xs[0].shape[-1]]
        c = net(xs, taus, ys)[0]
        u = net(xs, taus, [torch.full_like(ys[0], 10)])[0]
        return [(1 - s) * u + s * c]

    out = sample(net, sched, y, seeds, 1, steps=3, cfg=[2.5, 1.0], null_class=10)
    assert torch.allclose(out.x, sample(guided, sched, y, seeds, 1, steps=3).x, atol=1e-6)
    assert out.nfe == 3 * 2 + 3  # stage 1 guided (2 per eval), stage 2 plain
    # one scale in a list is every stage's scale; the paper's single S_cfg is the same as [S, S]
    same = sample(net, sched, y, seeds, 1, steps=3, cfg=3.0, null_class=10).x
    assert torch.equal(sample(net, sched, y, seeds, 1, steps=3, cfg=[3.0, 3.0], null_class=10).x, same)
    assert torch.equal(sample(net, sched, y, seeds, 1, steps=3, cfg=[3.0], null_class=10).x, same)
    with pytest.raises(ValueError, match="one per stage"):
        sample(net, sched, y, seeds, 1, steps=3, cfg=[1.0, 2.0, 3.0], null_class=10)


def test_refinement_prior_is_upsampled_previous_output_plus_sigma_k_noise():
    """With a zero velocity each stage returns its source: x0^(k) = U(x^(k-1)) + sigma_k zeta."""
    sched = F.Schedule.make([2, 4, 8], sigma=1.0, gamma=2.0)

    def zero(xs, taus, ys):
        return [torch.zeros_like(x) for x in xs]

    out = sample(
        zero, sched, torch.zeros(2000, dtype=torch.long), list(range(2000)), 1, steps=1, return_stages=True
    )
    s0, s1, s2 = out.stages
    assert s0.std().item() == pytest.approx(1.0, abs=0.03)
    r1 = s1 - up_to(s0, 4)
    r2 = s2 - up_to(s1, 8)
    assert r1.std().item() == pytest.approx(0.5, abs=0.01) and r2.std().item() == pytest.approx(
        0.25, abs=0.005
    )


def _weaker() -> Counting:
    bad = Counting()
    bad.w, bad.emb = bad.w * 0.5, bad.emb * 0.3  # same family, different (worse) weights
    return bad


def test_autoguidance_is_guide_plus_w_times_the_difference_then_cfg():
    """guide_scale=[w, 1]: stage 1 follows v = v_bad + w (v_good - v_bad) (Karras et al. 2024), the
    other stage the net alone; with CFG, eq. 77 combines the autoguided fields. Checked against
    the same rules written by hand as a plain net; NFE counts both nets."""
    sched = F.Schedule.make([4, 8])
    y, seeds = torch.arange(4), list(range(4))
    good, bad = Counting(), _weaker()
    w = {4: 2.5, 8: 1.0}

    def by_hand(xs, taus, ys):
        g, b = good(xs, taus, ys)[0], bad(xs, taus, ys)[0]
        return [b + w[xs[0].shape[-1]] * (g - b)]

    for cfg in (1.0, 3.0):
        out = sample(good, sched, y, seeds, 1, steps=3, cfg=cfg, null_class=10, guide=bad, guide_scale=[2.5, 1.0])
        ref = sample(by_hand, sched, y, seeds, 1, steps=3, cfg=cfg, null_class=10)
        assert torch.allclose(out.x, ref.x, atol=1e-6)
        pair = 2 if cfg != 1.0 else 1
        assert out.nfe == 3 * pair * 2 + 3 * pair  # stage 1: both nets; stage 2: the net alone
    plain = sample(good, sched, y, seeds, 1, steps=3, cfg=3.0, null_class=10)
    assert not torch.allclose(plain.x, sample(good, sched, y, seeds, 1, steps=3, cfg=3.0, null_class=10, guide=bad, guide_scale=2.5).x)
    # weight 1 is the net alone (the guide is never called); a guide equal to the net changes nothing
    calls = bad.calls
    same = sample(good, sched, y, seeds, 1, steps=3, cfg=3.0, null_class=10, guide=bad, guide_scale=1.0)
    assert torch.equal(same.x, plain.x) and same.nfe == plain.nfe and bad.calls == calls
    twin = sample(good, sched, y, seeds, 1, steps=3, cfg=3.0, null_class=10, guide=good, guide_scale=[4.0, 2.0])
    assert torch.equal(twin.x, plain.x) and twin.nfe == 2 * plain.nfe


def test_autoguidance_bad_arguments():
    sched = F.Schedule.make([4, 8])
    y = torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="needs a guide net"):
        sample(Counting(), sched, y, [0], 1, guide_scale=2.0)
    with pytest.raises(ValueError, match="one per stage"):
        sample(Counting(), sched, y, [0], 1, guide=_weaker(), guide_scale=[2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match=">= 0"):
        sample(Counting(), sched, y, [0], 1, guide=_weaker(), guide_scale=-1.0)


def test_bad_arguments():
    sched = F.Schedule.make([4, 8])
    net = Counting()
    with pytest.raises(ValueError, match="steps"):
        sample(net, sched, torch.zeros(1, dtype=torch.long), [0], 1, steps=[1, 2, 3])
    with pytest.raises(ValueError, match="seed"):
        sample(net, sched, torch.zeros(2, dtype=torch.long), [0], 1)
    with pytest.raises(ValueError, match="linear"):
        sample(net, sched, torch.zeros(1, dtype=torch.long), [0], 1, solver="sde", interpolant="trig")
    with pytest.raises(ValueError, match="sde_eps"):  # it enters as a square root
        sample(net, sched, torch.zeros(1, dtype=torch.long), [0], 1, solver="sde", sde_eps=-0.5)


@pytest.mark.parametrize("solver", ["euler", "sde"])
def test_start_from_a_coarse_image_continues_the_same_run(solver):
    """start=(k, stage k-1 output of a full run) gives that run's final images exactly."""
    net, sched, _, _ = gaussian_problem()
    y = torch.zeros(5, dtype=torch.long)
    seeds = [image_seed(2, i) for i in range(5)]
    full = sample(net, sched, y, seeds, 1, steps=[3, 4, 5], solver=solver, return_stages=True)
    for k in (1, 2):
        part = sample(net, sched, y, seeds, 1, steps=[3, 4, 5], solver=solver, start=(k, full.stages[k - 1]))
        assert torch.equal(part.x, full.x)
    with pytest.raises(ValueError, match="start="):
        sample(net, sched, y, seeds, 1, start=(1, full.stages[1]))  # wrong side for stage 1
