"""Inception-v3 as used for FID: a PyTorch port of the TensorFlow graph of 2015-12-05.

The FID/IS/precision-recall numbers of the literature (ADM, DiT, PixelFlow, CDC-FM) come from that
graph, which differs from torchvision's Inception-v3 in three places we reproduce here:
  * 1008 output classes (the graph's softmax has 8 unused extra classes);
  * average pooling in the A, C and first E blocks excludes the zero padding from the mean
    (TF's `AvgPool` with SAME padding), so `count_include_pad=False`;
  * the last E block pools its pool branch with a 3x3 *max* pool instead of an average.
Parameter names follow torchvision's Inception3 (`Mixed_5b.branch1x1.conv.weight`, ...) so the
state dict of the converted weights file `pt_inception-2015-12-05-6726825d.pth` loads unchanged.

Input: float images in [0, 1], (B, 3, H, W), any H, W. They go through the graph's own input ops,
as ADM's evaluator feeds them (uint8 values as floats into `ExpandDims`): TF1 `ResizeBilinear` to
299 without half-pixel centres, then (x - 128) / 128. pytorch-fid instead resizes with half-pixel
centres and scales by 2x - 1; that moves every pool3 feature a little, so statistics stored by the
TF graph (ADM's reference batches) would not be comparable (docs/design-notes.md).
Output: pool3 features (B, 2048) and logits (B, 1008).
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from cdc.fileio import one_line

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
# the file's sha256 (95,628,359 bytes; its name carries the first 8 hex digits, torch hub's custom):
# checked before the file is read, so a changed or swapped file can neither change every FID
# silently nor reach the unpickler
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
NUM_CLASSES = 1008
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as the TF graph) + ReLU."""

    def __init__(self, cin: int, cout: int, **kw) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: Tensor) -> Tensor:
    # TF's SAME-padded average pool divides by the number of real pixels, not 9
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 block at 17x17."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """Expanded-filter block at 8x8; `max_pool=True` is the graph's last block (Mixed_7c)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg3(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)


def tf1_resize_bilinear(x: Tensor, size: int) -> Tensor:
    """TF1 `ResizeBilinear(align_corners=False)` of (B, C, H, W) to (B, C, size, size).

    Output pixel i reads input coordinate i * in / out (clamped at the last pixel); torch's
    align_corners=False reads (i + 0.5) * in / out - 0.5 instead, a shift of up to half a pixel.
    """
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x

    def taps(n: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=x.device, dtype=torch.float32) * torch.tensor(n / size)
        lo = src.floor().long().clamp(max=n - 1)
        return lo, (lo + 1).clamp(max=n - 1), (src - lo).to(x.dtype)

    y0, y1, wy = taps(h)
    x = x[..., y0, :] + (x[..., y1, :] - x[..., y0, :]) * wy[:, None]  # (B, C, size, W)
    x0, x1, wx = taps(w)
    return x[..., x0] + (x[..., x1] - x[..., x0]) * wx  # (B, C, size, size)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3; forward(images in [0, 1]) -> (pool3 (B, 2048), logits (B, 1008))."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"Inception expects (B, 3, H, W) images, got {tuple(x.shape)}")
        x = tf1_resize_bilinear(x * 255, 299)  # the graph's ResizeBilinear, on 0..255 values
        x = (x - 128) / 128  # the graph's Sub and Mul nodes
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ends (B, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (B, 2048): the graph's pool_3
        return pool, self.fc(pool)


def default_weights_dir() -> Path:
    """Where torch's hub cache keeps downloaded checkpoints (torch.hub.get_dir()/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_weights(path: Path, shown: str | None = None) -> str:
    """The sha256 of `path` (named `shown` in the error), which must be the pinned one: else a
    one-line ValueError saying what to do."""
    digest = sha256_file(path)
    if digest != WEIGHTS_SHA256:
        raise ValueError(
            f"Inception weights {shown or path}: sha256 {digest}, expected {WEIGHTS_SHA256} ({WEIGHTS_NAME}); "
            f"FIDs from other weights are not comparable; delete the file and run again to download it, "
            f"or put the file from {WEIGHTS_URL} there"
        )
    return digest


def _download(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(WEIGHTS_URL, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        check_weights(tmp, WEIGHTS_URL)  # a changed file on the server is refused, never cached
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """Find the weights file: the given path, else the hub cache, else download it there.

    Without a file and without network, raise a one-line FileNotFoundError naming the file and
    the folder to put it in.
    """
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / WEIGHTS_NAME
        if not p.is_file():
            raise FileNotFoundError(f"Inception weights not found at {p} (expected the file {WEIGHTS_NAME})")
        return p
    cached = default_weights_dir() / WEIGHTS_NAME
    if cached.is_file():
        return cached
    hint = (
        f"Inception weights {WEIGHTS_NAME} not found; download {WEIGHTS_URL} into {cached.parent}/ "
        f"or pass --inception PATH"
    )
    if not download:
        raise FileNotFoundError(hint)
    try:
        _download(cached)
    except OSError as e:  # URLError is an OSError: no network, DNS failure, timeout, HTTP error
        raise FileNotFoundError(f"{hint} (download failed: {type(e).__name__})") from None
    return cached


def load_inception(
    path: str | Path | None = None,
    weights: bool = True,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> tuple[FIDInceptionV3, str]:
    """Build the network in eval mode; returns (model, weights sha256 or "random").

    `weights=False` keeps the random initialisation (tests: the graph runs without the user file).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same every time, so a reference and a score agree
        model = FIDInceptionV3()
        if not weights:
            # He init keeps activations O(1) through ~50 conv layers (the default init shrinks them to ~1e-8)
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    digest = "random"
    if weights:
        p = resolve_weights(path, download=download)
        digest = check_weights(p)
        try:
            sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or non-checkpoint file: one line, not a traceback
            raise ValueError(f"cannot read Inception weights {p}: {type(e).__name__}: {one_line(e)}") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{p} is not the FID Inception weights {WEIGHTS_NAME}: it holds no state dict")
        missing, unexpected = model.load_state_dict(sd, strict=False)
        # old checkpoints have no BatchNorm step counters; anything else means a wrong file
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(
                f"{p} is not the FID Inception weights {WEIGHTS_NAME}: "
                f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            )
    return model.eval().requires_grad_(False).to(device), digest
