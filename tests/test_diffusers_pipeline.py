"""The diffusers CDCPipeline over an exported tiny model, offline: its images equal
`cdc.load(DIR).sample(...)` at the same seed (bit for bit, fp32), in each output type."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it: never the network

import cdc.config as config  # noqa: E402
import cdc.train.checkpoint as ckpt_lib  # noqa: E402
from cdc import load  # noqa: E402
from cdc.train.export import export  # noqa: E402

diffusers = pytest.importorskip("diffusers")  # in the dev extra; skipped only where it is not installed
from diffusers import DiffusionPipeline, ImagePipelineOutput  # noqa: E402

from cdc.sample.diffusers_pipeline import CDCPipeline, write_model_index  # noqa: E402

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "cdc" / "sample" / "diffusers_pipeline.py"
LABELS = [3, 7, 1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny 3-stage run (4, 8, 16 px, 1 channel) with stored sampler settings steps 3, cfg 1.5,
    seed 9, exported in fp32."""
    from cdc.nn.model import build_model

    cfg = config.from_dict({
        "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 2},
        "flow": {"sides": [4, 8, 16]},
        "data": {"shards": "/nonexistent/shards"},
        "sample": {"steps": [3], "cfg": [1.5], "seed": 9},
    })  # fmt: skip
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():  # zero-initialised layers get weights so outputs vary
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    state = {"config": config.to_dict(cfg), "model": model.state_dict(), "ema": model.state_dict(), "step": 10}
    ckpt_lib.save(run / "checkpoints" / "step_0000010.pt", state)
    out = tmp_path_factory.mktemp("exp") / "tiny"
    export(run, out)
    return out


def _call(pipe, seed: int, output_type: str, labels=LABELS):
    return pipe(class_labels=labels, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(seed), output_type=output_type)  # fmt: skip


def test_images_equal_the_api_at_the_same_seed_in_every_output_type(exported):
    want = load(exported, device="cpu").sample(classes=LABELS, n=3, steps=2, cfg=2.0, seed=5)  # uint8 NCHW
    pipe = CDCPipeline.from_pretrained(exported)
    assert pipe.device == torch.device("cpu")
    pt = _call(pipe, 5, "pt")
    assert isinstance(pt, ImagePipelineOutput) and pt.images.dtype == torch.float32
    assert pt.images.shape == (3, 1, 16, 16) and 0 <= pt.images.min() and pt.images.max() <= 1
    assert torch.equal((pt.images * 255).round().to(torch.uint8), want)
    npy = _call(pipe, 5, "np").images
    assert isinstance(npy, np.ndarray) and npy.shape == (3, 16, 16, 1)
    assert np.array_equal((npy * 255).round().astype(np.uint8), want.permute(0, 2, 3, 1).numpy())
    pil = _call(pipe, 5, "pil").images
    assert [(im.mode, im.size) for im in pil] == [("L", (16, 16))] * 3
    assert all(np.array_equal(np.asarray(im), want[i, 0].numpy()) for i, im in enumerate(pil))
    # per-image seeds: image i depends on (seed, i) alone, so a shorter call is a prefix
    assert torch.equal(_call(pipe, 5, "pt", labels=LABELS[:2]).images, pt.images[:2])
    assert not torch.equal(_call(pipe, 6, "pt").images, pt.images)  # another seed, other images
    (tup,) = pipe(class_labels=LABELS, num_inference_steps=2, guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(5), output_type="pt", return_dict=False)  # fmt: skip
    assert torch.equal(tup, pt.images)


def test_options_left_out_come_from_the_export(exported):
    """No steps, cfg or generator: the stored steps 3, cfg 1.5, seed 9 (as `cdc sample`)."""
    want = load(exported, device="cpu").sample(classes=[4, 2], n=2, steps=3, cfg=1.5, seed=9)
    got = CDCPipeline.from_pretrained(exported)(class_labels=[4, 2], output_type="pt").images
    assert torch.equal((got * 255).round().to(torch.uint8), want)
    one = CDCPipeline.from_pretrained(exported)(class_labels=4, output_type="pt").images  # an int label
    assert torch.equal(one, got[:1])


def test_diffusion_pipeline_custom_pipeline_needs_model_index(exported, tmp_path):
    import shutil

    folder = tmp_path / "with-index"
    shutil.copytree(exported, folder)
    with pytest.raises(OSError, match="model_index.json"):  # a bare export is not a diffusers repo
        DiffusionPipeline.from_pretrained(str(folder), custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    write_model_index(folder)
    pipe = DiffusionPipeline.from_pretrained(str(folder), custom_pipeline=str(PIPELINE_FILE), trust_remote_code=True)
    assert type(pipe) is CDCPipeline  # the package's class, not a second copy from the file
    want = load(exported, device="cpu").sample(classes=LABELS, n=3, steps=2, cfg=2.0, seed=5)
    assert torch.equal((_call(pipe, 5, "pt").images * 255).round().to(torch.uint8), want)
    # the export still loads and samples as before with the index beside it
    assert torch.equal(load(folder, device="cpu").sample(classes=LABELS, n=3, steps=2, cfg=2.0, seed=5), want)


def test_bad_calls_are_one_line_errors(exported, tmp_path, monkeypatch):
    pipe = CDCPipeline.from_pretrained(exported)
    for kwargs, msg in (({"output_type": "latent"}, "output_type"), ({"class_labels": []}, "class_labels"),
                        ({"generator": [torch.Generator()]}, "one torch.Generator")):  # fmt: skip
        with pytest.raises(ValueError, match=msg) as e:
            pipe(**{"class_labels": [1], "num_inference_steps": 1, **kwargs})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="torch_dtype"):
        CDCPipeline.from_pretrained(exported, torch_dtype=torch.float16)
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="not a `cdc export` folder"):
        write_model_index(tmp_path / "x")
    # without diffusers the module's import is one line naming the extra
    monkeypatch.setitem(sys.modules, "diffusers", None)
    monkeypatch.delitem(sys.modules, "cdc.sample.diffusers_pipeline")
    with pytest.raises(ImportError, match=r"pip install 'cdc\[diffusers\]'") as e:
        import cdc.sample.diffusers_pipeline  # noqa: F401
    assert "\n" not in str(e.value)
