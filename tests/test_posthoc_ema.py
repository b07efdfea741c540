"""Post-hoc EMA: the power-function profiles, their snapshots during training, exact resume of
both, and `cdc tune ema` rebuilding a length no profile tracked (known answers: a toy trajectory's
directly tracked power EMA; a one-hot trajectory's closed-form weights)."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from typer.testing import CliRunner

from cdc.cli import app
from cdc.config import ConfigError, from_dict
from cdc.data.prepare import prepare
from cdc.train import checkpoint as C
from cdc.train import posthoc_ema as PH
from cdc.train.loop import train
from cdc.tune.ema import Source, combine, p_dot_p, rebuild_ema, solve


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm") / "shards"
    prepare("fashion-mnist", out, limit=128, shard_size=64, progress=False)
    return out


def recipe(shards, **train):
    t = dict(batch_size=4, steps=12, lr=1e-3, log_every=4, ckpt_every=4, keep_last=10, sample_every=0,
             precision="fp32", ema_decay=0.99, ema_snapshots=4, ema_snapshot_dtype="float32")  # fmt: skip
    t.update(train)
    return tiny_recipe(shards, t, (8, 16), {"batch": 16})


# ----------------------------------------------------------------------------- the math


def test_sigma_rel_and_gamma_are_inverse_and_match_edm2():
    # EDM2's pair: sigma_rel 0.05 <-> gamma 16.97, 0.10 <-> 6.94
    assert PH.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert PH.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.01, 0.05, 0.2, 0.28):
        assert PH.gamma_to_sigma_rel(PH.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-9)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        PH.sigma_rel_to_gamma(0.3)


def test_profile_weights_are_the_continuous_kernel_of_a_piecewise_constant_trajectory():
    """theta_i = e_i (one-hot): the profile after n steps holds each step's weight, which must be
    (i^(g+1) - (i-1)^(g+1)) / n^(g+1), the kernel (g+1) tau^g / n^(g+1) integrated over (i-1, i]."""
    n = 40
    m = torch.nn.Linear(n, 1, bias=False).double()
    ema = PH.PowerEMA(m, [0.05, 0.15])
    ema.profiles = [p.double() for p in ema.profiles]
    ema._params = [list(p.parameters()) for p in ema.profiles]
    for i in range(1, n + 1):
        with torch.no_grad():
            m.weight.zero_()
            m.weight[0, i - 1] = 1.0
        ema.update(m, i)
    i = np.arange(1, n + 1, dtype=np.float64)
    for g, prof in zip(ema.gammas, ema.profiles):
        want = (i ** (g + 1) - (i - 1) ** (g + 1)) / n ** (g + 1)
        np.testing.assert_allclose(prof.weight[0].numpy(), want, rtol=1e-10, atol=1e-14)


def test_kernel_inner_products_match_numerical_integration():
    def k(t, g, tau):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    tau = np.linspace(0, 300, 3_000_001)[1:]
    for (ta, ga), (tb, gb) in [
        ((100, 6.94), (250, 16.97)),
        ((250, 3.0), (120, 6.94)),
        ((200, 5.0), (200, 5.0)),
    ]:
        num = np.trapezoid(k(ta, ga, tau) * k(tb, gb, tau), tau)
        assert p_dot_p(np.float64(ta), np.float64(ga), np.float64(tb), np.float64(gb)) == pytest.approx(
            num, rel=1e-4
        )


def test_reconstruction_equals_the_directly_tracked_power_ema():
    """A toy run with a known trajectory: snapshots of sigma_rel 0.05 and 0.10 every 50 of 2000
    steps rebuild the power EMAs of 0.03, 0.07 and 0.15 tracked directly, to ~1e-4 of weights whose
    EMA lengths differ by ~0.3 from one another."""
    torch.manual_seed(0)
    D, N, every = 64, 2000, 50
    m = torch.nn.Linear(D, 1, bias=False)
    a, b, c = torch.randn(3, D)
    tracked, direct = PH.PowerEMA(m, [0.05, 0.10]), PH.PowerEMA(m, [0.03, 0.07, 0.15])
    sources = []
    for n in range(1, N + 1):
        with torch.no_grad():
            m.weight.copy_(a + b * math.sin(n / 150) + c * (n / N) ** 2)  # drifts and oscillates
        tracked.update(m, n, keep=torch.tensor(True))  # as the training loop calls it
        direct.update(m, n)
        if n % every == 0:
            for g, prof in zip(tracked.gammas, tracked.profiles):
                sources.append(Source(n, g, {k: v.clone() for k, v in prof.state_dict().items()}))
    for i, s in enumerate([0.03, 0.07, 0.15]):
        fit = solve(sources, N, s)
        got = combine(sources, [fit], ["weight"])[0]["weight"]
        want = direct.profiles[i].weight
        spread = (want - tracked.profiles[0].weight).abs().max()
        assert fit.fit_error < 0.01
        assert (got - want).abs().max() < 2e-4 and spread > 0.3, (s, (got - want).abs().max(), spread)


def test_a_skipped_step_leaves_the_profiles_as_they_are():
    m = torch.nn.Linear(4, 1)
    ema = PH.PowerEMA(m, [0.05, 0.10])
    ema.update(m, 1)
    before = [p.weight.clone() for p in ema.profiles]
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m, 2, keep=torch.tensor(False))
    assert all(torch.equal(p.weight, w) for p, w in zip(ema.profiles, before))
    ema.update(m, 2, keep=torch.tensor(True))
    assert not torch.equal(ema.profiles[0].weight, before[0])


def test_the_masked_update_in_chunks_equals_the_lerp(monkeypatch):
    """The device-side (CUDA) path, run here on CPU tensors, against the lerp the CPU path takes."""
    assert PH._chunks([10, 10, 100, 5], 20) == [(0, 2), (2, 3), (3, 4)]
    monkeypatch.setattr(PH, "CHUNK_BYTES", 64)  # several chunks for a 4-tensor net
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    masked, lerped = PH.PowerEMA(net, [0.05, 0.10]), PH.PowerEMA(net, [0.05, 0.10])
    assert len(masked._chunks) > 1
    for n in range(1, 30):
        with torch.no_grad():
            for q in net.parameters():
                q.add_(torch.randn_like(q))
        src = [q.detach() for q in net.parameters()]
        for g, params in zip(masked.gammas, masked._params):
            masked._masked_lerp(params, src, torch.tensor(1 - PH.power_beta(n, g)))
        lerped.update(net, n, keep=torch.tensor(True))
    for a, b in zip(masked.profiles, lerped.profiles):
        for qa, qb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(qa, qb, atol=1e-5, rtol=1e-5)
    before = [q.clone() for q in masked._params[0]]
    masked._masked_lerp(masked._params[0], src, torch.tensor(0.0))  # a skipped step on CUDA
    assert all(torch.equal(a, b) for a, b in zip(before, masked._params[0]))


def test_config_checks():
    base = {"model": {"preset": "tiny"}}
    with pytest.raises(ConfigError, match="two or more distinct lengths"):
        from_dict({**base, "train": {"ema_snapshots": 10, "ema_sigma_rels": [0.05]}})
    with pytest.raises(ConfigError, match="ema_sigma_rels / eval_sigma_rel: each must be in"):
        from_dict({**base, "train": {"ema_snapshots": 10, "ema_sigma_rels": [0.05, 0.5]}})
    with pytest.raises(ConfigError, match="eval_sigma_rel needs train.ema_snapshots"):
        from_dict({**base, "train": {"eval_sigma_rel": 0.05}})
    with pytest.raises(ConfigError, match="ema_snapshot_dtype"):
        from_dict({**base, "train": {"ema_snapshot_dtype": "int8"}})


# ----------------------------------------------------------------------------- training and `cdc tune ema`


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_training_writes_snapshots_and_tune_ema_rebuilds_a_loadable_checkpoint(shards, tmp_path, one_thread):
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=10, ema_snapshot_dtype="float16")), run, progress=False)
    assert [s for s, _ in PH.list_snapshots(run)] == [4, 8, 10]  # every 4 steps, and the run's end
    snap = PH.read_snapshot(PH.list_snapshots(run)[-1][1])
    assert snap.sigma_rels == [0.05, 0.10] and all(
        v.dtype == torch.float16 for v in snap.profiles[0].values()
    )
    final = C.load(run / "checkpoints" / C.ckpt_name(10), need=C.RESUME_KEYS)
    for i in range(2):  # the last snapshot is the checkpoint's profile state, rounded to fp16
        for k, v in final["posthoc_ema"]["profiles"][i].items():
            assert torch.equal(snap.profiles[i][k], v.half()), k
    before = {p.name: _sha(p) for p in (run / "checkpoints").iterdir()}

    r = CliRunner().invoke(app, ["tune", "ema", str(run), "--sigma-rel", "0.05,0.07"])
    assert r.exit_code == 0, r.output
    out = run / "checkpoints" / "ema-posthoc-0.070-step_0000010.pt"
    assert r.output.strip().splitlines()[-1] == str(out)
    assert {
        p.name: _sha(p) for p in (run / "checkpoints").iterdir() if p.name in before
    } == before  # untouched
    model, cfg, info = C.load_for_inference(out)
    assert info["step"] == 10 and cfg.flow.sides == [8, 16]
    # a tracked length comes back as its own profile (fp16-rounded)
    st = C.load(run / "checkpoints" / "ema-posthoc-0.050-step_0000010.pt")
    assert st["posthoc"]["fit_error"] < 1e-6
    for k, v in st["ema"].items():
        if k in dict(model.named_parameters()):
            torch.testing.assert_close(v, snap.profiles[0][k].float(), atol=2e-3, rtol=0)
    first = _sha(out)
    r2 = CliRunner().invoke(app, ["tune", "ema", str(run), "--sigma-rel", "0.07"])  # a rerun is safe
    assert r2.exit_code == 0 and _sha(out) == first and C.verify(out)
    # and `cdc sample --ckpt FILE` takes it
    s = CliRunner().invoke(app, ["sample", "--ckpt", str(out), "-n", "2", "--steps", "1", "--device", "cpu",
                                 "--out", str(tmp_path / "s"), "--guide", "none"])  # fmt: skip
    assert s.exit_code == 0, s.output
    assert rebuild_ema(run, [0.1], step=8)[0].path.name == "ema-posthoc-0.100-step_0000008.pt"


def test_tune_ema_bad_input_is_one_line(shards, tmp_path, one_thread):
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=4, ema_snapshots=0)), run, progress=False)
    for args, msg in [
        ([str(run), "--sigma-rel", "0.05"], "no post-hoc EMA snapshots"),
        ([str(run), "--sigma-rel", "0.5"], "sigma_rel must be in"),
        ([str(run), "--sigma-rel", "a,b"], "--sigma-rel: expected numbers"),
    ]:
        r = CliRunner().invoke(app, ["tune", "ema", *args])
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr


def _profiles_equal(a, b):
    assert a["sigma_rels"] == b["sigma_rels"] and a["start"] == b["start"]
    for pa, pb in zip(a["profiles"], b["profiles"]):
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k


def test_snapshots_and_profiles_survive_a_resume_bit_for_bit(shards, tmp_path, one_thread):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(from_dict(recipe(shards, steps=12)), full, progress=False)
    train(from_dict(recipe(shards, steps=6)), cut, progress=False)  # ends at 6: a snapshot there too
    # a stale snapshot past the resume point (a crash after it was written) is dropped and rewritten
    extra = PH.snapshot_dir(cut) / PH.snapshot_name(9)
    extra.write_bytes(b"stale")
    train(from_dict(recipe(shards, steps=12)), cut, progress=False)
    assert not extra.exists()
    got = dict(PH.list_snapshots(cut))
    assert sorted(got) == [4, 6, 8, 12]
    for s, p in PH.list_snapshots(full):
        a, b = PH.read_snapshot(p), PH.read_snapshot(got[s])
        for pa, pb in zip(a.profiles, b.profiles):
            assert all(torch.equal(pa[k], pb[k]) for k in pa), s
    sa = C.load(full / "checkpoints" / C.ckpt_name(12), need=C.RESUME_KEYS)
    sb = C.load(cut / "checkpoints" / C.ckpt_name(12), need=C.RESUME_KEYS)
    _profiles_equal(sa["posthoc_ema"], sb["posthoc_ema"])


def test_a_checkpoint_without_profiles_resumes_and_starts_them_there(shards, tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=4, ema_snapshots=0)), run, progress=False)
    train(from_dict(recipe(shards, steps=8)), run, progress=False)
    assert "holds no post-hoc EMA profiles; they start at step 4 from the model" in capsys.readouterr().out
    snap = PH.read_snapshot(PH.list_snapshots(run)[-1][1])
    assert snap.start == 4 and [s for s, _ in PH.list_snapshots(run)] == [8]
    with pytest.raises(ConfigError, match="ema_sigma_rels"):
        train(from_dict(recipe(shards, steps=12, ema_sigma_rels=[0.04, 0.1])), run, progress=False)


def test_a_fresh_run_drops_snapshots_of_an_earlier_run_without_checkpoints(
    shards, tmp_path, one_thread, capsys
):
    run = tmp_path / "run"
    train(from_dict(recipe(shards, steps=8)), run, progress=False)
    for f in (run / "checkpoints").iterdir():
        f.unlink()
    train(from_dict(recipe(shards, steps=4, seed=1)), run, progress=False)  # another run, from step 0
    assert "removed 2 post-hoc EMA snapshot(s) of an earlier run" in capsys.readouterr().out
    assert [s for s, _ in PH.list_snapshots(run)] == [4]


@pytest.mark.gpu
def test_the_update_makes_no_host_sync_on_cuda():
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8)).cuda()
    ema = PH.PowerEMA(net, [0.05, 0.10])
    keep = torch.ones((), dtype=torch.bool, device="cuda")
    ema.update(net, 1, keep)  # lazy CUDA setup outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update(net, 2, keep)
    finally:
        torch.cuda.set_sync_debug_mode("default")
