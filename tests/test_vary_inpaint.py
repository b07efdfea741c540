"""`cdc vary` and `cdc inpaint`, and the sampler hooks under them (start_tau, hold): known answers
with a zero velocity field, the low-pass a last-stage variation keeps, the pixels inpainting keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_run
from PIL import Image
from typer.testing import CliRunner

from cdc.cli import app
from cdc.flow.matching import Schedule
from cdc.flow.pyramid import down_to, up_to
from cdc.flow.sampler import ImageNoise, image_seed, sample
from cdc.sample import edit as E
from cdc.sample.edit_run import EditContext, inpaint, vary

SIDES = [8, 16, 32]
RAW = {
    "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
    "flow": {"sides": SIDES},
    "sample": {"steps": [3], "cfg": [1.0], "seed": 5, "guide": ""},
}
FAST = dict(device="cpu", progress=False)
LOWPASS_TOL = 1e-5  # float: the held low-pass is exact up to rounding
IMG = torch.linspace(-0.7, 0.7, 32 * 32).view(1, 32, 32).flip(-1) * torch.linspace(0.5, 1.0, 32).view(
    1, 32, 1
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("runs"), RAW)


def _ctx(run, tmp_path, **kw) -> EditContext:
    return EditContext.open(run, None, "vary", out=tmp_path / "unused", **{**FAST, **kw})


def _zero_net(xs, taus, ys):
    return [torch.zeros_like(x) for x in xs]


def test_start_tau_with_a_zero_field_stays_at_the_sdedit_start():
    """Zero velocity: the output is the start itself, (1 - tau0)(U(D x) + sigma_k zeta) + tau0 x."""
    sched = Schedule.make([4, 8], sigma=1.0)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seeds = [image_seed(7, i) for i in range(2)]
    out = sample(
        _zero_net, sched, torch.zeros(2, dtype=torch.long), seeds, 1, steps=4, start=(1, x), start_tau=0.25
    )
    noise = ImageNoise(seeds, "cpu")
    noise((1, 4, 4))  # stage 1's source, drawn as if it had run
    zeta = noise((1, 8, 8))
    want = 0.75 * (up_to(down_to(x, 4), 8) + sched.sigma_k(1) * zeta) + 0.25 * x
    assert torch.allclose(out.x, want, atol=1e-6)
    assert out.nfe == 3  # ceil(4 * 0.75) evaluations


def test_hold_sees_every_step_of_every_stage_in_order():
    sched = Schedule.make([4, 8], sigma=1.0)
    seen = []

    def hold(st):
        seen.append((st.stage, round(st.tau, 6), tuple(st.x.shape)))
        return st.x

    for solver, steps in (("euler", 3), ("heun", 4)):
        seen.clear()
        sample(
            _zero_net, sched, torch.zeros(1, dtype=torch.long), [1], 1, steps=steps, solver=solver, hold=hold
        )
        taus = [1 / 3, 2 / 3, 1.0] if solver == "euler" else [0.5, 1.0]
        assert seen == [(k, round(t, 6), (1, 1, s, s)) for k, s in enumerate([4, 8]) for t in taus]


def test_vary_last_stage_with_strength_changes_only_detail(run, tmp_path):
    ctx = _ctx(run, tmp_path)
    edit = E.vary_edit(IMG, 3, ctx.sched, strength=0.6)
    assert (edit.stage, edit.tau0, edit.lowpass) == (2, pytest.approx(0.4), True)
    out = E.run_edits(ctx.sampling, [edit], n=3)
    low_in, low_out = down_to(IMG[None], 16), down_to(out, 16)
    assert (low_out - low_in).abs().max() < LOWPASS_TOL  # the 16-px content is the input's
    detail = out - up_to(low_out, 32)
    assert (detail - (IMG - up_to(low_in, 32))).abs().max() > 0.05  # the 32-px detail was redrawn
    assert (out[0] - out[1]).abs().max() > 0.01  # and differs between variants


def test_vary_without_strength_is_an_upscale_of_the_kept_stage(run, tmp_path):
    ctx = _ctx(run, tmp_path)
    x16 = down_to(IMG, 16)
    a = E.run_edits(ctx.sampling, [E.vary_edit(x16, 2, ctx.sched)], n=2)
    b = E.run_edits(ctx.sampling, [E.upscale_edit(x16, ctx.sched)], n=2)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="nothing finer to resample"):
        E.vary_edit(IMG, 3, ctx.sched)
    with pytest.raises(ValueError, match="--strength must be in"):
        E.vary_edit(IMG, 3, ctx.sched, strength=1.0)


def test_inpainting_keeps_every_unmasked_pixel(run, tmp_path):
    ctx = _ctx(run, tmp_path)
    mask = torch.zeros(1, 32, 32, dtype=torch.bool)
    mask[:, 5:19, 9:30] = True
    for stage in (1, 2):
        out = E.run_edits(ctx.sampling, [E.inpaint_edit(IMG, mask, ctx.sched, stage)], n=2)
        keep = ~mask.expand_as(out[0])
        assert torch.equal(out[0][keep], IMG[keep]) and torch.equal(out[1][keep], IMG[keep])  # exact (tol 0)
        assert (out[:, mask] - IMG[mask]).abs().max() > 0.05  # the hole was generated
        assert (out[0] - out[1]).abs().max() > 0.01


def _png(path, arr):
    Image.fromarray(arr).save(path)
    return path


def test_cli_vary_and_inpaint_folders_and_refusals(run, tmp_path):
    rng = np.random.default_rng(0)
    img = _png(tmp_path / "i.png", rng.integers(40, 216, (40, 40), dtype=np.uint8))
    m = np.zeros((40, 40), np.uint8)
    m[8:20, 10:30] = 255
    mask = _png(tmp_path / "m.png", m)
    s = vary(img, 2, 0.0, run, out=tmp_path / "v", n=2, **FAST)
    assert s["inputs"][0]["side"] == 16 and np.load(tmp_path / "v" / "samples.npz")["arr_0"].shape == (
        2,
        32,
        32,
        1,
    )
    s = inpaint(img, mask, 1, run, out=tmp_path / "p", n=2, **FAST)
    got = np.load(tmp_path / "p" / "samples.npz")["arr_0"][..., 0]
    src = np.asarray(Image.open(img).resize((32, 32), Image.LANCZOS))  # as cdc prepare: Lanczos 40 -> 32
    held = np.asarray(Image.open(mask).resize((32, 32), Image.BOX)) == 0
    assert held.sum() > 500
    assert np.array_equal(got[0][held], src[held]) and np.array_equal(got[1][held], src[held])  # PNGs: exact
    assert json.loads((tmp_path / "p" / "samples.json").read_text())["mask"] == str(mask)
    wrong = _png(tmp_path / "w.png", np.zeros((30, 40), np.uint8))
    r = CliRunner().invoke(app, ["inpaint", str(img), "--mask", str(wrong), "--ckpt", str(run), "--device", "cpu",
                                 "--out", str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "the mask is 40x30 but" in r.output
    r = CliRunner().invoke(app, ["vary", str(img), "--stage", "3", "--ckpt", str(run), "--device", "cpu",
                                 "--out", str(tmp_path / "x")])  # fmt: skip
    assert r.exit_code == 2 and "nothing finer to resample" in r.output
    assert not (tmp_path / "x").exists()
