"""TENT: fully test-time adaptation by entropy minimization (Wang et al. 2021).

For each test batch ``x``, :class:`Tent` runs a copy of the model whose batch norms normalize
with the batch's own statistics (:func:`normlab.adapt.adapt_bn` with ``prior=0``), takes the
mean softmax entropy of its outputs ::

    H(x) = mean_i  - sum_k p_ik log p_ik,      p_i = softmax(f(x_i))

and makes an optimizer step on the norms' affine parameters (``weight`` and ``bias``) only; all
other parameters and every buffer stay the source's. The prediction returned for a batch is the
output of the forward that computed the loss, before its step (as Wang et al.'s code does); with
``steps > 1`` the last of them. Adaptation is online: the parameters carry over from batch to
batch until :meth:`Tent.reset`, or after every batch with ``episodic=True``.

Which norms: those :func:`normlab.adapt.adapted_norms` picks. Frozen batch norms
(``include_frozen=True``) normalize with the batch's statistics too but have no parameters to
train; a model whose adapted norms have no affine parameters at all is refused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .bn import _check_model, _install, adapted_norms

__all__ = ["Tent", "softmax_entropy"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def softmax_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy of ``softmax(logits)`` over dimension 1, ``(N, K) -> (N,)``, in nats.

    >>> softmax_entropy(torch.zeros(2, 4))
    tensor([1.3863, 1.3863])
    """
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    # Wang et al.'s CIFAR-10-C setting: Adam, learning rate 1e-3, betas (0.9, 0.999), no decay.
    return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))


class Tent(nn.Module):
    """A model that adapts its batch norms' affine parameters to each test batch by entropy
    minimization (see the module docstring).

    Args:
        model: a trained classifier in eval mode whose output is ``(N, classes)`` logits; it is
            copied and never changed.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` builds the optimizer for the
            copy's affine parameters (default: Adam, lr 1e-3, TENT's CIFAR setting), e.g.
            ``lambda p: torch.optim.SGD(p, lr=2.5e-4, momentum=0.9)`` (their ImageNet setting).
        steps: optimizer steps per batch (default 1).
        episodic: reset to the source after every batch (default False: online adaptation).
        include_frozen: frozen batch norms normalize with the batch's statistics too (default True).

    Attributes:
        model: the adapted copy; ``optimizer``: its optimizer; ``params``: the parameters trained.

    Raises:
        TypeError: ``model`` is not a module, ``optimizer`` is an optimizer instance (it would
            hold the source's parameters, not the copy's) or not callable, ``steps`` not an int.
        ValueError: the model is in training mode, has no batch norm, or none with affine
            parameters; ``steps < 1``. When run: a batch of one sample, an output that is not
            ``(N, classes)`` logits.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
    ...                           torch.nn.Linear(8, 4)).eval()
    >>> tent = Tent(net)
    >>> x = torch.randn(16, 3) * 3 + 1
    >>> before = softmax_entropy(tent(x)).mean()
    >>> after = softmax_entropy(tent(x)).mean()
    >>> bool(after < before), torch.equal(tent.model[0].weight, net[0].weight)
    (True, True)
    >>> tent.reset(); torch.equal(tent.model[1].weight, net[1].weight)
    True
    """

    def __init__(self, model: nn.Module, optimizer: OptimizerFactory | None = None, steps: int = 1,
                 episodic: bool = False, *, include_frozen: bool = True) -> None:
        super().__init__()
        where = "Tent"
        _check_model(model, where)
        if isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"{where}: optimizer must build the optimizer from the parameters it is given, got a "
                f"{type(optimizer).__name__} instance, which holds the source model's parameters (Tent adapts a "
                f"copy and never changes the source). Pass a function, e.g. "
                f"optimizer=lambda params: torch.optim.SGD(params, lr=2.5e-4, momentum=0.9).")
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"{where}: optimizer must be None (Adam, lr 1e-3) or a function params -> "
                            f"torch.optim.Optimizer, got {type(optimizer).__name__} {optimizer!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"{where}: steps must be a positive int (optimizer steps per batch), got "
                            f"{type(steps).__name__} {steps!r}.")
        if steps < 1:
            raise ValueError(f"{where}: steps must be a positive int (optimizer steps per batch), got {steps}.")
        self.steps, self.episodic = steps, bool(episodic)
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        _install(self.model, 0.0, include_frozen, where, "Tent")
        params: list[nn.Parameter] = []
        for _, norm in adapted_norms(self.model, include_frozen=include_frozen):
            for p in norm.parameters(recurse=False):  # weight and bias; not an attached activation's
                p.requires_grad_(True)
                params.append(p)
        if not params:
            raise ValueError(
                f"{where}: none of the model's batch norms has affine parameters (weight, bias) to adapt "
                f"(built with affine=False, or frozen: their affine map is buffers). Use "
                f"normlab.adapt.adapt_bn(model, prior=0) to adapt their statistics alone.")
        self.params = params
        self.optimizer = (optimizer or _default_optimizer)(params)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"{where}: optimizer(params) must return a torch.optim.Optimizer, got "
                            f"{type(self.optimizer).__name__}.")
        self._source_state = copy.deepcopy(self.model.state_dict())
        self._optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def reset(self) -> None:
        """Restore the source parameters and the optimizer's initial state (its moments cleared)."""
        self.model.load_state_dict(self._source_state)
        self.optimizer.load_state_dict(copy.deepcopy(self._optimizer_state))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """Adapt on the batch ``x`` (``steps`` optimizer steps) and return the predictions,
        detached (``model(x, *args, **kwargs)`` before the last step). Runs with gradients
        enabled, also inside ``torch.no_grad()``."""
        if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] < 2):
            raise ValueError(
                f"Tent: got a batch of {x.shape[0] if x.dim() else 'a 0-dim tensor with no'} sample(s); TENT "
                f"normalizes with the test batch's statistics and minimizes the batch's entropy, which need several "
                f"samples (Wang et al. use 64 to 200). Gather test samples into larger batches, or use "
                f"normlab.adapt.adapt_bn(model, prior=16) for single samples.")
        if self.episodic:
            self.reset()
        with torch.enable_grad():
            for _ in range(self.steps):
                outputs = self.model(x, *args, **kwargs)
                if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[1] < 2:
                    got = (f"a tensor of shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor)
                           else f"a {type(outputs).__name__}")
                    raise ValueError(f"Tent: the model must return (N, classes) logits, with at least 2 classes, to "
                                     f"take their softmax entropy; it returned {got}. Wrap the model so it returns "
                                     f"the logits.")
                loss = softmax_entropy(outputs).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return outputs.detach()
