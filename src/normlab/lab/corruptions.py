"""Corrupted images in the style of MNIST-C and ImageNet-C: seeded, five severities, torch only.

Hendrycks & Dietterich 2019 (ImageNet-C, CIFAR-10-C) and Mu & Gilmer 2019 (MNIST-C) measure
robustness to common corruptions at five severities. :func:`corrupt` makes the corruptions the
lab uses from any batch of images ``(N, C, H, W)`` with values in ``value_range`` (default
``[0, 1]``), with torch operations and no data files; the result stays in that range (it is
clipped, as the published sets are). Randomness comes from the ``generator`` only, so a seeded
generator gives the same images every time.

==================  =========================================================================
name                severity 1 .. 5 (images scaled to [0, 1]; H the image height)
==================  =========================================================================
``gaussian_noise``  ``x + N(0, s^2)``, s = 0.08, 0.12, 0.18, 0.26, 0.38 (ImageNet-C's)
``shot_noise``      ``Poisson(x * lam) / lam``, lam = 60, 25, 12, 5, 3 (ImageNet-C's)
``gaussian_blur``   Gaussian kernel, sigma = 0.5, 0.75, 1.0, 1.25, 1.5 pixels (times H / 28 for
                    images larger than MNIST's 28 pixels)
``contrast``        ``(x - m) * c + m``, m the image's mean, c = 0.4, 0.3, 0.2, 0.1, 0.05
                    (ImageNet-C's ladder)
``brightness``      ``x + b``, b = 0.1, 0.2, 0.3, 0.4, 0.5 (ImageNet-C's value shift, stronger:
                    the digits' dark background is what it moves)
``shift``           translation by d = 0.05, 0.1, 0.15, 0.2, 0.25 x H pixels in a random
                    direction per image (MNIST-C's translate)
``rotation``        rotation by a = 10, 20, 30, 40, 50 degrees, random sign per image
                    (MNIST-C's rotate)
==================  =========================================================================

The geometric ones are built on two plain transforms, :func:`translate` and :func:`rotate`
(per-image offsets and angles in, images out; bilinear, the border filled with the range's low
end), kept apart from the random draws so that training-time augmentation can use them too.

>>> import torch
>>> x = torch.rand(4, 1, 8, 8)
>>> g = torch.Generator().manual_seed(0)
>>> y = corrupt(x, "gaussian_noise", 3, generator=g)
>>> y.shape, bool(y.min() >= 0), bool(y.max() <= 1), bool((y != x).any())
(torch.Size([4, 1, 8, 8]), True, True, True)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "rotate", "translate", "warp"]

SEVERITIES = (1, 2, 3, 4, 5)

_GAUSSIAN = (0.08, 0.12, 0.18, 0.26, 0.38)
_SHOT = (60.0, 25.0, 12.0, 5.0, 3.0)
_BLUR = (0.5, 0.75, 1.0, 1.25, 1.5)  # pixels, x H / 28 above 28 pixels
_CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
_BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
_SHIFT = (0.05, 0.1, 0.15, 0.2, 0.25)  # x H pixels
_ROTATION = (10.0, 20.0, 30.0, 40.0, 50.0)  # degrees


def warp(x: Tensor, theta: Tensor, padding: str = "zeros") -> Tensor:
    """Images ``x`` ``(N, C, H, W)`` resampled through ``affine_grid`` matrices ``theta`` ``(N, 2, 3)``:
    output pixel ``p`` (normalized coordinates, ``align_corners=False``: pixel centres at
    ``(i + 0.5) / W * 2 - 1``) reads input point ``theta[:, :, :2] @ p + theta[:, :, 2]``, bilinear;
    what comes in from outside is ``padding``: ``"zeros"`` or ``"border"`` (edges extended).
    The one resampler of the lab's shifts and rotations (corruptions here, augmentation in
    :mod:`normlab.lab.augment`).
    """
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def translate(x: Tensor, offsets: Tensor) -> Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` moved by ``offsets[i] = (dx, dy)`` pixels (right and
    down positive; fractions interpolated bilinearly); what moves in is zeros.

    >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, 1, 1] = 1
    >>> translate(x, torch.tensor([[1.0, 0.0]]))[0, 0]
    tensor([[0., 0., 0.],
            [0., 0., 1.],
            [0., 0., 0.]])
    """
    n, _, h, w = x.shape
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    # affine_grid maps output to input coordinates in [-1, 1]: moving the image right by dx
    # pixels samples from dx pixels to the left.
    theta[:, 0, 2] = -offsets[:, 0].to(x.dtype) * 2 / w
    theta[:, 1, 2] = -offsets[:, 1].to(x.dtype) * 2 / h
    return warp(x, theta)


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` rotated by ``degrees[i]`` about its centre
    (counter-clockwise as displayed, rows going down); corners that come in are zeros.

    >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, 0, 1] = 1
    >>> rotate(x, torch.tensor([90.0]))[0, 0].round(decimals=4)
    tensor([[0., 0., 0.],
            [1., 0., 0.],
            [0., 0., 0.]])
    """
    n, _, h, w = x.shape
    a = torch.deg2rad(degrees.to(x.dtype))
    cos, sin = torch.cos(a), torch.sin(a)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    # Output pixel (u, v) samples the input at the inverse rotation; the aspect ratio keeps the
    # rotation rigid in pixels for non-square images.
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    return warp(x, theta)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    c = x.shape[1]
    # Separable: rows then columns, each channel alone; reflect at the border (as ImageNet-C's
    # scipy filters do), so the blur does not darken the edges.
    pad = F.pad(x, (radius, radius, 0, 0), mode="reflect" if x.shape[3] > radius else "replicate")
    x = F.conv2d(pad, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    pad = F.pad(x, (0, 0, radius, radius), mode="reflect" if x.shape[2] > radius else "replicate")
    return F.conv2d(pad, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _unit(n: int, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
    return torch.rand(n, generator=generator, dtype=torch.float64).to(dtype)


_CORRUPTIONS: dict[str, Callable[[Tensor, int, torch.Generator | None], Tensor]] = {
    "gaussian_noise": lambda x, s, g: x + _GAUSSIAN[s - 1] * torch.randn(
        x.shape, generator=g, dtype=torch.float64).to(x),
    "shot_noise": lambda x, s, g: torch.poisson(x.clamp(0, 1).double() * _SHOT[s - 1], generator=g).to(x)
    / _SHOT[s - 1],
    "gaussian_blur": lambda x, s, g: _gaussian_blur(x, _BLUR[s - 1] * max(1.0, x.shape[2] / 28)),
    "contrast": lambda x, s, g: (x - x.mean(dim=(1, 2, 3), keepdim=True)) * _CONTRAST[s - 1]
    + x.mean(dim=(1, 2, 3), keepdim=True),
    "brightness": lambda x, s, g: x + _BRIGHTNESS[s - 1],
    "shift": lambda x, s, g: translate(x, _SHIFT[s - 1] * x.shape[2] * torch.stack(
        [torch.cos(phi := 2 * math.pi * _unit(x.shape[0], g, x.dtype)), torch.sin(phi)], 1)),
    "rotation": lambda x, s, g: rotate(x, _ROTATION[s - 1] * torch.where(
        _unit(x.shape[0], g, x.dtype) < 0.5, -1.0, 1.0).to(x.dtype)),
}

CORRUPTIONS = tuple(_CORRUPTIONS)


def corrupt(x: Tensor, name: str, severity: int, generator: torch.Generator | None = None, *,
            value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """The corruption ``name`` of the images ``x`` at ``severity`` (1 to 5), clipped to ``value_range``.

    Args:
        x: float images ``(N, C, H, W)`` with values in ``value_range``; not modified.
        name: one of :data:`CORRUPTIONS` (see the module docstring).
        severity: 1 (mild) to 5 (severe).
        generator: the source of randomness (noise, directions, signs); seed it for the same
            images every time. None uses torch's global generator.
        value_range: ``(low, high)`` of the pixel values, e.g. of data standardized after
            scaling to [0, 1]: ``((0 - mean) / std, (1 - mean) / std)``. The corruption works on
            the image scaled to [0, 1], where the table's parameters hold.

    Returns:
        A new tensor of ``x``'s shape and dtype, in ``value_range``.

    Raises:
        ValueError: an unknown name, a severity outside 1..5, ``x`` not 4-D floating point, or a
            range with ``low >= high``.
    """
    if name not in _CORRUPTIONS:
        raise ValueError(f"corrupt: unknown corruption {name!r}; the corruptions are {list(CORRUPTIONS)}.")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"corrupt: severity must be an int from 1 (mild) to 5 (severe), got {severity!r}.")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"corrupt: x must be floating-point images (N, C, H, W), got {got}.")
    low, high = (float(v) for v in value_range)
    if not low < high:
        raise ValueError(f"corrupt: value_range must be (low, high) with low < high, got {value_range!r}.")
    unit = (x - low) / (high - low)
    out = _CORRUPTIONS[name](unit, severity, generator).clamp(0, 1)
    return out * (high - low) + low
