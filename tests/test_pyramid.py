import pytest
import torch

from cdc.flow import pyramid as P


def test_down_then_up_identity_and_up_then_down():
    x = torch.randn(3, 2, 8, 8)
    assert torch.equal(P.down(P.up(x)), x)  # D∘U = id exactly
    y = P.up(P.down(x))  # U∘D is the blockwise mean projection
    assert torch.allclose(P.down(y), P.down(x))
    assert torch.allclose(P.up(P.down(y)), y)  # idempotent projection


def test_down_is_block_mean_known_answer():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(P.down(x)[0, 0], torch.tensor([[2.5, 4.5], [10.5, 12.5]]))
    assert torch.equal(
        P.up(torch.tensor([[[1.0, 2.0]]]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous())[0, 0, :2, :2],
        torch.tensor([[1.0, 1.0], [1.0, 1.0]]),
    )


def test_composite_downsampling_is_transitive():
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert torch.allclose(P.down_to(x, 4), P.down(P.down(P.down(x))))
    assert torch.allclose(P.down_to(P.down_to(x, 16), 4), P.down_to(x, 4))
    assert P.levels(x, [4, 8, 16, 32])[-1] is x or torch.equal(P.levels(x, [4, 8, 16, 32])[-1], x)


def test_uint8_down_to_averages_exactly():
    x = torch.tensor([[[[0, 1], [1, 1]]]], dtype=torch.uint8)
    assert P.down_to(x, 1).item() == pytest.approx(0.75)


def test_bad_sides_raise():
    with pytest.raises(ValueError):
        P.down_to(torch.zeros(1, 1, 12, 12), 5)
    with pytest.raises(ValueError):
        P.up_to(torch.zeros(1, 1, 4, 4), 12)


def test_aligned_crop_commutes_with_box_downsampling():
    g = torch.Generator().manual_seed(0)
    full = torch.randn(3, 72, 72, dtype=torch.float64)  # expanded top level (e.g. 64 * 1.125)
    lv = P.levels(full, [9, 18, 36, 72])
    crop_sides = [8, 16, 32, 64]
    for _ in range(10):
        off = P.aligned_crop_offset(72, 64, align=8, generator=g)
        assert off[0] % 8 == 0 and off[1] % 8 == 0 and 0 <= off[0] <= 8
        crops = P.crop_levels(lv, crop_sides, off, full_side=72)
        for c, s in zip(crops, crop_sides):
            assert torch.allclose(c, P.down_to(crops[-1], s))  # crop of level = D(crop)
            assert torch.allclose(c.flip(-1), P.down_to(crops[-1].flip(-1), s))  # flip commutes
    assert P.aligned_crop_offset(72, 64, align=8, random=False) == (0, 0)
    assert P.aligned_crop_offset(80, 64, align=8, random=False) == (8, 8)
