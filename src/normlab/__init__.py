"""normlab: normalization layers for PyTorch that match ``torch.nn``, and a lab for batch norm's claims.

>>> import torch, normlab
>>> bn = normlab.BatchNorm2d(8)
>>> bn(torch.randn(4, 8, 5, 5)).shape
torch.Size([4, 8, 5, 5])
"""

from . import adapt, functional, stats, surgery
from .layers import *  # noqa: F401,F403  (the layers are the top-level API)
from .layers import __all__ as _layer_names

from .accumulate import accumulate
from .adapt import Tent, adapt_bn, adapting_bn
from .surgery import convert_sync_batchnorm

__version__ = "0.1.0"
__all__ = ["Tent", "accumulate", "adapt", "adapt_bn", "adapting_bn", "convert_sync_batchnorm", "functional", "stats",
           "surgery", "__version__", *_layer_names]
