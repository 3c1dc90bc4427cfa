"""Test-time adaptation: batch norms whose statistics follow the data at inference.

A model trained on clean data loses accuracy on shifted data (noise, blur, a new camera); much of
the loss is in the batch norms, which normalize with the statistics of the training data. Two
remedies that need no labels:

* :func:`adapt_bn` (and its context manager :func:`adapting_bn`): each batch norm normalizes
  every test batch with the source statistics and the batch's own, mixed with weight
  ``N / (N + n)`` (Schneider et al. 2020); ``prior=0`` is the test batch's statistics alone.
* :class:`Tent`: the same with ``prior=0``, plus one step of entropy minimization on the norms'
  affine parameters per test batch (Wang et al. 2021).

To re-estimate the running statistics once, from a sample of unlabelled shifted data, use
:func:`normlab.surgery.recalibrate_bn`. Every tool here works on a copy (or, for the context
manager, leaves the model as it was) and never changes the source model.

>>> import torch, normlab
>>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
...                           torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3)).eval()
>>> x = torch.randn(8, 1, 8, 8)
>>> normlab.adapt_bn(net, prior=16)(x).shape, normlab.Tent(net)(x).shape
(torch.Size([8, 3]), torch.Size([8, 3]))
"""

from .bn import adapt_bn, adapted_norms, adapting_bn, mixed_statistics
from .tent import Tent, softmax_entropy

__all__ = ["Tent", "adapt_bn", "adapted_norms", "adapting_bn", "mixed_statistics", "softmax_entropy"]
