"""The Fashion-MNIST judge: a tiny training run separates real images by class and its Frechet
distance ranks real-vs-real far below real-vs-noise."""

import io
import sys

import numpy as np
import pytest
import torch

from cdc.data.sources import ASSETS
from cdc.eval import fmnist as E
from cdc.eval.metrics import frechet_distance, gaussian_stats


def test_load_split_pads_like_prepare():
    x, y = E.load_split("test", ASSETS)  # the bundled subset is always present
    assert x.shape[1:] == (1, 32, 32) and len(x) == len(y)
    assert x.min() >= -1 and x.max() <= 1
    # 2-px zero padding on every side: the border is exactly background (-1)
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :, :2].flatten()])
    assert torch.all(border == -1)
    assert set(y.tolist()) == set(range(10))


def test_to_float_accepts_nhwc_uint8():
    u8 = np.zeros((3, 32, 32, 1), np.uint8)
    u8[:, 5, 7, 0] = 255
    x = E.to_float(u8)
    assert x.shape == (3, 1, 32, 32)
    assert x[0, 0, 5, 7] == 1 and x[0, 0, 0, 0] == -1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("clf") / "clf.pt"
    model, info = E.load_or_train(path, ASSETS, seed=0, epochs=2, limit=1500, verbose=False, width=8)
    return path, model, info


def test_tiny_classifier_far_above_chance_and_cached(tiny):
    path, model, info = tiny
    assert info["test_accuracy"] > 0.5  # chance is 0.1
    assert path.is_file()
    again, info2 = E.load_or_train(path)  # cached: same weights, no retraining
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert info2["test_accuracy"] == info["test_accuracy"]


def test_frechet_real_vs_real_below_real_vs_noise(tiny):
    _, model, _ = tiny
    x, _ = E.load_split("test", ASSETS)
    n = len(x) // 2
    a, b = x[:n], x[n : 2 * n]
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(a.shape, generator=g) * 2 - 1).clamp(-1, 1)
    with torch.no_grad():
        fa, fb, fn = (model.features(t).numpy() for t in (a, b, noise))
    real = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fb))
    fake = frechet_distance(*gaussian_stats(fa), *gaussian_stats(fn))
    assert real < 0.2 * fake


def test_evaluate_real_images_scores_high(tiny):
    path, _, _ = tiny
    x, y = E.load_split("test", ASSETS)
    u8 = ((x[:300] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    res = E.evaluate(u8, y[:300].numpy(), clf=path)
    assert res["n"] == 300 and res["accuracy"] > 0.5
    shuffled = E.evaluate(u8, np.roll(y[:300].numpy(), 1), clf=path)  # wrong labels -> low accuracy
    assert shuffled["accuracy"] < res["accuracy"] - 0.3


def test_blocks_are_separate_evaluations_of_consecutive_slices(tiny):
    path, _, _ = tiny
    x, y = E.load_split("test", ASSETS)
    u8 = ((x[:230] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = y[:230].numpy().copy()
    labels[100:150] = (labels[100:150] + 1) % 10  # block 2 gets half its labels wrong
    res = E.evaluate(u8, labels, clf=path, block=100)  # 230 images: blocks 0..99, 100..199; the tail is left out
    assert [b["first"] for b in res["blocks"]] == [0, 100]
    for b in res["blocks"]:
        alone = E.evaluate(u8[b["first"] : b["first"] + 100], labels[b["first"] : b["first"] + 100], clf=path)
        assert b["accuracy"] == pytest.approx(alone["accuracy"]) and b["fd_clf"] == pytest.approx(alone["fd_clf"])
    a0, a1 = (b["accuracy"] for b in res["blocks"])
    assert a0 - a1 > 0.3  # the wrong labels land in the second block only
    assert res["block_mean"]["accuracy"] == pytest.approx((a0 + a1) / 2)
    assert res["block_sd"]["accuracy"] == pytest.approx(abs(a0 - a1) / 2**0.5)  # sd of two values, ddof 1
    assert res["n"] == 230  # the whole-set figures are still there
    with pytest.raises(ValueError, match="at least two blocks"):
        E.evaluate(u8, labels, clf=path, block=200)


def test_probe_stages_on_a_zero_velocity_model(tiny, tmp_path):
    """A freshly initialised DiT outputs 0 (AdaLN-Zero), so refinement only adds the stage noise:
    the label cannot matter (label_effect exactly 0) and one entry per refinement stage comes back."""
    from cdc.config import from_dict, to_dict
    from cdc.flow.pyramid import down_to, up_to
    from cdc.nn.model import build_model
    from cdc.train import checkpoint

    cfg = from_dict(
        {
            "model": {"preset": "tiny", "in_channels": 1, "num_classes": 10},
            "flow": {"sides": [8, 16, 32]},
        }
    )
    checkpoint.save(
        tmp_path / "step_0000000.pt", {"config": to_dict(cfg), "model": build_model(cfg).state_dict()}
    )
    res = E.probe_stages(tmp_path / "step_0000000.pt", per_class=3, steps=2, clf=tiny[0], root=ASSETS)
    assert [s["from_side"] for s in res["stages"]] == [8, 16] and res["images"] == 30
    # the probe's real images: 3 per class, first in test order
    x, y = E.load_split("test", ASSETS)
    idx = torch.cat([torch.nonzero(y == c)[:3, 0] for c in range(10)])
    judge, jinfo = E.load_or_train(tiny[0], ASSETS)
    for s in res["stages"]:
        assert s["label_effect"] == 0.0
        # the coarse figures are the judge's on the test images box-averaged to from_side and
        # upsampled back (nearest), with their own labels
        up = up_to(down_to(x[idx], s["from_side"]), 32)
        assert s["acc_coarse"] == pytest.approx(float((judge(up).argmax(1) == y[idx]).float().mean()))
        assert s["fd_coarse"] == pytest.approx(E.fd_to_test(judge, jinfo, up, "coarse"), rel=1e-6)
        assert s["fd_refined"] > 0.0 and abs(30 * s["acc_refined"] - round(30 * s["acc_refined"])) < 1e-4
    assert res["stages"][0]["fd_coarse"] > res["stages"][1]["fd_coarse"]  # 8 px loses more than 16 px
    u8 = ((x[idx] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert res["fd_real"] == pytest.approx(E.evaluate(u8, y[idx].numpy(), clf=tiny[0], root=ASSETS)["fd_clf"], rel=1e-4)
    with pytest.raises(ValueError, match="1-channel model ending at 32 px"):
        bad = from_dict({"model": {"preset": "tiny"}, "flow": {"sides": [16, 32, 64]}})
        checkpoint.save(tmp_path / "b.pt", {"config": to_dict(bad), "model": build_model(bad).state_dict()})
        E.probe_stages(tmp_path / "b.pt", clf=tiny[0], root=ASSETS)


def test_judge_trains_on_first_use_even_under_no_grad(tmp_path):
    """evaluate() runs under no_grad and trains the judge when its cache file is missing: the
    weights must be exactly those of the same training with grad on, and moved from the init."""
    with torch.no_grad():
        judge, info = E.load_or_train(tmp_path / "j.pt", ASSETS, epochs=2, limit=256, verbose=False, width=8)
    assert (tmp_path / "j.pt").is_file() and info["train_images"] == 256
    x, y = E.load_split("train", ASSETS)
    ref = E.train_classifier(x[:256], y[:256], epochs=2, seed=0, width=8)
    torch.manual_seed(0)
    init = E.Classifier(8)  # train_classifier's init: the same seed, then the same constructor
    for (name, w), r in zip(judge.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(w, r), name
    moved = [n for (n, w), w0 in zip(judge.state_dict().items(), init.state_dict().values())
             if w.is_floating_point() and not torch.allclose(w, w0)]  # fmt: skip
    assert len(moved) >= 4, moved  # conv and linear weights took optimizer steps
    # the reloaded cache is the same judge, with the same measured test accuracy
    again, info2 = E.load_or_train(tmp_path / "j.pt", ASSETS)
    assert info2["test_accuracy"] == info["test_accuracy"]
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), judge.state_dict().values()))


def test_cli_errors_are_one_line(tiny, tmp_path, capsys):
    """`python -m cdc.eval.fmnist` on bad input: exit 2 with one line naming the problem."""
    np.savez(tmp_path / "nolab.npz", np.zeros((4, 32, 32, 1), np.uint8))
    np.savez(tmp_path / "ok.npz", np.zeros((20, 32, 32, 1), np.uint8), np.zeros(20, np.int64))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    clf = str(tiny[0])
    for argv, needle in [
        ([str(tmp_path / "missing.npz"), "--clf", clf], "no samples.npz"),
        ([str(tmp_path / "nolab.npz"), "--clf", clf], "no labels"),
        ([str(tmp_path / "ok.npz"), "--clf", clf, "--block", "-3"], "at least two blocks"),
        ([str(tmp_path / "ok.npz"), "--clf", str(tmp_path / "junk.pt")], "not a Fashion-MNIST judge"),
    ]:
        with pytest.raises(SystemExit) as e:
            E.main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert (tmp_path / "junk.pt").read_bytes() == b"junk"  # a bad judge file is reported, not replaced


def test_judge_training_reports_progress(tmp_path, capsys, monkeypatch):
    """Training the judge says so: a start line, per-epoch loss (a tqdm bar on a terminal), a done line."""
    E.load_or_train(tmp_path / "log.pt", ASSETS, epochs=2, limit=128, width=8)
    err = capsys.readouterr().err.splitlines()  # captured stderr is no terminal: plain lines for a log
    assert err[0].startswith("training the Fashion-MNIST judge on 128 images (2 epochs")
    assert [line.split(":")[0] for line in err[1:3]] == ["judge epoch 1/2", "judge epoch 2/2"]
    assert all(float(line.split("mean loss ")[1].split()[0]) > 0 for line in err[1:3])
    assert err[3].startswith("judge: test accuracy") and str(tmp_path / "log.pt") in err[3] and len(err) == 4

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    x, y = E.load_split("train", ASSETS)
    E.train_classifier(x[:256], y[:256], epochs=2, width=8, progress=True)  # 2 batches of 128 per epoch
    out = term.getvalue()
    assert "judge: 100%" in out and "4/4 [" in out and "epoch=2/2" in out and "loss=" in out  # the bar
    assert "judge epoch" not in out  # a terminal gets the bar, not the log lines
    E.train_classifier(x[:128], y[:128], epochs=1, width=8)
    assert term.getvalue() == out  # progress=False (the default) stays silent
