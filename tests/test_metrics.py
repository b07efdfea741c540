"""Evaluation metrics against known answers; Inception runs on random weights (real ones are a user file)."""

from __future__ import annotations

import io
import json
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cdc.cli import app
from cdc.eval import evalio as E
from cdc.eval import inception as I
from cdc.eval import metrics as M
from cdc.eval import scoring as SC
from cdc.eval import swd as S


def _images(n: int, side: int = 32, seed: int = 0) -> np.ndarray:
    """Structured uint8 (N, S, S, 3): smooth gradients plus random squares and pixel noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    out = np.empty((n, side, side, 3), np.float64)
    for i in range(n):
        img = np.stack([yy * rng.uniform(), xx * rng.uniform(), (yy + xx) / 2 * rng.uniform()], -1) * 200
        for _ in range(4):
            y, x, w = rng.integers(0, side - 4, 3)
            img[y : y + 2 + w % 6, x : x + 2 + w % 6] = rng.uniform(0, 255, 3)
        out[i] = img + rng.normal(0, 20, img.shape)
    return out.clip(0, 255).astype(np.uint8)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma == 0:
        return a
    r = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    x = torch.from_numpy(a).permute(0, 3, 1, 2).double()
    x = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")
    kt = torch.from_numpy(k)
    x = torch.nn.functional.conv2d(x.reshape(-1, 1, *x.shape[-2:]), kt.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, kt.view(1, 1, -1, 1)).reshape(len(a), 3, *a.shape[1:3])
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).byte().numpy()


def _save_pngs(folder, imgs):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return folder


class TinyNet(torch.nn.Module):
    """Cheap stand-in feature extractor with the Inception interface: (pool (B, 16), logits (B, 10))."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(3 * 8 * 8, 16, generator=g) / 8

    def forward(self, x):
        f = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
        p = f.flatten(1) @ self.w
        return p, p[:, :10]


# ----------------------------------------------------------------------------- FID


def test_frechet_diagonal_known_answer():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    s1, s2 = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(want, rel=1e-9)


def test_frechet_full_covariance_independent():
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), the latter by symmetric eigendecompositions
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 20)), rng.normal(size=(20, 20))
    s1, s2 = a @ a.T / 20 + 0.1 * np.eye(20), b @ b.T / 20 + 0.1 * np.eye(20)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    tr = np.sqrt(np.linalg.eigvalsh(r1 @ s2 @ r1).clip(0)).sum()
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert M.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_fid_self_zero_and_monotone_in_noise():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(4000, 16)) @ rng.normal(size=(16, 16))
    ref = M.gaussian_stats(f)
    assert M.frechet_distance(*M.gaussian_stats(f), *ref) == pytest.approx(0, abs=1e-8)
    fids = [
        M.frechet_distance(*M.gaussian_stats(f + s * rng.normal(size=f.shape)), *ref)
        for s in (0.1, 0.5, 1, 2)
    ]
    assert all(x < y for x, y in zip(fids, fids[1:], strict=False)), fids


def test_fid_monotone_in_blur_with_features():
    imgs = _images(64)
    net = TinyNet()
    feat = lambda a: net(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)[0].numpy()  # noqa: E731
    ref = M.gaussian_stats(feat(imgs))
    fids = [M.frechet_distance(*M.gaussian_stats(feat(_blur(imgs, s))), *ref) for s in (0, 0.7, 1.5, 3)]
    assert fids[0] == pytest.approx(0, abs=1e-6)
    assert all(x < y for x, y in zip(fids, fids[1:], strict=False)), fids


def test_streaming_moments_match_numpy():
    f = np.random.default_rng(3).normal(5, 2, size=(1000, 6))
    m = M.Moments()
    for i in range(0, 1000, 128):
        m.add(f[i : i + 128])
    mu, sigma = m.stats("x")
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-10)


def test_covariance_needs_two():
    with pytest.raises(ValueError, match="at least 2"):
        M.gaussian_stats(np.zeros((1, 4)))


# ----------------------------------------------------------------------------- IS, precision/recall


def test_inception_score_one_hot_equals_classes():
    c = 7
    logits = 100.0 * np.eye(c)[np.arange(10 * c) % c]  # each split holds every class once
    mean, std = M.inception_score(logits, splits=10)
    assert mean == pytest.approx(c, rel=1e-6) and std < 1e-6
    assert M.inception_score(np.zeros((20, 5)))[0] == pytest.approx(1.0)


def test_precision_recall_known_cases():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(300, 8)).astype(np.float32)
    assert M.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = real + 100
    assert M.precision_recall(real, far) == (0.0, 0.0)
    half = np.concatenate([real[:150], far[:150]])
    p, _ = M.precision_recall(real, half)
    assert p == pytest.approx(0.5)
    # blocked computation equals the one-block answer
    fake = rng.normal(0.5, 1.2, size=(200, 8)).astype(np.float32)
    assert M.precision_recall(real, fake, batch=37) == pytest.approx(M.precision_recall(real, fake))


def test_knn_radii_match_bruteforce():
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(50, 4)).astype(np.float32))
    d = torch.cdist(x, x).sort(1).values[:, 3]
    torch.testing.assert_close(M._knn_radii(x, 3, 11, 13), d)


# ----------------------------------------------------------------------------- SWD


def test_swd_zero_for_identical_and_grows_with_blur():
    imgs = _images(48)
    ref = S.collect_descriptors(E.Images(48, 32, lambda b: iter([imgs]), "x"), 48, 32, 48, seed=0)
    assert len(ref) == 2  # 32 px: levels 32 and 16
    same = S.swd_levels(ref, [r.copy() for r in ref])
    assert same["mean"] == 0.0
    vals = []
    for s in (0.6, 1.2, 2.5):
        b = _blur(imgs, s)
        d = S.collect_descriptors(E.Images(48, 32, lambda _, b=b: iter([b]), "x"), 48, 32, 48, seed=0)
        vals.append(S.swd_levels(ref, d))
    assert all(x["levels"][0] < y["levels"][0] for x, y in zip(vals, vals[1:], strict=False))
    assert all(x["mean"] < y["mean"] for x, y in zip(vals, vals[1:], strict=False)), vals


def test_laplacian_pyramid_reconstructs():
    x = torch.rand(2, 3, 32, 32)
    lv = S.laplacian_pyramid(x)
    up = S._blur(torch.nn.functional.interpolate(lv[1], scale_factor=2, mode="nearest"))
    torch.testing.assert_close(lv[0] + up, x)


# ----------------------------------------------------------------------------- Inception


def test_inception_random_weights_end_to_end():
    model, digest = I.load_inception(weights=False)
    assert digest == "random"
    assert sum(p.numel() for p in model.parameters()) == 23_850_960  # torchvision v3 (no aux) + 8 classes
    sd = model.state_dict()
    assert sd["fc.weight"].shape == (1008, 2048)
    assert "Mixed_7c.branch3x3dbl_3b.bn.running_var" in sd and "Mixed_5b.branch_pool.conv.weight" in sd
    x = torch.from_numpy(_images(3, side=48)).permute(0, 3, 1, 2).float() / 255
    pool, logits = model(x)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.isfinite(pool).all() and pool.std(0).mean() > 0
    again, _ = I.load_inception(weights=False)
    torch.testing.assert_close(again(x)[0], pool)  # random weights are reproducible


def test_inception_weights_file_roundtrip_and_wrong_file(tmp_path, monkeypatch):
    model, _ = I.load_inception(weights=False)
    f = tmp_path / I.WEIGHTS_NAME
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, f)
    monkeypatch.setattr(I, "WEIGHTS_SHA256", I.sha256_file(f))  # these random weights stand in for the real file
    loaded, digest = I.load_inception(tmp_path)  # a folder holding the file works too
    assert digest == I.sha256_file(f) and len(digest) == 64
    torch.testing.assert_close(loaded.fc.weight, model.fc.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    monkeypatch.setattr(I, "WEIGHTS_SHA256", I.sha256_file(bad))
    with pytest.raises(ValueError, match="not the FID Inception weights"):
        I.load_inception(bad)


def test_missing_weights_offline_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(I.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as e:
        I.load_inception()
    msg = str(e.value)
    assert "\n" not in msg and I.WEIGHTS_NAME in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(FileNotFoundError, match=I.WEIGHTS_NAME):
        I.load_inception(tmp_path / "nope.pth")


# ----------------------------------------------------------------------------- reference + score


def test_score_end_to_end_random_inception(tmp_path):
    """Precision/recall and SWD through the real network (random weights) on 4 images."""
    imgs = _images(4)
    ref_dir = _save_pngs(tmp_path / "ref" / "class_a", imgs).parent
    ref = tmp_path / "ref.npz"
    desc = SC.build_reference(
        ref_dir, ref, metrics="fid,pr,swd", inception_weights=False, progress=False, device="cpu"
    )
    assert desc["count"] == 4 and desc["side"] == 32 and desc["inception_sha256"] == "random"
    np.savez(tmp_path / "samples.npz", arr_0=imgs, arr_1=np.arange(4))
    (tmp_path / "samples.json").write_text(json.dumps({"cfg_scale": 1.5, "steps": [10, 10]}))
    res = SC.score(
        tmp_path / "samples.npz", ref, "pr,swd", inception_weights=False, progress=False, device="cpu"
    )
    m = res["metrics"]
    assert (m["precision"], m["recall"]) == (1.0, 1.0) and m["swd"]["mean"] == 0.0
    saved = json.loads((tmp_path / "samples.scores.json").read_text())
    assert saved["count"] == 4 and saved["sampler"]["cfg_scale"] == 1.5
    assert saved["inception_sha256"] == "random" and "pr" in saved["versions"]
    assert saved["reference"]["description"]["source"].startswith("folder")


def test_per_stage_fid(tmp_path):
    imgs = _images(40)
    net = (TinyNet(), "tiny")
    ref_dir = _save_pngs(tmp_path / "ref", imgs)
    ref = tmp_path / "ref.npz"
    SC.build_reference(ref_dir, ref, sides=[8, 16], metrics="fid", model=net, progress=False)
    stages = {f"stage{k}": SC._stage_down(imgs, s) for k, s in enumerate((8, 16, 32))}
    np.savez(tmp_path / "stages.npz", **stages)
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    res = SC.score(tmp_path / "samples.npz", ref, "fid", stages=True, model=net, progress=False)
    st = res["metrics"]["fid_stages"]
    assert [st[k]["side"] for k in ("stage0", "stage1", "stage2")] == [8, 16, 32]
    assert all(abs(v["fid"]) < 1e-6 for v in st.values())
    # a reference without the stage sides: one-line error telling how to rebuild
    SC.build_reference(ref_dir, tmp_path / "ref32.npz", metrics="fid", model=net, progress=False)
    with pytest.raises(ValueError, match="--sides 8"):
        SC.score(
            tmp_path / "samples.npz", tmp_path / "ref32.npz", "fid", stages=True, model=net, progress=False
        )


def test_reference_from_shards(tmp_path):
    imgs = _images(5, side=36)
    d = tmp_path / "shards"
    d.mkdir()
    with tarfile.open(d / "shard-000000.tar", "w") as tf:
        for i, a in enumerate(imgs):
            half = a.reshape(18, 2, 18, 2, 3).mean((1, 3)).astype(np.uint8)
            for ext, data in (("36.png", a), ("18.png", half), ("cls", None)):
                if data is None:
                    raw = b"3"
                else:
                    buf = io.BytesIO()
                    Image.fromarray(data).save(buf, format="PNG")
                    raw = buf.getvalue()
                ti = tarfile.TarInfo(f"{i:06d}.{ext}")
                ti.size = len(raw)
                tf.addfile(ti, io.BytesIO(raw))
    (d / "manifest.json").write_text(json.dumps({"count": 5}))
    src = E.reference_images(d, 32, n=4)
    got = np.concatenate(list(src.batches(3)))
    assert got.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(got, imgs[:4, 2:34, 2:34])  # centre crop of the 36 level, no resampling
    assert np.concatenate(list(E.reference_images(d, 16).batches(8))).shape == (5, 16, 16, 3)


def test_reference_from_a_tree_of_linked_class_folders(tmp_path):
    # a subset of ILSVRC2012 made of symlinks to its class folders: read as `cdc prepare` reads it
    imgs = _images(4, side=16)
    real = tmp_path / "real"
    _save_pngs(real / "a", imgs[:2])
    _save_pngs(real / "b", imgs[2:])
    tree = tmp_path / "subset"
    tree.mkdir()
    for c in ("a", "b"):
        (tree / c).symlink_to(real / c, target_is_directory=True)
    got = np.concatenate(list(E.reference_images(tree, 16).batches(8)))
    want = np.concatenate(list(E.reference_images(real, 16).batches(8)))
    assert got.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_errors(tmp_path):
    net = (TinyNet(), "tiny")
    imgs = _images(4)
    ref = tmp_path / "ref.npz"
    SC.build_reference(_save_pngs(tmp_path / "ref", imgs), ref, metrics="fid,swd", model=net, progress=False)
    cases = {
        "shape": (np.zeros((4, 32, 32), np.uint8), "expected \\(N, S, S, 3\\)"),
        "dtype": (np.zeros((4, 32, 32, 3), np.float32), "expected uint8"),
        "side": (np.zeros((4, 16, 16, 3), np.uint8), "samples are 16px but the reference"),
        "few": (np.zeros((1, 32, 32, 3), np.uint8), "at least 2"),
    }
    for name, (arr, msg) in cases.items():
        np.savez(tmp_path / f"{name}.npz", arr_0=arr)
        with pytest.raises(ValueError, match=msg) as e:
            SC.score(tmp_path / f"{name}.npz", ref, "fid", model=net, progress=False)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="built without pr"):
        SC.score(tmp_path / "few.npz", ref, "pr", model=net, progress=False)
    with pytest.raises(FileNotFoundError, match="samples not found"):
        SC.score(tmp_path / "missing.npz", ref, "fid", model=net)
    with pytest.raises(FileNotFoundError, match="reference not found"):
        SC.score(tmp_path / "few.npz", tmp_path / "noref.npz", "fid", model=net)
    with pytest.raises(ValueError, match="unknown metric"):
        SC.score(tmp_path / "few.npz", ref, "kid", model=net)


def test_cli_swd_only_and_error(tmp_path):
    imgs = _images(8)
    _save_pngs(tmp_path / "ref", imgs)
    np.savez(tmp_path / "samples.npz", arr_0=_blur(imgs, 1.0), arr_1=np.zeros(8, np.int64))
    runner = CliRunner()
    ref = str(tmp_path / "ref.npz")
    r = runner.invoke(
        app, ["score", "ref", "--data", str(tmp_path / "ref"), "--out", ref, "--metrics", "swd"]
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["score", str(tmp_path / "samples.npz"), "--ref", ref, "--metrics", "swd"])
    assert r.exit_code == 0, r.output
    assert "swd:" in r.output
    res = json.loads((tmp_path / "samples.scores.json").read_text())
    assert res["metrics"]["swd"]["mean"] > 0 and len(res["metrics"]["swd"]["levels"]) == 2
    r = runner.invoke(app, ["score", str(tmp_path / "ref"), "--ref", ref, "--metrics", "swd"])  # PNG folder
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ref.scores.json").read_text())["metrics"]["swd"]["mean"] == 0.0
    np.savez(tmp_path / "small.npz", arr_0=np.zeros((8, 16, 16, 3), np.uint8))
    r = runner.invoke(app, ["score", str(tmp_path / "small.npz"), "--ref", ref, "--metrics", "swd"])
    assert r.exit_code == 2
    assert "error: samples are 16px" in r.output and "Traceback" not in r.output


@pytest.mark.slow
def test_fid_end_to_end_random_inception(tmp_path):
    """FID of a set against itself through the 2048-d network is ~0 (sqrtm of 2048x2048: ~20 s on CPU)."""
    imgs = _images(4)
    ref = tmp_path / "ref.npz"
    SC.build_reference(
        _save_pngs(tmp_path / "ref", imgs), ref, metrics="fid", inception_weights=False, progress=False
    )
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    res = SC.score(tmp_path / "samples.npz", ref, "fid", inception_weights=False, progress=False)
    assert abs(res["metrics"]["fid"]) < 1e-3 * np.trace(SC.load_reference(ref)[0]["sigma"])


# ----------------------------------------------------------------------------- SWD without weights, channels


def _offline_no_weights(tmp_path, monkeypatch) -> None:
    """No Inception weights in the hub cache and no network to fetch them."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(I.urllib.request, "urlopen", offline)


def test_swd_only_end_to_end_without_inception_weights(tmp_path, monkeypatch):
    _offline_no_weights(tmp_path, monkeypatch)
    imgs = _images(8)
    _save_pngs(tmp_path / "ref", imgs)
    _save_pngs(tmp_path / "same", imgs)
    np.savez(tmp_path / "samples.npz", arr_0=_blur(imgs, 1.0))
    run = CliRunner().invoke
    ref = str(tmp_path / "ref.npz")
    # the default reference needs the weights: one line that names the way out
    r = run(app, ["score", "ref", "--src", str(tmp_path / "ref"), "--out", ref])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert I.WEIGHTS_NAME in r.output and "--metrics swd" in r.output and "Traceback" not in r.output
    r = run(app, ["score", "ref", "--src", str(tmp_path / "ref"), "--out", ref, "--metrics", "swd"])
    assert r.exit_code == 0, r.output
    # no --metrics: score what the reference holds (SWD), say why FID is absent, ask for nothing
    r = run(app, ["score", str(tmp_path / "samples.npz"), "--ref", ref])
    assert r.exit_code == 0, r.output
    assert "notice: ref.npz holds swd only, so scoring swd; for fid,pr rebuild it with" in r.output
    got = json.loads((tmp_path / "samples.scores.json").read_text())
    assert list(got["metrics"]) == ["swd"] and got["inception_sha256"] is None
    explicit = SC.score(tmp_path / "samples.npz", ref, "swd", progress=False, out=tmp_path / "x.json")
    assert got["metrics"]["swd"] == explicit["metrics"]["swd"] and got["metrics"]["swd"]["mean"] > 0
    r = run(app, ["score", str(tmp_path / "same"), "--ref", ref])  # PNG folder of the reference images
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "same.scores.json").read_text())["metrics"]["swd"]["mean"] == 0.0
    # asking for what the reference lacks: which metric, and the command that adds it
    r = run(app, ["score", str(tmp_path / "samples.npz"), "--ref", ref, "--metrics", "fid,swd"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"{ref} was built without fid (it holds swd); add it: `cdc score ref --src" in r.output
    assert f"--out {ref} --metrics fid,swd --side 32 -n 8`" in r.output
    assert "need the Inception weights" in r.output and "or score the rest: --metrics swd" in r.output
    r = run(app, ["score", str(tmp_path / "samples.npz"), "--ref", ref, "--metrics", "is"])
    assert r.exit_code == 2 and "--metrics swd" in r.output and I.WEIGHTS_NAME in r.output


def test_greyscale_against_colour_is_noticed_and_earlier_scores_kept(tmp_path):
    colour = _images(8)
    grey = colour.mean(-1, keepdims=True).round().astype(np.uint8)  # (N, S, S, 1)
    _save_pngs(tmp_path / "colour", colour)
    (tmp_path / "grey").mkdir()
    for i, a in enumerate(grey):
        Image.fromarray(a[..., 0], mode="L").save(tmp_path / "grey" / f"{i:05d}.png")
    cref, gref = tmp_path / "cref.npz", tmp_path / "gref.npz"
    assert SC.build_reference(tmp_path / "colour", cref, metrics="swd", progress=False)["greyscale"] is False
    assert SC.build_reference(tmp_path / "grey", gref, metrics="swd", progress=False)["greyscale"] is True
    np.savez(tmp_path / "g1.npz", arr_0=grey)
    np.savez(tmp_path / "g3.npz", arr_0=np.repeat(grey, 3, -1))
    np.savez(tmp_path / "c.npz", arr_0=colour)
    a = SC.score(tmp_path / "g1.npz", cref, "swd", progress=False)
    b = SC.score(tmp_path / "g3.npz", cref, "swd", progress=False)
    assert a["metrics"]["swd"] == b["metrics"]["swd"]  # 1 channel is scored as that channel repeated
    assert a["channels"] == {"samples": "greyscale", "reference": "colour"}
    assert [n.split(":")[0] for n in a["notices"]] == ["samples are greyscale, the reference cref.npz is colour"]
    assert "repeated to 3 channels" in a["notices"][0]
    assert json.loads((tmp_path / "g1.scores.json").read_text())["notices"] == a["notices"]
    r = CliRunner().invoke(app, ["score", str(tmp_path / "c.npz"), "--ref", str(gref), "--metrics", "swd"])
    assert r.exit_code == 0 and "notice: samples are colour, the reference gref.npz is greyscale" in r.output
    same = SC.score(tmp_path / "g1.npz", gref, "swd", progress=False)  # like with like: no channel notice
    assert same["channels"] == {"samples": "greyscale", "reference": "greyscale"} and same["metrics"]["swd"]["mean"] == 0
    # g1.scores.json existed (against cref): kept aside, named, and the new one replaced it whole
    kept = Path(same["previous"])
    assert same["notices"] == [f"kept the earlier g1.scores.json as {kept.name}"]
    assert kept.parent == tmp_path and kept.name.startswith("g1.scores.") and kept.suffix == ".json"
    assert json.loads(kept.read_text())["metrics"] == a["metrics"]
    assert json.loads((tmp_path / "g1.scores.json").read_text())["metrics"] == same["metrics"]
    third = SC.score(tmp_path / "g1.npz", gref, "swd", progress=False)  # never overwrites a kept one
    assert Path(third["previous"]) != kept and json.loads(kept.read_text())["metrics"] == a["metrics"]
    assert len(list(tmp_path.glob("g1.scores*.json"))) == 3
