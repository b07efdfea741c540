"""`cdc prepare --store`: compact shards whose lower levels are exact box averages of the decoded top."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cdc.config import from_dict
from cdc.data.loader import make_loader, read_tar
from cdc.data.prepare import prepare

STORES = ("png", "webp", "jpeg", "jpeg-top")


def _photos(n: int = 12) -> list[np.ndarray]:
    """Crops of scikit-image's real photographs when it is installed, textured noise otherwise."""
    rng = np.random.default_rng(0)
    try:
        import skimage.data as d

        base = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]
    except Exception:  # not installed: a smooth random field still exercises every codec
        base = [(rng.random((8, 8, 3)) * 255).astype(np.uint8).repeat(40, 0).repeat(40, 1) for _ in range(4)]
    out = []
    for i in range(n):
        a = base[i % len(base)]
        y, x = rng.integers(0, a.shape[0] - 200), rng.integers(0, a.shape[1] - 200)
        out.append(np.ascontiguousarray(a[y : y + 200, x : x + 200 + 40 * (i % 3)]))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    src = root / "src"
    for i, a in enumerate(_photos()):
        d = src / f"n{i % 3:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"img_{i}.JPEG", quality=90)
    out = {}
    for store in STORES:
        out[store] = root / store
        prepare(src, out[store], side=32, levels=4, shard_size=5, progress=False, store=store)
    return out


def _samples(d):
    return [s for f in sorted(d.glob("*.tar")) for _, s in read_tar(str(f))]


def _decode(b: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(b))
    im.load()
    return im


@pytest.mark.parametrize("store", ["jpeg", "webp", "png"])
def test_stored_levels_are_exact_box_averages_of_the_decoded_top(shards, store):
    ext = {"jpeg": "jpg", "webp": "webp", "png": "png"}[store]
    low = {"jpeg": "webp", "webp": "webp", "png": "png"}[store]
    for s in _samples(shards[store]):
        top = _decode(s[f"40.{ext}"])
        # whole images (--crop full, the default): shorter side 40, longer a multiple of 2^(levels-1)
        assert min(top.size) == 40 and max(top.size) % 8 == 0 and top.mode == "RGB"
        for j, side in enumerate((20, 10, 5), start=1):
            level = np.asarray(_decode(s[f"{side}.{low}"]))
            assert np.array_equal(level, np.asarray(top.reduce(2**j))), (store, side)


def test_lossless_stores_hold_the_same_pixels_and_jpeg_top_holds_the_top_only(shards):
    png, webp, jpeg, jtop = (_samples(shards[s]) for s in STORES)
    assert len(png) == len(webp) == len(jpeg) == len(jtop) == 12
    for a, b in zip(png, webp, strict=True):
        for side in (40, 20, 10, 5):
            assert np.array_equal(np.asarray(_decode(a[f"{side}.png"])), np.asarray(_decode(b[f"{side}.webp"])))
    for a, b in zip(jpeg, jtop, strict=True):
        assert a["40.jpg"] == b["40.jpg"] and sorted(b) == ["40.jpg", "cls"]


def _batches(d, n=4):
    cfg = from_dict(
        {
            "model": {"num_classes": 3},
            "flow": {"sides": [4, 8, 16, 32]},
            "data": {"shards": str(d), "workers": 0, "shuffle": 8},
            "train": {"batch_size": 6},
        }
    )
    it = iter(make_loader(cfg, seed=1))
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("pair", [("png", "webp"), ("jpeg", "jpeg-top")])
def test_loader_batches_equal_between_formats_holding_the_same_levels(shards, pair):
    a, b = (_batches(shards[s]) for s in pair)
    for x, y in zip(a, b, strict=True):
        assert x.stage == y.stage
        for u, v in zip(x.x1 + x.t + x.y, y.x1 + y.t + y.y, strict=True):
            assert torch.equal(u, v)


def test_jpeg_shards_are_smaller_than_png(shards):
    size = {s: sum(f.stat().st_size for f in shards[s].glob("*.tar")) for s in STORES}
    assert size["jpeg-top"] < size["jpeg"] < size["png"] and size["webp"] < size["png"]


def test_reference_images_read_every_store(shards):
    from cdc.eval.evalio import reference_images

    def first(store):
        ref = reference_images(shards[store], side=32, n=5)
        return np.concatenate(list(ref.batches(5)))

    np.testing.assert_array_equal(first("png"), first("webp"))
    np.testing.assert_array_equal(first("jpeg"), first("jpeg-top"))


def test_auto_store_is_jpeg_top_for_image_trees_and_png_for_idx(shards, tmp_path):
    assert prepare("fashion-mnist", tmp_path / "i", limit=8, progress=False, store="auto")["store"] == "png"
    src = next(iter(shards["png"].parent.glob("src")))
    assert prepare(src, tmp_path / "t", side=32, levels=4, progress=False, store="auto")["store"] == "jpeg-top"


def test_store_errors(tmp_path):
    with pytest.raises(ValueError, match="--store"):
        prepare("fashion-mnist", tmp_path / "a", limit=8, progress=False, store="gif")
    with pytest.raises(ValueError, match="needs RGB"):  # lossless WebP of greyscale: use png or jpeg
        prepare("fashion-mnist", tmp_path / "b", limit=8, progress=False, store="webp")


def test_greyscale_jpeg_store_keeps_png_lower_levels(tmp_path):
    m = prepare("fashion-mnist", tmp_path / "g", limit=8, shard_size=8, progress=False, store="jpeg")
    assert m["level_keys"] == ["32.jpg", "16.png", "8.png"] and m["store"] == "jpeg"
    for s in _samples(tmp_path / "g"):
        top = _decode(s["32.jpg"])
        assert top.mode == "L"
        assert np.array_equal(np.asarray(_decode(s["16.png"])), np.asarray(top.reduce(2)))
