"""recipes/k4.yaml is App. J Table 7, line by line: each row of the table is checked on the resolved
recipe (or, for data rows, on what `cdc prepare` and the loader do), so an edit cannot drift silently."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdc.config import for_world, load
from cdc.data import imageproc, prepare
from cdc.data.sources import Source
from cdc.train import loop as train

ROOT = Path(__file__).resolve().parents[1]
IMAGENET_TRAIN = 1_281_167  # ILSVRC2012 training images

# (category, parameter, value) exactly as Table 7 prints them
TABLE7 = [
    ("model", "num.attention.heads", 16),
    ("model", "attention.head.dim", 72),
    ("model", "in.channels", 3),
    ("model", "out.channels", 3),
    ("model", "depth", 28),
    ("model", "num.classes", 1000),
    ("model", "patch.size", 4),
    ("model", "attention.bias", True),
    ("model", "embed.dim", 1152),
    ("scheduler", "dropout", 0.0),
    ("scheduler", "num.train.timesteps", 1000),
    ("scheduler", "num.stages", 4),
    ("training", "diminish factor", 2.0),
    ("training", "lr", 1e-4),
    ("training", "weight_decay", 0.0),
    ("training", "epochs", 200),
    ("training", "grad.clip.norm", 1.0),
    ("training", "ema_decay", 0.9999),
    ("data", "logging_steps", 100),
    ("data", "root", "ILSVRC2012/train"),
    ("data", "center.crop", False),
    ("data", "resolution", 256),
    ("data", "expand.ratio", 1.125),
    ("data", "num.workers", 8),
    ("augmentation", "batch.size", 8),
    ("augmentation", "RandomHorizontalFlip", True),
    ("augmentation", "RandomCrop", True),
    ("augmentation", "Resize", "LANCZOS"),
    ("optimization", "Normalize", [0.5, 0.5, 0.5]),
    ("optimization", "optimizer", "AdamW"),
    ("optimization", "betas/eps", (0.9, 0.95, 1e-6)),
    ("optimization", "Learning rate", 1e-4),
    ("optimization", "precision", "bf16"),
    ("inference", "deterministic.ops", False),
    ("inference", "num.inference.steps", 24),
    ("inference", "CFG strength", 3.0),
    ("inference", "num.fid.samples", 50000),
]


@pytest.fixture(scope="module")
def k4():
    return load(ROOT / "recipes" / "k4.yaml")


def _photo_source() -> Source:
    return Source("imagenet", "x", "x", Path("."), "train", [], None, [], 3)


def _value(cfg, name: str):  # noqa: C901 - one branch per table row is the point
    m, f, d, t, s = cfg.model, cfg.flow, cfg.data, cfg.train, cfg.sample
    readme = (ROOT / "README.md").read_text()
    return {
        "num.attention.heads": m.heads,
        "attention.head.dim": m.width // m.heads,
        "in.channels": m.in_channels,
        "out.channels": _out_channels(cfg),
        "depth": m.depth,
        "num.classes": m.num_classes,
        "patch.size": m.patch,
        "attention.bias": m.attn_bias,
        "embed.dim": m.width,
        "dropout": m.dropout,
        "num.train.timesteps": f.timesteps,
        "num.stages": len(f.sides),
        "diminish factor": f.gamma,
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "epochs": round(t.steps * t.global_batch / IMAGENET_TRAIN),
        "grad.clip.norm": t.grad_clip,
        "ema_decay": t.ema_decay if not t.ema_warmup and t.warmup_steps == 0 else "warm-up",
        "logging_steps": t.log_every,
        "root": "ILSVRC2012/train"
        if d.shards == "data/ILSVRC2012-256" and _prepare_split() == "train"
        else d.shards,
        "center.crop": _prepare_defaults()[3] == "center",
        "resolution": f.sides[-1],
        "expand.ratio": _prepare_defaults()[1],
        "num.workers": d.workers,
        "batch.size": t.batch_size,
        "RandomHorizontalFlip": d.hflip,
        "RandomCrop": d.random_crop,
        "Resize": _resize_filter(),
        "Normalize": _normalize(),
        "optimizer": type(_k4_step(cfg)["optimizer"]).__name__,
        "betas/eps": (*_k4_step(cfg)["optimizer"].defaults["betas"], _k4_step(cfg)["optimizer"].defaults["eps"]),
        "Learning rate": t.lr,
        "precision": t.precision,
        "deterministic.ops": _k4_step(cfg)["deterministic"],
        "num.inference.steps": s.steps[0] if len(set(s.steps)) == 1 else s.steps,
        "CFG strength": s.cfg[0] if len(s.cfg) == 1 else s.cfg,  # one scale shared by every stage
        "num.fid.samples": 50000 if "-n 50000" in readme and "50k" in readme else None,
    }[name]


_STEP: dict[int, dict] = {}


def _k4_step(cfg) -> dict:
    """One training step of the recipe's optimisation and loader settings on a tiny model and
    Fashion-MNIST shards (CPU), watching what the trainer builds: the optimizer instance, and
    whether deterministic algorithms were switched on at any point (once per recipe object)."""
    import dataclasses
    import tempfile

    from cdc.data.prepare import prepare as prepare_shards

    if id(cfg) in _STEP:
        return _STEP[id(cfg)]
    seen: dict = {"optimizer": None, "deterministic": False}
    real_adamw, real_det = torch.optim.AdamW, torch.use_deterministic_algorithms

    class Spy(real_adamw):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen["optimizer"] = self

    def det(mode, **k):
        seen["deterministic"] |= bool(mode)
        return real_det(mode, **k)

    Spy.__name__ = real_adamw.__name__
    tiny = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, depth=1, width=32, heads=2, in_channels=1, num_classes=10),
        flow=dataclasses.replace(cfg.flow, sides=[8, 16, 32], bounds=None),
        data=dataclasses.replace(cfg.data, workers=0, shuffle=8),
        train=dataclasses.replace(
            cfg.train, steps=1, global_batch=0, grad_accum=1, precision="fp32", ckpt_every=0, sample_every=0
        ),
    )
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
        prepare_shards("fashion-mnist", Path(tmp) / "s", limit=32, progress=False)
        tiny.data.shards = str(Path(tmp) / "s")
        mp.setattr(torch.optim, "AdamW", Spy)
        mp.setattr(torch, "use_deterministic_algorithms", det)
        train.train(tiny, Path(tmp) / "run", progress=False)
        seen["deterministic"] |= torch.are_deterministic_algorithms_enabled()
    _STEP[id(cfg)] = seen
    return seen


def _resize_filter() -> str:
    """Which PIL filter `cdc prepare`'s resize matches, on a sharp image scaled by 1/4 (no crop)."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    got = np.asarray(imageproc.resize_short_side(img, 60, 4))
    for name in ("LANCZOS", "BICUBIC", "BILINEAR", "BOX", "HAMMING", "NEAREST"):
        if np.array_equal(got, np.asarray(img.resize((80, 60), getattr(Image.Resampling, name)))):
            return name
    return "?"


def _out_channels(cfg) -> int:
    from cdc.nn.model import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    return model.final.linear.out_features // cfg.model.patch**2


def _prepare_defaults() -> tuple[int, float, int, str]:
    src = _photo_source()
    side, expand, levels = prepare._defaults(src, None, None, None)
    return side, expand, levels, prepare._crop_mode(src, None)


def _prepare_split() -> str:
    return inspect.signature(prepare.prepare).parameters["split"].default


def _normalize() -> list[float]:
    """Mean/std m such that the loader's x / 127.5 - 1 equals (x / 255 - m) / m: checked on real pixels."""
    from cdc.data.geometry import crop_pixels
    from cdc.data.loader import Chunk, TrainLoader

    a = np.arange(256, dtype=np.uint8).reshape(16, 16)[..., None].repeat(3, -1)  # every uint8 value
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")

    class Geo:
        sides, T, need = [16], 16, [16]

    pixels = crop_pixels(Geo, buf.getvalue(), 1, 0, (0, 0), False)  # (C, 16, 16) uint8, as workers send
    loader = TrainLoader.__new__(TrainLoader)
    loader.device, loader.batches, loader.skipped, loader.position = torch.device("cpu"), 0, 0, 0
    chunk = Chunk([0], [torch.tensor([0])], [pixels[None]], [torch.tensor([0.5])], [torch.tensor([0])], [["k"]], [[(0, 0)]], [[False]])
    x = loader._batch(chunk).x1[0][0]  # (C, 16, 16)
    want = (torch.from_numpy(a).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.allclose(x, want, atol=1e-6)
    return [0.5, 0.5, 0.5]


@pytest.mark.parametrize(("category", "name", "value"), TABLE7, ids=[r[1] for r in TABLE7])
def test_k4_matches_table7(k4, category, name, value):
    got = _value(k4, name)
    if isinstance(value, float):
        assert got == pytest.approx(value, rel=1e-12), f"{category}/{name}"
    else:
        assert got == value, f"{category}/{name}"


@pytest.mark.parametrize("world", [1, 2, 4, 8, 16, 32])
def test_k4_global_batch_is_256_on_any_gpu_count(k4, world):
    cfg = for_world(k4, world)
    assert cfg.train.batch_size * cfg.train.grad_accum * world == 256
    assert cfg.train.grad_accum == 32 // world


def test_k4_readme_launch_line_trains_the_paper_schedule():
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if "cdc train recipes/k4.yaml" in ln)
    assert "torchrun" in line and "global batch 256" in line


# recipes/k4-512.yaml: Table 2's ImageNet-512 system (684M parameters); docs/design-notes.md "ImageNet-512"
def test_k4_512_dry_run_parameter_count_is_table2_within_1pct():
    from typer.testing import CliRunner

    from cdc.cli import app

    r = CliRunner().invoke(app, ["train", str(ROOT / "recipes" / "k4-512.yaml"), "--dry-run"])
    assert r.exit_code == 0, r.output
    n = int(r.output.rsplit("# parameters:", 1)[1].strip().replace(",", ""))
    # k4's 676,846,128 plus the patch-8 embedding and output layer: (8^2 - 4^2) x 3 px values, in and out
    assert n == 676_846_128 + 2 * 48 * 3 * 1152 + 48 * 3 == 677_178_048
    assert abs(n - 684e6) / 684e6 < 0.01
    assert not (ROOT / "runs" / "k4-512").exists()  # a dry run writes no run folder


def test_k4_512_is_k4_with_patch_8_and_sides_64_to_512(k4):
    from cdc.config import to_dict

    k512 = load(ROOT / "recipes" / "k4-512.yaml")
    assert k512.flow.sides == [64, 128, 256, 512] and k512.model.patch == 8
    # per stage the same token grids as the 256 system, so the same compute and memory per sample
    assert [s // k512.model.patch for s in k512.flow.sides] == [s // k4.model.patch for s in k4.flow.sides]
    assert k512.data.shards == "data/ILSVRC2012-512"  # `cdc prepare --src ILSVRC2012 --side 512` writes it
    a, b = to_dict(k4), to_dict(k512)
    for d in (a, b):
        del d["model"]["patch"], d["flow"]["sides"], d["data"]["shards"]
    assert a == b  # every other Table 7 value (optimiser, batch, steps, gamma, CFG, ...) is k4's
    cfg = for_world(k512, 8)
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 256
