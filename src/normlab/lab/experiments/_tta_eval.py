"""tta-corruptions' measurement: a trained model's error on every corruption and severity, with
each test-time method (the source model, recalibrate_bn, adapt_bn at each prior, TENT).

Recorded keys (``row["probes"]``): ``err_{corruption}:{method}:{severity}`` and
``err_mean:{method}:{severity}`` (the mean over the corruptions), errors as fractions; severity 0
is the clean test split (the same value under every corruption's key, so that each line starts
at the clean error). The names are what the report's ``"series"`` figures read.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ...adapt import Tent, adapt_bn, adapted_norms
from ...surgery import recalibrate_bn
from ..corruptions import corrupt

__all__ = ["SOURCE", "RECALIBRATED", "TENT", "adapt_name", "evaluate_methods", "methods", "trained_steps"]

SOURCE, RECALIBRATED, TENT = "source", "recalibrate_bn", "TENT"


def adapt_name(prior: float) -> str:
    """The method name of adapt_bn at ``prior``: ``"adapt_bn N=16"``."""
    return f"adapt_bn N={prior:g}"


def methods(params: dict[str, Any]) -> list[str]:
    """The methods measured, in the order the figures and the table list them."""
    return [SOURCE, RECALIBRATED, *(adapt_name(float(p)) for p in params["priors"]), TENT]


def trained_steps(model: nn.Module) -> int:
    """Training steps the model's first batch norm counted (``num_batches_tracked``), 0 if none."""
    for _, norm in adapted_norms(model):
        count = getattr(norm, "num_batches_tracked", None)
        if count is not None:
            return int(count)
    return 0


def _unit_range(data: Any) -> tuple[Tensor, Tensor]:
    """Per-channel low and high of the training images ``(1, C, 1, 1)``: the pixel range after
    standardization (black and white for the digits), which the corruptions work within."""
    x = data.x_train
    low = x.amin(dim=(0, 2, 3), keepdim=True)
    high = x.amax(dim=(0, 2, 3), keepdim=True)
    return low, torch.where(high > low, high, low + 1)


def _corrupted(x: Tensor, name: str | None, severity: int, seed: int, low: Tensor, high: Tensor) -> Tensor:
    if name is None:
        return x
    unit = (x - low) / (high - low)
    out = corrupt(unit, name, severity, torch.Generator().manual_seed(seed))
    return out * (high - low) + low


def _error(predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, batch: int) -> float:
    wrong = 0
    for start in range(0, len(y), batch):
        logits = predict(x[start:start + batch])
        wrong += int((logits.argmax(1) != y[start:start + batch]).sum())
    return wrong / len(y)


def evaluate_methods(model: nn.Module, data: Any, params: dict[str, Any]) -> dict[str, float]:
    """The errors of every method on the clean test split and on each corruption and severity.

    The test split is streamed in ``params["test_batch"]`` batches in its stored order (the
    split's seeded shuffle). Each corrupted set is drawn from one generator, seeded by
    ``corruption_seed``, the corruption and the severity: every run seed and method sees the same
    images. recalibrate_bn gets the first ``recal_examples`` training images under the same
    corruption (other noise draws), unlabelled; TENT starts from the source model for every
    corruption and severity and adapts online along the stream (Wang et al.'s protocol).
    """
    batch = int(params["test_batch"])
    if params.get("precise_source", True):
        # The source's statistics: the clean training images' population statistics (precise BN),
        # not the running averages, which lag the weights after a short run (Wu & Johnson 2021; C8).
        x = data.x_train
        model = recalibrate_bn(model, [x[i:i + batch] for i in range(0, len(x), batch)])
    model = model.eval()
    priors = [float(p) for p in params["priors"]]
    corruptions = list(params["corruptions"])
    severities = [int(s) for s in params["severities"]]
    base = int(params["corruption_seed"])
    low, high = _unit_range(data)
    x_recal = data.x_train[: int(params["recal_examples"])]
    lr = float(params["tent_lr"])

    def errors(name: str | None, severity: int, k: int) -> dict[str, float]:
        seed = base * 1_000_003 + 1000 * k + severity
        x = _corrupted(data.x_test, name, severity, seed, low, high)
        recal_x = _corrupted(x_recal, name, severity, seed + 500, low, high)
        recalibrated = recalibrate_bn(model, [recal_x[i:i + batch] for i in range(0, len(recal_x), batch)])
        out = {SOURCE: _error(model, x, data.y_test, batch),
               RECALIBRATED: _error(recalibrated.eval(), x, data.y_test, batch)}
        for prior in priors:
            out[adapt_name(prior)] = _error(adapt_bn(model, prior=prior), x, data.y_test, batch)
        tent = Tent(model, optimizer=lambda p: torch.optim.Adam(p, lr=lr))
        out[TENT] = _error(tent, x, data.y_test, batch)
        return out

    with torch.no_grad():
        clean = errors(None, 0, 0)
        results: dict[str, float] = {}
        sums: dict[tuple[str, int], float] = {}
        for method, err in clean.items():
            results[f"err_mean:{method}:0"] = err
        for k, name in enumerate(corruptions, start=1):
            for method, err in clean.items():
                results[f"err_{name}:{method}:0"] = err
            for severity in severities:
                for method, err in errors(name, severity, k).items():
                    results[f"err_{name}:{method}:{severity}"] = err
                    sums[(method, severity)] = sums.get((method, severity), 0.0) + err
        for (method, severity), total in sums.items():
            results[f"err_mean:{method}:{severity}"] = total / len(corruptions)
    return results
