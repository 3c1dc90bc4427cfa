"""What every normlab layer shares: option checks, float32 running statistics, non-finite guard.

normlab's layers subclass their ``torch.nn`` counterparts, so parameters, buffers, state-dict
keys and versioning (``num_batches_tracked`` filled in for version-1 checkpoints), ``repr`` and
``isinstance`` checks in other libraries are torch's own. :class:`NormLayer` adds what torch
lacks and each layer's ``forward`` hands the math to :mod:`normlab.functional`.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from .. import stats as _stats
from ..functional import _TRUE, _compiling

__all__ = ["NonFiniteStatisticsWarning", "NormLayer", "RunningStatsLayer", "name_layers"]

# -1 outside the autograd engine's backward pass, a task id inside it (torch >= 2.1).
_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)

_HALF_DTYPES = (torch.float16, torch.bfloat16)
NonFinitePolicy = Literal["warn", "skip", "raise"]
_NONFINITE_POLICIES = ("warn", "skip", "raise")


class NonFiniteStatisticsWarning(RuntimeWarning):
    """A training batch had non-finite statistics; the running statistics were left unchanged."""


def check_choice(owner: str, name: str, value: object, choices: tuple) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}.")


def check_positive_int(owner: str, name: str, value: object) -> None:
    """Raise ``TypeError``/``ValueError`` unless ``value`` is an int > 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be a positive int, got {type(value).__name__} {value!r}.")
    if value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value}.")


def check_eps(owner: str, eps: object) -> None:
    """Raise unless ``eps`` is a non-negative number (it keeps constant channels finite)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{owner}: eps must be a float >= 0, got {type(eps).__name__} {eps!r}.")
    if not eps >= 0:
        raise ValueError(f"{owner}: eps must be >= 0 (typically 1e-5), got {eps!r}.")


def in_backward() -> bool:
    """Whether the caller runs inside the autograd engine's backward pass.

    A layer's forward runs there when ``torch.utils.checkpoint`` recomputes it (reentrant or
    not): the running statistics took the batch in at the original forward, so they must not
    take it in again. False where torch lacks ``torch._C._current_graph_task_id`` (then the
    statistics are updated twice under checkpointing, as torch's layers do) and while
    ``torch.compile`` traces.
    """
    return _current_graph_task_id is not None and not _compiling() and _current_graph_task_id() != -1


def name_layers(model: nn.Module) -> nn.Module:
    """Give every normlab layer in ``model`` its qualified name, used in warnings and errors.

    >>> import torch, normlab
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), normlab.BatchNorm1d(4))
    >>> normlab.name_layers(model)[1].name
    '1'
    """
    for qualified, module in model.named_modules():
        if isinstance(module, NormLayer):
            module.name = qualified
    return model


class NormLayer:
    """Mixin for every normlab layer: a display name for messages."""

    name: str | None = None

    def _label(self) -> str:
        first = getattr(self, "num_features", None) or getattr(self, "num_channels", None) or getattr(
            self, "normalized_shape", ""
        )
        where = f" '{self.name}'" if self.name else ""
        return f"{type(self).__name__}({first}){where}"


class RunningStatsLayer(NormLayer):
    """Mixin for layers with running statistics (batch and instance norm).

    * Running statistics stay float32 when the module is cast to float16/bfloat16
      (``model.half()``) or built with such a dtype: 16-bit EMAs lose the small updates.
    * ``on_nonfinite`` says what a training batch with non-finite statistics does: it never
      changes the running statistics or ``num_batches_tracked``, in eager or compiled code;
      ``"warn"`` (default) warns naming the layer, ``"skip"`` is silent, ``"raise"`` raises
      ``FloatingPointError`` (a host synchronization per batch on accelerators). Skipped batches
      are counted in the non-persistent buffer ``num_batches_skipped``, on the device. In eager
      CPU code the warning (or error) comes at once; on accelerators the warning comes when the
      layer leaves training mode (``model.eval()``), so the training step stays free of
      synchronization.
    * Under ``torch.compile`` (default or ``fullgraph=True``; CUDA graphs too) the guard is a
      select on the device, the count grows on the device, and the report is deferred to
      ``model.eval()``: ``"warn"`` warns there. ``"raise"`` cannot stop a compiled step (that
      would need a host read and a graph break), so the bad batch is skipped and counted like
      the others, and ``model.eval()`` raises the ``FloatingPointError`` for it, after this
      layer has left training mode. Read ``num_batches_skipped`` to check earlier.
    * Recompute-safe: a forward that runs inside the backward pass, as
      ``torch.utils.checkpoint`` (``use_reentrant=True`` or ``False``) recomputes it, leaves the
      running statistics and the batch count as the original forward left them, so they take
      each training step in exactly once (torch's layers take it in twice). The rare forward
      that legitimately runs inside backward (a custom ``autograd.Function.backward`` or a
      backward hook that calls the layer in training mode) therefore updates nothing either;
      call such a layer outside backward, or update its statistics with
      :func:`normlab.functional.batch_norm` yourself.
    """

    def _init_options(self, on_nonfinite: NonFinitePolicy, dtype: torch.dtype | None) -> None:
        check_choice(type(self).__name__, "on_nonfinite", on_nonfinite, _NONFINITE_POLICIES)
        self.on_nonfinite = on_nonfinite
        self.register_buffer(
            "num_batches_skipped",
            torch.zeros((), dtype=torch.long, device=self._stats_device()),
            persistent=False,
        )
        self._reported_skips = 0
        self._last_train_mode = True  # the mode of the last train() call (see train)
        self._keep_stats_float32()

    def _stats_device(self) -> torch.device | None:
        rm = getattr(self, "running_mean", None)
        if rm is not None:
            return rm.device
        w = getattr(self, "weight", None)
        return None if w is None else w.device

    def _keep_stats_float32(self) -> None:
        for key in ("running_mean", "running_var"):
            buf = self._buffers.get(key)
            if buf is not None and buf.dtype in _HALF_DTYPES:
                self._buffers[key] = buf.float()

    def _apply(self, fn, recurse=True):
        before = {k: self._buffers.get(k) for k in ("running_mean", "running_var")}
        result = super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers.get(key)
            if old is not None and new is not None and new.dtype in _HALF_DTYPES:
                # Move the float32 original rather than up-casting the rounded 16-bit copy.
                self._buffers[key] = old.to(device=new.device, dtype=torch.float32)
        return result

    def _store_stats(
        self, running_mean: Tensor, running_var: Tensor, updated: Tensor, num_batches_tracked: Tensor | None = None
    ) -> None:
        """Write new running statistics (and the batch count, if given) into the buffers, unless
        this forward is a recomputation inside backward (see the class docstring).

        ``updated`` is the functional's flag: the new statistics were already kept at the old
        values where it is False, so the writes need no branch; only the report asks the host,
        and only where that is free (eager CPU) or asked for (``"raise"`` in eager code)."""
        if in_backward():
            return
        # A compiled graph cannot raise on a device value without a host read and a graph break:
        # there the batch is counted below and the error comes at model.eval() (see train).
        if self.on_nonfinite == "raise" and updated is not _TRUE and not _compiling() and not bool(updated):
            raise FloatingPointError(
                f"{self._label()}: the batch statistics are not finite (NaN or inf in the input or "
                f"in an earlier layer); the running statistics were left unchanged. Construct the "
                f"layer with on_nonfinite='warn' or 'skip' to continue past such batches."
            )
        buffers = self._buffers
        # Running statistics carry no gradient; detach() is cheaper than a no_grad() block.
        buffers["running_mean"].copy_(running_mean.detach())
        buffers["running_var"].copy_(running_var.detach())
        if num_batches_tracked is not None:
            buffers["num_batches_tracked"].copy_(num_batches_tracked)
        if updated is _TRUE:  # the eager CPU fast path's answer, known on the host
            return
        if _compiling() or updated.device.type != "cpu":
            # Count on the device (a bool adds 0 or 1); report when leaving training mode.
            buffers["num_batches_skipped"].add_(~updated)
        elif not bool(updated):  # free on the CPU: count and warn at once
            buffers["num_batches_skipped"].add_(1)
            if self.on_nonfinite == "warn":
                self._report_skips()

    def _report_skips(self) -> None:
        """Warn (``"warn"``) or raise (``"raise"``) about the batches skipped since the last
        report; one host read of the count."""
        skipped = int(self.num_batches_skipped)
        new = skipped - self._reported_skips
        if new <= 0:
            return
        self._reported_skips = skipped
        if self.on_nonfinite == "raise":  # only compiled steps defer it (see the class docstring)
            raise FloatingPointError(
                f"{self._label()}: {new} training batch(es) had non-finite statistics (NaN or inf in "
                f"the input or an earlier layer) in compiled code (torch.compile), where "
                f"on_nonfinite='raise' cannot stop the step without a host synchronization; they "
                f"were skipped (the running statistics kept their last finite values and "
                f"num_batches_tracked did not count them) and are reported now, as the layer leaves "
                f"training mode. Check layer.num_batches_skipped during training to stop earlier, or "
                f"use on_nonfinite='warn' or 'skip'."
            )
        warnings.warn(
            f"{self._label()}: {new} training batch(es) had non-finite "
            f"statistics (NaN or inf in the input or an earlier layer); the running statistics "
            f"kept their last finite values. Find the source with torch.autograd.detect_anomaly "
            f"or normlab.name_layers(model) to see which layer this is.",
            NonFiniteStatisticsWarning,
            stacklevel=4,
        )

    def train(self, mode: bool = True):
        # The deferred report (accelerators, compiled code): one host read when the layer
        # leaves training. self.training alone cannot tell: the wrapper of torch.compile(layer)
        # sets the layer's flag itself before calling this, so the mode of the last train() call
        # counts too. The mode switches first, so a "raise" report leaves the layer in eval mode.
        was_training = self.training or getattr(self, "_last_train_mode", True)
        self._last_train_mode = mode
        result = super().train(mode)
        if not mode and was_training and self.on_nonfinite != "skip":
            self._report_skips()
        return result


def check_momentum(owner: str, momentum: float | None) -> None:
    """Validate a layer's momentum with the owner's name in the message."""
    _stats.check_momentum(momentum, owner=owner)
