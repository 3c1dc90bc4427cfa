"""Model builders for the lab: an MLP and a small CNN whose normalization is chosen by name.

Each hidden block is ``Linear/Conv -> [norm] -> activation -> [dropout]`` with the norm placed
``before`` the activation (Ioffe & Szegedy) or ``after`` it. Blocks are kept in
``model.blocks`` and each exposes ``pre_activation`` (the module whose output enters the
activation), where the lab's probes attach.

>>> from normlab.lab.config import ModelConfig
>>> from normlab.lab.models import build_model
>>> net = build_model(ModelConfig(widths=[100, 100], norm="batch"), (1, 28, 28), 10)
>>> net(__import__("torch").randn(4, 1, 28, 28)).shape
torch.Size([4, 10])
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from ..layers.registry import get_norm, norm_names
from .config import ConfigError, ModelConfig

__all__ = ["ACTIVATIONS", "Block", "build_model", "check_model_config"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "silu": nn.SiLU,
    "gelu": nn.GELU,
}


class Block(nn.Sequential):
    """``weight layer -> [norm] -> activation -> [dropout]`` (or norm after the activation)."""

    def __init__(self, layer: nn.Module, norm: nn.Module | None, act: nn.Module, placement: str, dropout: float):
        parts: list[tuple[str, nn.Module]] = [("layer", layer)]
        if norm is not None and placement == "before":
            parts.append(("norm", norm))
        parts.append(("act", act))
        if norm is not None and placement == "after":
            parts.append(("norm", norm))
        if dropout > 0:
            parts.append(("dropout", nn.Dropout(dropout)))
        super().__init__(OrderedDict(parts))

    @property
    def pre_activation(self) -> nn.Module:
        """The module whose output is the activation's input."""
        names = [name for name, _ in self.named_children()]
        return self[names.index("act") - 1]


def check_model_config(config: ModelConfig) -> None:
    """Raise a ``ConfigError`` naming the first bad field of a model config (and what is valid)."""
    if config.kind not in ("mlp", "cnn"):
        raise ConfigError(f"model.kind must be 'mlp' or 'cnn', got {config.kind!r}.")
    if config.activation not in ACTIVATIONS:
        raise ConfigError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {config.activation!r}.")
    if config.placement not in ("before", "after"):
        raise ConfigError(f"model.placement must be 'before' or 'after' the activation, got {config.placement!r}.")
    if config.norm not in norm_names():
        raise ConfigError(f"model.norm must be one of {norm_names()}, got {config.norm!r}.")
    if not config.widths or any(w <= 0 for w in config.widths):
        raise ConfigError(f"model.widths must be a non-empty list of positive ints, got {config.widths!r}.")
    if not 0.0 <= config.dropout < 1.0:
        raise ConfigError(f"model.dropout must lie in [0, 1), got {config.dropout!r}.")
    if config.init_std is not None and config.init_std <= 0:
        raise ConfigError(f"model.init_std must be > 0 or none (torch's default init), got {config.init_std!r}.")
    if config.init_gain is not None and config.init_gain <= 0:
        raise ConfigError(f"model.init_gain must be > 0 or none (init_std or torch's default), got {config.init_gain!r}.")


# The registry's families whose class depends on the input rank (BatchNorm1d vs 2d, ...).
_RANKED = ("batch", "instance", "frozen", "batch_act", "renorm", "ghost")


def _norm(config: ModelConfig, channels: int, spatial: int) -> nn.Module | None:
    if config.norm == "none":
        return None
    name = config.norm
    if name in _RANKED:
        return get_norm(name, channels, dim=max(1, spatial))
    if name == "layer" and spatial:
        return get_norm("group", channels, num_groups=1)  # layer norm over (C, H, W)
    return get_norm(name, channels)


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An MLP or CNN for inputs of ``input_shape`` (without the batch dimension).

    Args:
        config: widths, activation, norm (a registry name or ``"none"``), placement, dropout, init.
        input_shape: e.g. ``(1, 28, 28)``; an MLP flattens it.
        num_classes: the output width.

    Returns:
        ``nn.Sequential`` of ``Flatten`` (MLP), the hidden :class:`Block` s, pooling (CNN) and
        the output layer; ``model.blocks`` lists the blocks.
    """
    check_model_config(config)
    act = ACTIVATIONS[config.activation]
    blocks: list[Block] = []
    if config.kind == "mlp":
        width = 1
        for d in input_shape:
            width *= d
        head: list[nn.Module] = [nn.Flatten()]
        for hidden in config.widths:
            blocks.append(Block(nn.Linear(width, hidden), _norm(config, hidden, 0), act(), config.placement, config.dropout))
            width = hidden
        tail: list[nn.Module] = [nn.Linear(width, num_classes)]
    else:
        channels = input_shape[0]
        head = []
        for i, hidden in enumerate(config.widths):
            conv = nn.Conv2d(channels, hidden, 3, stride=1 if i == 0 else 2, padding=1)
            blocks.append(Block(conv, _norm(config, hidden, 2), act(), config.placement, config.dropout))
            channels = hidden
        tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    model = nn.Sequential(*head, *blocks, *tail)
    model.blocks = blocks  # type: ignore[attr-defined]
    if config.init_std is not None or config.init_gain is not None:
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                fan_in = module.weight[0].numel()
                std = config.init_std if config.init_gain is None else config.init_gain / fan_in**0.5
                nn.init.normal_(module.weight, 0.0, std)
                nn.init.zeros_(module.bias)
    return model
