"""Batch norm in recurrent networks: per-time-step statistics, a BN-LSTM and an LN-LSTM.

Cooijmans et al. (2016), *Recurrent Batch Normalization*, normalize an LSTM's input-to-hidden
and hidden-to-hidden products separately and the cell before the output, each with batch
statistics, and keep separate population statistics per time step: the activations' early
time steps have distributions of their own, which later ones converge away from.

* :class:`RecurrentBatchNorm` is batch norm over ``(N, C)`` with ``max_steps`` rows of running
  statistics: ``forward(x, step)`` uses and updates row ``min(step, max_steps - 1)``, so every
  step beyond ``max_steps - 1`` shares the last row (the paper's rule for sequences longer than
  those seen in training). Weight and bias are shared over time.
* :class:`BNLSTM` is the paper's LSTM; :class:`LNLSTM` the same with layer normalization
  (Ba et al. 2016) in the same three places, whose output does not depend on the batch.

Both LSTMs take ``(N, T, F)`` batches (``batch_first=True``, their default) and variable lengths
through ``lengths`` or a ``mask``: padded steps leave the state unchanged, give zero outputs,
and do not enter batch statistics (masked statistics: each step's statistics are over the
sequences still running). ``h_T, c_T`` are each sequence's state after its last valid step.
"""

from __future__ import annotations

import math
import operator
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from ..checks import check_tensor
from .base import BatchNormTemplate, SingleSample, check_eps, check_momentum, check_positive_int
from .layer import LayerNorm

__all__ = ["BNLSTM", "LNLSTM", "RecurrentBatchNorm"]


class RecurrentBatchNorm(BatchNormTemplate, nn.Module):
    """Batch norm over ``(N, C)`` with separate running statistics per time step.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``: batch statistics in training (over
    the rows ``mask`` marks valid), row ``t = min(step, max_steps - 1)`` of the running
    statistics in eval. Training updates row ``t`` alone, as batch norm updates its statistics
    (torch's momentum; ``None`` for the cumulative average, counted per row).

    State (torch's names, one row per step): ``weight``, ``bias`` ``(C,)`` shared over time;
    ``running_mean``, ``running_var`` ``(max_steps, C)``; ``num_batches_tracked``
    ``(max_steps,)``, the batches each row has taken in.

    Args:
        num_features: C.
        max_steps: rows of statistics; steps >= max_steps use (and in training update) the last.
        eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm1d``.
        bias: learn ``bias`` (with ``affine``); False when a bias follows anyway (BN-LSTM).
        single_sample: a training step with one valid row raises (``"error"``, default) or is
            normalized with that step's running statistics, left unchanged (``"running"``).
        on_nonfinite, unbiased: as :class:`normlab.BatchNorm1d`.

    Forward ``(input, step, mask=None)``: ``input`` ``(N, C)``, ``step`` an int >= 0, ``mask``
    ``(N,)`` bool (True = valid) or None. Rows with ``mask`` False give zeros and take no part
    in the statistics.

    >>> import torch
    >>> from normlab.layers.recurrent import RecurrentBatchNorm
    >>> bn = RecurrentBatchNorm(4, max_steps=3)
    >>> y = bn(torch.randn(8, 4) + 5, step=1)
    >>> bn.running_mean.shape, bool(bn.running_mean[1].mean() > 0.4), bool(bn.running_mean[0].eq(0).all())
    (torch.Size([3, 4]), True, True)
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        single_sample: SingleSample = "error",
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
        unbiased: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_features", num_features)
        check_positive_int(owner, "max_steps", max_steps)
        check_eps(owner, eps)
        check_momentum(owner, momentum)
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.max_steps = num_features, max_steps
        self.eps, self.momentum = eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine and bias else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(max_steps, num_features, **factory))
            self.register_buffer("running_var", torch.ones(max_steps, num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.zeros(max_steps, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self._init_batch_options(single_sample, on_nonfinite, unbiased, True, dtype)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    # Per-step statistics are not pooled by normlab.accumulate: each micro-batch updates its rows.
    _pools = False
    _apply_accumulated = None

    def forward(self, input: Tensor, step: int, mask: Tensor | None = None) -> Tensor:
        t = self._row(step)
        self._check_step_input(input)
        rows = None if mask is None else self._valid_rows(input, mask)
        selected = input if rows is None else input.index_select(0, rows)
        # The valid rows alone, with row t of the statistics: batch norm's template.
        out = self._batch_norm_forward(selected, row=t, name=f"{self._label()} at step {step}")
        return out if rows is None else torch.zeros_like(input).index_copy(0, rows, out)

    def _check_input(self, input: Tensor) -> None:
        pass  # checked in forward, before the valid rows are picked (_check_step_input)

    def _check_step_input(self, input: Tensor) -> None:
        check_tensor(input, self._label())
        if input.dim() != 2 or input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected input (N, {self.num_features}) for one time step, got shape "
                f"{tuple(input.shape)}; call the layer once per step with x[:, t]."
            )

    def _row(self, step: int) -> int:
        try:
            step = operator.index(step)
        except TypeError:
            raise TypeError(
                f"{self._label()}: step must be an int (the time index, from 0), got "
                f"{type(step).__name__} {step!r}."
            ) from None
        if step < 0:
            raise ValueError(f"{self._label()}: step must be >= 0 (the time index, from 0), got {step}.")
        return min(step, self.max_steps - 1)

    def _valid_rows(self, input: Tensor, mask: Tensor) -> Tensor | None:
        """Indices of the valid rows, or None when all are valid."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != input.shape[:1]:
            error = ValueError if isinstance(mask, Tensor) and mask.dtype == torch.bool else TypeError
            raise error(
                f"{self._label()}: mask must be a bool tensor of shape ({input.shape[0]},), True for "
                f"the valid rows, got {_describe(mask)}."
            )
        if bool(mask.all()):
            return None
        return mask.nonzero().squeeze(1)

    def extra_repr(self) -> str:
        extra = (
            f"{self.num_features}, max_steps={self.max_steps}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
        if self.affine and self.bias is None:
            extra += ", bias=False"
        return extra + self._options_repr()


def _describe(mask: object) -> str:
    return f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__


# --------------------------------------------------------------------------------------------
# LSTMs
# --------------------------------------------------------------------------------------------


class _NormLSTMLayer(nn.Module):
    """One LSTM layer with normalized input-to-hidden, hidden-to-hidden products and cell.

    Gates in torch's order (input, forget, cell, output)::

        i, f, g, o = norm_hh(W_hh h_{t-1}) + norm_ih(W_ih x_t) + bias
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(norm_c(c_t))
    """

    def __init__(self, input_size: int, hidden_size: int, norms: tuple[nn.Module, nn.Module, nn.Module],
                 gamma_init: float, factory: dict) -> None:
        super().__init__()
        self.input_size, self.hidden_size = input_size, hidden_size
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size, **factory))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        self.norm_ih, self.norm_hh, self.norm_c = norms
        self.gamma_init = gamma_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.weight_ih, -bound, bound)
        # Orthogonal recurrent weights (Cooijmans et al.), one block per gate.
        for block in self.weight_hh.data.chunk(4, 0):
            nn.init.orthogonal_(block)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[self.hidden_size:2 * self.hidden_size].fill_(1.0)  # forget gate open at first
            for norm in (self.norm_ih, self.norm_hh, self.norm_c):
                if getattr(norm, "weight", None) is not None:
                    norm.weight.fill_(self.gamma_init)
                if getattr(norm, "bias", None) is not None:
                    norm.bias.zero_()


class _NormLSTM(nn.Module):
    """The loop over layers and time shared by :class:`BNLSTM` and :class:`LNLSTM`; each
    defines ``_norm(norm, a, t, mask_t)``, how one of its norms takes step t."""

    layers: nn.ModuleList

    def _init_common(self, input_size: int, hidden_size: int, num_layers: int, batch_first: bool) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "input_size", input_size)
        check_positive_int(owner, "hidden_size", hidden_size)
        check_positive_int(owner, "num_layers", num_layers)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.batch_first = num_layers, bool(batch_first)

    def _norm_ih_all(self, layer: _NormLSTMLayer, a: Tensor, mask: Tensor | None) -> Tensor | None:
        """``norm_ih`` for all steps at once ``(N, T, 4H)``, or None to do it step by step."""
        return None

    def forward(
        self,
        input: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | Sequence[int] | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        x = self._check_input(input)
        n, steps = x.shape[0], x.shape[1]
        valid = self._valid_mask(x, lengths, mask)  # (N, T) bool or None (all valid)
        if valid is not None:
            # Padding may hold anything (NaN included): zeroed, it cannot reach a gradient
            # through W_ih (whose gradient sums x over every position) or a norm.
            x = torch.where(valid.unsqueeze(2), x, torch.zeros((), dtype=x.dtype, device=x.device))
        h0, c0 = self._initial_state(x, hx)
        h_last, c_last = [], []
        for k, layer in enumerate(self.layers):
            h, c = h0[k], c0[k]
            a_ih = torch.matmul(x, layer.weight_ih.t())  # every step's input product at once
            normed_ih = self._norm_ih_all(layer, a_ih, valid)
            outputs = []
            for t in range(steps):
                m = None if valid is None else valid[:, t]
                if m is not None and bool(m.all()):
                    m = None
                if m is not None and not bool(m.any()):  # every sequence has ended
                    outputs.append(torch.zeros_like(h))
                    continue
                ih = normed_ih[:, t] if normed_ih is not None else self._norm(layer.norm_ih, a_ih[:, t], t, m)
                gates = self._norm(layer.norm_hh, torch.matmul(h, layer.weight_hh.t()), t, m) + ih + layer.bias
                i, f, g, o = gates.chunk(4, 1)
                c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h_new = torch.sigmoid(o) * torch.tanh(self._norm(layer.norm_c, c_new, t, m))
                if m is None:
                    h, c = h_new, c_new
                    outputs.append(h_new)
                else:  # padded steps keep the state and output zeros
                    keep = m.unsqueeze(1)
                    h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
                    outputs.append(torch.where(keep, h_new, torch.zeros_like(h_new)))
            x = torch.stack(outputs, 1) if outputs else x.new_zeros(n, 0, self.hidden_size)
            h_last.append(h)
            c_last.append(c)
        out = x if self.batch_first else x.transpose(0, 1)
        return out, (torch.stack(h_last), torch.stack(c_last))

    def _check_input(self, input: Tensor) -> Tensor:
        check_tensor(input, type(self).__name__)
        layout, other = ("(N, T, F)", "(T, N, F)") if self.batch_first else ("(T, N, F)", "(N, T, F)")
        if input.dim() != 3 or input.shape[2] != self.input_size:
            raise ValueError(
                f"{type(self).__name__}: expected input {layout} with F = input_size = {self.input_size}, "
                f"got shape {tuple(input.shape)}; for {other} input build with "
                f"batch_first={not self.batch_first}."
            )
        return input if self.batch_first else input.transpose(0, 1)

    def _valid_mask(self, x: Tensor, lengths, mask) -> Tensor | None:
        owner = type(self).__name__
        n, steps = x.shape[0], x.shape[1]
        if lengths is not None and mask is not None:
            raise ValueError(f"{owner}: give lengths or mask, not both.")
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=x.device)
            if lengths.shape != (n,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
                raise ValueError(
                    f"{owner}: lengths must be {n} integers (one per sequence), got "
                    f"{lengths.dtype} of shape {tuple(lengths.shape)}."
                )
            if n and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
                raise ValueError(
                    f"{owner}: lengths must lie in [0, {steps}] (the padded length T), got "
                    f"min {int(lengths.min())}, max {int(lengths.max())}."
                )
            return torch.arange(steps, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
        if mask is not None:
            expected = (n, steps) if self.batch_first else (steps, n)
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != expected:
                got = _describe(mask)
                error = ValueError if isinstance(mask, Tensor) and mask.dtype == torch.bool else TypeError
                raise error(
                    f"{owner}: mask must be a bool tensor of shape {expected} (the input's first two "
                    f"dimensions), True at valid steps, got {got}."
                )
            return mask if self.batch_first else mask.t()
        return None

    def _initial_state(self, x: Tensor, hx) -> tuple[Tensor, Tensor]:
        shape = (self.num_layers, x.shape[0], self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(shape)
            return zeros, zeros
        if (not isinstance(hx, (tuple, list)) or len(hx) != 2
                or any(not isinstance(s, Tensor) or tuple(s.shape) != shape for s in hx)):
            got = [tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__ for s in hx] \
                if isinstance(hx, (tuple, list)) else type(hx).__name__
            raise ValueError(
                f"{type(self).__name__}: hx must be (h_0, c_0), each of shape (num_layers, N, hidden_size) "
                f"= {shape}, got {got}."
            )
        return hx[0], hx[1]

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}")


class BNLSTM(_NormLSTM):
    """The batch-normalized LSTM of Cooijmans et al. (2016).

    Per layer and step t, gates in torch's order (input, forget, cell, output)::

        i, f, g, o = BN_hh(W_hh h_{t-1}; t) + BN_ih(W_ih x_t; t) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN_c(c_t; t))

    Each BN is a :class:`RecurrentBatchNorm` with statistics per step up to ``max_steps``;
    BN_ih and BN_hh have no bias (``b`` is shared), BN_c has one. Initialization as in the
    paper: every BN's gamma = ``gamma_init`` (0.1), beta = 0; orthogonal ``W_hh``; ``b`` = 0
    with the forget gate's part at 1.

    Args:
        input_size, hidden_size, num_layers: as ``torch.nn.LSTM``.
        max_steps: rows of statistics per BN (the longest training sequence).
        batch_first: ``(N, T, F)`` input and output (default True, unlike torch.nn.LSTM).
        eps, momentum: of the BNs.
        gamma_init: initial gamma of every BN (default 0.1).
        single_sample: what a training step with one running sequence does (default
            ``"running"``: normalized with that step's running statistics; ``"error"`` raises).

    Forward ``(input, hx=None, *, lengths=None, mask=None)`` returns ``(output, (h_T, c_T))``:
    ``output`` ``(N, T, H)`` with zeros at padded steps, ``h_T``/``c_T`` ``(num_layers, N, H)``.
    ``lengths``: ``(N,)`` ints in ``[0, T]``; or ``mask``: bool, the input's first two
    dimensions, True at valid steps.

    >>> import torch
    >>> from normlab.layers.recurrent import BNLSTM
    >>> lstm = BNLSTM(3, 8, max_steps=5)
    >>> out, (h, c) = lstm(torch.randn(4, 6, 3), lengths=[6, 5, 3, 2])
    >>> out.shape, h.shape, bool(out[3, 2:].eq(0).all())
    (torch.Size([4, 6, 8]), torch.Size([1, 4, 8]), True)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        max_steps: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        gamma_init: float = 0.1,
        single_sample: SingleSample = "running",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._init_common(input_size, hidden_size, num_layers, batch_first)
        check_positive_int(type(self).__name__, "max_steps", max_steps)
        self.max_steps = max_steps
        factory = {"device": device, "dtype": dtype}

        def bn(channels: int, bias: bool) -> RecurrentBatchNorm:
            return RecurrentBatchNorm(channels, max_steps, eps, momentum, bias=bias,
                                      single_sample=single_sample, **factory)

        self.layers = nn.ModuleList(
            _NormLSTMLayer(input_size if k == 0 else hidden_size, hidden_size,
                           (bn(4 * hidden_size, False), bn(4 * hidden_size, False), bn(hidden_size, True)),
                           gamma_init, factory)
            for k in range(num_layers)
        )

    def _norm(self, norm: RecurrentBatchNorm, a: Tensor, t: int, mask_t: Tensor | None) -> Tensor:
        return norm(a, t, mask_t)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", max_steps={self.max_steps}"


class LNLSTM(_NormLSTM):
    """The layer-normalized LSTM (Ba et al. 2016), laid out as :class:`BNLSTM` for comparison.

    ``LN`` in the places of ``BN``::

        i, f, g, o = LN_hh(W_hh h_{t-1}) + LN_ih(W_ih x_t) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN_c(c_t))

    LN_ih and LN_hh normalize the 4H gate pre-activations together and have no bias (``b`` is
    shared); LN_c normalizes the H cell values. Statistics per sample and step, so a sequence's
    output never depends on the rest of the batch or on padding. Gains start at ``gamma_init``
    (default 1.0, as Ba et al.); otherwise initialized as :class:`BNLSTM`. Arguments, forward
    and return values as :class:`BNLSTM` (no ``max_steps``).

    >>> import torch
    >>> from normlab.layers.recurrent import LNLSTM
    >>> out, (h, c) = LNLSTM(3, 8)(torch.randn(4, 6, 3))
    >>> out.shape, c.shape
    (torch.Size([4, 6, 8]), torch.Size([1, 4, 8]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        batch_first: bool = True,
        eps: float = 1e-5,
        gamma_init: float = 1.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self._init_common(input_size, hidden_size, num_layers, batch_first)
        factory = {"device": device, "dtype": dtype}

        def ln(size: int, bias: bool) -> LayerNorm:
            return LayerNorm(size, eps, bias=bias, **factory)

        self.layers = nn.ModuleList(
            _NormLSTMLayer(input_size if k == 0 else hidden_size, hidden_size,
                           (ln(4 * hidden_size, False), ln(4 * hidden_size, False), ln(hidden_size, True)),
                           gamma_init, factory)
            for k in range(num_layers)
        )

    def _norm_ih_all(self, layer: _NormLSTMLayer, a: Tensor, mask: Tensor | None) -> Tensor:
        return layer.norm_ih(a)  # per position: every step at once

    def _norm(self, norm: LayerNorm, a: Tensor, t: int, mask_t: Tensor | None) -> Tensor:
        return norm(a)
