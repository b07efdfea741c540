"""In-domain judge for Fashion-MNIST samples: a small CNN classifier on 32-px zero-padded images.

Inception FID needs weights that are not available offline and was never trained on 28-px
greyscale clothing, so for Fashion-MNIST we judge samples with our own classifier:

- accuracy: the fraction of samples classified as the class they were generated for;
- Frechet distance ("FD-clf") between Gaussian fits of the classifier's penultimate features
  (256-d) of the samples and of the real test split.

The classifier trains in about a minute on CPU on the full train split (60k images, from
/work/shared/datasets/fashion-mnist or FMNIST_ROOT) or, when that is absent, the bundled 10k
subset in cdc/assets; it is deterministic for a seed and cached to a .pt file together with the
test-split feature statistics. CLI: `python -m cdc.eval.fmnist SAMPLES.npz [--clf PATH]` (JSON);
`python -m cdc.eval.fmnist --probe RUN` measures, per refinement stage, accuracy from real coarse
images and how much the class label changes the output (see probe_stages).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from cdc.data.sources import ASSETS, _find_one, _read_idx
from cdc.eval.metrics import frechet_distance, gaussian_stats
from cdc.fileio import atomic_write_bytes, one_line

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "fashion-mnist"
DEFAULT_CLF = Path("runs") / "fmnist-classifier.pt"
FEAT_DIM = 256


def data_root() -> Path:
    """Where the full Fashion-MNIST idx files are (FMNIST_ROOT, ../shared), else the bundled subset."""
    env = os.environ.get("FMNIST_ROOT")
    for p in [Path(env)] if env else [SHARED]:
        if p.is_dir() and _find_one(p, "t10k-images-idx3-ubyte") is not None:
            return p
    return ASSETS


def load_split(split: str, root: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 32, 32) in [-1, 1], zero-padded from 28 px as `cdc prepare` does, and labels (N,)."""
    root = Path(root) if root is not None else data_root()
    prefix = "train" if split == "train" else "t10k"
    img, lab = _find_one(root, f"{prefix}-images-idx3-ubyte"), _find_one(root, f"{prefix}-labels-idx1-ubyte")
    if img is None or lab is None:
        raise FileNotFoundError(f"{root}: need {prefix}-images/labels idx files (Fashion-MNIST)")
    x = torch.from_numpy(_read_idx(img, 0x803, 3).copy())  # (N, 28, 28) uint8
    y = torch.from_numpy(_read_idx(lab, 0x801, 1).astype(np.int64))
    x = F.pad(x, (2, 2, 2, 2))  # (N, 32, 32); background 0 -> -1 below
    return to_float(x[:, None]), y


def to_float(u8: Tensor | np.ndarray) -> Tensor:
    """uint8 images (N, 1, H, W) or NHWC (N, H, W, 1) -> float (N, 1, H, W) in [-1, 1]."""
    t = torch.as_tensor(u8)
    if t.ndim == 4 and t.shape[-1] in (1, 3) and t.shape[1] not in (1, 3):
        t = t.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if t.shape[1] == 3:
        t = t.float().mean(1, keepdim=True)
    return t.float() / 127.5 - 1.0


class Classifier(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 px) and a 256-d penultimate layer; ~0.35M parameters.

    `channels`, `num_classes` and `side` let the same judge serve other small datasets (the
    imagenet-mini judge of bin/grow-judge: RGB, 200 classes, 64 px)."""

    def __init__(self, width: int = 16, num_classes: int = 10, channels: int = 1, side: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.GroupNorm(8, cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(channels, w), block(w, 2 * w), block(2 * w, 4 * w))
        self.feat = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * (side // 8) ** 2, FEAT_DIM), nn.ReLU(inplace=True))
        self.head = nn.Linear(FEAT_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.feat(self.body(x))  # (B, 256)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def _batched(fn, x: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def train_classifier(
    x: Tensor, y: Tensor, epochs: int = 2, batch: int = 128, lr: float = 2e-3, seed: int = 0, width: int = 16,
    progress: bool = False, num_classes: int = 10,
) -> Classifier:  # fmt: skip
    """Adam with a one-cycle-like cosine lr; random 1-px shifts so it tolerates slight misplacement.

    `progress`: a tqdm bar (epoch, loss) on a terminal, else one stderr line per epoch, so a minute
    of training never looks like a hang (in a log file too).
    """
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = Classifier(width, num_classes, x.shape[1], x.shape[-1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    tty = progress and sys.stderr.isatty()
    bar = tqdm(total=steps, desc="judge", unit="step", file=sys.stderr, disable=not tty)
    t0 = time.perf_counter()
    for ep in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total, count = 0.0, 0
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            xb = x[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, (dx, dy), (2, 3))  # background is flat, so a roll is a shift
            if torch.rand((), generator=g) < 0.5:
                xb = xb.flip(3)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item() * len(idx), count + len(idx)
            bar.update(1)
            bar.set_postfix(epoch=f"{ep + 1}/{epochs}", loss=f"{loss.item():.3f}", refresh=False)
        if progress and not tty:
            t = time.perf_counter() - t0
            print(f"judge epoch {ep + 1}/{epochs}: mean loss {total / count:.4f} ({t:.0f} s)", file=sys.stderr)
    bar.close()
    return model.eval()


def load_or_train(
    path: str | Path = DEFAULT_CLF, root: str | Path | None = None, seed: int = 0, epochs: int = 2,
    limit: int | None = None, verbose: bool = True, width: int = 16,
) -> tuple[Classifier, dict[str, Any]]:  # fmt: skip
    """Load the cached classifier at `path`, or train it (and measure test accuracy/feature stats) first."""
    path = Path(path)
    if path.is_file():
        try:  # weights_only: opening a file must never run code; mu/sigma are stored as tensors
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = Classifier(state["width"])
            model.load_state_dict(state["model"])
        except Exception as e:
            raise ValueError(
                f"{path}: not a Fashion-MNIST judge saved by this version ({one_line(e)}); "
                "delete it to train a new one"
            ) from None
        info = dict(state["info"])
        info["mu"], info["sigma"] = info["mu"].numpy(), info["sigma"].numpy()
        return model.eval(), info
    t0 = time.perf_counter()
    x, y = load_split("train", root)
    if limit:
        x, y = x[:limit], y[:limit]
    if verbose:
        print(
            f"training the Fashion-MNIST judge on {len(x)} images ({epochs} epochs, once: cached in {path})",
            file=sys.stderr,
        )
    with torch.enable_grad():  # evaluate() runs under no_grad and trains the judge on first use
        model = train_classifier(x, y, epochs=epochs, seed=seed, width=width, progress=verbose)
    xt, yt = load_split("test", root)
    logits = _batched(model, xt)
    feats = _batched(model.features, xt).numpy()
    mu, sigma = gaussian_stats(feats, "test features")
    info = {
        "root": str(root or data_root()),
        "train_images": len(x),
        "test_images": len(xt),
        "test_accuracy": float((logits.argmax(1) == yt).float().mean()),
        "seed": seed,
        "epochs": epochs,
        "train_seconds": time.perf_counter() - t0,
        "mu": mu,
        "sigma": sigma,
    }
    import io

    buf = io.BytesIO()
    stored = {**info, "mu": torch.from_numpy(mu), "sigma": torch.from_numpy(sigma)}
    torch.save({"model": model.state_dict(), "width": width, "info": stored}, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    if verbose:
        print(
            f"judge: test accuracy {info['test_accuracy']:.4f} after {info['train_seconds']:.0f} s, saved {path}",
            file=sys.stderr,
        )
    return model, info


def _read_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    p = Path(path)
    if p.is_dir():
        p = p / "samples.npz"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no samples.npz (run `cdc sample` first)")
    with np.load(p) as z:
        if "arr_1" not in z:
            raise ValueError(f"{p}: no labels (arr_1); sample with --classes so each image has a class")
        return z["arr_0"], z["arr_1"]


@torch.no_grad()
def fd_to_test(judge: Classifier, info: dict[str, Any], x: Tensor, what: str) -> float:
    """FD-clf: Frechet distance of the judge's features of x (N, 1, 32, 32) to the test split's."""
    return _fd_feats(_batched(judge.features, x).numpy(), info, what)


def _fd_feats(feats: np.ndarray, info: dict[str, Any], what: str) -> float:
    return frechet_distance(*gaussian_stats(feats, what), info["mu"], info["sigma"])


@torch.no_grad()
def evaluate(
    samples: str | Path | np.ndarray, labels: np.ndarray | None = None, clf: str | Path = DEFAULT_CLF,
    root: str | Path | None = None, block: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Accuracy of `samples` (samples.npz / its folder, or uint8 array) w.r.t. labels and FD-clf to test.

    `block` > 0 also scores consecutive blocks of that many images on their own (`blocks`, with
    their mean and sample standard deviation in `block_mean` / `block_sd`). FD on a few hundred
    images is biased and noisy, so a sampler tuned on images 0..N-1 should be judged on the blocks
    after it: `cdc sample -n 2000` then `--block 500` gives the tuning block and three held-out
    ones whose noise the tuning never saw (docs/quickstart-notes.md, "Held-out noise").
    """
    if isinstance(samples, (str, Path)):
        imgs, labels = _read_samples(samples)
    else:
        imgs = samples
        if labels is None:
            raise ValueError("pass the labels of the sample array")
    model, info = load_or_train(clf, root)
    x = to_float(imgs)
    if x.shape[-1] != 32:
        raise ValueError(f"expected 32-px images, got {tuple(x.shape[-2:])}")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    pred = _batched(model, x).argmax(1)
    ok = (pred == y).float()
    per_class = {int(c): float(ok[y == c].mean()) for c in torch.unique(y)}
    feats = _batched(model.features, x).numpy()  # (N, FEAT_DIM), once for the whole set and its blocks
    fd = _fd_feats(feats, info, "sample features")
    out: dict[str, Any] = {
        "n": len(y),
        "accuracy": float(ok.mean()),
        "per_class_accuracy": per_class,
        "fd_clf": fd,
        "judge_test_accuracy": info["test_accuracy"],
    }
    if block:
        if not 2 <= block <= len(y) // 2:
            raise ValueError(f"block {block}: need at least two blocks of >= 2 images out of {len(y)}")
        starts = range(0, len(y) - block + 1, block)  # a short tail block is left out
        out["blocks"] = [
            {"first": i, "accuracy": float(ok[i : i + block].mean()),
             "fd_clf": _fd_feats(feats[i : i + block], info, f"sample features {i}..{i + block - 1}")}
            for i in starts
        ]  # fmt: skip
        per = {key: np.array([b[key] for b in out["blocks"]]) for key in ("accuracy", "fd_clf")}
        out["block_mean"] = {key: float(v.mean()) for key, v in per.items()}
        out["block_sd"] = {key: float(v.std(ddof=1)) for key, v in per.items()}
    return out


@torch.no_grad()
def probe_stages(
    ckpt: str | Path, per_class: int = 40, steps: int = 16, solver: str = "heun", seed: int = 0,
    clf: str | Path = DEFAULT_CLF, root: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Where a checkpoint makes or loses class identity, one refinement stage k >= 1 at a time.

    Real test images are box-downsampled to r_{k-1} and refined by stages k..K (cdc.flow.sampler
    `start`). Per stage: `acc_coarse`, the judge's accuracy on those coarse images upsampled (what
    the stage is given); `acc_refined`, its accuracy on the refined images with the true label;
    `label_effect`, the mean total-variation distance between the judge's class probabilities of
    images refined with the true label and with the null label from the same noise (0 = the
    stages ignore the class; 1 = the label alone decides). No CFG, so the net itself is probed.
    FD-clf to the test split of the same images: `fd_real` (the real images themselves, the floor
    at this count), per stage `fd_coarse` (upsampled input) and `fd_refined` (true label), which
    says how much of a full sample's FD the stages from k on account for.
    """
    from cdc.flow.matching import Schedule, velocity_net_from_config
    from cdc.flow.pyramid import down_to, up_to
    from cdc.flow.sampler import image_seed, sample
    from cdc.train.checkpoint import load_for_inference

    model, cfg, info = load_for_inference(ckpt)
    f = cfg.flow
    if f.sides[-1] != 32 or cfg.model.in_channels != 1:
        raise ValueError(f"{info['path']}: probe needs a 1-channel model ending at 32 px, got {f.sides}")
    sched = Schedule.from_config(f)
    net = velocity_net_from_config(model, f)
    judge, jinfo = load_or_train(clf, root, verbose=False)

    def fd(img: Tensor, what: str) -> float:
        return fd_to_test(judge, jinfo, img.clamp(-1, 1), what)

    x, y = load_split("test", root)
    idx = torch.cat([torch.nonzero(y == c)[:per_class, 0] for c in range(10)])
    x, y = x[idx], y[idx]
    seeds = [image_seed(seed, i) for i in range(len(y))]
    null = torch.full_like(y, cfg.model.num_classes)
    out: dict[str, Any] = {
        "ckpt": info["path"], "step": info["step"], "images": len(y), "fd_real": fd(x, "real images"), "stages": [],
    }  # fmt: skip
    for k in range(1, sched.K):
        coarse = down_to(x, f.sides[k - 1])
        probs, imgs = [], []
        for lab in (y, null):
            img = sample(net, sched, lab, seeds, 1, steps=steps, solver=solver, start=(k, coarse)).x
            probs.append(_batched(judge, img.clamp(-1, 1)).softmax(1))
            imgs.append(img)
        p0 = _batched(judge, up_to(coarse, 32)).softmax(1)
        out["stages"].append({
            "stage": k + 1, "from_side": f.sides[k - 1],
            "acc_coarse": float((p0.argmax(1) == y).float().mean()),
            "acc_refined": float((probs[0].argmax(1) == y).float().mean()),
            "label_effect": float(0.5 * (probs[0] - probs[1]).abs().sum(1).mean()),
            "fd_coarse": fd(up_to(coarse, 32), "upsampled coarse images"),
            "fd_refined": fd(imgs[0], "refined images"),
        })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("samples", nargs="?", help="samples.npz with labels (arr_1), or the folder holding it")
    ap.add_argument("--clf", default=str(DEFAULT_CLF), help="cached classifier (.pt; trained if absent)")
    ap.add_argument("--probe", metavar="RUN", help="instead: probe each refinement stage of a checkpoint")
    ap.add_argument("--block", type=int, default=0, metavar="N", help="also score consecutive blocks of N images")
    a = ap.parse_args(argv)
    if (a.samples is None) == (a.probe is None):
        ap.error("give a samples.npz to judge, or --probe RUN_OR_CKPT")
    try:
        res = probe_stages(a.probe, clf=a.clf) if a.probe else evaluate(a.samples, clf=a.clf, block=a.block)
    except (ValueError, OSError, KeyError) as e:  # bad paths / files / options: one line, exit 2
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
