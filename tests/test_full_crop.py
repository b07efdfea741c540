"""Table 7's augmentation: images stored at their aspect ratio, random crops over the whole image that
stay exact box averages at every stage; the centre-square format keeps working next to it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smooth_image_tree, take
from PIL import Image

from cdc.config import from_dict
from cdc.data.imageproc import resize_short_side
from cdc.data.loader import make_loader, read_tar
from cdc.data.prepare import prepare
from cdc.eval.evalio import reference_images

SIZES = [(64, 48), (48, 80), (40, 40), (100, 36), (37, 53)]  # (width, height) of the source images


@pytest.fixture(scope="module")
def full_shards(tmp_path_factory) -> Path:
    """30 images of 5 shapes in 3 classes, side 32, expand 1.25 (top 40), levels 40/20/10, crop full."""
    root = smooth_image_tree(tmp_path_factory.mktemp("src"), 10, SIZES, (7, 9))
    out = tmp_path_factory.mktemp("shards")
    m = prepare(root, out, side=32, expand=1.25, levels=3, shard_size=10, progress=False)
    assert m["crop"] == "full" and m["top"] == 40 and m["levels"] == [40, 20, 10]
    return out


def _tops(shards: Path) -> dict[str, np.ndarray]:
    out = {}
    for tar in sorted(shards.glob("*.tar")):
        for key, s in read_tar(str(tar)):
            out[key] = np.asarray(Image.open(io.BytesIO(s["40.png"])))
    return out


def _cfg(shards, **data):
    return from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 3, "in_channels": 3},
            "flow": {"sides": [8, 16, 32]},
            "data": {"shards": str(shards), "workers": 0, "shuffle": 10, **data},
            "train": {"batch_size": 10},
        }
    )


def test_stored_at_aspect_ratio_with_exact_levels(full_shards):
    shapes = set()
    for tar in sorted(full_shards.glob("*.tar")):
        for _, s in read_tar(str(tar)):
            top = np.asarray(Image.open(io.BytesIO(s["40.png"]))).astype(np.int64)
            h, w = top.shape[:2]
            assert min(h, w) == 40 and h % 4 == 0 and w % 4 == 0
            shapes.add((w, h))
            for side in (20, 10):
                f = 40 // side
                box = top.reshape(h // f, f, w // f, f, 3).sum((1, 3))  # f*f * box mean
                lvl = np.asarray(Image.open(io.BytesIO(s[f"{side}.png"]))).astype(np.int64)
                # exactly the box mean rounded half up: floor((sum + f*f/2) / (f*f))
                assert np.array_equal(lvl, (box + f * f // 2) // (f * f))
    # 64x48 -> 53.3x40 -> 52 wide; 48x80 -> 40x66.7 -> 64 tall; 100x36 -> 111.1 -> 108; 37x53 -> 57.3 -> 56
    assert shapes == {(52, 40), (40, 64), (40, 40), (108, 40), (40, 56)}


def test_resize_short_side_keeps_the_aspect_ratio_without_stretching():
    a = np.random.default_rng(1).integers(0, 256, (30, 203, 3), dtype=np.uint8)
    img = Image.fromarray(a[:, :200])
    out = resize_short_side(img, 30, 8)  # no scaling, 200 is a multiple of 8: unchanged
    assert out.size == (200, 30) and np.array_equal(np.asarray(out), a[:, :200])
    out = resize_short_side(Image.fromarray(a), 30, 8)  # 203 -> 200: 1.5 px off each end, not squeezed
    want = Image.fromarray(a).resize((200, 30), Image.LANCZOS, box=(1.5, 0, 201.5, 30))
    assert out.size == (200, 30) and np.array_equal(np.asarray(out), np.asarray(want))
    assert resize_short_side(img, 15, 4).size == (100, 15)  # halved: aspect ratio kept exactly
    assert resize_short_side(Image.fromarray(a.transpose(1, 0, 2)), 30, 8).size == (30, 200)  # tall


def test_full_image_crops_are_exact_box_averages_at_every_stage(full_shards):
    tops = _tops(full_shards)
    seen_stages, beyond_square = set(), 0
    positions: dict[str, set] = {}
    for b in take(make_loader(_cfg(full_shards), seed=4), 30):
        for k, x, keys, offs, flips in zip(
            b.stage, b.x1, b.meta["keys"], b.meta["offsets"], b.meta["flips"], strict=True
        ):
            r = [8, 16, 32][k]
            f = 32 // r
            for i, key in enumerate(keys):
                top = tops[key].astype(np.int64)
                h, w = top.shape[:2]
                oy, ox = offs[i]
                assert oy % 4 == 0 and ox % 4 == 0 and 0 <= oy <= h - 32 and 0 <= ox <= w - 32
                crop = top[oy : oy + 32, ox : ox + 32]
                crop = crop[:, ::-1] if flips[i] else crop
                box = crop.reshape(r, f, r, f, 3).sum((1, 3))
                want = (box + f * f // 2) // (f * f) if f > 1 else box  # the stored level's rounding
                got = (x[i].permute(1, 2, 0).double() + 1) * 127.5
                assert torch.equal(got.round(), torch.from_numpy(want).double()), (key, k)
                assert (got - got.round()).abs().max() < 1e-4
                seen_stages.add(k)
                beyond_square += max(oy, ox) > 8  # outside the 5x5 positions of a 40x40 square
                positions.setdefault(key, set()).add((oy, ox))
    assert seen_stages == {0, 1, 2} and beyond_square > 20
    # the 108x40 images: crops reach both ends of the long side over 30 epochs
    wide = [p for key, p in positions.items() if tops[key].shape[1] == 108]
    xs = {ox for p in wide for _, ox in p}
    assert 0 in xs and 76 in xs


def test_centre_crop_of_full_images_and_pipe_without_manifest(full_shards, monkeypatch):
    monkeypatch.setenv("CDC_ALLOW_PIPE", "1")
    tops = _tops(full_shards)
    for b in take(make_loader(_cfg(full_shards, random_crop=False, hflip=False), seed=0), 3):
        for keys, offs in zip(b.meta["keys"], b.meta["offsets"], strict=True):
            for key, (oy, ox) in zip(keys, offs, strict=True):
                h, w = tops[key].shape[:2]
                assert (oy, ox) == (((h - 32) // 4 // 2) * 4, ((w - 32) // 4 // 2) * 4)
    ref = take(make_loader(_cfg(full_shards), seed=5), 5)
    pipe = f"pipe:cat {full_shards}/train-{{000000..000002}}.tar"  # no manifest: sizes from headers
    got = take(make_loader(_cfg(pipe), seed=5), 5)
    for a, b in zip(ref, got, strict=True):
        assert a.meta["keys"] == b.meta["keys"] and a.meta["offsets"] == b.meta["offsets"]
        assert all(torch.equal(x, y) for x, y in zip(a.x1, b.x1, strict=True))


def test_reference_from_full_shards_is_the_centre_crop(full_shards):
    imgs = reference_images(full_shards, 32, n=10)
    tops = _tops(full_shards)
    first = next(imgs.batches(10))
    keys = [k for tar in sorted(full_shards.glob("*.tar")) for k, _ in read_tar(str(tar))][:10]
    for a, key in zip(first, keys, strict=True):
        t = tops[key]
        y, x = (t.shape[0] - 32) // 2, (t.shape[1] - 32) // 2
        assert np.array_equal(a, t[y : y + 32, x : x + 32])


def test_crop_option_errors_and_centre_square_still_default_for_idx(tmp_path):
    with pytest.raises(ValueError, match="--crop must be full or center"):
        prepare("fashion-mnist", tmp_path / "a", limit=10, progress=False, crop="middle")
    with pytest.raises(ValueError, match="zero-padded squares"):
        prepare("fashion-mnist", tmp_path / "b", limit=10, progress=False, crop="full")
    m = prepare("fashion-mnist", tmp_path / "c", limit=10, progress=False)
    assert m["crop"] == "center"


@pytest.mark.parametrize("size", [(500, 500), (447, 447), (333, 500), (500, 375), (289, 1000)])
def test_resize_short_side_any_size(size):
    """Every source size gives shorter side `short`, longer side a multiple of 8 (squares included:
    float rounding of the resampling box must not make it start before the image)."""
    img = Image.new("RGB", size, (10, 20, 30))
    out = resize_short_side(img, 288, 8)
    assert min(out.size) == 288 and max(out.size) % 8 == 0
    assert max(out.size) <= 288 * max(size) / min(size) + 1e-6
