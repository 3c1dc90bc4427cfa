"""Model builders for the lab: an MLP, a small CNN and an LSTM whose normalization is chosen by name.

Each hidden block of the MLP and CNN is ``Linear/Conv -> [norm] -> activation -> [dropout]``
with the norm placed ``before`` the activation (Ioffe & Szegedy) or ``after`` it. Blocks are
kept in ``model.blocks`` and each exposes ``pre_activation`` (the module whose output enters
the activation), where the lab's probes attach.

``kind="lstm"`` is a :class:`SequenceClassifier`: an image ``(C, H, W)`` read as ``H`` steps of
``C*W`` features (row by row, or its pixels in a fixed seeded order: sequential / permuted
MNIST), stacked LSTMs and a linear layer on the last step's hidden state. ``norm`` picks the
LSTM: ``"none"`` a plain ``torch.nn.LSTM``, ``"batch"`` :class:`normlab.BNLSTM` (Cooijmans et
al. 2016), ``"layer"`` :class:`normlab.LNLSTM`; all three start from the same weights for a
seed. It has no blocks (``model.blocks == []``), so probes that read blocks record nothing.

>>> from normlab.lab.config import ModelConfig
>>> from normlab.lab.models import build_model
>>> net = build_model(ModelConfig(widths=[100, 100], norm="batch"), (1, 28, 28), 10)
>>> net(__import__("torch").randn(4, 1, 28, 28)).shape
torch.Size([4, 10])
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ..layers.recurrent import BNLSTM, LNLSTM
from ..layers.registry import get_norm, norm_names
from .config import ConfigError, ModelConfig
from .noise import StepNoise

__all__ = ["ACTIVATIONS", "DROPOUT_POSITIONS", "LSTM_NORMS", "SEQUENCES", "Block", "SequenceClassifier", "build_model",
           "check_model_config"]

LSTM_NORMS = ("none", "batch", "layer")  # model.kind "lstm": nn.LSTM, BNLSTM, LNLSTM
SEQUENCES = ("rows", "permuted")  # model.sequence (kind "lstm")
# model.dropout_position: "block" puts dropout at the end of every hidden block, so it feeds the
# next block's norm (Li et al. 2019's "dropout then BN" order, with the weight layer between);
# "before_norm" right before every block's norm; "head" once, after the last block (after every
# norm), before the output layer (Li et al.'s remedy).
DROPOUT_POSITIONS = ("block", "before_norm", "head")

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
    """``weight layer -> [norm] -> activation -> [dropout]`` (or norm after the activation).

    ``dropout_position`` (``model.dropout_position``) places the ``nn.Dropout(dropout)``:

    * ``"block"`` (default): last, after the activation (and after a norm placed after it);
    * ``"before_norm"``: right before the norm, so the norm normalizes dropped-out values
      (``layer -> dropout -> norm -> act``, or ``layer -> act -> dropout -> norm`` with
      ``placement="after"``); without a norm, at the norm's place;
    * ``"head"``: nowhere in the block (:func:`build_model` puts one dropout before the output
      layer instead).

    A rate of 0 adds no dropout module. With ``model.norm="batch_act"`` before the activation,
    the norm (a ``BatchNormAct``) computes the activation and ``act`` is an ``nn.Identity``:
    ``pre_activation`` is then the fused norm, whose output is already activated.

    >>> block = Block(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), "before", 0.5, "before_norm")
    >>> [name for name, _ in block.named_children()], type(block.pre_activation).__name__
    (['layer', 'dropout', 'norm', 'act'], 'BatchNorm1d')
    """

    def __init__(self, layer: nn.Module, norm: nn.Module | None, act: nn.Module, placement: str, dropout: float,
                 dropout_position: str = "block"):
        if dropout_position not in DROPOUT_POSITIONS:
            raise ValueError(f"Block: dropout_position must be one of {list(DROPOUT_POSITIONS)}, got "
                             f"{dropout_position!r}.")
        drop = [("dropout", nn.Dropout(dropout))] if dropout > 0 and dropout_position != "head" else []
        early = drop if dropout_position == "before_norm" else []
        parts: list[tuple[str, nn.Module]] = [("layer", layer)]
        if placement == "before":
            parts += early + ([("norm", norm)] if norm is not None else []) + [("act", act)]
        else:
            parts += [("act", act)] + early + ([("norm", norm)] if norm is not None else [])
        if dropout_position == "block":
            parts += drop
        super().__init__(OrderedDict(parts))

    @property
    def pre_activation(self) -> nn.Module:
        """The module whose output is the activation's input."""
        names = [name for name, _ in self.named_children()]
        return self[names.index("act") - 1]


def check_model_config(config: ModelConfig) -> None:
    """Raise a ``ConfigError`` naming the first bad field of a model config (and what is valid)."""
    if config.kind not in ("mlp", "cnn", "lstm"):
        raise ConfigError(f"model.kind must be 'mlp', 'cnn' or 'lstm', got {config.kind!r}.")
    if config.kind == "lstm":
        _check_lstm_config(config)
    elif config.norm == "batch_act" and config.placement == "before" and config.activation not in FUSED_ACTIVATIONS:
        raise ConfigError(
            f"model.norm='batch_act' computes the block's activation itself, which must be one of "
            f"{sorted(FUSED_ACTIVATIONS)}; got model.activation={config.activation!r}. Use model.norm='batch' for it."
        )
    elif config.sequence != "rows":
        raise ConfigError(f"model.sequence applies to model.kind 'lstm' only (how it reads an image), got "
                          f"sequence {config.sequence!r} with kind {config.kind!r}; leave it at 'rows'.")
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
    if config.dropout_position not in DROPOUT_POSITIONS:
        raise ConfigError(f"model.dropout_position must be one of {list(DROPOUT_POSITIONS)} (end of every block, "
                          f"right before every norm, or once before the output layer), got "
                          f"{config.dropout_position!r}.")
    if config.init_std is not None and config.init_std <= 0:
        raise ConfigError(f"model.init_std must be > 0 or none (torch's default init), got {config.init_std!r}.")
    if config.init_gain is not None and config.init_gain <= 0:
        raise ConfigError(f"model.init_gain must be > 0 or none (init_std or torch's default), got {config.init_gain!r}.")
    _check_norm_noise(config)


def _check_norm_noise(config: ModelConfig) -> None:
    """model.norm_noise: a finite number >= 0, and > 0 only where there is a norm to follow."""
    noise = config.norm_noise
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
        raise ConfigError(f"model.norm_noise must be a finite number >= 0 (0: no noise), got {noise!r}.")
    if noise > 0 and (config.norm == "none" or config.kind == "lstm"):
        raise ConfigError(f"model.norm_noise={noise!r} perturbs the output of each block's norm, but "
                          f"model.norm={config.norm!r} with model.kind={config.kind!r} has none; set a norm "
                          f"(e.g. model.norm='batch') on an mlp or cnn, or model.norm_noise=0.")
    if noise > 0 and _fused(config):
        raise ConfigError(f"model.norm_noise={noise!r} goes between the norm and the activation, but "
                          f"model.norm='batch_act' before the activation computes both in one layer; use "
                          f"model.norm='batch' for noisy BN.")


def _check_lstm_config(config: ModelConfig) -> None:
    """The LSTM's own rules: three norms, fixed gate nonlinearities, no per-block options."""
    if config.norm not in LSTM_NORMS:
        raise ConfigError(f"model.norm must be one of {list(LSTM_NORMS)} for model.kind 'lstm' (nn.LSTM, BNLSTM, "
                          f"LNLSTM), got {config.norm!r}.")
    if config.activation != "tanh":
        raise ConfigError(f"model.kind 'lstm' has sigmoid gates and a tanh cell, no other activation: set "
                          f"model.activation to 'tanh', got {config.activation!r}.")
    unused = [f"{key}={value!r}" for key, value, default in (
        ("placement", config.placement, "before"), ("dropout", config.dropout, 0.0),
        ("dropout_position", config.dropout_position, "block"), ("init_std", config.init_std, None), ("init_gain", config.init_gain, None)) if value != default]
    if unused:
        raise ConfigError(f"model.kind 'lstm' does not use {', '.join('model.' + u for u in unused)} (its "
                          f"initialization is Cooijmans et al.'s, it has no dropout or placement); leave them at "
                          f"their defaults (placement 'before', dropout 0.0, dropout_position 'block', init_std and "
                          f"init_gain none).")
    if config.sequence not in SEQUENCES:
        raise ConfigError(f"model.sequence must be one of {list(SEQUENCES)}, got {config.sequence!r}.")
    if isinstance(config.permute_seed, bool) or not isinstance(config.permute_seed, int) or config.permute_seed < 0:
        raise ConfigError(f"model.permute_seed must be an int >= 0 (the seed of the pixel order), got "
                          f"{config.permute_seed!r}.")


# The registry's families whose class depends on the input rank (BatchNorm1d vs 2d, ...).
_RANKED = ("batch", "instance", "frozen", "batch_act", "renorm", "ghost")


# The model activations BatchNormAct computes itself (with torch.nn's default slope and alpha).
FUSED_ACTIVATIONS = {"relu": {"act": "relu"}, "leaky_relu": {"act": "leaky_relu", "negative_slope": 0.01},
               "elu": {"act": "elu", "alpha": 1.0}, "silu": {"act": "silu"}}


def _fused(config: ModelConfig) -> bool:
    """Whether the norm computes the block's activation itself (BatchNormAct before it)."""
    return config.norm == "batch_act" and config.placement == "before"


def _norm(config: ModelConfig, channels: int, spatial: int) -> nn.Module | None:
    norm = _plain_norm(config, channels, spatial)
    if norm is not None and config.norm_noise > 0:
        # The noise follows the norm inside the block's "norm" slot, so the activation's input
        # (Block.pre_activation) is the perturbed output, as in Santurkar et al.'s noisy BN.
        return nn.Sequential(OrderedDict([("norm", norm), ("noise", StepNoise(config.norm_noise))]))
    return norm


def _plain_norm(config: ModelConfig, channels: int, spatial: int) -> nn.Module | None:
    if config.norm == "none":
        return None
    name = config.norm
    if name == "batch_act":
        # Before the activation the layer computes it (the block's own activation is then an
        # Identity); after it, the layer is a plain batch norm (act="identity"): one activation.
        act = FUSED_ACTIVATIONS[config.activation] if _fused(config) else {"act": "identity"}
        return get_norm(name, channels, dim=max(1, spatial), **act)
    if name in _RANKED:
        return get_norm(name, channels, dim=max(1, spatial))
    if name == "layer" and spatial:
        return get_norm("group", channels, num_groups=1)  # layer norm over (C, H, W)
    return get_norm(name, channels)


def _act(config: ModelConfig, act: type[nn.Module]) -> nn.Module:
    return nn.Identity() if _fused(config) else act()


def build_model(config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """An MLP, CNN or LSTM for inputs of ``input_shape`` (without the batch dimension).

    Args:
        config: widths, activation, norm (a registry name or ``"none"``), placement, dropout, init.
        input_shape: e.g. ``(1, 28, 28)``; an MLP flattens it; an LSTM needs ``(C, H, W)``.
        num_classes: the output width.

    Returns:
        ``nn.Sequential`` of ``Flatten`` (MLP), the hidden :class:`Block` s, pooling (CNN),
        ``nn.Dropout`` (only with ``dropout_position="head"`` and a rate above 0) and the output
        layer; ``model.blocks`` lists the blocks. For ``kind="lstm"`` a
        :class:`SequenceClassifier` (``model.blocks == []``).

    Raises:
        ConfigError: a bad field of ``config`` (:func:`check_model_config`), or an LSTM for
            an input that is not ``(C, H, W)``.
    """
    check_model_config(config)
    if config.kind == "lstm":
        return SequenceClassifier(config, input_shape, num_classes)
    act = ACTIVATIONS[config.activation]
    position = config.dropout_position
    blocks: list[Block] = []
    if config.kind == "mlp":
        width = 1
        for d in input_shape:
            width *= d
        head: list[nn.Module] = [nn.Flatten()]
        for hidden in config.widths:
            blocks.append(Block(nn.Linear(width, hidden), _norm(config, hidden, 0), _act(config, act), config.placement,
                                config.dropout, position))
            width = hidden
        tail: list[nn.Module] = [nn.Linear(width, num_classes)]
    else:
        channels = input_shape[0]
        head = []
        for i, hidden in enumerate(config.widths):
            conv = nn.Conv2d(channels, hidden, 3, stride=1 if i == 0 else 2, padding=1)
            blocks.append(Block(conv, _norm(config, hidden, 2), _act(config, act), config.placement, config.dropout,
                                position))
            channels = hidden
        tail = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    if position == "head" and config.dropout > 0:
        tail.insert(len(tail) - 1, nn.Dropout(config.dropout))  # after every norm: no norm sees dropped values
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


def _plain_lstm(input_size: int, hidden_size: int) -> nn.LSTM:
    """A one-layer ``nn.LSTM`` (batch first) with the initial weights a BNLSTM/LNLSTM draws.

    The weights are drawn by a throwaway :class:`~normlab.LNLSTM`, so the global random
    stream moves exactly as when building the normalized LSTMs, and every arm of a seed starts
    from the same ``W_ih``, ``W_hh`` (orthogonal blocks) and bias (forget gate at 1). Its one
    bias goes to ``bias_ih``; ``bias_hh`` stays at zero and is frozen, so the trainable
    parameters are those of the normalized LSTMs (``W_ih``, ``W_hh``, one ``b``) and an
    optimizer sees the same problem without a doubled bias.
    """
    donor = LNLSTM(input_size, hidden_size).layers[0]
    with torch.random.fork_rng(devices=[]):  # nn.LSTM draws its own init: keep it off the stream
        lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
    with torch.no_grad():
        lstm.weight_ih_l0.copy_(donor.weight_ih)
        lstm.weight_hh_l0.copy_(donor.weight_hh)
        lstm.bias_ih_l0.copy_(donor.bias)
        lstm.bias_hh_l0.zero_()
    lstm.bias_hh_l0.requires_grad_(False)
    return lstm


class SequenceClassifier(nn.Module):
    """An image classifier that reads an image ``(C, H, W)`` as a sequence and runs LSTMs over it.

    ``(N, C, H, W)`` -> ``(N, H, C*W)``: step ``t`` sees row ``t`` of every channel, side by side
    (sequential MNIST read row by row: 28 steps of 28 pixels). With ``sequence="permuted"`` the
    ``H*C*W`` values of that row-major sequence are first put in a fixed order, drawn with
    ``torch.randperm`` from ``permute_seed`` (not from the global random stream: every arm and
    run seed reads the same order), then cut into ``H`` steps of ``C*W`` (permuted MNIST, here
    in 28 steps rather than the paper's 784 steps of one pixel). The LSTMs (one per entry of
    ``widths``, each feeding the next) are ``torch.nn.LSTM`` (``norm="none"``),
    :class:`normlab.BNLSTM` with statistics for each of the ``H`` steps (``"batch"``) or
    :class:`normlab.LNLSTM` (``"layer"``), initialized alike (orthogonal recurrent weights,
    forget-gate bias 1; BN gains 0.1 and LN gains 1 as their papers). The logits are
    ``Linear(h_H)``, the last LSTM's hidden state after the last step.

    Attributes:
        rnn: the LSTMs (``nn.ModuleList``); ``head``: the output layer; ``blocks``: ``[]``;
        ``order``: the pixel order (a non-persistent buffer, rebuilt from the config) or None.

    >>> from normlab.lab.config import ModelConfig
    >>> net = build_model(ModelConfig(kind="lstm", widths=[16], activation="tanh", norm="batch"), (1, 28, 28), 10)
    >>> net(torch.randn(4, 1, 28, 28)).shape, type(net.rnn[0]).__name__, net.rnn[0].max_steps
    (torch.Size([4, 10]), 'BNLSTM', 28)
    """

    def __init__(self, config: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"model.kind 'lstm' reads images (C, H, W) row by row, got input shape "
                              f"{tuple(input_shape)}; use an image data set or model.kind 'mlp'.")
        channels, rows, cols = input_shape
        self.input_shape, self.sequence = tuple(input_shape), config.sequence
        features = channels * cols
        layers: list[nn.Module] = []
        for hidden in config.widths:
            if config.norm == "batch":
                layers.append(BNLSTM(features, hidden, max_steps=rows))
            elif config.norm == "layer":
                layers.append(LNLSTM(features, hidden))
            else:
                layers.append(_plain_lstm(features, hidden))
            features = hidden
        self.rnn = nn.ModuleList(layers)
        self.head = nn.Linear(features, num_classes)
        order = None
        if config.sequence == "permuted":
            order = torch.randperm(rows * channels * cols, generator=torch.Generator().manual_seed(config.permute_seed))
        self.register_buffer("order", order, persistent=False)
        self.blocks: list[Block] = []  # no Linear/Conv blocks: block probes record nothing

    def to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, H, C*W)``, the sequence the LSTMs read (in the pixel order)."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"SequenceClassifier: expected input (N, {', '.join(map(str, self.input_shape))}), "
                             f"the shape it was built for, got {tuple(x.shape)}.")
        n, channels, rows, cols = x.shape
        seq = x.permute(0, 2, 1, 3).reshape(n, rows, channels * cols)
        if self.order is not None:
            seq = seq.reshape(n, -1)[:, self.order].reshape(n, rows, channels * cols)
        return seq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.to_sequence(x)
        for lstm in self.rnn:
            out = lstm(out)[0]
        return self.head(out[:, -1])
