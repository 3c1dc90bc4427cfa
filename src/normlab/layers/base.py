"""What every normlab layer shares: option checks, float32 running statistics, non-finite guard,
and the one batch-norm forward every batch-norm variant uses.

normlab's layers subclass their ``torch.nn`` counterparts, so parameters, buffers, state-dict
keys and versioning (``num_batches_tracked`` filled in for version-1 checkpoints), ``repr`` and
``isinstance`` checks in other libraries are torch's own. :class:`NormLayer` adds what torch
lacks and each layer's ``forward`` hands the math to :mod:`normlab.functional`, passing its
label, so that the functional checks each rule once and names the layer in the message.

:class:`BatchNormTemplate` is the batch-norm forward: check the input, pick the statistics
(training or eval, running statistics or not, a row of them for the recurrent layer), call the
variant's functional, then store the new running statistics, or, inside
:func:`normlab.accumulate`, pool the batch statistics. A variant supplies only what differs: its
functional (``_functional``), its own keyword arguments (``_variant_options``), its input check,
and (the synchronized layers) a ``_normalize`` that returns statistics pooled across processes.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Literal

import torch
from torch import Tensor, nn

from .. import checks as _checks
from .. import functional as NF
from .. import stats as _stats
from .._tracing import traced

__all__ = ["BatchNormLayer", "BatchNormTemplate", "NonFiniteStatisticsWarning", "NormLayer", "RunningStatsLayer",
           "TORCH_NORM_HAS_BIAS", "bias_repr", "check_bias", "drop_bias", "name_layers", "reset_affine"]

# -1 outside the autograd engine's backward pass, a task id inside it (torch >= 2.1).
_current_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)

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
    """Raise unless ``eps`` is a finite number > 0 (:func:`normlab.checks.check_eps`)."""
    _checks.check_eps(eps, owner)


# torch 2.13 gave batch, instance and group norm a keyword-only ``bias`` (False: a weight without
# a bias, no ``bias`` key in the state dict). normlab's layers take it on every torch version they
# support (>= 2.3) and never pass it on: they build torch's module with its bias and drop it
# (drop_bias), reset (reset_affine) and show it (bias_repr) themselves, so one code path runs on
# every version.
TORCH_NORM_HAS_BIAS = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters


def check_bias(owner: str, bias: object) -> None:
    """Raise ``TypeError`` unless ``bias`` is a bool."""
    if not isinstance(bias, bool):
        raise TypeError(
            f"{owner}: bias must be True or False (False: a weight without a bias), got "
            f"{type(bias).__name__} {bias!r}."
        )


def drop_bias(module: nn.Module, bias: bool) -> None:
    """Remove ``module``'s bias parameter unless ``bias``: the layer then scales by ``weight``
    and shifts by nothing, and its state dict has no ``bias`` key, as torch's ``bias=False``.

    Raises:
        TypeError: ``bias`` is not a bool.
    """
    check_bias(type(module).__name__, bias)
    if not bias and module._parameters.get("bias") is not None:
        module.register_parameter("bias", None)


def reset_affine(module: nn.Module) -> None:
    """``weight`` to 1 and ``bias`` to 0, each where the module has it (torch < 2.13 resets a
    bias it assumes is there)."""
    weight, bias = module._parameters.get("weight"), module._parameters.get("bias")
    if weight is not None:
        nn.init.ones_(weight)
    if bias is not None:
        nn.init.zeros_(bias)


def bias_repr(module: nn.Module, text: str) -> str:
    """torch's ``extra_repr`` ``text``, with ``bias=False`` after ``affine=True`` for a weight
    without a bias where this torch's repr has no ``bias=`` field (before 2.13): torch's repr
    wherever torch has the configuration."""
    if "bias=" in text or module.bias is not None or module.weight is None:
        return text
    return text.replace("affine=True", "affine=True, bias=False", 1)


def in_backward() -> bool:
    """Whether the caller runs inside the autograd engine's backward pass.

    A layer's forward runs there when ``torch.utils.checkpoint`` recomputes it (reentrant or
    not): the running statistics took the batch in at the original forward, so they must not
    take it in again. False where torch lacks ``torch._C._current_graph_task_id`` (then the
    statistics are updated twice under checkpointing, as torch's layers do) and while
    ``torch.compile`` traces.
    """
    return (_current_graph_task_id is not None and not torch.compiler.is_compiling()
            and _current_graph_task_id() != -1)


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
    """Mixin for every normlab layer: a display name for messages, and running statistics that stay
    float32 when the module is cast to float16/bfloat16 (``model.half()``) or built with such a
    dtype: 16-bit EMAs lose the small updates (:func:`normlab.stats.statistics_dtype`)."""

    _name: str | None = None
    _label_text: str | None = None

    @property
    def name(self) -> str | None:
        """The layer's qualified name in its model (set by :func:`name_layers`), or None."""
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        self.__dict__["_name"] = value
        self.__dict__.pop("_label_text", None)

    def _label(self) -> str:
        """``Class(size) 'name'``, as messages name the layer; built once (every forward passes it)."""
        text = self._label_text
        if text is None:
            first = getattr(self, "num_features", None) or getattr(self, "num_channels", None) or getattr(
                self, "normalized_shape", ""
            )
            where = f" '{self.name}'" if self.name else ""
            text = self.__dict__["_label_text"] = f"{type(self).__name__}({first}){where}"
        return text

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module of a model before compiling it. A normlab
        # forward is Python that TorchScript cannot compile (NamedTuple results, keyword
        # arguments, autograd Functions, host reads of the statistics), and TorchScript is
        # deprecated; say so, and name the ways that do work, instead of a parser error deep in
        # the layer.
        raise TypeError(
            f"{self._label()}: normlab layers cannot be compiled by torch.jit.script (TorchScript "
            f"does not support their Python forward, and torch deprecates it). Use torch.export"
            f".export(model, (x,)) (train or eval mode; torch.onnx.export(model, (x,)) for ONNX), "
            f"torch.compile(model), or, for a TorchScript module, torch.jit.trace(model.eval(), x)."
        )

    def _keep_stats_float32(self) -> None:
        for key in ("running_mean", "running_var"):
            buf = self._buffers.get(key)
            if buf is not None and _stats.statistics_dtype(buf.dtype) != buf.dtype:
                self._buffers[key] = buf.to(_stats.statistics_dtype(buf.dtype))

    def _none_buffers_last(self) -> None:
        """Move the buffers registered as None (untracked statistics, absent affine parameters)
        after the others. torch.export's non-strict tracer (torch 2.13) pairs a root module's
        buffers with its graph inputs by position, counting the None entries, so a None ahead of
        a tensor buffer (``num_batches_skipped`` of an untracked layer) failed the export with an
        IndexError. State-dict keys keep their order: None buffers are not in it."""
        for key in [key for key, buf in self._buffers.items() if buf is None]:
            self._buffers[key] = self._buffers.pop(key)

    def _apply(self, fn, recurse=True):
        before = {k: self._buffers.get(k) for k in ("running_mean", "running_var")}
        result = super()._apply(fn, recurse)
        for key, old in before.items():
            new = self._buffers.get(key)
            if old is not None and new is not None and _stats.statistics_dtype(new.dtype) != new.dtype:
                # Move the float32 original rather than up-casting the rounded 16-bit copy.
                self._buffers[key] = old.to(device=new.device, dtype=_stats.statistics_dtype(new.dtype))
        return result


class RunningStatsLayer(NormLayer):
    """Mixin for layers with running statistics (batch and instance norm).

    * Running statistics stay float32 under ``model.half()`` (see :class:`NormLayer`).
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
    * Under ``torch.func`` transforms (``grad``; ``vmap`` ensembling with ``stack_module_state``
      and ``functional_call``) the running statistics passed in are updated as torch's layer
      updates them, and skips are counted on the device as under ``torch.compile``. Where torch's
      layer cannot update them (buffers the transformed function captured instead of taking
      them in; unbatched buffers under ``vmap`` of batched input) the layer raises a
      ``RuntimeError`` that says what works; instance norm updates captured statistics, as
      torch's does.
    * Recompute-safe: a forward that runs inside the backward pass, as
      ``torch.utils.checkpoint`` (``use_reentrant=True`` or ``False``) recomputes it, leaves the
      running statistics and the batch count as the original forward left them, so they take
      each training step in exactly once (torch's layers take it in twice). The rare forward
      that legitimately runs inside backward (a custom ``autograd.Function.backward`` or a
      backward hook that calls the layer in training mode) therefore updates nothing either;
      call such a layer outside backward, or update its statistics with
      :func:`normlab.functional.batch_norm` yourself.
    """

    def reset_parameters(self) -> None:
        """Running statistics to 0 / 1 (count 0), ``weight`` to 1, ``bias`` (if any) to 0."""
        self.reset_running_stats()
        reset_affine(self)

    # Whether a training forward under a torch.func transform may update running statistics that
    # the transformed function captured (module buffers not passed in through functional_call):
    # torch's instance norm can (its kernel writes through an alias), torch's batch norm cannot
    # (functorch refuses its in-place update of a captured buffer), and normlab's layers do as
    # their torch counterpart does.
    _updates_captured_stats = False

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
        self._none_buffers_last()

    def _stats_device(self) -> torch.device | None:
        rm = getattr(self, "running_mean", None)
        if rm is not None:
            return rm.device
        w = getattr(self, "weight", None)
        return None if w is None else w.device

    def _store_stats(
        self, running_mean: Tensor, running_var: Tensor, updated: Tensor, num_batches_tracked: Tensor | None = None,
        row: int | None = None,
    ) -> None:
        """Write new running statistics (and the batch count, if given) into the buffers (into row
        ``row`` of them, for per-step statistics), unless this forward is a recomputation inside
        backward (see the class docstring).

        ``updated`` is the functional's flag: the new statistics were already kept at the old
        values where it is False, so the writes need no branch; only the report asks the host,
        and only where that is free (eager CPU) or asked for (``"raise"`` in eager code)."""
        compiled = torch.compiler.is_compiling()
        if _current_graph_task_id is not None and not compiled and _current_graph_task_id() != -1:
            return  # in_backward(), inline: this runs for every layer at every step
        # Under torch.func transforms (grad, vmap) the flag has no data on the host either: as
        # in compiled code, the count grows on the device and the report waits for eval().
        transform = not compiled and traced(updated, running_mean)
        compiled = compiled or transform
        # Eager CPU: the flag is on the host, reading it is free. A compiled graph cannot raise on
        # a device value without a host read and a graph break: there the batch is counted on the
        # device and the error comes at model.eval() (see train).
        on_host = not compiled and (updated.is_cpu or self.on_nonfinite == "raise")
        finite = bool(updated) if on_host else None
        if finite is False and self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"{self._label()}: the batch statistics are not finite (NaN or inf in the input or "
                f"in an earlier layer); the running statistics were left unchanged. Construct the "
                f"layer with on_nonfinite='warn' or 'skip' to continue past such batches."
            )
        buffers = self._buffers
        mean, var, count = buffers["running_mean"], buffers["running_var"], buffers.get("num_batches_tracked")
        if row is not None:
            mean, var, count = mean[row], var[row], count[row]
        skipped = buffers["num_batches_skipped"]
        if transform:
            self._store_transformed(mean, var, count, skipped, running_mean, running_var, num_batches_tracked,
                                    updated)
            return
        # Running statistics carry no gradient; detach() is cheaper than a no_grad() block.
        mean.copy_(running_mean.detach())
        var.copy_(running_var.detach())
        if num_batches_tracked is not None:
            count.copy_(num_batches_tracked)
        if finite is None:
            # Count on the device (a bool adds 0 or 1); report when leaving training mode.
            skipped.add_(~updated)
        elif not finite:  # on the host: count and warn at once
            buffers["num_batches_skipped"].add_(1)
            if self.on_nonfinite == "warn":
                self._report_skips()

    def _store_transformed(self, mean: Tensor, var: Tensor, count: Tensor | None, skipped: Tensor,
                           new_mean: Tensor, new_var: Tensor, new_count: Tensor | None, updated: Tensor) -> None:
        """:meth:`_store_stats`'s writes under a torch.func transform. They fail where torch's
        layer's fail: into running statistics that the transformed function captured instead of
        taking them in (``grad``), or unbatched ones with a batched input (``vmap``); the error
        then says what works."""
        alias = torch.ops.aten.alias
        if self._updates_captured_stats:
            # functorch lets a transform write into a captured tensor through a fresh alias only,
            # as torch's instance-norm kernel does; a buffer passed in is written all the same.
            mean, var = alias(mean), alias(var)
        try:
            mean.copy_(new_mean.detach())
            var.copy_(new_var.detach())
            if new_count is not None:
                count.copy_(new_count)
        except RuntimeError as err:
            cause = str(err).strip().splitlines()[0]
            raise RuntimeError(
                f"{self._label()}: a training forward under a torch.func transform cannot update the "
                f"running statistics in place ({cause}); torch's batch norm fails here too. Pass "
                f"them in with the parameters, batched as the input is: torch.func.functional_call("
                f"model, (params, buffers), x), with stack_module_state's buffers under vmap; or "
                f"keep none: track_running_stats=False, torch.func.replace_all_batch_norm_modules_"
                f"(model), or eval mode."
            ) from err
        # normlab's skip counter (torch has none, so torch-style code leaves it out of the buffers
        # it passes in): counted where passed in, else in the module's own through an alias. Under
        # vmap with the module's own counter it cannot count the members' batches; the guard on
        # the statistics holds all the same.
        try:
            (skipped if traced(skipped) else alias(skipped)).add_(~updated)
        except RuntimeError:
            pass

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


SingleSample = Literal["error", "running"]
_SINGLE_SAMPLE = ("error", "running")


class BatchNormTemplate(RunningStatsLayer):
    """The one batch-norm forward (see the module docstring), and the options every batch norm
    shares: ``single_sample``, ``on_nonfinite``, ``unbiased``, ``stable_stats``.

    * ``single_sample``: a training batch with one value per channel (fewer than 2 valid
      positions under a mask) raises a ``ValueError`` that names the layer and the fixes
      (``"error"``, default), or is normalized with the running statistics, which stay unchanged
      (``"running"``).
    * ``on_nonfinite``: a batch with NaN/inf statistics never poisons the running statistics
      (see :class:`RunningStatsLayer`).
    * ``unbiased``: store the unbiased batch variance in ``running_var`` (True, torch's
      convention) or the biased one (Keras, Flax).
    * ``stable_stats``: CPU channels_last and 2-D input get statistics and gradients as accurate
      as NCHW input (see :func:`normlab.functional.batch_norm`).

    A variant sets ``_functional`` (a :mod:`normlab.functional` function with
    :func:`~normlab.functional.batch_norm`'s arguments), returns its own keyword arguments from
    ``_variant_options``, and sets ``_pools = False`` if it takes its updates itself inside
    :func:`normlab.accumulate`.
    """

    # Set by normlab.accumulate for the duration of its block: an object with
    # add(mean, var, count) that pools the micro-batches' statistics instead of updating.
    _accumulator = None
    _functional = staticmethod(NF.batch_norm)
    _pools = True
    single_sample: SingleSample = "error"
    unbiased = True
    stable_stats = True

    def _init_batch_options(self, single_sample: SingleSample, on_nonfinite: NonFinitePolicy, unbiased: bool,
                            stable_stats: bool, dtype: torch.dtype | None) -> None:
        check_choice(type(self).__name__, "single_sample", single_sample, _SINGLE_SAMPLE)
        self.single_sample = single_sample
        self.unbiased = bool(unbiased)
        self.stable_stats = bool(stable_stats)
        self._init_options(on_nonfinite, dtype)

    def _options_repr(self) -> str:
        return "".join(f", {key}={getattr(self, key)!r}" for key, default in (
            ("single_sample", "error"), ("on_nonfinite", "warn"), ("unbiased", True), ("stable_stats", True))
            if getattr(self, key) != default)

    def _check_input(self, input: Tensor) -> None:
        """A floating-point tensor, its rank (torch's ``_check_input_dim``) and the channel count."""
        _checks.check_tensor(input, self._label())
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}; check the preceding layer's output size."
            )

    def _variant_options(self, update: bool) -> dict:
        """The variant's own keyword arguments of ``_functional`` (and of
        :func:`~normlab.functional.batch_norm_with_stats` when pooling); ``update``: this call
        trains with running statistics."""
        return {}

    def _batch_norm_forward(self, input: Tensor, mask: Tensor | None = None, *, row: int | None = None,
                            name: str | None = None) -> Tensor:
        """Check, normalize, then store (or pool) the statistics: every batch-norm variant's
        forward. ``row`` picks a row of per-step running statistics (``(steps, C)`` buffers);
        ``name`` replaces the layer's label in messages."""
        self._check_input(input)
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracking = running_mean is not None and running_var is not None
        count = buffers.get("num_batches_tracked") if tracking else None
        if not tracking:
            running_mean = running_var = None
        elif row is not None:
            running_mean, running_var, count = running_mean[row], running_var[row], count[row]
        training = self.training or not tracking
        update = training and tracking
        pooling = update and self._pools and self._accumulator is not None
        options = self._variant_options(update)
        if mask is not None:
            options["mask"] = mask
        result = self._normalize(input, running_mean, running_var, count, training, pooling,
                                 name or self._label(), options)
        if isinstance(result, NF.BatchStats):
            if pooling:  # inside normlab.accumulate: the running statistics move at the optimizer step
                if not in_backward():  # a checkpoint's recomputation was pooled at the original forward
                    self._accumulator.add(result.mean, result.var, int(result.count))
            elif update:
                self._apply_batch_stats(result.mean, result.var, result.count, row)
            return result.output
        if result.updated is not None:
            self._store_stats(result.running_mean, result.running_var, result.updated, result.num_batches_tracked,
                              row)
        return result.output

    def _normalize(self, input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   count: Tensor | None, training: bool, pooling: bool, name: str,
                   options: dict) -> NF.BatchNormResult | NF.BatchStats:
        """The functional call: the variant's functional, or, when pooling, the batch statistics
        of its forward (:func:`~normlab.functional.batch_norm_with_stats`)."""
        # Read parameters from their dict: Module.__getattr__ costs microseconds a call, and this
        # runs for every layer at every step.
        params = self._parameters
        if pooling:
            return NF.batch_norm_with_stats(
                input, params.get("weight"), params.get("bias"), self.eps, stable_stats=self.stable_stats,
                running_mean=running_mean, running_var=running_var, single_sample=self.single_sample,
                name=name, **options,
            )
        return self._functional(
            input, running_mean=running_mean, running_var=running_var, weight=params.get("weight"),
            bias=params.get("bias"), training=training, momentum=self.momentum, eps=self.eps,
            num_batches_tracked=count, unbiased=self.unbiased, stable_stats=self.stable_stats,
            single_sample=self.single_sample, name=name, **options,
        )

    def _apply_batch_stats(self, mean: Tensor, var: Tensor, count: int | Tensor, row: int | None = None) -> None:
        """One running-statistics update from batch statistics (mean, biased variance, count),
        as from one batch of ``count`` values per channel (:func:`normlab.functional.apply_batch_stats`)."""
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if running_mean is None or running_var is None:
            return
        num_batches = buffers.get("num_batches_tracked")
        if row is not None:
            running_mean, running_var, num_batches = running_mean[row], running_var[row], num_batches[row]
        r = NF.apply_batch_stats(running_mean, running_var, mean, var, count, self.momentum, num_batches,
                                 self.unbiased, name=self._label())
        if r.updated is not None:
            self._store_stats(r.running_mean, r.running_var, r.updated, r.num_batches_tracked, row)

    def _apply_accumulated(self, mean: Tensor, var: Tensor, count: int) -> None:
        """The pooled statistics of a :func:`normlab.accumulate` block, applied as one batch's."""
        self._apply_batch_stats(mean, var, count)


class BatchNormLayer(BatchNormTemplate):
    """A batch norm over ``torch.nn``'s ``_BatchNorm``: torch's constructor arguments, then the
    options every normlab batch norm shares (keyword-only; see :class:`BatchNormTemplate`). The
    one place they are declared: a variant adds its own keywords and passes ``**options`` on.

    ``bias`` (keyword-only, default True) is torch 2.13's: False keeps ``weight`` (with
    ``affine``) and no ``bias``, ``y = x_hat * weight``, with no ``bias`` key in the state dict.
    Every normlab batch norm takes it on every supported torch version, not only where torch has
    it (see :func:`drop_bias`)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        single_sample: SingleSample = "error",
        on_nonfinite: NonFinitePolicy = "warn",
        unbiased: bool = True,
        stable_stats: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_features", num_features)
        check_eps(owner, eps)
        check_momentum(owner, momentum)
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, device=device, dtype=dtype,
        )
        drop_bias(self, bias)
        self._init_batch_options(single_sample, on_nonfinite, unbiased, stable_stats, dtype)

    def extra_repr(self) -> str:
        return bias_repr(self, super().extra_repr()) + self._options_repr()
