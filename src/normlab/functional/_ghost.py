"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017): :func:`ghost_batch_norm` and
:func:`ghost_batch_sizes`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import statistics_dtype
from . import _numerics as N
from ._batch import BatchNormResult, SingleSample, batch_norm
from ._dispatch import fast_kernel_ok


def ghost_batch_sizes(n: int, virtual_batch_size: int, *, name: str = "ghost_batch_norm") -> list[int]:
    """The sizes of the virtual batches a batch of ``n`` samples is cut into (along dimension 0).

    ``virtual_batch_size`` consecutive samples each; the last virtual batch holds the rest and
    may be smaller, except that a rest of one sample joins the virtual batch before it (one
    sample gives no batch statistics). A batch of at most ``virtual_batch_size`` samples is one
    virtual batch. ``name`` is the caller's name in the error a bad ``virtual_batch_size`` raises.

    >>> ghost_batch_sizes(10, 4), ghost_batch_sizes(9, 4), ghost_batch_sizes(3, 4)
    ([4, 4, 2], [4, 5], [3])
    """
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int):
        raise TypeError(
            f"{name}: virtual_batch_size must be an int >= 2, got "
            f"{type(virtual_batch_size).__name__} {virtual_batch_size!r}."
        )
    if virtual_batch_size < 2:
        raise ValueError(
            f"{name}: virtual_batch_size must be >= 2 (a virtual batch of one sample has no batch "
            f"statistics), got {virtual_batch_size}; Hoffer et al. used 128."
        )
    if n <= virtual_batch_size:
        return [n]
    full, rest = divmod(n, virtual_batch_size)
    sizes = [virtual_batch_size] * full
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


class _GhostBatchNormKernel(torch.autograd.Function):
    """Training-mode batch norm of each virtual batch on torch's kernels, one call per virtual batch.

    Virtual batches are consecutive slices along dimension 0, so each is a contiguous view (in
    any memory format) of the input and of one preallocated output, which the forward kernel
    writes directly: no concatenation. The backward kernel's out= form computes each slice of
    the input gradient and copies it into place (one copy of the gradient in all; torch has no
    in-place backward kernel). The running statistics given (copies) are updated by the kernel,
    virtual batch by virtual batch, with torch's momentum rule; None for no update. Outputs: y
    and the per-virtual-batch means and ``1 / sigma`` (``(G, C)``, no gradient).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, sizes, momentum, eps):
        out = torch.empty_like(x)
        stats_dtype = statistics_dtype(x.dtype)
        means = torch.empty(len(sizes), x.shape[1], dtype=stats_dtype, device=x.device)
        invstds = torch.empty_like(means)
        for i, (xs, ys) in enumerate(zip(x.split(sizes), out.split(sizes))):
            torch.native_batch_norm(xs, weight, bias, running_mean, running_var, True, momentum, eps,
                                    out=(ys, means[i], invstds[i]))
        ctx.save_for_backward(x, weight, means, invstds)
        ctx.sizes, ctx.eps = sizes, eps
        ctx.mark_non_differentiable(means, invstds)
        return out, means, invstds

    @staticmethod
    def backward(ctx, grad_out, _means, _invstds):
        x, weight, means, invstds = ctx.saved_tensors
        sizes, eps = ctx.sizes, ctx.eps
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w, need_b]
        grad_out = grad_out.contiguous(memory_format=N.memory_format(x))
        pieces = zip(grad_out.split(sizes), x.split(sizes), means, invstds)
        if torch.is_grad_enabled():  # create_graph=True: torch's backward has a double backward
            parts = [torch.ops.aten.native_batch_norm_backward(g, xs, weight, None, None, m, s, True, eps, mask)
                     for g, xs, m, s in pieces]
            gx = torch.cat([p[0] for p in parts]) if need_x else None
            gw = torch.stack([p[1] for p in parts]).sum(0) if need_w else None
            gb = torch.stack([p[2] for p in parts]).sum(0) if need_b else None
            return gx, gw, gb, None, None, None, None, None
        # The out= form wants every output: the parameter sums come from the same passes.
        gx = torch.empty_like(x)
        param_dtype = weight.dtype if weight is not None else x.dtype
        gws = torch.empty(len(sizes), x.shape[1], dtype=param_dtype, device=x.device)
        gbs = torch.empty_like(gws)
        for i, ((g, xs, m, s), gxs) in enumerate(zip(pieces, gx.split(sizes))):
            torch.ops.aten.native_batch_norm_backward.out(
                g, xs, weight, None, None, m, s, True, eps, [True, True, True], out0=gxs, out1=gws[i], out2=gbs[i],
            )
        return (gx if need_x else None, gws.sum(0) if need_w else None, gbs.sum(0) if need_b else None,
                None, None, None, None, None)


def _kernel_path(x, weight, bias, running_mean, running_var, update, sizes, momentum, eps, num_batches_tracked):
    """The ghost forward on torch's kernels (float momentum and unbiased variance: torch's rule),
    or None where the general path must serve: running statistics in another dtype than the
    input, or (on the CPU) an ill-conditioned or non-finite virtual batch."""
    rm = running_mean.clone() if update else None
    rv = running_var.clone() if update else None
    if update and (rm.dtype != x.dtype or rv.dtype != x.dtype):
        return None  # torch's kernel wants running statistics in the input's dtype
    out, means, invstds = _GhostBatchNormKernel.apply(
        x, weight, bias, rm, rv, sizes, momentum if update else 0.0, eps
    )
    if x.is_cpu:
        if not N.precise(means, invstds):  # see normlab.functional._numerics.condition
            return None
        updated = N.TRUE
    else:
        updated = N.finite_flag(means, invstds)
    if not update:
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if updated is N.TRUE:
        count = None if num_batches_tracked is None else num_batches_tracked + len(sizes)
        return BatchNormResult(out, rm, rv, count, updated)
    rm = torch.where(updated, rm, running_mean)
    rv = torch.where(updated, rv, running_var)
    count = None if num_batches_tracked is None else num_batches_tracked + len(sizes) * updated
    return BatchNormResult(out, rm, rv, count, updated)


def ghost_batch_norm(
    input: Tensor,
    virtual_batch_size: int,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    stable_stats: bool = True,
    single_sample: SingleSample = "error",
    name: str = "ghost_batch_norm",
) -> BatchNormResult:
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017): batch statistics per virtual batch.

    Where batch norm uses batch statistics (``training``, or no running statistics), the batch
    is cut along dimension 0 into the virtual batches of :func:`ghost_batch_sizes`, and each is
    normalized as by :func:`batch_norm` with its own mean and variance. In training the running
    statistics take one update per virtual batch, in order (the paper's Algorithm 1: exactly
    :func:`batch_norm` applied virtual batch by virtual batch), and ``num_batches_tracked``
    grows by the number of virtual batches; the effective momentum per call is
    ``1 - (1 - momentum) ** G`` for G virtual batches. A call in which any virtual batch has
    non-finite statistics leaves the running statistics and the count as they were (``updated``
    is False). In eval mode with running statistics this is :func:`batch_norm`.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        virtual_batch_size: samples per virtual batch (int >= 2).
        running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            unbiased, stable_stats, single_sample, name: as :func:`batch_norm`.

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[0.0], [2.0], [10.0], [14.0]])
    >>> r = ghost_batch_norm(x, 2, torch.zeros(1), torch.ones(1), training=True, momentum=0.5,
    ...                      eps=1e-12, num_batches_tracked=torch.tensor(0))
    >>> r.output.squeeze(1), int(r.num_batches_tracked)
    (tensor([-1.,  1., -1.,  1.]), 2)
    """
    N.check_input(input, name)
    sizes = ghost_batch_sizes(input.shape[0], virtual_batch_size, name=name)
    use_batch_stats = training or running_mean is None
    if not use_batch_stats or len(sizes) == 1:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=num_batches_tracked, unbiased=unbiased, stable_stats=stable_stats,
                          single_sample=single_sample, name=name)
    # Two or more virtual batches of two or more samples each: every one has batch statistics.
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    update = training and running_mean is not None
    if training:
        N.check_update(momentum, num_batches_tracked if update else 0, name)
    per_sample = N.values_per_channel(input) // input.shape[0]
    if (fast_kernel_ok(input, stable_stats, max(sizes) * per_sample, weight, bias, running_mean, running_var)
            and (not update or (isinstance(momentum, float) and unbiased))):
        acc = statistics_dtype(input.dtype)
        fast = _kernel_path(input, N.cast(weight, acc), N.cast(bias, acc), running_mean, running_var,
                            update, sizes, momentum, eps, num_batches_tracked)
        if fast is not None:
            return fast
    outs, flags = [], []
    mean, var, count = running_mean, running_var, num_batches_tracked
    for piece in input.split(sizes):
        r = batch_norm(piece, mean, var, weight, bias, training, momentum, eps,
                       num_batches_tracked=count, unbiased=unbiased, stable_stats=stable_stats, name=name)
        outs.append(r.output)
        mean, var, count = r.running_mean, r.running_var, r.num_batches_tracked
        flags.append(r.updated)
    out = torch.cat(outs)
    if not update:
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if all(f is N.TRUE for f in flags):
        return BatchNormResult(out, mean, var, count, N.TRUE)
    updated = torch.stack(flags).all()
    mean = torch.where(updated, mean, running_mean)
    var = torch.where(updated, var, running_var)
    if count is not None:
        count = torch.where(updated, count, num_batches_tracked)
    return BatchNormResult(out, mean, var, count, updated)
