"""The one module walker: replace_modules / find_modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlab.surgery import find_modules, replace_modules


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def net() -> nn.Sequential:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), inner, nn.ModuleDict({"head": nn.Linear(4, 2)}))


def test_replace_by_class_in_a_copy_leaves_the_input_untouched():
    model = net()
    before = {name: m for name, m in model.named_modules()}
    new = replace_modules(model, nn.ReLU, lambda name, m: nn.Tanh())
    assert [n for n, m in new.named_modules() if isinstance(m, nn.Tanh)] == ["1", "2.1"]
    assert {name: m for name, m in model.named_modules()} == before  # same objects, same places
    assert all(not isinstance(m, nn.Tanh) for m in model.modules())
    assert new[0] is not model[0] and state_equal(new, model)


def test_replace_by_qualified_names_and_predicate():
    model = net()
    seen = []
    new = replace_modules(model, ["2.0", "3.head"], lambda name, m: seen.append(name) or nn.Identity())
    assert seen == ["2.0", "3.head"]
    assert isinstance(new[2][0], nn.Identity) and isinstance(new[3]["head"], nn.Identity)
    new = replace_modules(model, lambda name, m: isinstance(m, nn.Linear) and m.out_features == 2,
                          lambda name, m: nn.Linear(4, 5))
    assert new[3]["head"].out_features == 5 and model[3]["head"].out_features == 2


def test_shared_module_is_replaced_once_and_stays_shared():
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(3, 4), shared, nn.Linear(4, 4), shared)
    calls = []
    new = replace_modules(model, nn.BatchNorm1d, lambda name, m: calls.append(name) or nn.Identity())
    assert calls == ["1"]
    assert new[1] is new[3] and isinstance(new[1], nn.Identity)


def test_matched_module_is_not_descended_and_root_can_match():
    model = net()
    visited = []
    replace_modules(model, lambda name, m: visited.append(name) or name == "2", lambda name, m: m)
    assert "2.0" not in visited and "2" in visited
    root = replace_modules(model, [""], lambda name, m: nn.Identity())
    assert isinstance(root, nn.Identity)


def test_inplace_changes_the_model_itself():
    model = net()
    out = replace_modules(model, nn.ReLU, lambda name, m: nn.GELU(), inplace=True)
    assert out is model and isinstance(model[1], nn.GELU)


def test_find_modules_returns_what_would_be_replaced():
    model = net()
    assert [n for n, _ in find_modules(model, (nn.Linear,))] == ["0", "2.0", "3.head"]
    assert [n for n, _ in find_modules(model, "2")] == ["2"]


def test_errors():
    model = net()
    with pytest.raises(ValueError, match=r"no submodule named '2\.5' in the model; the qualified names .* '2\.0'"):
        replace_modules(model, ["2.5"], lambda name, m: m)
    with pytest.raises(TypeError, match=r"make\('1', \.\.\.\) must return a torch.nn.Module, got str"):
        replace_modules(model, nn.ReLU, lambda name, m: "relu")
    with pytest.raises(TypeError, match=r"match must be a predicate .* got int 3"):
        replace_modules(model, 3, lambda name, m: m)
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got dict"):
        replace_modules({}, nn.ReLU, lambda name, m: m)
