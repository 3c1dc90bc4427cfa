"""Training-time augmentation (data.augment): the transforms against scipy / torch.rot90, the
seeding by (job seed, step), the config checks, and a resumed job seeing the same augmentations."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest
import torch
from scipy import ndimage

from normlab.lab import job as job_module
from normlab.lab.augment import affine_params, apply_affine, augment_batch, check_augment, step_generator
from normlab.lab.config import ConfigError, DataConfig
from normlab.lab.trainer import Interrupted, Trainer

from .small import EXPERIMENT, small_config


def images(n=6, side=8, seed=0):
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_a_shift_is_scipys_linear_shift_with_nearest_edges():
    # Oracle: scipy.ndimage.shift (order 1 = linear, mode "nearest" = edges extended); a translation
    # t in affine_grid's normalized coordinates moves the image by -t * side / 2 pixels.
    x = images()
    theta = affine_params(len(x), "shift", step_generator(3, 5), shift=0.2).double()
    out = apply_affine(x, theta)
    for i in range(len(x)):
        dx, dy = (-theta[i, :, 2] * 8 / 2).tolist()
        expected = ndimage.shift(x[i, 0].numpy(), (dy, dx), order=1, mode="nearest")
        np.testing.assert_allclose(out[i, 0].numpy(), expected, atol=1e-9)


def test_a_quarter_turn_is_rot90():
    x = images()
    angle = math.pi / 2
    theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]],
                         dtype=torch.float64).expand(len(x), 2, 3)
    torch.testing.assert_close(apply_affine(x, theta), torch.rot90(x, k=1, dims=(2, 3)), atol=1e-9, rtol=0)


def test_draws_stay_within_the_configured_ranges_and_cover_them():
    theta = affine_params(4000, "shift+rotate", step_generator(0, 0), shift=0.1, degrees=15.0).double()
    angles = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
    moves = theta[:, :, 2] / 2  # fractions of the side
    assert angles.abs().max() <= 15.0 + 1e-4 and angles.abs().max() > 14.5
    assert moves.abs().max() <= 0.1 + 1e-6 and moves.abs().max() > 0.099
    torch.testing.assert_close(theta[:, 0, 0], theta[:, 1, 1])  # a pure rotation: no scaling or shear
    only_shift = affine_params(100, "shift", step_generator(0, 0)).double()
    only_turn = affine_params(100, "rotate", step_generator(0, 0)).double()
    assert torch.equal(only_shift[:, :, :2], torch.eye(2, dtype=torch.float64).expand(100, 2, 2))
    assert torch.equal(only_turn[:, :, 2], torch.zeros(100, 2, dtype=torch.float64))


def test_augmentations_are_a_function_of_seed_and_step():
    x = images()
    same = augment_batch(x, "shift+rotate", seed=4, step=9)
    assert torch.equal(same, augment_batch(x, "shift+rotate", seed=4, step=9))
    assert not torch.equal(same, augment_batch(x, "shift+rotate", seed=4, step=10))
    assert not torch.equal(same, augment_batch(x, "shift+rotate", seed=5, step=9))
    assert augment_batch(x, "none", seed=4, step=9) is x


def test_a_process_slice_gets_the_global_batchs_draws():
    x = images(8)
    whole = augment_batch(x, "shift+rotate", seed=1, step=2)
    parts = [augment_batch(x[r * 4:(r + 1) * 4], "shift+rotate", seed=1, step=2, part=(r, 2)) for r in range(2)]
    torch.testing.assert_close(torch.cat(parts), whole, atol=0, rtol=0)


@pytest.mark.parametrize("field, value, match", [
    ("augment", "flip", r"data.augment must be one of 'none', 'shift', 'rotate', 'shift\+rotate', got 'flip'"),
    ("augment_shift", 0.7, r"data.augment_shift must be in \[0, 0.5\].*got 0.7"),
    ("augment_degrees", -5.0, r"data.augment_degrees must be in \[0, 180\].*got -5.0"),
])
def test_bad_augment_settings_name_the_field_value_and_valid_ones(field, value, match):
    with pytest.raises(ConfigError, match=match):
        check_augment(DataConfig(**{field: value}))


def test_the_trainer_refuses_a_bad_augment_before_the_run(tmp_path):
    with pytest.raises(ConfigError, match="data.augment must be one of"):
        Trainer(EXPERIMENT, small_config(**{"data.augment": "mirror"}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def comparable(rows):
    return sorted(({k: v for k, v in r.items() if k != "wall_time"} for r in rows),
                  key=lambda r: (r["arm"], r["seed"], r["step"]))


def test_resumed_job_gets_the_same_augmentations(tmp_path, monkeypatch):
    config = small_config(**{"data.augment": "shift+rotate", "data.augment_shift": 0.2, "data.augment_degrees": 30.0})
    reference = Trainer(EXPERIMENT, config, tmp_path / "ref", progress=False).run()
    plain = Trainer(EXPERIMENT, small_config(), tmp_path / "plain", progress=False).run()
    # The augmentation changes training (else this test could not fail) ...
    assert comparable(reference) != comparable(plain)
    evaluate, calls = job_module._evaluate, {"n": 0}

    def evaluate_then_signal(*args):
        calls["n"] += 1
        if calls["n"] == 14:  # in the second job, between its checkpoints at steps 10 and 20
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(*args)

    monkeypatch.setattr(job_module, "_evaluate", evaluate_then_signal)
    with pytest.raises(Interrupted, match="checkpoint saved"):
        Trainer(EXPERIMENT, config, tmp_path / "run", progress=False).run()
    monkeypatch.setattr(job_module, "_evaluate", evaluate)
    resumed = Trainer(EXPERIMENT, config, tmp_path / "run", resume=True, progress=False).run()
    # ... and a resumed run trains on the same augmented batches as the uninterrupted one.
    assert comparable(resumed) == comparable(reference)
