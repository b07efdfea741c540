"""`cdc upscale`: an image at a stage's input side enters that stage; given `cdc sample`'s own stage
output it reproduces `cdc sample`'s later stages bit for bit; sizes, seeds and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_run
from PIL import Image
from typer.testing import CliRunner

from cdc import load
from cdc.cli import app
from cdc.sample import edit as E
from cdc.sample.edit_run import EditContext, upscale
from cdc.sample.figures import to_uint8
from cdc.sample.inputs import from_tensor

SIDES = [8, 16, 32]
RAW = {
    "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
    "flow": {"sides": SIDES},
    "sample": {"steps": [2], "cfg": [1.5], "seed": 3, "guide": ""},
}
FAST = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("runs"), RAW)


def _png(path, arr: np.ndarray):
    Image.fromarray(arr).save(path)
    return path


def _ctx(run, tmp_path, klass=None, **kw) -> EditContext:
    return EditContext.open(run, klass, "upscale", out=tmp_path / "unused", **{**FAST, **kw})


@pytest.mark.parametrize("solver", ["euler", "sde"])
def test_upscaling_a_stage_output_reproduces_the_later_stages_bit_for_bit(run, tmp_path, solver):
    seen = []
    final = load(run, device="cpu").sample(classes=[4], n=3, batch=3, solver=solver, on_stage=seen.append)
    ctx = _ctx(run, tmp_path, klass=4, solver=solver)
    for k in (1, 2):  # enter stage k+1 (1-based) with stage k's own float output
        edits = [E.upscale_edit(x, ctx.sched) for x in seen[k - 1].x]
        assert {e.stage for e in edits} == {k}
        out = E.run_edits(ctx.sampling, edits, n=1)
        assert torch.equal(out, seen[-1].x)  # bit-identical to cdc sample's final images
    assert final.shape == (3, 1, 32, 32)


def test_variant_j_uses_the_noise_of_seed_plus_j(run, tmp_path):
    x = torch.linspace(-0.8, 0.8, 2 * 16 * 16).view(2, 1, 16, 16)
    a = _ctx(run, tmp_path)
    edits = [E.upscale_edit(v, a.sched) for v in x]
    two = E.run_edits(a.sampling, edits, n=2)  # rows: (0, 0), (0, 1), (1, 0), (1, 1)
    b = _ctx(run, tmp_path, seed=a.sampling.seed + 1)
    one = E.run_edits(b.sampling, edits, n=1)
    assert torch.allclose(two[1::2], one, atol=1e-5)  # variant 1 = variant 0 of seed + 1 (any batch)
    assert not torch.allclose(two[0::2], one, atol=1e-3)
    # the unconditional branch: label = null class, CFG off
    assert a.sampling.label == 10 and a.settings["cfg"] == 1.0 and a.settings["classes"] == "null"


def test_cli_sizes_choice_and_folder(run, tmp_path):
    rng = np.random.default_rng(0)
    a = _png(tmp_path / "a.png", rng.integers(0, 256, (20, 28), dtype=np.uint8))  # 28 wide, 20 high
    b = _png(tmp_path / "b.png", rng.integers(0, 256, (9, 9), dtype=np.uint8))
    out = tmp_path / "up"
    r = CliRunner().invoke(app, ["upscale", str(a), str(b), "--ckpt", str(run), "--out", str(out), "-n", "2",
                                 "--device", "cpu"])  # fmt: skip
    assert r.exit_code == 0, r.output
    s = json.loads((out / "samples.json").read_text())
    assert [(i["side"], i["enters"]) for i in s["inputs"]] == [
        (16, "enters stage 3/3 (16 -> 32 px)"),
        (8, "enters stage 2/3 (8 -> 32 px)"),
    ]
    assert "centre 20x20 of 28x20, Lanczos 20 -> 16 px" in s["inputs"][0]["note"]
    assert "centre 20x20 of 28x20" in r.output  # the choice is printed
    npz = np.load(out / "samples.npz")
    assert npz["arr_0"].shape == (4, 32, 32, 1) and (npz["arr_1"] == 10).all()
    for i in range(4):
        assert Image.open(out / "images" / f"{i:06d}.png").size == (32, 32)
    assert Image.open(out / "grid.png").size == (2 + 4 * 66, 2 + 2 * 66)  # input | bicubic | 2 variants
    r = CliRunner().invoke(app, ["upscale", str(b), "--ckpt", str(run), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 2 and "--overwrite" in r.output  # a finished folder is never overwritten silently
    r = CliRunner().invoke(app, ["upscale", str(a), "--ckpt", str(run), "--out", str(out), "--device", "cpu",
                                 "--side", "8", "--overwrite"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert json.loads((out / "samples.json").read_text())["inputs"][0]["side"] == 8


def test_an_exact_side_input_enters_as_is(run, tmp_path):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    p = _png(tmp_path / "x.png", arr)
    s = upscale([p], run, out=tmp_path / "o", **FAST)
    assert s["inputs"][0]["note"] == "as is"
    x = from_tensor(torch.from_numpy(arr)[None, None], 1, SIDES)
    ctx = _ctx(run, tmp_path)
    ref = E.run_edits(ctx.sampling, [E.upscale_edit(x[0], ctx.sched)], n=1)
    got = np.load(tmp_path / "o" / "samples.npz")["arr_0"]
    assert np.array_equal(
        got[0, ..., 0], ((ref[0, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    )


def _fails(run, tmp_path, args: list[str]) -> str:
    r = CliRunner().invoke(app, [*args, "--ckpt", str(run), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_unusable_inputs_are_one_line_errors(run, tmp_path):
    rng = np.random.default_rng(2)
    colour = _png(tmp_path / "c.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    small = _png(tmp_path / "s.png", np.zeros((5, 7), np.uint8))
    text = tmp_path / "t.png"
    text.write_text("not an image")
    grey = _png(tmp_path / "g.png", np.zeros((16, 16), np.uint8))
    assert "colour image, but the model is greyscale" in _fails(run, tmp_path, ["upscale", str(colour)])
    assert "7x5 is too small" in _fails(run, tmp_path, ["upscale", str(small)])
    assert "not a recognised image format" in _fails(run, tmp_path, ["upscale", str(text)])
    assert "no such file" in _fails(run, tmp_path, ["upscale", str(tmp_path / "missing.png")])
    assert "--cfg needs --class" in _fails(run, tmp_path, ["upscale", str(grey), "--cfg", "2"])
    assert "--side 32" in _fails(run, tmp_path, ["upscale", str(grey), "--side", "32"])
    assert "--class 10: this model has classes 0..9" in _fails(
        run, tmp_path, ["upscale", str(grey), "--class", "10"]
    )
    assert not (tmp_path / "o").exists()  # a refusal writes nothing
    with pytest.raises(ValueError, match="channel"):
        from_tensor(torch.zeros(1, 3, 8, 8), 1, SIDES)
    with pytest.raises(ValueError, match="side 12"):
        from_tensor(torch.zeros(1, 1, 12, 12), 1, SIDES)


def test_python_api_upscale(run, tmp_path):
    g = load(run, device="cpu")
    seen = []
    g.sample(classes=[2], n=2, batch=2, on_stage=seen.append)
    got = g.upscale(seen[1].images, n=2)  # uint8 16-px images -> (2 * 2, 1, 32, 32)
    ctx = _ctx(run, tmp_path)
    x = seen[1].images.float() / 127.5 - 1.0
    ref = E.run_edits(ctx.sampling, [E.upscale_edit(v, ctx.sched) for v in x], n=2)
    assert got.dtype == torch.uint8 and tuple(got.shape) == (4, 1, 32, 32)
    assert torch.equal(got, torch.from_numpy(to_uint8(ref)).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="channel"):
        g.upscale(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_an_rgb_model_takes_greyscale_and_rgba_files(tmp_path):
    raw = {**RAW, "model": {**RAW["model"], "in_channels": 3}}
    run = tiny_run(tmp_path, raw)
    rng = np.random.default_rng(3)
    grey = _png(tmp_path / "g.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    rgba = _png(tmp_path / "a.png", rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    s = upscale([grey, rgba], run, out=tmp_path / "o", n=1, **FAST)
    assert [i["note"] for i in s["inputs"]] == ["as is, greyscale -> RGB", "as is, alpha composited on white"]
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape == (2, 32, 32, 3)


def test_eval_metrics_known_values():
    from cdc.sample.upscale_eval import psnr, ssim

    a = torch.randint(0, 250, (3, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert psnr(a + 1, a) == pytest.approx(10 * np.log10(255**2), abs=1e-9)  # MSE 1: 48.13 dB
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, 255 - a) < 0  # anti-correlated structure
