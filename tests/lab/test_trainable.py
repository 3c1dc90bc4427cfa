"""train.trainable: only the selected parameters change; every other stays bitwise at its init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normlab.lab.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, apply_overrides
from normlab.lab.job import make_optimizer
from normlab.lab.models import build_model
from normlab.lab.trainer import Trainer


def _names(net, kind):
    """The parameter names each choice should train, from the model's layout (an independent list)."""
    depth = len(net.blocks)
    head = max(int(n.split(".")[0]) for n, _ in net.named_parameters())
    norm = {f"{i}.norm.{p}" for i in range(1 if kind == "mlp" else 0, depth + (1 if kind == "mlp" else 0))
            for p in ("weight", "bias")}
    output = {f"{head}.weight", f"{head}.bias"}
    return {"all": {n for n, _ in net.named_parameters()}, "norm": norm, "output": output, "norm+output": norm | output}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("choice", ["all", "norm", "output", "norm+output"])
def test_only_the_selected_parameters_change(kind, choice):
    torch.manual_seed(0)
    net = build_model(ModelConfig(kind=kind, widths=[6, 6], activation="relu", norm="batch"), (1, 8, 8), 3)
    expected = _names(net, kind)[choice]
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = make_optimizer(TrainConfig(lr=0.5, momentum=0.9, weight_decay=1e-3, trainable=choice), net)
    x, y = torch.randn(12, 1, 8, 8), torch.randint(0, 3, (12,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    changed = {n for n, p in net.named_parameters() if not torch.equal(p.detach(), start[n])}
    assert changed == expected
    assert {n for n, p in net.named_parameters() if p.requires_grad} == expected


def test_trainable_norm_without_a_norm_is_a_config_error():
    net = build_model(ModelConfig(widths=[4], norm="none"), (1, 4, 4), 2)
    with pytest.raises(ConfigError, match=r"train.trainable='norm' trains the norms' weights and biases, but this "
                                          r"model has none"):
        make_optimizer(TrainConfig(trainable="norm"), net)
    with pytest.raises(ConfigError, match=r"train.trainable must be one of \['all', 'norm', 'output', "
                                          r"'norm\+output'\], got 'bn'"):
        make_optimizer(TrainConfig(trainable="bn"), net)


def test_trainer_rejects_an_empty_selection_before_any_job(tmp_path):
    config = ExperimentConfig(experiment="ioffe2015-mnist", arms={"none": {"model.norm": "none"}})
    config = apply_overrides(config, {"train.trainable": "norm", "data.name": "synthetic"}, parse=False)
    from normlab.lab.experiments import all_experiments

    with pytest.raises(ConfigError, match="train.trainable='norm' trains the norms' weights and biases"):
        Trainer(all_experiments()["ioffe2015-mnist"], config, tmp_path / "run", progress=False).run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
