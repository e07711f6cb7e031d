import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import needs_fmnist
from mulosd.data import FashionMNIST, find_data_dir, load_fashion_mnist, read_idx, resize_images
from mulosd.errors import MulosdError


def write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if compress else open)(path, "wb").write(data)


@pytest.fixture
def tiny_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), True)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), False)
    return tmp_path


def test_read_idx_roundtrip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", arr, True)
    write_idx(tmp_path / "b", arr, False)
    assert (read_idx(tmp_path / "a.gz") == arr).all()
    assert (read_idx(tmp_path / "b") == arr).all()


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(MulosdError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"abc")
    with pytest.raises(MulosdError, match="header announces"):
        read_idx(tmp_path / "short")


def test_user_directory_padding_and_scales(tiny_dir):
    x, y = load_fashion_mnist("train", tiny_dir)
    assert x.shape == (12, 1, 32, 32) and y.shape == (12,)
    assert x.min() >= -1 and x.max() <= 1
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()  # black 2-px border
    ds = FashionMNIST.load("test", tiny_dir)
    assert ds.at(16).shape == (5, 1, 16, 16) and ds.at(8).shape == (5, 1, 8, 8)
    # area down-sampling is the mean of each 2x2 block
    assert torch.allclose(ds.at(16)[0, 0, 3, 5], ds.images[0, 0, 6:8, 10:12].mean())


def test_missing_dataset_says_how_to_install(tmp_path):
    with pytest.raises(MulosdError, match="apt-get install dataset-fashion-mnist"):
        find_data_dir(tmp_path)
    with pytest.raises(MulosdError, match="unknown split"):
        load_fashion_mnist("validation", tmp_path)
    with pytest.raises(MulosdError, match="integer"):
        resize_images(torch.zeros(1, 1, 32, 32), 12)


@needs_fmnist
def test_real_fashion_mnist():
    ds = FashionMNIST.load("test")
    assert len(ds) == 10_000 and ds.images.shape[-1] == 32
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
