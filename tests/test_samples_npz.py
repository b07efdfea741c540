"""samples.npz / stages.npz streamed from the PNGs: the bytes np.savez writes (what np.load and
ADM's evaluator read), atomic, with memory that does not grow with the image count."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from cdc.sample.options import labels_for
from cdc.sample.outdir import NPZ_BLOCK, assemble, img_path, save_npz, write_png

SIDE, C = 32, 3


def _folder(root: Path, n: int, stages: list[int] | None = None) -> tuple[Path, np.ndarray, np.ndarray]:
    """A `cdc sample` folder of n random RGB PNGs (and stage PNGs): (folder, images, labels)."""
    rng = np.random.default_rng(n)
    imgs = rng.integers(0, 256, (n, SIDE, SIDE, C), dtype=np.uint8)
    for k in range(len(stages or [])):
        (root / "stages" / f"stage{k}").mkdir(parents=True)
    (root / "images").mkdir(parents=True)
    for i, im in enumerate(imgs):
        for k, s in enumerate(stages or []):
            write_png(img_path(root, i, k), im[:: SIDE // s, :: SIDE // s])
        write_png(img_path(root, i), im)
    return root, imgs, labels_for(n, [3, 1, 4])


def _entries(path: Path) -> dict[str, tuple[bytes, int]]:
    with zipfile.ZipFile(path) as z:
        return {i.filename: (z.read(i), i.compress_type) for i in z.infolist()}


def test_npz_holds_the_bytes_np_savez_writes(tmp_path):
    out, imgs, labels = _folder(tmp_path / "s", 150, stages=[8, 16, 32])  # not a multiple of NPZ_BLOCK
    assemble(out, labels, C, [8, 16, 32], stages=True)
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].dtype == np.uint8 and np.array_equal(z["arr_0"], imgs)
        assert z["arr_1"].dtype == np.int64 and np.array_equal(z["arr_1"], labels)
    ref = io.BytesIO()
    np.savez(ref, arr_0=imgs, arr_1=labels.astype(np.int64))
    ours, want = _entries(out / "samples.npz"), _entries(ref)  # zip timestamps aside, the same file
    assert ours == want and {t for _, t in ours.values()} == {zipfile.ZIP_STORED}
    with np.load(out / "stages.npz") as z:
        assert sorted(z.files) == ["stage0", "stage1", "stage2"]
        assert np.array_equal(z["stage0"], imgs[:, ::4, ::4]) and np.array_equal(z["stage2"], imgs)
    assert (out / "grid.png").is_file() and (out / "stages.png").is_file()


def _peak(root: Path, n: int) -> int:
    out, _, labels = _folder(root, n)
    tracemalloc.start()
    try:
        assemble(out, labels, C, [SIDE], stages=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_npz_memory_does_not_grow_with_the_image_count(tmp_path):
    # both counts fill the grid (it reads the first 128 images), so only the npz could differ
    small, large = _peak(tmp_path / "a", 2 * NPZ_BLOCK), _peak(tmp_path / "b", 16 * NPZ_BLOCK)
    all_images = 16 * NPZ_BLOCK * SIDE * SIDE * C  # 3 MiB: stacking them once would exceed this
    # measured: 2.106 and 2.113 MB (the grid's 128 enlarged images are most of it); the writer that
    # stacked every image: 2.09 and 6.80 MB
    assert abs(large - small) < 64 * 1024, (small, large)
    assert large < all_images, (small, large)


def test_a_failed_npz_write_leaves_the_old_file_and_no_temp(tmp_path):
    out, imgs, labels = _folder(tmp_path / "s", 70)
    assemble(out, labels, C, [SIDE], stages=False)
    before = (out / "samples.npz").read_bytes()
    img_path(out, 69).write_bytes(b"not a png")  # the second block fails to decode
    with pytest.raises(OSError):
        assemble(out, labels, C, [SIDE], stages=False)
    assert (out / "samples.npz").read_bytes() == before
    assert not list(out.glob(".samples.npz.tmp.*"))


def test_a_block_that_does_not_fit_its_header_is_refused(tmp_path):
    rows = np.zeros((2, 4), np.uint8)
    with pytest.raises(ValueError, match="3 rows written, its header says 4"):
        save_npz(tmp_path / "x.npz", {"a": ((4, 4), np.dtype(np.uint8), [rows, rows[:1]])})
    with pytest.raises(ValueError, match="does not fit"):
        save_npz(tmp_path / "x.npz", {"a": ((2, 4), np.dtype(np.int64), [rows])})
    assert not list(tmp_path.iterdir())
