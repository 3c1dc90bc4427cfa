"""Issue 15 item 3: PyTorch's own module test inputs for the norm layers pass through normlab's
layers with torch's results.

``torch.testing._internal.common_modules.module_db`` holds, per ``torch.nn`` module, the
constructor arguments and inputs torch's own suite (``test/test_modules.py``) runs. For every
entry of a norm layer normlab has (BatchNorm1d/2d/3d, InstanceNorm1d/2d/3d, GroupNorm,
LayerNorm, RMSNorm), every sample, every dtype the entry lists and the modes it runs (training
and eval where ``train_and_eval_differ``): torch's module and normlab's are built from the same
arguments and given the same random parameters; the output, the input and parameter gradients
and the state after the step must equal torch's, and again after a second step (the updated
running statistics).

module_db has no lazy norm entries (only lazy convolutions), so the lazy layers
(``LazyBatchNorm*``, ``LazyInstanceNorm*``) take the same samples as torch's own input function
makes them for lazy modules (the batch-norm arguments without ``num_features``; the
instance-norm function's ``lazy=True``), against torch's lazy layer. Where torch's lazy layer
cannot run a sample (an unbatched instance-norm input: it reads C from dimension 1), the oracle
is torch's non-lazy layer with the same arguments, and the test id says ``oracle=nonlazy``.

One deliberate difference, asserted as such (``empty_batch_not_counted`` in the id): a training
batch of zero samples leaves normlab's ``num_batches_tracked`` as it was, where torch counts it
(an empty batch moves no statistic, so it is no batch for ``momentum=None``'s average either);
everything else equals torch's there too.
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch
from device_switch import generator
from torch import nn

import normlab


def _import_module_db():
    """torch's module_db, without the global changes its import makes for torch's own suite
    (frozen ``torch.backends`` flags, an inductor cache variable, warning filters)."""
    env = dict(os.environ)
    frozen = torch.backends.flags_frozen()
    with warnings.catch_warnings():
        from torch.testing._internal.common_modules import module_db
    if not frozen and torch.backends.flags_frozen():
        setattr(torch.backends, "__allow_nonbracketed_mutation_flag", True)
    for key in set(os.environ) - set(env):
        del os.environ[key]
    return module_db


MODULE_DB = _import_module_db()

# torch's class -> normlab's (the norm layers normlab has; LocalResponseNorm it has not).
NORMLAB = {
    nn.BatchNorm1d: normlab.BatchNorm1d, nn.BatchNorm2d: normlab.BatchNorm2d, nn.BatchNorm3d: normlab.BatchNorm3d,
    nn.InstanceNorm1d: normlab.InstanceNorm1d, nn.InstanceNorm2d: normlab.InstanceNorm2d,
    nn.InstanceNorm3d: normlab.InstanceNorm3d, nn.GroupNorm: normlab.GroupNorm, nn.LayerNorm: normlab.LayerNorm,
    nn.RMSNorm: normlab.RMSNorm,
}
LAZY = {
    nn.BatchNorm1d: (nn.LazyBatchNorm1d, normlab.LazyBatchNorm1d),
    nn.BatchNorm2d: (nn.LazyBatchNorm2d, normlab.LazyBatchNorm2d),
    nn.BatchNorm3d: (nn.LazyBatchNorm3d, normlab.LazyBatchNorm3d),
    nn.InstanceNorm1d: (nn.LazyInstanceNorm1d, normlab.LazyInstanceNorm1d),
    nn.InstanceNorm2d: (nn.LazyInstanceNorm2d, normlab.LazyInstanceNorm2d),
    nn.InstanceNorm3d: (nn.LazyInstanceNorm3d, normlab.LazyInstanceNorm3d),
}
ENTRIES = [info for info in MODULE_DB if info.module_cls in NORMLAB]
# Unit-scale tolerance: |ours - torch's| <= TOL * max(1, max |torch's|).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SEED = 1234


def _empty_training_batch(info, sample, training: bool) -> bool:
    """A training batch of zero samples for a layer that counts batches (see the module docstring)."""
    return training and sample.forward_input.args[0].numel() == 0 and info.module_cls in (
        nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def test_module_db_has_every_norm_entry():
    """The acceptance runs over every norm layer normlab has; a renamed entry must not vanish."""
    assert {info.module_cls for info in ENTRIES} == set(NORMLAB)


def _samples(info, dtype: torch.dtype, training: bool, lazy: bool):
    """The entry's samples, made from a fixed seed (so collection and test see the same ones), on
    torch's default device: the test device inside a test (NORMLAB_TEST_DEVICE), the CPU when
    collecting (only their number and descriptions are used then)."""
    torch.manual_seed(SEED)
    kwargs = {"lazy": True} if lazy and info.module_cls in (nn.InstanceNorm1d, nn.InstanceNorm2d,
                                                            nn.InstanceNorm3d) else {}
    return info.module_inputs_func(info, device=torch.get_default_device(), dtype=dtype, requires_grad=True, training=training, **kwargs)


def _lazy_args(info, sample) -> tuple[tuple, dict]:
    """The sample's constructor arguments for the lazy layer: the instance-norm function made
    them so; batch norm's lose ``num_features``."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    if info.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        args = args[1:]
    return args, kwargs


def _unbatched(info, sample) -> bool:
    x = sample.forward_input.args[0]
    return info.module_cls in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d) and \
        x.dim() == int(info.module_cls.__name__[-2]) + 1


def _params():
    params = []
    for info in ENTRIES:
        modes = (True, False) if info.train_and_eval_differ else (True,)
        for lazy in (False, True) if info.module_cls in LAZY else (False,):
            for dtype in info.dtypes:
                for training in modes:
                    for index, sample in enumerate(_samples(info, dtype, training, lazy)):
                        name = ("Lazy" if lazy else "") + info.name.removeprefix("nn.")
                        oracle = "-oracle=nonlazy" if lazy and _unbatched(info, sample) else ""
                        if _empty_training_batch(info, sample, training):
                            oracle += "-empty_batch_not_counted"
                        test_id = (f"{name}-{sample.desc or 'default'}-{str(dtype).removeprefix('torch.')}-"
                                   f"{'train' if training else 'eval'}{oracle}")
                        params.append(pytest.param(info, dtype, training, lazy, index, id=test_id))
    return params


def _unit_close(ours: torch.Tensor, theirs: torch.Tensor, tol: float, what: str) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, (what, ours.shape, theirs.shape,
                                                                       ours.dtype, theirs.dtype)
    if theirs.numel() == 0:
        return
    err = float((ours.double() - theirs.double()).abs().max())
    scale = max(1.0, float(theirs.double().abs().max()))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def _randomize(module: nn.Module) -> None:
    """Parameters away from 1 / 0, so a missing or misplaced weight or bias shows."""
    g = generator(SEED)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_((torch.rand(p.shape, generator=g) + 0.5).to(p.dtype))


def _step(module: nn.Module, inputs: tuple, dy_seed: int):
    """Output, input gradients and parameter gradients of one forward and backward."""
    xs = tuple(x.detach().clone().requires_grad_(x.requires_grad) for x in inputs)
    out = module(*xs)
    g = generator(dy_seed)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    for p in module.parameters():
        p.grad = None
    out.backward(dy)
    return out.detach(), [x.grad for x in xs], {name: p.grad for name, p in module.named_parameters()}


def _compare(ours: nn.Module, theirs: nn.Module, inputs: tuple, tol: float, when: str,
             uncounted: bool = False) -> None:
    """One step of each; ``uncounted``: an empty training batch, which torch counts and normlab not."""
    counts = [m.state_dict().get("num_batches_tracked") for m in (ours, theirs)]
    counts = [None if c is None else c.clone() for c in counts]
    y_ours, dx_ours, dp_ours = _step(ours, inputs, SEED)
    y_theirs, dx_theirs, dp_theirs = _step(theirs, inputs, SEED)
    _unit_close(y_ours, y_theirs, tol, f"output, {when}")
    for i, (a, b) in enumerate(zip(dx_ours, dx_theirs)):
        _unit_close(a, b, tol, f"input gradient {i}, {when}")
    assert dp_ours.keys() == dp_theirs.keys(), when
    for name, grad in dp_theirs.items():
        _unit_close(dp_ours[name], grad, tol, f"{name} gradient, {when}")
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert list(ours_state) == list(theirs_state), when
    for key, value in theirs_state.items():
        if value.is_floating_point():
            _unit_close(ours_state[key].to(value.dtype), value, tol, f"{key}, {when}")
        elif key == "num_batches_tracked" and uncounted:
            assert torch.equal(ours_state[key], counts[0]) and torch.equal(value, counts[1] + 1), f"{key}, {when}"
        else:
            assert torch.equal(ours_state[key], value), f"{key}, {when}"


@pytest.mark.parametrize("info, dtype, training, lazy, index", _params())
def test_torch_module_db_inputs_give_torchs_results(info, dtype, training, lazy, index):
    """Issue 15 item 3 (and item 2 for the lazy layers): torch's own module test inputs."""
    sample = _samples(info, dtype, training, lazy)[index]
    inputs = sample.forward_input.args
    assert not sample.forward_input.kwargs  # the norm entries pass the input alone
    tol = TOL[dtype]
    if lazy:
        torch_lazy, normlab_lazy = LAZY[info.module_cls]
        args, kwargs = _lazy_args(info, sample)
        ours = normlab_lazy(*args, **kwargs)
        if _unbatched(info, sample):
            # torch's lazy layer reads C from dimension 1 of (C, L) and fails; its non-lazy layer
            # with the lazy layer's arguments (defaults included) and C is the oracle.
            bound = inspect.signature(torch_lazy).bind(*args, **kwargs)
            bound.apply_defaults()
            theirs = info.module_cls(inputs[0].shape[0], **bound.arguments)
        else:
            theirs = torch_lazy(*args, **kwargs)
        ours.to(dtype), theirs.to(dtype)
    else:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        theirs = info.module_cls(*args, **kwargs).to(dtype)
        ours = NORMLAB[info.module_cls](*args, **kwargs).to(dtype)
        _randomize(theirs)
        ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.train(training), theirs.train(training)
    mode = "train" if training else "eval"
    uncounted = _empty_training_batch(info, sample, training)
    _compare(ours, theirs, inputs, tol, f"step 1 ({mode})", uncounted)
    if lazy:  # materialized: normlab's layer of the input's C, as torch's lazy layer became torch's
        assert type(ours) is NORMLAB[info.module_cls]
        assert ours.num_features == (inputs[0].shape[0] if _unbatched(info, sample) else inputs[0].shape[1])
    _compare(ours, theirs, inputs, tol, f"step 2 ({mode}, after step 1's update)", uncounted)
