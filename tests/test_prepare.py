"""`cdc prepare`: bad files converted or skipped with a reason, exact pyramids, idx padding, resume."""

from __future__ import annotations

import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import subprocess_env
from PIL import Image
from typer.testing import CliRunner

from cdc.data.imageproc import encode_png, top_side
from cdc.data.prepare import prepare


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-ish RGB image: upsampled low-res noise (compresses and resizes like a photo)."""
    rng = np.random.default_rng(seed)
    low = Image.fromarray(rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8))
    return np.asarray(low.resize((w, h), Image.BICUBIC))


def read_shards(out: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def png16(a: np.ndarray) -> bytes:
    """16-bit RGB PNG (PIL cannot write one) of (H, W, 3) uint16."""
    h, w, _ = a.shape
    rows = np.zeros((h, 1 + w * 6), np.uint8)
    rows[:, 1:] = a.astype(">u2").view(np.uint8).reshape(h, w * 6)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows.tobytes()))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def bad_tree(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Two classes holding every bad-file kind; returns the tree and the RGB each good file should give."""
    root = tmp_path / "tree"
    (root / "apple").mkdir(parents=True)
    (root / "banana").mkdir()
    (tmp_path / "LOC_synset_mapping.txt").write_text("apple Malus domestica\nbanana Musa\n")
    x = smooth(32, 32, 1)
    grey = x.mean(2).round().astype(np.uint8)
    want: dict[str, np.ndarray] = {}

    def save(rel: str, img: Image.Image, fmt: str, expect: np.ndarray | None, **kw) -> None:
        img.save(root / rel, fmt, **kw)
        if expect is not None:
            want[rel] = expect

    save("apple/good.jpg", Image.fromarray(x), "JPEG", x, quality=95)
    save("apple/grey.jpg", Image.fromarray(grey, "L"), "JPEG", np.repeat(grey[..., None], 3, 2), quality=95)
    save("apple/cmyk.jpg", Image.fromarray(x).convert("CMYK"), "JPEG", x, quality=95)
    pal = Image.fromarray(x).quantize(64)
    save("apple/palette.png", pal, "PNG", np.asarray(pal.convert("RGB")))
    save(
        "apple/deep.png",
        Image.fromarray(grey.astype(np.uint16) * 257),
        "PNG",
        np.repeat(grey[..., None], 3, 2),
    )
    rgba = np.concatenate([x, np.full((32, 32, 1), 255, np.uint8)], 2)
    rgba[:8, :8, 3] = 0  # a transparent corner becomes white
    white = x.copy()
    white[:8, :8] = 255
    save("apple/rgba.png", Image.fromarray(rgba, "RGBA"), "PNG", white)
    save("banana/mislabelled.JPEG", Image.fromarray(x), "PNG", x)
    (root / "banana/deep_rgb.png").write_bytes(png16(x.astype(np.uint16) * 257))
    want["banana/deep_rgb.png"] = x
    (root / "banana/empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(smooth(64, 64, 2)).save(buf, "JPEG", quality=95)
    (root / "banana/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "banana/random.jpg").write_bytes(
        np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes()
    )
    (root / "banana/wide.png").write_bytes(b"")  # replaced below: a 48x32 image, kept whole (crop full)
    Image.fromarray(smooth(32, 48, 3)).save(root / "banana/wide.png")
    want["banana/wide.png"] = smooth(32, 48, 3)
    return root, want


def test_bad_files_converted_or_skipped_with_reason(bad_tree, tmp_path):
    root, want = bad_tree
    m = prepare(root, tmp_path / "out", side=32, expand=1.0, levels=3, shard_size=4, progress=False)
    assert m["classes"] == ["apple", "banana"] and m["class_names"] == ["Malus domestica", "Musa"]
    assert m["num_classes"] == 2 and m["channels"] == 3 and m["levels"] == [32, 16, 8]
    reasons = {s["path"]: s["reason"] for s in m["skipped"]}
    assert set(reasons) == {"banana/empty.jpg", "banana/truncated.jpg", "banana/random.jpg"}
    assert reasons["banana/empty.jpg"] == "empty file"
    assert "truncated" in reasons["banana/truncated.jpg"]
    assert "not a recognised image" in reasons["banana/random.jpg"]
    assert m["count"] == len(want) == m["files"] - 3
    notes = {c["path"]: c["note"] for c in m["converted_files"]}
    assert "greyscale" in notes["apple/grey.jpg"] and "CMYK" in notes["apple/cmyk.jpg"]
    assert "palette" in notes["apple/palette.png"] and "16-bit" in notes["apple/deep.png"]
    assert "16-bit" in notes["banana/deep_rgb.png"] and "alpha" in notes["apple/rgba.png"]
    assert "mislabelled: PNG" in notes["banana/mislabelled.JPEG"]
    assert "apple/good.jpg" not in notes
    samples = read_shards(tmp_path / "out")
    keys = {"apple/good.jpg": "apple_good", "banana/mislabelled.JPEG": "banana_mislabelled"}
    for rel, expect in want.items():
        key = keys.get(rel, f"{rel.split('/')[0]}_{Path(rel).stem}")
        s = samples[key]
        assert s["cls"] == (b"0" if rel.startswith("apple") else b"1")
        top = np.asarray(Image.open(io.BytesIO(s["32.png"])))
        assert top.shape == expect.shape, rel
        err = np.abs(top.astype(int) - expect.astype(int))
        if rel.endswith("jpg"):  # lossy: exactly PIL's own RGB decode, and close to the original
            assert np.array_equal(top, np.asarray(Image.open(root / rel).convert("RGB"))), rel
            assert err.mean() < 4, rel
        else:  # the lossless kinds come through exactly
            assert err.max() == 0, rel


def test_levels_are_box_pyramid_of_top(bad_tree, tmp_path):
    root, _ = bad_tree
    prepare(root, tmp_path / "out", side=24, expand=1.4, levels=3, progress=False)  # top 32 (34 -> 32)
    for key, s in read_shards(tmp_path / "out").items():
        top = np.asarray(Image.open(io.BytesIO(s["32.png"]))).astype(np.float64)
        h, w = top.shape[:2]
        assert min(h, w) == 32 and h % 4 == 0 and w % 4 == 0, key
        for side in (16, 8):
            f = 32 // side
            box = top.reshape(h // f, f, w // f, f, 3).mean((1, 3))
            lvl = np.asarray(Image.open(io.BytesIO(s[f"{side}.png"]))).astype(np.float64)
            assert np.abs(lvl - box).max() <= 0.5, key  # rounding of the stored level only


def test_top_side_and_png_roundtrip():
    assert top_side(256, 1.125, 4) == 288 and top_side(32, 1.0, 3) == 32
    assert top_side(32, 1.125, 4) == 40 and top_side(32, 1.125, 3) == 36  # a multiple of 2^(levels-1)
    for a in (smooth(17, 23), smooth(9, 9)[..., 0]):
        for compress in (True, False):
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(a, compress)))), a)


def test_fashion_mnist_bundled_is_zero_padded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = prepare("fashion-mnist", limit=300, shard_size=128, progress=False)
    out = tmp_path / "data" / "fashion-mnist-32"
    assert (out / "manifest.json").is_file() and m["count"] == 300 and len(m["shards"]) == 3
    assert m["channels"] == 1 and m["levels"] == [32, 16, 8] and m["num_classes"] == 10
    assert m["class_names"][9] == "Ankle boot"
    from cdc.data.sources import ASSETS

    with gzip.open(ASSETS / "fashion-mnist-train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(ASSETS / "fashion-mnist-train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    samples = read_shards(out)
    idx = [(i * 10000) // 300 for i in range(300)]  # --limit keeps evenly spaced items
    assert sorted(samples) == sorted(f"train_{i:06d}" for i in idx)
    for i in idx[:20]:
        s = samples[f"train_{i:06d}"]
        top = np.asarray(Image.open(io.BytesIO(s["32.png"])))
        assert top.shape == (32, 32) and np.array_equal(top[2:30, 2:30], raw[i])
        assert top[:2].max() == 0 and top[:, 30:].max() == 0 and int(s["cls"]) == labels[i]
    assert sum(os.path.getsize(p) for p in ASSETS.glob("fashion-mnist-*")) < 5.2e6


def test_full_fashion_mnist_test_split(shared_dir, tmp_path):
    src = shared_dir / "datasets" / "fashion-mnist"
    m = prepare(src, tmp_path / "o", split="test", limit=50, progress=False)
    assert m["count"] == 50 and m["split"] == "test" and m["source_type"] == "idx"
    assert next(iter(read_shards(tmp_path / "o"))).startswith("test_")


def test_resume_rejects_other_arguments_and_cli(tmp_path):
    prepare("fashion-mnist", tmp_path / "o", limit=20, progress=False)
    with pytest.raises(ValueError, match="other arguments"):
        prepare("fashion-mnist", tmp_path / "o", limit=30, progress=False)
    from cdc.cli import app

    r = CliRunner().invoke(
        app, ["prepare", "--src", "fashion-mnist", "--limit", "20", "--out", str(tmp_path / "o")]
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["prepare", "--src", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "not found" in r.output


def _jpeg_tree(root: Path, n_cls: int, per: int) -> Path:
    for c in range(n_cls):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per):
            Image.fromarray(smooth(150, 200, c * 1000 + i)).save(
                root / f"c{c}" / f"im{i:03d}.jpg", quality=90
            )
    return root


def test_killed_then_resumed_equals_uninterrupted(tmp_path):
    src = _jpeg_tree(tmp_path / "src", 4, 60)
    kw = dict(side=64, expand=1.125, levels=4, shard_size=8)
    ref = prepare(src, tmp_path / "ref", workers=2, progress=False, **kw)
    out = tmp_path / "run"
    args = f"{str(src)!r}, {str(out)!r}, workers=1, progress=False, **{kw!r}"
    code = f"from cdc.data.prepare import prepare; prepare({args})"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    marker = out / ".prepare" / "train-000002.tar.json"
    deadline = time.time() + 60
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("*.tar"))
    assert 3 <= len(done) < len(ref["shards"]), "the run finished before it could be killed; make it bigger"
    before = {n: (out / n).stat().st_mtime_ns for n in done}
    m = prepare(src, out, workers=1, progress=False, **kw)
    assert not list(out.glob("*.partial-*"))
    assert {n: (out / n).stat().st_mtime_ns for n in done} == before  # completed shards were not redone
    assert m["shards"] == ref["shards"]  # same names, counts and sha256 as the uninterrupted (parallel) run
    assert (out / "manifest.json").read_text() == (tmp_path / "ref" / "manifest.json").read_text().replace(
        str(tmp_path / "ref"), str(out)
    )
    assert m["count"] == 240 and len(m["shards"]) == 30


def test_ilsvrc_layout_default_out_and_flat_val(tmp_path, monkeypatch):
    root = tmp_path / "ILSVRC2012"
    for w in ("n01", "n02"):
        (root / "train" / w).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(smooth(40, 50, i)).save(root / "train" / w / f"{w}_{i}.JPEG")
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for i in range(4):
        Image.fromarray(smooth(40, 50, 10 + i)).save(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
        lines.append(f"ILSVRC2012_val_{i:08d},{['n01', 'n02'][i % 2]} 1 2 3 4")
    (root / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    m = prepare("ILSVRC2012", side=16, levels=2, progress=False)
    assert (
        tmp_path / "data" / "ILSVRC2012-16" / "manifest.json"
    ).is_file()  # recipes/k4.yaml: ILSVRC2012-256
    assert m["count"] == 6 and m["classes"] == ["n01", "n02"] and m["top"] == 18
    v = prepare("ILSVRC2012", side=16, levels=2, split="val", progress=False)
    assert (tmp_path / "data" / "ILSVRC2012-val-16" / "manifest.json").is_file()
    got = {k: int(s["cls"]) for k, s in read_shards(tmp_path / "data" / "ILSVRC2012-val-16").items()}
    assert v["count"] == 4 and got == {f"ILSVRC2012_val_{i:08d}": i % 2 for i in range(4)}


# ---------------------------------------------------------------------------------------------
# the real ILSVRC2012-layout sample


@pytest.fixture(scope="session")
def imagenet_mini(shared_dir, tmp_path_factory) -> Path:
    tgz = shared_dir / "datasets" / "imagenet-mini.tar.gz"
    if not tgz.is_file():
        pytest.skip(f"{tgz} not found")
    dst = tmp_path_factory.mktemp("imn")
    with tarfile.open(tgz) as tar:
        tar.extractall(dst, filter="data")
    return dst / "imagenet-mini"


def _check_imagenet(root: Path, out: Path, m: dict, split: str) -> None:
    wnids = sorted(p.name for p in (root / "train").iterdir())
    assert m["classes"] == wnids and m["num_classes"] == 200 and m["split"] == split
    mapping = dict(line.split(" ", 1) for line in (root / "LOC_synset_mapping.txt").read_text().splitlines())
    assert m["class_names"] == [mapping[w] for w in wnids]
    samples = read_shards(out)
    assert len(samples) == m["count"] == sum(s["count"] for s in m["shards"])
    for key, s in list(samples.items())[:: max(1, len(samples) // 40)]:
        wnid = wnids[int(s["cls"])]
        assert key.startswith(wnid)
        stem = key if split == "train" else key[len(wnid) + 1 :]
        assert (root / split / wnid / f"{stem}.JPEG").is_file()
        top = np.asarray(Image.open(io.BytesIO(s[f"{m['top']}.png"]))).astype(np.float64)
        h, w = top.shape[:2]
        mult = m["top"] // m["levels"][-1]
        assert min(h, w) == m["top"] and top.shape[2] == 3 and h % mult == 0 and w % mult == 0
        if m.get("crop", "center") == "center":
            assert h == w
        for side in m["levels"][1:]:
            f = m["top"] // side
            box = top.reshape(h // f, f, w // f, f, 3).mean((1, 3))
            lvl = np.asarray(Image.open(io.BytesIO(s[f"{side}.png"]))).astype(np.float64)
            assert np.abs(lvl - box).max() <= 0.5


def test_imagenet_mini_train_and_val(imagenet_mini, tmp_path):
    m = prepare(
        imagenet_mini,
        tmp_path / "tr",
        side=32,
        expand=1.125,
        levels=3,
        limit=400,
        shard_size=100,
        workers=2,
        progress=False,
    )
    assert m["top"] == 36 and m["levels"] == [36, 18, 9] and m["count"] == 400 and not m["skipped"]
    assert m["source_type"] == "imagenet" and len(m["shards"]) == 4
    _check_imagenet(imagenet_mini, tmp_path / "tr", m, "train")
    v = prepare(imagenet_mini, tmp_path / "va", side=32, levels=3, limit=100, split="val", progress=False)
    assert v["classes"] == m["classes"] and v["count"] == 100
    _check_imagenet(imagenet_mini, tmp_path / "va", v, "val")


@pytest.mark.slow
def test_imagenet_mini_full(imagenet_mini, tmp_path):
    m = prepare(imagenet_mini, tmp_path / "tr", side=64, expand=1.125, levels=4, workers=2, progress=False)
    assert m["count"] == 20000 and m["top"] == 72 and not m["skipped"]
    assert m["converted"].get("greyscale -> RGB", 0) > 0
    _check_imagenet(imagenet_mini, tmp_path / "tr", m, "train")
    json.dumps(m)


def test_a_tree_with_no_usable_image_is_an_error_and_leaves_no_shard(tmp_path):
    """Issue 28 item 3: all files skipped used to exit 0 with "0 samples" and an empty shard."""
    from cdc.cli import app

    root = tmp_path / "src" / "cat"
    root.mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"not a jpeg at all")
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"no usable image: all 2 files were skipped \(first: "):
        prepare(tmp_path / "src", out, side=16, levels=2, progress=False)
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()
    r = CliRunner().invoke(app, ["prepare", "--src", str(tmp_path / "src"), "--out", str(out), "--side", "16"])
    errors = [line for line in r.output.splitlines() if "error:" in line]  # after the progress bar's \r
    assert r.exit_code == 2 and len(errors) == 1 and "no usable image" in errors[0]
    assert "Traceback" not in r.output
    assert not list(out.glob("*.tar")) and not (out / "manifest.json").exists()


def test_overwrite_clears_only_what_prepare_wrote(tmp_path):
    root = tmp_path / "src" / "cat"
    root.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(smooth(20, 20, i)).save(root / f"{i}.png")
    out = tmp_path / "out"
    prepare(tmp_path / "src", out, side=16, levels=2, shard_size=2, progress=False, order="sorted")
    (out / "notes.txt").write_text("mine")
    (out / "other-000007.tar").write_bytes(b"another tool's shard")  # a shard name prepare did not write
    with pytest.raises(ValueError, match="other arguments.*--overwrite"):
        prepare(tmp_path / "src", out, side=16, levels=2, shard_size=2, progress=False)
    m = prepare(tmp_path / "src", out, side=16, levels=2, shard_size=3, progress=False, overwrite=True)
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar"] and m["order"] == "shuffled"
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "other-000007.tar").read_bytes() == b"another tool's shard"


def test_ilsvrc_layout_at_512_for_the_k4_512_recipe(tmp_path, monkeypatch):
    """`cdc prepare --src ILSVRC2012 --side 512` (recipes/k4-512.yaml) on a tiny ILSVRC tree of
    photos larger than 512 px: default folder, top 576 = 512 x 1.125, four exact box-average levels
    that cover the recipe's sides 64..512, and the top is the LANCZOS short-side resize."""
    from cdc.cli import app
    from cdc.config import load
    from cdc.data.imageproc import resize_short_side

    root = tmp_path / "ILSVRC2012"
    shapes = {"n01": [(600, 800), (700, 640)], "n02": [(640, 960), (1000, 600)]}  # (h, w), all > 576
    src = {}
    for w, hw in shapes.items():
        (root / "train" / w).mkdir(parents=True)
        for i, (h, wd) in enumerate(hw):
            src[f"{w}_{i}"] = smooth(h, wd, 100 + i + 10 * len(src))
            Image.fromarray(src[f"{w}_{i}"]).save(root / "train" / w / f"{w}_{i}.png")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["prepare", "--src", "ILSVRC2012", "--side", "512", "--store", "png"])
    assert r.exit_code == 0, r.output
    recipe = load(Path(__file__).resolve().parents[1] / "recipes" / "k4-512.yaml")
    out = tmp_path / recipe.data.shards  # data/ILSVRC2012-512: the recipe reads prepare's default folder
    m = json.loads((out / "manifest.json").read_text())
    assert m["count"] == 4 and m["classes"] == ["n01", "n02"] and m["top"] == 576
    samples = read_shards(out)
    assert len(samples) == 4
    for key, a in src.items():
        lv = {int(ext.split(".")[0]): np.asarray(Image.open(io.BytesIO(b))) for ext, b in samples[key].items()
              if ext.endswith("png")}
        assert sorted(lv) == [72, 144, 288, 576]
        for s, stage in zip([72, 144, 288, 576], recipe.flow.sides, strict=True):
            assert min(lv[s].shape[:2]) == s >= stage  # shorter side s = stage side x 1.125
        want = np.asarray(resize_short_side(Image.fromarray(a), 576, 8))
        assert np.array_equal(lv[576], want)
        for s in (288, 144, 72):  # each level the exact (576 / s)^2 box mean of the top
            assert np.array_equal(lv[s], np.asarray(Image.fromarray(lv[576]).reduce(576 // s)))
