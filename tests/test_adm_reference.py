"""`cdc score --ref` with ADM reference batches (VIRTUAL_imagenet256_labeled.npz layout), and the
Inception input that makes ADM's stored TF statistics comparable with our features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_metrics import TinyNet, _images
from typer.testing import CliRunner

from cdc.cli import app
from cdc.eval import inception as I
from cdc.eval import metrics as M
from cdc.eval import scoring as S


def test_tf1_resize_bilinear_known_answer():
    x = torch.tensor([0.0, 10.0, 20.0, 70.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()
    out = I.tf1_resize_bilinear(x, 8)
    # TF1: output i reads input i * 4 / 8, the last ones clamp to the last pixel
    want = torch.tensor([0.0, 5.0, 10.0, 15.0, 20.0, 45.0, 70.0, 70.0])
    torch.testing.assert_close(out[0, 0, 0], want)
    torch.testing.assert_close(out[0, 0, :, 3], torch.full((8,), 15.0))  # constant along the other axis
    half = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    assert not torch.allclose(half, out)  # torch's half-pixel centres differ: why we do not use it
    y = torch.rand(2, 3, 299, 299)
    assert I.tf1_resize_bilinear(y, 299) is y
    down = I.tf1_resize_bilinear(torch.arange(6.0).view(1, 1, 1, 6).expand(1, 1, 6, 6), 4)
    torch.testing.assert_close(down[0, 0, 0], torch.tensor([0.0, 1.5, 3.0, 4.5]))


def test_inception_input_is_the_graphs_sub_128_mul_1_128():
    model, _ = I.load_inception(weights=False)
    seen = {}
    model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    a = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3), dtype=np.uint8)
    model(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)
    want = (torch.from_numpy(a).permute(0, 3, 1, 2).double() - 128) / 128
    torch.testing.assert_close(seen["x"].double(), want, atol=1e-5, rtol=0)


def _adm_and_cdc_refs(tmp_path, net):
    """An ADM-layout batch and the `cdc score ref` file built from the same images."""
    imgs = _images(40, seed=1)
    raw = tmp_path / "images.npz"
    np.savez(raw, arr_0=imgs)
    cdc_ref = tmp_path / "ref.npz"
    S.build_reference(raw, cdc_ref, metrics="fid,pr,swd", model=net, progress=False)
    arrays, _ = S.load_reference(cdc_ref)
    adm = tmp_path / "VIRTUAL_tiny32_labeled.npz"
    rng = np.random.default_rng(0)
    np.savez(
        adm,
        arr_0=imgs,
        arr_1=np.arange(40) % 10,
        mu=arrays["mu"],  # stored statistics, here from the same features, as ADM stores the TF graph's
        sigma=arrays["sigma"],
        mu_s=rng.normal(size=8),  # spatial (sFID) statistics: not used
        sigma_s=np.eye(8),
    )
    return imgs, cdc_ref, adm


def test_adm_reference_scores_like_the_equivalent_cdc_reference(tmp_path):
    net = (TinyNet(), "tiny")
    imgs, cdc_ref, adm = _adm_and_cdc_refs(tmp_path, net)
    samples = tmp_path / "samples.npz"
    np.savez(
        samples, arr_0=np.clip(imgs.astype(int) + _images(40, seed=2) // 4 - 32, 0, 255).astype(np.uint8)
    )
    assert S.is_adm_reference(adm) and not S.is_adm_reference(cdc_ref) and not S.is_adm_reference(samples)
    a = S.score(samples, cdc_ref, "fid,is,pr,swd", model=net, progress=False, out=tmp_path / "a.json")
    b = S.score(samples, adm, "fid,is,pr,swd", model=net, progress=False, out=tmp_path / "b.json")
    ma, mb = a["metrics"], b["metrics"]
    assert ma["fid"] > 1e-3 and mb["fid"] == pytest.approx(ma["fid"], rel=1e-9)
    assert (mb["precision"], mb["recall"], mb["is"]) == (ma["precision"], ma["recall"], ma["is"])
    assert mb["swd"]["levels"] == pytest.approx(ma["swd"]["levels"], rel=1e-6)
    assert a["reference"]["kind"] == "cdc" and b["reference"]["kind"] == "adm"
    used = b["reference"]["used"]
    assert "ADM reference batch" in used and "stored mu/sigma" in used and "40 images" in used
    assert json.loads((tmp_path / "b.json").read_text())["reference"]["used"] == used
    # FID is scored against the stored statistics, not against statistics of arr_0
    with np.load(adm) as z:
        stored = dict(z)
    stored["mu"] = stored["mu"] + 0.5
    np.savez(tmp_path / "shifted.npz", **stored)
    c = S.score(samples, tmp_path / "shifted.npz", "fid", model=net, progress=False, out=tmp_path / "c.json")
    with np.load(samples) as z:
        pool = net[0](torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).float() / 255)[0].numpy()
    want = M.frechet_distance(*M.gaussian_stats(pool), stored["mu"], stored["sigma"])
    assert c["metrics"]["fid"] == pytest.approx(want, rel=1e-6) and abs(want - ma["fid"]) > 1


def test_adm_reference_cli_and_errors(tmp_path):
    net = (TinyNet(), "tiny")
    imgs, _, adm = _adm_and_cdc_refs(tmp_path, net)
    np.savez(tmp_path / "samples.npz", arr_0=imgs[:20])
    r = CliRunner().invoke(
        app, ["score", str(tmp_path / "samples.npz"), "--ref", str(adm), "--metrics", "swd"]
    )
    assert r.exit_code == 0, r.output
    assert "reference: " in r.output and "ADM reference batch; SWD vs 40 of its images" in r.output
    r = CliRunner().invoke(app, ["score", str(tmp_path / "samples.npz"), "--ref", str(adm), "--stages"])
    assert r.exit_code == 2 and "cdc score ref --src" in r.output and len(r.output.strip().splitlines()) == 1
    np.savez(tmp_path / "s16.npz", arr_0=imgs[:20, :16, :16])
    with pytest.raises(ValueError, match="samples are 16px but the reference"):
        S.score(tmp_path / "s16.npz", adm, "fid,pr", model=net, progress=False)


def test_reference_of_the_old_inception_input_must_be_rebuilt(tmp_path):
    net = (TinyNet(), "tiny")
    imgs, cdc_ref, _ = _adm_and_cdc_refs(tmp_path, net)
    arrays, desc = S.load_reference(cdc_ref)
    desc["versions"]["fid"] = "cdc-fid-1: pool3 2048-d, scipy sqrtm, eps 1e-6 fallback"
    old = tmp_path / "old.npz"
    np.savez(old, **arrays, meta=np.array(json.dumps(desc)))
    np.savez(tmp_path / "samples.npz", arr_0=imgs)
    with pytest.raises(ValueError, match="cdc-fid-1.*rebuild"):
        S.score(tmp_path / "samples.npz", old, "fid", model=net, progress=False)


def test_adm_512_reference_batch_reads_like_the_256_one(tmp_path):
    """VIRTUAL_imagenet512.npz (recipes/k4-512.yaml's reference): ADM's unlabeled 512 px layout, arr_0
    uint8 NHWC plus float64 mu/sigma and the spatial mu_s/sigma_s, no arr_1. Nothing is sized for 256:
    FID is taken against the stored statistics, P/R and SWD from arr_0 at 512 px, as with 256."""
    net = (TinyNet(), "tiny")
    imgs = _images(4, side=512, seed=3)
    samples = _images(4, side=512, seed=5)
    feats = net[0](torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)[0].numpy().astype(np.float64)
    mu, sigma = feats.mean(0) + 0.25, np.cov(feats, rowvar=False) + np.eye(16)  # "its whole dataset"
    adm = tmp_path / "VIRTUAL_imagenet512.npz"
    rng = np.random.default_rng(0)
    np.savez(adm, arr_0=imgs, mu=mu, sigma=sigma, mu_s=rng.normal(size=8), sigma_s=np.eye(8))
    np.savez(tmp_path / "images.npz", arr_0=imgs)
    cdc_ref = tmp_path / "ref.npz"
    S.build_reference(tmp_path / "images.npz", cdc_ref, metrics="pr,swd", model=net, progress=False)
    np.savez(tmp_path / "s.npz", arr_0=samples)
    assert S.is_adm_reference(adm)
    b = S.score(tmp_path / "s.npz", adm, "fid,pr,swd", model=net, progress=False, out=tmp_path / "b.json")
    a = S.score(tmp_path / "s.npz", cdc_ref, "pr,swd", model=net, progress=False, out=tmp_path / "a.json")
    pool = net[0](torch.from_numpy(samples).permute(0, 3, 1, 2).float() / 255)[0].numpy()
    want = M.frechet_distance(*M.gaussian_stats(pool), mu, sigma)
    mb, ma = b["metrics"], a["metrics"]
    assert mb["fid"] == pytest.approx(want, rel=1e-6) and want > 0.1
    assert (mb["precision"], mb["recall"]) == (ma["precision"], ma["recall"])
    assert mb["swd"]["levels"] == pytest.approx(ma["swd"]["levels"], rel=1e-6)
    assert len(mb["swd"]["levels"]) == len(ma["swd"]["levels"]) == 6  # 512 .. 16 px Laplacian levels
    assert b["reference"]["kind"] == "adm" and "VIRTUAL_imagenet512.npz" in b["reference"]["used"]
    r = CliRunner().invoke(app, ["score", str(tmp_path / "s.npz"), "--ref", str(adm), "--metrics", "swd"])
    assert r.exit_code == 0 and "ADM reference batch; SWD vs 4 of its images" in r.output, r.output
    np.savez(tmp_path / "s256.npz", arr_0=samples[:, ::2, ::2])
    with pytest.raises(ValueError, match="samples are 256px but the reference .* is 512px"):
        S.score(tmp_path / "s256.npz", adm, "fid,pr", model=net, progress=False)
