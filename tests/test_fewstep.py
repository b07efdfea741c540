"""Few-step (shortcut) CDC: step-size conditioning, the self-consistency target, fine-tune, sampling."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cdc.cli import app
from cdc.config import ConfigError, from_dict
from cdc.data.prepare import prepare
from cdc.flow.matching import Interpolant, Schedule, group_batch, loss
from cdc.flow.sampler import sample
from cdc.flow.shortcut import guided_field, shortcut_loss, shortcut_mode, shortcut_targets
from cdc.nn.model import DiT
from cdc.sample.generate import generate
from cdc.train import checkpoint as C


def tiny(step_cond: bool, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(depth=2, width=32, heads=2, patch=4, in_channels=1, num_classes=3, final_side=16,
               timesteps=1000, step_cond=step_cond)


def inputs(B: int = 5, side: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 1, side, side, generator=g), torch.rand(B, generator=g), torch.randint(0, 4, (B,), generator=g)


# --- step-size conditioning -------------------------------------------------------------------


def test_step_cond_starts_as_the_ordinary_model_at_every_step_size():
    plain, few = tiny(False), tiny(True, seed=1)
    assert not any(k.startswith("d_embed") for k in plain.state_dict())  # ordinary checkpoints unchanged
    missing, unexpected = few.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("d_embed.") for k in missing)
    with torch.no_grad():  # the plain model gets non-trivial conditioning paths
        for p in plain.parameters():
            p.add_(0.05 * torch.randn_like(p))
    few.load_state_dict({**few.state_dict(), **plain.state_dict()})
    x, tau, y = inputs()
    ref = plain(x, tau, y)
    assert ref.abs().max() > 0
    assert torch.equal(few(x, tau, y), ref)  # same interface: no step size = flow mode
    for d in (0.0, 0.125, 1.0):  # zero-init embedding: every step size is the ordinary velocity
        assert torch.equal(few(x, tau, y, torch.full((5,), d)), ref)
    with pytest.raises(ValueError, match="step_cond"):
        plain(x, tau, y, torch.zeros(5))


def trained_looking(few: DiT) -> DiT:
    """Random weights where init puts zeros (step embedding out, AdaLN, head): d reaches the output."""
    with torch.no_grad():
        few.d_embed.mlp[2].weight.normal_(0, 0.5)
        for blk in few.blocks:
            blk.adaLN[-1].weight.normal_(0, 0.05)
        few.final.linear.weight.normal_(0, 0.05)
    return few


def test_step_size_changes_the_output_once_trained():
    few = trained_looking(tiny(True))
    x, tau, y = inputs()
    a, b = few(x, tau, y, torch.zeros(5)), few(x, tau, y, torch.ones(5))
    assert torch.equal(a, few(x, tau, y))  # d = 0 is still the flow mode
    assert not torch.allclose(a, b)
    # packed groups with per-group step sizes equal separate calls
    x2, t2, y2 = inputs(3, side=16)
    outs = few([x, x2], [tau, t2], [y, y2], [torch.ones(5), torch.full((3,), 0.5)])
    assert torch.allclose(outs[1], few(x2, t2, y2, torch.full((3,), 0.5)), atol=1e-5)


def test_compiled_trunk_sees_the_step_size_too():
    """train.compile runs the packed trunk through torch.compile: d must reach it as in eager."""
    few = trained_looking(tiny(True))
    x, tau, y = inputs()
    x2, t2, y2 = inputs(3, side=16)
    args = ([x, x2], [tau, t2], [y, y2], [torch.ones(5), torch.full((3,), 0.5)])
    eager, eager_flow = few(*args), few(*args[:3])
    few.compile_trunk(backend="aot_eager")  # dynamo + autograd tracing, no C++ build
    for a, b in zip(few(*args), eager, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(few(*args[:3]), eager_flow, strict=True):  # d = None: flow mode
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(eager[0], eager_flow[0])


# --- the self-consistency target on an analytic flow ------------------------------------------


LAM = 1.3  # dx/dtau = -LAM x: the exact average velocity over [tau, tau + d] is (e^{-LAM d} - 1)/d x


def oracle(xs, taus, ys, ds=None):
    """A perfect shortcut model of the linear field: instantaneous at d = 0, exact average for d > 0."""
    out = []
    for i, x in enumerate(xs):
        d = torch.zeros(len(x)) if ds is None else ds[i]
        safe = torch.where(d > 0, d, torch.ones_like(d))
        avg = torch.where(d > 0, (torch.exp(-LAM * safe) - 1) / safe, torch.full_like(d, -LAM))
        out.append(avg.view(-1, 1, 1, 1) * x)
    return out


def test_two_half_steps_of_a_perfect_model_give_the_exact_transport():
    x = torch.randn(4, 1, 8, 8)
    tau = torch.tensor([0.0, 0.2, 0.5, 0.7])
    d = torch.tensor([1.0, 0.5, 0.25, 0.25])
    (tgt,) = shortcut_targets(oracle, None, [x], [tau], [torch.zeros(4, dtype=torch.long)], [d], d_min=0.125)
    exact = ((torch.exp(-LAM * d) - 1) / d).view(-1, 1, 1, 1) * x  # (x(tau + d) - x(tau)) / d
    assert torch.allclose(tgt, exact, rtol=1e-5, atol=1e-6)


def test_smallest_step_composes_two_euler_steps_of_the_flow():
    x = torch.randn(3, 1, 8, 8)
    d = torch.full((3,), 0.125)
    y = torch.zeros(3, dtype=torch.long)
    h = 0.0625
    want = (-LAM * (1 - LAM * h / 2)) * x  # (v(x) + v(x + h v(x))) / 2 for v = -LAM x
    (self_t,) = shortcut_targets(oracle, None, [x], [torch.zeros(3)], [y], [d], d_min=0.125)
    assert torch.allclose(self_t, want, rtol=1e-5, atol=1e-6)
    # with a teacher the smallest step uses the teacher; larger steps still use the student
    teacher = lambda xs, ts, ys: [-2 * LAM * x for x in xs]  # noqa: E731
    d2 = torch.tensor([0.125, 0.5, 0.125])
    (t_t,) = shortcut_targets(oracle, teacher, [x], [torch.zeros(3)], [y], [d2], d_min=0.125)
    assert torch.allclose(t_t[[0, 2]], (-2 * LAM * (1 - 2 * LAM * h / 2)) * x[[0, 2]], rtol=1e-5)
    assert torch.allclose(t_t[1], (math.exp(-LAM * 0.5) - 1) / 0.5 * x[1], rtol=1e-5)


def test_guided_field_is_eq77():
    net = lambda xs, ts, ys: [x * (1 + y.view(-1, 1, 1, 1).float()) for x, y in zip(xs, ys)]  # noqa: E731
    x = torch.randn(2, 1, 4, 4)
    (v,) = guided_field(net, null_class=0, scale=3.0)([x], [torch.zeros(2)], [torch.tensor([1, 2])])
    v_u, v_c = x, x * torch.tensor([2.0, 3.0]).view(-1, 1, 1, 1)
    assert torch.allclose(v, v_u + 3 * (v_c - v_u))


def test_guided_field_autoguides_then_applies_cfg_per_stage():
    """Known answer per group: v = g + w (n - g) on both halves, then v_u + s (v_c - v_u), with the
    scale and weight of the group's own stage (sides 4, 8 -> stages 0, 1) in one packed call."""
    net = lambda xs, ts, ys: [x * (1 + y.view(-1, 1, 1, 1).float()) for x, y in zip(xs, ys)]  # noqa: E731
    guide = lambda xs, ts, ys: [0.5 * x + y.view(-1, 1, 1, 1).float() for x, y in zip(xs, ys)]  # noqa: E731
    calls = []
    counted = lambda xs, ts, ys: calls.append(len(xs)) or net(xs, ts, ys)  # noqa: E731
    field = guided_field(counted, 0, [2.0, 3.0], sides=[4, 8], guide=guide, guide_scale=[1.5, 4.0])
    xa, xb = torch.randn(2, 1, 4, 4), torch.randn(3, 1, 8, 8)
    ya, yb = torch.tensor([1, 2]), torch.tensor([2, 0, 1])
    va, vb = field([xa, xb], [torch.zeros(2), torch.zeros(3)], [ya, yb])
    assert calls == [2]  # both groups, both halves: one call of the net

    def expect(x, y, s, w):
        yf = y.view(-1, 1, 1, 1).float()
        n_c, n_u, g_c, g_u = x * (1 + yf), x, 0.5 * x + yf, 0.5 * x
        v_c, v_u = g_c + w * (n_c - g_c), g_u + w * (n_u - g_u)
        return v_u + s * (v_c - v_u)

    assert torch.allclose(va, expect(xa, ya, 2.0, 1.5)) and torch.allclose(vb, expect(xb, yb, 3.0, 4.0))
    assert guided_field(net, 0, [1.0], sides=[4, 8]) is net  # nothing to guide: the net itself
    (v,) = guided_field(net, 0, 1.0, sides=[4, 8], guide=guide, guide_scale=2.0)([xa], [torch.zeros(2)], [ya])
    assert torch.allclose(v, expect(xa, ya, 1.0, 2.0))  # autoguidance alone
    with pytest.raises(ValueError, match="needs a guide net"):
        guided_field(net, 0, 2.0, sides=[4, 8], guide_scale=2.0)
    with pytest.raises(ValueError, match="one per stage"):
        guided_field(net, 0, [1.0, 2.0, 3.0], sides=[4, 8])


def test_fewstep_guidance_config():
    ok = from_dict({"model": {"step_cond": True}, "fewstep": {"teacher": "init", "cfg": 3.0}})
    assert ok.fewstep.cfg == [3.0]  # a single scale, as recipes and old checkpoints store it
    bad = [
        ({"teacher": "init", "cfg": [1.0, 2.0]}, "fewstep.cfg: give one scale"),
        ({"teacher": "init", "guide_scale": 2.0}, "fewstep.guide_scale != 1 needs fewstep.guide"),
        ({"teacher": "none", "guide": "step:2"}, "fewstep.guide autoguides the teacher"),
    ]
    for fs, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict({"model": {"step_cond": True}, "fewstep": fs})


def test_fraction_zero_is_exactly_the_flow_matching_loss():
    sched, interp = Schedule.make([8, 16], sigma=1.0, gamma=2.0), Interpolant("linear")
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    batch = group_batch(x, torch.rand(6, generator=g), torch.randint(0, 3, (6,), generator=g), sched)
    net = tiny(True)
    a = shortcut_loss(net, batch, sched, interp, torch.Generator().manual_seed(0), null_class=3,
                      label_dropout=0.2, fraction=0.0)
    b = loss(net, batch, sched, interp, torch.Generator().manual_seed(0), null_class=3, label_dropout=0.2)
    assert torch.equal(a.loss, b.loss)
    c = shortcut_loss(net, batch, sched, interp, torch.Generator().manual_seed(0), fraction=0.5, levels=2)
    c.loss.backward()
    assert torch.isfinite(c.loss) and net.final.linear.weight.grad.abs().sum() > 0
    assert sum(n for _, n in c.per_stage.values()) == 6


def test_shortcut_mode_picks_trained_step_counts():
    assert shortcut_mode(True, 3, [1]) and shortcut_mode(True, 3, [1, 2, 8])
    assert not shortcut_mode(True, 3, [16]) and not shortcut_mode(True, 3, [3])
    assert not shortcut_mode(False, 3, [1])


def test_sampler_tells_the_net_its_step_size():
    seen = []

    def net(xs, taus, ys, ds=None):
        seen.append((float(taus[0][0]), None if ds is None else float(ds[0][0])))
        return [torch.zeros_like(x) for x in xs]

    sched = Schedule.make([8, 16])
    y = torch.zeros(2, dtype=torch.long)
    out = sample(net, sched, y, [0, 1], 1, steps=[1, 2], step_cond=True)
    assert seen == [(0.0, 1.0), (0.0, 0.5), (0.5, 0.5)] and out.nfe == 3
    seen.clear()
    sample(net, sched, y, [0, 1], 1, steps=2)
    assert all(d is None for _, d in seen)  # ordinary sampling calls the 3-argument interface
    with pytest.raises(ValueError, match="Euler"):
        sample(net, sched, y, [0, 1], 1, steps=2, solver="heun", step_cond=True)


# --- fine-tune from a checkpoint and sample in one step --------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from cdc.train.loop import train

    root = tmp_path_factory.mktemp("few")
    shards = root / "shards"
    prepare("fashion-mnist", shards, limit=128, shard_size=64, progress=False)
    raw = recipe(shards)
    train(from_dict(raw), root / "teacher", progress=False)
    return root, shards


def recipe(shards, **extra):
    raw = {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4},
        "flow": {"sides": [8, 16, 32]},
        "data": {"shards": str(shards), "workers": 0, "shuffle": 64},
        "train": dict(batch_size=8, steps=4, lr=1e-3, log_every=1, ckpt_every=2, keep_last=10,
                      sample_every=0, precision="fp32", ema_decay=0.99),
        "sample": {"steps": 2, "cfg": 2.0, "batch": 16},
    }
    for sec, vals in extra.items():
        raw[sec] = {**raw.get(sec, {}), **vals}
    return raw


def few_recipe(shards, **train):
    return recipe(
        shards,
        model={"step_cond": True},
        fewstep={"teacher": "init", "cfg": 2.0, "fraction": 0.5, "levels": 2},
        train={"steps": 6, "ckpt_every": 3, **train},
        sample={"steps": 1, "cfg": 1.0, "solver": "euler"},
    )


def test_fewstep_finetune_starts_from_the_teacher_and_resumes_exactly(teacher_run, tmp_path):
    import yaml

    from cdc.train.loop import train

    root, shards = teacher_run
    rec = tmp_path / "few.yaml"
    rec.write_text(yaml.safe_dump(few_recipe(shards)))
    run = tmp_path / "few"
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(run), "--init", str(root / "teacher")])
    assert res.exit_code == 0, res.output
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.train.init.endswith(C.ckpt_name(4))  # pinned to the teacher's file, not its run dir
    first = C.load(run / "checkpoints" / C.ckpt_name(3))
    assert first["step"] == 3 and "d_embed.mlp.2.weight" in first["model"]
    # resume from step 3 reproduces the uninterrupted run bit for bit
    other = tmp_path / "again"
    shutil.copytree(run, other)
    for name in (C.ckpt_name(6), C.ckpt_name(6) + ".sha256"):
        (other / "checkpoints" / name).unlink(missing_ok=True)
    train(cfg, other, progress=False)
    a, b = C.load_latest(run / "checkpoints")[0], C.load_latest(other / "checkpoints")[0]
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_teacher_autoguide_is_pinned_and_distilled(teacher_run, tmp_path):
    """fewstep.guide step:N resolves to the teacher run's own step-N file, is pinned in config.yaml,
    and the anchor the fine-tune regresses on is that guidance applied to the teacher's EMA."""
    import yaml

    from cdc.nn.model import build_model
    from cdc.train.init_from import resolve_init, start_from_init

    root, shards = teacher_run
    raw = few_recipe(shards)
    raw["fewstep"].update(cfg=[2.0, 1.5, 1.5], guide="step:2", guide_scale=2.0)
    rec = tmp_path / "few.yaml"
    rec.write_text(yaml.safe_dump(raw))
    run = tmp_path / "few"
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(run), "--init", str(root / "teacher")])
    assert res.exit_code == 0, res.output
    cfg = from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.fewstep.guide == str((root / "teacher" / "checkpoints" / C.ckpt_name(2)).resolve())
    resolve_init(cfg, run)  # a resume keeps the pinned files
    assert cfg.fewstep.guide.endswith(C.ckpt_name(2)) and cfg.train.init.endswith(C.ckpt_name(4))

    student = build_model(cfg)
    anchor = start_from_init(student, cfg, torch.device("cpu"))
    teacher, _, _ = C.load_for_inference(cfg.train.init)
    guide, _, _ = C.load_for_inference(cfg.fewstep.guide)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 1, r, r, generator=g) for r in (8, 16, 32)]
    ts = [torch.rand(3, generator=g) for _ in xs]
    ys = [torch.tensor([1, 4, 10]) for _ in xs]  # 10: the null class
    with torch.no_grad():
        got = anchor(xs, ts, ys)
        for k, (x, t, y) in enumerate(zip(xs, ts, ys)):
            both = ([torch.cat([x, x])], [torch.cat([t, t])], [torch.cat([y, torch.full_like(y, 10)])])
            n, gd = teacher(*both)[0], guide(*both)[0]
            v_c, v_u = (gd + 2.0 * (n - gd)).chunk(2)
            assert torch.allclose(got[k], v_u + [2.0, 1.5, 1.5][k] * (v_c - v_u), atol=1e-6)

    raw["fewstep"]["guide"] = "step:99"
    rec.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(tmp_path / "r"), "--init", str(root / "teacher")])
    assert res.exit_code == 2 and "fewstep.guide step:99" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_init_refuses_a_different_network(teacher_run, tmp_path):
    root, shards = teacher_run
    raw = few_recipe(shards)
    raw["model"]["width"] = 32
    raw["model"]["heads"] = 2
    raw["train"]["init"] = str(root / "teacher")
    from cdc.train.loop import train

    with pytest.raises(ConfigError, match="model.width"):
        train(from_dict(raw), tmp_path / "bad", progress=False)
    raw = few_recipe(shards)
    raw["flow"]["gamma"] = 4.0  # another source noise: another task
    raw["train"]["init"] = str(root / "teacher")
    with pytest.raises(ConfigError, match="flow.gamma"):
        train(from_dict(raw), tmp_path / "bad-gamma", progress=False)
    with pytest.raises(ConfigError, match="--init"):
        train(from_dict(few_recipe(shards)), tmp_path / "no-init", progress=False)
    import yaml

    rec = tmp_path / "few.yaml"
    rec.write_text(yaml.safe_dump(few_recipe(shards)))
    res = CliRunner().invoke(app, ["train", str(rec), "--run-dir", str(tmp_path / "r"), "--init", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "checkpoint not found" in res.output and len(res.output.strip().splitlines()) == 1


def test_one_step_sampling_is_deterministic_per_image(teacher_run, tmp_path):
    from cdc.train.loop import train

    root, shards = teacher_run
    raw = few_recipe(shards, steps=2, ckpt_every=0)
    raw["train"]["init"] = str(root / "teacher")
    train(from_dict(raw), tmp_path / "few", progress=False)
    a = generate(tmp_path / "few", tmp_path / "a", n=5, steps="1", batch=5, progress=False, device="cpu")
    b = generate(tmp_path / "few", tmp_path / "b", n=5, steps="1", batch=2, progress=False, device="cpu")
    assert a["solver"] == b["solver"] == "shortcut" and a["nfe"] == 3  # 1 forward per stage, CFG distilled
    xa, xb = np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert np.array_equal(xa, xb)
    c = generate(tmp_path / "few", tmp_path / "c", n=5, steps="16", batch=5, progress=False, device="cpu")
    assert c["solver"] == "euler" and c["nfe"] == 48  # untrained step count: the d = 0 flow
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["steps"] == [1, 1, 1]


# --- few-step guards (issue 27) ---------------------------------------------------------------


def test_teacher_cfg_only_inside_the_guidance_interval_as_the_sampler_does():
    """Per row: tau in [lo, hi) (or tau = hi = 1) gets eq. 77, other rows the conditional velocity,
    and the null forward runs only for guided rows; each row equals the sampler's own field."""
    from cdc.flow.sampler import _guided

    net = lambda xs, ts, ys: [x * (1 + y.view(-1, 1, 1, 1).float()) + t.view(-1, 1, 1, 1) for x, y, t in zip(xs, ys, ts)]  # noqa: E731
    rows = []
    counted = lambda xs, ts, ys: rows.append(sum(len(x) for x in xs)) or net(xs, ts, ys)  # noqa: E731
    tau = torch.tensor([0.0, 0.29, 0.3, 0.5, 0.8, 0.95])
    x, y = torch.randn(6, 1, 4, 4), torch.tensor([1, 2, 1, 2, 1, 2])
    (v,) = guided_field(counted, 0, 3.0, interval=(0.3, 0.8))([x], [tau], [y])
    assert rows == [6 + 2]  # 6 conditional rows, 2 unconditional (tau 0.3 and 0.5)
    yf, tv = y.view(-1, 1, 1, 1).float(), tau.view(-1, 1, 1, 1)
    v_c, v_u = x * (1 + yf) + tv, x + tv
    inside = torch.tensor([False, False, True, True, False, False]).view(-1, 1, 1, 1)
    assert torch.allclose(v, torch.where(inside, v_u + 3.0 * (v_c - v_u), v_c))
    for interval, taus in (((0.3, 0.8), tau.tolist()), ((0.5, 1.0), [0.4, 0.5, 0.99, 1.0])):
        field = guided_field(net, 0, 3.0, interval=interval)
        for t in taus:  # the sampler's field at the same tau, row by row
            want, _ = _guided(net, y[:1], 0, 3.0, interval)
            (got,) = field([x[:1]], [torch.tensor([t])], [y[:1]])
            assert torch.allclose(got, want(x[:1], t)), (interval, t)


def test_fewstep_teacher_honours_sample_interval(teacher_run, tmp_path):
    """start_from_init builds the teacher's guided field with the fine-tune's sample.interval."""
    from cdc.nn.model import build_model
    from cdc.train.init_from import start_from_init

    root, shards = teacher_run
    state = C.load(root / "teacher" / "checkpoints" / C.ckpt_name(4))
    g = torch.Generator().manual_seed(5)  # 4 steps leave the label almost unused: make it matter
    state["ema"] = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                    for k, v in state["ema"].items()}
    C.save(tmp_path / "teacher.pt", state)
    raw = few_recipe(shards)
    raw["train"]["init"] = str(tmp_path / "teacher.pt")
    raw["sample"]["interval"] = [0.25, 0.75]
    cfg = from_dict(raw)
    anchor = start_from_init(build_model(cfg), cfg, torch.device("cpu"))
    teacher, _, _ = C.load_for_inference(cfg.train.init)
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2, 3, 4])
    t = torch.tensor([0.1, 0.25, 0.6, 0.75])
    with torch.no_grad():
        (got,) = anchor([x], [t], [y])
        v_c = teacher([x], [t], [y])[0]
        v_u = teacher([x], [t], [torch.full_like(y, 10)])[0]
    assert (v_c - v_u).abs().amax((1, 2, 3)).min() > 1e-2  # guiding would change every row
    assert torch.allclose(got[[0, 3]], v_c[[0, 3]], atol=1e-5)  # outside [0.25, 0.75): unguided
    assert torch.allclose(got[[1, 2]], (v_u + 2.0 * (v_c - v_u))[[1, 2]], atol=1e-5)


def test_self_consistency_share_is_fraction_in_expectation():
    """Stage groups of 1 and 3 samples at fraction 0.25: the mean share of rows trained at d > 0 is
    0.25 per group within 4 binomial standard deviations (rounding to nearest gave 0 and 1/3); the
    same for sc_rows alone at fraction 0.6 (groups of 1, 3, 7: nearest gave 1, 2/3, 4/7)."""
    sched, interp = Schedule.make([4, 8], sigma=1.0, gamma=2.0), Interpolant("linear")
    x = torch.zeros(4, 1, 8, 8)
    batch = group_batch(x, torch.tensor([0.1, 0.6, 0.7, 0.8]), torch.zeros(4, dtype=torch.long), sched)
    assert [len(y) for y in batch.y] == [1, 3]
    last = []

    def net(xs, taus, ys, ds=None):
        last[:] = [int((d > 0).sum()) for d in ds] if ds is not None else []
        return [torch.zeros_like(v) for v in xs]

    def shares(seed: int, n: int) -> torch.Tensor:
        g, out = torch.Generator().manual_seed(seed), []
        for _ in range(n):
            shortcut_loss(net, batch, sched, interp, g, fraction=0.25, levels=2)
            out.append(last[:])
        return torch.tensor(out, dtype=torch.float64)  # (n, groups) rows at d > 0

    def within_binomial(rows: torch.Tensor, sizes, f: float) -> None:
        """Mean share per group within 4 sd of rows = floor(f n) + Bernoulli(frac(f n)), over N steps."""
        for size, col in zip(sizes, rows.T):
            p = f * size % 1
            assert set(col.tolist()) <= {int(f * size), int(f * size) + 1}
            tol = 4 * (p * (1 - p) / len(col)) ** 0.5 / size
            assert abs(col.mean().item() / size - f) < tol, (size, col.mean().item() / size, tol)

    rows = shares(7, 300)  # end to end through the loss: tolerances 0.10 and 0.033
    within_binomial(rows, (1, 3), 0.25)
    assert torch.equal(shares(7, 30), rows[:30])  # the step's generator decides: deterministic
    from cdc.flow.shortcut import sc_rows

    g = torch.Generator().manual_seed(11)  # the rounding alone, tighter: 20000 steps, fraction 0.6
    draws = torch.tensor([sc_rows([1, 3, 7], 0.6, g, "cpu") for _ in range(20000)], dtype=torch.float64)
    within_binomial(draws, (1, 3, 7), 0.6)
    before = g.get_state()
    assert sc_rows([2, 4, 0], 0.5, g, "cpu") == [1, 2, 0] and torch.equal(g.get_state(), before)  # whole: no draw


def test_guided_twice_known_answers():
    from cdc.config import FewStepConfig
    from cdc.flow.shortcut import guided_twice

    cfg_ag = FewStepConfig(teacher="init", cfg=[2.25, 1.5, 1.5], guide="g.pt", guide_scale=[2.0])
    assert guided_twice(True, cfg_ag, 1.0, "", 1.0) == []  # neutral
    assert guided_twice(True, cfg_ag, [1.0, 1.0, 2.0], "", 1.0) == ["cfg"]
    assert guided_twice(True, cfg_ag, 1.0, "step:2", 2.0) == ["guide"]
    assert guided_twice(True, cfg_ag, 3.0, "step:2", [1.0, 1.0, 1.5]) == ["cfg", "guide"]
    assert guided_twice(True, cfg_ag, 1.0, "step:2", 1.0) == []  # guide at weight 1 is off
    cfg_k1 = FewStepConfig(teacher="init", cfg=[2.0, 1.0, 1.0])  # CFG distilled in stage 1 only
    assert guided_twice(True, cfg_k1, [1.0, 3.0, 3.0], "step:2", 2.0) == []  # other stages / kind: once
    assert guided_twice(True, cfg_k1, [2.0, 3.0, 3.0], "", 1.0) == ["cfg"]
    assert guided_twice(True, FewStepConfig(teacher="none"), 3.0, "step:2", 2.0) == []  # from scratch
    assert guided_twice(False, cfg_ag, 3.0, "step:2", 2.0) == []  # an ordinary model


def test_distilled_student_refuses_a_second_guidance(teacher_run, tmp_path):
    from cdc.train.loop import train

    root, shards = teacher_run
    raw = few_recipe(shards, steps=2, ckpt_every=0)
    raw["train"]["init"] = str(root / "teacher")
    bad = {**raw, "sample": {**raw["sample"], "cfg": 3.0}}
    with pytest.raises(ConfigError, match=r"sample.cfg \[3.0\]: this few-step student has CFG \[2.0\]"):
        train(from_dict(bad), tmp_path / "bad", progress=False)  # the recipe's own sampler, at train start
    assert not (tmp_path / "bad").exists()
    train(from_dict(raw), tmp_path / "few", progress=False)
    res = CliRunner().invoke(app, ["sample", "--ckpt", str(tmp_path / "few"), "--out", str(tmp_path / "s"), "-n", "2", "--cfg", "3", "--device", "cpu"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "--cfg 3.0: this few-step student has CFG [2.0] distilled" in res.output and "--cfg 1" in res.output
    assert not (tmp_path / "s").exists()
    ok = generate(tmp_path / "few", tmp_path / "ok", n=2, cfg="1", progress=False, device="cpu")
    assert ok["cfg"] == 1.0 and ok["nfe"] == 3
    # a checkpoint that stored a guided sampler (older runs): the default refuses too, naming it
    ck = C.load_latest(tmp_path / "few" / "checkpoints")[0]
    ck["config"]["sample"]["cfg"] = [3.0]
    C.save(tmp_path / "old" / "checkpoints" / C.ckpt_name(2), ck)
    with pytest.raises(ValueError, match=r"the checkpoint's sample.cfg 3.0: .* sample it with CFG 1 \(--cfg 1"):
        generate(tmp_path / "old", tmp_path / "o", n=2, progress=False, device="cpu")
    assert generate(tmp_path / "old", tmp_path / "o", n=2, cfg=1.0, progress=False, device="cpu")["nfe"] == 3


def test_logit_normal_tau_with_step_cond_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="flow.tau_dist: logit_normal with model.step_cond .* use flow.tau_dist: uniform"):
        from_dict({"model": {"step_cond": True}, "flow": {"tau_dist": "logit_normal"}})
    from_dict({"model": {"step_cond": True}})  # uniform (the default) is fine
    from_dict({"flow": {"tau_dist": "logit_normal"}})  # and so is logit_normal without step_cond
    res = CliRunner().invoke(app, ["train", "recipes/quickstart-fewstep.yaml", "--run-dir", str(tmp_path / "r"),
                                   "--set", "flow.tau_dist=logit_normal"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
    assert "flow.tau_dist" in res.output and "model.step_cond" in res.output and not (tmp_path / "r").exists()
