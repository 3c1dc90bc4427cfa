"""Training-time data augmentation: seeded random shifts and rotations of a batch of images.

``data.augment`` names what is applied to every training batch (never to the test split or to
the train-accuracy evaluation): ``"none"``, ``"shift"``, ``"rotate"`` or ``"shift+rotate"``.
Each image gets its own random affine map, drawn uniformly:

* shift: ``(dx, dy)`` in ``[-s, s] x side`` pixels, ``s = data.augment_shift`` (a fraction of the
  image side, default 0.1: up to 2.8 pixels on 28 x 28 MNIST, 0.8 on 8 x 8 digits);
* rotation: an angle in ``[-a, a]`` degrees about the image centre, ``a = data.augment_degrees``
  (default 15).

The map is applied with :func:`torch.nn.functional.affine_grid` and ``grid_sample`` (bilinear,
``padding_mode="border"``: pixels moved in from outside copy the nearest edge pixel, which on
digit images is background, so a shifted digit is not framed by the data set's mean value).
Images are assumed square (the lab's are), so a rotation in the normalized coordinates of
``affine_grid`` is a rotation in pixels.

Reproducible without state: the draws for a batch come from a generator seeded with the job's
seed and the step's index (:func:`step_generator`), so a job resumed from a checkpoint sees the
augmentations an uninterrupted run would, and the arms of one seed see the same ones (a paired
comparison). A data-parallel run draws for the global batch and each process takes its slice.

>>> import torch
>>> x = torch.zeros(4, 1, 8, 8); x[:, :, 3:5, 3:5] = 1.0
>>> y = augment_batch(x, "shift+rotate", seed=0, step=7)
>>> y.shape, torch.equal(y, augment_batch(x, "shift+rotate", seed=0, step=7))
(torch.Size([4, 1, 8, 8]), True)
>>> torch.equal(augment_batch(x, "none", seed=0, step=7), x)
True
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .config import ConfigError, DataConfig
from .corruptions import warp

__all__ = ["AUGMENTS", "affine_params", "apply_affine", "augment_batch", "check_augment", "step_generator"]

AUGMENTS = ("none", "shift", "rotate", "shift+rotate")
_TAG = 0xA06  # keeps the augmentation's stream apart from any other use of (seed, step)


def check_augment(config: DataConfig) -> None:
    """Check ``data.augment``, ``data.augment_shift`` and ``data.augment_degrees``.

    Raises:
        ConfigError: naming the field, the value given and the valid values.

    >>> check_augment(DataConfig(augment="flip"))
    Traceback (most recent call last):
    ...
    normlab.lab.config.ConfigError: data.augment must be one of 'none', 'shift', 'rotate', 'shift+rotate', got 'flip'.
    """
    if config.augment not in AUGMENTS:
        raise ConfigError(f"data.augment must be one of {', '.join(map(repr, AUGMENTS))}, got {config.augment!r}.")
    if not 0.0 <= config.augment_shift <= 0.5:
        raise ConfigError(f"data.augment_shift must be in [0, 0.5] (the largest shift as a fraction of the image "
                          f"side), got {config.augment_shift!r}.")
    if not 0.0 <= config.augment_degrees <= 180.0:
        raise ConfigError(f"data.augment_degrees must be in [0, 180] (the largest rotation in degrees), "
                          f"got {config.augment_degrees!r}.")


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for the augmentations of one training step of the job with ``seed``:
    a function of ``(seed, step)`` alone, mixed by numpy's ``SeedSequence``."""
    state = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, step, _TAG]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def affine_params(count: int, kind: str, generator: torch.Generator, *, shift: float = 0.1,
                  degrees: float = 15.0) -> torch.Tensor:
    """``(count, 2, 3)`` float32 ``affine_grid`` matrices: a rotation by ``U[-degrees, degrees]``
    and a translation by ``U[-shift, shift]`` image sides along each axis, as ``kind`` asks.

    A shift of ``f`` sides is ``2 f`` in ``affine_grid``'s normalized coordinates (``[-1, 1]``
    spans the image). Both draws are made for every kind, so ``"shift"`` and ``"shift+rotate"``
    shift an image by the same amount.
    """
    if kind not in AUGMENTS:
        raise ConfigError(f"data.augment must be one of {', '.join(map(repr, AUGMENTS))}, got {kind!r}.")
    u = torch.rand(count, 3, generator=generator, dtype=torch.float64) * 2 - 1  # U[-1, 1]: angle, dx, dy
    angle = u[:, 0] * math.radians(degrees) if "rotate" in kind else torch.zeros(count, dtype=torch.float64)
    move = u[:, 1:] * 2 * shift if "shift" in kind else torch.zeros(count, 2, dtype=torch.float64)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)
    return theta.float()


def augment_batch(x: torch.Tensor, kind: str, *, seed: int, step: int, shift: float = 0.1, degrees: float = 15.0,
                  part: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The batch ``x`` ``(N, C, H, W)`` with each image shifted and/or rotated at random.

    Args:
        x: images, square (``H == W``).
        kind: one of :data:`AUGMENTS` (``"none"`` returns ``x`` itself).
        seed, step: the job's seed and the step's index; they alone fix the draws.
        shift, degrees: the largest shift (fraction of the side) and rotation (degrees).
        part: ``(rank, world)``: ``x`` is this process's slice of a global batch of
            ``world * N`` images; its images get the draws of that slice.

    Returns:
        A new tensor of ``x``'s shape, dtype and device.

    Raises:
        ConfigError: an unknown ``kind``.
    """
    if kind == "none":
        return x
    rank, world = part
    theta = affine_params(len(x) * world, kind, step_generator(seed, step), shift=shift, degrees=degrees)
    return apply_affine(x, theta[rank * len(x) : (rank + 1) * len(x)])


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Images ``x`` ``(N, C, H, W)`` resampled through ``affine_grid`` matrices ``theta`` ``(N, 2, 3)``:
    output pixel ``p`` (normalized coordinates) reads input point ``theta[:, :, :2] @ p + theta[:, :, 2]``,
    bilinear, edges extended (``padding_mode="border"``), ``align_corners=False`` (pixel centres
    at ``(i + 0.5) / W * 2 - 1``). So a translation ``t`` moves the image by ``-t W / 2`` pixels.
    """
    return warp(x, theta, padding="border")
