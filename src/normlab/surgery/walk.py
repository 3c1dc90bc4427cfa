"""The one module walker: replace the submodules a rule picks, in a copy of the model.

Every model tool of :mod:`normlab.surgery` (folding's structural path, conversion, freezing,
unfreezing) changes a model through :func:`replace_modules`, so they share one behaviour:

* the input model is never modified: the walk runs on a ``copy.deepcopy`` (``inplace=True``
  skips the copy for models too large to hold twice); a model whose lazy layers have not run
  yet cannot be copied (torch's limit), and is refused with a ``ValueError`` saying so;
* a module reachable under several names (weight sharing) is replaced once, and every name
  then points to the same replacement, as before;
* a replaced module is not descended into (its children went with it), and neither is the
  replacement;
* the rule ``match`` is a predicate ``match(name, module)``, a class or tuple of classes, or a
  collection of qualified names (a name that is not in the model is an error listing the valid
  ones).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from typing import Union

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

__all__ = ["Match", "check_model", "find_modules", "replace_modules"]

Match = Union[Callable[[str, nn.Module], bool], type, tuple, Collection[str], str]


def check_model(model: object, where: str) -> None:
    """Raise a ``TypeError`` unless ``model`` is a ``torch.nn.Module`` (``where``: the tool's name).

    >>> check_model(None, "check_stats")
    Traceback (most recent call last):
    ...
    TypeError: check_stats: model must be a torch.nn.Module, got NoneType; pass the model itself (e.g. not the result of model.eval() on a function that returns None).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be a torch.nn.Module, got {type(model).__name__}; pass the model "
                        f"itself (e.g. not the result of model.eval() on a function that returns None).")


def _predicate(model: nn.Module, match: Match, where: str) -> Callable[[str, nn.Module], bool]:
    if isinstance(match, type) or (isinstance(match, tuple) and match and all(isinstance(t, type) for t in match)):
        return lambda name, module: isinstance(module, match)
    if isinstance(match, str):
        match = [match]
    if callable(match):
        return match
    if isinstance(match, Collection) and all(isinstance(n, str) for n in match):
        names = set(match)
        known = {name for name, _ in model.named_modules(remove_duplicate=False)}
        missing = sorted(names - known)
        if missing:
            valid = sorted(n for n in known if n)
            shown = ", ".join(repr(n) for n in valid[:30]) + (", ..." if len(valid) > 30 else "")
            raise ValueError(
                f"{where}: no submodule named {', '.join(map(repr, missing))} in the model; the "
                f"qualified names (model.named_modules()) are: {shown}."
            )
        return lambda name, module: name in names
    raise TypeError(
        f"{where}: match must be a predicate match(name, module) -> bool, a module class or tuple of "
        f"classes, or a collection of qualified module names, got {type(match).__name__} {match!r}."
    )


def find_modules(model: nn.Module, match: Match) -> list[tuple[str, nn.Module]]:
    """The ``(qualified name, module)`` pairs that ``match`` picks, in ``named_modules`` order,
    without descending into a picked module (the modules :func:`replace_modules` would replace).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    >>> [name for name, _ in find_modules(net, torch.nn.BatchNorm1d)]
    ['1']
    """
    picks = _predicate(model, match, "find_modules")
    found: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        if picks(prefix, module):
            found.append((prefix, module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def _check_copyable(model: nn.Module) -> None:
    """The tools copy the model; torch cannot copy a lazy module before its first forward."""
    lazy = [name or "<model>" for name, m in model.named_modules()
            if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise ValueError(
            f"replace_modules: the model has lazy layers whose parameters do not exist yet ({', '.join(map(repr, lazy[:5]))}"
            f"{' ...' if len(lazy) > 5 else ''}): they are created from the shape of the first input, and torch "
            f"cannot copy the model before that. Run the model once on an input first."
        )


def replace_modules(
    model: nn.Module,
    match: Match,
    make: Callable[[str, nn.Module], nn.Module],
    *,
    inplace: bool = False,
) -> nn.Module:
    """A copy of ``model`` in which every module that ``match`` picks is ``make(name, module)``.

    Args:
        model: the model; left untouched unless ``inplace``.
        match: ``match(name, module) -> bool``, a module class or tuple of classes (``isinstance``),
            or a collection of qualified names (``model.named_modules()`` names; ``""`` is the root).
        make: builds the replacement from the qualified name and the (copied) module; return the
            module itself to keep it.
        inplace: change ``model`` itself instead of a deep copy.

    Returns:
        The new model (the replacement itself when the root matches).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    >>> new = replace_modules(net, torch.nn.ReLU, lambda name, m: torch.nn.Tanh())
    >>> type(new[1]).__name__, type(net[1]).__name__
    ('Tanh', 'ReLU')
    """
    check_model(model, "replace_modules")
    picks = _predicate(model, match, "replace_modules")
    if not inplace:
        _check_copyable(model)
    root = model if inplace else copy.deepcopy(model)
    done: dict[int, nn.Module] = {}  # id(old module) -> its replacement, for shared modules

    def visit(prefix: str, module: nn.Module) -> nn.Module:
        key = id(module)
        if key in done:
            return done[key]
        if picks(prefix, module):
            new = make(prefix, module)
            if not isinstance(new, nn.Module):
                raise TypeError(
                    f"replace_modules: make({prefix!r}, ...) must return a torch.nn.Module, got "
                    f"{type(new).__name__}; return the module itself to keep it."
                )
            done[key] = new
            return new
        done[key] = module  # children are visited once even if the module is shared
        # _modules, not named_children(): the latter skips a child met before (weight sharing).
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = visit(f"{prefix}.{name}" if prefix else name, child)
            if new_child is not child:
                setattr(module, name, new_child)
        return module

    return visit("", root)
