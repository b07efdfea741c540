"""`cdc export` (safetensors + config.json + model card), exported folders read like runs, and the
Python API (cdc.load -> Generator.sample / to_pil) giving `cdc sample`'s images at the same seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cdc.config as config
import cdc.train.checkpoint as ckpt_lib
from cdc.cli import app
from cdc.sample.generate import generate
from cdc.train.export import export

FAST = dict(steps=2, cfg=2.0, progress=False, device="cpu")
SIDES = [8, 16, 32]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny run (as tests/test_generate.py's) whose EMA differs from its raw weights, with one
    metrics.jsonl line and a recipe guide step:N that the export cannot carry."""
    from cdc.nn.model import build_model

    cfg = config.from_dict({
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
        "flow": {"sides": SIDES},
        "data": {"shards": "/nonexistent/shards"},
        "sample": {"guide": "step:5", "guide_scale": [2.0]},
    })  # fmt: skip
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised layers get weights so outputs vary
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    raw = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in ema.items()}
    run = tmp_path_factory.mktemp("runs") / "tiny"
    state = {"config": config.to_dict(cfg), "model": raw, "ema": ema, "step": 10}
    ckpt_lib.save(run / "checkpoints" / "step_0000010.pt", state)
    line = {"step": 10, "loss": 0.4321, "loss_stage": {"0": 0.5, "1": 0.4, "2": 0.3}, "global_batch": 16}
    (run / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    return run


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "tiny-fp32"
    export(run_dir, out)
    return out


def _npz(out: Path) -> np.ndarray:
    with np.load(out / "samples.npz") as z:
        return z["arr_0"]  # (N, H, W, C)


def test_export_folder_contents(exported, run_dir):
    from cdc.nn.model import build_model, count_params

    assert sorted(p.name for p in exported.iterdir()) == ["README.md", "SHA256SUMS", "config.json", "model.safetensors"]
    meta = json.loads((exported / "config.json").read_text())
    assert meta["format"] == "cdc-export/2" and meta["step"] == 10 and meta["cdc_version"]
    assert meta["export"]["weights"] == "ema" and meta["export"]["dtype"] == "fp32"
    assert meta["flow"]["sides"] == SIDES and meta["sample"]["steps"] == [24]
    # the run's own step-5 guide is not in the folder: the export samples with CFG alone, and says so
    assert meta["sample"]["guide"] == "" and meta["export"]["guide_dropped"] == "step:5"
    from safetensors.torch import load_file

    ema = ckpt_lib.load(run_dir / "checkpoints" / "step_0000010.pt")["ema"]
    w = load_file(str(exported / "model.safetensors"))
    assert w.keys() == ema.keys() and all(torch.equal(w[k], ema[k]) for k in ema)  # EMA, not raw
    card = (exported / "README.md").read_text()
    cfg = config.from_dict({k: v for k, v in meta.items() if k in ("model", "flow")})
    assert "K = 3 stages at sides 8, 16, 32 px" in card
    assert f"{count_params(build_model(cfg)):,} parameters" in card
    assert "final loss at step 10: 0.4321 (per stage: 0.5000, 0.4000, 0.3000)" in card
    assert "global batch: 16" in card and "/nonexistent/shards" in card
    assert "autoguided with step:5, which could not be read at export and is not exported" in card
    assert "sha256sum -c SHA256SUMS" in card
    assert "cdc sample --ckpt DIR -n 16" in card and "from cdc import load" in card


def test_fp32_export_samples_equal_the_run_bit_for_bit(run_dir, exported, tmp_path):
    a = generate(run_dir, tmp_path / "a", n=5, classes=[3, 7], seed=4, **FAST)
    b = generate(exported, tmp_path / "b", n=5, classes=[3, 7], seed=4, **FAST)
    assert np.array_equal(_npz(tmp_path / "a"), _npz(tmp_path / "b"))
    assert b["weights"] == "ema" and b["step"] == 10 and a["step"] == 10
    # the model.safetensors path names the same folder
    generate(exported / "model.safetensors", tmp_path / "c", n=5, classes=[3, 7], seed=4, **FAST)
    assert np.array_equal(_npz(tmp_path / "a"), _npz(tmp_path / "c"))


def test_bf16_export_is_close(run_dir, tmp_path):
    out = tmp_path / "bf16"
    export(run_dir, out, dtype="bf16")
    fp32 = tmp_path / "exp32"
    export(run_dir, fp32)
    assert (out / "model.safetensors").stat().st_size < 0.6 * (fp32 / "model.safetensors").stat().st_size
    generate(run_dir, tmp_path / "a", n=4, seed=1, **FAST)
    generate(out, tmp_path / "b", n=4, seed=1, **FAST)
    d = np.abs(_npz(tmp_path / "a").astype(int) - _npz(tmp_path / "b").astype(int))
    assert d.mean() < 0.5 and d.max() <= 4, (d.mean(), d.max())  # measured: mean 0.11, max 1


def _one_line_error(args: list[str], *names: str) -> str:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.output}{r.exception!r}"
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for n in names:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_damaged_exports_are_one_line_errors(exported, tmp_path):
    import shutil

    cases = {}
    for name in ("flipped", "truncated", "notjson", "badconfig", "noweights"):
        d = tmp_path / name
        shutil.copytree(exported, d)
        cases[name] = d
    w = cases["flipped"] / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x40  # a weight's byte: safetensors would load it as another number
    w.write_bytes(bytes(data))
    w = cases["truncated"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    (cases["notjson"] / "config.json").write_text("{not json")
    meta = json.loads((exported / "config.json").read_text())
    meta["model"]["depth"] = "deep"
    (cases["badconfig"] / "config.json").write_text(json.dumps(meta))
    (cases["noweights"] / "model.safetensors").unlink()
    for name, where in (("flipped", "model.safetensors"), ("truncated", "model.safetensors"),
                        ("notjson", "config.json"), ("badconfig", "config.json"), ("noweights", "model.safetensors")):
        line = _one_line_error(["sample", "--ckpt", str(cases[name]), "--out", str(tmp_path / f"s-{name}"), "-n", "1",
                                "--device", "cpu"], str(cases[name] / where))  # fmt: skip
        assert not (tmp_path / f"s-{name}").exists(), line  # refused before any output
    # safetensors' own parser (not just the checksum) also gives one line: a header that lies
    meta = json.loads((exported / "config.json").read_text())
    bad = tmp_path / "header"
    shutil.copytree(exported, bad)
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    from cdc.train.exported import sha256_of, write_sums

    meta["export"]["sha256"] = sha256_of(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(meta))
    write_sums(bad, ["model.safetensors", "config.json"])
    _one_line_error(["sample", "--ckpt", str(bad), "--out", str(tmp_path / "s"), "-n", "1"], str(bad / "model.safetensors"))


def test_export_cli_overwrite_and_refusals(run_dir, tmp_path):
    out = tmp_path / "e"
    r = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--dtype", "bf16"])
    assert r.exit_code == 0 and "step 10" in r.output, r.output
    first = (out / "config.json").read_text()
    _one_line_error(["export", str(run_dir), "--out", str(out)], "--overwrite")
    assert (out / "config.json").read_text() == first  # untouched
    r = CliRunner().invoke(app, ["export", str(run_dir), "--out", str(out), "--overwrite"])
    assert r.exit_code == 0 and json.loads((out / "config.json").read_text())["export"]["dtype"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temp or old folder left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    _one_line_error(["export", str(run_dir), "--out", str(other), "--overwrite"], "not an export")
    _one_line_error(["export", str(run_dir), "--out", str(tmp_path / "x"), "--dtype", "fp16"], "--dtype")
    _one_line_error(["export", str(out), "--out", str(tmp_path / "y")], "already an export")


def test_api_equals_cdc_sample_and_stages(run_dir, exported, tmp_path):
    from cdc import load

    generate(run_dir, tmp_path / "s", n=6, classes=[3, 7], seed=2, **FAST)
    want = torch.from_numpy(_npz(tmp_path / "s")).permute(0, 3, 1, 2)
    for src in (run_dir, run_dir / "checkpoints" / "step_0000010.pt", exported):
        g = load(src, device="cpu")
        images = g.sample(classes=[3, 7], n=6, steps=2, cfg=2.0, seed=2)
        assert images.dtype == torch.uint8 and images.shape == (6, 1, 32, 32)
        assert torch.equal(images, want), src
    g = load(exported, device="cpu", dtype="fp32")
    images, stages = g.sample(classes=[3, 7], n=3, steps=2, cfg=2.0, seed=2, stages=True)
    assert [tuple(s.shape) for s in stages] == [(3, 1, s, s) for s in SIDES]
    assert torch.equal(stages[-1], images) and torch.equal(images, want[:3])  # per-image seeds: n-independent
    pil = g.to_pil(images)
    assert len(pil) == 3 and pil[0].size == (32, 32) and pil[0].mode == "L"
    assert np.array_equal(np.asarray(pil[1]), want[1, 0].numpy())
    with pytest.raises(ValueError, match="dtype"):
        load(exported, device="cpu", dtype="fp16")
    with pytest.raises(ValueError, match="only EMA"):
        load(exported, device="cpu", ema=False)


def test_api_defaults_come_from_the_checkpoint(run_dir, tmp_path):
    """No options: the stored sampler settings (steps [24], cfg 3, seed 0), as `cdc sample` uses them."""
    from cdc import load

    s = generate(run_dir, tmp_path / "s", n=1, progress=False, device="cpu")
    assert s["steps"] == [24, 24, 24] and s["seed"] == 0 and s["cfg"] == 3.0
    images = load(run_dir, device="cpu").sample(n=1)
    assert torch.equal(images, torch.from_numpy(_npz(tmp_path / "s")).permute(0, 3, 1, 2))


def test_readme_python_example(exported, tmp_path, monkeypatch, one_thread):
    """The README's own "From Python" code block, run as written against the tiny test model
    (its `runs/quickstart` pointed at this module's exported folder)."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"### From Python\s+```python\n(.*?)```", readme, re.S).group(1)
    assert 'load("runs/quickstart")' in block and ".save(" in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block.replace('"runs/quickstart"', repr(str(exported))), scope)
    images = scope["images"]
    assert images.shape == (8, 1, 32, 32) and images.dtype == torch.uint8
    assert Image.open(tmp_path / "first.png").size == (32, 32)
    assert torch.equal(images, scope["g"].sample(classes=[3, 7], n=8, seed=0))  # per-image seeds
