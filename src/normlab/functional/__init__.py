"""Pure normalization functions for torch: statistics in, statistics out.

This package mirrors :mod:`normlab.reference` (the float64 NumPy oracle) name for name: its
public functions (``__all__``) are reference's, less reference's analytic ``*_backward``
functions (autograd differentiates these; the tests hold it against them). Every
function is pure: it never modifies its arguments, and a function that updates running
statistics returns the new ones. That makes them usable under ``torch.func.functional_call``,
``torch.func.vmap`` and ``torch.compile``. Where the semantics coincide with a native torch
kernel (``torch.batch_norm``, ``F.layer_norm``, ``F.group_norm``, ``F.instance_norm``,
``F.rms_norm``) the kernel does the work; normlab adds numerics, checks and purity around it:

* statistics of float16/bfloat16 input are accumulated in float32, the output keeps the input's
  dtype, and running statistics keep their own (float32) dtype;
* a batch whose statistics are not finite leaves the running statistics as they were (the
  returned ``updated`` flag, a bool tensor, says so), with a select on the device: no host
  synchronization and no data-dependent branch, so the guard holds in eager code, under
  ``torch.compile`` (``fullgraph=True`` included) and in CUDA graphs;
* on the CPU, where torch's kernel sums channel-innermost data (2-D input, channels_last)
  naively and loses precision with large batches or offsets, the batch statistics and the
  gradient's sums are accumulated blockwise (:func:`channel_mean_var`), by normlab's compiled
  kernel (:mod:`normlab.kernels`) in one pass, or by torch operations where it is unavailable.

Example::

    >>> import torch
    >>> from normlab import functional as NF
    >>> x = torch.randn(8, 3, 4, 4)
    >>> out = NF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True,
    ...                    num_batches_tracked=torch.tensor(0))
    >>> out.output.shape, out.running_mean.shape, int(out.num_batches_tracked)
    (torch.Size([8, 3, 4, 4]), torch.Size([3]), 1)

Every batch-norm function takes ``name=``, the caller's name in its messages: a layer passes
its label, so that each rule is checked once, here, and the error names the layer; and
``single_sample=``, what a training batch of one value per channel does (the layers' option).

Layout: the public functions live in private modules (``_batch``, ``_renorm``, ``_ghost``,
``_with_stats``, ``_per_sample``) over the shared numerics (``_numerics``: dtypes, channel
views, the argument checks, the finite and condition checks) and the kernel dispatch
(``_dispatch``). Two public submodules: :mod:`normlab.functional.act` holds
:func:`batch_norm_act`, its fused autograd function and the activation algebra the layers
share; :mod:`normlab.functional.sync` the collectives, which have no reference twin: moments
pooled across processes (the synchronized layers and :func:`normlab.surgery.recalibrate_bn`
pool with it) and the synchronized batch norm.
"""

from ._batch import BatchNormResult, RunningStats, apply_batch_stats, batch_norm, masked_batch_norm
from ._dispatch import channel_mean_var
from ._ghost import ghost_batch_norm, ghost_batch_sizes
from ._per_sample import InstanceNormResult, group_norm, instance_norm, layer_norm, rms_norm
from ._renorm import batch_renorm
from ._with_stats import BatchStats, batch_norm_with_stats
from .act import batch_norm_act
from ..stats import update_running_stats

__all__ = [
    "BatchNormResult",
    "BatchStats",
    "InstanceNormResult",
    "RunningStats",
    "apply_batch_stats",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_with_stats",
    "batch_renorm",
    "channel_mean_var",
    "ghost_batch_norm",
    "ghost_batch_sizes",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "masked_batch_norm",
    "rms_norm",
    "update_running_stats",
]
