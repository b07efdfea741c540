"""Previews: Generator.sample(on_stage=...), `cdc sample --preview` and the diffusers pipeline's
callback_on_step_end see each stage's images once, in order, at the right side, without changing
the images; a returned tensor replaces that stage's output."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_run
from PIL import Image

from cdc import load
from cdc.sample.figures import grid, to_uint8
from cdc.sample.generate import generate

SIDES = [8, 16, 32]
RAW = {
    "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
    "flow": {"sides": SIDES},
    "sample": {"steps": [2], "cfg": [1.5], "seed": 3, "guide": ""},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("runs"), RAW)


def test_on_stage_is_called_once_per_stage_in_order_and_changes_nothing(run):
    g = load(run, device="cpu")
    calls = []
    plain, stages = g.sample(classes=[1, 4], n=4, stages=True, batch=4)
    seen = g.sample(classes=[1, 4], n=4, batch=4, on_stage=lambda s: calls.append(s))
    assert [(s.stage, s.side, s.indices, s.labels) for s in calls] == [
        (k, side, [0, 1, 2, 3], [1, 4, 1, 4]) for k, side in enumerate(SIDES)
    ]
    assert torch.equal(seen, plain)  # watching does not change the images
    for s, st in zip(calls, stages):
        assert s.x.dtype == torch.float32 and tuple(s.x.shape) == (4, 1, s.side, s.side)
        assert torch.equal(s.images, st)  # the preview is the stage output `stages=True` returns


def test_on_stage_per_batch_covers_every_image(run):
    g = load(run, device="cpu")
    calls = []
    g.sample(n=5, batch=2, on_stage=lambda s: calls.append((s.stage, tuple(s.indices))))
    assert calls == [(k, b) for b in [(0, 1), (2, 3), (4,)] for k in range(3)]


def test_a_returned_tensor_replaces_the_stage_output(run):
    g = load(run, device="cpu")

    def grey_last(s):  # the last stage's output replaced by mid-grey (0.0 -> uint8 128)
        return torch.zeros_like(s.x) if s.stage == len(SIDES) - 1 else None

    out = g.sample(n=2, on_stage=grey_last)
    assert (out == 128).all()
    with pytest.raises(ValueError, match="on_stage returned"):
        g.sample(n=2, on_stage=lambda s: torch.zeros(1))


def test_cli_preview_writes_each_stage_of_the_batch(run, tmp_path):
    a = generate(run, tmp_path / "a", n=3, batch=3, device="cpu", progress=False, preview=True)
    generate(run, tmp_path / "b", n=3, batch=3, device="cpu", progress=False)
    xa = np.load(tmp_path / "a" / "samples.npz")["arr_0"]
    assert np.array_equal(xa, np.load(tmp_path / "b" / "samples.npz")["arr_0"])
    for k in range(3):
        assert (tmp_path / "a" / "preview" / f"stage{k}.png").is_file()
    last = np.asarray(Image.open(tmp_path / "a" / "preview" / "stage2.png"))
    assert np.array_equal(
        last, grid(xa, np.asarray([0, 1, 2]))
    )  # the final stage's preview: the batch itself
    assert a["status"] == "done"


def test_diffusers_callback_on_step_end_per_stage(run, tmp_path):
    pytest.importorskip("diffusers")
    from cdc.sample.diffusers_pipeline import CDCPipeline

    pipe = CDCPipeline.from_pretrained(run)
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, t, tuple(kw["latents"].shape)))
        return kw

    out = pipe(class_labels=[2, 5], output_type="pt", callback_on_step_end=cb).images
    assert seen == [(k, (k + 1) / 3, (2, 1, s, s)) for k, s in enumerate(SIDES)]
    ref = pipe(class_labels=[2, 5], output_type="pt").images
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="tensor_inputs"):
        pipe(class_labels=[2], callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["noise"])

    def grey(p, i, t, kw):  # the returned latents replace the stage's output
        return {"latents": kw["latents"] * 0}

    out = pipe(class_labels=[2], output_type="pt", callback_on_step_end=grey).images
    assert to_uint8(torch.zeros(1, 1, 1, 1)).item() == 128
    assert torch.equal(out, torch.full_like(out, 128 / 255))
