"""normlab.lab.corruptions (issue 16): each corruption changes the image, grows with severity in
a measure that fits it, is reproducible from its seed, and keeps the data's range."""

from __future__ import annotations

import math

import pytest
import torch

from normlab.lab.corruptions import CORRUPTIONS, SEVERITIES, corrupt, rotate, translate
from normlab.lab.data import load_dataset


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", limit=64)
    lo = (0 - data.mean[0]) / data.std[0]
    hi = (1 - data.mean[0]) / data.std[0]
    return data.x_train[:64], (lo, hi)


def _unit(x, value_range):
    lo, hi = value_range
    return (x - lo) / (hi - lo)


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def _measure(name, clean, out):
    """A measure that grows with each corruption's severity (images scaled to [0, 1])."""
    if name == "contrast":  # the spread about the image's mean shrinks
        return -float(out.std(dim=(1, 2, 3)).mean())
    if name == "brightness":
        return float(out.mean())
    if name == "gaussian_blur":  # the fine detail goes: the mean absolute difference of neighbours falls
        return -float((out[..., 1:] - out[..., :-1]).abs().mean())
    return _mse(out, clean)  # noise, shift, rotation: the distance from the clean image


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_changes_the_image_stays_in_range_and_grows_with_severity(name, digits):
    x, value_range = digits
    clean = _unit(x, value_range)
    measures = []
    for severity in SEVERITIES:
        out = corrupt(x, name, severity, torch.Generator().manual_seed(0), value_range=value_range)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= value_range[0] - 1e-5 and float(out.max()) <= value_range[1] + 1e-5
        assert _mse(_unit(out, value_range), clean) > 1e-4, (name, severity)
        measures.append(_measure(name, clean, _unit(out, value_range)))
    assert all(a < b for a, b in zip(measures, measures[1:])), (name, measures)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_are_reproducible_from_the_seed(name):
    x = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    a = corrupt(x, name, 4, torch.Generator().manual_seed(7))
    b = corrupt(x, name, 4, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    if name in ("gaussian_noise", "shot_noise", "shift", "rotation"):  # the random ones
        assert not torch.equal(a, corrupt(x, name, 4, torch.Generator().manual_seed(8)))
    assert torch.equal(x, torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1)))  # input kept


def test_translate_moves_by_whole_pixels_exactly():
    x = torch.rand(2, 1, 6, 6)
    moved = translate(x, torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    torch.testing.assert_close(moved[0, :, :, 2:], x[0, :, :, :-2])
    assert float(moved[0, :, :, :2].abs().max()) == 0
    torch.testing.assert_close(moved[1, :, :-1, :], x[1, :, 1:, :])


def test_rotate_by_90_degrees_equals_rot90_and_by_0_is_identity():
    x = torch.rand(3, 2, 5, 5)
    torch.testing.assert_close(rotate(x, torch.zeros(3)), x)
    torch.testing.assert_close(rotate(x, torch.full((3,), 90.0)), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_noise_has_the_published_standard_deviation():
    x = torch.full((200, 1, 16, 16), 0.5)
    for severity, sd in zip(SEVERITIES, (0.08, 0.12, 0.18, 0.26, 0.38)):
        out = corrupt(x, "gaussian_noise", severity, torch.Generator().manual_seed(0))
        clipped = float((out == 0).float().mean() + (out == 1).float().mean())
        assert float((out - x).std()) == pytest.approx(sd, rel=0.05 + clipped), severity
    out = corrupt(x, "shot_noise", 1, torch.Generator().manual_seed(0))
    assert float((out - x).std()) == pytest.approx(math.sqrt(0.5 * 60) / 60, rel=0.05)  # Poisson: var = lam x


def test_corrupt_errors_state_the_rule():
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"unknown corruption 'fog'; the corruptions are \['gaussian_noise'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity must be an int from 1 .* got 6"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match=r"floating-point images \(N, C, H, W\), got a torch.float32 tensor of shape \(4, 4\)"):
        corrupt(x[0, 0], "contrast", 1)
    with pytest.raises(ValueError, match="low < high, got \\(1, 0\\)"):
        corrupt(x, "contrast", 1, value_range=(1, 0))
