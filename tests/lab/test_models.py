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
        ("kind", "rnn", "model.kind must be 'mlp', 'cnn' or 'lstm', got 'rnn'"),
        ("sequence", "permuted", "model.sequence applies to model.kind 'lstm' only"),
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

    model = build_model(ModelConfig(kind="cnn", widths=[4, 8], norm=norm, activation="relu"), (1, 8, 8), 3)
    assert type(model.blocks[0].norm).__name__ == expected
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 3)


# --------------------------------------------------------------------------------------------
# model.kind "lstm" (issue 13 item 3: sequential MNIST with nn.LSTM, BNLSTM and LNLSTM)


def lstm_config(**fields) -> ModelConfig:
    return ModelConfig(**{"kind": "lstm", "widths": [8], "activation": "tanh", **fields})


@pytest.mark.parametrize("norm, cls", [("none", nn.LSTM), ("batch", normlab.BNLSTM), ("layer", normlab.LNLSTM)])
def test_lstm_kind_builds_the_lstm_of_each_norm(norm, cls):
    model = build_model(lstm_config(norm=norm, widths=[8, 6]), (1, 28, 28), 10)
    assert [type(m) for m in model.rnn] == [cls, cls]
    assert model.rnn[0].input_size == 28 and model.rnn[1].input_size == 8 and model.head.in_features == 6
    assert model.blocks == []
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    if norm == "batch":
        assert model.rnn[0].max_steps == 28  # statistics for each of the 28 rows


def test_lstm_reads_rows_of_every_channel_side_by_side():
    model = build_model(lstm_config(), (2, 3, 4), 5)
    x = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 2, 3, 4)
    seq = model.to_sequence(x)
    assert seq.shape == (2, 3, 8)  # H = 3 steps of C * W = 8 features
    for n in range(2):
        for t in range(3):
            expected = [float(x[n, c, t, w]) for c in range(2) for w in range(4)]
            assert seq[n, t].tolist() == expected


def test_lstm_permuted_sequence_is_one_fixed_order_of_the_pixels():
    torch.manual_seed(1)
    a = build_model(lstm_config(sequence="permuted", permute_seed=7), (1, 4, 4), 3)
    torch.manual_seed(2)
    b = build_model(lstm_config(sequence="permuted", permute_seed=7), (1, 4, 4), 3)
    c = build_model(lstm_config(sequence="permuted", permute_seed=8), (1, 4, 4), 3)
    rows = build_model(lstm_config(), (1, 4, 4), 3)
    x = torch.randn(5, 1, 4, 4)
    flat = rows.to_sequence(x).reshape(5, -1)
    assert sorted(a.order.tolist()) == list(range(16)) and a.order.tolist() != list(range(16))
    torch.testing.assert_close(a.order, b.order)  # the run's global seed does not move it
    assert c.order.tolist() != a.order.tolist()
    torch.testing.assert_close(a.to_sequence(x), flat[:, a.order].reshape(5, 4, 4))
    assert "order" not in a.state_dict()  # rebuilt from the config, not stored


def test_lstm_arms_start_from_the_same_weights():
    """Same seed: nn.LSTM, BNLSTM and LNLSTM get the same W_ih, W_hh, bias and output layer,
    rows or permuted (the order is drawn off the global stream)."""
    built = {}
    for norm in ("none", "batch", "layer"):
        for sequence in ("rows", "permuted"):
            torch.manual_seed(5)
            built[(norm, sequence)] = build_model(lstm_config(norm=norm, sequence=sequence), (1, 6, 6), 4)

    def weights(model):
        rnn = model.rnn[0]
        if isinstance(rnn, nn.LSTM):
            return rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0 + rnn.bias_hh_l0, model.head.weight
        layer = rnn.layers[0]
        return layer.weight_ih, layer.weight_hh, layer.bias, model.head.weight

    reference = weights(built[("batch", "rows")])
    for model in built.values():
        for got, want in zip(weights(model), reference):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    w_hh = reference[1].detach()
    for block in w_hh.chunk(4, 0):  # orthogonal recurrent blocks (Cooijmans et al.)
        torch.testing.assert_close(block @ block.t(), torch.eye(8), atol=1e-5, rtol=0)
    assert reference[2].tolist() == [0.0] * 8 + [1.0] * 8 + [0.0] * 16  # forget gate open


def _lstm_float64(x, w_ih, w_hh, b):
    """The LSTM equations in float64, one step at a time: the oracle for the plain arm."""
    x, w_ih, w_hh, b = (t.detach().double() for t in (x, w_ih, w_hh, b))
    h = x.new_zeros(x.shape[0], w_hh.shape[1])
    c = torch.zeros_like(h)
    for t in range(x.shape[1]):
        i, f, g, o = (x[:, t] @ w_ih.t() + h @ w_hh.t() + b).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
    return h


def test_lstm_plain_arm_is_the_lstm_of_the_batch_norm_arm_without_norms():
    torch.manual_seed(0)
    plain = build_model(lstm_config(norm="none"), (1, 5, 5), 3)
    torch.manual_seed(0)
    bn = build_model(lstm_config(norm="batch"), (1, 5, 5), 3).eval()
    for norm in (bn.rnn[0].layers[0].norm_ih, bn.rnn[0].layers[0].norm_hh, bn.rnn[0].layers[0].norm_c):
        norm.weight.data.fill_(1.0)
        norm.running_var.fill_(1.0 - norm.eps)  # eval with running mean 0 and var + eps = 1: the identity
    x = torch.randn(4, 1, 5, 5)
    layer = bn.rnn[0].layers[0]
    want = _lstm_float64(plain.to_sequence(x), layer.weight_ih, layer.weight_hh, layer.bias)
    torch.testing.assert_close(plain.rnn[0](plain.to_sequence(x))[0][:, -1].double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.rnn[0](bn.to_sequence(x))[0][:, -1].double(), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain(x), bn(x), atol=1e-5, rtol=0)


def test_lstm_plain_arm_trains_one_bias():
    torch.manual_seed(0)
    model = build_model(lstm_config(norm="none"), (1, 5, 5), 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(6, 1, 5, 5)), torch.tensor([0, 1, 2, 0, 1, 2]))
    loss.backward()
    optimizer.step()
    rnn = model.rnn[0]
    assert not rnn.bias_hh_l0.requires_grad and rnn.bias_hh_l0.eq(0).all()
    assert rnn.bias_ih_l0.grad is not None and rnn.weight_hh_l0.grad is not None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    torch.manual_seed(0)
    ln = build_model(lstm_config(norm="layer"), (1, 5, 5), 3)
    norms = sum(p.numel() for n, p in ln.named_parameters() if ".norm_" in n)
    assert trainable == sum(p.numel() for p in ln.parameters()) - norms  # W_ih, W_hh, b, head


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"norm": "group"}, r"model.norm must be one of \['none', 'batch', 'layer'\] for model.kind 'lstm'"),
        ({"activation": "sigmoid"}, "set model.activation to 'tanh', got 'sigmoid'"),
        ({"dropout": 0.1}, r"does not use model.dropout=0.1"),
        ({"init_gain": 1.0, "placement": "after"}, r"does not use model.placement='after', model.init_gain=1.0"),
        ({"sequence": "columns"}, r"model.sequence must be one of \['rows', 'permuted'\], got 'columns'"),
        ({"permute_seed": -1}, "model.permute_seed must be an int >= 0"),
    ],
)
def test_lstm_bad_configs(fields, match):
    with pytest.raises(ConfigError, match=match):
        build_model(lstm_config(**fields), (1, 4, 4), 3)


def test_lstm_needs_image_input():
    with pytest.raises(ConfigError, match=r"reads images \(C, H, W\) row by row, got input shape \(64,\)"):
        build_model(lstm_config(), (64,), 3)
    model = build_model(lstm_config(), (1, 8, 8), 3)
    with pytest.raises(ValueError, match=r"expected input \(N, 1, 8, 8\).*got \(2, 1, 28, 28\)"):
        model(torch.randn(2, 1, 28, 28))


@pytest.mark.parametrize("kind, shape", [("mlp", (5, 6)), ("cnn", (5, 1, 6, 6))])
def test_batch_act_applies_the_activation_once(kind, shape):
    """Regression: a batch_act block computed leaky_relu(relu(z)), i.e. relu, with two activations."""
    torch.manual_seed(0)
    fused = build_model(ModelConfig(kind=kind, widths=[4], norm="batch_act", activation="leaky_relu"), shape[1:], 3)
    torch.manual_seed(0)
    plain = build_model(ModelConfig(kind=kind, widths=[4], norm="batch", activation="leaky_relu"), shape[1:], 3)
    fused.load_state_dict(plain.state_dict())
    assert type(fused.blocks[0].act) is nn.Identity and fused.blocks[0].norm.act == "leaky_relu"
    x = torch.randn(shape)
    torch.testing.assert_close(fused(x), plain(x))
    h = fused.blocks[0](x.flatten(1) if kind == "mlp" else x)
    assert bool((h < 0).any()), "leaky ReLU keeps negative values; relu would not"


def test_batch_act_after_the_activation_is_a_plain_batch_norm():
    model = build_model(ModelConfig(widths=[4], norm="batch_act", activation="tanh", placement="after"), (6,), 3)
    assert model.blocks[0].norm.act == "identity" and type(model.blocks[0].act) is nn.Tanh


def test_batch_act_with_an_activation_it_cannot_fuse_is_refused():
    with pytest.raises(ConfigError, match=r"model.norm='batch_act' computes the block's activation itself, which must "
                                          r"be one of \['elu', 'leaky_relu', 'relu', 'silu'\]; got model.activation='sigmoid'"):
        build_model(ModelConfig(widths=[4], norm="batch_act", activation="sigmoid"), (6,), 3)


# ---------------------------------------------------------------------------------------------
# model.dropout_position (issue 14: Li et al. 2019's dropout / batch-norm orders)


def _names(module):
    return [type(m).__name__ for m in module]


@pytest.mark.parametrize("placement, position, expected", [
    ("before", "block", ["Linear", "BatchNorm1d", "ReLU", "Dropout"]),
    ("before", "before_norm", ["Linear", "Dropout", "BatchNorm1d", "ReLU"]),
    ("before", "head", ["Linear", "BatchNorm1d", "ReLU"]),
    ("after", "block", ["Linear", "ReLU", "BatchNorm1d", "Dropout"]),
    ("after", "before_norm", ["Linear", "ReLU", "Dropout", "BatchNorm1d"]),
    ("after", "head", ["Linear", "ReLU", "BatchNorm1d"]),
])
def test_dropout_position_module_order(placement, position, expected):
    model = build_model(ModelConfig(widths=[6, 5], norm="batch", activation="relu", placement=placement, dropout=0.3,
                                    dropout_position=position), (1, 3, 3), 4)
    assert [_names(b) for b in model.blocks] == [expected, expected]
    tail = _names(model)[-2:]
    assert tail == (["Dropout", "Linear"] if position == "head" else ["Block", "Linear"])
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == (1 if position == "head" else 2)
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))
    if placement == "before":  # the activation's input: the norm's output, wherever the dropout is
        assert isinstance(model.blocks[0].pre_activation, normlab.BatchNorm1d)


def test_dropout_position_head_in_a_cnn_goes_after_pooling_before_the_output_layer():
    model = build_model(ModelConfig(kind="cnn", widths=[4, 8], norm="batch", activation="relu", dropout=0.5,
                                    dropout_position="head"), (1, 8, 8), 3)
    assert _names(model)[-4:] == ["AdaptiveAvgPool2d", "Flatten", "Dropout", "Linear"]
    assert _names(model.blocks[1]) == ["Conv2d", "BatchNorm2d", "ReLU"]
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_dropout_position_without_a_norm_sits_at_the_norms_place():
    model = build_model(ModelConfig(widths=[5], activation="relu", dropout=0.2, dropout_position="before_norm"), (4,), 2)
    assert _names(model.blocks[0]) == ["Linear", "Dropout", "ReLU"]


def test_dropout_position_default_is_block_and_builds_what_it_built_before():
    assert ModelConfig().dropout_position == "block"
    torch.manual_seed(0)
    default = build_model(ModelConfig(widths=[6, 5], norm="batch", dropout=0.2), (4,), 3)
    torch.manual_seed(0)
    explicit = build_model(ModelConfig(widths=[6, 5], norm="batch", dropout=0.2, dropout_position="block"), (4,), 3)
    assert _names(default) == _names(explicit) == ["Flatten", "Block", "Block", "Linear"]
    assert _names(default.blocks[0]) == ["Linear", "BatchNorm1d", "Sigmoid", "Dropout"]
    torch.testing.assert_close(default.state_dict(), explicit.state_dict())


@pytest.mark.parametrize("kind, shape", [("mlp", (1, 4, 4)), ("cnn", (1, 6, 6))])
def test_dropout_positions_give_the_same_network_in_eval_mode(kind, shape):
    """Dropout draws no weights: a seed gives every position the same weights, and in eval mode
    (dropout off) the same outputs; so do a rate of 0 and no dropout at all."""
    x = torch.randn(5, *shape)
    outputs = []
    for position, rate in (("block", 0.0), ("block", 0.5), ("before_norm", 0.5), ("head", 0.5)):
        torch.manual_seed(1)
        model = build_model(ModelConfig(kind=kind, widths=[4, 4], norm="batch", activation="relu", dropout=rate,
                                        dropout_position=position), shape, 3)
        model.train()
        model(torch.randn(8, *shape))  # one training pass moves the running statistics off their init
        model.eval()
        for block in model.blocks:
            block.norm.running_mean.zero_()
            block.norm.running_var.fill_(1.0)
        outputs.append(model(x))
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0])


def test_head_dropout_leaves_every_batch_norm_its_no_dropout_statistics():
    """With dropout at the head no norm sees dropped values: a training pass updates the running
    statistics exactly as without dropout; with dropout in every block the second norm's differ."""
    x = torch.randn(64, 10)
    stats = {}
    for position, rate in (("block", 0.0), ("head", 0.5), ("block", 0.5)):
        torch.manual_seed(2)
        model = build_model(ModelConfig(widths=[8, 8], norm="batch", activation="relu", dropout=rate,
                                        dropout_position=position), (10,), 3)
        model.train()
        model(x)
        stats[(position, rate)] = [b.norm.running_var.clone() for b in model.blocks]
    for ref, head in zip(stats[("block", 0.0)], stats[("head", 0.5)]):
        torch.testing.assert_close(head, ref)
    torch.testing.assert_close(stats[("block", 0.5)][0], stats[("block", 0.0)][0])  # nothing dropped before norm 1
    assert not torch.allclose(stats[("block", 0.5)][1], stats[("block", 0.0)][1])


def test_bad_dropout_position_is_refused_naming_the_field_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model.dropout_position must be one of \['block', 'before_norm', 'head'\] "
                                          r".*got 'middle'"):
        build_model(ModelConfig(dropout_position="middle"), (1, 4, 4), 3)
    with pytest.raises(ConfigError, match=r"model.kind 'lstm' does not use model.dropout_position='head'"):
        build_model(lstm_config(dropout_position="head"), (1, 4, 4), 3)
