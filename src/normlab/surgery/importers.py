"""Import batch norms from Keras and Flax: :func:`batchnorm_from_keras`, :func:`batchnorm_from_flax`.

(The readers live in ``_keras.py`` and ``_flax.py``, what they share in ``_import_common.py``.)

Pass the source layer itself, and everything is read from it: the arrays by their names, and
epsilon, momentum, axis, center/scale (``use_scale``/``use_bias``) and Keras's renorm settings
from its configuration, so that nothing falls back silently to a default::

    bn = batchnorm_from_keras(keras_layer)                 # keras.layers.BatchNormalization, built
    bn = batchnorm_from_flax(linen_module, variables)      # flax.linen.BatchNorm + its variables
    bn = batchnorm_from_flax(nnx_module)                   # flax.nnx.BatchNorm

Arrays are accepted too (the older API, kept): ``batchnorm_from_keras(gamma, beta, moving_mean,
moving_variance, momentum=..., epsilon=...)`` and ``batchnorm_from_flax(**params, **batch_stats,
momentum=..., epsilon=...)``; there momentum and epsilon default to the framework's defaults.

Conventions (see :mod:`normlab.stats`). Keras and Flax compute at inference
``y = (x - mean) / sqrt(var + epsilon) * gamma + beta`` and, in training,
``moving = decay * moving + (1 - decay) * batch`` with the *biased* batch variance: their
``momentum`` is a decay, the weight of the old value. The result is a normlab
``BatchNorm1d/2d/3d`` in eval mode with ``momentum = 1 - decay`` (torch's meaning), ``eps = epsilon``
and ``unbiased=False``: its inference is exactly the source's, and further training updates the
statistics as the source would. A source with gamma (scale) and no beta (bias) (Keras
``center=False``, Flax ``use_bias=False``) gives a weight without a bias (``bias=False``: no
``bias`` parameter or state-dict key); one with beta and no gamma gives ``affine=True`` with the
weight frozen at 1 (``requires_grad=False``), so training leaves it as the source would; neither
gives ``affine=False``.

Layout. Keras and Flax default to channels-last (``axis=-1``): ``(N, H, W, C)``. normlab's
layers, like torch's, are channels-first ``(N, C, H, W)``: give them ``x.movedim(-1, 1)`` (for 4-D
input, ``x.permute(0, 3, 1, 2)``: a view in torch's channels_last memory format, no copy, the same
numbers) and turn the output back with ``y.movedim(1, -1)``. A source normalizing over axis 1
(channels-first) needs no permute; any other axis is not a single channel axis and is refused.

``dim`` (BatchNorm1d, 2d or 3d) is read from a built Keras layer's input rank (2-D or 3-D input:
1, 4-D: 2, 5-D: 3). Flax modules and arrays do not record the rank: ``dim`` is then 2 unless given
(the three classes differ only in the input rank they accept, never in the numbers).

What is not imported: cross-device statistics (Keras ``synchronized=True``, Flax ``axis_name``)
give a single-process batch norm (use :func:`normlab.surgery.convert_sync_batchnorm` for
distributed training); a Keras layer with ``trainable=False``, which Keras runs in inference mode
even when training, is imported as it is: keep the result in eval mode, or freeze it with
:func:`normlab.surgery.freeze_bn`. Keras's batch renormalization: see :func:`batchnorm_from_keras`.

>>> import numpy as np, torch
>>> bn = batchnorm_from_keras(np.ones(2), np.zeros(2), np.array([1.0, 2.0]), np.array([4.0, 9.0]),
...                           momentum=0.9, epsilon=1e-3, dim=1)
>>> type(bn).__name__, round(bn.momentum, 6), bn.eps, bn.unbiased, bn.training
('BatchNorm1d', 0.1, 0.001, False, False)
"""

from __future__ import annotations

from ._flax import batchnorm_from_flax
from ._keras import batchnorm_from_keras

__all__ = ["batchnorm_from_flax", "batchnorm_from_keras"]
