"""What a training step costs, measured side by side: the bytes autograd keeps for backward,
the time per step (interleaved rounds, paired ratios), the CUDA peak; used by the ``cost``
experiment (:mod:`normlab.lab.experiments.cost`, claim C9), whose docstring says what each
measurement counts and why.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .config import ExperimentConfig, ModelConfig
from .models import ACTIVATIONS, FUSED_ACTIVATIONS

__all__ = ["FUSABLE", "VARIANTS", "VariantCost", "build_variant", "cuda_step_peak", "fuse_blocks", "measure_costs",
           "paired_ratio", "saved_bytes", "step_clock"]

VARIANTS = ("none", "batch", "batch_act")
# The activations BatchNormAct fuses (its "identity" is no activation at all): the lab's list.
FUSABLE = {name: ACTIVATIONS[name] for name in FUSED_ACTIVATIONS}


def saved_bytes(run: Callable[[], Any], keep: Iterable[Tensor] = ()) -> int:
    """Bytes of the storages autograd saves for backward while ``run()`` executes.

    Every tensor saved for backward (through ``torch.autograd.graph.saved_tensors_hooks``) is
    counted by its whole storage, each storage once (views and tensors that share memory, e.g.
    one output saved by two consumers, count once), except the storages of ``keep``: tensors
    that exist before the call and outlive it (parameters, buffers, the input), whose memory
    saving does not add to. ``run``'s result is dropped, which frees the graph.

    Args:
        run: builds the graph (e.g. ``lambda: F.cross_entropy(model(x), y)``).
        keep: tensors whose storages are not counted.

    Returns:
        The bytes, an int.

    >>> x = torch.randn(5, 8, requires_grad=True)          # 5 x 8 float32: 160 bytes
    >>> saved_bytes(lambda: (2 * x).sin() + (2 * x).cos(), keep=[x])   # each 2x saved once by sin or cos
    320
    >>> z = torch.randn(5, 8, requires_grad=True)
    >>> saved_bytes(lambda: z.sin() + z.cos(), keep=[z])  # z saved twice, but it existed before
    0
    >>> saved_bytes(lambda: z.sin() + z.cos())  # counted once
    160
    """
    skip = {t.untyped_storage().data_ptr() for t in keep}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t  # the graph keeps the tensor, so no saved storage is freed (and its address reused) meanwhile

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    del out
    return sum(storages.values())


def cuda_step_peak(step: Callable[[], Any], device: torch.device) -> int:
    """Peak CUDA memory allocated during ``step()`` above what was allocated when it began, in bytes
    (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, synchronized)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def fuse_blocks(model: nn.Module) -> nn.Module:
    """Make every block ``layer -> BatchNormAct(act) -> Identity``: the activation runs inside the
    fused layer, once. In place; returns ``model``.

    The lab's ``build_model`` with ``norm="batch_act"`` builds blocks fused this way already (a
    block whose activation is ``nn.Identity`` is left alone); a model built otherwise, with a
    ``BatchNormAct`` followed by an activation module, gets the module moved into the
    ``BatchNormAct`` (its ``negative_slope`` / ``alpha`` kept) and replaced by ``nn.Identity``.

    Raises:
        ValueError: a block's norm is no ``BatchNormAct``, or its activation is one the fused
            layer does not have.

    >>> from normlab.lab.models import build_model
    >>> net = fuse_blocks(build_model(ModelConfig(widths=[4], norm="batch_act", activation="leaky_relu"), (3,), 2))
    >>> net.blocks[0].norm.act, type(net.blocks[0].act).__name__
    ('leaky_relu', 'Identity')
    """
    for i, block in enumerate(getattr(model, "blocks", [])):
        norm, act = getattr(block, "norm", None), block.act
        if not isinstance(norm, (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)):
            raise ValueError(f"fuse_blocks: block {i} has norm {type(norm).__name__}, not a BatchNormAct; build the "
                             f"model with model.norm='batch_act' and placement 'before'.")
        if isinstance(act, nn.Identity):
            continue
        name = next((n for n, cls in FUSABLE.items() if type(act) is cls), None)
        if name is None:
            raise ValueError(f"fuse_blocks: BatchNormAct fuses {sorted(FUSABLE)}, not block {i}'s "
                             f"{type(act).__name__}; use one of those as model.activation.")
        norm.act = name
        norm.negative_slope = float(getattr(act, "negative_slope", norm.negative_slope))
        norm.alpha = float(getattr(act, "alpha", norm.alpha))
        block.act = nn.Identity()  # same name, same place in the block
    return model


def build_variant(model_config: ModelConfig, variant: str, input_shape: tuple[int, ...], num_classes: int, *,
                  inplace: bool = False) -> nn.Module:
    """The network of one variant (``none``, ``batch`` or ``batch_act``; see the module docstring).

    ``inplace``: the blocks' activation modules run in place (for ``none`` and ``batch``; the
    fused variant has none left). Seed the global generator before each call for equal weights.
    """
    from .models import build_model

    if variant not in VARIANTS:
        raise ValueError(f"build_variant: variant must be one of {list(VARIANTS)}, got {variant!r}.")
    model = build_model(dataclasses.replace(model_config, norm=variant), input_shape, num_classes)
    if variant == "batch_act":
        fuse_blocks(model)
    elif inplace:
        for block in model.blocks:
            if hasattr(block.act, "inplace"):
                block.act.inplace = True
    return model


@dataclasses.dataclass
class VariantCost:
    """One variant's measurements in one job (see the module docstring)."""

    saved_bytes: int
    saved_bytes_inplace: int | None  # with the activation in place (none, batch); None for the fused variant
    round_ms: list[float]  # the time of each timed round's step, in order
    cuda_peak_bytes: int | None  # None off CUDA

    @property
    def time_ms(self) -> float:
        return statistics.median(self.round_ms)


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock a step is timed with, in seconds: on the CPU the process's CPU time
    (``time.process_time``: a step that the scheduler interrupts to run another process is not
    charged for the wait, which on a shared machine is most of the noise of wall time); on an
    accelerator the wall clock (``time.perf_counter``), the caller synchronizing around the step,
    since the work is the device's, not the process's."""
    return time.perf_counter if device.type != "cpu" else time.process_time


def paired_ratio(times: list[float], baseline: list[float]) -> float:
    """The median over rounds of ``times[i] / baseline[i]``: each round's steps ran back to back
    under the same load, so the ratio of a round cancels load that drifts between rounds.

    >>> paired_ratio([2.0, 2.2, 9.0], [1.0, 1.0, 3.0])
    2.2
    """
    if not times or len(times) != len(baseline):
        raise ValueError(f"paired_ratio needs two equally long, non-empty lists of round times, got {len(times)} "
                         f"and {len(baseline)}.")
    return statistics.median(a / b for a, b in zip(times, baseline))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def _loss_saved(model: nn.Module, x: Tensor, y: Tensor) -> int:
    keep = [x, y, *model.parameters(), *model.buffers()]
    return saved_bytes(lambda: F.cross_entropy(model(x), y), keep)


def measure_costs(config: ExperimentConfig, data: Any, seed: int, device: torch.device) -> dict[str, VariantCost]:
    """Measure every variant of ``config``'s network side by side (see the module docstring).

    Args:
        config: one job's config (no grid): model, ``train.steps`` timed rounds, batch size,
            optimizer; ``params.warmup`` untimed rounds.
        data: a :class:`~normlab.lab.data.Dataset` on ``device``.
        seed: the variants' initial weights and the batches.
        device: where the models run.

    Returns:
        ``{variant: VariantCost}`` in :data:`VARIANTS` order.
    """
    from .job import BatchSampler, make_optimizer

    models, optimizers = {}, {}
    for variant in VARIANTS:
        torch.manual_seed(seed)  # the same Linear/Conv weights in every variant (norms draw nothing)
        models[variant] = build_variant(config.model, variant, data.input_shape, data.num_classes).to(device).train()
        optimizers[variant] = make_optimizer(config.train, models[variant])
    sampler = BatchSampler(len(data.y_train), config.train.batch_size, seed)

    def batch() -> tuple[Tensor, Tensor]:
        idx = sampler.next()
        return data.x_train[idx], data.y_train[idx]

    x, y = batch()
    saved = {v: _loss_saved(m, x, y) for v, m in models.items()}
    inplace = {}
    for variant in ("none", "batch"):
        twin = copy.deepcopy(models[variant])
        for block in twin.blocks:
            if hasattr(block.act, "inplace"):
                block.act.inplace = True
        inplace[variant] = _loss_saved(twin, x, y)
        del twin

    cuda = device.type == "cuda"
    clock = step_clock(device)

    def timed(variant: str, xb: Tensor, yb: Tensor) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = clock()
        _train_step(models[variant], optimizers[variant], xb, yb)
        if cuda:
            torch.cuda.synchronize(device)
        return (clock() - t0) * 1e3

    for _ in range(int(config.params.get("warmup", 3))):
        xb, yb = batch()
        for variant in VARIANTS:
            timed(variant, xb, yb)
    rounds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    gc.collect()
    gc.disable()  # a collection inside one variant's step would charge it alone
    try:
        for i in range(config.train.steps):
            xb, yb = batch()
            k = i % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                rounds[variant].append(timed(variant, xb, yb))
    finally:
        gc.enable()

    peaks: dict[str, int | None] = {v: None for v in VARIANTS}
    if cuda:
        xb, yb = batch()
        for variant in VARIANTS:
            peaks[variant] = cuda_step_peak(lambda: _train_step(models[variant], optimizers[variant], xb, yb), device)
    return {v: VariantCost(saved[v], inplace.get(v), rounds[v], peaks[v]) for v in VARIANTS}
