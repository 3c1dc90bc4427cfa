"""GhostBatchNorm1d/2d/3d (Hoffer et al. 2017): the documented behaviour, against independent oracles.

The main oracle is the definition: torch.nn's BatchNorm applied virtual batch by virtual batch
(outputs side by side, gradients, running statistics and count after each step); also the
float64 reference and normlab's BatchNorm for the options torch lacks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from device_switch import to_numpy
from torch import nn
from torch.utils.checkpoint import checkpoint
from variant_helpers import NORMLAB_BN, TORCH_BN, check_16_bit_input, check_state_dict_round_trip, close, forward_backward, kind as rank_of, randomize, sample

import normlab
from normlab import functional as NF
from normlab import reference as R
from normlab.layers.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

GHOST = {1: GhostBatchNorm1d, 2: GhostBatchNorm2d, 3: GhostBatchNorm3d}


def _chunked_step(bn, x, dy, sizes):
    """The definition: ``bn`` applied to each virtual batch in turn."""
    bn.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_(True)
    y = torch.cat([bn(piece) for piece in xx.split(sizes)])
    y.backward(dy)
    grads = {"input": xx.grad}
    if bn.weight is not None:
        grads.update(weight=bn.weight.grad, bias=bn.bias.grad)
    return y.detach(), grads


CASES = [
    # (shape, memory format, virtual_batch_size): kernel path, uneven rest, rest of one sample,
    # channels_last, and virtual batches of >= 256 rows (normlab's blocked statistics)
    ((64, 8, 4, 4), None, 16),
    ((10, 3, 4, 4), None, 4),
    ((9, 5), None, 4),
    ((13, 3, 6), None, 3),
    ((12, 3, 4, 4), torch.channels_last, 5),
    ((7, 2, 3, 3, 2), None, 2),
    ((6, 2, 3, 4, 4), torch.channels_last_3d, 4),
    ((600, 4), None, 256),
    ((3, 4, 5), None, 8),
]
IDS = ["NCHW-16", "NCHW-rest2", "NC-rest1", "NCL", "NHWC", "NCDHW", "NDHWC", "NC-256", "one-virtual-batch"]


@pytest.mark.parametrize("shape, fmt, vbs", CASES, ids=IDS)
@pytest.mark.parametrize("options", [{}, dict(momentum=None), dict(affine=False), dict(unbiased=False)],
                         ids=["default", "momentum=None", "affine=False", "unbiased=False"])
def test_equals_batch_norm_applied_virtual_batch_by_virtual_batch(shape, fmt, vbs, options):
    """Outputs, gradients, running statistics and count over three training steps and an eval
    step, against torch.nn's BatchNorm chunk by chunk (normlab's for unbiased=False)."""
    kind = rank_of(shape)
    ours = randomize(GHOST[kind](shape[1], virtual_batch_size=vbs, **options))
    # normlab's BatchNorm where torch lacks the option, and for virtual batches of >= 256
    # channel-innermost rows, whose statistics normlab computes more accurately than torch
    # (benchmarks/bench_accuracy.py): the two differ there by more than float32 rounding.
    blocked = len(shape) == 2 and vbs >= 256
    reference = (NORMLAB_BN if "unbiased" in options or blocked else TORCH_BN)[kind](shape[1], **options)
    reference.load_state_dict(ours.state_dict())
    sizes = R.ghost_batch_sizes(shape[0], vbs)
    for step, training in enumerate([True, True, True, False]):
        x, dy = sample(shape, 10 * step, fmt=fmt), sample(shape, 10 * step + 1, fmt=fmt)
        ours.train(training), reference.train(training)
        y, g = forward_backward(ours, x, dy)
        if training:
            y_ref, g_ref = _chunked_step(reference, x, dy, sizes)
        else:
            y_ref, g_ref = forward_backward(reference, x, dy)
        when = f"step {step + 1} ({'train' if training else 'eval'}), virtual batches {sizes}"
        close(y, y_ref, 1e-6, f"output, {when}")
        assert y.is_contiguous(memory_format=fmt or torch.contiguous_format), "memory format not kept"
        for key in g_ref:
            tol = 1e-6 if key == "input" else 1e-6 * np.sqrt(x.numel() / shape[1])
            close(g[key], g_ref[key], tol, f"d{key}, {when}")
        close(ours.running_mean, reference.running_mean, 1e-6, f"running_mean, {when}")
        close(ours.running_var, reference.running_var, 1e-6, f"running_var, {when}")
        assert int(ours.num_batches_tracked) == int(reference.num_batches_tracked), when


def test_count_grows_by_the_number_of_virtual_batches():
    layer = GhostBatchNorm1d(3, virtual_batch_size=4)
    for n, expected in [(10, 3), (9, 2), (4, 1), (3, 1), (2, 1), (17, 4)]:
        before = int(layer.num_batches_tracked)
        layer(torch.randn(n, 3))
        assert int(layer.num_batches_tracked) - before == expected, n


def test_virtual_batch_sizes():
    for n, vbs, sizes in [(10, 4, [4, 4, 2]), (9, 4, [4, 5]), (8, 4, [4, 4]), (3, 4, [3]), (1, 4, [1]),
                          (5, 2, [2, 3]), (0, 4, [0]), (4096, 128, [128] * 32)]:
        assert NF.ghost_batch_sizes(n, vbs) == sizes
        assert R.ghost_batch_sizes(n, vbs) == sizes
    for n in range(40):
        for vbs in range(2, 9):
            sizes = NF.ghost_batch_sizes(n, vbs)
            assert sum(sizes) == n and (n < 2 or min(sizes) >= 2) and max(sizes) <= vbs + 1


def test_without_running_statistics_eval_also_uses_virtual_batches():
    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=2, track_running_stats=False)).eval()
    bn = nn.BatchNorm2d(3, track_running_stats=False).eval()
    bn.load_state_dict(layer.state_dict())
    x = sample((5, 3, 4, 4), 3)
    close(layer(x), torch.cat([bn(p) for p in x.split([2, 3])]), 1e-6, "eval output by virtual batches")


def test_eval_is_batch_norm_with_running_statistics():
    ours = randomize(GhostBatchNorm2d(3, virtual_batch_size=2)).eval()
    theirs = nn.BatchNorm2d(3).eval()
    theirs.load_state_dict(ours.state_dict())
    x = sample((8, 3, 5, 5), 1)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    close(ours(x), theirs(x), 1e-6, "eval output")
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_double_backward_equals_batch_norm_chunk_by_chunk():
    for fmt in (None, torch.channels_last):
        ours = randomize(GhostBatchNorm2d(3, virtual_batch_size=3, dtype=torch.float64))
        theirs = nn.BatchNorm2d(3, dtype=torch.float64)
        theirs.load_state_dict(ours.state_dict())
        x = sample((8, 3, 4, 4), 5, torch.float64, fmt)
        results = []
        for layer in (ours, lambda t, bn=theirs: torch.cat([bn(p) for p in t.split([3, 3, 2])])):
            xx = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(layer(xx).pow(3).sum(), xx, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), xx)
            results.append(gg)
        close(results[0], results[1], 1e-10, f"second-order gradient ({fmt})")


def test_gradcheck_uneven_virtual_batches():
    layer = randomize(GhostBatchNorm1d(2, virtual_batch_size=3, dtype=torch.float64))
    x = sample((8, 2, 2), 6, torch.float64).requires_grad_(True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def f(x, w, b):
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_matches_float64_reference():
    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=3, momentum=0.3, dtype=torch.float64))
    for step in range(2):
        state = [to_numpy(t) for t in (layer.running_mean, layer.running_var, layer.weight, layer.bias)]
        x = sample((7, 3, 3, 3), 40 + step, torch.float64)
        y_ref, rm, rv, count = R.ghost_batch_norm(to_numpy(x), 3, *state, training=True, momentum=0.3,
                                                   eps=layer.eps, num_batches_tracked=int(layer.num_batches_tracked))
        close(layer(x), y_ref, 1e-10, "output")
        close(layer.running_mean, rm, 1e-12, "running_mean")
        close(layer.running_var, rv, 1e-12, "running_var")
        assert int(layer.num_batches_tracked) == count


# --------------------------------------------------------------------------------------------
# State dicts, errors, edges
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_state_dict_is_a_batch_norm_state_dict(kind):
    check_state_dict_round_trip(GHOST[kind](4, virtual_batch_size=8), kind)


@pytest.mark.parametrize(
    "vbs, error, match",
    [
        (1, ValueError, r"GhostBatchNorm2d: virtual_batch_size must be >= 2 \(a virtual batch of one sample has no batch statistics\), got 1"),
        (0, ValueError, r"virtual_batch_size must be >= 2.*got 0"),
        (2.5, TypeError, r"GhostBatchNorm2d: virtual_batch_size must be an int >= 2, got float 2.5"),
        (True, TypeError, r"virtual_batch_size must be an int >= 2, got bool True"),
    ],
    ids=["one", "zero", "float", "bool"],
)
def test_bad_virtual_batch_size(vbs, error, match):
    with pytest.raises(error, match=match):
        GhostBatchNorm2d(3, virtual_batch_size=vbs)


def test_functional_checks_virtual_batch_size():
    with pytest.raises(ValueError, match=r"ghost_batch_norm: virtual_batch_size must be >= 2"):
        NF.ghost_batch_norm(torch.randn(4, 2), 1, training=True)
    with pytest.raises(ValueError, match=r"ghost_batch_norm: input must be \(N, C\) or \(N, C, \*\)"):
        NF.ghost_batch_norm(torch.randn(4), 2, training=True)


def test_wrong_rank_channels_and_single_sample():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        GhostBatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\): expected 3 channels in dimension 1, got input of shape \(4, 5\)"):
        GhostBatchNorm1d(3)(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"GhostBatchNorm1d\(3\): training needs more than one value per channel"):
        GhostBatchNorm1d(3)(torch.randn(1, 3))


def test_single_spatial_sample_is_one_virtual_batch():
    """N = 1 with spatial dimensions has batch statistics (over H, W): plain batch norm."""
    layer, bn = GhostBatchNorm2d(3, virtual_batch_size=4), nn.BatchNorm2d(3)
    x = torch.randn(1, 3, 4, 4)
    close(layer(x), bn(x), 1e-6, "output")
    close(layer.running_var, bn.running_var, 1e-6, "running_var")


def test_empty_batch_leaves_state():
    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["NCHW", "NHWC"])
def test_nonfinite_virtual_batch_leaves_all_running_statistics(fmt):
    """One virtual batch with a NaN: the step takes none of the virtual batches in."""
    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = sample((6, 3, 4, 4), 7, fmt=fmt)
    x[5, 1, 0, 0] = float("inf")
    with pytest.warns(normlab.NonFiniteStatisticsWarning, match=r"GhostBatchNorm2d\(3\)"):
        y = layer(x)
    assert torch.isfinite(y[:4]).all(), "the finite virtual batches are normalized as usual"
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(layer.num_batches_skipped) == 1


def test_large_offset_channels_stay_accurate():
    x64 = sample((12, 3, 5, 5), 4, torch.float64) + 1e4
    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=4))
    w, b = to_numpy(layer.weight), to_numpy(layer.bias)
    expected = R.ghost_batch_norm(to_numpy(x64), 4, None, None, w, b, training=True)[0]
    close(layer(x64.float()), expected, 2e-4, "output of an offset batch")


def test_kernel_path_serves_contiguous_float32():
    """A guard for speed: NCHW float32 input runs on torch's kernels, in place (bench_variants.py)."""
    y = GhostBatchNorm2d(3, virtual_batch_size=2)(torch.randn(6, 3, 4, 4, requires_grad=True))
    assert type(y.grad_fn).__name__ == "_GhostBatchNormKernelBackward"


def test_half_precision_input():
    check_16_bit_input(randomize(GhostBatchNorm2d(3, virtual_batch_size=3)), sample((7, 3, 4, 4), 9).to(torch.float16),
                       1e-2)


def test_vmap_equals_a_loop():
    xs = sample((3, 7, 4, 5), 11)
    rm, rv = torch.randn(4) * 0.3, torch.rand(4) + 0.5

    def f(x):
        return NF.ghost_batch_norm(x, 3, rm, rv, training=True, num_batches_tracked=torch.tensor(0)).output

    close(torch.func.vmap(f)(xs), torch.stack([f(x) for x in xs]), 1e-6, "vmap vs loop")


def test_functional_does_not_modify_its_arguments():
    args = dict(running_mean=torch.rand(3), running_var=torch.rand(3) + 0.5, weight=torch.rand(3),
                bias=torch.rand(3), num_batches_tracked=torch.tensor(4))
    before = {k: v.clone() for k, v in args.items()}
    result = NF.ghost_batch_norm(torch.randn(10, 3, 4, 4), 4, training=True, momentum=0.3, **args)
    for key, value in args.items():
        assert torch.equal(value, before[key]), key
    assert int(result.num_batches_tracked) == 4 + 3


def test_gradient_accumulation_gives_the_full_batch_statistics():
    """Micro-batches that are multiples of virtual_batch_size make the same virtual batches,
    hence the same updates, as the full batch: inside normlab.accumulate or not."""
    from normlab.accumulate import accumulate

    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=2, dtype=torch.float64))
    full = copy.deepcopy(layer)
    plain = copy.deepcopy(layer)
    batch = sample((12, 3, 4, 4), 21, torch.float64)
    y_full = full(batch)
    with accumulate(layer):
        y_acc = torch.cat([layer(micro) for micro in batch.split(4)])
    y_plain = torch.cat([plain(micro) for micro in batch.split(4)])
    for other, y in ((layer, y_acc), (plain, y_plain)):
        close(y, y_full, 1e-12, "output")
        close(other.running_mean, full.running_mean, 1e-12, "running_mean")
        close(other.running_var, full.running_var, 1e-12, "running_var")
        assert int(other.num_batches_tracked) == int(full.num_batches_tracked) == 3 + 6


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_updates_running_statistics_once(use_reentrant):
    layer = randomize(GhostBatchNorm2d(3, virtual_batch_size=2))
    plain = copy.deepcopy(layer)
    x = sample((6, 3, 5, 5), 31).requires_grad_(True)
    checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    plain(x)
    for key, value in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
