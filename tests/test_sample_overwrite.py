"""`cdc sample --overwrite`: it replaces only a `cdc sample` output, and an overwrite cut short keeps
the previous samples (set aside inside --out, deleted once the new job is done)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_run
from typer.testing import CliRunner

import cdc.train.checkpoint as ckpt_lib
from cdc.cli import app
from cdc.sample.generate import generate
from cdc.sample.outdir import asides

FAST = dict(n=3, steps=1, cfg=1.0, batch=1, progress=False, device="cpu")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run with one checkpoint of a 2-stage tiny DiT whose zero-initialised layers are randomised."""
    return tiny_run(tmp_path_factory.mktemp("runs"), {
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 3, "patch": 2}, "flow": {"sides": [8, 16]}
    })


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_overwrite_refuses_a_folder_not_made_by_cdc_sample(run_dir, tmp_path):
    foreign = {
        "images/holiday.png": b"my photo",
        "samples.npz": b"someone else's",
        "stages/x.txt": b"keep",
    }
    for rel, data in foreign.items():
        (tmp_path / "a" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "a" / rel).write_bytes(data)
    # a samples.json that is JSON but not a cdc sample record does not make the folder ours either
    (tmp_path / "b" / "images").mkdir(parents=True)
    (tmp_path / "b" / "images" / "000000.png").write_bytes(b"theirs")
    (tmp_path / "b" / "samples.json").write_text(json.dumps({"status": "done", "tool": "other"}))
    runner = CliRunner()
    for name in ("a", "b"):
        out = tmp_path / name
        before = _snapshot(out)
        r = runner.invoke(app, ["sample", "--ckpt", str(run_dir), "--out", str(out), "-n", "2", "--steps", "1",
                                "--device", "cpu", "--overwrite"])  # fmt: skip
        assert r.exit_code == 2, r.output
        lines = _lines(r.output)
        assert len(lines) == 1 and "not a `cdc sample` output" in lines[0] and "nothing was deleted" in lines[0]
        assert _snapshot(out) == before


def test_overwrite_replaces_and_removes_the_previous_samples_last(run_dir, tmp_path):
    out = tmp_path / "job"
    generate(run_dir, out, seed=1, **FAST)
    (out / "notes.txt").write_text("mine")  # a file cdc did not write stays
    s = generate(run_dir, out, seed=2, overwrite=True, **FAST)
    assert s["status"] == "done" and s["seed"] == 2
    assert asides(out) == [] and (out / "notes.txt").read_text() == "mine"
    ref = tmp_path / "ref"
    generate(run_dir, ref, seed=2, **FAST)
    with np.load(out / "samples.npz") as a, np.load(ref / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])


def test_overwrite_cut_short_keeps_the_previous_samples(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "job"
    generate(run_dir, out, seed=1, **FAST)
    old = {k: v for k, v in _snapshot(out).items() if k.startswith("images/") or k == "samples.npz"}
    assert len(old) == 4

    real, calls = ckpt_lib.load_for_inference, [0]

    def crashing_load(*a, **k):  # the model dies on its 3rd forward: mid-way through the new job
        model, cfg, info = real(*a, **k)

        def forward(*x):
            calls[0] += 1
            if calls[0] > 2:
                raise RuntimeError("killed")
            return model(*x)

        return forward, cfg, info

    monkeypatch.setattr(ckpt_lib, "load_for_inference", crashing_load)
    with pytest.raises(RuntimeError, match="killed"):
        generate(run_dir, out, seed=2, overwrite=True, **FAST)
    monkeypatch.setattr(ckpt_lib, "load_for_inference", real)
    kept = asides(out)
    assert len(kept) == 1 and kept[0].name.startswith(".old-")
    assert {k: v for k, v in _snapshot(kept[0]).items() if k in old} == old  # byte for byte
    # the next plain run says where the previous samples are and what to do
    with pytest.raises(ValueError, match="--overwrite was interrupted") as e:
        generate(run_dir, out, seed=2, **FAST)
    assert str(kept[0]) in str(e.value) and "--resume" in str(e.value)
    # a resume finishes the new job and only then deletes the previous samples
    generate(run_dir, out, seed=2, resume=True, **FAST)
    assert asides(out) == []
    ref = tmp_path / "ref"
    generate(run_dir, ref, seed=2, **FAST)
    with np.load(out / "samples.npz") as a, np.load(ref / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
