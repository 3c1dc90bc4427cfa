"""normlab.adapt (issue 16): adapt_bn / adapting_bn and Tent, against float64 formulas computed by
hand, torch's own training-mode batch norm, and the source model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab
from normlab.adapt import Tent, adapt_bn, adapted_norms, adapting_bn, mixed_statistics, softmax_entropy


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: tiny models on shared cores slow down many times over when torch's
    threads wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _norms():
    """(name, factory of a norm over 3 channels, rank of its input, activation after it)."""
    return [
        ("torch-bn1d", lambda: nn.BatchNorm1d(3), 1, None),
        ("torch-bn2d", lambda: nn.BatchNorm2d(3), 2, None),
        ("torch-bn3d", lambda: nn.BatchNorm3d(3), 3, None),
        ("torch-sync", lambda: nn.SyncBatchNorm(3), 2, None),
        ("normlab-bn2d", lambda: normlab.BatchNorm2d(3), 2, None),
        ("normlab-act", lambda: normlab.BatchNormAct2d(3, act="leaky_relu", negative_slope=0.2), 2,
         lambda z: torch.nn.functional.leaky_relu(z, 0.2)),
        ("normlab-ghost", lambda: normlab.GhostBatchNorm2d(3, virtual_batch_size=2), 2, None),
        ("normlab-renorm", lambda: normlab.BatchRenorm2d(3), 2, None),
        ("normlab-sync", lambda: normlab.SyncBatchNorm(3), 2, None),
        ("normlab-sync-act", lambda: normlab.SyncBatchNormAct(3, act="relu"), 2, torch.relu),
        ("frozen", lambda: normlab.FrozenBatchNorm2d(3), 2, None),
        ("frozen-act", lambda: normlab.FrozenBatchNormAct2d(3, act=nn.ReLU()), 2, torch.relu),
    ]


NORMS = _norms()


def _trained(factory, seed=0):
    """A norm with non-trivial source statistics and affine parameters, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    norm = factory()
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(3, generator=g))
        norm.running_var.copy_(torch.rand(3, generator=g) + 0.5)
        norm.weight.copy_(torch.randn(3, generator=g))
        norm.bias.copy_(torch.randn(3, generator=g))
    return norm.eval()


def _input(rank, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3) + (4,) * rank, generator=g) * 2 + 1.5


def _oracle(norm, x, prior, act):
    """The mixed-statistics output in float64, computed by hand (Schneider et al.'s formula)."""
    xd = x.double()
    axes = [0, *range(2, x.dim())]
    mu_t, var_t = xd.mean(axes), xd.var(axes, unbiased=False)
    n = x.shape[0]
    w = prior / (prior + n)
    mu = w * norm.running_mean.double() + (1 - w) * mu_t
    var = w * norm.running_var.double() + (1 - w) * var_t
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = (xd - mu.view(view)) / torch.sqrt(var.view(view) + norm.eps) * norm.weight.double().view(view) \
        + norm.bias.double().view(view)
    return act(y) if act is not None else y


@pytest.mark.parametrize("name, factory, rank, act", NORMS, ids=[n[0] for n in NORMS])
@pytest.mark.parametrize("prior", [0, 7.5, 64])
def test_adapt_bn_equals_the_float64_mixed_statistics_formula(name, factory, rank, act, prior):
    norm = _trained(factory)
    x = _input(rank)
    got = adapt_bn(nn.Sequential(norm).eval(), prior=prior)(x)
    torch.testing.assert_close(got.double(), _oracle(norm, x, prior, act), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name, factory, rank, act", [n for n in NORMS if n[0] in (
    "torch-bn1d", "torch-bn2d", "torch-bn3d", "normlab-bn2d", "normlab-act")], ids=lambda v: v if isinstance(v, str) else "")
def test_adapt_bn_with_prior_0_equals_training_mode_statistics_on_the_batch(name, factory, rank, act):
    norm = _trained(factory)
    x = _input(rank)
    expected = copy.deepcopy(norm).train()(x)  # the layer's own training-mode output
    torch.testing.assert_close(adapt_bn(nn.Sequential(norm).eval(), prior=0)(x), expected, atol=1e-5, rtol=1e-5)


def test_adapt_bn_large_priors_approach_the_source_model():
    norm = _trained(lambda: nn.BatchNorm2d(3))
    x = _input(2)
    with torch.no_grad():
        source = norm(x)
        gaps = [float((adapt_bn(nn.Sequential(norm).eval(), prior=p)(x) - source).abs().max())
                for p in (0, 4, 64, 1024, 1e9)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[0] > 0.1 and gaps[-1] < 1e-4


def test_mixed_statistics_weights_the_prior_in_samples():
    m, v = mixed_statistics(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([5.0]), torch.tensor([10.0]),
                            prior=12, n=4)
    # N / (N + n) = 0.75 for the source, 0.25 for the batch; no between-means term.
    assert m.item() == pytest.approx(0.75 * 1 + 0.25 * 5) and v.item() == pytest.approx(0.75 * 2 + 0.25 * 10)


def test_adapt_bn_masked_input_uses_the_valid_positions_and_zeros_the_padding():
    norm = _trained(lambda: normlab.BatchNorm1d(3))
    x = _input(1, n=4)
    x[1, :, 2:] = float("nan")  # padding may hold anything
    mask = torch.arange(4) < torch.tensor([4, 2, 3, 4])[:, None]
    expected = copy.deepcopy(norm).train()(x, mask)
    got = adapt_bn(norm, prior=0)(x, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert int(torch.count_nonzero(got[1, :, 2:])) == 0


def test_adapt_bn_works_through_a_model_and_keeps_other_layers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.randn(8, 1, 8, 8)
    adapted = adapt_bn(net, prior=0)
    h = net[0](x)
    expected = net[5](net[4](torch.relu(copy.deepcopy(net[1]).train()(h))))
    torch.testing.assert_close(adapted(x), expected, atol=1e-5, rtol=1e-5)
    assert type(adapted) is type(net) and adapted.state_dict().keys() == net.state_dict().keys()


def test_the_source_model_is_untouched_by_adapt_bn_adapting_bn_and_tent():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).eval()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(16, 3) * 3
    adapt_bn(net, prior=0)(x)
    tent = Tent(net, steps=3)
    tent(x)
    tent(x)
    with adapting_bn(net, prior=0):
        net(x)
    with pytest.raises(RuntimeError, match="inside"):
        with adapting_bn(net, prior=0):
            raise RuntimeError("inside")
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net[1]._forward_hooks and not net[1]._forward_pre_hooks  # the context removed its hooks
    assert all(p.requires_grad for p in net.parameters())
    torch.testing.assert_close(net(x), copy.deepcopy(net)(x))


def test_adapting_bn_adapts_the_model_inside_the_block_only():
    norm = _trained(lambda: nn.BatchNorm2d(3))
    net = nn.Sequential(norm).eval()
    x = _input(2)
    source = net(x)
    with adapting_bn(net, prior=0) as inside:
        assert inside is net
        torch.testing.assert_close(net(x).double(), _oracle(norm, x, 0, None), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(net(x), source)


def test_frozen_norms_are_adapted_unless_left_out():
    frozen = _trained(lambda: normlab.FrozenBatchNorm2d(3))
    net = nn.Sequential(_trained(lambda: nn.BatchNorm2d(3)), frozen).eval()
    assert [n for n, _ in adapted_norms(net)] == ["0", "1"]
    assert [n for n, _ in adapted_norms(net, include_frozen=False)] == ["0"]
    x = _input(2)
    kept = adapt_bn(net, prior=0, include_frozen=False)(x)
    torch.testing.assert_close(kept, frozen(adapt_bn(net[:1].eval(), prior=0)(x)))
    with pytest.raises(ValueError, match="include_frozen=False leaves frozen batch norms out"):
        adapt_bn(nn.Sequential(frozen).eval(), include_frozen=False)


def test_a_batch_of_one_is_refused_with_prior_0_and_allowed_with_a_prior():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), _trained(lambda: nn.BatchNorm2d(3))).eval()
    x = torch.randn(1, 1, 6, 6)
    with pytest.raises(ValueError, match=r"batch of one sample.*prior=0.*prior=16"):
        adapt_bn(net, prior=0)(x)
    out = adapt_bn(net, prior=16)(x)  # Schneider et al.: one sample mixed with the prior
    norm = net[1]
    h = net[0](x)
    torch.testing.assert_close(out.double(), _oracle(norm, h.detach(), 16, None), atol=2e-5, rtol=1e-5)


def test_adapt_bn_errors_state_the_rule():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\)"):
        adapt_bn(net.train())
    net.eval()
    with pytest.raises(ValueError, match="no batch norm to adapt"):
        adapt_bn(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)).eval())
    with pytest.raises(ValueError, match=r"prior must be a finite number >= 0.*got -1"):
        adapt_bn(net, prior=-1)
    with pytest.raises(ValueError, match="prior must be a finite number >= 0"):
        adapt_bn(net, prior=float("inf"))
    with pytest.raises(TypeError, match="prior must be a number >= 0.*got str"):
        adapt_bn(net, prior="16")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        adapt_bn(3)
    adapted = adapt_bn(net, prior=0)
    adapted.train()
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode.*\.eval\(\)"):
        adapted(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"1 valid position\(s\) per channel.*at least 2 with prior=0"):
        adapt_bn(normlab.BatchNorm1d(2).eval(), prior=0)(torch.randn(2, 2, 3), torch.tensor([[True, False, False],
                                                                                            [False, False, False]]))


def test_another_librarys_norm_act_subclass_keeps_its_activation():
    """timm's BatchNormAct2d pattern: a torch BatchNorm2d subclass applying .drop then .act."""
    class BatchNormAct2d(nn.BatchNorm2d):
        def __init__(self, channels):
            super().__init__(channels)
            self.drop, self.act = nn.Identity(), nn.Hardswish()

        def forward(self, x):
            return self.act(self.drop(super().forward(x)))

    norm = _trained(lambda: BatchNormAct2d(3))
    x = _input(2)
    expected = nn.functional.hardswish(_oracle(norm, x, 0, None))
    torch.testing.assert_close(adapt_bn(nn.Sequential(norm).eval(), prior=0)(x).double(), expected,
                               atol=2e-5, rtol=1e-5)


def test_an_unverified_batch_norm_is_left_alone_with_a_warning():
    class Odd(nn.BatchNorm1d):
        def forward(self, x):
            return super().forward(x) * 2

    net = nn.Sequential(nn.BatchNorm1d(3), Odd(3)).eval()
    with pytest.warns(UserWarning, match=r"left '1' \(Odd\) as they are"):
        adapted = adapt_bn(net, prior=0)
    assert [n for n, _ in adapted_norms(net)] == ["0"]
    x = torch.randn(5, 3)
    torch.testing.assert_close(adapted(x), net[1](copy.deepcopy(net[0]).train()(x)))


# ----------------------------------------------------------------------------------------------
# Tent


def _classifier(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 6, 3), normlab.BatchNormAct2d(6, act="relu"), nn.Conv2d(6, 6, 3),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_var.uniform_(0.5, 2)
    return net.eval()


def _shifted_batch(n=32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g) * 3 + 2


def test_tent_changes_only_affine_parameters():
    net = _classifier()
    tent = Tent(net, steps=2)
    tent(_shifted_batch())
    source, adapted = net.state_dict(), tent.model.state_dict()
    affine = {f"{i}.{p}" for i in (1, 3) for p in ("weight", "bias")}
    changed = {k for k in source if not torch.equal(source[k], adapted[k])}
    assert changed == affine
    assert {n for n, p in tent.model.named_parameters() if p.requires_grad} == affine


def test_tent_reduces_entropy_on_a_shifted_batch():
    net = _classifier()
    x = _shifted_batch()
    tent = Tent(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05), steps=1)
    first = softmax_entropy(tent(x)).mean()
    for _ in range(5):
        tent(x)
    last = softmax_entropy(tent(x)).mean()
    assert last < first - 1e-3, (float(first), float(last))
    # The first prediction is the statistics-adapted model's, before any step.
    torch.testing.assert_close(softmax_entropy(adapt_bn(net, prior=0)(x)).mean(), first)


def test_tent_gradient_equals_wang_et_al_recipe():
    """One SGD step equals the recipe of Wang et al.'s code: the norms in training mode without
    running statistics, only their affine parameters trained."""
    net = _classifier()
    x = _shifted_batch()
    tent = Tent(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    tent(x)
    ref = copy.deepcopy(net)
    ref.requires_grad_(False)
    params = []
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            params += [m.weight.requires_grad_(), m.bias.requires_grad_()]
    opt = torch.optim.SGD(params, lr=0.1)
    softmax_entropy(ref(x)).mean().backward()
    opt.step()
    for name in ("1.weight", "1.bias", "3.weight", "3.bias"):
        torch.testing.assert_close(tent.model.state_dict()[name], ref.state_dict()[name], atol=1e-6, rtol=1e-5)


def test_tent_reset_restores_the_source_exactly():
    net = _classifier()
    x = _shifted_batch()
    tent = Tent(net, steps=3)
    first = tent(x)
    tent(x)
    tent.reset()
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in tent.model.state_dict().items())
    assert tent.optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(tent(x), first, atol=0, rtol=0)


def test_tent_episodic_resets_after_every_batch():
    net = _classifier()
    x = _shifted_batch()
    tent = Tent(net, episodic=True)
    a, b = tent(x), tent(x)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    online = Tent(net)
    online(x)
    assert not torch.equal(online(x), a)


def test_tent_runs_inside_no_grad():
    tent = Tent(_classifier())
    with torch.no_grad():
        tent(_shifted_batch())
    assert not torch.equal(tent.model[3].weight, _classifier()[3].weight)


def test_tent_errors_state_the_rule():
    net = _classifier()
    x = _shifted_batch()
    with pytest.raises(ValueError, match=r"Tent: the model is in training mode.*model\.eval\(\)"):
        Tent(copy.deepcopy(net).train())
    with pytest.raises(ValueError, match="Tent: the model has no batch norm to adapt"):
        Tent(nn.Sequential(nn.Linear(3, 4)).eval())
    with pytest.raises(TypeError, match=r"got a SGD instance.*optimizer=lambda params"):
        Tent(net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be None"):
        Tent(net, optimizer="adam")
    with pytest.raises(ValueError, match="steps must be a positive int.*got 0"):
        Tent(net, steps=0)
    with pytest.raises(TypeError, match="steps must be a positive int"):
        Tent(net, steps=1.5)
    with pytest.raises(ValueError, match="none of the model's batch norms has affine parameters"):
        Tent(nn.Sequential(nn.BatchNorm1d(3, affine=False)).eval())
    with pytest.raises(ValueError, match=r"batch of 1 sample\(s\).*adapt_bn\(model, prior=16\)"):
        Tent(net)(x[:1])
    with pytest.raises(ValueError, match=r"\(N, classes\) logits.*shape \(32, 6, 4, 4\)"):
        Tent(net[:4].eval())(x)
    tent = Tent(net)
    tent.train()
    with pytest.raises(ValueError, match="is in training mode"):
        tent(x)


# ----------------------------------------------------------------------------------------------
# Issue 16, acceptance: the README's one-liners, tried as a new user would


class _TinyResNet(nn.Module):
    """A ResNet-style classifier of plain torch.nn layers, trained 'elsewhere' (below)."""

    def __init__(self, width=16, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.body(h)))


def _readme_chunks():
    """The python block of the README's "Adapting to shifted data" section, cut at blank lines."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Adapting to shifted data", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    return [chunk for chunk in code.split("\n\n") if chunk.strip()]


def test_readme_one_liners_improve_a_plain_torch_resnet_on_a_corrupted_batch():
    from normlab.lab.corruptions import corrupt
    from normlab.lab.data import load_dataset

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = _TinyResNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(data.y_train), (64,), generator=g)
        loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    lo, hi = float(data.x_train.min()), float(data.x_train.max())
    x, y = data.x_test[:200], data.y_test[:200]
    with torch.no_grad():
        clean = float((model(x).argmax(1) == y).float().mean())
    x = corrupt(x, "contrast", 3, torch.Generator().manual_seed(1), value_range=(lo, hi))
    shifted_batches = [corrupt(data.x_train[i:i + 100], "contrast", 3, torch.Generator().manual_seed(2 + i),
                               value_range=(lo, hi)) for i in range(0, 500, 100)]
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        source = float((model(x).argmax(1) == y).float().mean())
    assert clean > 0.85 and source < clean - 0.2, (clean, source)  # trained, and hurt by the shift
    chunks = _readme_chunks()
    assert len(chunks) == 5  # import, adapt_bn, adapting_bn, Tent, recalibrate_bn
    namespace = {"model": model, "x": x, "shifted_batches": shifted_batches}
    exec(chunks[0], namespace)
    for chunk in chunks[1:]:
        namespace.pop("predictions", None)
        exec(chunk, namespace)
        accuracy = float((namespace["predictions"] == y).float().mean())
        assert accuracy > source + 0.1, (chunk, source, accuracy)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # the model itself unchanged
