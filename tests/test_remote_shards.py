"""Shards on object storage: a folder URL on an HTTP server that serves byte ranges and on an
S3-compatible server (moto's server mode), both on 127.0.0.1: the loader gives the local batches,
training resumes exactly, and `cdc score ref --src URL` reads the same images."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from conftest import smooth_image_tree, take
from servers import http_server, s3_server, set_env

from cdc.config import from_dict
from cdc.data.loader import make_loader
from cdc.data.prepare import prepare

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")
pytest.importorskip("aiohttp")
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = smooth_image_tree(tmp_path_factory.mktemp("src"), 8, [(40, 40)], (4,))
    out = tmp_path_factory.mktemp("shards")
    prepare(root, out, side=16, levels=2, shard_size=5, progress=False)
    return out


def config(spec: str, workers: int = 2, cache_dir: str = "", cache_gb: float = 0.0, **train) -> object:
    return from_dict(
        {
            "model": {"preset": "tiny", "num_classes": 3, "in_channels": 3, "patch": 4},
            "flow": {"sides": [8, 16]},
            "data": {"shards": spec, "workers": workers, "partitions": 2, "cache_dir": cache_dir, "cache_gb": cache_gb},
            "train": {"batch_size": 4, "precision": "fp32", "log_every": 1, "sample_every": 0,
                      "ckpt_every": 0, "milestone_every": 0, **train},
        }
    )


def same_batches(a: list, b: list) -> bool:
    return all(
        x.meta["keys"] == y.meta["keys"] and all(torch.equal(u, v) for u, v in zip(x.x1 + x.t, y.x1 + y.t, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def check_loader(url: str, local: str) -> None:
    """The remote loader's batches equal the local ones, and a resume from its state continues them."""
    ref = take(make_loader(config(local)), 8)
    got = take(make_loader(config(url)), 8)
    assert same_batches(ref, got)
    first = make_loader(config(url, workers=0))
    take(first, 5)
    resumed = make_loader(config(url, workers=0))
    resumed.load_state_dict(first.state_dict())
    assert same_batches(ref[5:], take(resumed, 3))


def test_http_folder_url_gives_the_local_batches(shards):
    with http_server(shards) as (url, sent):
        check_loader(url, str(shards))
        # three loaders: manifest.json and index.npy each, then one ranged read per sample (16 batches
        # of 4, and what the two workers prefetch), never a whole shard
        index = np.load(shards / "index.npy")
        small = {(shards / "manifest.json").stat().st_size, (shards / "index.npy").stat().st_size}
        samples = [n for n in sent if n not in small]
        assert len(sent) - len(samples) == 6 and len(samples) >= 16 * 4 and set(samples) <= set(index[:, 1].tolist())


def test_s3_folder_url_gives_the_local_batches(shards, monkeypatch):
    with s3_server(shards) as env:
        set_env(monkeypatch, env)
        check_loader(env["CDC_TEST_S3_URL"], str(shards))


@pytest.mark.parametrize("server", ["http", "s3"])
def test_training_from_a_server_resumes_exactly(shards, tmp_path, monkeypatch, server):
    from cdc.train import checkpoint as C
    from cdc.train.loop import train

    with (http_server(shards) if server == "http" else s3_server(shards)) as got:
        if server == "s3":
            set_env(monkeypatch, got)
        url = got[0] if server == "http" else got["CDC_TEST_S3_URL"]
        train(config(url, steps=6), tmp_path / "whole", progress=False)
        train(config(url, steps=3), tmp_path / "parts", progress=False)
        train(config(url, steps=6), tmp_path / "parts", progress=False)  # resumes at step 3
    a, _ = C.load_latest(tmp_path / "whole" / "checkpoints")
    b, _ = C.load_latest(tmp_path / "parts" / "checkpoints")
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["ranks"][0]["data"]["position"] == b["ranks"][0]["data"]["position"] == 24


def test_a_cache_folder_keeps_whole_shards_within_its_cap(shards, tmp_path):
    """data.cache_dir: each shard fetched once, whole, then read locally; past data.cache_gb the
    least recently used copies go, and the batches are the same as without a cache."""
    ref = take(make_loader(config(str(shards), workers=0)), 6)
    one = (shards / "train-000000.tar").stat().st_size
    with http_server(shards) as (url, sent):
        cached = config(url, workers=0, cache_dir=str(tmp_path / "c"), cache_gb=2.5 * one / 2**30)
        got = take(make_loader(cached), 6)
        assert same_batches(ref, got)
        copies = list((tmp_path / "c").glob("*.tar"))
        sizes = {p.stat().st_size for p in shards.glob("*.tar")}
        assert 1 <= len(copies) <= 2 and all(p.stat().st_size in sizes for p in copies)  # the cap: 2.5 shards
        assert max(sent) >= min(sizes)  # whole shards, not ranges


def test_score_ref_reads_the_same_images_from_http_and_s3(shards, monkeypatch):
    from cdc.eval.evalio import reference_images

    local = np.concatenate(list(reference_images(str(shards), 16).batches(10)))
    with http_server(shards) as (url, _):
        over_http = np.concatenate(list(reference_images(url, 16).batches(10)))
    with s3_server(shards) as env:
        set_env(monkeypatch, env)
        over_s3 = np.concatenate(list(reference_images(env["CDC_TEST_S3_URL"], 16).batches(10)))
    assert local.shape == (24, 16, 16, 3)
    np.testing.assert_array_equal(local, over_http)
    np.testing.assert_array_equal(local, over_s3)


def test_a_missing_manifest_on_a_server_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    with http_server(tmp_path / "empty") as (url, _), pytest.raises(FileNotFoundError, match="manifest.json"):
        make_loader(config(url))


def test_a_server_without_byte_ranges_is_one_line_naming_the_cache(shards, monkeypatch):
    import servers

    monkeypatch.setattr(servers._RangeHandler, "do_GET", servers.SimpleHTTPRequestHandler.do_GET)
    with http_server(shards) as (url, _):
        with pytest.raises(ValueError, match="does not serve byte ranges; set data.cache_dir"):
            take(make_loader(config(url, workers=0)), 1)
