"""Model builders: structure, placement, init, norms by name, and their errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.lab.config import ConfigError, ModelConfig
from normlab.lab.models import build_model


def test_mlp_structure_and_placement():
    before = build_model(ModelConfig(widths=[7, 5], norm="batch", placement="before"), (1, 4, 4), 3)
    after = build_model(ModelConfig(widths=[7, 5], norm="batch", placement="after", dropout=0.2), (1, 4, 4), 3)
    assert [type(m).__name__ for m in before.blocks[0]] == ["Linear", "BatchNorm1d", "Sigmoid"]
    assert [type(m).__name__ for m in after.blocks[0]] == ["Linear", "Sigmoid", "BatchNorm1d", "Dropout"]
    assert isinstance(before.blocks[1].pre_activation, normlab.BatchNorm1d)
    assert isinstance(after.blocks[1].pre_activation, nn.Linear)
    assert before(torch.randn(6, 1, 4, 4)).shape == (6, 3)
    assert before.blocks[0].layer.in_features == 16


@pytest.mark.parametrize("norm, expected", [("batch", "BatchNorm2d"), ("group", "GroupNorm"),
                                            ("layer", "GroupNorm"), ("instance", "InstanceNorm2d"), ("none", None)])
def test_cnn_norms_by_name(norm, expected):
    model = build_model(ModelConfig(kind="cnn", widths=[8, 16], norm=norm, activation="relu"), (3, 8, 8), 10)
    names = [type(m).__name__ for m in model.blocks[1]]
    assert (expected in names) if expected else names == ["Conv2d", "ReLU"]
    if norm == "layer":
        assert model.blocks[1].norm.num_groups == 1  # layer norm over (C, H, W)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_gaussian_init():
    torch.manual_seed(0)
    model = build_model(ModelConfig(widths=[400], init_std=0.01), (1, 20, 20), 10)
    weight = model.blocks[0].layer.weight
    assert weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(model.blocks[0].layer.bias) == 0


def test_same_seed_same_weights_regardless_of_norm():
    torch.manual_seed(3)
    a = build_model(ModelConfig(widths=[5], norm="none"), (4,), 2)
    torch.manual_seed(3)
    b = build_model(ModelConfig(widths=[5], norm="batch"), (4,), 2)
    torch.testing.assert_close(a.blocks[0].layer.weight, b.blocks[0].layer.weight)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("kind", "rnn", "model.kind must be 'mlp' or 'cnn', got 'rnn'"),
        ("activation", "swishy", r"model.activation must be one of \[.*'sigmoid'.*\], got 'swishy'"),
        ("placement", "middle", "model.placement must be 'before' or 'after'"),
        ("norm", "batchy", r"model.norm must be one of \[.*'batch'.*\], got 'batchy'"),
        ("widths", [], "model.widths must be a non-empty list of positive ints"),
        ("dropout", 1.0, r"model.dropout must lie in \[0, 1\), got 1.0"),
        ("init_std", -1.0, "model.init_std must be > 0 or none"),
    ],
)
def test_bad_model_configs(field, value, match):
    config = ModelConfig()
    setattr(config, field, value)
    with pytest.raises(ConfigError, match=match):
        build_model(config, (1, 4, 4), 3)


@pytest.mark.parametrize("norm, expected", [("renorm", "BatchRenorm2d"), ("ghost", "GhostBatchNorm2d"),
                                            ("batch_act", "BatchNormAct2d"), ("frozen", "FrozenBatchNorm2d")])
def test_cnn_builds_the_rank_of_every_rank_dependent_norm(norm, expected):
    """A CNN's norm must be the 2-D class: BatchRenorm1d on (N, C, H, W) input is an error."""
    import torch

    model = build_model(ModelConfig(kind="cnn", widths=[4, 8], norm=norm), (1, 8, 8), 3)
    assert type(model.blocks[0].norm).__name__ == expected
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)
