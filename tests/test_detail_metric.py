"""cdc.eval.detail against known answers: identical sets, Gaussian blur of white noise, a pure
cosine, and the ranking of blur strengths and added noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cdc.eval import detail as D


def _images(n: int, seed: int, smooth: float = 0.7) -> torch.Tensor:
    """Stand-in 'real' images: white noise lightly blurred, so they have detail to lose (N, 1, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    return D.gaussian_blur(torch.randn(n, 1, 32, 32, generator=g) * 0.5, smooth).clamp(-1, 1)


def test_identical_sets_score_zero_on_the_spectrum_and_near_floor_on_swd():
    x = _images(200, 0)
    ref = D.detail_reference(x)
    same = D.detail_scores(ref, x)
    assert same["spec_hf"] == pytest.approx(0.0, abs=1e-9)
    assert same["blur_px"] == pytest.approx(0.0, abs=1e-6)
    blurred = D.detail_scores(ref, D.gaussian_blur(x, 0.5))
    assert same["swd_fine"] < 0.25 * blurred["swd_fine"]  # patches at other positions: only sampling noise


def test_blur_of_white_noise_reads_back_as_its_sigma():
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 1, 32, 32, generator=g)
    ref = D.detail_reference(noise)
    for sigma in (0.5, 1.0):
        got = D.detail_scores(ref, D.gaussian_blur(noise, sigma))["blur_px"]
        assert got == pytest.approx(sigma, rel=0.12), (sigma, got)


def test_heavier_blur_and_upscaling_rank_worse_and_noise_reads_as_negative_blur():
    ref = D.detail_reference(_images(300, 0))
    x = _images(300, 1)  # other images of the same kind
    s = {name: D.detail_scores(ref, D.quantise(img)) for name, img in {
        "real": x, "b05": D.gaussian_blur(x, 0.5), "b1": D.gaussian_blur(x, 1.0), "bicubic": D.bicubic_from(x, 16),
    }.items()}  # fmt: skip
    for key in ("spec_hf", "swd_fine", "blur_px"):
        assert s["real"][key] < s["b05"][key] < s["b1"][key], key
        assert s["real"][key] < s["bicubic"][key], key
    noisy = D.detail_scores(ref, x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2)))
    assert noisy["blur_px"] < -0.1 and noisy["spec_hf"] > 5 * s["real"]["spec_hf"]
    assert noisy["swd_fine"] > 3 * s["real"]["swd_fine"]


def test_radial_power_of_a_cosine_sits_at_its_radius():
    i = torch.arange(32, dtype=torch.float64)
    x = torch.cos(2 * math.pi * 5 * i / 32)[None, None, None, :].expand(2, 1, 32, 32)  # 5 cycles across
    lp = D.radial_log_power(x)
    assert int(np.argmax(lp)) == 5
    assert lp[5] - np.delete(lp, 5).max() > 20  # everything else is round-off


def test_bad_inputs_are_one_line_errors():
    ref = D.detail_reference(_images(8, 0))
    with pytest.raises(ValueError, match="16-px|32-px"):
        D.detail_scores(ref, torch.zeros(4, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 2"):
        D.detail_reference(torch.zeros(1, 1, 32, 32))
