"""Whether normlab sees plain eager tensors: the one question its fast paths ask first.

normlab's fastest paths read statistics on the host (one read says whether they are finite and
precise), write into preallocated buffers, or hand data pointers to the compiled kernels
(:mod:`normlab.kernels`). None of that works on tensors that hold no data of their own:

* while ``torch.compile`` or ``torch.export`` traces (``torch.onnx.export`` traces with
  ``torch.export``), tensors are FakeTensors or proxies with symbolic shapes;
* under a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``vmap``, ...) they are
  wrappers, and touching their data fails with "Cannot access data pointer of Tensor that
  doesn't have storage"; one wrapped argument (a weight under ``grad``) is enough to wrap every
  result that depends on it.

Such calls take torch's functional operators instead, with the same numbers. The functional
package and the layers both ask here, so the rule lives in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    from torch._subclasses.fake_tensor import FakeTensor as _FakeTensor
except ImportError:  # pragma: no cover - torch versions without it: compiling() covers tracing
    _FakeTensor = ()

_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)

# Whether torch.compile or torch.export is tracing the caller (an alias: this runs several times
# a call).
compiling = torch.compiler.is_compiling


def transformed(*tensors: Tensor | None) -> bool:
    """Whether any of ``tensors`` (None entries are skipped) is wrapped by a torch.func transform.
    Never while torch.compile traces (it handles the transforms itself and cannot trace the
    check).

    >>> import torch
    >>> x = torch.ones(2)
    >>> transformed(x, None), torch.func.vmap(lambda t: torch.tensor(transformed(t)))(x).tolist()
    (False, [True, True])
    """
    if _is_functorch_wrapped is None or compiling():
        return False
    return any(t is not None and _is_functorch_wrapped(t) for t in tensors)


def traced(*tensors: Tensor | None) -> bool:
    """Whether the caller must not treat ``tensors`` as plain eager tensors with storage: a
    compiler or exporter traces it (:data:`compiling`), one of them is wrapped by a torch.func
    transform (:func:`transformed`), or one is a FakeTensor (shape propagation outside a
    compiler).

    >>> import torch
    >>> traced(torch.ones(2)), torch.func.grad(lambda w: w.sum() * traced(w))(torch.ones(2)).tolist()
    (False, [1.0, 1.0])
    """
    if compiling():
        return True
    return transformed(*tensors) or any(isinstance(t, _FakeTensor) for t in tensors)
