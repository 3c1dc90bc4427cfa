"""Issue 15 item 5, ``torch.func``: ``grad`` with respect to a norm's weight in training mode, and
model ensembling with ``stack_module_state`` + ``functional_call`` + ``vmap``. torch's own layer
is the oracle in every case: the same numbers where it works, an error where it fails."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from torch.testing import assert_close
from torch_pairs import PAIRS, pair

import normlab

AFFINE = [name for name in PAIRS if PAIRS[name].make(nn).weight is not None]

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _loss(module: nn.Module, x: torch.Tensor):
    """A loss of the module's output, weighted per channel (so no gradient is zero by symmetry),
    as a function of its parameters and buffers."""
    channel_weights = torch.arange(1.0, x.shape[1] + 1).view((1, -1) + (1,) * (x.dim() - 2))

    def loss(params, buffers):
        return (functional_call(module, (params, buffers), (x,)).square() * channel_weights).sum()

    return loss


def _state(module: nn.Module) -> tuple[dict, dict]:
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    buffers = {k: v.clone() for k, v in module.named_buffers() if k != "num_batches_skipped"}
    return params, buffers


# --------------------------------------------------------------------------------------------
# grad
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", AFFINE)
def test_issue15_item5_grad_wrt_weight_in_training_matches_torch(name):
    """The functional pattern: parameters and buffers passed in, gradient with respect to the
    parameters. Same gradients as torch's layer, and the passed-in running statistics move as
    torch's do."""
    ours, theirs, x = pair(name)
    (p_ours, b_ours), (p_theirs, b_theirs) = _state(ours), _state(theirs)
    g_ours = grad(_loss(ours, x))(p_ours, b_ours)
    g_theirs = grad(_loss(theirs, x))(p_theirs, b_theirs)
    assert set(g_ours) == set(g_theirs) >= {"weight"}
    assert_close(g_ours, g_theirs)
    assert_close(b_ours, b_theirs)
    if "running_mean" in b_theirs:  # the comparison saw the statistics move
        assert not torch.equal(b_theirs["running_mean"], theirs.running_mean)
    # and the gradient is right: the eager layer's autograd gradient
    eager = copy.deepcopy(theirs)
    _loss(eager, x)(dict(eager.named_parameters()), _state(theirs)[1]).backward()
    assert_close(g_ours["weight"], eager.weight.grad)


@pytest.mark.parametrize("name", AFFINE)
def test_issue15_item5_grad_with_captured_buffers_behaves_as_torch(name):
    """Buffers left in the module (only the parameters passed in): torch's tracked batch norm
    fails (functorch refuses its in-place update of a captured buffer), and so does normlab's,
    with a message that says what works; every other layer (torch's instance norm updates its
    captured statistics) gives torch's gradient and statistics."""
    ours, theirs, x = pair(name)
    results = {}
    for key, module in (("ours", ours), ("theirs", theirs)):
        params = {k: v.detach().clone() for k, v in module.named_parameters()}
        loss = _loss(module, x)
        try:
            results[key] = grad(lambda p: loss(p, {}))(params)
        except RuntimeError as err:
            results[key] = err
    if isinstance(results["theirs"], RuntimeError):
        assert "captured" in str(results["theirs"])
        with pytest.raises(RuntimeError, match=r"BatchNorm(.d)?\(4\): a training forward under a torch.func "
                                               r"transform cannot update.*captured.*functional_call"):
            raise results["ours"]
    else:
        assert_close(results["ours"], results["theirs"])
        assert_close({k: v for k, v in ours.state_dict().items()}, theirs.state_dict())


def test_issue15_item5_replace_all_batch_norm_modules_works_as_with_torch():
    """torch's documented patch for batch norm under torch.func also patches normlab's."""
    ours, theirs, x = pair("BatchNorm2d")
    for module in (ours, theirs):
        torch.func.replace_all_batch_norm_modules_(module)
    g_ours = grad(lambda p: _loss(ours, x)(p, {}))({"weight": ours.weight.detach()})
    g_theirs = grad(lambda p: _loss(theirs, x)(p, {}))({"weight": theirs.weight.detach()})
    assert_close(g_ours, g_theirs)
    assert ours.running_mean is None


# --------------------------------------------------------------------------------------------
# vmap: model ensembling
# --------------------------------------------------------------------------------------------


def _ensemble(name: str, lib, mode: str, members: int = 3) -> list[nn.Module]:
    """``members`` copies of the pair's layer (normlab's or torch's) with different parameters and
    running statistics."""
    models = []
    for i in range(members):
        ours, theirs, _ = pair(name, seed=10 + i)
        models.append((ours if lib is normlab else theirs).train(mode == "train"))
    return models


# A layer without parameters or buffers gives vmap nothing to map over with a shared minibatch.
STATEFUL = [name for name in PAIRS if list(PAIRS[name].make(nn).state_dict())]
ENSEMBLES = [(name, shared) for name in PAIRS for shared in (True, False) if name in STATEFUL or not shared]
# torch's cumulative average reads float(num_batches_tracked), which vmap refuses (.item()).
TORCH_VMAP_FAILS = {("BatchNorm1d-cumulative", "train")}


def _run_ensemble(models: list[nn.Module], xs: torch.Tensor, shared_input: bool):
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def member(p, b, data):
        return functional_call(base, (p, b), (data,))

    out = vmap(member, in_dims=(0, 0, None if shared_input else 0))(params, buffers, xs)
    return out, {k: v for k, v in buffers.items() if k != "num_batches_skipped"}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name, shared_input", ENSEMBLES,
                         ids=[f"{n}-{'same-minibatch' if s else 'minibatch-per-model'}" for n, s in ENSEMBLES])
def test_issue15_item5_vmap_ensembling_matches_torch(name, shared_input, mode):
    """stack_module_state + functional_call + vmap over the members (torch.func's ensembling
    recipe): each member's output and, in training, its running statistics as the member run
    alone by torch's layer, and as torch's own ensemble where that runs."""
    x = pair(name)[2]
    xs = x if shared_input else torch.stack([x * (1 + i) - i for i in range(3)])
    out, buffers = _run_ensemble(_ensemble(name, normlab, mode), xs, shared_input)
    if (name, mode) in TORCH_VMAP_FAILS:
        with pytest.raises(RuntimeError, match="item"):
            _run_ensemble(_ensemble(name, nn, mode), xs, shared_input)
    else:
        out_theirs, buffers_theirs = _run_ensemble(_ensemble(name, nn, mode), xs, shared_input)
        assert_close(out, out_theirs)
        assert_close(buffers, buffers_theirs)
    for i, model in enumerate(_ensemble(name, nn, mode)):
        assert_close(out[i], model(x if shared_input else xs[i]))
        assert_close({k: v[i] for k, v in buffers.items()}, dict(model.named_buffers()))


@pytest.mark.parametrize("name", ["BatchNorm1d-2d", "BatchNorm2d", "InstanceNorm2d-tracked"])
def test_issue15_item5_vmap_over_samples_with_unbatched_statistics_fails_as_torch(name):
    """vmap over the samples of a training batch (one module, its own buffers): torch refuses to
    update unbatched running statistics from batched input, and so does normlab, saying what
    works; in eval mode both normalize each sample with the running statistics."""
    ours, theirs, x = pair(name)
    samples = torch.stack([x, x * 2 + 1])  # two batches, vmapped over
    with pytest.raises(RuntimeError, match="batched"):
        vmap(theirs)(samples)
    with pytest.raises(RuntimeError, match=r"(track_running_stats|functional_call)"):
        vmap(ours)(samples)
    assert_close(vmap(ours.eval())(samples), vmap(theirs.eval())(samples))


def test_batch_norm_act_under_grad_and_vmap_matches_torch_batch_norm_then_activation():
    """normlab's fused norm-act (no torch counterpart) takes torch's path under transforms: torch's
    BatchNorm2d followed by the activation is the oracle."""
    ours = normlab.BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2)
    theirs = nn.Sequential(nn.BatchNorm2d(4), nn.LeakyReLU(0.2))
    with torch.no_grad():
        ours.weight.uniform_(0.5, 2)
        ours.bias.uniform_(-1, 1)
    theirs[0].load_state_dict(ours.state_dict())
    x = torch.randn(6, 4, 3, 3) * 2 + 1
    p_ours, b_ours = _state(ours)
    p_theirs = {f"0.{k}": v for k, v in _state(theirs[0])[0].items()}
    b_theirs = {f"0.{k}": v for k, v in _state(theirs[0])[1].items()}
    g_ours = grad(_loss(ours, x))(p_ours, b_ours)
    g_theirs = grad(_loss(theirs, x))(p_theirs, b_theirs)
    assert_close(g_ours, {k[2:]: v for k, v in g_theirs.items()})
    assert_close(b_ours["running_mean"], b_theirs["0.running_mean"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, buffers = stack_module_state([copy.deepcopy(ours) for _ in range(2)])
        out = vmap(lambda p, b: functional_call(ours, (p, b), (x,)))(params, buffers)
    assert_close(out[1], theirs(x))
