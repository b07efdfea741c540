from __future__ import annotations

import gzip
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python that imports this checkout's cdc: the repo goes in front of
    PYTHONPATH, which keeps whatever is already there (packages installed with --target, as
    bin/gpu-check does on a bare GPU machine)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def tiny_recipe(shards, train: dict, sides=(8, 16), sample: dict | None = None) -> dict:
    """The raw config of the smallest run a training test needs: a one-block DiT on Fashion-MNIST
    shards, batches made in-process."""
    model = {"preset": "tiny", "in_channels": 1, "num_classes": 10, "patch": 4, "depth": 1, "width": 32, "heads": 2}
    return {
        "model": model,
        "flow": {"sides": list(sides)},
        "data": {"shards": str(shards), "workers": 0},
        "train": train,
        "sample": {"steps": 2, "cfg": 2.0, "batch": 5, **(sample or {})},
    }


def free_port() -> int:
    """A loopback port free right now, for a test's torchrun store: a fixed port collides with any
    other job on the machine (or a second test run) that uses it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_configure(config):
    # index caches of shards without index.npy go to a folder of this test run, not ~/.cache/cdc
    import tempfile

    os.environ.setdefault("CDC_CACHE_DIR", tempfile.mkdtemp(prefix="cdc-test-cache-"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present (fresh clone); this test needs the shared datasets")
    return SHARED


@pytest.fixture(scope="session")
def fmnist32(shared_dir) -> torch.Tensor:
    """2000 Fashion-MNIST training images, zero-padded 28 -> 32, in [-1, 1], shape (N, 1, 32, 32)."""
    f = shared_dir / "datasets" / "fashion-mnist" / "train-images-idx3-ubyte.gz"
    if not f.is_file():
        pytest.skip(f"{f} not found")
    with gzip.open(f, "rb") as fh:
        raw = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:2000]
    x = torch.from_numpy(raw.copy()).float().div(127.5).sub(1.0)
    x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)  # pad with black (0 -> -1)
    return x.unsqueeze(1)


def smooth_image_tree(
    root: Path, per_class: int, sizes: list[tuple[int, int]], low_hw: tuple[int, int], classes: int = 3
) -> Path:
    """A class-folder tree k0/, k1/, ... of smooth RGB PNGs (random low-res noise, bicubic-upsized).

    Image i of each class has size sizes[i % len(sizes)] (width, height); seeded, so every call
    with the same arguments writes the same pixels.
    """
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"k{c}").mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            low = rng.integers(0, 256, (*low_hw, 3), dtype=np.uint8)
            Image.fromarray(low).resize((w, h), Image.BICUBIC).save(root / f"k{c}" / f"{i}.png")
    return root


def tiny_run(root: Path, raw: dict) -> Path:
    """root/tiny: a run with one step-10 checkpoint of the DiT `raw` configures, its zero-initialised
    layers randomised (seeded) so that sampling depends on every weight."""
    from cdc import config
    from cdc.nn.model import build_model
    from cdc.train import checkpoint as ckpt_lib

    cfg = config.from_dict(raw)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    sd = model.state_dict()
    run = root / "tiny"
    ckpt_lib.save(run / "checkpoints" / "step_0000010.pt", {"config": config.to_dict(cfg), "model": sd, "ema": sd, "step": 10})
    return run


def take(loader, n: int) -> list:
    """The first n batches of a loader (fails if it ends sooner)."""
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            return out
    raise AssertionError("loader ended")


@pytest.fixture
def one_thread():
    """In-process torch on one thread, like the subprocesses (OMP_NUM_THREADS=1): on a busy 2-core
    machine two threads make these tiny models ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
