"""`cdc sample` / cdc.sample.generate: determinism, NFE accounting, CFG limits, resume, npz layout, CLI, torchrun."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env
from PIL import Image
from typer.testing import CliRunner

import cdc.config as config
import cdc.train.checkpoint as ckpt_lib
from cdc.sample.figures import grid, stage_rows, to_uint8
from cdc.sample.generate import generate
from cdc.sample.options import labels_for, parse_cfg, parse_classes, parse_guide, parse_steps

K = 3  # stages of the test model: sides 8, 16, 32
FAST = dict(steps=2, cfg=2.0, progress=False, device="cpu")


def _tiny_cfg():
    return config.from_dict(
        {
            "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
            "flow": {"sides": [8, 16, 32]},
        }
    )


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory with one checkpoint of a tiny DiT whose zero-initialised layers are randomised."""
    from cdc.nn.model import build_model

    cfg = _tiny_cfg()
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # AdaLN-Zero / zero output layers: give them weights so outputs vary
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    run = tmp_path_factory.mktemp("runs") / "tiny"
    state = {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 10}
    ckpt_lib.save(run / "checkpoints" / "step_0000010.pt", state)
    return run


class Counting(torch.nn.Module):
    """Wraps the model: counts forward calls and rows; optionally corrupts rows of some labels or fails."""

    def __init__(self, model, poison_label=None, fail_after=None):
        super().__init__()
        self.model, self.calls, self.rows = model, 0, 0
        self.poison_label, self.fail_after = poison_label, fail_after

    def forward(self, xs, taus, ys):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("simulated crash")
        self.rows += sum(len(y) for y in ys)
        vs = self.model(xs, taus, ys)
        if self.poison_label is not None:
            vs = [
                torch.where((y == self.poison_label).view(-1, 1, 1, 1), 1e3, v)
                for v, y in zip(vs, ys, strict=True)
            ]
        return vs


_REAL_LOAD = ckpt_lib.load_for_inference


def _patch(monkeypatch, **kw) -> list[Counting]:
    made: list[Counting] = []
    real = _REAL_LOAD  # not the current attribute: patches must not stack

    def load(*a, **k):
        model, cfg, info = real(*a, **k)
        made.append(Counting(model, **kw))
        return made[-1], cfg, info

    monkeypatch.setattr(ckpt_lib, "load_for_inference", load)
    return made


def _npz(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz") as z:
        return z["arr_0"], z["arr_1"]


# ---------------------------------------------------------------------------------------------
# helpers


def test_to_uint8_known_values():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 1, 6)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 191, 255, 255]  # round((x+1)*127.5), clamped
    assert to_uint8(torch.zeros(2, 3, 4, 5)).shape == (2, 4, 5, 3)  # NCHW -> NHWC


def test_labels_steps_classes():
    assert labels_for(5, [3, 7]).tolist() == [3, 7, 3, 7, 3]
    assert labels_for(3, [3, 7]).dtype == np.int64
    assert parse_classes("all", 4) == [0, 1, 2, 3]
    assert parse_classes("3,1", 4) == [3, 1]
    with pytest.raises(ValueError, match="class indices"):
        parse_classes("4", 4)
    assert parse_steps("4", [24], 3) == [4, 4, 4]
    assert parse_steps("1,2,3", [24], 3) == [1, 2, 3]
    assert parse_steps(None, [24], 3) == [24, 24, 24]
    with pytest.raises(ValueError, match="one per stage"):
        parse_steps("1,2", [24], 3)
    assert parse_cfg(None, [3.0], 3) == 3.0 and parse_cfg("3,3,3", [1.0], 3) == 3.0  # one scale: a number
    assert parse_cfg("2,3,3", [3.0], 3) == [2.0, 3.0, 3.0] and parse_cfg(None, [2, 3, 3], 3) == [2.0, 3.0, 3.0]
    for bad in ("2,3", "x", "-1"):
        with pytest.raises(ValueError, match="--cfg"):
            parse_cfg(bad, [3.0], 3)


def test_stage_detail_of_a_pure_upsample_is_zero():
    coarse = np.random.default_rng(0).integers(0, 256, (4, 4, 1), dtype=np.uint8)
    fine = coarse.repeat(2, 0).repeat(2, 1)  # stage 2 adds no detail
    outs, details = stage_rows([coarse, fine], min_tile=16)
    assert outs[0].shape == outs[1].shape == (16, 16, 3)
    assert np.array_equal(outs[0], outs[1])  # nearest upsampling of both to the display side
    assert (details[1] == 128).all()  # zero detail shows as mid-grey


def test_grid_one_row_per_class():
    imgs = np.stack([np.full((4, 4, 1), i, np.uint8) for i in range(12)])
    g = grid(imgs, labels_for(12, [5, 6, 7]), min_tile=4)  # 3 classes -> 3 rows of 4 samples
    pad = 2
    assert g.shape == (pad + 3 * (4 + pad), pad + 4 * (4 + pad), 3)
    assert g[pad, pad + 6, 0] == 3  # row 0 (class 5), column 1 = image 3
    # 10 classes x 10 samples (Fashion-MNIST quickstart): 8 per row, beyond the 64-image cap
    imgs = np.stack([np.full((4, 4, 1), i, np.uint8) for i in range(100)])
    g = grid(imgs, labels_for(100, list(range(10))), min_tile=4)
    assert g.shape == (pad + 10 * (4 + pad), pad + 8 * (4 + pad), 3)
    assert g[pad + 9 * 6, pad + 7 * 6, 0] == 79  # row 9 (class 9), column 7 = image 9 + 7 * 10


# ---------------------------------------------------------------------------------------------
# generate


def test_npz_layout_and_summary(run_dir, tmp_path):
    out = tmp_path / "s"
    s = generate(run_dir, out, n=6, classes="1,3", seed=5, batch=4, **FAST)
    x, y = _npz(out)
    assert x.dtype == np.uint8 and x.shape == (6, 32, 32, 1)
    assert y.dtype == np.int64 and y.tolist() == [1, 3, 1, 3, 1, 3]
    assert x.std() > 1  # a non-trivial model gives non-constant images
    png = np.asarray(Image.open(out / "images" / "000004.png"))
    assert np.array_equal(png, x[4, ..., 0])
    assert (out / "grid.png").is_file()
    meta = json.loads((out / "samples.json").read_text())
    assert meta == json.loads(json.dumps(s))
    assert meta["nfe"] == 2 * K * 2 and meta["steps"] == [2, 2, 2] and meta["step"] == 10
    assert meta["status"] == "done" and meta["n"] == 6 and meta["sec_per_image"] > 0
    assert len(meta["sec_per_image_stage"]) == K
    assert not list(out.rglob(".*tmp*"))  # no temp files left behind


def test_per_image_determinism_across_batch_sizes(run_dir, tmp_path):
    a = generate(run_dir, tmp_path / "a", n=5, batch=1, **FAST)
    b = generate(run_dir, tmp_path / "b", n=5, batch=5, **FAST)
    xa, ya = _npz(tmp_path / "a")
    xb, yb = _npz(tmp_path / "b")
    assert np.array_equal(ya, yb)
    assert np.abs(xa.astype(int) - xb.astype(int)).max() <= 1  # float reductions may differ by batch shape
    assert (xa != xb).mean() < 1e-3
    assert a["nfe"] == b["nfe"]


def test_cuda_graphs_are_off_on_cpu_and_a_negative_side_is_an_error(run_dir, tmp_path):
    a = generate(run_dir, tmp_path / "a", n=3, **FAST)
    b = generate(run_dir, tmp_path / "b", n=3, cuda_graph_side=32, **FAST)  # a CUDA-only speed option
    assert a["cuda_graph_side"] == b["cuda_graph_side"] == 0
    assert np.array_equal(_npz(tmp_path / "a")[0], _npz(tmp_path / "b")[0])
    with pytest.raises(ValueError, match="--cuda-graph-side must be >= 0"):
        generate(run_dir, tmp_path / "c", n=3, cuda_graph_side=-1, **FAST)


def test_run_seed_changes_images(run_dir, tmp_path):
    generate(run_dir, tmp_path / "a", n=3, seed=0, **FAST)
    generate(run_dir, tmp_path / "b", n=3, seed=1, **FAST)
    assert (_npz(tmp_path / "a")[0] != _npz(tmp_path / "b")[0]).mean() > 0.5


def test_steps4_with_cfg_makes_4xKx2_evaluations(run_dir, tmp_path, monkeypatch):
    made = _patch(monkeypatch)
    s = generate(run_dir, tmp_path / "o", n=3, steps=4, cfg=3.0, batch=2, progress=False, device="cpu")
    assert made[0].rows / 3 == 4 * K * 2  # per-image model evaluations (CFG pair = 2 rows)
    assert made[0].calls == 2 * 4 * K  # 2 batches, one batched cond+uncond call per step
    assert s["nfe"] == 4 * K * 2
    assert json.loads((tmp_path / "o" / "samples.json").read_text())["nfe"] == 24


def test_cfg_1_is_conditional_and_0_unconditional(run_dir, tmp_path, monkeypatch):
    null = 10  # num_classes: the null label
    kw = dict(n=4, classes="2,5", steps=2, batch=4, progress=False, device="cpu")
    generate(run_dir, tmp_path / "c1", cfg=1.0, **kw)
    generate(run_dir, tmp_path / "c0", cfg=0.0, **kw)
    made = _patch(monkeypatch, poison_label=null)  # the unconditional branch now returns garbage
    s = generate(run_dir, tmp_path / "c1p", cfg=1.0, **kw)
    assert np.array_equal(_npz(tmp_path / "c1")[0], _npz(tmp_path / "c1p")[0])  # never used at scale 1
    assert s["nfe"] == 2 * K and made[0].rows == 4 * 2 * K
    _patch(monkeypatch, poison_label=2)  # now class 2's conditional branch is garbage
    generate(run_dir, tmp_path / "c0p", cfg=0.0, **kw)
    assert np.array_equal(_npz(tmp_path / "c0")[0], _npz(tmp_path / "c0p")[0])  # never used at scale 0
    # and scale 0 ignores the label: same seeds with other classes give the same images
    generate(run_dir, tmp_path / "c0q", cfg=0.0, **{**kw, "classes": "7"})
    assert np.array_equal(_npz(tmp_path / "c0")[0], _npz(tmp_path / "c0q")[0])
    assert not np.array_equal(_npz(tmp_path / "c0")[0], _npz(tmp_path / "c1")[0])


def test_per_stage_cfg_guides_only_the_stages_it_names(run_dir, tmp_path, monkeypatch):
    kw = dict(n=2, steps=2, batch=2, progress=False, device="cpu")
    per = [2.0] + [1.0] * (K - 1)
    s = generate(run_dir, tmp_path / "p", cfg=",".join(map(str, per)), **kw)
    assert s["nfe"] == 2 * 2 + 2 * (K - 1) and s["cfg"] == per  # CFG pairs in stage 1 only
    assert json.loads((tmp_path / "p" / "samples.json").read_text())["cfg"] == per
    assert generate(run_dir, tmp_path / "u", cfg="2," * (K - 1) + "2", **kw)["cfg"] == 2.0


def test_guidance_interval_and_sde_are_wired(run_dir, tmp_path):
    s = generate(
        run_dir, tmp_path / "i", n=2, steps=4, cfg=2.0, interval="0.5,1.0", solver="sde", sde_eps=0.5,
        progress=False, device="cpu",
    )  # fmt: skip
    assert s["nfe"] == K * (2 * 2 + 2 * 1)  # taus 0, .25 plain; .5, .75 guided
    assert s["solver"] == "sde" and s["interval"] == [0.5, 1.0] and s["sde_eps"] == 0.5
    generate(run_dir, tmp_path / "e", n=2, steps=4, cfg=2.0, interval="0.5,1.0", progress=False, device="cpu")
    assert not np.array_equal(_npz(tmp_path / "i")[0], _npz(tmp_path / "e")[0])


def test_interrupted_job_resumes_to_the_same_npz(run_dir, tmp_path, monkeypatch):
    kw = dict(n=7, batch=2, **FAST)
    generate(run_dir, tmp_path / "ref", stages=True, **kw)
    out = tmp_path / "job"
    _patch(monkeypatch, fail_after=2 * K * 2 + 1)  # dies inside the 3rd batch: images 0-3 written
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate(run_dir, out, stages=True, **kw)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert not (out / "samples.npz").exists()
    (out / "images" / "000001.png").write_bytes(b"\x89PNG half")  # e.g. a file cut short by a crash
    with pytest.raises(ValueError, match="not empty"):
        generate(run_dir, out, stages=True, **kw)
    with pytest.raises(ValueError, match="cfg was 2.0"):
        generate(run_dir, out, stages=True, resume=True, **{**kw, "cfg": 3.0})
    made = _patch(monkeypatch)
    s = generate(run_dir, out, stages=True, resume=True, **kw)
    assert s["generated"] == 4 and s["resumed"] == 3 and made[0].rows == 4 * 2 * K * 2
    xr, yr = _npz(tmp_path / "ref")
    xj, yj = _npz(out)
    assert np.array_equal(xr, xj) and np.array_equal(yr, yj)
    with np.load(tmp_path / "ref" / "stages.npz") as a, np.load(out / "stages.npz") as b:
        assert sorted(a.files) == ["stage0", "stage1", "stage2"]
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
        assert a["stage0"].shape == (7, 8, 8, 1) and a["stage1"].shape == (7, 16, 16, 1)
        assert np.array_equal(a["stage2"], xr)  # the last stage's output is the image
    assert (out / "stages" / "000006.png").is_file() and (out / "stages.png").is_file()
    # nothing left to do: a second resume generates nothing and keeps the npz
    s2 = generate(run_dir, out, stages=True, resume=True, **kw)
    assert s2["generated"] == 0 and np.array_equal(_npz(out)[0], xr)
    assert s2["nfe"] == s["nfe"] == 2 * K * 2 and s2["sec_per_image"] == s["sec_per_image"]
    # --overwrite replaces the job
    s3 = generate(run_dir, out, overwrite=True, **{**kw, "n": 2})
    assert s3["generated"] == 2 and _npz(out)[0].shape[0] == 2 and not (out / "stages.npz").exists()


def _with_guide(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run with an earlier, different checkpoint (step 5) to autoguide with."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    state = torch.load(run / "checkpoints" / "step_0000010.pt", weights_only=False)
    g = torch.Generator().manual_seed(1)
    bad = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state["ema"].items()}
    ckpt_lib.save(run / "checkpoints" / "step_0000005.pt", {**state, "model": bad, "ema": bad, "step": 5})
    return run


def test_guide_options_parse():
    recipe = ("step:1000", [2.0, 3.0, 3.0])
    assert parse_guide(None, None, recipe, 3) == ("step:1000", [2.0, 3.0, 3.0])  # the recipe's
    assert parse_guide(None, "2", recipe, 3) == ("step:1000", 2.0)  # one weight: stored as one number
    assert parse_guide("none", None, recipe, 3) == ("", 1.0)  # switched off
    assert parse_guide("run/x.pt", "1.5,2,2", ("", [1.0]), 3) == ("run/x.pt", [1.5, 2.0, 2.0])
    with pytest.raises(ValueError, match="one per stage"):
        parse_guide("step:5", "2,2", recipe, 3)
    with pytest.raises(ValueError, match="--guide-scale: expected"):
        parse_guide("step:5", "two", recipe, 3)


def test_autoguidance_by_an_earlier_checkpoint_of_the_run(run_dir, tmp_path, monkeypatch):
    run = _with_guide(run_dir, tmp_path)
    kw = dict(n=3, batch=2, **FAST)
    plain = generate(run, tmp_path / "plain", **kw)
    made = _patch(monkeypatch)
    s = generate(run, tmp_path / "ag", guide="step:5", guide_scale="2,1,1", **kw)
    good, bad = made  # the sampled net, then the guide
    assert good.rows == 3 * 2 * 2 * K and bad.rows == 3 * 2 * 2  # 3 images x 2 steps x CFG pair; guide: stage 1
    assert s["nfe"] == plain["nfe"] + 2 * 2 and s["guide_scale"] == [2.0, 1.0, 1.0]
    rec = json.loads((tmp_path / "ag" / "samples.json").read_text())
    assert rec["guide"].endswith("step_0000005.pt") and rec["guide_scale"] == [2.0, 1.0, 1.0]
    assert "guide" not in plain  # records without autoguidance stay as they were
    assert not np.array_equal(_npz(tmp_path / "ag")[0], _npz(tmp_path / "plain")[0])
    # the run's own newest checkpoint as its guide: v_bad + w * 0 is the net alone, to the bit
    same = generate(run, tmp_path / "twin", guide=str(run / "checkpoints" / "step_0000010.pt"), guide_scale=3.0, **kw)
    assert np.array_equal(_npz(tmp_path / "twin")[0], _npz(tmp_path / "plain")[0]) and same["nfe"] == 2 * plain["nfe"]
    # resume checks the guide settings like any other
    with pytest.raises(ValueError, match="guide_scale was"):
        generate(run, tmp_path / "ag", guide="step:5", guide_scale=3.0, resume=True, **kw)
    with pytest.raises(FileNotFoundError, match=r"step:7: .*step_0000007.pt does not exist .*step_0000005"):
        generate(run, tmp_path / "x1", guide="step:7", guide_scale=2.0, **kw)
    with pytest.raises(ValueError, match="--guide-scale needs --guide"):
        generate(run, tmp_path / "x2", guide_scale=2.0, **kw)
    with pytest.raises(ValueError, match="step:N"):
        generate(run, tmp_path / "x3", guide="step:last", guide_scale=2.0, **kw)


def test_autoguidance_by_a_smaller_model_but_not_another_task(run_dir, tmp_path):
    from cdc.nn.model import build_model

    def save(name, model, flow):
        cfg = config.from_dict({"model": {"preset": "tiny", "in_channels": 1, **model}, "flow": flow})
        sd = build_model(cfg).state_dict()
        ckpt_lib.save(tmp_path / name, {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 1})
        return str(tmp_path / name)

    small = save("small.pt", {"num_classes": 10, "depth": 1, "width": 32, "heads": 2, "patch": 4}, {"sides": [8, 16, 32]})
    s = generate(run_dir, tmp_path / "s", guide=small, guide_scale=2.0, n=1, **FAST)
    assert s["guide"] == small and s["nfe"] == 2 * K * 2 * 2
    other = save("other.pt", {"num_classes": 5, "patch": 2}, {"sides": [8, 16, 32]})
    with pytest.raises(ValueError, match=r"model.num_classes is 5, the guided checkpoint's 10"):
        generate(run_dir, tmp_path / "o", guide=other, guide_scale=2.0, n=1, **FAST)
    other = save("sides.pt", {"num_classes": 10, "patch": 2}, {"sides": [16, 32]})
    with pytest.raises(ValueError, match=r"flow.sides is \[16, 32\]"):
        generate(run_dir, tmp_path / "o2", guide=other, guide_scale=2.0, n=1, **FAST)
    other = save("gamma.pt", {"num_classes": 10, "patch": 2}, {"sides": [8, 16, 32], "gamma": 4.0})
    with pytest.raises(ValueError, match=r"flow.gamma is 4.0, the guided checkpoint's 2.0"):
        generate(run_dir, tmp_path / "o3", guide=other, guide_scale=2.0, n=1, **FAST)


def test_a_recipe_guide_not_written_yet_falls_back_to_cfg_alone(run_dir, tmp_path, capsys):
    """A run shorter than its recipe's `sample.guide: step:N` samples with its own defaults: one
    notice, then exactly the images of `--guide none`; asked for on the command line it is an error."""
    from cdc.cli import app

    run = _with_guide(run_dir, tmp_path)  # checkpoints 5 and 10
    f = run / "checkpoints" / ckpt_lib.ckpt_name(10)
    state = ckpt_lib.load(f)  # the recipe autoguides by step 2000 (weight 2), as the quickstart's does
    state["config"]["sample"].update(guide="step:2000", guide_scale=[2.0])
    ckpt_lib.save(f, state)
    args = ["sample", "--ckpt", str(run), "-n", "2", "--steps", "2", "--cfg", "2", "--device", "cpu"]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "auto")])  # no flag needed
    assert r.exit_code == 0 and "error" not in r.output, r.output
    (note,) = [ln for ln in r.output.splitlines() if ln.startswith("note: ")]
    assert "step:2000" in note and "step_0002000.pt" in note and "CFG alone" in note and "--guide none" in note
    capsys.readouterr()
    off = generate(run, tmp_path / "off", n=2, guide="none", **FAST)
    assert capsys.readouterr().err == ""  # --guide none: no notice
    assert np.array_equal(_npz(tmp_path / "auto")[0], _npz(tmp_path / "off")[0])
    auto = json.loads((tmp_path / "auto" / "samples.json").read_text())
    assert "guide" not in auto and auto["nfe"] == off["nfe"] == K * 2 * 2  # no autoguide evaluations
    # a guide given explicitly is never dropped: one line naming the way out, nothing written
    with pytest.raises(FileNotFoundError, match=r"step:2000: .*does not exist.*--guide none"):
        generate(run, tmp_path / "x", n=2, guide="step:2000", **FAST)
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "x"), "--guide", "step:2000"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--guide none" in r.output, r.output
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_sample_newest_run_and_refusals(run_dir, tmp_path):
    from cdc.cli import app

    runner = CliRunner()
    out = tmp_path / "cli"
    args = ["sample", "--runs-dir", str(run_dir.parent), "--out", str(out), "--n", "3", "--steps", "2",
            "--cfg", "1.5", "--device", "cpu"]  # fmt: skip
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "step_0000010.pt" in r.output and "NFE 12/image" in r.output  # the newest run is named
    assert _npz(out)[0].shape == (3, 32, 32, 1)
    r = runner.invoke(app, args)  # non-empty --out
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not empty" in lines[0] and "--resume" in lines[0]
    r = runner.invoke(app, ["sample", "--ckpt", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "checkpoint not found" in lines[0]
    r = runner.invoke(app, args + ["--steps", "1,2"])
    assert r.exit_code == 2 and "--steps" in r.output
    r = runner.invoke(app, args + ["--overwrite", "--guide-scale", "2"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--guide-scale needs --guide" in lines[0]
    # a device torch does not know, or one this machine lacks; a negative SDE noise scale
    base = ["sample", "--runs-dir", str(run_dir.parent), "--out", str(tmp_path / "fresh"), "--n", "3",
            "--steps", "2", "--cfg", "1.5"]  # fmt: skip
    bad_device = "cuda:7" if torch.cuda.is_available() else "cuda"
    for extra, needle in [(["--device", "gpu0"], "not a torch device"), (["--device", bad_device], "--device"),
                          (["--device", "cpu", "--solver", "sde", "--sde-eps", "-1"], "sde_eps (--sde-eps) must be >= 0")]:  # fmt: skip
        r = runner.invoke(app, base + extra)
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and needle in lines[0], r.output
        assert not (tmp_path / "fresh" / "samples.npz").exists()


def test_torchrun_two_ranks_equal_one(run_dir, tmp_path):
    # `-n`, not `--n`: torchrun's parser rejects `--n` as an ambiguous prefix of its own options
    common = [
        "--ckpt",
        str(run_dir),
        "-n",
        "5",
        "--steps",
        "2",
        "--cfg",
        "2",
        "--batch",
        "2",
        "--device",
        "cpu",
    ]
    env = subprocess_env(OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cdc",
    ]
    p = subprocess.run(
        cmd + ["sample", "--out", str(tmp_path / "two"), *common],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    generate(run_dir, tmp_path / "one", n=5, steps=2, cfg=2.0, batch=3, progress=False, device="cpu")
    x1, y1 = _npz(tmp_path / "one")
    x2, y2 = _npz(tmp_path / "two")
    assert np.array_equal(y1, y2)
    assert np.abs(x1.astype(int) - x2.astype(int)).max() <= 1 and (x1 != x2).mean() < 1e-3
    meta = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert meta["world_size"] == 2 and meta["generated"] == 5



@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cli_sample_with_a_record_and_a_resume_command(run_dir, tmp_path, sig, one_thread):
    from cdc.cli import app

    out, n = tmp_path / "job", 40
    args = ["sample", "--ckpt", str(run_dir), "--out", str(out), "-n", str(n), "--steps", "2", "--batch", "1",
            "--device", "cpu"]  # fmt: skip
    p = subprocess.Popen(
        [sys.executable, "-m", "cdc", *args], env=subprocess_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip  (SIGINT as in a terminal, even where this test's runner ignores it)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "images").glob("*.png"))) < 3:
        time.sleep(0.02)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err[-2000:]  # 130 / 143
    saved = sorted(f.name for f in (out / "images").glob("*.png"))
    k = len(saved)
    assert 3 <= k < n and saved == [f"{i:06d}.png" for i in range(k)]  # one rank: images in order
    meta = json.loads((out / "samples.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == sig.name and meta["images_saved"] == k
    ckpt = (run_dir / "checkpoints" / "step_0000010.pt").resolve()
    cmd = f"cdc sample --ckpt {ckpt} --out {out} -n {n} --steps 2 --batch 1 --resume --device cpu"
    line = f"stopped by signal {sig.name}; {k} of {n} images saved in {out}; continue with: {cmd}"
    assert [ln for ln in err.splitlines() if "stopped" in ln] == [line]
    # the printed command finishes the job: only the missing images are made
    r = CliRunner().invoke(app, shlex.split(cmd)[1:])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "samples.json").read_text())
    assert meta["status"] == "done" and meta["resumed"] == k and meta["generated"] == n - k
    assert _npz(out)[0].shape[0] == n
